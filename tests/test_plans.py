"""How the job computes: the cheapest exact CAM strategy per pass, the mean-proxy plans
(the stored-maps plan end to end on real Ray, Parquet and images), pass 1's pieces, and
the forward's precision."""
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from torch import nn

from embcam import EmbeddingCAM, load_model, save_checkpoint
from embcam.cam import cheapest_strategy, embedding_map_path, heatmaps_from_maps, normalise
from embcam.data.maps import read_stored_rows, write_maps
from embcam.data.runstate import PARTIALS, STATE, RunFolder, covered, piece_name
from embcam.datasets import generate_dataset
from embcam.job.model_stage import ExplainModel, ModelConfig
from embcam.job.pipeline import ExplainConfig, run_explain
from embcam.job.plans import choose_plan, queue_bytes
from embcam.job.stages import heatmaps_from_kept_maps, load_images, manifest_batch
from embcam.metrics import heatmap_metrics
from embcam.models import GeM, Preprocessing, build_model
from embcam.wsol_run import evaluate_run

SIZE = 48


# --- the strategy each pass runs --------------------------------------------------------


class GeMNet(nn.Module):
    """A ResNet-18 trunk with a GeM pool and a linear head: no closed form (vjp path)."""

    def __init__(self):
        super().__init__()
        trunk = torchvision.models.resnet18()
        self.trunk = nn.Sequential(*list(trunk.children())[:-2])
        self.pool, self.head = GeM(3.0), nn.Linear(512, 8)

    def forward(self, x):
        return self.head(self.pool(self.trunk(x)))


def tiny_vit():
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=16, mlp_dim=32)
    vit.heads = nn.Linear(16, 8)
    return vit, "encoder.layers.encoder_layer_1.ln_1", "tokens", 32


def swin():
    model = torchvision.models.swin_t()
    model.head = nn.Linear(768, 8)
    return model, "features.7.0", "nhwc", 64  # inside the last stage: no pool right after it


def gem_resnet():
    return GeMNet(), "trunk.7", "nchw", 64


def convnext():
    model = torchvision.models.convnext_tiny()
    model.classifier[2] = nn.Linear(768, 8)  # LayerNorm2d, flatten, Linear after the pool
    return model, "features", "nchw", 64


def linear_resnet():
    model = torchvision.models.resnet18()
    model.fc = nn.Linear(512, 8)
    return model, "layer4", "nchw", 64


@pytest.mark.parametrize("build, path", [(tiny_vit, "vjp"), (swin, "vjp"), (gem_resnet, "vjp"),
                                         (convnext, "pooled-jacobian"), (linear_resnet, "closed-form")])
def test_the_cheapest_strategy_gives_the_reference_heatmaps(float64, build, path):
    torch.manual_seed(0)
    model, layer, reshape, size = build()
    model.eval()
    assert embedding_map_path(model, layer, reshape) == path
    d = 8
    chosen = cheapest_strategy(path, 1, d)
    assert chosen == ("embedding-map" if path == "closed-form" else "autograd")
    assert cheapest_strategy(path, 1, d, maps_needed=True) == "embedding-map"  # E is needed: formed anyway
    assert cheapest_strategy(path, d, d) == "embedding-map"  # as many proxies as units: E is no dearer
    x = torch.randn(2, 3, size, size)
    p = torch.randn(2, d)
    reference = EmbeddingCAM(model, layer, "autograd", reshape=reshape)(x, p).heatmaps
    assert reference.amax() > 0
    for strategy in {chosen, "embedding-map"}:
        got = EmbeddingCAM(model, layer, strategy, reshape=reshape)(x, p).heatmaps
        torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-12 * float(reference.amax()))


def shape(path="closed-form", dims=(128, 7, 7)):
    return {"path": path, "dims": dims}


def test_plan_choice_from_costs():
    cfg = ExplainConfig(manifest="m", out="o", proxy="mean")
    store = 1 << 30
    plan, why = choose_plan(cfg, 1000, shape(), 224, store)  # 25 MB of maps: within a tenth of 1 GiB
    assert plan == "embedding-map" and "one model pass" in why
    plan, why = choose_plan(cfg, 1_000_000, shape(), 224, store)  # a catalog: 12.2 KiB maps vs a 147 KiB image
    assert plan == "stored-maps" and "12.2 KiB" in why and "147 KiB" in why
    plan, why = choose_plan(cfg, 1_000_000, shape("pooled-jacobian"), 224, store)
    assert plan == "stored-maps"
    plan, why = choose_plan(cfg, 1_000_000, shape(dims=(2048, 7, 7)), 224, store)  # a ResNet-50 identity head
    assert plan == "streaming" and "196 KiB" in why
    plan, why = choose_plan(cfg, 10, shape("vjp", (128, 14, 14)), 224, store)  # a ViT: E costs d backwards
    assert plan == "streaming" and "128 backward passes" in why
    assert choose_plan(replace(cfg, top_k_channels=50), 10, shape(), 224, store)[0] == "streaming"
    assert choose_plan(replace(cfg, strategy="two-pass"), 10, shape(), 224, store) == ("two-pass",
                                                                                       "--strategy two-pass")
    assert choose_plan(replace(cfg, proxy="self"), 10, shape(), 224, store)[0] == "one-pass"
    with pytest.raises(ValueError, match="stored-maps plan never forms"):
        ExplainConfig(manifest="m", out="o", proxy="mean", strategy="stored-maps", top_k_channels=5).check()


