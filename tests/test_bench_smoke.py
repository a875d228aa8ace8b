"""bench/cam_throughput.py: what it times is the right computation, and what it reports
follows from what it measured.

No timing is asserted. The maps and embeddings of every method equal a hand-written
Grad-CAM in float64 (tests/test_cam_models.reference), within a bound set by how far the
same hand-written computation in float32 lands from it. The report's rates, ratios and
targets are recomputed here from the seconds it recorded.
"""
import copy
import importlib.util
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from embcam import normalise, prepare_for_inference
from embcam.models import build_model

from conftest import randomise_bn
from test_cam_models import reference

BENCH = Path(__file__).resolve().parents[1] / "bench" / "cam_throughput.py"
CATALOG_BENCH = BENCH.with_name("catalog_throughput.py")
SPEC, SIZE, BATCH = "embcam:small-resnet+linear:16", 64, 8  # two classes of bench.IMAGES_PER_CLASS
BOUND_FACTOR = 100  # the bench's float32 maps may be this many times further off than float32 by hand
# the targets judged at batch 2: (method a, method b, threshold on rate(a) / rate(b))
SMALL_BATCH_TARGETS = {
    "(b)/(e) >= 3": ("embcam_map", "gradcam", 3.0),
    "(b)/(f) >= 1.4": ("embcam_map", "captum", 1.4),
    "(b+)/(f) >= 1.4 (compiled)": ("embcam_compiled", "captum", 1.4),
    "(d)/(b) >= 1/1.1": ("embcam_map_5", "embcam_map", 1 / 1.1),
    "mean-proxy embcam/grad-cam >= 1.8": ("mean_proxy_embcam", "mean_proxy_gradcam", 1.8),
    "mean-proxy embcam/Captum >= 1.8": ("mean_proxy_embcam", "mean_proxy_captum", 1.8),
}


def load_bench(path: Path = BENCH):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    """The largest difference, relative to the largest exact value."""
    return float((got.detach().double() - exact).abs().max() / exact.abs().max())


def hand_written(model, images, proxies):
    """(embeddings, heatmaps) of ``reference`` on ``model`` and ``images`` as they are."""
    y, heat = reference(model, model.backbone.layer4, images, proxies)
    return y.double(), heat.detach().double()


def test_every_method_computes_the_hand_written_maps():
    bench = load_bench()
    torch.manual_seed(0)
    model = randomise_bn(build_model(SPEC)).float().eval()
    images = torch.randn(BATCH, 3, SIZE, SIZE)
    bank = normalise(torch.randn(bench.BANK_SIZE, 16))
    methods = bench.build_methods(model, prepare_for_inference(model), None, bench.user_model(model, SPEC),
                                  images, bank, bf16=False)
    out = {name: run() for name, run in methods.items()}

    exact = copy.deepcopy(model).double()
    x = images.double()
    y, self_maps = hand_written(exact, x, "self")
    y32, self_maps32 = hand_written(copy.deepcopy(model), images, "self")
    eps = torch.finfo(torch.float32).eps

    def bound(by_hand_in_float32, exact_value):
        return BOUND_FACTOR * max(relative_error(by_hand_in_float32, exact_value), eps)

    for name in ("plain", "plain_prepared", "user_plain"):
        assert relative_error(out[name], y) < bound(y32, y), name
    maps_bound = bound(self_maps32, self_maps)
    for name in ("embcam_map", "embcam_autograd", "user_embcam_map"):
        assert out[name].shape == self_maps.shape and relative_error(out[name], self_maps) < maps_bound, name
    for name in ("captum", "captum_prepared"):
        assert relative_error(out[name][:, 0], self_maps) < maps_bound, name
    # pytorch-grad-cam returns its maps min-max scaled and upsampled (absolute differences)
    scaled = bench.gradcam_scaling(self_maps, SIZE)
    scaled_bound = BOUND_FACTOR * max(np.abs(bench.gradcam_scaling(self_maps32, SIZE) - scaled).max(), eps)
    assert np.abs(out["gradcam"] - scaled).max() < scaled_bound

    # the 5 bank proxies nearest each image, and each image's class mean proxy, by hand
    nearest = (y / y.norm(dim=1, keepdim=True) @ bank.double().T).topk(bench.PROXIES_PER_IMAGE, dim=1).indices
    five = hand_written(exact, x, bank.double()[nearest])[1]
    assert out["embcam_map_5"].shape == five.shape and relative_error(out["embcam_map_5"], five) < maps_bound
    labels = torch.arange(BATCH) // bench.IMAGES_PER_CLASS
    unit = y / y.norm(dim=1, keepdim=True)
    means = torch.stack([unit[labels == c].sum(0) for c in range(2)])
    class_maps = hand_written(exact, x, (means / means.norm(dim=1, keepdim=True))[labels][:, None])[1][:, 0]
    assert relative_error(out["mean_proxy_embcam"], class_maps) < maps_bound
    assert relative_error(out["mean_proxy_captum"][:, 0], class_maps) < maps_bound
    assert np.abs(out["mean_proxy_gradcam"] - bench.gradcam_scaling(class_maps, SIZE)).max() < scaled_bound
    assert (class_maps.amax((1, 2)) > 0).all() and (self_maps.amax((1, 2)) > 0).all()  # no empty maps compared


