"""Training of the reference embedding model: loss, metric, batches, checkpoint."""
import json
import math
import runpy
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from embcam.data.images import resize_square
from embcam.datasets.synthetic import generate_dataset
from embcam.models import load_model
from embcam.training import (
    augment,
    class_balanced_batches,
    embed,
    fit,
    load_split,
    proxy_anchor_loss,
    recall_at_1,
    train,
)

TINY = dict(image_size=64, epochs=2, batch_classes=3, per_class=2, seed=0, device="cpu", log=None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny convolutions gain nothing from a second thread on a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory):
    # 6 classes x 6 images: classes 0-2 are "train", 3-5 "eval".
    out = tmp_path_factory.mktemp("synth")
    return generate_dataset(out, num_classes=6, images_per_class=6, min_side=64, max_side=80, seed=0)


def test_proxy_anchor_loss_matches_hand_computation():
    # Three points, three proxies; class 2 has no point in the batch, so it counts
    # in the negative term (all proxies) but not in the positive one (P+).
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    proxies = torch.tensor([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    a, d, r = 32.0, 0.1, 1 / math.sqrt(2)
    # cosines s(x_i, p_c): x0 = (1, 0), x1 = (0, 1), x2 = (r, r) after normalising.
    positive = (math.log(1 + math.exp(-a * (1 - d)) + math.exp(-a * (0 - d)))   # p0: x0, x1
                + math.log(1 + math.exp(-a * (r - d)))) / 2                      # p1: x2
    negative = (math.log(1 + math.exp(a * (r + d)))                             # p0: x2
                + math.log(1 + math.exp(a * (0 + d)) + math.exp(a * (1 + d)))   # p1: x0, x1
                + math.log(1 + math.exp(a * (-1 + d)) + math.exp(a * (0 + d))
                           + math.exp(a * (-r + d)))) / 3                        # p2: all
    loss = proxy_anchor_loss(x.double(), labels, proxies.double(), alpha=a, margin=d)
    assert loss.item() == pytest.approx(positive + negative, rel=1e-12)


def test_proxy_anchor_loss_gradients_are_finite_with_absent_classes():
    x = torch.randn(4, 3, requires_grad=True)
    proxies = torch.randn(5, 3, requires_grad=True)
    proxy_anchor_loss(x, torch.tensor([0, 0, 1, 1]), proxies).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(proxies.grad).all()
    assert proxies.grad[2:].abs().sum() > 0  # absent classes still get pushed away


def test_recall_at_1_known_answer():
    embeddings = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 5.0], [0.8, 0.6]])
    labels = ["a", "a", "b", "b"]
    # Nearest other point by cosine: 0 -> 1 (a, hit), 1 -> 0 (a, hit), 2 -> 3 (b, hit),
    # 3 -> 1 (cos 0.861 beats 0.8 to point 0 and 0.6 to point 2; a, miss).
    assert recall_at_1(embeddings, labels) == 0.75
    # Excluding the query matters: a lone class member can never be a hit.
    assert recall_at_1(np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]]), ["x", "y", "y"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        recall_at_1(np.ones((1, 2)), ["a"])


def test_class_balanced_batches():
    labels = np.repeat(np.arange(5), [3, 4, 5, 6, 2])
    batches = class_balanced_batches(labels, batch_classes=3, per_class=3, rng=np.random.default_rng(0))
    assert len(batches) == math.ceil(len(labels) / 9)
    for batch in batches:
        classes, counts = np.unique(labels[batch], return_counts=True)
        assert len(classes) == 3 and (counts == 3).all()
    with pytest.raises(ValueError, match="only 5 classes"):
        class_balanced_batches(labels, batch_classes=6, per_class=2, rng=np.random.default_rng(0))


def test_augment_keeps_size_and_is_seeded():
    image = np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    first = augment(image, 48, np.random.default_rng(5))
    assert first.shape == (48, 48, 3) and first.dtype == np.uint8
    assert np.array_equal(first, augment(image, 48, np.random.default_rng(5)))


def test_load_split_reads_rows_of_one_split(tiny_manifest):
    images, labels = load_split(tiny_manifest, "eval")
    table = pq.read_table(tiny_manifest).to_pandas()
    expected = table[table.split == "eval"]
    assert labels == expected.label.tolist()
    for image, uri in zip(images, expected.uri):
        reference = cv2.cvtColor(cv2.imread(str(tiny_manifest.parent / uri)), cv2.COLOR_BGR2RGB)
        assert np.array_equal(image, reference)
    with pytest.raises(ValueError, match="no rows with split == 'test'"):
        load_split(tiny_manifest, "test")


def test_training_lowers_loss_and_checkpoint_round_trips(tiny_manifest, tmp_path):
    model, preprocessing, result = fit(tiny_manifest, **TINY)
    assert len(result["losses"]) == 2 and result["losses"][1] < result["losses"][0]
    assert (result["train_classes"], result["eval_classes"]) == (3, 3)
    assert preprocessing.size == 64

    # train() with the same seed reproduces the run bit for bit and saves it.
    out = tmp_path / "model.pt"
    saved = train(tiny_manifest, out, command="test", **TINY)
    assert saved["out"] == str(out) and saved["recall_at_1_after"] == result["recall_at_1_after"]
    loaded, loaded_preprocessing, spec = load_model(checkpoint=out)
    assert spec == "embcam:small-resnet+linear:128" and loaded_preprocessing == preprocessing

    images, labels = load_split(tiny_manifest, "eval")
    batch = np.stack([resize_square(im, 64) for im in images])
    expected = embed(model, batch, preprocessing, torch.device("cpu"))
    got = embed(loaded, batch, loaded_preprocessing, torch.device("cpu"))
    assert torch.equal(got, expected)
    assert recall_at_1(got, labels) == saved["recall_at_1_after"]

    blob = torch.load(out, weights_only=True)
    assert blob["metadata"]["seed"] == 0 and blob["metadata"]["epochs"] == 2
    assert blob["metadata"]["recall_at_1"] == saved["recall_at_1_after"]
    assert all(v.dtype != torch.float64 for v in blob["state_dict"].values())


def run_train_job(argv: list[str], monkeypatch) -> int:
    """jobs/train_embedding.py run as `python jobs/train_embedding.py ARGV` runs it; its exit status."""
    job = Path(__file__).parents[1] / "jobs" / "train_embedding.py"
    monkeypatch.setattr(sys, "argv", [str(job), *argv])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(job), run_name="__main__")
    return exited.value.code


