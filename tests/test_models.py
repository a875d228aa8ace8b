import os
import pickle
import re
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
from torch import nn

from embcam import EmbeddingCAM, load_model, save_checkpoint
from embcam.models import Preprocessing, build_model, export_torchscript, get_layer, load_checked


@pytest.mark.parametrize("spec,d", [("torchvision:resnet18+linear:8", 8), ("torchvision:resnet34", 512),
                                    ("torchvision:resnet50+linear:8", 8), ("torchvision:mobilenet_v2", 1280),
                                    ("embcam:small-resnet+linear:8", 8), ("torchvision:regnet_y_400mf", 440),
                                    ("torchvision:mobilenet_v3_small+linear:8", 8)])  # a pool with a Linear
def test_specs_build_and_explain(spec, d):
    model, prep, _ = load_model(spec, image_size=64)
    out = EmbeddingCAM(model, strategy="embedding-map")(torch.randn(1, 3, 64, 64))
    assert out.embeddings.shape == (1, d) and out.heatmaps.dim() == 3 and prep.size == 64


def test_unknown_specs_and_layers_fail_clearly():
    with pytest.raises(ValueError, match="unknown architecture 'vgg16' in 'torchvision:vgg16'; `embcam models "
                                         "torchvision:` lists its"):
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
    with pytest.raises(ValueError, match="missing from the checkpoint: backbone.bn1"):
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


@pytest.mark.slow  # a subprocess
def test_job_stages_do_not_import_torchvision():
    """A second of every model worker's start, not needed by the small model."""
    code = ("import sys, embcam.job.model_stage; from embcam.models import build_model; "
            "build_model('embcam:small-resnet+linear:8'); assert 'torchvision' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_jobs_cpu_tasks_do_not_import_torch():
    """Every decode and commit worker of a job would pay 3-4 s and about 300 MB for it."""
    code = "import sys, embcam.job.image_source, embcam.job.tasks; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def hostile_pkg(tmp_path, monkeypatch):
    """A package on sys.path: importing hostile_pkg.models touches IMPORTED; tiny() builds a model."""
    pkg = tmp_path / "hostile_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(textwrap.dedent("""
        import pathlib
        import torch
        pathlib.Path(__file__).with_name("IMPORTED").touch()
        def tiny():
            return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg
    for name in ("hostile_pkg.models", "hostile_pkg"):
        sys.modules.pop(name, None)


def checkpoint_naming(path, spec, state=None):
    """A weights_only-clean checkpoint whose recorded spec is ``spec``."""
    torch.save({"spec": spec, "preprocessing": {"size": 16, "mean": [0, 0, 0], "std": [1, 1, 1]},
                "state_dict": state or {}}, path)
    assert torch.load(path, weights_only=True)["spec"] == spec
    return path


@pytest.mark.parametrize("kind", ["tempfile:mkdtemp", "hostile_pkg.models:tiny", "torchscript"])
def test_a_checkpoint_cannot_name_code(kind, hostile_pkg, tmp_path, monkeypatch):
    calls = []

    def spy(fn):
        return lambda *a, **k: calls.append(fn.__name__) or fn(*a, **k)

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "mkdtemp", spy(tempfile.mkdtemp))
    export_torchscript(build_model("embcam:small-resnet"), tmp_path / "m.ts")
    monkeypatch.setattr(torch.jit, "load", spy(torch.jit.load))
    spec = f"torchscript:{tmp_path / 'm.ts'}" if kind == "torchscript" else kind
    path = checkpoint_naming(tmp_path / "c.pt", spec)
    with pytest.raises(ValueError) as err:
        load_model(checkpoint=path)
    assert str(err.value) == (f"checkpoint {path} names model {spec[:100]!r}, but a checkpoint may only name built-in "
                              "models (torchvision:, embcam:, timm:): user code and TorchScript must be named on the "
                              "command line with --model")
    assert calls == [] and os.listdir(tmp_path / "tmp") == []
    assert not (hostile_pkg / "IMPORTED").exists() and "hostile_pkg" not in sys.modules