@pytest.mark.slow
def test_quick_benchmark_reports_what_it_measured(tmp_path):
    bench = load_bench()
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        bench.run(["--quick", "--model", SPEC, "--batch-sizes", "2", "--image-size", str(SIZE), "--repeats", "1",
                   "--warmup", "0", "--threads", "1", "--json", str(out)], log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)  # the benchmark sets it process-wide
    report = json.loads(out.read_text())

    assert report["config"]["model"] == SPEC
    assert report["config"]["image_size"] == SIZE and report["config"]["batch_sizes"] == [2]
    result = report["results"]["2"]
    assert result["errors"] == {}
    methods = result["methods"]
    assert set(methods) == set(bench.METHODS) and result["compile_seconds"] > 0
    plain_seconds = methods["plain"]["seconds"][0]
    for name, m in methods.items():  # one repeat: every rate is 2 images over that repeat's time
        [seconds], [cpu_seconds] = m["seconds"], m["cpu_seconds"]
        assert 0 < seconds < float("inf") and cpu_seconds >= 0, name
        assert m["images_per_s"] == pytest.approx(2 / seconds, rel=1e-12), name
        assert m["best_images_per_s"] == pytest.approx(2 / seconds, rel=1e-12), name
        assert m["images_per_cpu_s"] == pytest.approx(2 / max(cpu_seconds, 1e-9), rel=1e-12), name
        assert m["ratio_to_plain"] == pytest.approx(plain_seconds / seconds, rel=1e-12), name

    # the maps agree as test_every_method_computes_the_hand_written_maps shows they must
    checks = result["agreement"]
    assert set(checks) == {"embcam_autograd_vs_map_rel", "embcam_compiled_vs_map_rel", "captum_vs_embcam_rel",
                           "user_model_vs_embcam_rel", "gradcam_vs_embcam_abs"}
    assert max(checks.values()) < 1e-4

    targets = {t["target"]: t for t in report["targets"]}
    assert set(targets) == set(SMALL_BATCH_TARGETS)  # the batch >= 16 ones are not judged at 2
    for name, (a, b, threshold) in SMALL_BATCH_TARGETS.items():
        value = methods[b]["seconds"][0] / methods[a]["seconds"][0]  # rate(a) / rate(b)
        t = targets[name]
        assert t["batch_size"] == 2 and t["threshold"] == threshold, name
        assert t["value"] == pytest.approx(value, rel=1e-12) and t["met"] == (value >= threshold), name


def test_class_mean_proxies_normalise_each_embedding_then_the_sum():
    bench = load_bench()
    y = torch.tensor([[3.0, 4.0], [0.0, 2.0], [5.0, 0.0]], dtype=torch.float32)
    labels = torch.tensor([0, 0, 1])
    p = bench.class_mean_proxies(y, labels, 2)
    # class 0: (0.6, 0.8) + (0, 1) = (0.6, 1.8) -> / sqrt(3.6); class 1: (1, 0)
    expected = torch.tensor([[0.6 / 3.6 ** 0.5, 1.8 / 3.6 ** 0.5], [1.0, 0.0]], dtype=torch.float32)
    assert torch.allclose(p, expected, atol=1e-7)


