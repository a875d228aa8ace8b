"""Tests for embcam.results (and `embcam show`): hand-made runs with hand-computed values,
independent references (torch's bilinear interpolate, scipy's entropy, the EXIF rotation),
proof that heavy columns are never decoded, and one real explain run shared by the
end-to-end tests of `embcam show` and of the catalog report on a run without boxes."""

import importlib
import io
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from scipy.stats import entropy

from embcam.cli import DEMO_MODEL
from embcam.cli import main as cli_main
from embcam.data.locations import safe_name
from embcam.data.runstate import ManifestCopy, RunFolder
from embcam.data.schemas import conform
from embcam.datasets import generate_dataset
from embcam.results import (
    HEAVY_COLUMNS,
    describe,
    heat_spread,
    heatmap,
    iou_sweep_thresholds,
    open_results,
    overlay,
    read_frame,
    read_row,
    read_rows,
    spreads,
    summarise,
    upsample,
)

from conftest import HtmlPage

HOSTILE_LABEL = "<script>alert(1)</script>"
HOSTILE_ID = 'we"ird&id'


# --- hand-made runs ---------------------------------------------------------------------------


def corrupt_columns(path: Path, columns: set[str], keep_row_groups: set[int] = frozenset()) -> None:
    """Overwrite the bytes of ``columns`` in every row group but ``keep_row_groups`` with
    garbage: reading them fails, reading anything else does not."""
    meta = pq.ParquetFile(path).metadata
    data = bytearray(path.read_bytes())
    for g in set(range(meta.num_row_groups)) - set(keep_row_groups):
        for c in range(meta.num_columns):
            chunk = meta.row_group(g).column(c)
            if chunk.path_in_schema.split(".")[0] in columns:
                start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
                data[start:start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(data))


def result_row(i: int, **extra) -> dict:
    """Row ``i``: a 3x4 heatmap whose value at (r, c) is 12 i + 4 r + c (so row-major order
    can be read off), an 8-float embedding, an image of 8x6 pixels."""
    row = dict(image_id=f"img{i}", label="ab"[i % 2], split="eval", status="ok", error=None,
               width=8, height=6, proxy_kind="mean", cosine=0.5 + i / 16,
               embedding=[float(i)] * 8, heatmap=[12.0 * i + k for k in range(12)],
               heatmap_height=3, heatmap_width=4, heatmap_topk=[1.0] * 12, degenerate=False,
               ratio_bbox=None, pred_bbox_x0=2.0, pred_bbox_y0=1.0, pred_bbox_x1=6.0, pred_bbox_y1=5.0)
    row.update(extra)
    return row


def write_images(root: Path, count: int) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cv2.imwrite(str(root / "images" / f"img{i}.png"), np.full((6, 8, 3), 10 * i, np.uint8))


def make_run(run: Path, rows: list[dict], manifest_rows: list[dict], *, copy: bool = True,
             config: dict | None = None, row_group_size: int = 2) -> Path:
    """A run folder as the job leaves it: results in one file of small row groups, the
    manifest copy (``ManifestCopy``, the job's own writer) unless ``copy`` is False, and a
    summary.json with ``config``."""
    (run / "results").mkdir(parents=True)
    pq.write_table(conform(rows, "results"), run / "results" / "part-000000000000-000000000010.parquet",
                   row_group_size=row_group_size)
    if copy:
        writer = ManifestCopy(RunFolder(str(run)), block_rows=2)
        writer.write(conform(manifest_rows, "manifest"))
        writer.close()
    (run / "summary.json").write_text(json.dumps({"config": config or {}}))
    return run


def manifest_row(i: int, box=None) -> dict:
    box = box or (None,) * 4
    return dict(image_id=f"img{i}", uri=f"images/img{i}.png", label="ab"[i % 2], split="eval",
                bbox_x0=box[0], bbox_y0=box[1], bbox_x1=box[2], bbox_y1=box[3])


@pytest.fixture()
def run(tmp_path):
    write_images(tmp_path, 6)
    rows = [result_row(i) for i in range(5)] + [
        dict(image_id="bad", label="a", status="error", error="image: FileNotFoundError: gone",
             proxy_kind="mean")]
    manifest = [manifest_row(i, (1.0, 1.0, 5.0, 4.0) if i == 1 else None) for i in range(5)]
    return make_run(tmp_path / "run", rows, manifest + [dict(manifest_row(0), image_id="bad")],
                    config={"manifest": str(tmp_path / "gone.parquet"), "image_root": str(tmp_path)})


