"""Rows that kill their worker, without Ray: a "death" here is an exception that escapes
the stage between the marker being written and removed, exactly what a killed process
leaves behind; each call after it is the retry Ray would make. The fault hook
(``EMBCAM_FAULT``) runs in a process of its own: it kills or holds the process it runs in."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import embcam.job.attempts
from embcam.data.runstate import RunFolder
from embcam.job.attempts import ISOLATE_AFTER, Attempts

PACKAGE = os.path.dirname(embcam.job.attempts.__file__)


class Death(BaseException):
    pass


def batch(rows):
    n = len(rows)
    return {"row": np.array(rows), "image_id": np.array([f"i{r}" for r in rows], dtype=object),
            "status": np.array(["ok"] * n, dtype=object), "error": np.array([None] * n, dtype=object)}


def stage(killers, seen):
    """Doubles ``row``; dies on an OK killer row (skips failed rows, as every stage does)."""
    def fn(b):
        for r, status in zip(b["row"], b["status"]):
            if status == "ok":
                seen.append(int(r))
                if r in killers:
                    raise Death
        return dict(b, twice=b["row"] * 2)
    return fn


def test_a_killer_row_is_isolated_after_repeated_deaths_and_the_rest_complete(tmp_path):
    attempts, seen = Attempts(RunFolder(str(tmp_path)), "decode"), []
    fn = stage({12, 14}, seen)
    deaths = 0
    while True:
        try:
            out = attempts(batch([10, 11, 12, 13, 14, 15]), fn)
            break
        except Death:
            deaths += 1
            assert deaths < 10, "never loops"
    assert deaths == ISOLATE_AFTER + 2  # two whole-batch deaths, then one per killer row
    assert list(out["status"]) == ["ok", "ok", "error", "ok", "error", "ok"]
    assert out["error"][2].startswith("worker died while processing this row (decode stage")
    assert list(out["twice"]) == [20, 22, 24, 26, 28, 30]  # every row has its output columns
    assert not (tmp_path / "_embcam" / "attempts").exists() or not any((tmp_path / "_embcam" / "attempts").iterdir())


def test_a_batch_that_dies_outside_any_row_fails_whole_after_a_bound(tmp_path):
    attempts, calls = Attempts(RunFolder(str(tmp_path)), "model"), []

    def dies_unless_all_failed(b):
        calls.append(len(b["row"]))
        if (b["status"] == "ok").all() and len(b["row"]) == 3 and len(calls) < 100:
            raise Death  # dies on the whole batch, never on one row
        return b

    outs = []
    for _ in range(20):
        try:
            outs.append(attempts(batch([0, 1, 2]), dies_unless_all_failed))
            break
        except Death:
            continue
    assert outs, "the bound was never reached"
    assert list(outs[0]["status"]) == ["ok"] * 3  # row by row, each row alone succeeds


def test_a_healthy_batch_leaves_no_marker(tmp_path):
    attempts = Attempts(RunFolder(str(tmp_path)), "decode")
    out = attempts(batch([3, 4]), lambda b: b)
    assert list(out["row"]) == [3, 4]
    assert not any((tmp_path / "_embcam" / "attempts").iterdir())


@pytest.mark.parametrize("rows", [[5], [7, 8, 9]])
def test_rows_dying_every_time_fail_whole_after_the_bound(tmp_path, rows):
    attempts = Attempts(RunFolder(str(tmp_path)), "decode")

    def always(b):
        if (b["status"] == "ok").any():
            raise Death
        return b

    for tries in range(ISOLATE_AFTER + 2 * len(rows) + 3):  # noqa: B007 - the count is read after the loop
        try:
            out = attempts(batch(rows), always)
            break
        except Death:
            continue
    assert (out["status"] == "error").all()
    assert tries <= ISOLATE_AFTER + len(rows)


@pytest.fixture
def fault_process():
    """Starts processes that make ``fault_point`` calls under an ``EMBCAM_FAULT``, then print
    ``returned``; kills any still running at teardown. Each imports ``embcam.faults``
    alone (not the package's ``__init__``, which imports torch): it starts in well under a second."""
    started = []

    def start(faults: str, calls: str) -> subprocess.Popen:
        code = (f"import sys, types\npackage = types.ModuleType('embcam')\npackage.__path__ = [{PACKAGE!r}]\n"
                f"sys.modules['embcam'] = package\nfrom embcam.faults import fault_point\n{calls}\n"
                "print('returned')")
        started.append(subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, EMBCAM_FAULT=faults),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        return started[-1]

    yield start
    for process in started:
        process.kill()
        process.communicate()


@pytest.mark.slow  # a subprocess (a quick one)
def test_a_hold_blocks_its_worker_until_it_is_killed(tmp_path, fault_process):
    held = tmp_path / "held"
    worker = fault_process(f"model:b;commit:b:hold:{held}",
                           "fault_point('commit', ['a']); fault_point('decode', ['b']); fault_point('commit', ['b'])")
    deadline = time.monotonic() + 120  # a failure guard only: the hold itself never ends
    while not (held.exists() and held.read_text()):
        assert worker.poll() is None, ("ended before the hold", worker.communicate())
        assert time.monotonic() < deadline, "never reached the hold"
        time.sleep(0.01)
    assert worker.poll() is None  # held: the marker is written, and nothing ends the hold but a kill
    assert held.read_text() == str(worker.pid)  # the marker names the held process
    os.kill(worker.pid, signal.SIGKILL)
    out, _ = worker.communicate(timeout=120)
    assert worker.returncode == -signal.SIGKILL and "returned" not in out
    # only the first worker is held: the row's retry (the marker exists) goes on
    again = fault_process(f"commit:b:hold:{held}", "fault_point('commit', ['b'])")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and "returned" in out, err


@pytest.mark.slow  # a subprocess (a quick one)
@pytest.mark.parametrize("faults, killed", [("commit:b", True), ("commit:a", False), ("model:b", False)])
def test_a_kill_fault_kills_only_at_its_stage_and_row(fault_process, faults, killed):
    worker = fault_process(faults, "fault_point('commit', ['b'])")
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == (-signal.SIGKILL if killed else 0), err
    assert ("returned" in out) != killed


@pytest.mark.slow  # a subprocess (a quick one)
def test_a_once_fault_kills_the_first_time_only(tmp_path, fault_process):
    faults = f"commit:b:once:{tmp_path / 'killed'}"
    first = fault_process(faults, "fault_point('commit', ['b'])")
    first.communicate(timeout=120)
    assert first.returncode == -signal.SIGKILL and (tmp_path / "killed").exists()
    again = fault_process(faults, "fault_point('commit', ['b'])")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and out.strip() == "returned", err


@pytest.mark.slow  # a subprocess (a quick one)
@pytest.mark.parametrize("faults", ["commit:b:hold", "commit:b:sometimes:/tmp/x"])
def test_a_malformed_fault_is_refused_where_it_matches(fault_process, faults):
    worker = fault_process(faults, "fault_point('commit', ['a']); fault_point('commit', ['b'])")
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 1 and "ValueError: EMBCAM_FAULT: " in err
