"""embcam.tail.analyse_tail: which models factor through the target's global average
pool (and whether what follows is affine), which do not, and that the extracted tail g
computes what the model computes after the pool (float64, random weights)."""
import logging

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from embcam.models import EmbeddingNet, GeM, GlobalAvgPool
from embcam.tail import analyse_tail

from conftest import randomise_bn

pytestmark = pytest.mark.usefixtures("float64")


def block():
    return nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.ReLU())


class Net(nn.Module):
    """target (a conv block) -> ``tail(self, activation, input)``."""

    def __init__(self, tail, head=None):
        super().__init__()
        self.target = block()
        self.head = head if head is not None else nn.Linear(6, 4)
        self.tail = tail

    def forward(self, x):
        return self.tail(self, self.target(x), x)


def view_flat(v):
    return v.view(v.size(0), -1)


def kind(tail):
    return None if tail is None else ("affine" if tail.affine else "pooled")


ACCEPTED = {
    "mean over (-2, -1)": (lambda s, a, x: s.head(a.mean((-2, -1))), "affine"),
    "torch.mean dims (3, 2)": (lambda s, a, x: s.head(torch.mean(a, dim=(3, 2))), "affine"),
    "mean keepdim + flatten": (lambda s, a, x: s.head(a.mean([2, 3], keepdim=True).flatten(1)), "affine"),
    "F.adaptive_avg_pool2d + view": (lambda s, a, x: s.head(view_flat(F.adaptive_avg_pool2d(a, 1))), "affine"),
    "eval-mode functional dropout": (
        lambda s, a, x: s.head(F.dropout(a.mean((2, 3)), 0.5, s.training)), "affine"),
    "ReLU after the pool": (lambda s, a, x: s.head(torch.relu(a.mean((2, 3)))), "pooled"),
    "normalised": (lambda s, a, x: F.normalize(s.head(a.mean((2, 3))), dim=1), "pooled"),
    "constant added": (lambda s, a, x: s.head(a.mean((2, 3))) + torch.ones(4), "pooled"),
}

REJECTED = {
    "GeM": lambda s, a, x: s.head(a.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)),
    "skip connection around the target": lambda s, a, x: s.head(a.mean((2, 3))) + x.mean((1, 2, 3))[:, None],
    "residual into the pool": lambda s, a, x: s.head((a + F.avg_pool2d(x.mean(1, keepdim=True), 2)).mean((2, 3))),
    "target read twice": lambda s, a, x: s.head(a.mean((2, 3))) + s.head(a.amax((2, 3))),
    "mean over channels and rows": lambda s, a, x: a.mean((1, 2)),
    "max pool": lambda s, a, x: s.head(F.adaptive_max_pool2d(a, 1).flatten(1)),
    "pool to 2x2": lambda s, a, x: s.head(F.adaptive_avg_pool2d(a, 2).mean((2, 3))),
    "mean of one dim": lambda s, a, x: s.head(a.mean(3).mean(2)),
    "tuple output": lambda s, a, x: (s.head(a.mean((2, 3))), a),
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_tails_and_the_head_they_extract(name):
    tail_fn, expected = ACCEPTED[name]
    torch.manual_seed(0)
    model = Net(tail_fn).eval()
    tail = analyse_tail(model, "target", "nchw")
    assert kind(tail) == expected
    # g(mean_ij A) is what the model computes after the target
    x = torch.randn(3, 3, 8, 10)
    a = model.target(x)
    assert torch.allclose(tail.head(a.mean((2, 3))), model(x), rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", REJECTED)
def test_rejected_tails(name):
    model = Net(REJECTED[name]).eval()
    assert analyse_tail(model, "target", "nchw") is None


def test_affine_heads():
    torch.manual_seed(1)
    bn = randomise_bn(nn.BatchNorm1d(6))
    cases = {
        "linear": (nn.Linear(6, 4), "affine"),
        "bn1d (running stats), dropout, linear": (nn.Sequential(bn, nn.Dropout(0.3), nn.Linear(6, 4)), "affine"),
        "identity": (nn.Identity(), "affine"),
        "bn1d without running stats": (nn.BatchNorm1d(6, track_running_stats=False), "pooled"),
        "layer norm": (nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 4)), "pooled"),
        "mlp": (nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)), "pooled"),
    }
    for name, (head, expected) in cases.items():
        model = Net(lambda s, a, x: s.head(a.mean((2, 3))), head).eval()
        assert kind(analyse_tail(model, "target", "nchw")) == expected, name


def test_target_that_runs_twice_or_never_is_rejected():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.target, self.head = nn.Conv2d(3, 3, 1), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.target(self.target(x)).mean((2, 3)))

    assert analyse_tail(Twice().eval(), "target", "nchw") is None
    assert analyse_tail(Net(ACCEPTED["mean over (-2, -1)"][0]).eval(), "head", "nchw") is None  # not a pool's input


