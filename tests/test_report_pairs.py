"""Tests for the report's pairs section (embcam.report.pairs): a run folder with pair
explanations (``RUN/pairs/``, contract ``pairs``, in two files of small row groups) and real
PNGs, one with an EXIF orientation, one missing. Every drawn picture is compared pixel for
pixel with ``overlay_panel`` of the image as displayed (decoded here by hand) and the pair's
own heatmap of that side; the order, the counts, the escaping and the error reasons are
read back from the files written."""

import io
import json

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from embcam.data.runstate import ManifestCopy, RunFolder
from embcam.data.schemas import conform
from embcam.report import main, write_report
from embcam.results import overlay_panel

from conftest import HtmlPage

HOSTILE_ID = "x<script>alert(1)</script>&y"
HOSTILE_LABEL = "<b>L&amp;</b>"
BOX_A = (1.0, 1.0, 5.0, 4.0)
ERROR_REASON = "image: zz: FileNotFoundError <i>boom</i> & co"


def stored_pixels(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)  # RGB


IMAGES = {  # image_id: (file name, stored RGB pixels, EXIF orientation or None, label)
    "a": ("a.png", stored_pixels(0, 8, 10), None, "shoe"),
    "b": ("b.png", stored_pixels(1, 9, 12), None, "shoe"),
    "c": ("c.png", stored_pixels(2, 8, 8), None, "bag"),
    "rot": ("rot.png", stored_pixels(3, 6, 8), 6, "bag"),  # shown turned 90 degrees clockwise: 6 x 8
    HOSTILE_ID: ("hostile.png", stored_pixels(4, 7, 7), None, HOSTILE_LABEL),
    "gone": ("gone.png", stored_pixels(5, 5, 5), None, "bag"),  # in the results, but its file is gone
}


def displayed(image_id: str) -> np.ndarray:
    _, pixels, orientation, _ = IMAGES[image_id]
    return np.rot90(pixels, -1) if orientation == 6 else pixels


def heat(k: int, side: str) -> list[float]:
    values = np.arange(6, dtype=np.float32) + 10 * k
    return (values if side == "query" else values[::-1] * 2).tolist()


# (query, match, status, cosine); pairs-file rows 0..6
PAIRS = [("a", "b", "ok", 0.875), ("c", "rot", "ok", 0.25), (HOSTILE_ID, "a", "ok", 0.5),
         ("b", "c", "ok", 0.75), ("a", "gone", "ok", 0.125), ("b", "zz", "error", None),
         ("b", "a", "ok", 0.25)]
LOWEST_FIRST = [4, 6, 1, 2, 3, 0]  # by cosine, then query_id (0.25: "b" before "c")


def pair_row(k: int) -> dict:
    query, match, status, cosine = PAIRS[k]
    if status == "error":
        return dict(query_id=query, match_id=match, status="error", error=ERROR_REASON)
    return dict(query_id=query, match_id=match, status="ok", cosine=cosine, query_heatmap=heat(k, "query"),
                match_heatmap=heat(k, "match"), heatmap_height=2, heatmap_width=3)


def png(pixels: np.ndarray, orientation: int | None) -> bytes:
    sink = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(sink, "PNG", exif=exif)
    return sink.getvalue()


def make_run(root, *, pairs=True):
    (root / "images").mkdir(parents=True)
    results, manifest = [], []
    for image_id, (name, pixels, orientation, label) in IMAGES.items():
        if image_id != "gone":
            (root / "images" / name).write_bytes(png(pixels, orientation))
        h, w = displayed(image_id).shape[:2]
        results.append(dict(image_id=image_id, label=label, status="ok", width=w, height=h, proxy_kind="self",
                            heatmap=[1.0] * 4, heatmap_height=2, heatmap_width=2, degenerate=False))
        box = BOX_A if image_id == "a" else (None,) * 4
        manifest.append(dict(image_id=image_id, uri=f"images/{name}", label=label, bbox_x0=box[0],
                             bbox_y0=box[1], bbox_x1=box[2], bbox_y1=box[3]))
    run = root / "run"
    (run / "results").mkdir(parents=True)
    pq.write_table(conform(results, "results"), run / "results" / "part-000000000000-000000000006.parquet")
    writer = ManifestCopy(RunFolder(str(run)), block_rows=4)
    writer.write(conform(manifest, "manifest"))
    writer.close()
    (run / "summary.json").write_text(json.dumps({"config": {"proxy": "self", "image_root": str(root)}}))
    if pairs:
        (run / "pairs").mkdir()
        for start, stop in ((0, 4), (4, 7)):
            table = conform([pair_row(k) for k in range(start, stop)], "pairs")
            table = table.append_column("rank", pa.array(range(start, stop), pa.int32()))  # the file's own
            pq.write_table(table, run / "pairs" / f"part-{start:012d}-{stop:012d}.parquet", row_group_size=2)
    return str(run)


@pytest.fixture()
def report(tmp_path):
    run = make_run(tmp_path)
    out = tmp_path / "report"
    return run, out, write_report([run], str(out), pairs_shown=4)


