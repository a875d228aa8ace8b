"""The explain job on a Ray cluster of several nodes (``ray.cluster_utils.Cluster``: a head
that runs no tasks, as cluster.yaml's, and two worker nodes), which loses the node holding
the model actor in pass 1 and again in pass 2, and the node running the pairs pass's task,
as a cluster loses a machine: every row and every pair comes out exactly once, the proxies
count every image, and the numbers are the Python API's.

The losses happen on conditions, never on a clock: the job holds the model actor on a row
of each pass (``EMBCAM_FAULT`` ``hold``; the marker names the held worker's pid), and the
test removes the node that runs that worker. Only the first worker is held, so the row's
retry on another node goes on.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from explain_jobs import assert_as_the_python_api, kill_all
from ray.cluster_utils import Cluster

from embcam import save_checkpoint
from embcam.data.maps import MapStore
from embcam.data.runstate import RunFolder
from embcam.datasets import generate_dataset
from embcam.models import Preprocessing, build_model
from embcam.pairs.explain import explain_pairs

pytestmark = pytest.mark.slow  # a cluster of three nodes and a job


@pytest.fixture
def cluster(monkeypatch):
    """A head with no CPU and two worker nodes of 2 CPUs. Ray's files go to a directory of
    their own: the head writes its address there, where no other test's ``ray.init()`` looks
    for a cluster to join. Every process of the cluster and its jobs carries a marker, by
    which the teardown stops them all, the removed nodes' included."""
    temp = tempfile.mkdtemp(prefix="embcam-ray-", dir="/tmp")  # short: Ray's socket paths must fit
    marker = uuid.uuid4().hex
    monkeypatch.setenv("RAY_TMPDIR", temp)
    monkeypatch.setenv("EMBCAM_TEST_JOB", marker)
    # the head notices a lost node after two missed health checks of 1 s (Ray's default: 5 of 3 s)
    health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 2}
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": health})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2)
        yield cluster, marker
    finally:
        cluster.shutdown()
        kill_all(marker)
        shutil.rmtree(temp, ignore_errors=True)


def node_running(cluster: Cluster, pid: int):
    """The cluster's node whose raylet started process ``pid`` (a worker's parent chain)."""
    raylets = {node.all_processes["raylet"][0].process.pid: node for node in cluster.list_all_nodes()}
    while pid > 1:
        if pid in raylets:
            return raylets[pid]
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the parent
    raise AssertionError("the held worker belongs to no node of the cluster")


def held_pid(marker: Path, driver) -> int:
    """Waits for the held worker's marker (its pid). A held job cannot end; the deadline only
    turns a hang into a failure."""
    deadline = time.monotonic() + 600
    while not (marker.exists() and marker.read_text()):
        assert driver.poll() is None, ("the job ended, though a worker was to be held", driver.communicate())
        assert time.monotonic() < deadline, f"no worker held at {marker.name} after 600 s"
        time.sleep(0.05)
    return int(marker.read_text())


def test_losing_the_node_at_work_in_each_pass_loses_no_row(cluster, tmp_path):
    cluster, marker = cluster
    manifest = generate_dataset(tmp_path / "data", num_classes=6, images_per_class=8, min_side=48, max_side=64,
                                seed=11)
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, build_model("embcam:small-resnet+linear:16"), "embcam:small-resnet+linear:16",
                    Preprocessing(48))
    ids = pq.read_table(manifest, columns=["image_id"]).column("image_id").to_pylist()
    rows = len(ids)
    pairs = pa.table({"query_id": ids, "match_id": ids[5:] + ids[:5]})  # every image, in one chunk of pairs
    pq.write_table(pairs, tmp_path / "pairs.parquet")
    held = {"pass 1": tmp_path / "held-pass1", "pass 2": tmp_path / "held-pass2", "pairs": tmp_path / "held-pairs"}
    # pass 1's model stage is "embed", pass 2's is "model"; each holds on its last piece's first row
    faults = (f"embed:{ids[rows - 8]}:hold:{held['pass 1']};model:{ids[rows - 8]}:hold:{held['pass 2']};"
              f"pairs:{ids[0]}:hold:{held['pairs']}")
    out = tmp_path / "run"
    env = dict(os.environ, RAY_ADDRESS=cluster.address, EMBCAM_FAULT=faults, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    driver = subprocess.Popen(
        [sys.executable, "-m", "embcam.cli", "explain", "--manifest", str(manifest), "--out", str(out),
         "--checkpoint", str(checkpoint), "--proxy", "mean", "--strategy", "streaming", "--batch-size", "8",
         "--block-rows", "8", "--pairs", str(tmp_path / "pairs.parquet"), "--keep-maps", "--maps-dtype", "float32",
         "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for name in ("pass 1", "pass 2", "pairs"):
            node = node_running(cluster, held_pid(held[name], driver))
            assert node is not cluster.head_node  # the head runs no tasks
            if name != "pass 2":
                cluster.add_node(num_cpus=2)  # the replacement an autoscaler would start
            cluster.remove_node(node, allow_graceful=False)
        code = driver.wait(timeout=600)  # a guard against a hang only
        stdout, stderr = driver.communicate()
    finally:
        if driver.poll() is None:
            driver.kill()
        kill_all(marker)
    assert code == 0, stderr[-3000:]

    df = pq.read_table(out / "results").to_pandas()
    assert len(df) == rows and df.image_id.is_unique and set(df.image_id) == set(ids)  # each row exactly once
    assert (df.status == "ok").all(), df[df.status != "ok"].error.tolist()
    assert (out / "_SUCCESS").exists()
    assert_as_the_python_api((manifest, checkpoint, rows), df, out)  # proxy counts sum to the manifest, too
    # the pairs: every one once, as one sweep over the run's own maps in this process gives them
    got = pq.read_table(out / "pairs").to_pandas()
    pd.testing.assert_frame_equal(got, explain_pairs(pairs, MapStore(RunFolder(str(out)))).to_pandas())
    assert (got.status == "ok").all() and got.query_id.tolist() == ids
