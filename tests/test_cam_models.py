"""EmbeddingCAM on plain torchvision models and vision transformers equals an independent
hand-written Grad-CAM (float64, random weights), on each of its paths."""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import EncoderBlock

from embcam import EmbeddingCAM

from conftest import randomise_bn

pytestmark = pytest.mark.usefixtures("float64")
STRATEGIES = ("autograd", "embedding-map")


def reference(model, layer, x, proxies, to_map=lambda t: t):
    """Grad-CAM with L = y . p, by hand: a forward hook replaces the layer's output by a
    leaf, y = model(x), one torch.autograd.grad per proxy column, the gradient and the
    activation reshaped by ``to_map``, alpha = their spatial mean, ReLU(sum_k alpha_k A_k).
    ``proxies``: (B, P, d), or "self" (y / |y|)."""
    leaves = []

    def hook(module, inputs, output):
        leaves.append(output.detach().requires_grad_(True))
        return leaves[-1]

    handle = layer.register_forward_hook(hook)
    try:
        y = model(x)
    finally:
        handle.remove()
    (a,) = leaves
    p = (y / y.norm(dim=1, keepdim=True)).detach()[:, None] if isinstance(proxies, str) else proxies
    heats = []
    for j in range(p.shape[1]):
        (grad,) = torch.autograd.grad((y * p[:, j]).sum(), a, retain_graph=True)
        alpha = to_map(grad).mean((2, 3))
        heats.append(torch.relu((alpha[:, :, None, None] * to_map(a)).sum(1)))
    heat = torch.stack(heats, 1)
    return y.detach(), heat[:, 0] if isinstance(proxies, str) else heat


def check(model, target, x, to_map=lambda t: t, path=None, reshape=None, rtol=1e-9):
    """Both strategies against the reference, for the self proxy and three random proxies
    per image; returns the embedding-map CAM (its ``path`` checked when given)."""
    layer = model.get_submodule(target)
    y_ref, self_ref = reference(model, layer, x, "self", to_map)
    proxies = torch.randn(len(x), 3, y_ref.shape[1])
    refs = [("self", self_ref), (proxies, reference(model, layer, x, proxies, to_map)[1])]
    for _, h_ref in refs:
        peaks = h_ref.amax((-2, -1))
        assert (peaks > 0).sum() >= peaks.numel() / 2  # not a vacuous comparison of zero maps
    for strategy in STRATEGIES:
        cam = EmbeddingCAM(model, target, strategy=strategy, reshape=reshape)
        for p, h_ref in refs:
            out = cam(x, p)
            assert out.heatmaps.shape == h_ref.shape, strategy
            assert close(out.heatmaps, h_ref, rtol) and close(out.embeddings, y_ref, rtol), (strategy, cam.path)
    assert path is None or cam.path == path
    return cam, self_ref


def close(a, b, rtol):
    return bool((a - b).abs().max() <= rtol * b.abs().max())


def test_user_resnet50_with_a_linear_fc_takes_the_closed_form():
    """The model of BENCHMARKS §3's user-model row: torchvision's ResNet-50, fc replaced
    by a 128-d Linear, explained at layer4: no backward pass at all."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Linear(2048, 128)
    model = randomise_bn(model).eval()
    x = torch.randn(2, 3, 64, 64)
    cam, self_ref = check(model, "layer4", x, path="closed-form")
    with torch.inference_mode():  # any backward would fail in here
        fast = cam(x, "self")
    assert close(fast.heatmaps, self_ref, 1e-9)


def test_convnext_takes_the_pooled_jacobian():
    """ConvNeXt: global average pool -> LayerNorm2d -> Linear, so M = J_g(v)^T / Z.
    torchvision's ConvNeXt class (convnext_tiny's code and head), two narrow stages: fast
    in float64 (test_tail checks convnext_tiny itself takes this path)."""
    torch.manual_seed(1)
    model = ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=16)
    check(model.eval(), "features", torch.randn(2, 3, 64, 64), path="pooled-jacobian")


def vit():
    """torchvision's ViT-B/16 layout (12 blocks, 16-px patches, a class token) at 32 px,
    narrowed to width 32: the same modules and names, a fraction of the arithmetic."""
    torch.manual_seed(2)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=12, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64)
    model.heads = nn.Linear(32, 16)
    return model.eval()


def vit_tokens_to_map(t):
    """A ViT with 16-px patches at 32 px: a class token, then a 2 x 2 grid of patch tokens."""
    return t[:, 1:].reshape(t.shape[0], 2, 2, t.shape[2]).permute(0, 3, 1, 2)


def test_vit_tokens():
    model = vit()
    x = torch.randn(2, 3, 32, 32)
    target = "encoder.layers.encoder_layer_11.ln_1"
    cam, _ = check(model, target, x, vit_tokens_to_map, path="vjp", reshape="tokens")
    assert cam.embedding_maps(x)[1].shape == (2, 16, 2, 2)
    # the model's own default (what the model registry sets), and a pytorch-grad-cam style callable
    model.embcam_reshape = "tokens"
    ref = EmbeddingCAM(model, target)(x).heatmaps
    for reshape in (None, vit_tokens_to_map):
        for strategy in STRATEGIES:
            assert close(EmbeddingCAM(model, target, strategy, reshape=reshape)(x).heatmaps, ref, 1e-9)
    # after the last block only the class token reaches the head: every patch gradient is zero
    last = EmbeddingCAM(model, "encoder.layers.encoder_layer_11", "embedding-map")(x)
    assert last.heatmaps.abs().max() == 0 and last.maps.abs().max() == 0


class TinyViT(nn.Module):
    """8-px patches, a class token and 4 register tokens in front, one encoder block."""

    def __init__(self, dim: int = 12, registers: int = 4, d: int = 6):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.prefix = nn.Parameter(torch.randn(1, 1 + registers, dim))
        self.block = EncoderBlock(2, dim, 24, 0.0, 0.0)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, d)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.prefix.expand(len(x), -1, -1), tokens], 1)
        return self.head(self.norm(self.block(tokens))[:, 0])


def test_tokens_of_a_non_square_input_with_register_tokens():
    torch.manual_seed(3)
    model = TinyViT().eval()
    x = torch.randn(3, 3, 32, 48)  # 4 x 6 patches after 5 leading tokens

    def to_map(t):
        return t[:, 5:].reshape(t.shape[0], 4, 6, t.shape[2]).permute(0, 3, 1, 2)

    cam, _ = check(model, "block.ln_1", x, to_map, path="vjp", reshape="tokens")
    assert cam(x).heatmaps.shape == (3, 4, 6)


def swin():
    """torchvision's SwinTransformer class (swin_t's code and head: norm -> Permute ->
    AdaptiveAvgPool2d -> Flatten -> head) with narrow stages of 1, 1, 1, 2 blocks and
    4 x 4 windows: fast in float64 (test_tail checks swin_t itself)."""
    torch.manual_seed(4)
    return SwinTransformer([4, 4], 16, [1, 1, 1, 2], [1, 1, 2, 2], [4, 4], num_classes=16).eval()


def nhwc_to_map(t):
    return t.permute(0, 3, 1, 2)


def test_swin_final_norm_takes_the_closed_form():
    """swin_t: norm -> Permute -> AdaptiveAvgPool2d -> Flatten -> head: affine after the pool."""
    check(swin(), "norm", torch.randn(2, 3, 64, 64), nhwc_to_map, path="closed-form", reshape="nhwc")


def test_swin_last_stage_takes_vjps():
    check(swin(), "features.7.1.norm1", torch.randn(2, 3, 64, 64), nhwc_to_map, path="vjp", reshape="nhwc")
