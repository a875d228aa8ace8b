"""Sanity and faithfulness checks (embcam.evaluation.saliency_checks, ``embcam sanity``, the report's section).

No Ray: the run folder is written here, from heatmaps computed in-process on generated images."""
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.stats
import torch
from torch import nn

from embcam.architectures import Preprocessing
from embcam.cam import EmbeddingCAM, normalise
from embcam.cli import DEMO_MODEL
from embcam.cli import main as cli_main
from embcam.data.schemas import conform
from embcam.datasets.synthetic import generate_dataset
from embcam.evaluation import saliency_checks as sc
from embcam.evaluation.sanity import THRESHOLD, _randomisation, main
from embcam.job.stages import load_images
from embcam.models import load_model
from embcam.proxies import MeanProxyAccumulator, save_proxy_bank
from embcam.report import write_report

from conftest import HtmlPage
from test_report import catalog_run

DEMO_BLOCKS = ["backbone.conv1", "backbone.bn1", "backbone.layer1", "backbone.layer2", "backbone.layer3",
               "backbone.layer4", "head"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """12 generated images of 3 classes the demo model never saw, as the model gets them, with
    their class mean proxies, and a run folder (mean proxy) whose heatmaps are EmbeddingCAM's."""
    root = tmp_path_factory.mktemp("sanity")
    manifest = generate_dataset(root / "data", num_classes=100, images_per_class=4, classes=range(50, 53), seed=0)
    rows = pq.read_table(manifest).to_pylist()
    model, preprocess, _ = load_model(checkpoint=DEMO_MODEL)
    batch = load_images({"image_id": np.array([r["image_id"] for r in rows], dtype=object),
                         "uri": np.array([r["uri"] for r in rows], dtype=object)}, str(root / "data"), preprocess.size)
    assert set(batch["status"]) == {"ok"}
    x = preprocess(torch.from_numpy(batch["image"]))
    with torch.inference_mode():
        y = model(x)
    labels = [r["label"] for r in rows]
    bank = MeanProxyAccumulator().add(y, labels).finalize()
    proxies = torch.from_numpy(np.stack([bank[label] for label in labels])).float()
    result = EmbeddingCAM(model, None, "embedding-map")(x, proxies)
    heat = result.heatmaps.numpy()
    run = root / "run"
    (run / "results").mkdir(parents=True)
    results = [dict(image_id=r["image_id"], label=r["label"], status="ok", proxy_kind="mean", proxy_label=r["label"],
                    embedding=result.embeddings[i].tolist(), heatmap=heat[i].ravel().tolist(),
                    heatmap_height=heat.shape[1], heatmap_width=heat.shape[2]) for i, r in enumerate(rows)]
    results.append(dict(image_id="broken", status="error", error="image: boom", proxy_kind="mean"))
    pq.write_table(conform(results, "results"), run / "results" / "part-0-13.parquet")
    save_proxy_bank(run / "proxies.parquet", bank)
    config = {"proxy": "mean", "model": None, "checkpoint": str(DEMO_MODEL), "target_layer": None,
              "image_size": None, "manifest": str(manifest), "image_root": None}
    (run / "summary.json").write_text(json.dumps({"config": config}))
    return {"model": model, "x": x, "pixels": batch["image"], "proxies": proxies, "heat": heat,
            "preprocess": preprocess, "run": str(run), "ids": [r["image_id"] for r in rows]}


# --- Spearman ------------------------------------------------------------------------------------


def test_spearman_rows_equals_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.integers(0, 4, (10, 16)), rng.normal(size=(10, 16))])  # ties, then none
    b = np.concatenate([rng.integers(0, 3, (10, 16)), a[10:] + rng.normal(size=(10, 16))])
    want = [scipy.stats.spearmanr(u, v).statistic for u, v in zip(a, b)]
    np.testing.assert_allclose(sc.spearman_rows(a, b), want, rtol=0, atol=1e-12)
    # by hand: ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4), both of mean 2.5: 4.5 / sqrt(4.5 * 5)
    np.testing.assert_allclose(sc.spearman_rows([[1.0, 2.0, 2.0, 3.0]], [[1.0, 3.0, 2.0, 4.0]]), [np.sqrt(0.9)],
                               rtol=0, atol=1e-15)
    assert np.isnan(sc.spearman_rows([[1.0, 1.0, 1.0]], [[1.0, 2.0, 3.0]])[0])  # constant: undefined
    with pytest.raises(ValueError, match="one shape"):
        sc.spearman_rows(a, b[:, :3])


