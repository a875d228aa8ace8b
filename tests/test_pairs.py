"""Pair explanations, stored E maps and reexplain, end to end on real Ray, Parquet and images.

References are independent of the job: the pair heatmaps against the autograd Grad-CAM of
``EmbeddingCAM(model, strategy="autograd")(x_query, normalise(y_match))``, and heatmaps
re-explained from float16 maps against a model run, within the float16 rounding bound
derived from the stored maps themselves.
"""
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from embcam import EmbeddingCAM, load_model, save_checkpoint
from embcam.cam import normalise
from embcam.cli import main as cli_main
from embcam.data.images import decode_image, resize_square
from embcam.data.maps import MapStore, maps_table, read_maps_piece
from embcam.data.runstate import RunFolder
from embcam.datasets import generate_dataset
from embcam.job.pairs_pass import pairs_on_ray
from embcam.job.pipeline import ExplainConfig, run_explain
from embcam.job.reexplain import reexplain
from embcam.models import Preprocessing, build_model
from embcam.pairs.explain import PairsError, explain_pairs, read_pairs, write_pairs

SIZE = 64
FP16_EPS = 2.0 ** -11  # float16's unit roundoff: |fp16(x) - x| <= 2^-11 |x| (normal range)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes x 3 images, one broken row; a random-init model; a pairs file and a bank."""
    root = tmp_path_factory.mktemp("pairs")
    manifest = generate_dataset(root, num_classes=3, images_per_class=3, min_side=64, max_side=96, seed=5)
    table = pq.read_table(manifest)
    first = table.slice(0, 1).to_pylist()[0]
    table = pa.concat_tables([table, pa.Table.from_pylist([dict(first, image_id="missing", uri="no/such.jpg")],
                                                          schema=table.schema)])
    pq.write_table(table, manifest)
    torch.manual_seed(0)
    model = build_model("embcam:small-resnet+linear:16")
    checkpoint = root / "model.pt"
    save_checkpoint(checkpoint, model, "embcam:small-resnet+linear:16", Preprocessing(SIZE))
    ids = table.column("image_id").to_pylist()
    pairs = pa.table({"query_id": [ids[0], ids[1], ids[4], ids[0], "missing"],
                      "match_id": [ids[1], ids[7], ids[0], ids[0], ids[2]],
                      "source": ["a", "b", "c", "self", "broken"]})
    pq.write_table(pairs, root / "pairs.parquet")
    labels = sorted(set(table.column("label").to_pylist()))
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(len(labels), 16))
    bank = pa.table({"label": labels, "proxy": [list(map(float, v / np.linalg.norm(v))) for v in vectors]})
    pq.write_table(bank, root / "bank.parquet")
    return root, manifest, checkpoint, table, pairs


@pytest.fixture(scope="module")
def runs(ray_session, data, tmp_path_factory):
    """The job runs the tests compare: pairs only (no maps kept); all images with float16 maps;
    a bank, with float32 maps."""
    root, manifest, checkpoint, _, _ = data
    out = tmp_path_factory.mktemp("runs")

    def explain(name, **kw):
        cfg = ExplainConfig(manifest=str(manifest), out=str(out / name), checkpoint=str(checkpoint), batch_size=4,
                            **kw)
        return run_explain(cfg, progress=False)

    summaries = {"pairs": explain("pairs", pairs=str(root / "pairs.parquet")),
                 "maps16": explain("maps16", keep_maps=True),
                 "bank": explain("bank", proxies=str(root / "bank.parquet"), keep_maps=True, maps_dtype="float32")}
    return out, summaries


def reference_inputs(data, image_ids):
    root, _, checkpoint, table, _ = data
    uri = dict(zip(table.column("image_id").to_pylist(), table.column("uri").to_pylist()))
    model, prep, _ = load_model(checkpoint=checkpoint)
    images = np.stack([resize_square(decode_image((root / uri[i]).read_bytes()), prep.size) for i in image_ids])
    return model, prep(torch.from_numpy(images))


