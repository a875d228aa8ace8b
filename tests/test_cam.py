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
        "gap-layernorm-linear": EmbeddingNet(features(), nn.Sequential(GlobalAvgPool(), nn.LayerNorm(12)),
                                             nn.Linear(12, 6)),
    }


# the embedding-map path each model takes at its default target (the split)
PATHS = {"gap-linear": "closed-form", "gap-mlp-bn": "pooled-jacobian", "gem-linear": "vjp",
         "gap-layernorm-linear": "pooled-jacobian"}


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


@pytest.mark.parametrize("name", PATHS)
def test_autograd_equals_hand_written_gradcam(name, images):
    model = heads()[name].eval()
    p = torch.randn(4, 6)
    y_ref, h_ref = reference_gradcam(model, images, p)
    out = EmbeddingCAM(model)(images, p)
    assert out.heatmaps.shape == (4, 8, 10)
    assert close(out.embeddings, y_ref) and close(out.heatmaps, h_ref)
    assert h_ref.max() > 0


@pytest.mark.parametrize("name", PATHS)
def test_embedding_map_equals_autograd_with_several_proxies(name, images):
    model = heads()[name].eval()
    p = torch.randn(4, 5, 6)
    ref = EmbeddingCAM(model)(images, p)
    cam = EmbeddingCAM(model, strategy="embedding-map", chunk_elements=100)  # forces chunking of the VJPs
    assert cam.path == PATHS[name]
    fast = cam(images, p)
    assert fast.heatmaps.shape == (4, 5, 8, 10)
    assert close(fast.heatmaps, ref.heatmaps) and close(fast.embeddings, ref.embeddings)
    # heatmaps for proxies known only later come from the kept maps alone
    later = torch.randn(4, 6)
    assert close(heatmaps_from_maps(fast.maps, later), EmbeddingCAM(model)(images, later).heatmaps)


def test_embedding_map_on_resnet_named_layers():
    torch.manual_seed(2)
    model = randomise_bn(build_model("torchvision:resnet18+linear:16")).eval()
    x = torch.randn(2, 3, 64, 64)
    p = torch.randn(2, 3, 16)
    ref = EmbeddingCAM(model, target_layer="backbone.layer4")(x, p).heatmaps
    # the split and the named layer (hooked) both feed the pool and the linear head
    for target in (None, "backbone.layer4"):
        cam = EmbeddingCAM(model, target_layer=target, strategy="embedding-map")
        assert cam.path == "closed-form"
        assert close(cam(x, p).heatmaps, ref)
    assert ref.shape == (2, 3, 2, 2) and ref.max() > 0
    # inside the last stage: batched VJPs, through BasicBlock's in-place residual add
    for target in ("backbone.layer4.0", "backbone.layer4.1.bn2"):
        cam = EmbeddingCAM(model, target_layer=target, strategy="embedding-map", chunk_elements=200)
        assert cam.path == "vjp"
        assert close(cam(x, p).heatmaps, EmbeddingCAM(model, target_layer=target)(x, p).heatmaps)


def test_closed_form_alpha_is_w_transpose_p_over_z(images):
    """Paper eq. 17: for GAP + linear, alpha = W^T p / Z."""
    model = heads()["gap-linear"].eval()
    p = torch.randn(4, 6)
    out = EmbeddingCAM(model)(images, p)
    z = 8 * 10
    assert close(out.weights, p @ model.head.weight / z)


def test_onehot_on_classifier_equals_gradcam_and_captum():
    import torchvision
    from captum.attr import LayerGradCam
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

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


