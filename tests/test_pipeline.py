"""The explain job end to end on real Ray, Parquet and images."""
import argparse
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from embcam import EmbeddingCAM, load_model, save_checkpoint
from embcam.cli import add_explain_arguments, explain_config, format_summary
from embcam.data.images import decode_image, resize_square
from embcam.data.manifest import ManifestError
from embcam.data.runstate import RunMismatch
from embcam.datasets import generate_dataset
from embcam.job import reduce
from embcam.job.pipeline import ExplainConfig, run_explain
from embcam.job.plans import queue_bytes
from embcam.job.reexplain import reexplain
from embcam.models import Preprocessing, build_model
from embcam.report import write_report

SIZE = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """4 classes x 4 images (2 train, 2 eval classes) plus four broken rows."""
    root = tmp_path_factory.mktemp("data")
    manifest = generate_dataset(root, num_classes=4, images_per_class=4, min_side=64, max_side=96, seed=3)
    table = pq.read_table(manifest)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "empty.jpg").write_bytes(b"")
    first = table.slice(0, 1).to_pylist()[0]
    broken = [
        dict(first, image_id="corrupt", uri="corrupt.jpg"),
        dict(first, image_id="missing", uri="no/such/file.jpg"),
        dict(first, image_id="empty", uri="empty.jpg"),
        dict(first, image_id="badbox", bbox_x0=50.0, bbox_x1=10.0),
    ]
    table = pa.concat_tables([table, pa.Table.from_pylist(broken, schema=table.schema)])
    pq.write_table(table, manifest)
    torch.manual_seed(0)
    model = build_model("embcam:small-resnet+linear:16")
    checkpoint = root / "model.pt"
    save_checkpoint(checkpoint, model, "embcam:small-resnet+linear:16", Preprocessing(SIZE))
    return root, manifest, checkpoint, table


def explain(dataset, out, **kw):
    root, manifest, checkpoint, _ = dataset
    cfg = ExplainConfig(manifest=str(manifest), out=str(out), checkpoint=str(checkpoint), batch_size=8, **kw)
    return run_explain(cfg, progress=False)


def read(out):
    return pd.read_parquet(out / "results").sort_values("image_id").reset_index(drop=True)


def core_heatmaps(dataset, rows, proxies="self"):
    root, _, checkpoint, table = dataset
    uri = dict(zip(table.column("image_id").to_pylist(), table.column("uri").to_pylist()))
    model, prep, _ = load_model(checkpoint=checkpoint)
    images = np.stack([resize_square(decode_image((root / uri[i]).read_bytes()), prep.size)
                       for i in rows.image_id])
    return EmbeddingCAM(model, strategy="autograd")(prep(torch.from_numpy(images)), proxies)


@pytest.fixture(scope="module")
def self_run(ray_session, dataset, tmp_path_factory):
    """One self-proxy job with the dataset's own checkpoint, which several tests read."""
    out = tmp_path_factory.mktemp("self-run")
    return out, explain(dataset, out)