def test_pairs_equal_the_python_api(data, runs):
    out, summaries = runs
    pairs = pd.read_parquet(out / "pairs" / "pairs")
    assert list(pairs.source) == ["a", "b", "c", "self", "broken"]  # the file's order, extra column carried
    assert list(pairs.columns[:9]) == ["query_id", "match_id", "status", "error", "cosine", "query_heatmap",
                                       "match_heatmap", "heatmap_height", "heatmap_width"]
    assert pairs.status.tolist() == ["ok"] * 4 + ["error"]
    assert pairs.error[4].startswith("query image failed: image: ") and pairs.query_heatmap[4] is None

    ok = pairs[pairs.status == "ok"]
    model, x = reference_inputs(data, list(ok.query_id) + list(ok.match_id))
    cam = EmbeddingCAM(model, strategy="autograd")  # the paper's computation: gradients, not E maps
    with torch.no_grad():
        y = model(x)
    n = len(ok)
    yq, ym = y[:n], y[n:]
    query = cam(x[:n], normalise(ym)).heatmaps
    match = cam(x[n:], normalise(yq)).heatmaps
    h, w = int(ok.heatmap_height.iloc[0]), int(ok.heatmap_width.iloc[0])
    got_q = np.stack(ok.query_heatmap).reshape(n, h, w)
    got_m = np.stack(ok.match_heatmap).reshape(n, h, w)
    top = float(max(query.max(), match.max()))
    np.testing.assert_allclose(got_q, query.numpy(), rtol=1e-4, atol=1e-6 * top)
    np.testing.assert_allclose(got_m, match.numpy(), rtol=1e-4, atol=1e-6 * top)
    np.testing.assert_allclose(ok.cosine, (normalise(yq) * normalise(ym)).sum(-1).numpy(), rtol=1e-5, atol=1e-6)
    assert abs(ok.cosine.iloc[3] - 1) < 1e-6  # the self pair
    assert got_q[3].max() > 0 and (got_q[1] != got_q[0]).any()  # real, distinct maps


def test_pairs_run_explains_each_named_image_once(data, runs):
    out, summaries = runs
    _, _, _, _, pairs = data
    named = set(pairs.column("query_id").to_pylist()) | set(pairs.column("match_id").to_pylist())
    results = pd.read_parquet(out / "pairs" / "results")
    assert sorted(results.image_id) == sorted(named)  # one results row per distinct image, no other image
    assert summaries["pairs"]["counts"]["manifest"] == len(named)
    assert summaries["pairs"]["counts"]["pairs"] == {"rows": 5, "ok": 4, "error": 1}
    assert not (out / "pairs" / "maps").exists()  # written for the pairs only, then removed


def test_bad_pairs_file_fails_before_any_model_work(data, tmp_path):
    root, manifest, checkpoint, _, _ = data
    pq.write_table(pa.table({"query_id": ["c000_0000", "nope", "c000_0001"], "match_id": ["c000_0001"] * 2 + ["x"]}),
                   tmp_path / "unknown.parquet")
    pq.write_table(pa.table({"query_id": ["c000_0000"]}), tmp_path / "half.parquet")
    for name, message in (("unknown", r"2 id\(s\) not in the manifest, e.g. row 1 query_id 'nope', row 2 match_id"),
                          ("half", "required column 'match_id' is missing")):
        cfg = ExplainConfig(manifest=str(manifest), out=str(tmp_path / name), checkpoint=str(checkpoint),
                            pairs=str(tmp_path / f"{name}.parquet"))
        with pytest.raises(PairsError, match=message):
            run_explain(cfg, progress=False)
        assert not (tmp_path / name).exists()


def test_maps_round_trip_and_float16_storage(tmp_path):
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 4, 2, 5)).astype(np.float32)
    batch = {"image_id": np.array(["a", "b", "c"], object), "status": np.array(["ok", "error", "ok"], object),
             "error": np.array([None, "image: broken", None], object), "maps": maps,
             "embedding": rng.normal(size=(3, 4)).astype(np.float32)}
    for dtype in ("float16", "float32"):
        run = RunFolder(str(tmp_path / dtype))
        run.write_table(maps_table(batch, dtype), "maps", "part-000000000000-000000000003.parquet")
        piece = read_maps_piece(run.piece_paths("maps")[0])
        expected = maps.astype(dtype).astype(np.float32)
        np.testing.assert_array_equal(piece["maps"][[0, 2]], expected[[0, 2]])
        assert not piece["maps"][1].any() and piece["error"][1] == "image: broken"
        store = MapStore(run)
        rows = store.rows(["c", "a"])
        np.testing.assert_array_equal(rows["maps"], expected[[2, 0]])
        np.testing.assert_array_equal(rows["embedding"], batch["embedding"][[2, 0]])


