"""Rows that kill their worker, without Ray: a "death" here is an exception that escapes
the stage between the marker being written and removed, exactly what a killed process
leaves behind; each call after it is the retry Ray would make."""
import numpy as np
import pytest

from embcam.attempts import ISOLATE_AFTER, Attempts
from embcam.runstate import RunFolder


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