def test_open_results_leaves_the_vectors_out_and_pushes_filters_down(run):
    everything = pd.read_parquet(run / "results").set_index("image_id")
    light = open_results(run).to_table().to_pandas().set_index("image_id")
    assert not set(HEAVY_COLUMNS) & set(light.columns)
    assert set(light.columns) == set(everything.columns) - set(HEAVY_COLUMNS)
    pd.testing.assert_frame_equal(light, everything[light.columns])
    assert open_results(run / "results").count_rows() == 6  # the results folder itself

    shoes = open_results(run, columns=["image_id", "cosine"], filter=pc.field("label") == "b")
    assert shoes.schema.names == ["image_id", "cosine", "label"]  # the filter's column comes along
    assert shoes.to_table().column("image_id").to_pylist() == ["img1", "img3"]
    assert open_results(run, columns=["heatmap"]).to_table().column("heatmap")[0].as_py() == \
        [float(k) for k in range(12)]

    with pytest.raises(ValueError, match="no column.*nope"):
        open_results(run, columns=["image_id", "nope"])
    with pytest.raises(ValueError, match="does not apply"):
        open_results(run, filter=pc.field("nope") == 1)
    with pytest.raises(FileNotFoundError, match="no results here"):
        open_results(run / "elsewhere")


def test_heavy_columns_are_never_decoded_unless_asked(run):
    """img3 sits in row group 1 (rows 2, 3): every other row group's vectors are garbage."""
    path = next((run / "results").glob("*.parquet"))
    corrupt_columns(path, set(HEAVY_COLUMNS), keep_row_groups={1})
    with pytest.raises((OSError, pa.ArrowException)):  # the garbage is real
        pq.read_table(path, columns=["heatmap"])
    assert open_results(run).to_table().num_rows == 6
    assert open_results(run, filter=pc.field("cosine") > 0.6).to_table().column("image_id").to_pylist() \
        == ["img2", "img3", "img4"]
    row = read_row(run, "img3")
    np.testing.assert_array_equal(heatmap(row), 36 + np.arange(12, dtype=np.float32).reshape(3, 4))
    assert row["embedding"] == [3.0] * 8


def test_read_rows_joins_the_manifest_copy(run, tmp_path):
    rows = read_rows(run, ["img1", "img4", "nobody"], columns=["status", "width"])
    assert sorted(rows) == ["img1", "img4"]
    assert rows["img1"] == {"image_id": "img1", "status": "ok", "width": 8,
                            "uri": str(tmp_path / "images" / "img1.png"),
                            "bbox_x0": 1.0, "bbox_y0": 1.0, "bbox_x1": 5.0, "bbox_y1": 4.0}
    assert rows["img4"]["bbox_x0"] is None
    moved = read_row(run, "img4", image_root="/new/place")
    assert moved["uri"] == "/new/place/images/img4.png"
    with pytest.raises(ValueError, match="'nobody' is not in the results"):
        read_row(run, "nobody")


def test_old_runs_without_a_manifest_copy_use_the_configured_manifest(tmp_path):
    write_images(tmp_path, 2)
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(conform([manifest_row(0), manifest_row(1, (0.0, 0.0, 4.0, 3.0))], "manifest"), manifest)
    run = make_run(tmp_path / "old", [result_row(0), result_row(1)], [], copy=False,
                   config={"manifest": str(manifest), "image_root": None})
    row = read_row(run, "img1")  # image root: the manifest's folder, as the job's default
    assert row["uri"] == str(tmp_path / "images" / "img1.png") and row["bbox_x1"] == 4.0
    gone = make_run(tmp_path / "gone", [result_row(0)], [], copy=False,
                    config={"manifest": str(tmp_path / "nope.parquet")})
    with pytest.raises(FileNotFoundError, match="manifest .*nope.parquet not found"):
        read_row(gone, "img0")
    assert read_rows(gone, ["img0"], manifest=False)["img0"]["cosine"] == 0.5