def test_training_mode_is_analysed_as_eval_and_flags_are_restored():
    """Dropout and BatchNorm1d in training mode would not be affine; EmbeddingCAM runs
    the model in eval mode, so the analysis answers for eval mode and leaves the
    module flags exactly as they were (mixed ones included)."""
    head = nn.Sequential(randomise_bn(nn.BatchNorm1d(6)), nn.Dropout(0.5), nn.Linear(6, 4))
    model = Net(ACCEPTED["eval-mode functional dropout"][0], head).train()
    model.head[0].eval()  # mixed flags
    flags = {name: m.training for name, m in model.named_modules()}
    tail = analyse_tail(model, "target", "nchw")
    assert kind(tail) == "affine"
    assert {name: m.training for name, m in model.named_modules()} == flags
    model.eval()
    v = torch.randn(3, 6)
    assert torch.allclose(tail.head(v), model.head(v), rtol=0, atol=1e-13)  # functional dropout recorded as eval


def test_untraceable_model_falls_back_with_a_debug_log(caplog):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.target, self.head = block(), nn.Linear(6, 4)

        def forward(self, x):
            a = self.target(x)
            if a.sum() > 0:  # data-dependent control flow: fx cannot trace it
                a = a * 2
            return self.head(a.mean((2, 3)))

    with caplog.at_level(logging.DEBUG, logger="embcam.tail"):
        assert analyse_tail(Branchy().eval(), "target", "nchw") is None
    assert "cannot trace" in caplog.text


def test_split_mode_analyses_forward_head():
    torch.manual_seed(2)
    features = block()
    linear = EmbeddingNet(features, GlobalAvgPool(), nn.Linear(6, 4)).eval()
    normed = EmbeddingNet(features, nn.Sequential(GlobalAvgPool(), nn.LayerNorm(6)), nn.Linear(6, 4)).eval()
    gem = EmbeddingNet(features, GeM(3.0), nn.Linear(6, 4)).eval()
    assert kind(analyse_tail(linear, None)) == "affine"
    assert kind(analyse_tail(normed, None)) == "pooled"
    assert analyse_tail(gem, None) is None
    x = torch.randn(2, 3, 8, 8)
    a = normed.forward_features(x)
    assert torch.allclose(analyse_tail(normed, None).head(a.mean((2, 3))), normed(x), rtol=0, atol=1e-13)
    scripted = torch.jit.script(EmbeddingNet(block(), GlobalAvgPool(), nn.Linear(6, 4)))
    assert analyse_tail(scripted, None) is None  # TorchScript keeps EmbeddingCAM's own rule


def test_nhwc_layouts():
    torch.manual_seed(3)

    class Swinish(nn.Module):
        def __init__(self, pool):
            super().__init__()
            self.target, self.head, self.pool = nn.LayerNorm(6), nn.Linear(6, 4), pool

        def forward(self, x):  # x: (B, H, W, 6)
            return self.head(self.pool(self.target(x)))

    pools = {
        "permute + adaptive pool": lambda a: F.adaptive_avg_pool2d(a.permute(0, 3, 1, 2), (1, 1)).flatten(1),
        "torch.permute + mean": lambda a: torch.permute(a, [0, 3, 1, 2]).mean((2, 3)),
        "mean over (1, 2)": lambda a: a.mean((1, 2)),
        "mean over (1, 2) keepdim": lambda a: a.mean((1, 2), keepdim=True).flatten(1),
    }
    x = torch.randn(2, 5, 7, 6)
    for name, pool in pools.items():
        model = Swinish(pool).eval()
        tail = analyse_tail(model, "target", "nhwc")
        assert kind(tail) == "affine", name
        assert torch.allclose(tail.head(model.target(x).mean((1, 2))), model(x), rtol=0, atol=1e-13), name
        assert analyse_tail(model, "target", "nchw") is None, name  # (1, 2) are not NCHW's spatial dims
    with pytest.raises(ValueError, match="layout"):
        analyse_tail(Swinish(pools["mean over (1, 2)"]), "target", "tokens")


def test_torchvision_models():
    """torchvision's classifiers (built on the meta device: the analysis reads only the
    structure, and a trace never runs the model)."""
    cases = [
        (torchvision.models.resnet18, "layer4", "nchw", "affine"),
        (torchvision.models.mobilenet_v2, "features", "nchw", "affine"),  # F.adaptive_avg_pool2d, Dropout
        (torchvision.models.efficientnet_b0, "features", "nchw", "affine"),
        (torchvision.models.convnext_tiny, "features", "nchw", "pooled"),  # LayerNorm2d after the pool
        (torchvision.models.swin_t, "norm", "nhwc", "affine"),
        (torchvision.models.swin_t, "features.7.1.norm1", "nhwc", None),  # inside the last block
        (torchvision.models.resnet18, "layer4.0", "nchw", None),  # layer4.1 follows: not a pool
        (torchvision.models.vit_b_16, "encoder.layers.encoder_layer_11.ln_1", "nchw", None),
    ]
    for factory, target, layout, expected in cases:
        with torch.device("meta"):
            model = factory(weights=None).eval()
        assert kind(analyse_tail(model, target, layout)) == expected, (factory.__name__, target)