def test_self_proxy_job(self_run, dataset):
    tmp_path, summary = self_run
    df = read(tmp_path)
    table = dataset[3]
    assert sorted(df.image_id) == sorted(table.column("image_id").to_pylist())  # every row exactly once
    errors = df.set_index("image_id").error
    assert errors["corrupt"].startswith("image: ImageDecodeError: cannot")
    assert "No such file" in errors["missing"] or "FileNotFound" in errors["missing"]
    assert "empty file" in errors["empty"]
    assert errors["badbox"].startswith("bbox:")
    ok = df[df.status == "ok"]
    assert len(ok) == 16 and df[df.status == "error"].heatmap.isna().all()
    assert summary["counts"] == {"manifest": 20, "results": 20, "ok": 16, "error": 4, "resumed": 0,
                                 "degenerate": int(ok.degenerate.sum())}

    ref = core_heatmaps(dataset, ok)
    heat = np.stack(ok.heatmap).reshape(len(ok), int(ok.heatmap_height.iloc[0]), int(ok.heatmap_width.iloc[0]))
    np.testing.assert_allclose(heat, ref.heatmaps.numpy(), rtol=1e-4, atol=1e-6 * float(ref.heatmaps.max()))
    np.testing.assert_allclose(np.stack(ok.embedding), ref.embeddings.numpy(), rtol=1e-4, atol=1e-6)
    y = np.stack(ok.embedding)
    np.testing.assert_allclose(ok.score, np.linalg.norm(y, axis=1), rtol=1e-5)  # y . y_hat = |y|
    assert ok.ratio_bbox.between(0, 1).all() and ok.uniform_bbox.between(0, 1).all()
    assert (ok.iou_sweep.map(len) == 8).all()

    # self-contained: each row carries the manifest's uri and box (nulls where it has none)
    manifest = table.to_pandas().set_index("image_id").loc[df.image_id]
    assert df.uri.tolist() == manifest.uri.tolist()
    for column in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"):
        np.testing.assert_array_equal(df[column].to_numpy(float), manifest[column].to_numpy(float))
    assert df.bbox_x0.notna().sum() == manifest.bbox_x0.notna().sum() > 0

    # the results open with pandas alone, in a process without Ray
    code = ("import sys, pandas as pd, numpy as np; df = pd.read_parquet(sys.argv[1]); "
            "ok = df[df.status == 'ok'].iloc[0]; "
            "h = np.asarray(ok.heatmap).reshape(int(ok.heatmap_height), int(ok.heatmap_width)); "
            "assert 'ray' not in sys.modules; print(len(df), h.shape, len(ok.embedding))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "results")],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "20" and out[-1] == "16"


@pytest.fixture(scope="module")
def mean_runs(ray_session, dataset, tmp_path_factory):
    """The mean-proxy plans, each keeping its E maps in float32: embedding-map (all maps kept
    until the reduce), two-pass with top-k channels, and streaming with proxies from the
    train split only."""
    out = tmp_path_factory.mktemp("mean-runs")
    plans = {"map": dict(strategy="embedding-map"), "two": dict(strategy="two-pass", top_k_channels=5),
             "streaming": dict(strategy="streaming", proxy_split="train")}
    with pytest.MonkeyPatch.context() as patch:  # the reduce on Ray in many tasks: 2 pieces each, 4+ buckets
        patch.setattr(reduce, "REDUCE_GROUP_PIECES", 2)
        patch.setattr(reduce, "REDUCE_BUCKET_VALUES", 64)
        for name, kw in plans.items():
            explain(dataset, out / name, proxy="mean", keep_maps=True, maps_dtype="float32", **kw)
    return out


def test_mean_proxies_strategies_agree_and_match_numpy(dataset, mean_runs):
    a, b = read(mean_runs / "map"), read(mean_runs / "two")
    ok = a.status == "ok"
    assert (ok == (b.status == "ok")).all() and ok.sum() == 16
    np.testing.assert_allclose(np.stack(a.heatmap[ok]), np.stack(b.heatmap[ok]), rtol=1e-4,
                               atol=1e-6 * np.stack(a.heatmap[ok]).max())
    assert b.heatmap_topk[ok].notna().all() and a.heatmap_topk.isna().all()

    # proxies = normalise(mean of normalised embeddings), straight from the embeddings: reduced
    # on the driver (the kept maps' small run) and on Ray (two-pass, in many tasks and buckets)
    y = np.stack(a.embedding[ok]).astype(np.float64)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    for run in ("two", "map"):
        proxies = pd.read_parquet(mean_runs / run / "proxies.parquet").set_index("label")
        assert sorted(proxies.index) == sorted(set(a[ok].label))
        for label, group in a[ok].groupby("label"):
            mean = y[(a[ok].label == label).to_numpy()].mean(0)
            np.testing.assert_allclose(proxies.proxy[label], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
            assert proxies["count"][label] == len(group)
    # the heatmap is the core library's, against the class proxy
    rows = a[ok].reset_index(drop=True)
    p = torch.from_numpy(np.stack([proxies.proxy[label] for label in rows.label]).astype(np.float32))
    ref = core_heatmaps(dataset, rows, p)
    np.testing.assert_allclose(np.stack(rows.heatmap), ref.heatmaps.flatten(1).numpy(), rtol=1e-4,
                               atol=1e-6 * float(ref.heatmaps.max()))


def test_streaming_passes_say_their_object_store_budget_and_the_kept_maps_pass_has_none(mean_runs):
    """Both passes of a streaming plan run with the job's budget (Ray Data's resource limit,
    as the dataset carries it); the kept-maps pass, whose maps must all stay in the store
    until the reduce, runs without one."""
    summary = json.loads((mean_runs / "streaming" / "summary.json").read_text())
    state = json.loads((mean_runs / "streaming" / "_embcam" / "run.json").read_text())
    row = read(mean_runs / "streaming").query("status == 'ok'").iloc[0]
    dims = (len(row.embedding), row.heatmap_height, row.heatmap_width)
    budget = queue_bytes(state["block_rows"], state["identity"]["image_size"], dims, 2, 0)
    assert [p["object_store_budget_bytes"] for p in summary["passes"].values()] == [budget, budget]
    assert budget < (256 << 20) // 2  # below Ray Data's own bound: half the session's 256 MiB store
    kept = json.loads((mean_runs / "map" / "summary.json").read_text())["passes"]
    assert kept["embeddings and maps, kept for the class proxies"]["object_store_budget_bytes"] is None


def test_proxy_split_builds_proxies_from_gallery_only(mean_runs):
    df = read(mean_runs / "streaming")
    proxies = pd.read_parquet(mean_runs / "streaming" / "proxies.parquet")
    train_labels = set(df[(df.split == "train") & (df.status == "ok")].label)
    assert set(proxies.label) == train_labels and len(train_labels) == 2
    eval_rows = df[(df.split == "eval") & df.image_id.str.startswith("c")]
    assert (eval_rows.status == "error").all()
    assert eval_rows.error.str.contains("no mean proxy for label").all()


@pytest.mark.parametrize("plan", ["map", "two", "streaming"])
def test_mean_proxy_plans_store_the_maps_they_explained_with(mean_runs, tmp_path, plan):
    """Every plan stores maps from which the run's own proxies give back its own heatmaps."""
    run = mean_runs / plan
    reexplain(str(run), str(tmp_path / "again"), proxies=str(run / "proxies.parquet"), log=lambda line: None)
    a, b = read(run), read(tmp_path / "again")
    ok = a.status == "ok"
    assert (a.status == b.status).all() and ok.sum() == (8 if plan == "streaming" else 16)
    top = float(np.stack(a.heatmap[ok]).max())
    np.testing.assert_allclose(np.stack(b.heatmap[ok]), np.stack(a.heatmap[ok]), rtol=1e-4, atol=1e-6 * top)
    np.testing.assert_allclose(b.ratio_bbox[ok], a.ratio_bbox[ok], rtol=1e-4, atol=1e-6)


def test_bad_manifest_fails_fast(tmp_path, dataset):
    table = dataset[3]
    dupes = pa.concat_tables([table.slice(0, 2), table.slice(0, 1)])
    pq.write_table(dupes, tmp_path / "dupes.parquet")
    with pytest.raises(ManifestError, match="image_id.*c00"):
        run_explain(ExplainConfig(manifest=str(tmp_path / "dupes.parquet"), out=str(tmp_path / "o"),
                                  checkpoint=str(dataset[2])), progress=False)
    assert not (tmp_path / "o").exists()  # failed before creating any output
    pq.write_table(table.drop_columns(["uri"]), tmp_path / "nouri.parquet")
    with pytest.raises(ManifestError, match="uri"):
        run_explain(ExplainConfig(manifest=str(tmp_path / "nouri.parquet"), out=str(tmp_path / "o")),
                    progress=False)


def test_bank_and_onehot_proxies(ray_session, dataset, mean_runs, tmp_path):
    """The bank run is compiled too (--compile): batches thinned by the broken rows are padded
    into one compiled graph, and the heatmaps are still the eager mean run's."""
    explain(dataset, tmp_path / "bank", proxies=str(mean_runs / "map" / "proxies.parquet"), compile=True)
    mean, bank = read(mean_runs / "map"), read(tmp_path / "bank")
    ok = mean.status == "ok"
    assert (bank.proxy_kind == "bank").all() and (bank.proxy_label[ok] == bank.label[ok]).all()
    np.testing.assert_allclose(np.stack(bank.heatmap[ok]), np.stack(mean.heatmap[ok]), rtol=1e-4,
                               atol=1e-6 * np.stack(mean.heatmap[ok]).max())

    # onehot: labels are class indices of the model's 16 outputs (plain Grad-CAM); "99" has none
    root, manifest, checkpoint, table = dataset
    labels = ["99"] + [str(i % 3) for i in range(table.num_rows - 1)]
    digits = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels))
    pq.write_table(digits, root / "digits.parquet")
    run_explain(ExplainConfig(manifest=str(root / "digits.parquet"), out=str(tmp_path / "onehot"),
                              checkpoint=str(checkpoint), proxy="onehot"), progress=False)
    df = pd.read_parquet(tmp_path / "onehot" / "results").set_index("image_id").loc[digits["image_id"].to_pylist()]
    rows = df[df.status == "ok"].reset_index()
    assert "no onehot proxy for label '99'" in df.error.iloc[0]
    p = torch.nn.functional.one_hot(torch.tensor(rows.label.astype(int).to_numpy()), 16).float()
    ref = core_heatmaps(dataset, rows, p)
    np.testing.assert_allclose(np.stack(rows.heatmap), ref.heatmaps.flatten(1).numpy(), rtol=1e-4,
                               atol=1e-6 * float(ref.heatmaps.max()))
    np.testing.assert_allclose(rows.score, ref.embeddings.numpy()[np.arange(len(rows)), rows.label.astype(int)],
                               rtol=1e-4, atol=1e-6)