@pytest.mark.slow  # a subprocess
def test_os_abort_in_a_checkpoint_is_refused_and_the_process_lives(tmp_path):
    path = checkpoint_naming(tmp_path / "abort.pt", "os:abort")
    code = (f"from embcam.models import load_model\n"
            f"try: load_model(checkpoint={str(path)!r})\nexcept ValueError as e: print(e)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "'os:abort', but a checkpoint may only name built-in models" in run.stdout


def test_user_code_named_by_the_caller_still_loads_with_the_checkpoint(hostile_pkg, tmp_path):
    torch.manual_seed(3)
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    path = checkpoint_naming(tmp_path / "c.pt", "hostile_pkg.models:tiny", tiny.state_dict())
    with pytest.raises(ValueError, match="--model"):
        load_model(checkpoint=path)
    assert not (hostile_pkg / "IMPORTED").exists()
    model, prep, spec = load_model("hostile_pkg.models:tiny", path)  # the user named it
    assert (hostile_pkg / "IMPORTED").exists() and spec == "hostile_pkg.models:tiny" and prep.size == 16
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), tiny(x))


class _Touch:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_malicious_pickle_is_refused_in_one_line(writer, tmp_path):
    marker, path = tmp_path / "PWNED", tmp_path / "evil.pt"
    blob = {"spec": "embcam:small-resnet", "state_dict": _Touch(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(blob, protocol=2))
    else:
        torch.save(blob, path)
    assert b"system" in path.read_bytes() and b"touch" in path.read_bytes()
    with pytest.raises(ValueError) as err:
        load_model(checkpoint=path)
    message = str(err.value)
    assert re.fullmatch(rf"checkpoint {re.escape(str(path))} is not a weights-only PyTorch file "
                        r"\(UnpicklingError[^()\n]*\)", message), message
    assert "system" not in message and "touch" not in message
    assert not marker.exists()


@pytest.mark.parametrize("text", [None, "credentials\nhunter2 swordfish\n", "hello swordfish\n"])
def test_unreadable_files_give_one_line_without_their_text(text, tmp_path):
    path = tmp_path / "bad.pt"
    if text is None:  # a truncated checkpoint
        save_checkpoint(path, build_model("embcam:small-resnet"), "embcam:small-resnet", Preprocessing(16))
        path.write_bytes(path.read_bytes()[:5000])
        secrets = ["small-resnet", "state_dict", "backbone"]
    else:  # torch's own messages quote "credentials\nhunter2..." (a pickle GLOBAL) and "hello"'s
        path.write_text(text)  # second byte ('h' is pickle's BINGET: KeyError: 101)
        secrets = text.split() + [str(byte) for byte in text.encode()[:2]]
    with pytest.raises(ValueError) as err:
        load_model(checkpoint=path)
    message = str(err.value)
    assert re.fullmatch(rf"checkpoint {re.escape(str(path))} is not a weights-only PyTorch file \([^()\n]+\)",
                        message), message
    assert not any(secret in message.replace(str(path), "") for secret in secrets), message


# -- a checkpoint must fit the model -----------------------------------------------------------


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """A user's fine-tune as they save it: torchvision's resnet18 with ``fc = Linear(512, 128)``,
    its state dict in torchvision's names; random weights, seeded."""
    import torchvision

    torch.manual_seed(11)
    net = torchvision.models.resnet18()
    net.fc = nn.Linear(512, 128)
    path = tmp_path_factory.mktemp("ft") / "ft.pth"
    torch.save(net.state_dict(), path)
    return path, torch.load(path, weights_only=True)


def test_a_checkpoint_whose_head_does_not_fit_is_an_error_naming_shapes_and_fix(fine_tuned):
    path, _ = fine_tuned
    with pytest.raises(ValueError) as err:
        load_model("torchvision:resnet18+linear:64", path)
    assert str(err.value) == (
        f"checkpoint {path} does not fit model torchvision:resnet18+linear:64: 2 model tensor(s) not loaded, "
        "120 loaded; shape mismatches (checkpoint vs model): head.bias (128,) vs (64,), head.weight (128, 512) "
        "vs (64, 512); the checkpoint's head is Linear(512->128), the model's Linear(512->64): use --model "
        "torchvision:resnet18+linear:128 for the checkpoint's head (or torchvision:resnet18+identity for the "
        "features before it); to run anyway with the tensors not loaded at their random init: "
        "--allow-partial-checkpoint (allow_partial=True)")


def test_a_checkpoint_without_the_head_names_the_missing_tensors_and_identity(fine_tuned, tmp_path):
    _, saved = fine_tuned
    torch.save({k: v for k, v in saved.items() if not k.startswith("fc.")}, tmp_path / "backbone.pth")
    with pytest.raises(ValueError, match=r"2 model tensor\(s\) not loaded, 120 loaded; missing from the checkpoint: "
                                         r"head.bias, head.weight; the checkpoint has no embedding head: use --model "
                                         r"torchvision:resnet18\+identity; "):
        load_model("torchvision:resnet18+linear:64", tmp_path / "backbone.pth")


def test_a_partial_checkpoint_loads_what_fits_only_when_allowed(fine_tuned):
    path, saved = fine_tuned
    model, _, _, fit = load_checked("torchvision:resnet18+linear:64", path, allow_partial=True)
    assert fit.partial and fit.loaded == 120 and fit.missing == [] and fit.unexpected == []
    assert fit.mismatched == [{"name": "head.bias", "checkpoint": [128], "model": [64]},
                              {"name": "head.weight", "checkpoint": [128, 512], "model": [64, 512]}]
    assert torch.equal(model.backbone.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])
    seeded, _, _ = load_model("torchvision:resnet18+linear:64")  # what the head is: its seeded init
    assert torch.equal(model.head.weight, seeded.head.weight)
    assert fit.to_json()["partial"] is True and "head.weight (128, 512) vs (64, 512)" in fit.warning()


