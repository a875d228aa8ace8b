"""bench/cam_throughput.py runs end to end on a tiny config and reports every method.

No timing is asserted: only that each method ran, the report is complete, the ratio of
(a) to itself is exactly 1, and the maps that must agree (embcam's two strategies and
its compiled backbone, Captum and pytorch-grad-cam on the same self proxy) do.
"""
import importlib.util
import json
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "cam_throughput.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("cam_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_reports_every_method(tmp_path):
    bench = load_bench()
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        bench.run(["--quick", "--model", "embcam:small-resnet+linear:16", "--batch-sizes", "2",
                   "--image-size", "64", "--repeats", "1",
                   "--warmup", "0", "--threads", "1", "--json", str(out)], log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)  # the benchmark sets it process-wide
    report = json.loads(out.read_text())

    assert report["config"]["model"] == "embcam:small-resnet+linear:16"
    assert report["config"]["image_size"] == 64 and report["config"]["batch_sizes"] == [2]
    result = report["results"]["2"]
    assert result["errors"] == {}
    methods = result["methods"]
    assert set(methods) == set(bench.METHODS)
    for name, m in methods.items():
        assert m["images_per_s"] > 0 and m["best_images_per_s"] > 0 and m["images_per_cpu_s"] > 0, name
        assert len(m["seconds"]) == 1 and m["ratio_to_plain"] > 0, name
    assert methods["plain"]["ratio_to_plain"] == 1.0
    assert methods["plain"]["cpu_ratio_to_plain"] == 1.0 and methods["plain"]["best_ratio_to_plain"] == 1.0

    checks = result["agreement"]
    assert checks["embcam_autograd_vs_map_rel"] < 1e-4
    assert checks["embcam_compiled_vs_map_rel"] < 1e-4 and result["compile_seconds"] > 0
    assert checks["captum_vs_embcam_rel"] < 1e-4
    assert checks["gradcam_vs_embcam_abs"] < 1e-3

    names = {t["target"] for t in report["targets"]}
    assert "(b)/(a) >= 0.9" not in names  # judged at batch >= 16 only
    assert len(names) == 6 and all(t["batch_size"] == 2 for t in report["targets"])
    for t in report["targets"]:
        assert t["met"] == (t["value"] >= t["threshold"])


def test_class_mean_proxies_normalise_each_embedding_then_the_sum():
    bench = load_bench()
    y = torch.tensor([[3.0, 4.0], [0.0, 2.0], [5.0, 0.0]], dtype=torch.float32)
    labels = torch.tensor([0, 0, 1])
    p = bench.class_mean_proxies(y, labels, 2)
    # class 0: (0.6, 0.8) + (0, 1) = (0.6, 1.8) -> / sqrt(3.6); class 1: (1, 0)
    expected = torch.tensor([[0.6 / 3.6 ** 0.5, 1.8 / 3.6 ** 0.5], [1.0, 0.0]], dtype=torch.float32)
    assert torch.allclose(p, expected, atol=1e-7)