# --- model randomisation -------------------------------------------------------------------------


def test_cascade_randomises_from_the_head_down_cumulatively_on_a_copy(demo):
    model, x = demo["model"], demo["x"][:2]
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    assert [b.label for b in sc.cascade_blocks(model, x[:1])] == DEMO_BLOCKS
    seen = []

    def recording(m, images, proxies):  # which blocks differ from the trained model at each call
        state = m.state_dict()
        seen.append({b for b in DEMO_BLOCKS if any(not torch.equal(state[k], v) for k, v in trained.items()
                                                   if k.startswith(b + "."))})
        return images[:, 0, :4, :4]

    result = sc.cascade(model, x, "self", recording)
    assert result["blocks"] == DEMO_BLOCKS[::-1]
    assert seen == [set(DEMO_BLOCKS[::-1][:k]) for k in range(len(DEMO_BLOCKS) + 1)]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())  # the caller's model untouched


def test_cascade_step_one_equals_an_independent_computation(demo):
    model, x, proxies = demo["model"], demo["x"], demo["proxies"]
    result = sc.cascade(model, x, proxies, sc.cam_explainer(), seed=3)
    np.testing.assert_allclose(result["trained"], demo["heat"], rtol=0, atol=1e-6)
    copy = load_model(checkpoint=DEMO_MODEL)[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3000)  # the cascade's seed for its first step: seed * 1000 + step
        copy.head.reset_parameters()
    heat = EmbeddingCAM(copy, None, "autograd")(x, proxies).heatmaps.double().numpy().reshape(len(x), -1)
    want = [scipy.stats.spearmanr(t, h).statistic if np.ptp(h) > 0 else 0.0
            for t, h in zip(demo["heat"].reshape(len(x), -1), heat)]
    np.testing.assert_allclose(result["rho"][0], want, rtol=0, atol=1e-9)


def test_image_only_explainer_fails_and_embeddingcam_passes(demo):
    model, x, proxies = demo["model"], demo["x"], demo["proxies"]

    def image_only(m, images, p):  # a map of the input alone: the model never enters it
        return nn.functional.adaptive_avg_pool2d(images.mean(1, keepdim=True), 4)[:, 0]

    fixed = _randomisation(sc.cascade(model, x, proxies, image_only), "mean")
    assert fixed["verdict"] == "fail"
    assert fixed["verdict_value"] == pytest.approx(1.0) and fixed["final_value"] == pytest.approx(1.0)
    cam = _randomisation(sc.cascade(model, x, proxies, sc.cam_explainer()), "mean")
    assert cam["verdict"] == "pass" and cam["verdict_value"] < THRESHOLD
    assert cam["verdict_step"] == "head + backbone.layer4"
    assert [s["randomised"] for s in cam["steps"]] == DEMO_BLOCKS[::-1]


def test_randomise_block_resets_layers_and_redraws_other_parameters():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(4)
            self.scale = nn.Parameter(torch.linspace(2.0, 4.0, 1000))

    net = Scaled()
    with torch.no_grad():
        net.norm.running_mean.fill_(3.0)
        net.norm.weight.fill_(5.0)
    sc.randomise_block(sc.Block("", net), seed=7)
    assert torch.equal(net.norm.running_mean, torch.zeros(4)) and torch.equal(net.norm.weight, torch.ones(4))
    trained = torch.linspace(2.0, 4.0, 1000)
    assert net.scale.mean().item() == pytest.approx(trained.mean().item(), abs=0.1)  # N(3, 0.577) redrawn
    assert net.scale.std().item() == pytest.approx(trained.std().item(), rel=0.1)
    again = Scaled()
    sc.randomise_block(sc.Block("", again), seed=7)
    assert torch.equal(again.scale, net.scale)  # reproducible from the seed