def test_lowest_cosine_pairs_first_with_counts(report):
    _, out, rep = report
    entry = rep["pairs"][0]
    assert entry["counts"] == {"pairs": 7, "ok": 6, "error": 1}
    assert entry["cosine"] == {"min": 0.125, "median": 0.375, "max": 0.875}  # median of 6: (0.25 + 0.5) / 2
    shown = [(p["query_id"], p["match_id"], p["cosine"]) for p in entry["pairs"]]
    assert shown == [(PAIRS[k][0], PAIRS[k][1], PAIRS[k][3]) for k in LOWEST_FIRST[:4]]
    assert entry["not_shown"] == 2
    assert [(p["query_label"], p["match_label"]) for p in entry["pairs"]][:2] == [("shoe", "bag"), ("shoe", "shoe")]
    markdown = (out / "report.md").read_text()
    section = markdown[markdown.index("## Pairs: "):]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert table[0] == "| Query | Match | Cosine | Status | Overlays |"
    assert [line.split(" | ")[:4] for line in table[1:5]] == [
        ["| a (shoe)", "gone (bag)", "0.125", "ok"], ["| b (shoe)", "a (shoe)", "0.250", "ok"],
        ["| c (bag)", "rot (bag)", "0.250", "ok"],
        ["| x\\<script\\>alert(1)\\</script\\>&y (\\<b\\>L&amp;\\</b\\>)", "a (shoe)", "0.500", "ok"]]
    assert "4 ok pairs with the lowest cosine (weakest matches first); 2 more not shown." in section
    assert json.loads((out / "report.json").read_text())["pairs"][0]["counts"]["pairs"] == 7


def test_every_picture_is_the_pair_heatmap_on_the_image_as_displayed(report):
    _, out, rep = report
    entry = rep["pairs"][0]
    drawn = 0
    for pair, k in zip(entry["pairs"], LOWEST_FIRST):
        for side in ("query", "match"):
            image_id = pair[f"{side}_id"]
            if image_id == "gone":
                assert side not in pair["files"]
                continue
            picture = cv2.imread(str(out / pair["files"][side]), cv2.IMREAD_UNCHANGED)[..., ::-1]
            want = overlay_panel(displayed(image_id), np.reshape(heat(k, side), (2, 3)),
                                 BOX_A if image_id == "a" else None, None)
            np.testing.assert_array_equal(picture, want)
            drawn += 1
    assert drawn == 7
    assert entry["pairs"][0]["failed"] == [{"side": "match", "image_id": "gone",
                                            "reason": entry["pairs"][0]["failed"][0]["reason"]}]
    assert "gone.png not found" in entry["pairs"][0]["failed"][0]["reason"]


def test_html_parses_escapes_and_references_only_written_images(report):
    _, out, rep = report
    text = (out / "report.html").read_text()
    page = HtmlPage()
    page.feed(text)
    page.close()
    assert "script" not in page.tags and "b" not in page.tags and "i" not in page.tags
    assert "<script>" not in text and "<i>boom" not in text
    pair_images = [s for s in page.sources if s.startswith("pairs/")]
    assert len(pair_images) == 7
    for source in page.sources:
        assert (out / source).is_file() and (out / source).resolve().is_relative_to(out.resolve())
        assert "<" not in source and "&" not in source
    words = "".join(page.text)
    assert f"query {HOSTILE_ID} ({HOSTILE_LABEL}) · match a (shoe)" in words
    assert "#1 · cosine 0.125 · query a (shoe) · match gone (bag)" in words
    assert "match gone not drawn: " in words and "gone.png not found" in words
    assert "1 pair(s) failed" in words and ERROR_REASON in words  # the error pair and its reason
    markdown = (out / "report.md").read_text()
    assert "| b | zz | error | image: zz: FileNotFoundError \\<i\\>boom\\</i\\> & co |" in markdown


@pytest.mark.parametrize("folder", [False, True])
def test_runs_without_pairs_have_no_section(tmp_path, folder):
    run = make_run(tmp_path, pairs=False)
    if folder:  # an explain --pairs run stopped before its first piece: only a temporary file
        (tmp_path / "run" / "pairs").mkdir()
        (tmp_path / "run" / "pairs" / ".part-000000000000-000000000004.parquet.1234.tmp").write_bytes(b"x")
    rep = write_report([run], str(tmp_path / "report"))
    assert rep["pairs"] == []
    assert "Pairs" not in (tmp_path / "report" / "report.md").read_text()


def test_pairs_shown_zero_and_the_command(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main([run, "--out", str(tmp_path / "r"), "--pairs-shown", "0", "--markdown"]) == 0
    stdout = capsys.readouterr().out
    assert "## Pairs: " in stdout and "6 more not shown" in stdout
    assert not (tmp_path / "r" / "pairs").exists()


def test_a_bad_pairs_file_is_one_line(tmp_path, capsys):
    run = make_run(tmp_path)
    path = tmp_path / "run" / "pairs" / "part-000000000004-000000000007.parquet"
    table = pq.read_table(path)
    status = table.schema.get_field_index("status")
    pq.write_table(table.set_column(status, "status", pa.array(["error", "maybe", "ok"])), path)
    with pytest.raises(SystemExit, match="2"):
        main([run, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a pair has status 'maybe'" in err and f"{path}, row 1" in err