def test_compile_refuses_a_target_inside_the_backbone(ray_session, dataset, tmp_path):
    """--compile compiles the backbone whole (a compiled run: test_bank_and_onehot_proxies)."""
    with pytest.raises(ValueError, match="backbone output"):
        explain(dataset, tmp_path / "layer", compile=True, target_layer="backbone.layer3")
    assert not (tmp_path / "layer").exists()


def test_reshape_is_part_of_the_run_identity(self_run, dataset, tmp_path):
    """A run is resumed only with its own --reshape; a bad one fails before any work."""
    with pytest.raises(RunMismatch, match=r"another configuration \(reshape: None -> 'nhwc'\)"):
        explain(dataset, self_run[0], reshape="nhwc")
    with pytest.raises(ValueError, match=r"--reshape must be one of \('tokens', 'nhwc', 'nchw'\), got 'NHWC'"):
        explain(dataset, tmp_path / "bad", reshape="NHWC")
    assert not (tmp_path / "bad").exists()


def test_explain_flags_reach_the_config():
    parser = argparse.ArgumentParser()
    add_explain_arguments(parser)
    cfg = explain_config(parser.parse_args(["--manifest", "m", "--out", "o", "--reshape", "tokens",
                                            "--py-modules", "a", "--py-modules", "b.py", "--working-dir", "w"]))
    assert (cfg.reshape, cfg.py_modules, cfg.working_dir) == ("tokens", ["a", "b.py"], "w")
    cfg = explain_config(parser.parse_args(["--manifest", "m", "--out", "o"]))
    assert (cfg.reshape, cfg.py_modules, cfg.working_dir) == (None, None, None)


