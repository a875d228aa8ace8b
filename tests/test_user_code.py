"""User code on the Ray workers: `--py-modules` and `--working-dir` ship a model module that
neither the driver nor any worker could import otherwise, through Ray's runtime_env.

Each job runs as its own `embcam explain` process (its own local Ray) from a cwd that does
not hold the code and without PYTHONPATH, so the flags are the only way in. Every process
of such a job carries a marker in its environment; the fixture kills any left at the end.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from embcam import EmbeddingCAM
from embcam.cli import main
from embcam.data.images import decode_image, resize_square
from embcam.datasets import generate_dataset
from embcam.job.pipeline import ExplainConfig, run_explain
from embcam.models import Preprocessing

SIZE = 32

# A small embedding network whose default target layer (layer4, a conv) feeds a BatchNorm:
# the job must resolve the target before folding BatchNorm, or it explains bn4's output.
NET_CODE = '''
import torch
from torch import nn


class Net(nn.Module):
    embcam_target_layer = "layer4"

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8)
        self.layer4, self.bn4 = nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn4(self.layer4(x)))
        return self.head(x.mean((-2, -1)))


def seeded_net():
    """The same weights and BatchNorm statistics wherever it is built."""
    net, g = Net(), torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith("running_var")
                        else torch.randn(t.shape, generator=g) * 0.5)
    return net.eval()
'''


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    """User code in three folders on no path, each needing the next: a working dir
    (wd/mymodel.py) whose factory comes from a package folder (pkgs/mymodels), which
    builds the network of a single .py module (lib/layers.py)."""
    root = tmp_path_factory.mktemp("code")
    (root / "wd").mkdir()
    (root / "wd" / "mymodel.py").write_text("import mymodels\n\n\ndef factory():\n    return mymodels.factory()\n")
    (root / "pkgs" / "mymodels").mkdir(parents=True)
    (root / "pkgs" / "mymodels" / "__init__.py").write_text("from .build import factory\n")
    (root / "pkgs" / "mymodels" / "build.py").write_text("import layers\n\n\ndef factory():\n"
                                                         "    return layers.seeded_net()\n")
    (root / "pkgs" / "unrelated.py").write_text("raise RuntimeError('never imported: not named')\n")
    (root / "lib").mkdir()
    (root / "lib" / "layers.py").write_text(NET_CODE)
    (root / "lib" / "notes.txt").write_text("not code\n")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("usercode-data")
    return generate_dataset(root, num_classes=2, images_per_class=3, min_side=40, max_side=56, seed=11)


@pytest.fixture
def job(tmp_path, ray_session):
    """Runs `embcam explain ARGS` from an empty cwd, without PYTHONPATH, joining the session's
    Ray as a driver joins a cluster (the user code travels in the job's runtime env, which
    the session's workers know nothing of); kills what it left."""
    marker = uuid.uuid4().hex
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    address = ray_session.get_runtime_context().gcs_address

    def run(*args):
        env = dict(os.environ, EMBCAM_TEST_JOB=marker, RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_ADDRESS=address)
        env.pop("PYTHONPATH", None)
        cmd = [sys.executable, "-m", "embcam.cli", "explain", "--image-size", str(SIZE), "--batch-size", "4",
               "--no-progress", *map(str, args)]
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)

    yield run, cwd
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            if pid != os.getpid() and f"EMBCAM_TEST_JOB={marker}".encode() in Path(f"/proc/{pid}/environ").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def reference_heatmaps(code, manifest, image_ids):
    """The model imported here by its path, explained by the core library, unprepared."""
    spec = importlib.util.spec_from_file_location("layers_reference", code / "lib" / "layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = pq.read_table(manifest).to_pandas().set_index("image_id")
    images = np.stack([resize_square(decode_image((Path(manifest).parent / table.uri[i]).read_bytes()), SIZE)
                       for i in image_ids])
    x = Preprocessing(SIZE)(torch.from_numpy(images))
    return EmbeddingCAM(module.seeded_net(), "layer4", strategy="autograd")(x, "self")


def assert_matches_reference(out: Path, code, manifest):
    summary = json.loads((out / "summary.json").read_text())
    df = pd.read_parquet(out / "results").sort_values("image_id")
    assert (df.status == "ok").all() and summary["counts"]["ok"] == len(df) == 6
    ref = reference_heatmaps(code, manifest, df.image_id)
    heat = np.stack(df.heatmap).reshape(ref.heatmaps.shape)
    np.testing.assert_allclose(heat, ref.heatmaps.numpy(), rtol=1e-4, atol=1e-6 * float(ref.heatmaps.max()))
    np.testing.assert_allclose(np.stack(df.embedding), ref.embeddings.numpy(), rtol=1e-4, atol=1e-6)
    return summary


@pytest.mark.slow  # a job in a process of its own
def test_user_code_reaches_the_driver_and_every_worker(code, dataset, job):
    """A package folder and a .py file by --py-modules, a module in --working-dir; --out and
    --manifest relative to the driver's cwd, which is not the workers' (their working dir)."""
    run, cwd = job
    (cwd / "data").symlink_to(Path(dataset).parent)
    done = run("--manifest", "data/manifest.parquet", "--out", "out", "--model", "mymodel:factory",
               "--working-dir", code / "wd", "--py-modules", code / "pkgs" / "mymodels",
               "--py-modules", code / "lib" / "layers.py")
    assert done.returncode == 0, done.stderr
    summary = assert_matches_reference(cwd / "out", code, dataset)
    assert summary["config"]["out"] == str(cwd / "out")  # made absolute on the driver
    assert summary["config"]["py_modules"] == [str(code / "pkgs" / "mymodels"), str(code / "lib" / "layers.py")]


@pytest.mark.slow  # a subprocess
def test_without_the_flag_the_model_fails_in_one_line(code, dataset, job, tmp_path):
    run, _ = job
    done = run("--manifest", dataset, "--out", tmp_path / "run", "--model", "mymodels:factory")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "embcam explain: error: --model mymodels:factory: no module named 'mymodels' here; for your own code: "
        "ship it with --py-modules PATH or --working-dir DIR, or install it on every node"]
    assert not (tmp_path / "run").exists()