def test_relative_paths_in_the_config_are_the_jobs(tmp_path, monkeypatch):
    """`embcam explain --manifest data/m.parquet --out runs/r` run in tmp_path keeps both paths
    relative in its config; they resolve against the folder the job ran in, from anywhere."""
    write_images(tmp_path / "data", 1)
    pq.write_table(conform([manifest_row(0)], "manifest"), tmp_path / "data" / "m.parquet")
    config = {"manifest": "data/m.parquet", "out": "runs/r", "image_root": None}
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for name, copy in (("r", True), ("old", False)):
        make_run(tmp_path / "runs" / name, [result_row(0)], [manifest_row(0)], copy=copy,
                 config=dict(config, out=f"runs/{name}"))
        row = read_row(f"../runs/{name}", "img0")
        assert row["uri"] == str(tmp_path / "data" / "images" / "img0.png")
        assert overlay(row).shape == (6, 16, 3)


def test_heatmap_from_any_kind_of_row(run):
    expected = 24 + np.arange(12, dtype=np.float32).reshape(3, 4)  # row-major: (r, c) -> 4 r + c
    table = pq.read_table(run / "results")
    frame = table.to_pandas().set_index("image_id", drop=False)
    as_dict = read_row(run, "img2")
    for row in (as_dict, frame.loc["img2"], table.slice(2, 1), table.to_struct_array()[2]):
        out = heatmap(row)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="'bad' has no heatmap .status error: image: FileNotFoundError"):
        heatmap(read_row(run, "bad"))
    light = open_results(run).to_table().to_pandas().iloc[0]
    with pytest.raises(ValueError, match="no column 'heatmap'.*read_row"):
        heatmap(light)
    with pytest.raises(ValueError, match="12 values, heatmap_height x heatmap_width = 5 x 4"):
        heatmap(dict(as_dict, heatmap_height=5))


def test_upsample_is_torch_bilinear_without_corner_alignment(run):
    row = read_row(run, "img1")
    raw = torch.tensor(row["heatmap"], dtype=torch.float64).reshape(1, 1, 3, 4)
    for size in (None, (37, 23), (2, 1)):
        width, height = size or (row["width"], row["height"])
        expected = torch.nn.functional.interpolate(raw, size=(height, width), mode="bilinear",
                                                   align_corners=False)[0, 0].numpy()
        out = upsample(row, size)
        assert out.shape == (height, width) and out.dtype == np.float64
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="width, height"):
        upsample(row, (0, 4))


def test_heat_spread_is_the_normalised_entropy():
    rng = np.random.default_rng(0)
    maps = [rng.random((3, 4)), rng.random((7, 7)) * (rng.random((7, 7)) > 0.5), rng.random((1, 2))]
    for m in maps:
        assert heat_spread(m) == pytest.approx(entropy(m.ravel()) / np.log(m.size), abs=1e-14)
    one = np.zeros((4, 4))
    one[1, 2] = 3.0
    assert heat_spread(one) == 0.0
    assert heat_spread(np.full((5, 3), 0.25)) == pytest.approx(1.0, abs=1e-15)
    assert heat_spread(np.zeros((2, 2))) is None and heat_spread(np.ones((1, 1))) is None
    assert heat_spread(np.array([[1.0, np.inf]])) is None
    batch = spreads(np.concatenate([m.ravel() for m in maps]), np.array([m.size for m in maps]))
    np.testing.assert_array_equal(batch, [heat_spread(m) for m in maps])