def test_explain_pairs_hand_computed(tmp_path):
    """A 2-channel, 1x2 map: heatmaps and cosine by hand."""
    run = RunFolder(str(tmp_path))
    maps = np.array([[[[1.0, -2.0]], [[0.5, 3.0]]], [[[2.0, 0.0]], [[-1.0, 1.0]]]], np.float32)  # (2, d=2, 1, 2)
    y = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
    batch = {"image_id": np.array(["q", "m"], object), "status": np.array(["ok", "ok"], object),
             "error": np.array([None, None], object), "maps": maps, "embedding": y}
    run.write_table(maps_table(batch, "float32"), "maps", "part-000000000000-000000000002.parquet")
    rows = explain_pairs(pa.table({"query_id": ["q"], "match_id": ["m"], "k": [7]}), MapStore(run)).to_pylist()[0]
    # query against normalise(y_m) = (1, 0): channel 0 of E_q; match against (0.6, 0.8)
    assert rows["query_heatmap"] == [1.0, 0.0]
    np.testing.assert_allclose(rows["match_heatmap"], [max(0, 0.6 * 2 - 0.8), 0.8], rtol=1e-6)
    assert rows["cosine"] == pytest.approx(0.6) and rows["k"] == 7 and rows["status"] == "ok"


def random_maps_run(folder, rng):
    """A run folder whose stored maps (float32, 3 pieces of 4 images, image 7 failed) hold
    random values; returns it with the ids, maps and embeddings it holds, and 40 random pairs."""
    run = RunFolder(str(folder))
    ids = [f"img{i:02d}" for i in range(12)]
    maps = rng.normal(size=(12, 5, 2, 3)).astype(np.float32)
    y = rng.normal(size=(12, 5)).astype(np.float32)
    status = np.array(["ok"] * 12, object)
    status[7] = "error"
    for start in range(0, 12, 4):
        part = slice(start, start + 4)
        batch = {"image_id": np.array(ids[part], object), "status": status[part],
                 "error": np.array([None if s == "ok" else "image: bad" for s in status[part]], object),
                 "maps": maps[part], "embedding": y[part]}
        run.write_table(maps_table(batch, "float32"), "maps", f"part-{start:012d}-{start + 4:012d}.parquet")
    pairs = pa.table({"query_id": [ids[i] for i in rng.integers(0, 12, 40)],
                      "match_id": [ids[i] for i in rng.integers(0, 12, 40)]})
    return run, ids, maps, y, pairs


def test_pairs_are_the_same_for_any_block_and_chunk(tmp_path):
    """Maps spread over several pieces, pairs in random order: one block, many small blocks
    explained a chunk at a time (each chunk sweeping the maps) and a hand loop agree."""
    run, ids, maps, y, pairs = random_maps_run(tmp_path / "run", np.random.default_rng(3))
    store = MapStore(run)
    whole = explain_pairs(pairs, store).to_pandas()
    write_pairs(RunFolder(str(tmp_path / "out")), pairs, store, block_rows=3, chunk_bytes=2 * 6 * 4 * 7)
    pieces = pd.read_parquet(tmp_path / "out" / "pairs")
    assert len(list((tmp_path / "out" / "pairs").glob("part-*"))) == 14
    pd.testing.assert_frame_equal(pieces, whole)
    unit = y / np.linalg.norm(y, axis=1, keepdims=True)
    for row in whole.itertuples():
        qi, mi = ids.index(row.query_id), ids.index(row.match_id)
        if 7 in (qi, mi):
            assert row.status == "error" and "image failed: image: bad" in row.error
            continue
        expected = np.maximum(np.einsum("dhw,d->hw", maps[qi], unit[mi]), 0).ravel()
        np.testing.assert_allclose(row.query_heatmap, expected, rtol=1e-5, atol=1e-6)
        expected = np.maximum(np.einsum("dhw,d->hw", maps[mi], unit[qi]), 0).ravel()
        np.testing.assert_allclose(row.match_heatmap, expected, rtol=1e-5, atol=1e-6)