def test_train_job_prints_final_json_line(tiny_manifest, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli.pt"
    status = run_train_job(["--manifest", str(tiny_manifest), "--out", str(out), "--image-size", "48",
                            "--epochs", "1", "--batch-classes", "3", "--per-class", "2", "--device", "cpu"],
                           monkeypatch)
    assert status == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["out"] == str(out) and last["epochs"] == 1 and last["image_size"] == 48
    assert {"recall_at_1_before", "recall_at_1_after", "seconds"} <= set(last)
    assert torch.load(out, weights_only=True)["metadata"]["epochs"] == 1


@pytest.mark.parametrize("argv, expected", [
    (["--manifest", "{tmp}/none.parquet", "--out", "{tmp}/m.pt"],
     "embcam train: error: manifest source '{tmp}/none.parquet': no such file or directory\n"),
    (["--manifest", "{tmp}/none.parquet", "--out", "{tmp}/m.pt", "--epochs", "x"],
     "embcam train: error: argument --epochs: invalid int value: 'x' (see embcam train --help)\n"),
])
def test_train_job_says_bad_input_in_one_line(argv, expected, tmp_path, capsys, monkeypatch):
    assert run_train_job([a.replace("{tmp}", str(tmp_path)) for a in argv], monkeypatch) == 2
    captured = capsys.readouterr()
    assert captured.err == expected.replace("{tmp}", str(tmp_path)) and captured.out == ""


def test_seed_changes_the_initialisation(tiny_manifest):
    first, _, _ = fit(tiny_manifest, **{**TINY, "epochs": 0})
    again, _, _ = fit(tiny_manifest, **{**TINY, "epochs": 0})
    other, _, _ = fit(tiny_manifest, **{**TINY, "epochs": 0, "seed": 1})
    weight = "backbone.conv1.weight"
    assert torch.equal(first.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])


def test_bad_batch_classes_is_a_clear_error(tiny_manifest, tmp_path):
    with pytest.raises(ValueError, match="batch_classes=4 but the train split .* only 3 classes"):
        fit(tiny_manifest, **{**TINY, "batch_classes": 4})