def oriented_png(stored: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    sink = io.BytesIO()
    Image.fromarray(stored).save(sink, "PNG", exif=exif)
    return sink.getvalue()


def test_overlay_shows_the_image_as_displayed_with_both_boxes(tmp_path):
    """A PNG stored 8 wide x 6 high with EXIF orientation 6 is shown 6 wide x 8 high (turned
    90 degrees clockwise); results, boxes and overlay are on the displayed grid."""
    stored = np.zeros((6, 8, 3), np.uint8)
    stored[:, :, 0] = np.arange(8) * 30            # red grows to the right as stored
    stored[:, :, 1] = (np.arange(6) * 40)[:, None]  # green grows downwards as stored
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "img0.png").write_bytes(oriented_png(stored, 6))
    peak = [0.0] * 12
    peak[0] = 1.0  # the heat sits in the top-left cell
    row = result_row(0, width=6, height=8, heatmap=peak, pred_bbox_x0=1.0, pred_bbox_y0=2.0,
                     pred_bbox_x1=4.0, pred_bbox_y1=6.0)
    run = make_run(tmp_path / "run", [row], [manifest_row(0, (2.0, 3.0, 6.0, 8.0))],
                   config={"image_root": str(tmp_path)})
    picture = overlay(read_row(run, "img0"))
    displayed = np.rot90(stored, -1)
    assert picture.shape == (8, 12, 3) and picture.dtype == np.uint8
    np.testing.assert_array_equal(picture[:, :6], displayed)
    # right: JET (in RGB) of the min-max map blended at 0.5: 1 at pixel (0, 0) only (bilinear,
    # half-pixel centres), 0 at (7, 0); predicted box (1, 2)..(3, 5) red, ground truth (2, 3)..(5, 7) green
    jet = cv2.applyColorMap(np.array([[255, 0]], np.uint8), cv2.COLORMAP_JET)[0, :, ::-1]
    for (y, x), colour in (((0, 0), jet[0]), ((7, 0), jet[1])):
        assert picture[y, 6 + x].tolist() == [round(0.5 * a + 0.5 * b) for a, b in zip(displayed[y, x], colour)]
    assert picture[2, 6 + 1].tolist() == [255, 0, 0] and picture[5, 6 + 3].tolist() == [255, 0, 0]
    assert picture[3, 6 + 2].tolist() == [0, 200, 0] and picture[7, 6 + 5].tolist() == [0, 200, 0]
    # a row joined by hand: relative uri + image_root
    mine = dict(heatmap=peak, heatmap_height=3, heatmap_width=4, width=6, height=8, uri="images/img0.png")
    np.testing.assert_array_equal(overlay(mine, image_root=str(tmp_path))[:, :6], displayed)
    with pytest.raises(ValueError, match="is 6x8 but the results say 8x6"):
        overlay(dict(mine, width=8, height=6), image_root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="img9.png not found"):
        overlay(dict(mine, uri="images/img9.png"), image_root=str(tmp_path))


def test_describe_lists_the_key_numbers(run):
    text = describe(read_row(run, "img1"))
    lines = dict(line.split(None, 1) for line in text.splitlines())
    assert lines["image_id"] == "img1" and lines["status"] == "ok" and lines["cosine"] == "0.5625"
    assert lines["bbox"] == "1, 1, 5, 4" and lines["pred_bbox"] == "2, 1, 6, 5"
    assert lines["ratio_bbox"] == "—"
    expected = entropy(np.arange(12.0, 24.0)) / np.log(12)
    assert lines["heat_spread"] == f"{expected:.4f}"
    failed = dict(line.split(None, 1) for line in describe(read_row(run, "bad")).splitlines())
    assert failed["status"] == "error" and failed["error"] == "image: FileNotFoundError: gone"


# --- one real explain run, shared ------------------------------------------------------------


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, ray_session):
    """`embcam explain --proxy mean` with the bundled demo model on 9 generated images without
    boxes or masks, one of them with a hostile id, two with a hostile label, and one
    missing file."""
    from embcam.job.pipeline import ExplainConfig, run_explain

    root = tmp_path_factory.mktemp("catalog")
    manifest = generate_dataset(root, num_classes=3, images_per_class=3, min_side=40, max_side=56, seed=7)
    rows = pq.read_table(manifest).select(["image_id", "uri", "label", "split"]).to_pylist()
    rows[0]["image_id"] = HOSTILE_ID
    rows[1]["label"] = rows[2]["label"] = HOSTILE_LABEL
    rows.append(dict(rows[3], image_id="missing", uri="images/none.jpg", label=HOSTILE_LABEL))
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    out = root / "run"
    run_explain(ExplainConfig(manifest=str(manifest), out=str(out), checkpoint=str(DEMO_MODEL),
                              proxy="mean", batch_size=8), progress=False)
    return out, root, pd.DataFrame(rows)


def test_real_run_rows(real_run):
    out, root, manifest = real_run
    everything = pd.read_parquet(out / "results").set_index("image_id").sort_index()
    light = open_results(out).to_table().to_pandas().set_index("image_id").sort_index()
    pd.testing.assert_frame_equal(light, everything.drop(columns=list(HEAVY_COLUMNS)))
    assert (everything.status == "ok").sum() == 9
    for image_id, uri in zip(manifest.image_id, manifest.uri):
        row = read_row(str(out), image_id)
        assert row["uri"] == str(root / uri) and row["bbox_x0"] is None
        if row["status"] == "ok":
            reference = everything.loc[image_id]
            np.testing.assert_array_equal(heatmap(row).ravel(), reference.heatmap)
            assert heatmap(row).shape == (reference.heatmap_height, reference.heatmap_width)


