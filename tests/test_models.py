import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from embcam import EmbeddingCAM, load_model, save_checkpoint
from embcam.models import Preprocessing, build_model, export_torchscript, get_layer


@pytest.mark.parametrize("spec,d", [("torchvision:resnet18+linear:8", 8), ("torchvision:resnet34", 512),
                                    ("torchvision:resnet50+linear:8", 8), ("torchvision:mobilenet_v2", 1280),
                                    ("embcam:small-resnet+linear:8", 8)])
def test_specs_build_and_explain(spec, d):
    model, prep, _ = load_model(spec, image_size=64)
    out = EmbeddingCAM(model, strategy="embedding-map")(torch.randn(1, 3, 64, 64))
    assert out.embeddings.shape == (1, d) and out.heatmaps.dim() == 3 and prep.size == 64


def test_unknown_specs_and_layers_fail_clearly():
    with pytest.raises(ValueError, match="known: .*resnet50"):
        build_model("torchvision:vgg16")
    with pytest.raises(ValueError, match="linear:<d>"):
        build_model("torchvision:resnet18+mlp")
    with pytest.raises(ValueError, match="candidates: .*backbone.layer4"):
        get_layer(build_model("torchvision:resnet18"), "layer4")


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    torch.manual_seed(1)
    model = build_model("embcam:small-resnet+linear:8").eval()
    save_checkpoint(tmp_path / "m.pt", model, "embcam:small-resnet+linear:8", Preprocessing(48), seed=1)
    loaded, prep, spec = load_model(checkpoint=tmp_path / "m.pt")  # spec and size come from the file
    x = torch.randn(2, 3, 48, 48)
    assert spec == "embcam:small-resnet+linear:8" and prep.size == 48
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match=r"shape mismatches.*head.weight \(8, 128\) vs \(4, 128\)"):
        load_model("embcam:small-resnet+linear:4", tmp_path / "m.pt")
    torch.save({"backbone.conv1.weight": torch.zeros(1)}, tmp_path / "raw.pt")
    with pytest.raises(ValueError, match="missing keys: backbone.bn1"):
        load_model("embcam:small-resnet", tmp_path / "raw.pt")


def test_torchscript_export_is_explained_like_the_eager_model(tmp_path):
    torch.manual_seed(2)
    model = build_model("embcam:small-resnet+linear:8").eval()
    export_torchscript(model, tmp_path / "m.ts")
    scripted, _, _ = load_model(f"torchscript:{tmp_path / 'm.ts'}")
    x, p = torch.randn(2, 3, 48, 48), torch.randn(2, 8)
    for strategy in ("autograd", "embedding-map"):
        got = EmbeddingCAM(scripted, strategy=strategy)(x, p).heatmaps
        torch.testing.assert_close(got, EmbeddingCAM(model)(x, p).heatmaps, rtol=1e-5, atol=1e-7)


def test_user_factory_is_imported_only_when_named(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch
        def tiny():
            return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model, _, _ = load_model("my_models:tiny")
    out = EmbeddingCAM(model, target_layer="1")(torch.randn(1, 3, 16, 16), "self")
    assert out.heatmaps.shape == (1, 14, 14) and out.heatmaps.max() > 0


@pytest.mark.parametrize("stride, cin", [(1, 16), (2, 8)])
def test_vendored_basic_block_is_torchvision_s(stride, cin):
    from torchvision.models.resnet import BasicBlock as TorchvisionBlock

    from embcam.models import BasicBlock

    def block(cls):
        torch.manual_seed(0)
        down = (nn.Sequential(nn.Conv2d(cin, 16, 1, stride, bias=False), nn.BatchNorm2d(16))
                if stride != 1 or cin != 16 else None)
        return cls(cin, 16, stride, downsample=down).eval()

    ours, theirs = block(BasicBlock), block(TorchvisionBlock)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # checkpoints load either way
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())  # same init
    x = torch.randn(2, cin, 16, 16)
    assert torch.equal(ours(x), theirs(x))


def test_job_stages_do_not_import_torchvision():
    """A second of every model worker's start, not needed by the small model."""
    code = ("import sys, embcam.stages; from embcam.models import build_model; "
            "build_model('embcam:small-resnet+linear:8'); assert 'torchvision' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
