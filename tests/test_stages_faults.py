"""The model stage under failures: a batch that raises is split until the failing rows are
alone, and only they become error rows; pass 1's pieces leave out the rows that failed (no
Ray: the stage and the commit are called directly)."""
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import torch

from embcam import EmbeddingCAM, load_model, save_checkpoint
from embcam.data.runstate import PARTIALS, STATE, RunFolder, piece_name
from embcam.job.model_stage import ExplainModel, ModelConfig
from embcam.job.tasks import commit_pass1
from embcam.models import Preprocessing, build_model


def _batch(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return {"image_id": np.array([f"i{k}" for k in range(n)], dtype=object),
            "row": np.arange(100, 100 + n), "label": np.array(["a", "b"] * (n // 2), dtype=object),
            "status": np.array(["ok"] * n, dtype=object), "error": np.array([None] * n, dtype=object),
            "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)}


def test_a_batch_that_raises_is_split_and_only_the_bad_row_fails(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", build_model("embcam:small-resnet+linear:8"), "embcam:small-resnet+linear:8",
                    Preprocessing(32))
    stage = ExplainModel(ModelConfig(checkpoint=str(tmp_path / "m.pt")), "self")
    batch = _batch(8, 32)
    poison = batch["image"][5].copy()
    real = stage.cam.__call__

    def cam(x, proxies):  # out of memory on any call that holds image 5 with others; image 5 alone fails too
        holds = any(torch.equal(stage.preprocess(torch.from_numpy(poison[None]))[0], xi) for xi in x)
        if holds:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")
        return real(x, proxies)

    stage.cam = cam
    out = stage(batch)
    assert list(out["status"]) == ["ok"] * 5 + ["error"] + ["ok"] * 2
    assert out["error"][5] == "model: RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB"
    model, prep, _ = load_model(checkpoint=str(tmp_path / "m.pt"))
    ref = EmbeddingCAM(model, strategy="autograd")(prep(torch.from_numpy(batch["image"])), "self")
    good = [0, 1, 2, 3, 4, 6, 7]
    np.testing.assert_allclose(out["heatmap"][good], ref.heatmaps[good].numpy(), rtol=1e-4,
                               atol=1e-6 * float(ref.heatmaps.max()))


def test_pass_one_pieces_cover_every_run_and_sum_only_ok_rows_with_a_direction(tmp_path):
    """Pass 1 (the model's embeddings, then ``commit_pass1``): one partial-sums piece per run
    of consecutive manifest rows; failed rows and embeddings without a direction are left out."""
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", build_model("embcam:small-resnet+linear:8"), "embcam:small-resnet+linear:8",
                    Preprocessing(32))
    stage = ExplainModel(ModelConfig(checkpoint=str(tmp_path / "m.pt")), "mean", output="embeddings")
    batch = _batch(7, 32)
    batch["row"] = np.array([7, 8, 9, 20, 21, 30, 31])  # three runs of consecutive rows
    batch["label"] = np.array(list("abababa"), dtype=object)
    batch["status"][4] = "error"
    out = stage(batch)
    out["embedding"][6] = 0.0  # row 31 (label a): no direction
    run = RunFolder(str(tmp_path / "run"))
    commit_pass1(out, run, None, None)
    assert sorted(run.pieces(STATE, PARTIALS)) == [(7, 10), (20, 22), (30, 32)]
    sums, counts = {}, {}
    for start, stop in run.pieces(STATE, PARTIALS):
        for part in pq.read_table(run.join(STATE, PARTIALS, piece_name(start, stop))).to_pylist():
            sums[(start, stop, part["label"])] = np.array(part["sum"])
            counts[(start, stop, part["label"])] = part["count"]
    assert counts == {(7, 10, "a"): 2, (7, 10, "b"): 1, (20, 22, "b"): 1, (30, 32, "b"): 1}  # row 21 had failed
    model, prep, _ = load_model(checkpoint=str(tmp_path / "m.pt"))
    with torch.no_grad():
        y = model(prep(torch.from_numpy(batch["image"]))).double().numpy()
    unit = y / np.linalg.norm(y, axis=1, keepdims=True)
    np.testing.assert_allclose(sums[(7, 10, "a")], unit[0] + unit[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sums[(30, 32, "b")], unit[5], rtol=1e-5, atol=1e-6)


def test_the_cpu_model_stage_uses_the_cpus_its_process_may_run_on(tmp_path):
    """A process kept to one CPU (taskset, a container's cpuset) runs the model on one
    thread: os.cpu_count() would count every CPU of the machine, and the extra threads wait."""
    assert os.cpu_count() > 1  # else this test could not tell the two apart
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", build_model("embcam:small-resnet+linear:8"), "embcam:small-resnet+linear:8",
                    Preprocessing(32))
    code = ("import os, torch; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); torch.set_num_threads(7)\n"
            "from embcam.job.model_stage import ExplainModel, ModelConfig\n"
            f"ExplainModel(ModelConfig(checkpoint={str(tmp_path / 'm.pt')!r}), 'self'); print(torch.get_num_threads())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1"]
