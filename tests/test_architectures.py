"""The model registry: torchvision and timm weight files as users have them, every
registered architecture's structure, spec errors, ``embcam models``.

References: torchvision's and timm's own models (classifier replaced by Identity),
evaluated in float64 with weights written by the test itself; torchvision's documented
eval sizes typed by hand."""
import re
import sys
import textwrap

import pytest
import torch
import torchvision
from torch import nn

from embcam import EmbeddingCAM, load_model
from embcam.architectures import (
    BUILTIN_SOURCES,
    MetaParameters,
    Preprocessing,
    _torchvision_architectures,
    architecture,
    build_on_meta,
    describe,
    format_table,
)
from embcam.cli import main
from embcam.models import (
    _from_source_names,
    build_model,
    default_target_layer,
    get_layer,
    load_checked,
    save_checkpoint,
)

from conftest import randomise_bn

TIGHT = {"rtol": 1e-10, "atol": 1e-12}


@pytest.fixture(autouse=True)
def one_thread():
    """Small inputs: one thread is as fast, and far faster than two on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise(net: nn.Module, seed: int) -> nn.Module:
    """Random weights, and norm layers away from their init (weight 1, bias 0, running
    statistics 0/1), so a weight that is not loaded shows in the output."""
    torch.manual_seed(seed)
    randomise_bn(net)
    for m in net.modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


# torchvision builder, input size, the torchvision module that is its final Linear
FILES = [
    ("resnet18", 64, "fc"),
    ("mobilenet_v2", 32, "classifier.1"),
    ("mobilenet_v3_small", 32, "classifier.3"),  # Linear + Hardswish before it stay in the embedding
    ("convnext_tiny", 32, "classifier.2"),  # LayerNorm2d before it stays in the embedding
    ("efficientnet_b0", 32, "classifier.1"),
    ("regnet_y_400mf", 32, "fc"),
    ("densenet121", 32, "classifier"),
    ("swin_t", 32, "head"),
    ("vit_b_16", 32, "heads.head"),
]


def torchvision_file(tmp_path, name: str, size: int, seed: int = 1):
    """(torchvision's model with random weights, the path of its state dict)."""
    torch.manual_seed(seed)
    kwargs = {"image_size": size} if name.startswith("vit") else {}
    net = randomise(getattr(torchvision.models, name)(weights=None, **kwargs), seed)
    path = tmp_path / f"{name}.pth"
    torch.save(net.state_dict(), path)
    return net, path


def without_classifier(net: nn.Module, classifier: str) -> nn.Module:
    parent, _, leaf = classifier.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, nn.Identity())
    return net


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("name,size,classifier", FILES)
def test_a_torchvision_weight_file_loads_by_spec(name, size, classifier, tmp_path):
    net, path = torchvision_file(tmp_path, name, size)
    reference = without_classifier(net, classifier)
    model, prep, spec, fit = load_checked(f"torchvision:{name}+identity", checkpoint=path, image_size=size)
    assert spec == f"torchvision:{name}+identity" and prep.size == size
    # +identity explains the features before torchvision's classifier: left out, and said so
    assert fit.dropped == [f"{classifier}.bias", f"{classifier}.weight"] and not fit.partial
    assert fit.loaded == len(reference.state_dict())  # everything else
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), **TIGHT)