def test_a_checkpoint_that_does_not_fit_fails_before_any_work_unless_allowed(ray_session, dataset, tmp_path):
    """The checkpoint's head is Linear(128, 16); --model asks for +linear:8."""
    spec = "embcam:small-resnet+linear:8"
    with pytest.raises(ValueError, match=r"does not fit model embcam:small-resnet\+linear:8: 2 model tensor\(s\) "
                                         r"not loaded, .* head.weight \(16, 128\) vs \(8, 128\); .* use --model "
                                         r"embcam:small-resnet\+linear:16 for the checkpoint's head"):
        explain(dataset, tmp_path / "refused", model=spec)
    assert not (tmp_path / "refused").exists()  # nothing started

    lines = []
    root, manifest, checkpoint, table = dataset
    summary = run_explain(ExplainConfig(manifest=str(manifest), out=str(tmp_path / "run"), model=spec,
                                        checkpoint=str(checkpoint), batch_size=8, allow_partial_checkpoint=True),
                          progress=False, log=lines.append)
    assert summary["counts"]["ok"] == 16
    recorded = json.loads((tmp_path / "run" / "summary.json").read_text())["checkpoint"]
    assert recorded == summary["checkpoint"] == {
        "path": str(checkpoint), "loaded": len(build_model(spec).state_dict()) - 2, "missing": [], "unexpected": [],
        "mismatched": [{"name": "head.bias", "checkpoint": [16], "model": [8]},
                       {"name": "head.weight", "checkpoint": [16, 128], "model": [8, 128]}],
        "dropped": [], "partial": True}
    warning = ("WARNING: partial checkpoint " + str(checkpoint) + " (--allow-partial-checkpoint): 2 model tensor(s) "
               "not loaded")
    assert lines[0].startswith("embcam explain: " + warning), lines  # said at the start
    assert "\nembcam explain: " + warning in format_summary(summary)  # and in the summary printout
    # the workers loaded the same partial model: the head is the seeded init's, so are the embeddings
    model, prep, _ = load_model(spec, checkpoint, allow_partial=True)
    ok = read(tmp_path / "run").query("status == 'ok'")
    uri = dict(zip(table.column("image_id").to_pylist(), table.column("uri").to_pylist()))
    images = np.stack([resize_square(decode_image((root / uri[i]).read_bytes()), prep.size) for i in ok.image_id])
    with torch.no_grad():
        np.testing.assert_allclose(np.stack(ok.embedding), model(prep(torch.from_numpy(images))).numpy(),
                                   rtol=1e-4, atol=1e-5)
    report = write_report([str(tmp_path / "run")], str(tmp_path / "report"), overlays=0, spread=False, wsol=False)
    assert report["catalog"][0]["warnings"][0].startswith(warning)
    assert warning in (tmp_path / "report" / "report.md").read_text()
    assert warning in (tmp_path / "report" / "report.html").read_text()


def test_a_matching_checkpoint_is_recorded_as_loaded_whole(self_run):
    summary = self_run[1]
    fit = summary["checkpoint"]
    assert fit["partial"] is False and fit["loaded"] == len(build_model("embcam:small-resnet+linear:16").state_dict())
    assert "WARNING" not in format_summary(summary)