# --- deletion --------------------------------------------------------------------------------------


class MeanRed(nn.Module):
    """Embedding (mean of channel 0, 1): its cosine with (1, 0) is a / sqrt(a^2 + 1)."""

    def forward(self, x):
        a = x[:, 0].mean((1, 2))
        return torch.stack([a, torch.ones_like(a)], 1)


def cos(red_mean):
    a = red_mean / 255
    return a / np.sqrt(a * a + 1)


def test_deletion_curve_by_hand():
    pixels = np.zeros((1, 2, 2, 3))
    pixels[0, :, :, 0] = [[200, 100], [50, 0]]  # red mean 87.5: the mean fill
    heat = np.array([[[0.1, 0.9], [0.5, 0.0]]])  # deletes 100, then 50, then 200, then 0
    out = sc.deletion(MeanRed(), Preprocessing(2, (0, 0, 0), (1, 1, 1)), pixels, heat, torch.tensor([[1.0, 0.0]]),
                      steps=4, fill="mean", random_orders=2)
    want = cos(np.array([(200 + 100 + 50 + 0) / 4, (200 + 87.5 + 50 + 0) / 4, (200 + 87.5 + 87.5 + 0) / 4,
                         (87.5 * 3 + 0) / 4, 87.5]))
    np.testing.assert_allclose(out["curves"]["heatmap"][0], want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["fractions"]["heatmap"], [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(out["curves"]["uniform"][0], [cos(87.5)] * 5, rtol=0, atol=1e-6)  # mean kept
    np.testing.assert_allclose(out["curves"]["random"][0][[0, -1]], [cos(87.5)] * 2, rtol=0, atol=1e-6)
    trapezoids = 0.25 * sum((want[k] + want[k + 1]) / 2 for k in range(4))
    assert out["auc"]["heatmap"][0] == pytest.approx(trapezoids, abs=1e-6)


def test_insertion_curve_by_hand():
    """The deletion example the other way round: from the mean fill (red 87.5 everywhere),
    the pixels come back hottest first: 100, then 50, then 200, then 0."""
    pixels = np.zeros((1, 2, 2, 3))
    pixels[0, :, :, 0] = [[200, 100], [50, 0]]
    heat = np.array([[[0.1, 0.9], [0.5, 0.0]]])
    out = sc.insertion(MeanRed(), Preprocessing(2, (0, 0, 0), (1, 1, 1)), pixels, heat, torch.tensor([[1.0, 0.0]]),
                       steps=4, fill="mean", random_orders=2)
    want = cos(np.array([87.5, (87.5 * 3 + 100) / 4, (87.5 * 2 + 100 + 50) / 4, (87.5 + 100 + 50 + 200) / 4,
                         (200 + 100 + 50 + 0) / 4]))
    np.testing.assert_allclose(out["curves"]["heatmap"][0], want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["fractions"]["heatmap"], [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(out["curves"]["uniform"][0], [cos(87.5)] * 5, rtol=0, atol=1e-6)  # mean kept
    np.testing.assert_allclose(out["curves"]["random"][0][[0, -1]], [cos(87.5)] * 2, rtol=0, atol=1e-6)
    trapezoids = 0.25 * sum((want[k] + want[k + 1]) / 2 for k in range(4))
    assert out["auc"]["heatmap"][0] == pytest.approx(trapezoids, abs=1e-6)


def test_insertion_is_deletion_run_backwards_with_the_same_orders():
    """Insertion from the fill to the image is deletion from the fill towards the image:
    step k of one is step k of the other with image and fill swapped, for every order
    (the seeded random orders and ties included) and for the uniform map."""
    rng = np.random.default_rng(3)
    image, fill = rng.uniform(0, 255, (4, 4, 3)), rng.uniform(0, 255, (4, 4, 3))
    for order in (rng.permutation(16), None):
        inserted = sc.inserted_images(image, fill, order, 4)
        np.testing.assert_array_equal(inserted, sc.deleted_images(fill, image, order, 4))
        np.testing.assert_array_equal(inserted[0], fill)
        np.testing.assert_allclose(inserted[-1], image, rtol=0, atol=1e-12)
    ordered = sc.inserted_images(image, fill, np.arange(16)[::-1], 4)
    np.testing.assert_array_equal(ordered[1].reshape(16, 3)[12:], image.reshape(16, 3)[12:])  # last pixels first
    np.testing.assert_array_equal(ordered[1].reshape(16, 3)[:12], fill.reshape(16, 3)[:12])


def test_trapezoid_auc():
    assert sc.trapezoid_auc([0, 0.25, 0.5, 1], [1, 0.5, 0.5, 0]) == pytest.approx(0.1875 + 0.125 + 0.125)
    rng = np.random.default_rng(1)
    x, y = np.sort(rng.uniform(size=9)), rng.uniform(size=(3, 9))
    np.testing.assert_allclose(sc.trapezoid_auc(x, y), np.trapezoid(y, x, axis=-1), rtol=1e-12)


def test_uniform_map_fades_every_pixel_by_the_same_share():
    rng = np.random.default_rng(2)
    image, fill = rng.uniform(0, 255, (4, 4, 3)), rng.uniform(0, 255, (4, 4, 3))
    uniform = sc.deleted_images(image, fill, None, 4)
    for k in range(5):
        np.testing.assert_allclose(uniform[k], image + k / 4 * (fill - image), rtol=0, atol=1e-12)
    ordered = sc.deleted_images(image, fill, rng.permutation(16), 4)
    np.testing.assert_array_equal(ordered[0], image)
    np.testing.assert_array_equal(ordered[-1], fill)
    assert [int((ordered[k] != image).any(-1).sum()) for k in range(5)] == [0, 4, 8, 12, 16]
    np.testing.assert_array_equal(sc.deletion_counts(10, 4), [0, 2, 5, 8, 10])  # round half to even
    np.testing.assert_allclose(sc.fill_images(image[None], "mean")[0], np.broadcast_to(image.mean((0, 1)), (4, 4, 3)))
    flat = np.full((1, 32, 32, 3), 77.0)
    np.testing.assert_allclose(sc.fill_images(flat, "blur"), flat)
    with pytest.raises(ValueError, match="unknown fill"):
        sc.fill_images(flat, "zero")


def test_hottest_first_breaks_ties_at_random():
    heat = np.array([[0.0, 1.0], [0.0, 0.0]])
    orders = [sc.hottest_first(heat, 2, np.random.default_rng(s)) for s in range(8)]
    assert all(o[0] == 1 and sorted(o[1:]) == [0, 2, 3] for o in orders)
    assert len({tuple(o) for o in orders}) > 1


# --- the command and the report --------------------------------------------------------------


def test_command_writes_json_and_plots_and_the_report_shows_them(demo, tmp_path, capsys):
    assert main([demo["run"], "--images", "6", "--steps", "4", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert "verdict: PASS" in captured.out and "randomisation step 7/7" in captured.err
    folder = Path(demo["run"]) / "sanity"  # the default
    saved = json.loads((folder / "sanity.json").read_text())
    ids = saved["per_image"]["image_id"]
    assert len(ids) == 6 and ids == sorted(ids) and set(ids) <= set(demo["ids"])  # the error row is never drawn
    assert saved["stored_heatmaps"]["max_abs_difference"] < 1e-5
    for step, rho in zip(saved["randomisation"]["steps"], saved["per_image"]["rho"]):
        assert step["mean"] == pytest.approx(np.mean(rho)) and step["std"] == pytest.approx(np.std(rho))
    for method, stats in saved["deletion"]["methods"].items():
        assert stats["auc"]["mean"] == pytest.approx(np.mean(saved["per_image"]["auc"][method]))
        assert stats["fractions"] == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    inserted = saved["insertion"]
    for method, stats in inserted["methods"].items():
        assert stats["auc"]["mean"] == pytest.approx(np.mean(saved["per_image"]["insertion_auc"][method]))
    above = np.mean(np.array(saved["per_image"]["insertion_auc"]["heatmap"])
                    > np.array(saved["per_image"]["insertion_auc"]["random"]))
    assert inserted["heatmap_above_random"] == pytest.approx(above)
    # a mean-proxy run: step 0 of deletion is the image, the last step of insertion the image too
    revealed = inserted["methods"]["heatmap"]["curve_mean"][-1]
    assert revealed == pytest.approx(saved["deletion"]["methods"]["heatmap"]["curve_mean"][0], abs=1e-6)
    assert "insertion (from the blur fill" in captured.out
    for name in ("cascade", "deletion", "insertion"):
        assert cv2.imread(str(folder / f"{name}.png")).shape == (440, 760, 3)

    report = write_report([demo["run"]], str(tmp_path / "report"))
    assert report["sanity"][0]["randomisation"]["verdict"] == saved["randomisation"]["verdict"]
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "## Sanity and faithfulness" in markdown and "![cascade](sanity/0-run/cascade.png)" in markdown
    page = HtmlPage()
    page.feed((tmp_path / "report" / "report.html").read_text())
    assert {"sanity/0-run/cascade.png", "sanity/0-run/deletion.png", "sanity/0-run/insertion.png"} <= set(page.sources)
    assert (tmp_path / "report" / "sanity" / "0-run" / "insertion.png").is_file()
    assert "Insertion (Petsiuk et al. 2018): from the blur fill" in markdown
    assert "![insertion](sanity/0-run/insertion.png)" in markdown


def test_report_escapes_what_sanity_json_holds(tmp_path):
    run = catalog_run(tmp_path)
    hostile = "<script>alert(1)</script>"
    (tmp_path / "run" / "sanity").mkdir()
    (tmp_path / "run" / "sanity" / "sanity.json").write_text(json.dumps({
        "model": hostile, "proxy": hostile, "images": 2,
        "randomisation": {"verdict": hostile, "verdict_value": "not a number", "steps": [{"randomised": hostile}]},
        "deletion": {"fill": hostile, "methods": {"x": {"name": hostile, "auc": {"mean": 0.5, "std": 0.25}}}},
        "files": {"cascade": "../../etc/passwd"}}))
    write_report([run], str(tmp_path / "report"))
    page = HtmlPage()
    page.feed((tmp_path / "report" / "report.html").read_text())
    assert "script" not in page.tags and hostile in "".join(page.text)
    assert not any("passwd" in s for s in page.sources)  # plot paths are never taken from the file
    assert "0.500 ± 0.250" in "".join(page.text)
    (tmp_path / "run" / "sanity" / "sanity.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        write_report([run], str(tmp_path / "report2"))


def test_command_bad_input_is_one_line_and_status_2(tmp_path, capsys, demo):
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("embcam sanity: error: ") and err.count("\n") == 1 and "summary.json" in err
    assert cli_main(["sanity", str(tmp_path / "missing")]) == 2
    assert main([demo["run"], "--images", "0"]) == 2
    assert "--images and --steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([demo["run"], "--fill", "zero"])
    assert exit_.value.code == 2


def test_embedding_of_the_self_proxy_is_the_trained_models(demo):
    """For self runs the deletion proxy is the unmodified image's own embedding: step 0 has cosine 1."""
    model, pixels = demo["model"], demo["pixels"][:2].astype(np.float64)
    with torch.inference_mode():
        own = normalise(model(demo["x"][:2]))
    out = sc.deletion(model, demo["preprocess"], pixels, demo["heat"][:2], own, steps=2, random_orders=1)
    np.testing.assert_allclose(out["curves"]["heatmap"][:, 0], 1.0, atol=1e-6)