def test_target_that_runs_twice_is_refused(images):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 3, 3, padding=1), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.conv(self.conv(x)).mean((2, 3)))

    for strategy in ("autograd", "embedding-map"):
        cam = EmbeddingCAM(Twice(), "conv", strategy)
        assert cam.path in ("autograd", "vjp")
        twice = "ran (2 times|more than once) in one forward; pick a layer that runs once"
        with pytest.raises(ValueError, match=twice):
            cam(images)


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
    x = images.float()
    for name, target in (("gap-mlp-bn", None), ("gap-mlp-bn", "backbone.3"), ("gap-linear", "backbone.3"),
                         ("gem-linear", "backbone.3")):
        model = heads()[name].float().eval()
        ref = EmbeddingCAM(model, target)(x).heatmaps
        for strategy in ("autograd", "embedding-map"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = EmbeddingCAM(model, target, strategy=strategy)(x)
            assert out.heatmaps.dtype == torch.float32
            assert close(out.heatmaps, ref, 0.05), (name, target)  # bf16 forward: a few per cent, not garbage


def test_closed_form_reads_the_weights_again_after_they_change(images):
    """W^T is cached, and read again after an in-place change (an optimiser step,
    load_state_dict); the closed form runs no backward, so it works under inference_mode."""
    model = heads()["gap-linear"].eval()
    for target in (None, "backbone.3"):
        cam = EmbeddingCAM(model, target, strategy="embedding-map")
        assert cam.path == "closed-form"
        p = torch.randn(4, 6)
        before = cam(images, p).heatmaps
        with torch.no_grad():
            model.head.weight.mul_(-2.0)
        with torch.inference_mode():
            after = cam(images, p).heatmaps
        assert close(after, EmbeddingCAM(model, target)(images, p).heatmaps)
        assert not close(after, before, 0.5)


def test_token_grid_hand_computed():
    from embcam.cam import token_grid

    assert token_grid(197, 224, 224) == (1, 14, 14)   # ViT-B/16: a class token
    assert token_grid(196, 224, 224) == (0, 14, 14)   # no class token (global-pool ViTs)
    assert token_grid(201, 224, 224) == (5, 14, 14)   # class + 4 register tokens
    assert token_grid(29, 32, 48) == (5, 4, 6)        # non-square: 4 x 6 patches after 5 tokens
    assert token_grid(5, 32, 32) == (1, 2, 2)         # the fewest leading tokens: not (4, 1, 1)
    assert token_grid(50, 224, 112) == (0, 10, 5)
    with pytest.raises(ValueError, match="do not form a grid"):
        token_grid(2, 16, 48)   # 1:3 needs 3 t^2 tokens after the prefix
    with pytest.raises(ValueError, match="do not form a grid"):
        token_grid(98, 224, 224)  # 81 = 9 x 9 after 17 leading tokens: more than 16 (no square in 82..98)


def test_reshapes_and_their_errors(images):
    class Tokens(nn.Module):
        """4-px patches as (B, N, C) tokens (no class token), a norm, a token-mean head."""

        def __init__(self):
            super().__init__()
            self.embed, self.norm, self.head = nn.Conv2d(3, 6, 4, 4), nn.LayerNorm(6), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.norm(self.embed(x).flatten(2).transpose(1, 2)).mean(1))

    model = Tokens().eval()
    p = torch.randn(4, 3)
    ref = EmbeddingCAM(model, "embed")(images, p).heatmaps  # the same tokens as a (B, C, 8, 10) conv map
    for strategy in ("autograd", "embedding-map"):
        # the norm's output, seen as tokens: a grid by hand equals the conv layer's map
        by_hand = EmbeddingCAM(model, "norm", strategy, reshape=lambda t: t.transpose(1, 2).unflatten(2, (8, 10)))
        tokens = EmbeddingCAM(model, "norm", strategy, reshape="tokens")
        assert close(tokens(images, p).heatmaps, by_hand(images, p).heatmaps, 1e-12)
        assert tokens(images, p).heatmaps.shape == (4, 8, 10) and ref.shape == (4, 8, 10)
        with pytest.raises(ValueError, match="pass reshape='tokens'"):
            EmbeddingCAM(model, "norm", strategy)(images)
    with pytest.raises(ValueError, match=r"must be \(B, K, h, w\), got \(4, 3\)"):
        EmbeddingCAM(model, "head")(images)
    with pytest.raises(ValueError, match="unknown reshape 'nlc'"):
        EmbeddingCAM(model, "norm", reshape="nlc")
    with pytest.raises(ValueError, match=r"reshape must return a \(B, K, h, w\) tensor"):
        EmbeddingCAM(model, "embed", reshape=lambda t: t.flatten(2))(images)
    with pytest.raises(ValueError, match=r"reshape='tokens' needs \(B, N, C\) tokens"):
        EmbeddingCAM(model, "embed", reshape="tokens")(images)
    with pytest.raises(ValueError, match="72 tokens do not form a grid with the 32x38"):
        EmbeddingCAM(model, "norm", reshape="tokens")(images[..., :38])
    model.embcam_reshape = "tokens"  # the model's default, as the model registry sets it
    assert close(EmbeddingCAM(model, "norm")(images, p).heatmaps, by_hand(images, p).heatmaps, 1e-12)
