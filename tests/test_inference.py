"""prepare_for_inference / fold_batchnorm compute what the model computed (float64)."""
import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from embcam import EmbeddingCAM, prepare_for_inference
from embcam.inference import fold_batchnorm
from embcam.models import build_model

from conftest import randomise_bn

pytestmark = pytest.mark.usefixtures("float64")  # float64 models and tensors in this module


def model_with_bn_stats(spec: str) -> nn.Module:
    """A seeded model whose BatchNorm layers have non-trivial statistics and affine terms."""
    torch.manual_seed(0)
    return randomise_bn(build_model(spec)).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def count(model: nn.Module, kind: type) -> int:
    return sum(type(m) is kind for m in model.modules())


@pytest.mark.parametrize("spec", ["torchvision:resnet18+linear:16", "torchvision:mobilenet_v2+identity",
                                  "embcam:small-resnet+linear:8"])
def test_every_batchnorm_folds_and_outputs_are_unchanged(spec):
    model = model_with_bn_stats(spec)
    folded = copy.deepcopy(model)
    n = fold_batchnorm(folded)
    assert n == count(model, nn.BatchNorm2d) > 0
    assert count(folded, nn.BatchNorm2d) == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel(folded(x), model(x)) < 1e-12


@pytest.mark.parametrize("strategy", ["autograd", "embedding-map"])
@pytest.mark.parametrize("layer", [None, "backbone.layer3", "backbone.layer4.1.bn2"])
def test_prepared_model_gives_the_same_heatmaps(strategy, layer):
    model = model_with_bn_stats("torchvision:resnet18+linear:16")
    prepared = prepare_for_inference(model, layer)
    assert prepared.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 64, 64)
    ref = EmbeddingCAM(model, layer, "autograd")(x, "self")
    out = EmbeddingCAM(prepared, layer, strategy)(x, "self")
    assert rel(out.embeddings, ref.embeddings) < 1e-12
    assert rel(out.heatmaps, ref.heatmaps) < 1e-10
    assert count(model, nn.BatchNorm2d) == 20  # the user's model is left as it was


def test_a_conv_target_keeps_its_pre_batchnorm_output():
    model = model_with_bn_stats("torchvision:resnet18+linear:16")
    name = "backbone.layer4.1.conv2"
    prepared = prepare_for_inference(model, name, channels_last=False)
    assert type(prepared.get_submodule("backbone.layer4.1.bn2")) is nn.BatchNorm2d
    assert count(prepared, nn.BatchNorm2d) == 1
    x = torch.randn(2, 3, 64, 64)
    ref = EmbeddingCAM(model, name)(x, "self").heatmaps
    assert rel(EmbeddingCAM(prepared, name)(x, "self").heatmaps, ref) < 1e-10


class SharedConv(nn.Module):
    """conv -> bn, but the conv's output also feeds a second branch: folding would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.conv2, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), \
            nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.conv(x)
        return self.bn(a) + a + self.bn2(self.conv2(a))


class Dynamic(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) if x.sum() > 0 else x


def test_only_safe_pairs_fold():
    model = SharedConv().eval()
    model.bn.running_var.fill_(2.0)
    model.bn2.running_var.fill_(3.0)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        assert fold_batchnorm(model) == 1  # conv2 -> bn2 only
        assert type(model.bn) is nn.BatchNorm2d and type(model.bn2) is nn.Identity
        assert rel(model(x), ref) < 1e-12


def test_untraceable_model_is_left_as_it_is():
    model = Dynamic().eval()
    assert fold_batchnorm(model) == 0
    assert type(model.bn) is nn.BatchNorm2d


def test_training_mode_is_refused():
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm(build_model("embcam:small-resnet").train())


def test_compiled_backbone_pads_ragged_batches_and_matches():
    torch.manual_seed(1)
    model = build_model("embcam:small-resnet+linear:8").float().eval()
    compiled = prepare_for_inference(model, compile_batch_size=4)
    x = torch.randn(9, 3, 32, 32, dtype=torch.float32)
    ref = EmbeddingCAM(model, strategy="autograd")(x, "self")
    counters.clear()
    for rows in (slice(0, 4), slice(0, 3), slice(0, 9)):  # exact, padded, chunked + padded
        out = EmbeddingCAM(compiled, strategy="embedding-map")(x[rows], "self")
        assert rel(out.embeddings, ref.embeddings[rows]) < 1e-5
        assert rel(out.heatmaps, ref.heatmaps[rows]) < 1e-5
    assert counters["stats"]["unique_graphs"] == 1  # compiled once, never recompiled


def test_compile_refuses_what_it_cannot_compile():
    model = build_model("embcam:small-resnet+linear:8").eval()
    with pytest.raises(ValueError, match="backbone output"):
        prepare_for_inference(model, "backbone.layer3", compile_batch_size=4)
    with pytest.raises(ValueError, match="EmbeddingNet"):
        prepare_for_inference(model.backbone, compile_batch_size=4)
    with pytest.raises(ValueError, match=">= 1"):
        prepare_for_inference(model, compile_batch_size=0)


def test_torchscript_models_are_prepared_without_folding(tmp_path):
    from embcam.models import export_torchscript, load_model

    model = model_with_bn_stats("embcam:small-resnet+linear:8").float()
    export_torchscript(model, tmp_path / "m.ts")
    scripted, _, _ = load_model(f"torchscript:{tmp_path / 'm.ts'}")
    prepared = prepare_for_inference(scripted)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float32)
    ref = EmbeddingCAM(model, strategy="autograd")(x, "self").heatmaps
    assert rel(EmbeddingCAM(prepared, strategy="embedding-map")(x, "self").heatmaps, ref) < 1e-5
