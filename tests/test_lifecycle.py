"""The run lifecycle every command shares: lease, begin (fresh / resume / complete / refuse),
prepare, record, finish. The two-driver test on the real job is in test_resume.py."""
import json
import socket
import subprocess
import sys
import time

import pytest

from embcam.data.runstate import STATE, RunFolder, RunMismatch, piece_name
from embcam.job.lifecycle import LEASE, Lease, RunBusy, RunLifecycle
from embcam.report import sanity_section

IDENTITY = {"manifest": {"rows": 4}, "proxy": "self"}


def lease_of(tmp_path, **holder):
    RunFolder(str(tmp_path)).write_json(holder, STATE, LEASE)


def test_a_living_holder_is_named_and_keeps_its_lease(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        lease_of(tmp_path, attempt="other", host=socket.gethostname(), pid=holder.pid, started="2026-12-07T10:00:00",
                 renewed=time.time())
        with pytest.raises(RunBusy, match=rf"host {socket.gethostname()}, pid {holder.pid}, started 2026-12-07T10:00"):
            Lease(RunFolder(str(tmp_path))).acquire()
    finally:
        holder.stdin.close()
        holder.wait()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lease_of(tmp_path, attempt="other", host=socket.gethostname(), pid=gone.pid, renewed=time.time())
    lease = Lease(RunFolder(str(tmp_path)))
    lease.acquire()
    try:
        assert RunFolder(str(tmp_path)).read_json(STATE, LEASE)["attempt"] == lease.attempt
    finally:
        lease.release()
    assert not RunFolder(str(tmp_path)).exists(STATE, LEASE)


def test_a_holder_on_another_host_is_gone_after_its_timeout(tmp_path):
    lease_of(tmp_path, attempt="other", host="elsewhere", pid=1, renewed=time.time())
    with pytest.raises(RunBusy, match="host elsewhere, pid 1"):
        Lease(RunFolder(str(tmp_path))).acquire()
    lease_of(tmp_path, attempt="other", host="elsewhere", pid=1, renewed=time.time() - 61)
    lease = Lease(RunFolder(str(tmp_path)))
    lease.acquire()
    lease.release()


def test_the_holder_renews_its_lease_until_released(tmp_path):
    run = RunFolder(str(tmp_path))
    lease = Lease(run, heartbeat=0.01)
    lease.acquire()
    first = run.read_json(STATE, LEASE)["renewed"]
    while run.read_json(STATE, LEASE)["renewed"] == first:  # renewed by the thread: a condition, no clock
        time.sleep(0.01)
    lease.release()
    assert not run.exists(STATE, LEASE)


def test_begin_decides_fresh_resume_complete_or_refuses(tmp_path):
    out = str(tmp_path / "run")
    with RunLifecycle(out, IDENTITY) as life:
        assert life.state == "fresh"
        life.prepare()
        saved = life.record({"rows": 4, "block_rows": 2})
        life.run.write_bytes(b"x", "results", piece_name(0, 2))
    assert saved["identity"] == IDENTITY and len(saved["run_id"]) == 16
    with RunLifecycle(out, IDENTITY) as life:  # interrupted: resumed, the run id kept
        assert life.state == "resume"
        life.prepare()
        assert life.record({"rows": 99})["run_id"] == saved["run_id"]
        life.finish({"counts": {}})
    with RunLifecycle(out, IDENTITY) as life:
        assert life.state == "complete"
    with pytest.raises(RunMismatch, match=r"a complete run with another configuration \(proxy: 'self' -> 'mean'\)"):
        with RunLifecycle(out, dict(IDENTITY, proxy="mean")):
            pass
    assert not RunFolder(out).exists(STATE, LEASE)  # released on the refusal too


def test_another_configuration_starts_afresh_when_nothing_was_committed(tmp_path):
    out = str(tmp_path / "run")
    with RunLifecycle(out, IDENTITY) as life:
        life.prepare()
        life.record({})
    with RunLifecycle(out, dict(IDENTITY, proxy="mean")) as life:
        assert life.state == "fresh" and "nothing committed: starting afresh" in life.note


def test_overwrite_removes_everything_the_run_wrote_sanity_included(tmp_path):
    out = tmp_path / "run"
    with RunLifecycle(str(out), IDENTITY) as life:
        life.prepare()
        life.record({})
    (out / "sanity").mkdir()
    (out / "sanity" / "sanity.json").write_text("{}")
    (out / "notes.txt").write_text("the user's")
    with RunLifecycle(str(out), dict(IDENTITY, proxy="mean"), overwrite=True) as life:
        life.prepare()
    assert sorted(p.name for p in out.iterdir()) == ["_embcam", "notes.txt"]


def test_the_report_shows_only_the_sanity_check_of_this_run(tmp_path):
    out = tmp_path / "run"
    with RunLifecycle(str(out), IDENTITY) as life:
        life.prepare()
        run_id = life.record({})["run_id"]
    (out / "sanity").mkdir()
    check = {"randomisation": {}, "deletion": {}}
    (out / "sanity" / "sanity.json").write_text(json.dumps(dict(check, run_id="an earlier run")))
    assert sanity_section(str(out), tmp_path / "report", "sanity/0") is None
    (out / "sanity" / "sanity.json").write_text(json.dumps(dict(check, run_id=run_id)))
    assert sanity_section(str(out), tmp_path / "report", "sanity/0")["run_id"] == run_id