def test_a_matching_checkpoint_loads_exactly(fine_tuned):
    path, saved = fine_tuned
    model, _, _, fit = load_checked("torchvision:resnet18+linear:128", path)
    assert not fit.partial and fit.loaded == len(saved) and fit.dropped == []
    state = model.state_dict()
    assert torch.equal(state["head.weight"], saved["fc.weight"]) and torch.equal(state["head.bias"], saved["fc.bias"])
    for key, value in saved.items():
        mine = "head" + key[2:] if key.startswith("fc.") else "backbone." + key
        assert torch.equal(state[mine], value), key


@pytest.mark.parametrize("blob, match", [
    ([torch.zeros(1)], "is neither a state dict"),
    ({"state_dict": {"w": 1}}, "is neither a state dict"),
    ({"w": torch.zeros(1), 3: torch.zeros(1)}, "is neither a state dict"),
    ({"state_dict": {}, "spec": 3}, "'spec' must be a string, not int"),
    ({"state_dict": {}, "spec": "timm:vit"}, "unknown architecture 'vit' in 'timm:vit'"),  # allowed, not a timm name
    ({"state_dict": {}, "preprocessing": {"size": 16}}, "bad 'preprocessing' entry"),
    ({"state_dict": {}, "preprocessing": [16, (0, 0, 0), (1, 1, 1)]}, "bad 'preprocessing' entry"),
    ({"state_dict": {}, "preprocessing": {"size": "16", "mean": (0, 0, 0), "std": (1, 1, 1)}}, "bad 'preproc"),
    ({"state_dict": {}, "preprocessing": {"size": 16, "mean": (0, 0), "std": (1, 1, 1)}}, "bad 'preproc"),
    ({"state_dict": {}, "preprocessing": {"size": 16, "mean": (0, 0, 0), "std": (1, 0, 1)}}, "bad 'preproc"),
    ({"state_dict": {}, "preprocessing": {"size": 16, "mean": "abc", "std": (1, 1, 1)}}, "bad 'preproc"),
])
def test_malformed_checkpoints_fail_clearly(blob, match, tmp_path):
    torch.save(blob, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=match):
        load_model("embcam:small-resnet" if "spec" not in blob else None, tmp_path / "c.pt")
