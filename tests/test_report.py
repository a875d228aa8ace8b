"""Tests for embcam.report: Table 1 numbers against hand-computed means/stds, the sweep,
exclusions and counts, the written files and the overlays.

Values are dyadic fractions (exact in float32), so the expected numbers are exact.
Three runs on one five-image manifest: A and B use the self proxy with top-2 channels,
C the mean proxy without top-k.
"""

import json

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embcam.data.schemas import conform
from embcam.report import main, overlay_panel, render_markdown, table1, write_report
from embcam.report.overlays import OVERLAY_TILE
from embcam.report.plot import draw_histogram
from embcam.results import TILE_BACKGROUND

from conftest import HtmlPage

W, H = 16, 12  # every test image
GT = {"img0": (4.0, 2.0, 12.0, 10.0), "img1": (0.0, 0.0, 8.0, 6.0)}
PEAK = [1.0] + [0.0] * 15  # 4x4 raw heatmap, maximum at the top-left cell


def ok_row(image_id, **metrics):
    row = dict(image_id=image_id, label="c0", split="eval", status="ok", error=None,
               width=W, height=H, proxy_kind="self", heatmap=PEAK, heatmap_height=4,
               heatmap_width=4, degenerate=False, pred_bbox_x0=0.0, pred_bbox_y0=0.0,
               pred_bbox_x1=8.0, pred_bbox_y1=6.0)
    row.update(metrics)
    return row


def error_row(image_id, **extra):
    row = dict(image_id=image_id, split="eval", status="error", error="decode: boom",
               proxy_kind="self")
    row.update(extra)
    return row


def sweep(*values):
    assert len(values) == 8
    return list(values)


RUN_A = [  # self proxy, model 1
    ok_row("img0", ratio_bbox=0.5, ratio_mask=0.5, uniform_bbox=0.25, uniform_mask=0.125,
           ratio_bbox_topk=0.25, ratio_mask_topk=0.5, iou=0.75, loc_correct=True,
           iou_sweep=sweep(0.25, 0.375, 0.625, 0.75, 0.75, 0.5, 0.375, 0.25)),
    ok_row("img1", ratio_bbox=0.75, uniform_bbox=0.5, ratio_bbox_topk=0.5, iou=0.375,
           loc_correct=False,  # no mask: mask metrics null
           iou_sweep=sweep(0.625, 0.625, 0.625, 0.375, 0.25, 0.25, 0.125, 0.125)),
    # degenerate: heatmap metrics null, the uniform baseline stays set and must not count
    ok_row("img2", degenerate=True, uniform_bbox=1.0, uniform_mask=1.0, heatmap=[0.0] * 16,
           pred_bbox_x0=None, pred_bbox_y0=None, pred_bbox_x1=None, pred_bbox_y1=None),
    # a failed row that still carries a value: the report must ignore it
    error_row("img3", ratio_bbox=0.0, uniform_bbox=0.0, loc_correct=True),
    ok_row("img4"),  # no annotation at all: every metric null
]
RUN_B = [  # self proxy, model 2
    ok_row("img0", ratio_bbox=0.75, ratio_mask=0.25, uniform_bbox=0.25, uniform_mask=0.125,
           ratio_bbox_topk=0.5, ratio_mask_topk=0.25, iou=0.625, loc_correct=True,
           iou_sweep=sweep(*[0.625] * 8)),
    ok_row("img1", ratio_bbox=1.0, ratio_mask=0.75, uniform_bbox=0.25, uniform_mask=0.25,
           ratio_bbox_topk=0.5, iou=0.25, loc_correct=False,
           iou_sweep=sweep(0.125, 0.25, 0.375, 0.25, 0.5, 0.625, 0.75, 0.875)),
    ok_row("img2", split="train"), ok_row("img3", split="train"), ok_row("img4", split="train"),
]
RUN_C = [  # mean proxy, one model, no top-k
    ok_row("img0", proxy_kind="mean", ratio_bbox=0.625, ratio_mask=0.375, uniform_bbox=0.25,
           uniform_mask=0.125, iou=0.75, loc_correct=True, iou_sweep=sweep(*[0.75] * 8)),
    error_row("img1", proxy_kind="mean"),
]


