"""Crash safety of the explain job with real processes: a SIGKILLed driver resumes, killed
workers lose nothing, a row that kills its worker becomes one error row, and a run folder
never describes what it does not hold.

Each job here runs as its own `embcam explain` process, so that a fault can be injected
into its workers (EMBCAM_FAULT) and the driver can be killed. It joins the session's Ray,
as a driver joins a cluster, and hands the faults to its workers through Ray's runtime
environment (``embcam.faults``). Every process of such a job, its workers included, carries
a unique marker in its environment (EMBCAM_TEST_JOB), by which the fixture kills them all.

A test that stops a job mid-run never races it: the job holds a worker on the last piece
(``hold_last_piece``), so it cannot finish, and the test stops it once that worker is
held and a piece is committed. Deadlines only turn a hang into a failure.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from explain_jobs import assert_as_the_python_api, kill_all

from embcam import save_checkpoint
from embcam.cli import main
from embcam.data.runstate import RunFolder, RunMismatch, covered
from embcam.datasets import generate_dataset
from embcam.job.lifecycle import RunLifecycle
from embcam.job.pipeline import ExplainConfig, run_explain
from embcam.models import Preprocessing, build_model

pytestmark = pytest.mark.slow  # every test here runs jobs, most in processes of their own
SIZE = 48


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """6 classes x 12 images (9 pieces of 8 rows); a small model for 48 px inputs."""
    root = tmp_path_factory.mktemp("resume")
    manifest = generate_dataset(root, num_classes=6, images_per_class=12, min_side=48, max_side=64, seed=5)
    torch.manual_seed(0)
    checkpoint = root / "model.pt"
    save_checkpoint(checkpoint, build_model("embcam:small-resnet+linear:16"), "embcam:small-resnet+linear:16",
                    Preprocessing(SIZE))
    return manifest, checkpoint, pq.read_table(manifest).num_rows


@pytest.fixture
def jobs(ray_session):
    """Starts `embcam explain` processes on the session's Ray; kills every process of theirs
    (drivers and workers) at teardown."""
    marker = uuid.uuid4().hex
    address = ray_session.get_runtime_context().gcs_address

    def start(dataset, out, *extra, fault=None):
        env = dict(os.environ, EMBCAM_TEST_JOB=marker, RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_ADDRESS=address)
        if fault:
            env["EMBCAM_FAULT"] = fault
        cmd = [sys.executable, "-m", "embcam.cli", *explain_argv(dataset, out, *extra)]
        # SIGINT back to its default in the child: a shell running the suite in the background
        # starts it ignored, and an ignored SIGINT stays ignored across exec (no Ctrl-C to test)
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def finish(process, timeout=600):  # a guard against a hang, far above a job's time on a loaded machine
        out, err = process.communicate(timeout=timeout)
        return process.returncode, out, err

    def crash(process):
        """SIGKILL the driver, then (as a machine crash would) every worker of its job: Ray
        stops them too, but a moment later, in which they could commit their batches in flight."""
        if process.poll() is None:  # else it died by itself (a fault on the driver)
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
        kill_all(marker)

    yield start, finish, crash
    kill_all(marker)


def explain_argv(dataset, out, *extra) -> list[str]:
    """The arguments of ``embcam`` for a job on ``dataset`` writing to ``out``."""
    manifest, checkpoint, _ = dataset
    return ["explain", "--manifest", str(manifest), "--out", str(out), "--checkpoint", str(checkpoint),
            "--batch-size", "8", "--block-rows", "8", "--no-progress", *map(str, extra)]


def hold_last_piece(dataset, folder: Path) -> tuple[str, Path]:
    """An ``EMBCAM_FAULT`` that holds for ever the worker committing the last piece's first
    row (``commit`` is the last stage: pieces that reach it earlier are committed, that one
    cannot be), and the marker file the worker creates once it is held. A job started with
    it cannot finish until it is killed."""
    manifest, _, rows = dataset
    last = rows - 8  # the first row of the last piece (--block-rows 8)
    image_id = pq.read_table(manifest, columns=["image_id"]).column("image_id")[last].as_py()
    marker = folder / "held"
    return f"commit:{image_id}:hold:{marker}", marker


def pieces(out) -> list[Path]:
    return list((Path(out) / "results").glob("part-*.parquet"))


def wait_until(condition, driver, finish, what: str) -> None:
    """Polls ``condition()`` while the (held) driver runs. Nothing here depends on how fast
    the job is: a held job cannot end, and the deadline only turns a hang into a failure."""
    deadline = time.monotonic() + 600
    while not condition():
        assert driver.poll() is None, ("the job ended, though a worker was held", finish(driver))
        assert time.monotonic() < deadline, f"still not {what} after 600 s"
        time.sleep(0.05)


def exit_status(argv: list[str]) -> int:
    """``embcam ARGV``'s exit status, run in this process."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def results(out) -> pd.DataFrame:
    return pd.read_parquet(Path(out) / "results")