@pytest.mark.usefixtures("float64")
def test_torchvision_keys_are_backbone_plus_torchvisions_and_resnets_keep_theirs(tmp_path):
    net, _ = torchvision_file(tmp_path, "mobilenet_v2", 32)
    model = build_model("torchvision:mobilenet_v2")
    assert set(model.state_dict()) == {f"backbone.{k}" for k in net.state_dict() if not k.startswith("classifier")}
    old_resnet_keys = {f"backbone.{k}" for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc")}
    assert set(build_model("torchvision:resnet18").state_dict()) == old_resnet_keys


@pytest.mark.usefixtures("float64")
def test_a_classifier_with_the_heads_shapes_becomes_the_head(tmp_path):
    torch.manual_seed(5)
    net = torchvision.models.resnet18(num_classes=8)
    net = randomise(net, 5)
    torch.save(net.state_dict(), tmp_path / "r8.pth")
    x = torch.randn(2, 3, 48, 48)
    model, _, _, fit = load_checked("torchvision:resnet18+linear:8", tmp_path / "r8.pth")
    assert fit.loaded == len(net.state_dict()) and not fit.partial and not fit.dropped
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), **TIGHT)  # the embedding is the fine-tuned fc's output
    with pytest.raises(ValueError, match=r"head.weight \(8, 512\) vs \(16, 512\).*use --model "
                                         r"torchvision:resnet18\+linear:8 for the checkpoint's head"):
        load_model("torchvision:resnet18+linear:16", tmp_path / "r8.pth")
    other, _, _, fit = load_checked("torchvision:resnet18+linear:16", tmp_path / "r8.pth", allow_partial=True)
    assert [m["name"] for m in fit.mismatched] == ["head.bias", "head.weight"] and fit.partial
    seeded, _, _ = load_model("torchvision:resnet18+linear:16")  # no file: the seeded init
    assert torch.equal(other.head.weight, seeded.head.weight) and torch.equal(other.head.bias, seeded.head.bias)
    assert torch.equal(other.backbone.conv1.weight, net.conv1.weight)


def test_embcam_names_still_load_strictly(tmp_path):
    """Swin's torchvision classifier is called head, like the embedding head: a plain
    state dict in embcam's names is not taken for torchvision's."""
    torch.manual_seed(6)
    model = randomise(build_model("torchvision:swin_t+linear:8"), 6)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    save_checkpoint(tmp_path / "ckpt.pt", model, "torchvision:swin_t+linear:8", Preprocessing(32))
    x = torch.randn(1, 3, 32, 32)
    for path in ("plain.pt", "ckpt.pt"):
        loaded, _, _ = load_model("torchvision:swin_t+linear:8", tmp_path / path)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match=r"shape mismatches \(checkpoint vs model\): head.bias \(8,\) vs \(4,\)"):
        load_model("torchvision:swin_t+linear:4", tmp_path / "ckpt.pt")  # an embcam checkpoint: in its names


def test_a_file_of_another_architecture_fails_with_the_mismatch(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError) as err:
        load_model("torchvision:resnet34", tmp_path / "r18.pth")
    # resnet34 has 8 BasicBlocks more than resnet18: 2 convs and 2 BatchNorms of 4 tensors each (their
    # step counters are not counted), so 80 tensors missing
    assert re.match(r"checkpoint .*r18.pth does not fit model torchvision:resnet34: 80 model tensor\(s\) not "
                    r"loaded, 120 loaded; missing from the checkpoint: backbone.layer1.2.bn1.bias, .* \(\+75 more\); "
                    r"the file is likely for another architecture", str(err.value)), str(err.value)


@pytest.mark.usefixtures("float64")
def test_densenet_files_with_torchvisions_old_key_names_load(tmp_path):
    """As torchvision publishes them: ``norm.1`` for ``norm1``, and (saved before
    PyTorch 0.4.1) no BatchNorm step counters."""
    net, _ = torchvision_file(tmp_path, "densenet121", 32, seed=7)
    legacy = {re.sub(r"(denselayer\d+\.(norm|relu|conv))([12])\.", r"\1.\3.", k): v
              for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    torch.save(legacy, tmp_path / "legacy.pth")
    model, _, _ = load_model("torchvision:densenet121", tmp_path / "legacy.pth")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), without_classifier(net, "classifier")(x), **TIGHT)