# --- the stored-maps plan, end to end ---------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """6 classes x 5 images with boxes and masks, one corrupt row; a small model."""
    root = tmp_path_factory.mktemp("plans")
    manifest = generate_dataset(root, num_classes=6, images_per_class=5, min_side=48, max_side=80, seed=11)
    table = pq.read_table(manifest)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    rows = table.to_pylist()
    rows[7] = dict(rows[7], uri="corrupt.jpg")
    pq.write_table(pq.read_table(manifest).from_pylist(rows, schema=table.schema), manifest)
    torch.manual_seed(0)
    checkpoint = root / "model.pt"
    save_checkpoint(checkpoint, build_model("embcam:small-resnet+linear:16"), "embcam:small-resnet+linear:16",
                    Preprocessing(SIZE))
    return manifest, checkpoint


def explain(dataset, out, **kw):
    manifest, checkpoint = dataset
    return run_explain(ExplainConfig(manifest=str(manifest), out=str(out), checkpoint=str(checkpoint), batch_size=4,
                                     block_rows=4, proxy="mean", **kw), progress=False)


def results(out):
    return pd.read_parquet(out / "results").set_index("image_id").sort_index()


def test_queue_budget_is_blocks_per_cpu_of_image_and_map_rows():
    # 8 blocks per CPU; a row: the 64 px uint8 image (12,288 B) and a 128 x 4 x 4 float32 map (8,192 B)
    assert queue_bytes(256, 64, (128, 4, 4), cpus=2, gpu_actors=0) == 8 * 2 * 256 * (12288 + 8192)  # 80 MiB
    # a cluster that starts without worker nodes: 8 CPUs per GPU actor it asks for
    assert queue_bytes(512, 224, (128, 7, 7), cpus=0, gpu_actors=8) == 8 * 64 * 512 * (150528 + 25088)
    assert queue_bytes(512, 224, (128, 7, 7), cpus=256, gpu_actors=8) == 8 * 256 * 512 * (150528 + 25088)
    assert queue_bytes(8, 32, (16, 1, 1), cpus=0, gpu_actors=0) == 8 * 1 * 8 * (3072 + 64)


