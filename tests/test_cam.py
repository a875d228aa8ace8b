"""EmbeddingCAM equals independent references (float64 throughout)."""
import numpy as np
import pytest
import torch
from torch import nn

from embcam import EmbeddingCAM, heatmaps_from_maps, normalise, onehot
from embcam.models import EmbeddingNet, GeM, GlobalAvgPool, build_model

from conftest import randomise_bn

RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("float64")  # float64 models and tensors in this module


def close(a, b, rtol=RTOL):
    """Relative error against the reference's scale."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = b.abs().max().clamp_min(1e-30)
    return bool(((a - b).abs().max() / scale) <= rtol)


def features():
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU())


def heads():
    """Models with different heads after the target (the backbone output)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 6))
    return {
        "gap-linear": EmbeddingNet(features(), GlobalAvgPool(), nn.Linear(12, 6)),
        "gap-mlp-bn": randomise_bn(EmbeddingNet(features(), GlobalAvgPool(), mlp)),
        "gem-linear": EmbeddingNet(features(), GeM(3.0), nn.Linear(12, 6)),
    }


def reference_gradcam(model, x, proxies):
    """Hand-written Grad-CAM with L = y.p: split the net by hand, differentiate the head
    with torch.func.vjp (no hooks), average the gradient, weight, ReLU."""
    with torch.no_grad():
        a = model.backbone(x)
    y, vjp = torch.func.vjp(lambda t: model.head(model.pool(t)), a)
    (grad,) = vjp(proxies)
    alpha = grad.mean((-2, -1))
    return y, torch.relu((alpha[:, :, None, None] * a).sum(1))


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 40)


@pytest.mark.parametrize("name", ["gap-linear", "gap-mlp-bn", "gem-linear"])
def test_autograd_equals_hand_written_gradcam(name, images):
    model = heads()[name].eval()
    p = torch.randn(4, 6)
    y_ref, h_ref = reference_gradcam(model, images, p)
    out = EmbeddingCAM(model)(images, p)
    assert out.heatmaps.shape == (4, 8, 10)
    assert close(out.embeddings, y_ref) and close(out.heatmaps, h_ref)
    assert h_ref.max() > 0


@pytest.mark.parametrize("name", ["gap-linear", "gap-mlp-bn", "gem-linear"])
def test_embedding_map_equals_autograd_with_several_proxies(name, images):
    model = heads()[name].eval()
    p = torch.randn(4, 5, 6)
    ref = EmbeddingCAM(model)(images, p)
    fast = EmbeddingCAM(model, strategy="embedding-map", chunk_elements=500)(images, p)  # forces chunking
    assert fast.heatmaps.shape == (4, 5, 8, 10)
    assert close(fast.heatmaps, ref.heatmaps) and close(fast.embeddings, ref.embeddings)
    # heatmaps for proxies known only later come from the kept maps alone
    later = torch.randn(4, 6)
    assert close(heatmaps_from_maps(fast.maps, later), EmbeddingCAM(model)(images, later).heatmaps)


def test_embedding_map_on_resnet_named_layer_and_closed_form():
    torch.manual_seed(2)
    model = randomise_bn(build_model("torchvision:resnet18+linear:16")).eval()
    x = torch.randn(2, 3, 64, 64)
    p = torch.randn(2, 3, 16)
    ref = EmbeddingCAM(model, target_layer="backbone.layer4")(x, p).heatmaps
    for target in (None, "backbone.layer4"):  # closed form (split) and batched VJPs (hook)
        out = EmbeddingCAM(model, target_layer=target, strategy="embedding-map")(x, p)
        assert close(out.heatmaps, ref)
    assert ref.shape == (2, 3, 2, 2) and ref.max() > 0


def test_closed_form_alpha_is_w_transpose_p_over_z(images):
    """Paper eq. 17: for GAP + linear, alpha = W^T p / Z."""
    model = heads()["gap-linear"].eval()
    p = torch.randn(4, 6)
    out = EmbeddingCAM(model)(images, p)
    z = 8 * 10
    assert close(out.weights, p @ model.head.weight / z)