def assert_complete(out, rows):
    df = results(out)
    assert len(df) == rows and df.image_id.is_unique  # one row per manifest row, exactly once
    assert (Path(out) / "_SUCCESS").exists()
    return df, json.loads((Path(out) / "summary.json").read_text())


def test_sigkilled_driver_resumes_where_it_stopped(ray_session, dataset, jobs, tmp_path, capsys):
    start, finish, crash = jobs
    rows = dataset[2]
    out = tmp_path / "run"
    hold, held = hold_last_piece(dataset, tmp_path)
    driver = start(dataset, out, "--proxy", "mean", "--strategy", "streaming", fault=hold)
    wait_until(lambda: held.exists() and pieces(out), driver, finish, "held with a piece of pass 2 committed")
    # a second driver on the same run (here, this process) is refused while the first one lives ...
    code, stderr = exit_status(explain_argv(dataset, out, "--proxy", "mean", "--strategy", "streaming")), \
        capsys.readouterr().err
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert f"{out} is being written by another embcam run (host {socket.gethostname()}, pid {driver.pid}" in stderr
    crash(driver)  # ... and takes over at once once it is gone (same host, its pid dead)
    done = sum(pq.read_metadata(p).num_rows for p in pieces(out))
    assert 0 < done < rows and not (out / "_SUCCESS").exists() and not (out / "summary.json").exists()
    proxies_written = (out / "proxies.parquet").stat().st_mtime_ns

    # the same command resumes (in this process, on the session's Ray)
    assert exit_status(explain_argv(dataset, out, "--proxy", "mean", "--strategy", "streaming")) == 0
    captured = capsys.readouterr()
    assert f"resuming {out}" in captured.err and "carried over" in captured.out
    df, summary = assert_complete(out, rows)
    assert summary["counts"]["resumed"] >= done > 0 and summary["counts"]["ok"] == rows
    assert (out / "proxies.parquet").stat().st_mtime_ns == proxies_written  # pass 1 was not redone

    assert_as_the_python_api(dataset, df, out)  # the numbers an uninterrupted run must give

    # complete: says so and does no work; another configuration is refused with the reason
    # (in this process: the CLI's handling of both is the same as in a job's own process)
    argv = explain_argv(dataset, out, "--proxy", "mean", "--strategy", "streaming")
    assert exit_status(argv) == 0 and "already holds this run, complete" in capsys.readouterr().err
    assert exit_status(explain_argv(dataset, out, "--proxy", "self")) == 2
    err = capsys.readouterr().err
    assert "proxy: 'mean' -> 'self'" in err and "Traceback" not in err and err.count("\n") == 1


def test_killed_workers_lose_nothing_and_a_row_that_kills_its_worker_becomes_one_error_row(dataset, jobs, tmp_path):
    """One job, three faults: the model actor and a commit task are killed once each (their
    batches are redone, nothing is lost), and one row kills its decode worker every time it
    is tried (it becomes the one error row; the job goes on)."""
    start, finish, crash = jobs
    rows = dataset[2]
    ids = pq.read_table(dataset[0], columns=["image_id"]).column("image_id").to_pylist()
    killed = {stage: tmp_path / f"{stage}.killed" for stage in ("model", "commit")}
    killer = ids[17]
    faults = ";".join([*(f"{stage}:{image_id}:once:{killed[stage]}" for stage, image_id in (("model", ids[30]),
                                                                                             ("commit", ids[60]))),
                       f"decode:{killer}"])
    code, _, stderr = finish(start(dataset, tmp_path / "out", fault=faults))
    assert code == 0, stderr
    assert all(marker.exists() for marker in killed.values())  # each worker really was killed once
    df, summary = assert_complete(tmp_path / "out", rows)
    bad = df[df.status == "error"]
    assert bad.image_id.tolist() == [killer]
    assert bad.error.iloc[0].startswith("worker died while processing this row")
    assert summary["counts"]["ok"] == rows - 1
    assert not (tmp_path / "out" / "_embcam" / "attempts").exists()