def test_a_vit_file_for_another_size_says_so(tmp_path):
    _, path = torchvision_file(tmp_path, "vit_b_32", 32)
    with pytest.raises(ValueError, match=r"encoder.pos_embedding \(1, 2, 768\) vs \(1, 5, 768\); the position "
                                         r"embeddings differ: the file is for another image size"):
        load_model("torchvision:vit_b_32", path, image_size=64)
    with pytest.raises(ValueError, match="vit_b_32 needs an image size divisible by its patch size 32, got 48"):
        load_model("torchvision:vit_b_32", image_size=48)


def test_vit_defaults_and_its_target_layer():
    model, prep, _ = load_model("torchvision:vit_b_32+linear:8", image_size=64)
    assert (model.embcam_target_layer, model.embcam_reshape) == ("encoder.layers.encoder_layer_11.ln_1", "tokens")
    assert default_target_layer(model) == "encoder.layers.encoder_layer_11.ln_1" and prep.size == 64
    tokens = []
    get_layer(model, model.embcam_target_layer).register_forward_hook(lambda m, i, o: tokens.append(o))
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 8)
    assert tokens[0].shape == (2, 1 + 2 * 2, 768)  # class token + a 2x2 patch grid
    assert {k for k in model.state_dict() if k.startswith("heads")} == {"heads.weight", "heads.bias"}


# -- every registered architecture --------------------------------------------------------------

# torchvision's documented eval (crop) sizes of its DEFAULT weights, typed from its docs
DOCUMENTED_SIZES = {
    "resnet50": 224, "efficientnet_b0": 224, "efficientnet_b1": 240, "efficientnet_b2": 288, "efficientnet_b3": 300,
    "efficientnet_b4": 380, "efficientnet_b5": 456, "efficientnet_b6": 528, "efficientnet_b7": 600,
    "efficientnet_v2_s": 384, "efficientnet_v2_m": 480, "efficientnet_v2_l": 480, "swin_v2_t": 256,
    "swin_v2_b": 256, "swin_t": 224, "convnext_large": 224, "vit_b_16": 224, "vit_h_14": 518, "regnet_y_128gf": 384,
    "regnet_y_16gf": 224, "densenet161": 224, "mobilenet_v3_large": 224,
}
ASKED_FOR = (
    "resnet18 resnet34 resnet50 resnet101 resnet152 wide_resnet50_2 wide_resnet101_2 resnext50_32x4d "
    "resnext101_32x8d resnext101_64x4d mobilenet_v2 mobilenet_v3_small mobilenet_v3_large "
    + " ".join(f"efficientnet_b{i}" for i in range(8)) + " efficientnet_v2_s efficientnet_v2_m efficientnet_v2_l "
    "convnext_tiny convnext_small convnext_base convnext_large densenet121 densenet161 densenet169 densenet201 "
    "vit_b_16 vit_b_32 vit_l_16 vit_l_32 vit_h_14 swin_t swin_s swin_b swin_v2_t swin_v2_s swin_v2_b").split()