def test_show_writes_the_overlay_and_prints_the_numbers(real_run, tmp_path, capsys, monkeypatch):
    out, root, manifest = real_run
    image_id, uri = manifest.image_id[4], manifest.uri[4]
    target = tmp_path / "x.png"
    assert cli_main(["show", str(out), image_id, "--out", str(target)]) == 0
    printed = capsys.readouterr().out
    row = read_row(str(out), image_id)
    assert f"cosine          {row['cosine']:.4f}" in printed and f"overlay: {target}" in printed
    written = cv2.imread(str(target))[..., ::-1]
    np.testing.assert_array_equal(written, overlay(row))
    source = cv2.imread(str(root / uri))[..., ::-1]  # an independent decode of the image
    np.testing.assert_array_equal(written[:, :source.shape[1]], source)

    monkeypatch.chdir(tmp_path)  # default name: the image_id, made safe
    assert cli_main(["show", str(out), HOSTILE_ID]) == 0
    assert (tmp_path / (safe_name(HOSTILE_ID) + ".png")).is_file() and '"' not in safe_name(HOSTILE_ID)
    capsys.readouterr()
    assert cli_main(["show", str(out), "missing", "--out", str(tmp_path / "m.png")]) == 0
    printed = capsys.readouterr().out
    assert "status          error" in printed and "none.jpg" in printed and "overlay:" not in printed
    assert not (tmp_path / "m.png").exists()