@pytest.mark.slow
def test_catalog_benchmark_reports_what_it_measured(tmp_path, ray_session):
    """Two real `embcam explain` runs (mean proxies, 4 and 8 images) and the plain loop: every
    figure follows from the seconds recorded, and each run did what it says. The runs get
    auto's plan for a catalog of 10^8 images: their maps no longer fit the object store (a
    48 px small-resnet's are 576 bytes). The mean plan is the one with two passes and a plan
    choice; a self run's figures are the same arithmetic over one pass, and mean/self is
    checked by hand below. The runs join the session's Ray (--address), to spare their Ray
    start-ups."""
    bench = load_bench(CATALOG_BENCH)
    out = tmp_path / "catalog.json"
    threads = torch.get_num_threads()
    address = ray_session.get_runtime_context().gcs_address
    try:
        bench.run(["--models", "embcam:small-resnet+linear:16", "--image-size", "48", "--sides", "48:64",
                   "--images", "4", "8", "--batch-size", "4", "--classes", "2", "--proxies", "mean",
                   "--catalog-rows", "100000000",
                   f"--extra-args=--address {address}", "--json", str(out)],
                  log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)  # the benchmark sets it process-wide
    report = json.loads(out.read_text())

    assert set(report["machine"]) >= {"cpu", "cores", "torch", "gpu"}
    assert report["config"]["plain_precision"] == ("bf16" if torch.cuda.is_available() else "fp32")
    rows = report["configurations"]
    assert [(r["proxy"], r["plan"], r["job"]["strategy"]) for r in rows] == [("mean", "stored-maps", "stored-maps")]
    assert "smaller than the 48x48 image" in rows[0]["job"]["catalog_plan_reason"]
    for r in rows:
        for part in (r["job"], r["plain"]):
            seconds = {int(n): statistics.median(t) for n, t in part["seconds"].items()}
            assert sorted(seconds) == [4, 8] and all(t > 0 for t in seconds.values())
            assert part["median_seconds"] == {str(n): t for n, t in seconds.items()}
            per_image = (seconds[8] - seconds[4]) / 4
            assert part["per_image_s"] == pytest.approx(per_image, rel=1e-12)
            assert part["fixed_s"] == pytest.approx(seconds[4] - 4 * per_image, rel=1e-9, abs=1e-12)
            assert part["images_per_s"] == (pytest.approx(1 / per_image, rel=1e-12) if per_image > 0 else None)
        job, plain = r["job"], r["plain"]
        expected = job["images_per_s"] / plain["images_per_s"] if job["images_per_s"] and plain["images_per_s"] \
            else None
        assert r["ratio"] == (pytest.approx(expected, rel=1e-12) if expected is not None else None)
        assert sorted(run["images"] for run in job["runs"]) == [4, 8]
        for run in job["runs"]:  # one run per size: its seconds are the ones fitted
            assert job["seconds"][str(run["images"])] == [run["seconds"]]
            summary = run["summary"]
            assert summary["plan"] == r["plan"] and summary["plan_reason"]
            assert summary["counts"]["ok"] == summary["counts"]["results"] == run["images"]
            assert 0 < summary["wall_seconds"] < run["seconds"]  # the job's own clock starts after the process
        # the steady figures: the 8-image run's passes at their steady rates, where a pass
        # reported more than once (Ray Data may hand a run this small over in one batch)
        (large,) = [run for run in job["runs"] if run["images"] == 8]
        rates = [p["steady_images_per_second"] for p in large["summary"]["passes"].values()]
        assert len(rates) == (1 if r["proxy"] == "self" else 2)
        steady = sum(1 / rate for rate in rates) if all(rates) else None
        assert job["steady_per_image_s"] == (pytest.approx(steady, rel=1e-12) if steady else None)
        assert plain["steady_per_image_s"] > 0  # two batches of 4, timed after the first
        assert r["steady_ratio"] == (pytest.approx(plain["steady_per_image_s"] / steady, rel=1e-12) if steady
                                     else None)
    assert rows[0]["mean_over_self"] is None and rows[0]["steady_mean_over_self"] is None  # no self run


def test_catalog_figures_by_hand():
    """fit and configuration on seconds chosen by hand: slope, intercept, the job against the
    plain loop, and mean against self."""
    bench = load_bench(CATALOG_BENCH)
    plain = dict(bench.fit({4: [6.0], 8: [8.0]}), steady_per_image_s=0.25)  # 0.5 s an image, 4 s fixed
    assert (plain["per_image_s"], plain["fixed_s"], plain["images_per_s"]) == (0.5, 4.0, 2.0)
    runs = [{"summary": {"plan": "one-pass"}}]
    self_job = dict(bench.fit({4: [10.0, 11.0, 9.0], 8: [14.0]}), strategy="auto", runs=runs,
                    steady_per_image_s=0.5)  # medians: 10 and 14 s
    mean_job = dict(bench.fit({4: [12.0], 8: [18.0]}), strategy="auto", runs=runs, steady_per_image_s=0.75)
    assert self_job["per_image_s"] == 1.0 and self_job["fixed_s"] == 6.0
    row = bench.configuration("embcam:small-resnet+linear:16", "48-64", "mean", mean_job, plain, self_job)
    assert row["mean_over_self"] == 1.5 and row["steady_mean_over_self"] == 1.5
    assert row["ratio"] == pytest.approx((1 / 1.5) / 2.0) and row["steady_ratio"] == pytest.approx(0.25 / 0.75)
    assert bench.configuration("m", "s", "self", self_job, plain, None)["mean_over_self"] is None
    slower = bench.fit({4: [10.0], 8: [9.0]})  # noise beat the slope: no rate, and no ratio from it
    assert slower["images_per_s"] is None