def test_pairs_on_ray_are_one_sweeps_and_a_rerun_redoes_only_missing_blocks(ray_session, tmp_path):
    """The job's pairs pass, a Ray task per chunk of blocks with the map store handed over by
    the object store, writes what one sweep in this process writes; run again after a block
    is lost (a killed task), it writes that block only."""
    run, _, _, _, pairs = random_maps_run(tmp_path / "run", np.random.default_rng(4))
    whole = explain_pairs(pairs, MapStore(run)).to_pandas()
    assert pairs_on_ray(run, pairs, block_rows=3) == 40
    folder = tmp_path / "run" / "pairs"
    written = {p.name: p.stat().st_mtime_ns for p in folder.glob("part-*.parquet")}
    assert len(written) == 14  # blocks of 3 rows; CHUNKS_PER_CPU chunks per CPU: several tasks
    pd.testing.assert_frame_equal(pd.read_parquet(folder), whole)
    lost = sorted(written)[5]
    (folder / lost).unlink()
    assert pairs_on_ray(run, pairs, block_rows=3) == 3
    again = {p.name: p.stat().st_mtime_ns for p in folder.glob("part-*.parquet")}
    assert again.keys() == written.keys() and {n for n in again if again[n] != written[n]} == {lost}
    pd.testing.assert_frame_equal(pd.read_parquet(folder), whole)
    assert pairs_on_ray(run, pairs, block_rows=3) == 0  # nothing left: no task at all


def test_map_store_finds_ids_and_refuses_unknown_ones(tmp_path):
    run, ids, _, y, _ = random_maps_run(tmp_path / "run", np.random.default_rng(5))
    store = MapStore(run)
    assert store.where(["img11", "img00", "img07"]).tolist() == [11, 0, 7]
    assert "img03" in store and "img99" not in store
    assert store.ok.tolist() == [i != 7 for i in range(12)] and store.error(np.array([7, 0])).tolist() == [
        "image: bad", None]
    np.testing.assert_array_equal(store.embedding[[1, 9]], y[[1, 9]])
    with pytest.raises(KeyError, match="'img99' has no stored maps"):
        store.where(["img01", "img99"])


def test_read_pairs_rejects_nulls_and_clashes(tmp_path):
    pq.write_table(pa.table({"query_id": ["a", None], "match_id": ["b", "c"]}), tmp_path / "nulls.parquet")
    with pytest.raises(PairsError, match=r"'query_id' is null at 1 row\(s\), e.g. rows 1"):
        read_pairs(str(tmp_path / "nulls.parquet"))
    pq.write_table(pa.table({"query_id": ["a"], "match_id": ["b"], "cosine": [1.0]}), tmp_path / "clash.parquet")
    with pytest.raises(PairsError, match="cosine would be overwritten"):
        read_pairs(str(tmp_path / "clash.parquet"))
    pq.write_table(pa.table({"query_id": [1], "match_id": [2]}), tmp_path / "ints.parquet")
    with pytest.raises(PairsError, match="has type int64, expected string"):
        read_pairs(str(tmp_path / "ints.parquet"))


def _float16_bound(run_dir, image_ids, bank, labels):
    """Per cell: sum_k |p_k| |E_k| * 2^-11 (|E16| for |E|, one more roundoff for that), the
    largest change float16 storage can make to E . p before the ReLU (which cannot enlarge it)."""
    store = MapStore(RunFolder(str(run_dir)))
    maps = store.rows(list(image_ids))["maps"]
    p = np.stack([bank[label] for label in labels])
    return np.einsum("bdhw,bd->bhw", np.abs(maps), np.abs(p)) * FP16_EPS * (1 + FP16_EPS)


def test_reexplain_equals_a_model_run_within_float16_rounding(data, runs, tmp_path):
    root = data[0]
    out, _ = runs
    bank = {r["label"]: np.array(r["proxy"]) for r in pq.read_table(root / "bank.parquet").to_pylist()}
    model_run = pd.read_parquet(out / "bank" / "results").set_index("image_id").sort_index()
    ok = model_run.status == "ok"
    h, w = int(model_run.heatmap_height[ok].iloc[0]), int(model_run.heatmap_width[ok].iloc[0])
    expected = np.stack(model_run.heatmap[ok]).reshape(-1, h, w)
    for dtype in ("float16", "float32"):
        maps_run = out / ("maps16" if dtype == "float16" else "bank")
        summary = reexplain(str(maps_run), str(tmp_path / dtype), proxies=str(root / "bank.parquet"),
                            log=lambda line: None)
        got = pd.read_parquet(tmp_path / dtype / "results").set_index("image_id").sort_index()
        assert (got.status == model_run.status).all() and summary["counts"]["ok"] == int(ok.sum())
        heat = np.stack(got.heatmap[ok]).reshape(-1, h, w)
        top = float(expected.max())
        if dtype == "float32":
            np.testing.assert_allclose(heat, expected, rtol=1e-4, atol=1e-6 * top)
        else:
            bound = _float16_bound(out / "maps16", got.index[ok], bank, got.label[ok])
            assert (np.abs(heat - expected) <= bound + 1e-6 * top).all()
            assert np.abs(heat - expected).max() > 0  # float16 really was stored
        np.testing.assert_allclose(got.cosine[ok], model_run.cosine[ok], rtol=1e-5, atol=1e-6)
        for column in ("ratio_bbox", "ratio_mask"):
            np.testing.assert_allclose(got[column][ok], model_run[column][ok], atol=2e-3)
    assert (tmp_path / "float16" / "_SUCCESS").exists() and (tmp_path / "float16" / "proxies.parquet").exists()