@pytest.mark.parametrize("where, what", [("run", "nobody"), ("elsewhere", "img0")])
def test_show_refuses_unknown_runs_and_ids_in_one_line(real_run, tmp_path, capsys, where, what):
    out = real_run[0] if where == "run" else tmp_path / "elsewhere"
    assert cli_main(["show", str(out), what]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert ("'nobody' is not in the results" in err) if where == "run" else ("no results here" in err)


def test_catalog_report_of_a_run_without_boxes(real_run, tmp_path, capsys, monkeypatch):
    out, root, manifest = real_run
    # every cosine "stands out" (the gallery's rule, tested in test_report), so that the
    # gallery is each label's lowest, whatever this small model's cosines are
    monkeypatch.setattr(importlib.import_module("embcam.report.catalog"), "STANDOUT_GAP", -1.0)
    report_dir = tmp_path / "report"
    assert cli_main(["report", str(out), "--out", str(report_dir), "--gallery", "2", "--markdown"]) == 0
    assert capsys.readouterr().out == (report_dir / "report.md").read_text() + "\n"
    report = json.loads((report_dir / "report.json").read_text())
    assert report["table1"] is None and not (report_dir / "sweep.png").exists()
    assert "Table 1 (annotated metrics): not shown" in (report_dir / "report.md").read_text()
    (entry,) = report["catalog"]

    # per label, against pandas on the whole results
    df = pd.read_parquet(out / "results")
    ok = df[df.status == "ok"]
    for item in entry["labels"]:
        rows, oks = df[df.label == item["label"]], ok[ok.label == item["label"]]
        assert (item["images"], item["errors"]) == (len(rows), int((rows.status == "error").sum()))
        assert item["mean_cosine"] == pytest.approx(np.mean(oks.cosine.astype(np.float64)), rel=1e-12)
        lowest = oks.sort_values(["cosine", "image_id"]).iloc[0]
        assert (item["lowest_image_id"], item["lowest_cosine"]) == (lowest.image_id, float(lowest.cosine))
    assert sorted(i["label"] for i in entry["labels"]) == sorted(df.label.unique())
    means = [i["mean_cosine"] for i in entry["labels"]]
    assert means == sorted(means)
    assert next(i for i in entry["labels"] if i["label"] == HOSTILE_LABEL)["errors"] == 1

    # the gallery: the 2 lowest-cosine images of each label (4 labels, up to 12 shown)
    expected = {lbl: list(g.sort_values(["cosine", "image_id"]).image_id[:2]) for lbl, g in ok.groupby("label")}
    shown = {}
    for item in entry["gallery"]["images"]:
        shown.setdefault(item["label"], []).append(item["image_id"])
        assert (report_dir / item["file"]).is_file()
    assert shown == expected and entry["outside_box"] is None

    # the histograms, against numpy and scipy on the stored values
    cos = entry["histograms"]["cosine"]
    assert cos["counts"] == np.histogram(ok.cosine.astype(np.float64), bins=20)[0].tolist()
    spread = entry["histograms"]["spread"]
    values = [entropy(np.asarray(h, np.float64)) / np.log(len(h)) for h in ok[~ok.degenerate.astype(bool)].heatmap]
    assert spread["counts"] == np.histogram(values, bins=20, range=(0, 1))[0].tolist()
    assert spread["n"] == len(values) and (report_dir / spread["file"]).is_file()

    # the page: parses, every image it shows exists, hostile values stay text
    raw = (report_dir / "report.html").read_text()
    page = HtmlPage()
    page.feed(raw)
    page.close()
    assert "script" not in page.tags and page.sources
    assert all((report_dir / src).is_file() for src in page.sources)
    text = "".join(page.text)
    assert HOSTILE_LABEL in text and HOSTILE_ID in text and "none.jpg" in text
    assert HOSTILE_LABEL not in raw and HOSTILE_ID not in raw
    assert "&lt;script&gt;" in raw and "we&quot;ird&amp;id" in raw


@pytest.mark.slow  # a subprocess
def test_reading_results_does_not_import_torch():
    """`embcam.results`, the report and the CLI's entry point read runs without loading
    torch (1 GB and seconds of import); `from embcam import EmbeddingCAM` still works."""
    code = ("import sys, embcam.results, embcam.report, embcam.cli; assert 'torch' not in sys.modules, 'torch'; "
            "from embcam import EmbeddingCAM, load_model; assert 'torch' in sys.modules; print(EmbeddingCAM.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "EmbeddingCAM", done.stderr


def test_a_run_without_boxes_is_summarised_by_its_cosines_and_errors(run):
    """No boxes or masks: the summary shows the mean cosine, the label with the lowest one,
    and the error rows with an example reason and the line that lists them (no n/a rows)."""
    from embcam.cli import format_summary

    counts, means = summarise(RunFolder(str(run)))
    cosines = {i: 0.5 + i / 16 for i in range(5)}  # result_row's; labels a (even i) and b (odd i)
    assert means["cosine"] == pytest.approx(np.mean(list(cosines.values())))
    a, b = np.mean([cosines[0], cosines[2], cosines[4]]), np.mean([cosines[1], cosines[3]])
    assert a == b  # a tie, which goes to the first label in sort order
    assert means["lowest_label_cosine"] == {"label": "a", "cosine": pytest.approx(a)}
    assert means["error_example"] == "image: FileNotFoundError: gone" and counts["error"] == 1
    summary = {"counts": dict(counts, resumed=0), "metrics": means, "wall_seconds": 1.0, "images_per_second": 6.0,
               "model": "m", "plan": "one-pass", "config": {"out": str(run), "top_k_channels": None, "proxy": "mean"}}
    text = format_summary(summary)
    assert "n/a" not in text
    assert f"mean cosine to the proxy {means['cosine']:.3f} (lowest label: a, " in text
    assert "1 error rows, e.g. 'image: FileNotFoundError: gone'; list them: python -c" in text


def test_read_frame_gives_2d_heatmaps_and_the_sweeps_thresholds(real_run, tmp_path):
    out, _, _ = real_run
    flat = pd.read_parquet(out / "results")
    frame = read_frame(out)
    assert list(frame.columns) == list(flat.columns) and len(frame) == len(flat) == 10
    for got, row in zip(frame.heatmap, flat.itertuples()):
        if row.status == "ok":
            assert got.shape == (row.heatmap_height, row.heatmap_width) and got.dtype == np.float32
            np.testing.assert_array_equal(got.ravel(), row.heatmap)
        else:
            assert got is None
    ok = read_frame(out, columns=["image_id", "heatmap"], filter=pc.field("status") == "ok")
    assert list(ok.columns) == ["image_id", "heatmap"] and len(ok) == 9 and all(h.ndim == 2 for h in ok.heatmap)
    # iou_sweep's thresholds travel in the files; results written before that get the job's
    assert iou_sweep_thresholds(out) == (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
    (tmp_path / "results").mkdir()
    for piece in (out / "results").glob("*.parquet"):
        pq.write_table(pq.read_table(piece).replace_schema_metadata(None), tmp_path / "results" / piece.name)
    assert not pq.read_schema(next((tmp_path / "results").glob("*.parquet"))).metadata
    assert iou_sweep_thresholds(tmp_path) == (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