def test_stored_maps_plan_equals_the_model_run_and_float16_maps_stay_within_their_rounding_bound(
        ray_session, dataset, tmp_path):
    kept = explain(dataset, tmp_path / "kept", strategy="embedding-map", keep_maps=True, maps_dtype="float32")
    stored = explain(dataset, tmp_path / "stored", strategy="stored-maps", maps_dtype="float32")
    assert stored["plan"] == "stored-maps" and kept["plan"] == "embedding-map"
    assert list(stored["passes"]) == ["pass 1 of 2, embeddings and maps", "pass 2 of 2, heatmaps from the stored maps"]
    assert stored["passes"]["pass 1 of 2, embeddings and maps"]["cam_path"] == "closed-form"
    # decode tasks stay apart from the model actor (fused, decode never overlapped the model)
    assert stored["passes"]["pass 1 of 2, embeddings and maps"]["ray_operators"] == [
        "ReadManifestImages", "MapBatches(ExplainModel)", "MapBatches(commit_pass1)"]
    assert stored["passes"]["pass 2 of 2, heatmaps from the stored maps"]["ray_operators"] == [
        "ReadRange", "MapBatches(heatmaps_from_stored_maps)"]
    assert stored["precision"] == "fp32" and stored["devices"]["model"] == "cpu"
    assert not (tmp_path / "stored" / "maps").exists()  # written for pass 2 only
    a, b = results(tmp_path / "kept"), results(tmp_path / "stored")
    assert (a.status == b.status).all() and (a.status == "error").sum() == 1
    assert b.error.dropna().str.startswith("image: ImageDecodeError").all()
    ok = a.status == "ok"
    # the image's size and orientation come from pass 1; pass 2 decoded no image
    for column in ("width", "height", "orientation", "ratio_bbox", "ratio_mask", "iou", "loc_correct", "cosine"):
        np.testing.assert_allclose(a[column][ok].astype(float), b[column][ok].astype(float), rtol=1e-5, atol=1e-6)
    heat_a, heat_b = np.stack(a.heatmap[ok]), np.stack(b.heatmap[ok])
    np.testing.assert_allclose(heat_b, heat_a, rtol=1e-5, atol=1e-6 * heat_a.max())
    assert pd.read_parquet(tmp_path / "stored" / "proxies.parquet")["count"].sum() == ok.sum()
    # the WSOL counters each job stored with its results equal embcam.wsol's measure of its heatmaps
    for run in (tmp_path / "kept", tmp_path / "stored"):
        summed, measured = evaluate_run(str(run)), evaluate_run(str(run), use_counters=False)
        assert summed["files"]["measured"] == 0 and measured["files"]["measured"] == summed["files"]["results"] > 1
        assert summed["maxboxacc_v2"] == measured["maxboxacc_v2"] and summed["pxap"] == measured["pxap"]
        assert summed["maxboxacc_v2"]["images"] == summed["pxap"]["images"] == summed["rows"] == ok.sum()

    # float16 maps (the default) round each E value by at most 2^-11 of it:
    # |dH| <= sum_k |p_k| |E_k| 2^-11, against the float32 maps the kept run stored
    explain(dataset, tmp_path / "half", strategy="stored-maps")
    half = results(tmp_path / "half")
    proxies = pd.read_parquet(tmp_path / "kept" / "proxies.parquet").set_index("label").proxy
    maps = pd.read_parquet(tmp_path / "kept" / "maps").set_index("image_id").loc[a.index[ok]]
    e = np.stack(maps.maps).reshape(ok.sum(), 16, -1)
    p = np.stack(proxies[a.label[ok]])
    bound = np.einsum("nk,nkc->nc", np.abs(p), np.abs(e)) * 2.0 ** -11
    diff = np.abs(np.stack(half.heatmap[ok]) - heat_a)
    assert (diff <= bound + 1e-9).all() and diff.max() > 0


def test_pass_one_pieces_never_overlap_and_count_every_row(ray_session, tmp_path):
    """One label per 3 rows, blocks of 5: partial sums are committed per run of manifest
    rows, so no two pieces overlap and every class gets all of its images. The run asks for
    bf16, which the summary and the run's identity record (its values: test_bf16_forward_against_float64)."""
    manifest = generate_dataset(tmp_path / "data", num_classes=8, images_per_class=3, min_side=48, max_side=56, seed=2)
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "m.pt", build_model("embcam:small-resnet+linear:8"), "embcam:small-resnet+linear:8",
                    Preprocessing(32))
    summary = run_explain(ExplainConfig(manifest=str(manifest), out=str(tmp_path / "run"), checkpoint=str(tmp_path /
                                        "m.pt"), batch_size=3, block_rows=5, proxy="mean", strategy="streaming",
                                        precision="bf16"),
                          progress=False)
    run = RunFolder(str(tmp_path / "run"))
    assert covered(run.pieces(STATE, PARTIALS), 24) == 24  # raises on an overlap
    counts = pd.read_parquet(tmp_path / "run" / "proxies.parquet").set_index("label")["count"]
    assert len(counts) == 8 and (counts == 3).all() and summary["counts"]["ok"] == 24
    pass1 = summary["passes"]["pass 1 of 2, embeddings"]
    assert pass1["output"] == "embeddings" and pass1["cam"] is None and pass1["rows"] == 24
    assert summary["precision"] == "bf16"
    saved = json.loads((tmp_path / "run" / "_embcam" / "run.json").read_text())
    assert saved["precision"] == "bf16" and saved["identity"]["precision"] == "bf16"


# --- precision --------------------------------------------------------------------------------