def write_images(root):
    """Grey 16x12 PNGs img0..img4 and a manifest with boxes for img0 and img1."""
    (root / "images").mkdir()
    rows = []
    for i in range(5):
        image_id = f"img{i}"
        cv2.imwrite(str(root / "images" / f"{image_id}.png"), np.full((H, W, 3), 128, np.uint8))
        box = GT.get(image_id, (None,) * 4)
        rows.append(dict(image_id=image_id, uri=f"images/{image_id}.png", label="c0",
                         bbox_x0=box[0], bbox_y0=box[1], bbox_x1=box[2], bbox_y1=box[3],
                         mask_uri=None, split="eval"))
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
    return root / "manifest.parquet"


def write_run(path, rows, proxy, *, top_k=None, manifest=None, image_root=None, files=2):
    """A run directory as the explain job writes it (rows spread over ``files`` files)."""
    (path / "results").mkdir(parents=True)
    for i in range(files):
        part = rows[i::files]
        if part:
            pq.write_table(conform(part, "results"), path / "results" / f"part-{i}.parquet")
    config = {"proxy": proxy, "model": "torchvision:resnet18+linear:8", "checkpoint": None,
              "top_k_channels": top_k, "image_root": image_root,
              "manifest": None if manifest is None else str(manifest)}
    (path / "summary.json").write_text(json.dumps({"config": config}))
    return str(path)


@pytest.fixture()
def runs(tmp_path):
    manifest = write_images(tmp_path)
    root = str(tmp_path)
    return [write_run(tmp_path / "a", RUN_A, "self", top_k=2, manifest=manifest, image_root=root),
            write_run(tmp_path / "b", RUN_B, "self", top_k=2, manifest=manifest, image_root=root),
            write_run(tmp_path / "c", RUN_C, "mean", manifest=manifest)]  # root: manifest dir


def by_key(table):
    return {m["key"]: m for m in table["methods"]}


def test_table_means_and_stds_across_runs(runs):
    table = table1(runs)
    methods = by_key(table)
    assert list(methods) == ["self", "mean"]
    s, c = methods["self"], methods["mean"]
    assert s["name"] == "EmbeddingCAM (self proxy)" and s["n_runs"] == 2 and s["top_k"] == 2
    assert table["top_k"] == 2
    # (per-run means), mean, population std
    expected = {
        ("bbox", "uniform"): ([0.375, 0.25], 0.3125, 0.0625),
        ("bbox", "all"): ([0.625, 0.875], 0.75, 0.125),
        ("bbox", "topk"): ([0.375, 0.5], 0.4375, 0.0625),
        ("mask", "uniform"): ([0.125, 0.1875], 0.15625, 0.03125),
        ("mask", "all"): ([0.5, 0.5], 0.5, 0.0),
        ("mask", "topk"): ([0.5, 0.25], 0.375, 0.125),
    }
    for (region, col), (per_run, mean, std) in expected.items():
        stat = s["rows"][region][col]
        assert stat["per_run"] == per_run, (region, col)
        assert (stat["mean"], stat["std"], stat["n_runs"]) == (mean, std, 2), (region, col)
    assert s["rows"]["bbox"]["all"]["n_images"] == [2, 2]
    assert s["rows"]["mask"]["all"]["n_images"] == [1, 2]
    assert s["rows"]["mask"]["topk"]["n_images"] == [1, 1]
    assert (s["accuracy"]["mean"], s["accuracy"]["std"]) == (0.5, 0.0)

    # one run: std 0, n_runs 1; no top-k map: no value
    assert c["rows"]["bbox"]["all"] == {"mean": 0.625, "std": 0.0, "n_runs": 1,
                                        "per_run": [0.625], "n_images": [1]}
    assert c["rows"]["bbox"]["topk"]["mean"] is None and c["rows"]["bbox"]["topk"]["n_runs"] == 0
    assert c["accuracy"]["mean"] == 1.0