def test_the_registry_holds_the_families_and_their_documented_sizes():
    archs = _torchvision_architectures()
    regnets = {n for n in torchvision.models.list_models(module=torchvision.models) if n.startswith("regnet_")}
    assert set(ASKED_FOR) | regnets <= set(archs) and len(regnets) == 15
    assert not {"vgg16", "alexnet", "googlenet", "inception_v3", "maxvit_t"} & set(archs)  # not built or tested
    assert {name: archs[name].preprocessing.size for name in DOCUMENTED_SIZES} == DOCUMENTED_SIZES
    assert {n for n, a in archs.items() if a.preprocessing.mean != (0.485, 0.456, 0.406)} == {"efficientnet_v2_l"}
    assert archs["efficientnet_v2_l"].preprocessing == Preprocessing(480, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.mark.parametrize("name", sorted(_torchvision_architectures()))
def test_every_torchvision_file_maps_onto_the_model(name):
    """Built on the meta device (structure only): torchvision's own state dict, renamed,
    is exactly the embcam model's, shapes included; the default target layer exists."""
    arch = architecture("torchvision", name)
    size = 4 * int(name.rsplit("_", 1)[1]) if name.startswith("vit") else 64  # 4 x the patch size
    with MetaParameters():
        theirs = torchvision.models.get_model_builder(name)(
            weights=None, **({"image_size": size} if name.startswith("vit") else {})).state_dict()
    model = build_on_meta(arch, "identity", size)
    ours = model.state_dict()
    renamed, dropped = _from_source_names(theirs, model, arch)
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert len(dropped) == 2 and len(renamed) == len(theirs) - 2  # the classifier's weight and bias
    if name.startswith("vit"):
        assert get_layer(model, model.embcam_target_layer) is model.encoder.layers[-1].ln_1
        assert model.embcam_reshape == "tokens"
    else:
        assert (model.embcam_target_layer, model.embcam_reshape) == (None, None)
        assert type(model).__name__ == "EmbeddingNet" and default_target_layer(model) is None


# -- timm -----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("name,size,target,reshape,classifier", [
    ("resnet18", 64, "layer4", None, "fc"),
    ("vit_tiny_patch16_224", 32, "blocks.11.norm1", "tokens", "head"),
])
def test_a_timm_weight_file_round_trips(name, size, target, reshape, classifier, tmp_path):
    import timm

    torch.manual_seed(8)
    kwargs = {"img_size": size} if name.startswith("vit") else {}
    net = randomise(timm.create_model(name, pretrained=False, **kwargs), 8)
    torch.save(net.state_dict(), tmp_path / "timm.pth")
    model, prep, _, fit = load_checked(f"timm:{name}", tmp_path / "timm.pth", image_size=size)
    assert fit.dropped == [f"{classifier}.bias", f"{classifier}.weight"] and not fit.partial
    assert (model.embcam_target_layer, model.embcam_reshape) == (target, reshape)
    assert (prep.mean, prep.std) == (net.pretrained_cfg["mean"], net.pretrained_cfg["std"]) and prep.size == size
    net.reset_classifier(0)  # timm's own model with num_classes=0
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), **TIGHT)


