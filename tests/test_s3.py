"""The explain job and the commands that read its runs, on an S3-compatible server (moto on
127.0.0.1, tests/s3server.py) through pyarrow.fs: manifest, images, masks, checkpoint and --out
all on it, every location naming the server in its query (endpoint_override).

tests/conftest.py sends any S3 request that loses that query to a closed port of 127.0.0.1,
where it fails: a row read from the server proves its uri kept the endpoint the user named, and
nothing is ever sent to AWS. Two job runs in all (module-scoped): the mean-proxy run is shared by
the report, show and sanity checks.
"""
import contextlib
import importlib
import io
import json
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from embcam.cli import main
from embcam.data.locations import CREDENTIALS_REFUSED
from embcam.datasets import generate_dataset
from embcam.evaluation.sanity import main as sanity_main
from embcam.models import Preprocessing, build_model, save_checkpoint
from embcam.report import main as report_main

from test_pipeline import core_heatmaps

SIZE = 64
SECRETS = ("supersecret", "topsecretpw", "sigsecret", "tokensecret")
CREDENTIAL_ROWS = {  # manifest rows whose uri carries credentials: error rows, never read
    "userinfo": "s3://AKIAFAKE:supersecret@bucket/x.jpg",
    "basic": "https://user:topsecretpw@host/x.jpg",
    "signed": "https://host/x.jpg?X-Amz-Credential=AKIAFAKE&X-Amz-Signature=sigsecret",
    "token": "s3://bucket/x.jpg?session_token=tokensecret",
}