def test_bad_paths_fail_fast_in_one_line(code, dataset, tmp_path, capsys):
    args = ["explain", "--manifest", str(dataset), "--out", str(tmp_path / "o"), "--model", "mymodels:factory"]
    assert main(args + ["--py-modules", str(tmp_path / "nope")]) == 2
    assert main(args + ["--py-modules", str(code / "lib" / "notes.txt")]) == 2
    assert main(args + ["--working-dir", str(code / "lib" / "layers.py")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"embcam explain: error: --py-modules {tmp_path / 'nope'}: not a package folder or a .py file",
        f"embcam explain: error: --py-modules {code / 'lib' / 'notes.txt'}: not a package folder or a .py file",
        f"embcam explain: error: --working-dir {code / 'lib' / 'layers.py'}: not a folder"]
    assert not (tmp_path / "o").exists()


def test_the_driver_imports_only_what_is_named(code):
    """Naming pkgs/mymodels makes `mymodels` importable for the build, not its neighbours,
    and nothing stays on the path afterwards."""
    from embcam.job.user_code import importable

    path, meta_path = list(sys.path), list(sys.meta_path)
    with importable([str(code / "pkgs" / "mymodels")], None):
        assert importlib.util.find_spec("mymodels") is not None
        assert importlib.util.find_spec("unrelated") is None
    assert sys.path == path and sys.meta_path == meta_path
    assert importlib.util.find_spec("mymodels") is None


def test_user_code_needs_a_ray_this_process_did_not_start(ray_session, code, dataset, tmp_path):
    cfg = ExplainConfig(manifest=str(dataset), out=str(tmp_path / "o"), model="mymodels:factory",
                        py_modules=[str(code / "pkgs" / "mymodels")])
    with pytest.raises(ValueError, match=r"Ray is already initialised in this process.*ray.init\(runtime_env="):
        run_explain(cfg, progress=False)
    assert not (tmp_path / "o").exists()


def test_a_submitted_jobs_own_working_dir_is_not_overridden(code, dataset, tmp_path, monkeypatch):
    """Inside `ray job submit --working-dir`, Ray refuses to merge a second working_dir."""
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    cfg = ExplainConfig(manifest=str(dataset), out=str(tmp_path / "o"), model="mymodel:factory",
                        working_dir=str(code / "wd"))
    with pytest.raises(ValueError, match="--working-dir: this job was submitted with its own working_dir"):
        run_explain(cfg, progress=False)