def test_excluded_rows_are_counted(runs):
    table = table1(runs)
    a, b, c = table["runs"]
    assert a["counts"] == {"images": 5, "ok": 4, "error": 1, "degenerate": 1, "evaluated": 3}
    assert b["counts"] == {"images": 5, "ok": 5, "error": 0, "degenerate": 0, "evaluated": 5}
    assert c["counts"] == {"images": 2, "ok": 1, "error": 1, "degenerate": 0, "evaluated": 1}
    # null metric on an evaluated row: skipped and counted
    assert a["values"]["ratio_bbox"] == {"value": 0.625, "n": 2, "skipped_null": 1}
    assert a["values"]["ratio_mask"] == {"value": 0.5, "n": 1, "skipped_null": 2}
    assert a["values"]["uniform_bbox"]["value"] == 0.375  # degenerate row's 1.0 left out
    assert a["values"]["accuracy"] == {"value": 0.5, "n": 2, "skipped_null": 1}
    assert b["values"]["ratio_mask_topk"] == {"value": 0.25, "n": 1, "skipped_null": 4}
    assert (a["method"], a["top_k"], c["top_k"]) == ("self", 2, None)


def test_threshold_sweep_and_best_over_t(runs):
    table = table1(runs)
    a, b, _ = table["runs"]
    assert [s["value"] for s in a["sweep"]] == [0.5, 0.5, 1.0, 0.5, 0.5, 0.5, 0.0, 0.0]
    assert [s["value"] for s in b["sweep"]] == [0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert a["sweep_best"] == {"value": 1.0, "threshold": 0.15, "n": 2}
    assert b["sweep_best"] == {"value": 1.0, "threshold": 0.25, "n": 2}  # first maximum
    s = by_key(table)["self"]["sweep"]
    assert [x["mean"] for x in s["accuracy"]] == [0.5, 0.5, 0.75, 0.5, 0.75, 0.75, 0.5, 0.5]
    assert [x["std"] for x in s["accuracy"]] == [0, 0, 0.25, 0, 0.25, 0.25, 0.5, 0.5]
    # best over t is per run (both reach 1.0), not the maximum of the mean curve (0.75)
    assert (s["best"]["mean"], s["best"]["std"], s["best_threshold"]) == (1.0, 0.0, [0.15, 0.25])
    # the sweep at t = 0.2 agrees with loc_correct
    assert a["sweep"][3]["value"] == a["values"]["accuracy"]["value"]


def test_wsol_columns_by_hand(runs):
    """MaxBoxAccV2 on the runs' 4 x 4 maps (1 in the top-left cell) at 16 x 12: bilinear
    upsampling gives H(x, y) = hx(x) hy(y) with hx = 1, 1, 7/8, 5/8, 3/8, 1/8, 0, ... and
    hy = 1, 1, 2/3, 1/3, 0, ...; one component, so one box per threshold: (0, 0, 16, 12) at
    tau = 0 and (0, 0, 6, 4) at tau = 0.01. img0 (box (4, 2, 12, 10)) has IoU 64/192 = 1/3 at
    tau = 0 and less above; img1 (box (0, 0, 8, 6)) has IoU 1/4 at tau = 0 and 24/48 = 1/2 at
    tau = 0.01, smaller boxes above. So a self run (img0 and img1) is right for one image of
    two at best for delta = 0.3 (tau = 0) and 0.5 (tau = 0.01), never for 0.7; the mean run
    (img0 only) for delta = 0.3 alone. No run's manifest has a mask: no PxAP."""
    methods = by_key(table1(runs))
    s, c = methods["self"]["wsol"], methods["mean"]["wsol"]
    assert [p["accuracy"]["per_run"] for p in s["per_iou"]] == [[0.5, 0.5], [0.5, 0.5], [0.0, 0.0]]
    assert [p["best_threshold"] for p in s["per_iou"]] == [[0.0, 0.0], [0.01, 0.01], [0.0, 0.0]]
    assert s["maxboxacc_v2"]["mean"] == pytest.approx(1 / 3) and s["maxboxacc_v2"]["n_images"] == [2, 2]
    assert [p["accuracy"]["mean"] for p in c["per_iou"]] == [1.0, 0.0, 0.0]
    assert s["pxap"]["mean"] is None and c["pxap"]["n_runs"] == 0
    assert table1(runs, wsol=False)["methods"][0]["wsol"] is None


def test_markdown_layout(runs):
    md = render_markdown(table1(runs))
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| Method | Region"))
    assert header == ("| Method | Region | Uniform | All channels | Top-2 channels | "
                      "Accuracy (IoU ≥ 0.5, t = 0.2) | MaxBoxAccV2 (BBox) / PxAP (Mask) | Runs |")
    assert ("| EmbeddingCAM (self proxy) | BBox | 0.312 ± 0.062 | 0.750 ± 0.125 | "
            "0.438 ± 0.062 | 0.500 ± 0.000 | 0.333 ± 0.000 | 2 |") in lines
    assert "|  | Mask | 0.156 ± 0.031 | 0.500 ± 0.000 | 0.375 ± 0.125 |  | — |  |" in lines
    assert ("| EmbeddingCAM (mean proxy) | BBox | 0.250 ± 0.000 | 0.625 ± 0.000 | — | "
            "1.000 ± 0.000 | 0.333 ± 0.000 | 1 |") in lines
    assert ("| EmbeddingCAM (self proxy) | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.000 ± 0.000 | 0.333 ± 0.000 | — | "
            "0 / 0.01 / 0; 0 / 0.01 / 0 |") in lines
    assert "ddof = 0" in md
    assert f"Run {runs[0]}: 2 of its 2 results file(s) carry no WSOL counters" in md  # measured from the heatmaps
    sweep_line = next(line for line in lines
                      if line.startswith("| EmbeddingCAM (self proxy) | 0.500"))
    assert sweep_line.endswith("| 1.000 ± 0.000 |")
    assert any(line.startswith(f"| {runs[0]} | self |") and "| 5 | 4 | 1 | 1 | 3 | 1 | 2 | 0.15 |"
               in line for line in lines)


def test_write_report_files_and_overlays(runs, tmp_path):
    out = tmp_path / "report"
    report = write_report(runs, str(out), overlays=2)
    for name in ("report.md", "report.json", "report.html", "sweep.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    table = report["table1"]
    ov = table["overlays"]
    assert ov["skipped"] is None and ov["failed"] == []
    # first two sorted ok ids; the mean run has only img0 ok
    assert [(i["method"], i["image_id"]) for i in ov["images"]] == [
        ("self", "img0"), ("mean", "img0"), ("self", "img1")]
    assert ov["written"] == 3
    html = (out / "report.html").read_text()
    assert "sweep.png" in html and "0.750 ± 0.125" in html
    for item in ov["images"]:
        assert item["file"] in html and item["caption"] in html
    assert "img1 · EmbeddingCAM (self proxy) · ratio bbox 0.750 · mask — · IoU 0.375" in html

    # drawn at the size the page shows it: each half OVERLAY_TILE square, the 16 x 12 image
    # scaled by 240 / 16 = 15 to 240 x 180, centred (30 rows of grey above and below)
    panel = cv2.imread(str(out / ov["images"][0]["file"]))
    tile, scale, top = OVERLAY_TILE, OVERLAY_TILE // W, (OVERLAY_TILE - H * OVERLAY_TILE // W) // 2
    assert (tile, scale, top) == (240, 15, 30) and panel.shape == (tile, 2 * tile, 3)
    assert (panel[top:tile - top, :tile] == 128).all()  # left: the original image
    assert (panel[:top] == TILE_BACKGROUND).all() and (panel[tile - top:] == TILE_BACKGROUND).all()
    jet = cv2.applyColorMap(np.array([[255, 0]], np.uint8), cv2.COLORMAP_JET)[0]
    # right: the min-max heatmap (1 at the top-left, 0 at the bottom-right) blended at 0.5
    assert panel[top + 1, tile + 1].tolist() == [round(0.5 * 128 + 0.5 * v) for v in jet[0]]
    assert panel[tile - top - 1, 2 * tile - 1].tolist() == [round(0.5 * 128 + 0.5 * v) for v in jet[1]]
    assert panel[top + 2 * scale, tile + 4 * scale].tolist() == [0, 200, 0]  # ground-truth box corner (4, 2)
    # predicted box (0, 0, 8, 6): its last pixel, red
    assert panel[top + 6 * scale - 1, tile + 8 * scale - 1].tolist() == [0, 0, 255]
    # every figure the same size, and shown at that size
    assert f"width='{2 * tile}' height='{tile}'" in html and f"repeat(auto-fill,{2 * tile}px)" in html
    assert "width:100%" not in html
    sweep_png = cv2.imread(str(out / "sweep.png"))
    assert sweep_png.shape == (440, 760, 3)
    for colour in ([180, 119, 31], [14, 127, 255]):  # one line per method
        assert (sweep_png == colour).all(axis=2).sum() > 20


def test_missing_manifest_skips_overlays(tmp_path):
    run = write_run(tmp_path / "a", RUN_A, "self", manifest=tmp_path / "nope.parquet")
    report = write_report([run], str(tmp_path / "out"))
    table = report["table1"]
    assert table["overlays"]["skipped"].startswith("manifest")
    assert "nope.parquet" in table["overlays"]["skipped"]
    assert table["overlays"]["images"] == [] and not (tmp_path / "out" / "overlays").exists()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Overlays skipped: manifest" in md and "0.625 ± 0.000" in md
    assert "Overlays skipped" in (tmp_path / "out" / "report.html").read_text()


def test_missing_image_is_reported_per_image(runs, tmp_path):
    (tmp_path / "images" / "img1.png").unlink()
    ov = write_report(runs[:1], str(tmp_path / "out"), overlays=2)["table1"]["overlays"]
    assert [i["image_id"] for i in ov["images"]] == ["img0"]
    assert len(ov["failed"]) == 1 and ov["failed"][0]["image_id"] == "img1"
    assert "img1.png" in ov["failed"][0]["reason"] and "not found" in ov["failed"][0]["reason"]


def test_overlay_panel_downscales_large_images():
    image = np.zeros((300, 1200, 3), np.uint8)
    panel = overlay_panel(image, np.eye(3), gt_box=(0, 0, 600, 150), max_side=400)
    assert panel.shape == (100, 800, 3)
    assert panel[0, 400].tolist() == [0, 200, 0]  # box scaled with the image


def test_split_filter(runs):
    table = table1(runs[:2], split="eval")
    assert [r["counts"]["images"] for r in table["runs"]] == [5, 2]
    assert table["split"] == "eval"
    with pytest.raises(ValueError, match="no result rows of split 'test'"):
        table1(runs[:1], split="test")


def test_main_says_where_the_report_is_or_prints_markdown(runs, tmp_path, capsys):
    assert main([*runs, "--out", str(tmp_path / "page"), "--overlays", "0"]) == 0
    assert capsys.readouterr().out == (f"embcam report: {len(runs)} runs -> {tmp_path / 'page' / 'report.html'} "
                                       "(open it in a browser; report.md and report.json beside it)\n")
    assert (tmp_path / "page" / "report.html").is_file()
    assert main([*runs, "--out", str(tmp_path / "cli"), "--overlays", "0", "--markdown"]) == 0
    stdout = capsys.readouterr().out
    assert "| EmbeddingCAM (mean proxy) | BBox |" in stdout
    assert "Overlays skipped: not requested" in stdout
    assert stdout == (tmp_path / "cli" / "report.md").read_text() + "\n"
    assert "## MaxBoxAccV2 and PxAP" in stdout
    assert main([*runs, "--out", str(tmp_path / "plain"), "--overlays", "0", "--no-wsol", "--print"]) == 0
    plain = capsys.readouterr().out
    assert "| EmbeddingCAM (mean proxy) | BBox |" in plain and "MaxBoxAccV2" not in plain
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert "no summary.json" in capsys.readouterr().err


def test_bad_input_raises_clear_errors(tmp_path):
    dup = write_run(tmp_path / "dup", [ok_row("img0"), ok_row("img0")], "self", files=1)
    with pytest.raises(ValueError, match="image_id 'img0' appears 2 times"):
        table1([dup])
    with pytest.raises(ValueError, match="given twice"):
        table1([dup, dup + "/"])
    bad_sweep = write_run(tmp_path / "sw", [ok_row("img0", iou_sweep=[0.5] * 3)], "self")
    with pytest.raises(ValueError, match="iou_sweep of row image_id 'img0' has 3 values"):
        table1([bad_sweep])
    k1 = write_run(tmp_path / "k1", RUN_A, "self", top_k=1)
    k2 = write_run(tmp_path / "k2", RUN_B, "self", top_k=2)
    with pytest.raises(ValueError, match="different top_k_channels"):
        table1([k1, k2])
    (tmp_path / "old" / "results").mkdir(parents=True)
    pq.write_table(pa.table({"image_id": ["x"], "status": ["ok"]}),
                   tmp_path / "old" / "results" / "p.parquet")
    (tmp_path / "old" / "summary.json").write_text('{"config": {"proxy": "self"}}')
    with pytest.raises(ValueError, match=r"p\.parquet lacks column\(s\) degenerate"):
        table1([str(tmp_path / "old")])


def test_method_from_proxy_kind_when_config_has_none(tmp_path):
    run = write_run(tmp_path / "g", [ok_row("img0", proxy_kind="onehot", ratio_bbox=0.5)], None)
    (method,) = table1([run])["methods"]
    assert (method["key"], method["name"]) == ("onehot", "Grad-CAM (onehot proxy)")
    assert method["rows"]["bbox"]["all"]["mean"] == 0.5


# --- the catalog report (no annotations needed) -------------------------------------------------
# A run on a real explain job is reported in test_results.py (one shared Ray run).

HOSTILE_LABEL = "<script>alert(1)</script>"
HOSTILE_ID = 'q"&id'
ONE_HOT, UNIFORM, HALF = [1.0, 0.0, 0.0, 0.0], [0.5] * 4, [1.0, 1.0, 0.0, 0.0]  # spreads 0, 1, 1/2


def catalog_row(image_id, label, cosine, heat, **extra):
    row = dict(image_id=image_id, label=label, split="eval", status="ok", proxy_kind="mean",
               cosine=cosine, width=W, height=H, heatmap=heat, heatmap_height=2, heatmap_width=2,
               embedding=[cosine] * 4, heatmap_topk=heat, degenerate=False, pred_bbox_x0=0.0,
               pred_bbox_y0=0.0, pred_bbox_x1=8.0, pred_bbox_y1=6.0)
    row.update(extra)
    return row


CATALOG = [
    catalog_row("a0", "a", 0.5, ONE_HOT, ratio_bbox=0.25, uniform_bbox=0.5),
    catalog_row("a1", "a", 0.75, [0.0] * 4, degenerate=True, uniform_bbox=0.5),
    catalog_row("a2", "a", 0.25, UNIFORM),
    error_row("a3", label="a", error="image: FileNotFoundError: x", proxy_kind="mean"),
    catalog_row("b0", "b", 0.875, HALF, ratio_bbox=0.75, uniform_bbox=0.25),
    catalog_row("b1", "b", 0.625, HALF),
    error_row("e1", label="b", error="decode: ImageDecodeError: <b>bad</b>", proxy_kind="mean"),
    catalog_row("n0", None, 1.0, ONE_HOT),
    catalog_row(HOSTILE_ID, HOSTILE_LABEL, 0.125, UNIFORM, ratio_bbox=0.5, uniform_bbox=0.25),
]


def catalog_run(root, rows=CATALOG, row_group_size=None):
    """The rows above as one results file, with an image per row and the manifest."""
    (root / "images").mkdir(parents=True)
    manifest = []
    for i, row in enumerate(rows):
        cv2.imwrite(str(root / "images" / f"{i}.png"), np.full((H, W, 3), 20 * i, np.uint8))
        manifest.append(dict(image_id=row["image_id"], uri=f"images/{i}.png", label=row["label"]))
    pq.write_table(conform(manifest, "manifest"), root / "manifest.parquet")
    (root / "run" / "results").mkdir(parents=True)
    pq.write_table(conform(rows, "results"), root / "run" / "results" / "part-0.parquet",
                   row_group_size=row_group_size)
    config = {"proxy": "mean", "model": "m", "manifest": str(root / "manifest.parquet"), "image_root": None}
    (root / "run" / "summary.json").write_text(json.dumps({"config": config}))
    return str(root / "run")


def test_catalog_numbers(tmp_path):
    run = catalog_run(tmp_path)
    (entry,) = write_report([run], str(tmp_path / "out"), per_label=2, labels=2, outside=2,
                            overlays=0)["catalog"]
    assert entry["counts"] == {"images": 9, "ok": 7, "error": 2, "degenerate": 1, "with_box": 4,
                               "with_mask": 0}
    assert entry["labels"] == [  # lowest mean cosine first; the mean is over ok rows
        {"label": HOSTILE_LABEL, "images": 1, "ok": 1, "errors": 0, "mean_cosine": 0.125,
         "lowest_cosine": 0.125, "lowest_image_id": HOSTILE_ID},
        {"label": "a", "images": 4, "ok": 3, "errors": 1, "mean_cosine": 0.5,
         "lowest_cosine": 0.25, "lowest_image_id": "a2"},
        {"label": "b", "images": 3, "ok": 2, "errors": 1, "mean_cosine": 0.75,
         "lowest_cosine": 0.625, "lowest_image_id": "b1"},
        {"label": None, "images": 1, "ok": 1, "errors": 0, "mean_cosine": 1.0,
         "lowest_cosine": 1.0, "lowest_image_id": "n0"}]
    # the two labels with the lowest cosine, two images each
    assert [(i["label"], i["image_id"]) for i in entry["gallery"]["images"]] == [
        (HOSTILE_LABEL, HOSTILE_ID), ("a", "a2"), ("a", "a0")]
    outside = entry["outside_box"]
    assert (outside["scored"], outside["mostly_outside"]) == (3, 1)  # a1 is degenerate
    # only the images that qualify (ratio_bbox < 0.5): the hostile row's 0.5 does not
    assert [(i["image_id"], i["ratio_bbox"]) for i in outside["images"]] == [("a0", 0.25)]
    for item in entry["gallery"]["images"] + outside["images"]:
        assert (tmp_path / "out" / item["file"]).is_file()
    assert entry["errors"] == {"count": 2, "by_step": {"decode": 1, "image": 1}, "examples": [
        {"image_id": "a3", "label": "a", "error": "image: FileNotFoundError: x"},
        {"image_id": "e1", "label": "b", "error": "decode: ImageDecodeError: <b>bad</b>"}]}
    # cosines 0.125 ... 1 in 20 bins of 0.04375: 0.25 -> bin 2, 0.5 -> 8, 0.625 -> 11, ...
    cosine = entry["histograms"]["cosine"]
    assert cosine["n"] == 7 and cosine["edges"][0] == 0.125 and cosine["edges"][-1] == 1.0
    assert [k for k, c in enumerate(cosine["counts"]) for _ in range(c)] == [0, 2, 8, 11, 14, 17, 19]
    # spreads of the six non-degenerate ok maps: 0 (a0, n0), 1/2 (b0, b1), 1 (a2, the hostile row)
    spread = entry["histograms"]["spread"]
    assert (spread["n"], spread["undefined"]) == (6, 0)
    assert [k for k, c in enumerate(spread["counts"]) for _ in range(c)] == [0, 0, 10, 10, 19, 19]


def test_catalog_gallery_caps_and_no_gallery(tmp_path):
    run = catalog_run(tmp_path)
    entry = write_report([run], str(tmp_path / "one"), per_label=1, labels=3, outside=0)["catalog"][0]
    # median cosine 0.625: 0.5 (a0), 0.25 (a2) and 0.125 (the hostile row) stand out; b's lowest,
    # 0.625, does not, so label b is not among the candidates
    assert entry["gallery"]["standing_out"] == 3
    assert [i["image_id"] for i in entry["gallery"]["images"]] == [HOSTILE_ID, "a2"]
    assert entry["outside_box"]["images"] == [] and entry["outside_box"]["mostly_outside"] == 1
    entry = write_report([run], str(tmp_path / "none"), per_label=0)["catalog"][0]
    assert entry["gallery"]["images"] == [] and entry["gallery"]["skipped"].startswith("not requested")
    with pytest.raises(ValueError, match="labels must be >= 0"):
        write_report([run], str(tmp_path / "bad"), labels=-1)


def test_table1_only_where_annotations_exist(tmp_path):
    bare = [{k: v for k, v in row.items() if k not in ("ratio_bbox", "uniform_bbox")} for row in CATALOG]
    run = catalog_run(tmp_path, bare)
    out = tmp_path / "out"
    report = write_report([run], str(out))
    assert report["table1"] is None and report["catalog"][0]["outside_box"] is None
    assert not (out / "sweep.png").exists() and not (out / "overlays").exists()
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "## Table 1" not in md and "Table 1 (annotated metrics): not shown" in md
    assert "<h2>Table 1" not in page and "No row has a box" in md
    annotated = write_report([run, catalog_run(tmp_path / "boxes")], str(tmp_path / "both"), overlays=0)
    assert annotated["table1"]["methods"][0]["rows"]["bbox"]["all"]["n_runs"] == 1
    assert "## Table 1" in (tmp_path / "both" / "report.md").read_text()


def test_catalog_reads_no_vector_it_does_not_draw(tmp_path):
    """One row per row group. The embeddings and top-k maps are garbage everywhere, the
    heatmaps everywhere but in the rows the galleries draw: the report must not need them."""
    drawn = {HOSTILE_ID, "a2", "a0"}  # the gallery's, and a0 outside its box too
    run = catalog_run(tmp_path, row_group_size=1)
    path = tmp_path / "run" / "results" / "part-0.parquet"
    keep = {i for i, row in enumerate(CATALOG) if row["image_id"] in drawn}
    from test_results import corrupt_columns  # noqa: E402 - the helper of the results tests

    corrupt_columns(path, {"embedding", "heatmap_topk"})
    corrupt_columns(path, {"heatmap"}, keep_row_groups=keep)
    with pytest.raises((OSError, pa.ArrowException)):  # the garbage is real
        pq.read_table(path, columns=["heatmap"])
    report = write_report([run], str(tmp_path / "out"), per_label=2, labels=2, outside=2,
                          overlays=0, spread=False)
    entry = report["catalog"][0]
    assert {i["image_id"] for i in entry["gallery"]["images"] + entry["outside_box"]["images"]} == drawn
    assert all(i["file"] for i in entry["gallery"]["images"])
    assert entry["histograms"]["spread"]["skipped"].startswith("not requested")
    assert report["table1"]["runs"][0]["counts"]["images"] == 9  # Table 1 reads no vector either


def test_html_escapes_every_manifest_value(tmp_path):
    run = catalog_run(tmp_path)
    out = tmp_path / "out"
    write_report([run], str(out), overlays=3)
    raw = (out / "report.html").read_text()
    page = HtmlPage()
    page.feed(raw)
    page.close()
    assert "script" not in page.tags and "b" not in page.tags
    assert page.sources and all((out / src).is_file() for src in page.sources)
    text = "".join(page.text)
    for value in (HOSTILE_LABEL, HOSTILE_ID, "decode: ImageDecodeError: <b>bad</b>"):
        assert value in text and value not in raw
    md = (out / "report.md").read_text()
    assert HOSTILE_LABEL not in md and "\\<script\\>alert(1)\\</script\\>" in md


def test_candidates_only_when_some_cosine_stands_out(tmp_path):
    """Every cosine within 0.05 of the median (0.996 to 1.000, as a run whose head was
    random): no candidates section, one line saying why; one cosine 0.06 below: the section."""
    rows = [catalog_row(f"i{k}", "ab"[k % 2], cosine, ONE_HOT) for k, cosine in
            enumerate([0.996, 0.997, 0.998, 0.999, 1.0])]
    out = tmp_path / "out"
    entry = write_report([catalog_run(tmp_path / "tight", rows)], str(out), overlays=0)["catalog"][0]
    assert entry["gallery"]["standing_out"] == 0 and entry["gallery"]["images"] == []
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    why = ("No mislabelling candidates: no cosine stands out (a cosine stands out when it is more than 0.05 "
           "below the run's median cosine (0.998)).")
    assert "mislabelling candidates)" not in md and why in md
    seen = HtmlPage()
    seen.feed(page)
    assert "mislabelling candidates)" not in page and why in seen.text
    rows[0]["cosine"] = 0.938  # 0.06 below the median
    out = tmp_path / "out2"
    entry = write_report([catalog_run(tmp_path / "one", rows)], str(out), overlays=0)["catalog"][0]
    assert [i["image_id"] for i in entry["gallery"]["images"]] == ["i0"]
    md = (out / "report.md").read_text()
    assert "### Lowest cosine per label (mislabelling candidates)" in md and "No mislabelling" not in md
    assert "A cosine stands out when it is more than 0.05 below the run's median cosine (0.998); 1 do." in md


def test_histogram_tick_labels_lie_inside_the_plot():
    """The right tick of a cosine histogram once ran off the image's edge ("0.9999" drawn
    from 14 px left of the axis' end, 15 px from the edge)."""
    edges = list(np.linspace(0.99612, 0.99993, 21))
    plot = draw_histogram({"edges": edges, "counts": [1] * 20}, "cosine")
    height, width = plot.shape[:2]
    labels = plot[height - 45 + 4:]  # below the axis: the tick labels
    ink = np.flatnonzero((labels < 128).any(axis=(0, 2)))
    assert ink.min() >= 1 and ink.max() <= width - 2  # nothing touches the edges
    (text_width, _), _ = cv2.getTextSize("0.9999", cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
    right = ink[ink > width * 3 // 4]
    assert right.max() - right.min() >= text_width - 4  # the right label, whole (its box has a margin)
