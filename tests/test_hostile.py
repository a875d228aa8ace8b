"""Hostile and odd rows through the real job: each becomes one error row with a reason that
quotes no file content, within bounded time, and the other rows are computed. An
EXIF-rotated JPEG is explained as displayed."""
import io
import os
import socket
import time

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from embcam import save_checkpoint
from embcam.data.images import decode_image
from embcam.job.pipeline import ExplainConfig, run_explain
from embcam.models import Preprocessing, build_model

from test_images import png_by_hand

SECRET = "root:x:0:0:do-not-leak"


def _rows(**rows):
    return [dict({"label": "a", "bbox_x0": None, "bbox_y0": None, "bbox_x1": None, "bbox_y1": None},
                 image_id=k, **v) for k, v in rows.items()]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    scene = np.full((60, 90, 3), 90, np.uint8)
    scene[10:40, 50:80] = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)  # the object, top right
    cv2.imwrite(str(root / "plain.png"), scene[:, :, ::-1])
    # stored sideways (rotated 90 degrees counter-clockwise) with EXIF orientation 6: displayed as `scene`
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(scene, 1))).save(sideways, "JPEG", quality=95, exif=exif)
    (root / "rotated.jpg").write_bytes(sideways.getvalue())
    # the same pixels as embcam displays them, stored upright without EXIF (lossless)
    shown = decode_image(sideways.getvalue())
    cv2.imwrite(str(root / "upright.png"), shown[:, :, ::-1])
    (root / "bomb.png").write_bytes(png_by_hand(20000, 20000))
    (root / "passwd").write_text(SECRET + "\n")
    os.mkfifo(root / "fifo")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there
    box = dict(bbox_x0=50.0, bbox_y0=10.0, bbox_x1=80.0, bbox_y1=40.0)  # as displayed
    rows = _rows(plain={"uri": "plain.png", **box}, rotated={"uri": "rotated.jpg", **box},
                 upright={"uri": "upright.png", **box}, bomb={"uri": "bomb.png"},
                 zero={"uri": "/dev/zero"}, fifo={"uri": "fifo"}, passwd={"uri": "passwd"},
                 folder={"uri": "."},
                 remote={"uri": f"s3://bucket/x.jpg?endpoint_override=127.0.0.1:{port}&scheme=http"},
                 nanbox={"uri": "plain.png", "bbox_x0": float("nan"), "bbox_y0": 1.0, "bbox_x1": 5.0,
                         "bbox_y1": 5.0},
                 partial={"uri": "plain.png", "bbox_x0": 1.0, "bbox_y0": 1.0, "bbox_x1": 5.0})
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
    torch.manual_seed(0)
    save_checkpoint(root / "model.pt", build_model("embcam:small-resnet+linear:16"),
                    "embcam:small-resnet+linear:16", Preprocessing(48))
    return root


def test_hostile_rows_become_error_rows_and_the_rest_is_computed(ray_session, hostile, tmp_path):
    started = time.perf_counter()
    summary = run_explain(ExplainConfig(manifest=str(hostile / "manifest.parquet"), out=str(tmp_path),
                                        checkpoint=str(hostile / "model.pt"), read_timeout=1.0,
                                        batch_size=4), progress=False)
    # nothing hangs (FIFO, /dev/zero, a dead endpoint): a guard far above a normal run's minute
    assert time.perf_counter() - started < 900
    df = pd.read_parquet(tmp_path / "results").set_index("image_id")
    print(df[["status", "error"]].to_string())  # shown when an assertion below fails
    assert summary["counts"]["results"] == len(df) == 11
    error = df.error
    assert "20000x20000 = 400 MP, over the limit of 100 MP" in error["bomb"]
    assert "not a regular file (character device)" in error["zero"]
    assert "not a regular file (FIFO)" in error["fifo"]
    assert "not a regular file (directory)" in error["folder"]
    assert "(4 attempts): " in error["remote"]
    assert "NaN" in error["nanbox"] and "partially" in error["partial"]
    assert error["passwd"].startswith("image: ImageDecodeError")
    for message in error.dropna():
        assert "root:x" not in message and "do-not-leak" not in message  # never the file's content
    assert set(df.index[df.status == "ok"]) == {"plain", "rotated", "upright"}

    # the EXIF-rotated JPEG is explained as displayed: the same as its upright twin
    assert (df.orientation["rotated"], df.orientation["upright"]) == (6, 1)
    assert (df.width["rotated"], df.height["rotated"]) == (90, 60)
    np.testing.assert_allclose(df.heatmap["rotated"], df.heatmap["upright"], rtol=1e-5, atol=1e-7)
    for metric in ("ratio_bbox", "uniform_bbox", "iou"):
        assert df[metric]["rotated"] == pytest.approx(df[metric]["upright"], abs=1e-6)
    assert df.uniform_bbox["rotated"] == pytest.approx(30 * 30 / (60 * 90))


def test_confined_uris_stay_under_the_image_root(ray_session, hostile, tmp_path):
    """Confined to the image root and one listed prefix: a uri reaches only those, by an
    absolute path, by ../ or through a symlink alike."""
    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    for folder in (allowed, elsewhere):
        folder.mkdir()
        (folder / "x.png").write_bytes((hostile / "plain.png").read_bytes())
    for name, folder in (("escape.png", elsewhere), ("listed.png", allowed)):
        (hostile / name).unlink(missing_ok=True)
        (hostile / name).symlink_to(folder / "x.png")
    rows = _rows(inside={"uri": "plain.png"}, absolute={"uri": str(elsewhere / "x.png")},
                 dots={"uri": "../" + os.path.relpath(elsewhere / "x.png", hostile.parent)},
                 link={"uri": "escape.png"}, passwd={"uri": "/etc/passwd"},
                 listed_absolute={"uri": str(allowed / "x.png")},
                 listed_dots={"uri": "../" + os.path.relpath(allowed / "x.png", hostile.parent)},
                 listed_link={"uri": "listed.png"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    run_explain(ExplainConfig(manifest=str(tmp_path / "m.parquet"), checkpoint=str(hostile / "model.pt"),
                              image_root=str(hostile), batch_size=4, out=str(tmp_path / "run"),
                              allowed_prefixes=[str(allowed)]), progress=False)
    df = pd.read_parquet(tmp_path / "run" / "results").set_index("image_id")
    assert set(df.index[df.status == "ok"]) == {"inside", "listed_absolute", "listed_dots", "listed_link"}
    for row in ("absolute", "dots", "link", "passwd"):
        assert "outside the allowed prefixes" in df.error[row], row


def test_more_gpus_than_the_cluster_has_fail_at_once(ray_session, hostile, tmp_path):
    with pytest.raises(ValueError, match=r"--num-gpus 1: the cluster has 0 GPU\(s\) \(CPU=2"):
        run_explain(ExplainConfig(manifest=str(hostile / "manifest.parquet"), out=str(tmp_path),
                                  checkpoint=str(hostile / "model.pt"), num_gpus=1), progress=False)
    assert not tmp_path.joinpath("_embcam").exists()  # refused before --out changed
