"""Progress lines and the steady rate of each step, on a clock the test moves by hand."""
import threading

from embcam.job import progress
from embcam.job.progress import Progress


def test_steady_rate_leaves_out_the_steps_start_up(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    lines = []
    shown = Progress(lines.append, interval=5.0, prefix="embcam explain", heartbeat=False)
    with shown.step("heatmaps", 40):
        now[0] = 130.0  # 30 s of start-up before the first batch
        shown.add(8)
        for _ in range(4):  # then 8 rows every 2 s
            now[0] += 2.0
            shown.add(8)
    assert shown.timings["heatmaps"] == {"rows": 40, "seconds": 38.0, "steady_images_per_second": 4.0}
    assert lines == ["embcam explain: heatmaps: 40 rows to do", "embcam explain: heatmaps: 8/40 rows, 0.3 images/s",
                     "embcam explain: heatmaps: 32/40 rows, 0.9 images/s",  # 6 s after the last line
                     "embcam explain: heatmaps: 40/40 rows in 38.0 s, 1.1 images/s"]


def test_a_step_of_one_report_has_no_steady_rate():
    shown = Progress()
    with shown.step("pairs", 3):
        shown.add(3)
    assert shown.timings["pairs"]["rows"] == 3 and shown.timings["pairs"]["steady_images_per_second"] is None


def test_a_batch_longer_than_the_interval_still_shows_progress():
    """All 16 rows in one batch of a slow model: a line every 10 s all the same, with the
    rows and the rate so far."""
    now = [100.0]
    lines = []
    shown = Progress(lines.append, interval=10.0, clock=lambda: now[0], heartbeat=False)
    with shown.step("heatmaps", 16):
        for now[0] in (105.0, 112.0, 115.0, 122.0):
            shown.tick()
        shown.add(8)  # 8 rows out at 122 s: the line at 122 was just shown
        now[0] = 133.0
        shown.tick()
        now[0] = 140.0
        shown.add(8)
    assert lines == ["embcam explain: heatmaps: 16 rows to do",
                     "embcam explain: heatmaps: 0/16 rows after 12 s, 0.0 images/s so far",
                     "embcam explain: heatmaps: 0/16 rows after 22 s, 0.0 images/s so far",
                     "embcam explain: heatmaps: 8/16 rows after 33 s, 0.2 images/s so far",
                     "embcam explain: heatmaps: 16/16 rows in 40.0 s, 0.4 images/s"]


def test_the_steps_thread_shows_a_line_while_no_batch_ends():
    seen = threading.Event()
    lines = []

    def log(line):
        lines.append(line)
        if line.endswith("so far"):
            seen.set()

    shown = Progress(log, interval=0.01)
    with shown.step("heatmaps", 16):
        assert seen.wait(timeout=60), lines  # a condition: the thread's line, with no row done
        shown.add(16)
    assert lines[0] == "embcam explain: heatmaps: 16 rows to do"
    assert any(line.startswith("embcam explain: heatmaps: 0/16 rows after ") for line in lines), lines
    assert lines[-1].startswith("embcam explain: heatmaps: 16/16 rows in "), lines