def test_onehot_on_classifier_equals_gradcam_and_captum():
    from captum.attr import LayerGradCam
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    import torchvision

    torch.manual_seed(3)
    clf = randomise_bn(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        classes = clf(x).argmax(1).tolist()  # the predicted class, as Grad-CAM does by default
    ours = EmbeddingCAM(clf, target_layer="layer4")(x, onehot(classes, 10, torch.float64)).heatmaps

    with GradCAM(model=clf, target_layers=[clf.layer4]) as gc:
        scaled = gc(x, [ClassifierOutputTarget(c) for c in classes])
        acts = gc.activations_and_grads.activations[0].numpy()
        grads = gc.activations_and_grads.gradients[0].numpy()
        raw = np.maximum(gc.get_cam_image(x, clf.layer4, None, acts, grads), 0)
    assert close(ours, raw)
    assert scaled.shape == (3, 96, 96)

    captum = LayerGradCam(clf, clf.layer4).attribute(x, target=classes, relu_attributions=True)
    assert close(ours, captum[:, 0])
    assert ours.amax((1, 2)).min() > 0


def test_heatmap_same_alone_and_in_batch(images):
    model = heads()["gap-mlp-bn"].eval()
    for strategy in ("autograd", "embedding-map"):
        cam = EmbeddingCAM(model, strategy=strategy)
        batch = cam(images).heatmaps
        for i in range(len(images)):
            assert close(cam(images[i:i + 1]).heatmaps[0], batch[i], 1e-10)


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


def test_no_hooks_or_parameter_grads_remain_even_after_errors(images):
    model = heads()["gap-mlp-bn"]
    for target in (None, "backbone.2"):
        for strategy in ("autograd", "embedding-map"):
            cam = EmbeddingCAM(model, target_layer=target, strategy=strategy)
            cam(images, torch.randn(4, 2, 6))
            assert _no_hooks(model)
            assert all(q.grad is None and q.requires_grad for q in model.parameters())
            with pytest.raises(ValueError, match="proxy dimension"):
                cam(images, torch.randn(4, 7))  # fails inside the call, after the forward
            assert _no_hooks(model)
            assert all(q.grad is None and q.requires_grad for q in model.parameters())


def test_error_inside_forward_removes_hook():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Boom())
    cam = EmbeddingCAM(model, target_layer="0")
    with pytest.raises(RuntimeError, match="boom"):
        cam(torch.randn(1, 3, 8, 8))
    assert _no_hooks(model) and all(q.requires_grad for q in model.parameters())


def test_self_proxy_gives_non_empty_map_and_equals_explicit(images):
    """The cosine trap: L = y . y_hat (unnormalised y) has a gradient; cos(y, y_hat) has none."""
    model = heads()["gap-mlp-bn"].eval()
    out = EmbeddingCAM(model)(images, "self")
    assert (out.heatmaps.flatten(1).amax(1) > 0).all()
    explicit = EmbeddingCAM(model)(images, normalise(out.embeddings))
    assert close(out.heatmaps, explicit.heatmaps, 1e-12)
    # the cosine would have zero gradient: check the trap really exists
    a = model.backbone(images).detach().requires_grad_(True)
    y = model.forward_head(a)
    cos = (normalise(y) * normalise(y).detach()).sum()
    (g,) = torch.autograd.grad(cos, a)
    assert g.abs().max() < 1e-12


def test_top_k_channels_keeps_k_largest_weights(images):
    model = heads()["gap-linear"].eval()
    p = torch.randn(4, 6)
    full = EmbeddingCAM(model)(images, p)
    top = EmbeddingCAM(model, top_k_channels=3)(images, p)
    assert ((top.weights != 0).sum(-1) == 3).all()
    a = model.backbone(images).detach()
    for i in range(4):
        keep = full.weights[i].argsort(descending=True)[:3]
        ref = torch.relu((full.weights[i, keep, None, None] * a[i, keep]).sum(0))
        assert close(top.heatmaps[i], ref, 1e-12)
    with pytest.raises(ValueError, match="autograd"):
        EmbeddingCAM(model, strategy="embedding-map", top_k_channels=3)


def test_bad_inputs_give_clear_errors(images):
    model = heads()["gap-linear"]
    with pytest.raises(ValueError, match="candidates: .*backbone"):
        EmbeddingCAM(model, target_layer="layer9")
    with pytest.raises(ValueError, match="strategy"):
        EmbeddingCAM(model, strategy="fast")
    with pytest.raises(ValueError, match=r"\(B, d\)"):
        EmbeddingCAM(model)(images, torch.randn(3, 6))
    shared = EmbeddingCAM(model)(images, torch.ones(6)).heatmaps  # one (d,) proxy for all
    assert close(shared, EmbeddingCAM(model)(images, torch.ones(4, 6)).heatmaps, 1e-12)


def test_bf16_autocast_forward_keeps_cam_arithmetic_in_float32(images):
    model = heads()["gap-mlp-bn"].float().eval()
    x = images.float()
    ref = EmbeddingCAM(model)(x).heatmaps
    for strategy in ("autograd", "embedding-map"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = EmbeddingCAM(model, strategy=strategy)(x)
        assert out.heatmaps.dtype == torch.float32
        assert close(out.heatmaps, ref, 0.05)  # bf16 forward: a few per cent, not garbage
