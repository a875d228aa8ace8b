"""The Chen et al. baseline (embcam.evaluation.chen) against independent references, and the command end to end."""
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from embcam.cam import EmbeddingCAM
from embcam.cli import DEMO_MODEL
from embcam.datasets.synthetic import generate_dataset
from embcam.evaluation import chen
from embcam.report import METHOD_NAMES, write_report
from embcam.results import read_row


class TinyNet(nn.Module):
    """conv -> ReLU -> conv (the target) -> ReLU -> global average pool -> linear."""

    def __init__(self, channels: int = 6, dim: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 2, 1)
        self.conv2 = nn.Conv2d(4, channels, 3, 2, 1)
        self.head = nn.Linear(channels, dim)

    def forward(self, x):
        a = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(a.mean((-2, -1)))


def tiny(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().eval()


def conv2_output(model: TinyNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(conv2's output, y) by a hand-made hook; the output is kept in the graph."""
    captured = []
    handle = model.conv2.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        y = model(x)
    finally:
        handle.remove()
    return captured[0], y


def reference_weights(model, image, positives, negatives):
    """Chen's weights of one anchor, literally: per triplet, the gradient of its loss
    ||a/|a| - p/|p| ||^2 - ||a/|a| - n/|n| ||^2 with respect to conv2's output, spatially
    averaged; then the mean over the triplets, negated."""
    columns = []
    for p, n in zip(positives, negatives):
        activation, y = conv2_output(model, image[None])
        a = y[0] / torch.sqrt((y[0] ** 2).sum())
        loss = ((a - p / torch.sqrt((p ** 2).sum())) ** 2).sum() - ((a - n / torch.sqrt((n ** 2).sum())) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, activation)
        columns.append(grad[0].mean((1, 2)))
    return -torch.stack(columns).mean(0)


def test_triplet_weights_equal_a_per_triplet_autograd_reference(float64):
    model = tiny()
    torch.manual_seed(1)
    images = torch.randn(3, 3, 16, 16)
    positives, negatives = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    y, w = chen.triplet_weights(EmbeddingCAM(model, "conv2", "autograd"), images, positives, negatives)
    assert w.dtype == torch.float64 and w.shape == (3, 6)
    for b in range(3):
        expected = reference_weights(model, images[b], positives[b], negatives[b])
        assert torch.allclose(w[b], expected, rtol=1e-10, atol=1e-14)
        assert torch.allclose(y[b], model(images[b:b + 1])[0], rtol=1e-12)
    assert all(p.requires_grad for p in model.parameters())  # the parameters' flags are restored


def test_sampled_triplets_are_valid_and_seeded():
    labels = ["a", "b", "a", "c", "b", "a", "d"]  # "d" has no positive: it anchors nothing
    anchors, pos, neg = chen.sample_triplets(labels, 50, seed=3)
    assert anchors.tolist() == [0, 1, 2, 4, 5]
    assert pos.shape == neg.shape == (5, 50)
    lab = np.array(labels, dtype=object)
    for a, ps, ns in zip(anchors, pos, neg):
        assert (lab[ps] == lab[a]).all() and (ps != a).all()
        assert (lab[ns] != lab[a]).all()
    # every other image of the label and every image of another label is drawn (50 draws)
    assert set(pos[0].tolist()) == {2, 5} and set(neg[0].tolist()) == {1, 3, 4, 6}
    again = chen.sample_triplets(labels, 50, seed=3)
    assert all((x == y).all() for x, y in zip((anchors, pos, neg), again))
    assert not (chen.sample_triplets(labels, 50, seed=4)[1] == pos).all()
    assert len(chen.sample_triplets(["a", "a", "a"], 5, seed=0)[0]) == 0  # one label: no negative


def test_nearest_is_by_cosine_not_distance():
    bank = torch.tensor([[10.0, 0.0], [0.6, 0.8], [1.0, 0.1], [0.5, 0.05]])
    queries = torch.tensor([[1.0, 0.0], [0.1, 1.0], [2.0, 0.2]])
    index, cosine = chen.nearest(queries, bank)
    b, q = bank.numpy(), queries.numpy()
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    assert index.tolist() == cos.argmax(1).tolist() == [0, 1, 2]  # query 0: Euclidean would pick row 2
    assert np.allclose(cosine.numpy(), cos.max(1), rtol=1e-6)
    # rows 2 and 3 point the same way: the tie goes to the first
    assert chen.nearest(torch.tensor([[1.0, 0.1]]), bank[2:])[0].tolist() == [0]


def test_top_k_keeps_exactly_the_k_largest_signed_weights():
    torch.manual_seed(2)
    w = torch.randn(4, 10) * 3
    w[0, 0] = -100.0  # a large negative weight is not kept
    top = chen.top_k_weights(w, 3)
    for row, kept in zip(w.numpy(), top.numpy()):
        largest = set(np.argsort(-row)[:3].tolist())
        assert set(np.flatnonzero(kept).tolist()) == largest
        assert np.array_equal(kept[list(largest)], row[list(largest)])
    assert torch.equal(chen.top_k_weights(w, 10), w) and torch.equal(chen.top_k_weights(w, 50), w)


def test_heatmap_is_relu_of_the_top_k_weighted_sum_by_hand():
    a = torch.tensor([[[[1.0, 2.0], [0.0, -1.0]],
                       [[3.0, 0.0], [1.0, 1.0]],
                       [[-2.0, 1.0], [4.0, 0.0]],
                       [[5.0, 5.0], [5.0, 5.0]]]])
    w = torch.tensor([[0.5, -1.0, 2.0, 0.1]])  # top 2: channels 2 (2.0) and 0 (0.5)
    expected = torch.tensor([[[max(0.0, 0.5 * 1 + 2 * -2), 0.5 * 2 + 2 * 1],
                              [0.5 * 0 + 2 * 4, max(0.0, 0.5 * -1 + 0)]]])
    assert torch.equal(chen.transferred_heatmaps(a, w, 2), expected)
    everything = torch.relu((w[0, :, None, None] * a[0]).sum(0))[None]
    assert torch.allclose(chen.transferred_heatmaps(a, w, 4), everything)


def test_explain_transfers_the_nearest_training_weights(float64):
    model = tiny()
    torch.manual_seed(5)
    bank = chen.TransferBank(np.array(["t0", "t1", "t2"], dtype=object), np.array(["x", "y", "z"], dtype=object),
                             torch.randn(3, 5), torch.randn(3, 6))
    images = torch.randn(2, 3, 16, 16)
    y, heat, index, cosine = chen.explain(EmbeddingCAM(model, "conv2", "autograd"), images, bank, 2)
    with torch.no_grad():
        activation, y_ref = conv2_output(model, images)
    cos = torch.nn.functional.normalize(y_ref, dim=1) @ torch.nn.functional.normalize(bank.embeddings, dim=1).T
    assert index.tolist() == cos.argmax(1).tolist()
    for b in range(2):
        w = bank.weights[index[b]]
        keep = np.argsort(-w.numpy())[:2]
        expected = torch.relu(sum(w[c] * activation[b, c] for c in keep))
        assert torch.allclose(heat[b], expected, rtol=1e-12, atol=1e-15)
    assert torch.allclose(y, y_ref, rtol=1e-12) and torch.allclose(cosine, cos.max(1).values, rtol=1e-12)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two training classes and one held-out class, 3 images each, boxes and masks."""
    return generate_dataset(tmp_path_factory.mktemp("chen") / "data", num_classes=100, images_per_class=3,
                            classes=[0, 1, 50], seed=0)


def test_command_writes_a_run_the_report_renders(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--manifest", str(dataset), "--checkpoint", str(DEMO_MODEL), "--out", str(out),
            "--top-k-channels", "50", "--triplets-per-image", "8", "--batch-size", "2", "--no-progress"]
    assert chen.main(args) == 0
    assert "embcam chen-baseline: 3 rows (3 ok" in capsys.readouterr().out
    assert (out / "_SUCCESS").exists() and (out / "_embcam" / "manifest").is_dir()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["proxy"] == "chen" and summary["config"]["top_k_only"] is True
    assert summary["train"]["anchors"] == 6 and summary["train"]["triplets"] == 48

    results = pq.read_table(out / "results").to_pandas().sort_values("image_id")
    assert results.image_id.tolist() == ["c050_0000", "c050_0001", "c050_0002"]
    assert (results.proxy_kind == "chen").all() and results.score.isna().all()
    bank = pq.read_table(out / "_embcam" / "chen" / "train_weights.parquet").to_pandas()
    transfer = pq.read_table(out / "_embcam" / "chen" / "transfer").to_pandas().set_index("image_id")
    assert len(bank) == 6 and all(len(w) == 128 for w in bank.weights)
    train_y = np.stack(bank.embedding)
    train_y /= np.linalg.norm(train_y, axis=1, keepdims=True)
    for row in results.itertuples():
        y = np.asarray(row.embedding, np.float64)
        cos = train_y @ (y / np.linalg.norm(y))
        assert transfer.loc[row.image_id, "source_image_id"] == bank.image_id[int(cos.argmax())]
        assert row.proxy_label == bank.label[int(cos.argmax())]
        assert row.cosine == pytest.approx(cos.max(), rel=1e-5)
        assert np.array_equal(row.heatmap, row.heatmap_topk) and min(row.heatmap) >= 0
        assert row.ratio_bbox == row.ratio_bbox_topk
    assert read_row(str(out), "c050_0001")["uri"].endswith("c050_0001.jpg")  # embcam show's join

    report = write_report([str(out)], str(tmp_path / "report"), overlays=1)
    (method,) = report["table1"]["methods"]
    assert method["name"] == METHOD_NAMES["chen"] and method["top_k"] == 50
    assert method["rows"]["bbox"]["all"]["mean"] is None
    assert method["rows"]["bbox"]["topk"]["mean"] == pytest.approx(results.ratio_bbox.mean(), rel=1e-6)
    assert method["accuracy"]["mean"] == pytest.approx(results.loc_correct.mean())
    markdown = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {METHOD_NAMES['chen']} | BBox"))
    assert row.split(" | ")[3] == "—" and "top-50 map" in markdown

    # a crash after the first piece: the re-run computes the rest only, with the stored weights
    pieces = sorted((out / "results").glob("part-*.parquet"))
    assert len(pieces) == 2
    for path in (out / "summary.json", out / "_SUCCESS", pieces[-1]):
        path.unlink()
    (out / "_embcam" / "chen" / "train.json").write_text(json.dumps({"anchors": -1, "triplets": -1}))
    assert chen.main(args) == 0
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["counts"]["resumed"] == 2 and resumed["counts"]["results"] == 3
    assert resumed["train"]["anchors"] == -1  # the training weights were not computed again
    again = pq.read_table(out / "results").to_pandas().sort_values("image_id")
    assert np.array_equal(np.stack(again.heatmap), np.stack(results.heatmap))
    assert again.cosine.tolist() == results.cosine.tolist()

    with pytest.raises(SystemExit) as exit_:  # another configuration: not replaced without --overwrite
        chen.main([*args[:-6], "40", *args[-5:]])
    assert exit_.value.code == 2 and "top_k_channels: 50 -> 40" in capsys.readouterr().err


def test_no_training_rows_fails_in_one_line(tmp_path, capsys):
    manifest = generate_dataset(tmp_path / "data", num_classes=100, images_per_class=1, classes=[50, 51], seed=0)
    with pytest.raises(SystemExit) as exit_:
        chen.main(["--manifest", str(manifest), "--checkpoint", str(DEMO_MODEL), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith("embcam chen-baseline: error: manifest ") and "no rows with split == 'train'" in err
    assert not Path(tmp_path / "run").exists()