def test_timm_specs_build_with_their_defaults():
    model, prep, _ = load_model("timm:resnet18+linear:8", image_size=32)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 8) and prep.size == 32
    assert load_model("timm:resnet18")[1] == Preprocessing(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    vit, prep, _ = load_model("timm:vit_tiny_patch16_224+linear:8", image_size=32)
    assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 8) and vit.pos_embed.shape == (1, 5, 192)
    assert (prep.mean, prep.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    swin = describe(architecture("timm", "swin_tiny_patch4_window7_224"))
    assert (swin.target_layer, swin.reshape, swin.width) == ("norm", "nhwc", 768)


def test_timm_names_only_and_a_missing_timm_says_how_to_install(monkeypatch):
    with pytest.raises(ValueError, match="unknown architecture 'hf-hub:timm/resnet18' in 'timm:hf-hub:timm/resnet18'"):
        build_model("timm:hf-hub:timm/resnet18")  # would fetch a config: never a name timm lists
    with pytest.raises(ValueError, match=r"unknown architecture 'resnet81' .*did you mean 'resnet18'"):
        build_model("timm:resnet81")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if it were not installed
    with pytest.raises(ValueError) as err:
        build_model("timm:resnet18")
    assert str(err.value) == "timm is not installed: pip install 'embcam[timm]'"


# -- spec errors, user code, the CLI table --------------------------------------------------------


SOURCES = r"sources: torchvision:, embcam:, timm:, torchscript:<file>, <package.module>:<factory>$"


@pytest.mark.parametrize("spec, message", [
    ("torchvison:resnet50", r"unknown model source 'torchvison' in 'torchvison:resnet50' \(not a built-in source, "
                            r"and no module of that name imports\); did you mean 'torchvision:resnet50'\?; " + SOURCES),
    ("torchvision:resnet5", r"unknown architecture 'resnet5' in 'torchvision:resnet5'; did you mean 'resnet50'.*; "
                            r"`embcam models torchvision:` lists its \d+ architectures; " + SOURCES),
    ("embcam:small-resnt", r"unknown architecture 'small-resnt' in 'embcam:small-resnt'; did you mean "
                           r"'small-resnet'\?; embcam has: small-resnet; " + SOURCES),
    ("torchvision:resnet18+mlp", r"unknown embedding head 'mlp': use 'identity' or 'linear:<d>'"),
    ("timm:resnet18+linear:0", r"unknown embedding head 'linear:0'"),
    ("resnet50", r"model spec 'resnet50' must look like 'torchvision:resnet50\+linear:128'; did you mean "
                 r"'torchvision:resnet50'"),
    ("json:nothing", r"module 'json' has no factory 'nothing' \(model spec 'json:nothing'\)"),
])
def test_a_bad_spec_is_one_line_that_says_what_exists(spec, message):
    with pytest.raises(ValueError) as err:
        build_model(spec)
    assert re.match(message, str(err.value)) and "\n" not in str(err.value), str(err.value)


def test_a_user_module_that_fails_to_import_keeps_its_own_error(tmp_path, monkeypatch):
    (tmp_path / "needs_dep.py").write_text("import a_dependency_nobody_has\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="a_dependency_nobody_has"):
        build_model("needs_dep:factory")


def test_a_user_factory_may_name_its_own_target_layer(tmp_path, monkeypatch):
    (tmp_path / "own_target.py").write_text(textwrap.dedent("""
        import torch
        def net():
            model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3),
                                        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
            model.embcam_target_layer = "0"
            return model
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model, _, _ = load_model("own_target:net")
    assert default_target_layer(model) == "0"
    assert EmbeddingCAM(model)(torch.randn(1, 3, 12, 12)).heatmaps.shape == (1, 10, 10)


def test_embcam_models_prints_the_table(capsys):
    assert main(["models", "vit_b"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["spec", "default", "target", "layer", "size", "reshape", "width"]
    assert lines[1].split() == ["torchvision:vit_b_16", "encoder.layers.encoder_layer_11.ln_1", "224", "tokens", "768"]
    assert lines[2].split() == ["torchvision:vit_b_32", "encoder.layers.encoder_layer_11.ln_1", "224", "tokens", "768"]
    assert lines[3] == "" and "timm:<name>" in lines[5]
    assert main(["models", "efficientnet_b3"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == [
        "torchvision:efficientnet_b3", "backbone.features", "300", "-", "1536"]
    # the split point by a name --target-layer takes, which gives the same maps; the demo
    # model's size is its checkpoint's, not the architecture's 224
    assert main(["models", "small-resnet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["embcam:small-resnet", "backbone.layer4", "224", "-", "128"]
    assert out[-1] == ("the demo model (demo_model.pt, `embcam demo`): embcam:small-resnet+linear:128 at size 128, "
                       "from its checkpoint")
    model, _, _ = load_model("embcam:small-resnet")
    x = torch.randn(2, 3, 64, 64)
    split, named = (EmbeddingCAM(model, layer)(x, "self").heatmaps for layer in (None, "backbone.layer4"))
    torch.testing.assert_close(named, split)
    assert main(["models", "timm:not_a_model"]) == 2
    assert capsys.readouterr().err.startswith("embcam models: error: unknown architecture 'not_a_model'")


@pytest.mark.slow  # builds every registered architecture on the meta device (about 7 s)
def test_the_full_table_lists_every_registered_spec():
    lines = format_table().splitlines()
    specs = [line.split()[0] for line in lines[1:lines.index("")]]
    assert all(spec.startswith(BUILTIN_SOURCES) for spec in specs)
    assert specs[0] == "embcam:small-resnet" and len(specs) == 1 + len(_torchvision_architectures())
    assert specs.index("torchvision:resnet18") < specs.index("torchvision:resnet101")  # natural order