def test_ctrl_c_on_an_overwrite_leaves_nothing_complete_and_the_command_without_overwrite_resumes(
        ray_session, dataset, jobs, tmp_path, tmp_path_factory, capsys):
    """A complete run, overwritten by another configuration, interrupted with Ctrl-C: the
    message says what is committed and how to resume, nothing reads as complete, another
    configuration is refused, and the command without --overwrite finishes the new run."""
    start, finish, _ = jobs
    manifest, checkpoint, rows = dataset
    run_explain(ExplainConfig(manifest=str(manifest), out=str(tmp_path), checkpoint=str(checkpoint),
                              batch_size=8), progress=False)
    hold, held = hold_last_piece(dataset, tmp_path_factory.mktemp("hold"))  # outside the run folder
    driver = start(dataset, tmp_path, "--proxy", "mean", "--overwrite", fault=hold)
    wait_until(lambda: held.exists() and not (tmp_path / "_SUCCESS").exists() and pieces(tmp_path), driver,
               finish, "held with a piece of the new run committed")
    driver.send_signal(signal.SIGINT)  # the driver stops though a worker is held (Ray kills it)
    code, _, stderr = finish(driver)
    assert code == 130, stderr
    said = re.search(rf"interrupted; (\d+) of {rows} rows are committed in {re.escape(str(tmp_path))}\. "
                     r"Re-run the same command without --overwrite to resume\.", stderr)
    assert said, stderr
    assert 0 < int(said[1]) <= sum(pq.read_metadata(p).num_rows for p in pieces(tmp_path)) < rows
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "_SUCCESS").exists()
    report = ["report", str(tmp_path), "--out", str(tmp_path / "rep")]
    assert exit_status(report) == 2 and "is unfinished" in capsys.readouterr().err
    assert exit_status(report + ["--allow-partial"]) == 0
    assert "UNFINISHED" in (tmp_path / "rep" / "report.md").read_text()
    # a different configuration is refused while anything is committed ...
    with pytest.raises(RunMismatch, match="proxy: 'mean' -> 'self'"):
        run_explain(ExplainConfig(manifest=str(manifest), out=str(tmp_path), checkpoint=str(checkpoint),
                                  batch_size=8), progress=False)
    # ... and the command without --overwrite resumes the new run (in this process)
    assert main(explain_argv(dataset, tmp_path, "--proxy", "mean")) == 0
    assert f"resuming {tmp_path}" in capsys.readouterr().err
    df, summary = assert_complete(tmp_path, rows)
    assert summary["counts"]["ok"] == rows and summary["counts"]["resumed"] >= int(said[1])
    assert summary["config"]["proxy"] == "mean"


def test_an_empty_unfinished_output_never_blocks_a_new_run(ray_session, dataset, tmp_path):
    """A run started with other options that committed nothing (its run.json written, an empty
    results folder) is replaced by the new run, which explains every row."""
    manifest, checkpoint, rows = dataset
    with RunLifecycle(str(tmp_path), {"manifest": {"rows": rows}, "proxy": "mean", "full_decode": True}) as life:
        life.prepare()
        life.record({"plan": "streaming"})
    (tmp_path / "results").mkdir()
    summary = run_explain(ExplainConfig(manifest=str(manifest), out=str(tmp_path), checkpoint=str(checkpoint),
                                        batch_size=8), progress=False)
    assert summary["counts"]["results"] == rows and summary["config"]["full_decode"] is False
    saved = json.loads((tmp_path / "_embcam" / "run.json").read_text())
    assert saved["identity"]["proxy"] == "self" and saved["plan"] == "one-pass"
    assert_complete(tmp_path, rows)