def run_cli(command, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = command(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def remote(ray_session, s3_server, tmp_path_factory):
    """A dataset on the server (relative uris, 3 classes x 3 images with masks, plus the
    credential rows), and one `embcam explain --proxy mean` run of it in s3://.../run0, with
    the image root taken from the manifest's URI."""
    root = tmp_path_factory.mktemp("s3data")
    manifest = generate_dataset(root, num_classes=3, images_per_class=3, min_side=64, max_side=80, seed=5)
    table = pq.read_table(manifest)
    first = table.slice(0, 1).to_pylist()[0]
    bad = [dict(first, image_id=image_id, uri=uri, mask_uri=None) for image_id, uri in CREDENTIAL_ROWS.items()]
    pq.write_table(pa.concat_tables([table, pa.Table.from_pylist(bad, schema=table.schema)]), manifest)
    torch.manual_seed(0)
    save_checkpoint(root / "model.pt", build_model("embcam:small-resnet+linear:16"),
                    "embcam:small-resnet+linear:16", Preprocessing(SIZE))
    s3_server.upload(root, "data")
    rc, out, err = run_cli(main, ["explain", "--manifest", s3_server.uri("data/manifest.parquet"),
                                  "--out", s3_server.uri("run0"), "--checkpoint", s3_server.uri("data/model.pt"),
                                  "--proxy", "mean", "--batch-size", "8", "--no-progress"])
    assert rc == 0, err
    return {"root": root, "table": table, "run": s3_server.uri("run0"), "stdout": out, "stderr": err}


def results(s3_server, run_key: str):
    return pq.read_table(f"embcam-test/{run_key}/results", filesystem=s3_server.filesystem()) \
        .to_pandas().set_index("image_id").sort_index()


def test_default_image_root_keeps_the_endpoint(s3_server, remote):
    df = results(s3_server, "run0")
    images = remote["table"].column("image_id").to_pylist()
    assert sorted(df.index) == sorted(images + list(CREDENTIAL_ROWS))
    # every image and mask was read from the server: a uri without the endpoint would have failed
    assert (df.status[images] == "ok").all(), df.error[images].dropna().to_dict()
    assert df.uniform_mask[images].notna().all()
    for image_id in CREDENTIAL_ROWS:
        assert df.status[image_id] == "error" and CREDENTIALS_REFUSED in df.error[image_id], df.error[image_id]

    # the class proxies, from the embeddings by hand: normalise(mean of normalised embeddings)
    proxies = pq.read_table("embcam-test/run0/proxies.parquet", filesystem=s3_server.filesystem()) \
        .to_pandas().set_index("label")
    ok = df.loc[images]
    y = np.stack(ok.embedding).astype(np.float64)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    for label in sorted(set(ok.label)):
        mean = y[(ok.label == label).to_numpy()].mean(0)
        np.testing.assert_allclose(proxies.proxy[label], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)


def test_printed_locations_keep_the_query_and_the_one_liner_works(s3_server, remote):
    query = f"?endpoint_override={s3_server.endpoint}&scheme=http"
    assert f"results: s3://embcam-test/run0/results{query}" in remote["stdout"]
    assert f"summary: s3://embcam-test/run0/summary.json{query}" in remote["stdout"]
    line = next(x for x in remote["stdout"].splitlines() if x.startswith("open them: "))
    code = re.fullmatch(r'open them: python -c "(.*)"', line).group(1)
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert f"[{remote['table'].num_rows + len(CREDENTIAL_ROWS)} rows x" in shown.stdout


def test_explicit_image_root_and_self_proxy(s3_server, remote, tmp_path):
    # the manifest elsewhere: only --image-root finds the images
    fs = s3_server.filesystem()
    fs.copy_file("embcam-test/data/manifest.parquet", "embcam-test/manifests/m.parquet")
    rc, _, err = run_cli(main, ["explain", "--manifest", s3_server.uri("manifests/m.parquet"),
                                "--image-root", s3_server.uri("data"), "--out", s3_server.uri("run1"),
                                "--checkpoint", s3_server.uri("data/model.pt"), "--batch-size", "8",
                                "--no-progress"])
    assert rc == 0, err
    df = results(s3_server, "run1")
    ok = df[df.status == "ok"].reset_index()
    assert sorted(ok.image_id) == sorted(remote["table"].column("image_id").to_pylist())
    ref = core_heatmaps((remote["root"], None, remote["root"] / "model.pt", remote["table"]), ok)
    heat = np.stack(ok.heatmap).reshape(ref.heatmaps.shape)
    np.testing.assert_allclose(heat, ref.heatmaps.numpy(), rtol=1e-4, atol=1e-6 * float(ref.heatmaps.max()))


def test_show_reads_the_remote_run(s3_server, remote, tmp_path):
    image_id = remote["table"].column("image_id")[0].as_py()
    rc, out, err = run_cli(main, ["show", remote["run"], image_id, "--out", str(tmp_path / "o.png")])
    assert rc == 0, err
    assert re.search(rf"uri\s+s3://embcam-test/data/images/.*/{image_id}\.jpg\?endpoint_override=", out)
    assert (tmp_path / "o.png").stat().st_size > 0  # drawn from the image on the server
    for image_id in CREDENTIAL_ROWS:
        rc, out, err = run_cli(main, ["show", remote["run"], image_id])
        assert rc == 0 and CREDENTIALS_REFUSED in out, err
        assert not any(secret in out + err for secret in SECRETS), out
    assert "s3://***@bucket/x.jpg" in run_cli(main, ["show", remote["run"], "userinfo"])[1]


def test_sanity_and_report_read_the_remote_run(s3_server, remote, tmp_path, monkeypatch):
    rc, out, err = run_cli(sanity_main, [remote["run"], "--images", "3", "--steps", "2"])
    assert rc == 0, err
    assert {"run0/sanity/sanity.json", "run0/sanity/cascade.png"} <= set(s3_server.keys("run0/sanity"))
    saved = json.loads(s3_server.read("run0/sanity/sanity.json"))
    assert saved["images"] == 3 and saved["unreadable"] == 0

    # every cosine stands out (the gallery's rule is tested in test_report): a gallery to draw
    monkeypatch.setattr(importlib.import_module("embcam.report.catalog"), "STANDOUT_GAP", -1.0)
    rc, out, err = run_cli(report_main, [remote["run"], "--out", str(tmp_path / "report"), "--overlays", "2"])
    assert rc == 0, err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    entry = report["catalog"][0]
    assert entry["run"] == remote["run"]  # no secret in it: shown as given
    assert entry["counts"]["ok"] == remote["table"].num_rows
    assert entry["errors"]["count"] == len(CREDENTIAL_ROWS)
    drawn = [item["file"] for item in entry["gallery"]["images"]]
    assert drawn and all((tmp_path / "report" / f).is_file() for f in drawn)  # images read from the server
    assert report["table1"]["overlays"]["written"] == 2
    assert (tmp_path / "report" / report["sanity"][0]["files"]["cascade"]).is_file()  # copied from the server

    # no secret of a manifest uri anywhere: results, summary, report, printed output
    rows = pq.read_table("embcam-test/run0/results", filesystem=s3_server.filesystem()).to_pylist()
    stored = repr(rows).encode() + s3_server.read("run0/summary.json")  # the values, not compressed bytes
    written = b"".join(p.read_bytes() for p in (tmp_path / "report").glob("report.*"))
    printed = (out + err + remote["stdout"] + remote["stderr"]).encode()
    for secret in SECRETS:
        for where, text in (("results/summary", stored), ("report", written), ("printed", printed)):
            assert secret.encode() not in text, (secret, where)
