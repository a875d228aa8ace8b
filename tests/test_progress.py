"""Progress lines and the steady rate of each step, on a clock the test moves by hand."""
from embcam.job import progress
from embcam.job.progress import Progress


def test_steady_rate_leaves_out_the_steps_start_up(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    lines = []
    shown = Progress(lines.append, interval=5.0, prefix="embcam explain")
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