def test_reexplain_pairs_from_float16_maps_and_resume(data, runs, tmp_path):
    root = data[0]
    out, _ = runs
    new = tmp_path / "new"
    assert cli_main(["reexplain", str(out / "maps16"), "--pairs", str(root / "pairs.parquet"),
                     "--out", str(new)]) == 0
    got = pd.read_parquet(new / "pairs")
    exact = pd.read_parquet(out / "pairs" / "pairs")
    assert got.status.tolist() == exact.status.tolist() and got.source.tolist() == exact.source.tolist()
    ok = exact.status == "ok"
    np.testing.assert_allclose(np.stack(got.query_heatmap[ok]), np.stack(exact.query_heatmap[ok]),
                               atol=2e-3 * float(np.stack(exact.query_heatmap[ok]).max()))
    np.testing.assert_allclose(got.cosine[ok], exact.cosine[ok], rtol=1e-6)  # embeddings are stored in float32
    # resume: a lost pairs piece is recomputed, the rest kept
    piece = next((new / "pairs").glob("part-*.parquet"))
    piece.unlink()
    (new / "_SUCCESS").unlink()
    reexplain(str(out / "maps16"), str(new), pairs=str(root / "pairs.parquet"), log=lambda line: None)
    pd.testing.assert_frame_equal(pd.read_parquet(new / "pairs"), got)


def test_reexplain_refuses_runs_without_maps_and_wrong_banks(data, runs, tmp_path, capsys):
    root = data[0]
    out, _ = runs
    assert cli_main(["reexplain", str(out / "pairs"), "--proxies", str(root / "bank.parquet"),
                     "--out", str(tmp_path / "a")]) == 2
    assert "keeps no E maps: explain it with --keep-maps" in capsys.readouterr().err
    pq.write_table(pa.table({"label": ["x"], "proxy": [[1.0, 0.0]]}), tmp_path / "short.parquet")
    with pytest.raises(ValueError, match="proxy bank's vectors have 2 values, the embeddings of run .* have 16"):
        reexplain(str(out / "maps16"), str(tmp_path / "b"), proxies=str(tmp_path / "short.parquet"))
    with pytest.raises(ValueError, match="nothing to do"):
        reexplain(str(out / "maps16"), str(tmp_path / "c"))


def test_make_pairs_then_explain_pairs_then_report(data, runs, tmp_path):
    """The whole route a user takes: neighbours from a run, explain them, the report's page."""
    from conftest import HtmlPage

    root, manifest, checkpoint, _, _ = data
    out, _ = runs
    pairs_file = tmp_path / "nn.parquet"
    assert cli_main(["make-pairs", str(out / "maps16"), "--out", str(pairs_file), "--neighbours", "2"]) == 0
    nn = pq.read_table(pairs_file).to_pandas()
    assert len(nn) == 2 * 9 and set(nn.columns) >= {"query_id", "match_id", "rank", "neighbour_cosine"}
    summary = run_explain(ExplainConfig(manifest=str(manifest), out=str(tmp_path / "run"), checkpoint=str(checkpoint),
                                        pairs=str(pairs_file), batch_size=4), progress=False)
    assert summary["counts"]["pairs"] == {"rows": 18, "ok": 18, "error": 0}
    got = pd.read_parquet(tmp_path / "run" / "pairs")
    np.testing.assert_allclose(got.cosine, got.neighbour_cosine, rtol=1e-5, atol=1e-6)  # the same two images
    assert cli_main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report"), "--pairs-shown", "4"]) == 0
    page = HtmlPage()
    page.feed((tmp_path / "report" / "report.html").read_text())
    text = " ".join(page.text)
    lowest = got.sort_values("cosine").iloc[0]
    assert lowest.query_id in text and lowest.match_id in text
    pair_images = [s for s in page.sources if "pairs" in s]
    assert len(pair_images) >= 4 and all((tmp_path / "report" / s).exists() for s in page.sources)