def test_stored_maps_plan_resumes_after_a_kill_in_each_pass(ray_session, dataset, jobs, tmp_path):
    """Killed in pass 1, in the reduce and in pass 2, each time on a condition: each resume
    redoes only what was in flight, and the run ends as one uninterrupted run would."""
    start, finish, crash = jobs
    manifest, checkpoint, rows = dataset
    out = tmp_path / "run"
    plan = ("--proxy", "mean", "--strategy", "stored-maps", "--maps-dtype", "float32")  # maps exact: see the end
    partials = out / "_embcam" / "partials"

    def committed(folder):
        return {p.name: p.stat().st_mtime_ns for p in folder.glob("part-*.parquet")}

    hold, held = hold_last_piece(dataset, tmp_path / "pass1")  # pass 1's commit stage is "pass1"
    (tmp_path / "pass1").mkdir()
    driver = start(dataset, out, *plan, fault=hold.replace("commit:", "pass1:", 1))
    wait_until(lambda: held.exists() and committed(partials), driver, finish, "held in pass 1 with a piece")
    crash(driver)
    pass1 = committed(partials)
    assert 0 < covered(RunFolder(str(out)).pieces("_embcam", "partials"), rows) < rows
    assert set(committed(out / "maps")) >= set(pass1) and not (out / "proxies.parquet").exists()

    driver = start(dataset, out, *plan, fault="reduce:*")  # the driver dies as it starts the reduce
    code, _, _ = finish(driver)
    crash(driver)
    assert code == -signal.SIGKILL and not (out / "proxies.parquet").exists()
    assert covered(RunFolder(str(out)).pieces("_embcam", "partials"), rows) == rows
    assert {name: committed(partials)[name] for name in pass1} == pass1  # pass 1's pieces were not redone

    hold, held = hold_last_piece(dataset, tmp_path)
    driver = start(dataset, out, *plan, fault=hold)
    wait_until(lambda: held.exists() and pieces(out), driver, finish, "held in pass 2 with a piece")
    crash(driver)
    done = sum(pq.read_metadata(p).num_rows for p in pieces(out))
    assert 0 < done < rows and committed(partials).keys() == set(committed(out / "maps"))
    proxies_written = (out / "proxies.parquet").stat().st_mtime_ns

    # the resume in this process (the session's Ray): what it must do is the same
    run_explain(ExplainConfig(manifest=str(manifest), out=str(out), checkpoint=str(checkpoint), batch_size=8,
                              block_rows=8, proxy="mean", strategy="stored-maps", maps_dtype="float32"), progress=False)
    df, summary = assert_complete(out, rows)
    assert summary["plan"] == "stored-maps" and summary["counts"]["resumed"] >= done
    assert list(summary["passes"]) == ["pass 2 of 2, heatmaps from the stored maps"]  # pass 1 was done
    assert (out / "proxies.parquet").stat().st_mtime_ns == proxies_written and not (out / "maps").exists()
    assert_as_the_python_api(dataset, df, out)  # what an uninterrupted run gives, from float32 maps


def test_a_failed_write_ends_the_job_in_one_line_and_the_resume_finishes(ray_session, dataset, jobs, tmp_path):
    """A full disk at the second results piece (``write:<file>:enospc``, raised where the piece
    is written): one line naming --out and the file, no temporaries left; the same command
    then finishes the run."""
    start, finish, crash = jobs
    manifest, checkpoint, rows = dataset
    out = tmp_path / "run"
    piece = "part-000000000008-000000000016.parquet"
    code, _, stderr = finish(start(dataset, out, fault=f"write:{piece}:enospc"))
    (line,) = [line for line in stderr.splitlines() if line.startswith("embcam")]  # Ray's own lines aside
    assert code == 2 and "Traceback" not in stderr, stderr
    assert line.startswith(f"embcam explain: error: --out {out}: writing results/{piece} failed: "
                           "No space left on device; what was committed is kept")
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not (out / "results" / piece).exists() and not (out / "_SUCCESS").exists()
    summary = run_explain(ExplainConfig(manifest=str(manifest), out=str(out), checkpoint=str(checkpoint),
                                        batch_size=8, block_rows=8), progress=False)
    assert summary["counts"]["ok"] == rows
    assert_complete(out, rows)


def test_four_driver_kills_on_one_batch_leave_no_false_error_row(ray_session, s3_server, dataset, jobs, tmp_path):
    """--out on an S3-compatible server, so the model stage counts worker deaths on the node's
    own disk. The driver is killed three times while the model holds the same batch, then the
    run finishes (the fourth attempt): every row is ok. Counts that outlived their attempt
    would have made the third attempt go row by row and the fourth fail the held row as
    "worker died while processing this row"."""
    start, finish, crash = jobs
    manifest, checkpoint, rows = dataset
    out = s3_server.uri("four-kills")
    held_row = pq.read_table(manifest, columns=["image_id"]).column("image_id")[0].as_py()  # the first batch
    for kill in range(3):
        held = tmp_path / f"held-{kill}"
        driver = start(dataset, out, fault=f"model:{held_row}:hold:{held}")
        wait_until(lambda held=held: held.exists() and held.read_text(), driver, finish, f"held (attempt {kill + 1})")
        crash(driver)
    summary = run_explain(ExplainConfig(manifest=str(manifest), out=out, checkpoint=str(checkpoint), batch_size=8,
                                        block_rows=8), progress=False)
    df = pq.read_table("embcam-test/four-kills/results", filesystem=s3_server.filesystem()).to_pandas()
    assert len(df) == rows and df.image_id.is_unique
    assert (df.status == "ok").all(), df[df.status != "ok"].error.tolist()
    assert summary["counts"]["ok"] == rows