def test_bf16_forward_against_float64(tmp_path):
    """The forward in bfloat16 (8 bits of mantissa) on CPU, the CAM arithmetic in float32,
    against the whole computation in float64. bf16 rounds each activation by up to 2^-9
    relative, so maps are not equal, but what users read off them must hold: the heatmap's
    shape (Pearson r >= 0.999 per image) and the box ratio (within 0.01). Measured
    (bench/precision_cost.py): r >= 0.99997 and |d ratio| <= 0.0011, so the bounds leave
    room for other CPUs' bf16 kernels, and still fail a map that moves visibly."""
    manifest = generate_dataset(tmp_path, num_classes=4, images_per_class=4, min_side=64, max_side=96, seed=4)
    model, prep, _ = load_model(None, "embcam/assets/demo_model.pt")
    rows = manifest_batch(pq.read_table(manifest))
    batch = load_images(rows, str(tmp_path), prep.size)
    stage = ExplainModel(ModelConfig(checkpoint="embcam/assets/demo_model.pt", precision="bf16"), "self")
    assert stage.autocast_dtype == torch.bfloat16
    out = stage(batch)
    with torch.no_grad():
        x = prep(torch.from_numpy(batch["image"])).double()
    reference = EmbeddingCAM(model.double(), strategy="autograd")(x, "self").heatmaps.numpy()
    got = out["heatmap"].astype(np.float64)
    assert not np.array_equal(got, reference)  # bf16 really ran
    for i in range(len(got)):
        r = np.corrcoef(got[i].ravel(), reference[i].ravel())[0, 1]
        assert r >= 0.999, (i, r)
        box = [float(rows[c][i]) for c in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")]
        w, h = int(batch["width"][i]), int(batch["height"][i])
        ratio = heatmap_metrics(got[i], w, h, box)["ratio_bbox"]
        assert abs(ratio - heatmap_metrics(reference[i], w, h, box)["ratio_bbox"]) <= 0.01


def test_stored_rows_of_a_range_across_pieces_and_of_a_piece_where_every_image_failed(tmp_path):
    """Pass 2 reads any row range from pass 1's pieces, whatever their cuts; a piece whose
    images all failed stores no maps, and its rows come back as zeros of the run's grid."""
    run = RunFolder(str(tmp_path))
    rng = np.random.default_rng(0)
    grid = (3, 2, 2)

    def piece(start, stop, ok=True):
        n = stop - start
        batch = {"image_id": np.array([f"i{r}" for r in range(start, stop)], dtype=object),
                 "status": np.array(["ok" if ok else "error"] * n, dtype=object),
                 "error": np.array([None if ok else "image: broken"] * n, dtype=object),
                 "embedding": rng.normal(size=(n, 3)).astype(np.float32),
                 "maps": rng.normal(size=(n, *grid)).astype(np.float32),
                 "width": np.full(n, 40 + start, np.int32) * ok, "height": np.full(n, 30, np.int32) * ok,
                 "orientation": np.full(n, 6, np.int32) * ok}
        write_maps(run, batch, "float32", piece_name(start, stop))
        return batch

    written = [piece(0, 3), piece(3, 5, ok=False), piece(5, 9)]
    pieces = run.pieces("maps")
    got = read_stored_rows(run, pieces, 2, 7, grid)
    assert got["status"].tolist() == ["ok", "error", "error", "ok", "ok"]
    assert got["width"].tolist() == [40, 0, 0, 45, 45] and got["orientation"].tolist() == [6, 0, 0, 6, 6]
    np.testing.assert_array_equal(got["maps"][0], written[0]["maps"][2])
    np.testing.assert_array_equal(got["maps"][3:], written[2]["maps"][:2])
    assert got["maps"].shape == (5, *grid) and not got["maps"][1:3].any() and not got["embedding"][1:3].any()
    with pytest.raises(RuntimeError, match="stored maps hold 4 of manifest rows 5-10"):
        read_stored_rows(run, pieces, 5, 10, grid)


def test_heatmaps_from_kept_maps_equal_the_cams_own_in_float64():
    """The CPU stage's ReLU(E . p), score and cosine (numpy, no torch) against the CAM's own
    functions in float64; a row without a proxy fails, an error row stays as it was."""
    rng = np.random.default_rng(3)
    maps = rng.normal(size=(4, 6, 3, 5)).astype(np.float32)
    embeddings = rng.normal(size=(4, 6)).astype(np.float32)
    proxies = {"a": rng.normal(size=6).astype(np.float32), "b": np.zeros(6, np.float32)}
    batch = {"image_id": np.array(["i0", "i1", "i2", "i3"], dtype=object), "label": np.array(["a", "b", "c", "a"],
             dtype=object), "status": np.array(["ok", "ok", "ok", "error"], dtype=object),
             "error": np.array([None, None, None, "image: broken"], dtype=object), "maps": maps,
             "embedding": embeddings}
    out = heatmaps_from_kept_maps(batch, "mean", proxies)
    assert out["status"].tolist() == ["ok", "ok", "error", "error"] and "maps" not in out
    assert out["error"][2] == "proxy: no mean proxy for label 'c'" and out["error"][3] == "image: broken"
    p = torch.from_numpy(np.stack([proxies["a"], proxies["b"]])).double()
    e, y = torch.from_numpy(maps[:2]).double(), torch.from_numpy(embeddings[:2]).double()
    np.testing.assert_allclose(out["heatmap"][:2], heatmaps_from_maps(e, p).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["score"][:2], (y * p).sum(-1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(out["cosine"][:2], (normalise(y) * normalise(p)).sum(-1).numpy(), rtol=1e-5)
    assert out["cosine"][1] == 0 and not out["heatmap"][2:].any()  # a zero proxy; rows without a heatmap
