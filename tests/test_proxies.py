import itertools

import numpy as np
import pytest
import torch

from embcam import MeanProxyAccumulator, load_proxy_bank, onehot, save_proxy_bank


def one_shot(y, labels):
    """normalise(mean_j normalise(y_j)) per class, straight from the definition."""
    out = {}
    for label in set(labels):
        rows = y[[i for i, k in enumerate(labels) if k == label]]
        mean = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).mean(0)
        out[label] = mean / np.linalg.norm(mean)
    return out


def test_merging_partial_accumulators_in_any_split_equals_one_shot():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(23, 5)) * rng.uniform(0.1, 10, size=(23, 1))  # norms differ a lot
    labels = [f"c{i % 4}" for i in range(23)]
    ref = one_shot(y, labels)
    for cuts in itertools.combinations(range(1, 23), 3):
        if sum(cuts) % 7:  # a spread of splits, not all 1540
            continue
        parts = np.split(np.arange(23), cuts)
        accs = [MeanProxyAccumulator().add(y[p], [labels[i] for i in p]) for p in parts]
        merged = accs[0]
        for a in accs[1:][::-1]:
            merged.merge(a)
        got = merged.finalize()
        assert got.keys() == ref.keys()
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-6)
        assert merged.counts == {f"c{i}": sum(1 for k in labels if k == f"c{i}") for i in range(4)}


def test_partials_round_trip_and_bad_input():
    y = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
    acc = MeanProxyAccumulator().add(y, ["a", "a", None])  # None labels are skipped
    rebuilt = MeanProxyAccumulator()
    for row in acc.partials():
        rebuilt.add_partial(row["label"], row["sum"], row["count"])
    mean = np.array([0.6, 0.8]) + np.array([0.0, 1.0])
    np.testing.assert_allclose(rebuilt.finalize()["a"], mean / np.linalg.norm(mean), rtol=1e-7)
    with pytest.raises(ValueError, match="zero"):
        MeanProxyAccumulator().add(np.zeros((1, 2)), ["a"])
    with pytest.raises(ValueError, match="cancel"):
        MeanProxyAccumulator().add(np.array([[1.0, 0], [-1.0, 0]]), ["a", "a"]).finalize()


def test_onehot():
    p = onehot([2, 0], 3)
    assert p.tolist() == [[0, 0, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        onehot([3], 3)


def test_proxy_bank_round_trip_and_validation(tmp_path):
    bank = {"b": np.array([0.0, 1.0], np.float32), "a": np.array([0.6, 0.8], np.float32)}
    save_proxy_bank(tmp_path / "bank.parquet", bank, {"a": 3, "b": 1})
    back = load_proxy_bank(tmp_path / "bank.parquet")
    assert sorted(back) == ["a", "b"] and back["a"].tolist() == pytest.approx([0.6, 0.8])
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"label": ["a", "a"], "proxy": [[1.0], [2.0]]}), tmp_path / "dup.parquet")
    with pytest.raises(ValueError, match="duplicate labels"):
        load_proxy_bank(tmp_path / "dup.parquet")
    pq.write_table(pa.table({"label": ["a", "b"], "proxy": [[1.0], [2.0, 3.0]]}), tmp_path / "dims.parquet")
    with pytest.raises(ValueError, match="different dimensions"):
        load_proxy_bank(tmp_path / "dims.parquet")


def test_the_pass_one_reduce_sums_each_class_over_its_pieces():
    """tasks.reduce_partials against a per-row loop; a piece without labelled rows (a null
    label, an empty sum) adds nothing; pieces of different dimensions are refused."""
    import pyarrow as pa

    from embcam.job.tasks import partials_table, reduce_partials

    rng = np.random.default_rng(4)
    labels, sums, counts = ["b", "a", "b", "c", "a"], rng.normal(size=(5, 4)), [2, 1, 3, 1, 5]
    table = pa.concat_tables([partials_table(labels[:3], sums[:3], counts[:3]),
                              partials_table([None], np.zeros((1, 0)), [0]),
                              partials_table(labels[3:], sums[3:], counts[3:])])
    acc = reduce_partials(table)
    assert sorted(acc.sums) == ["a", "b", "c"] and acc.counts == {"a": 6, "b": 5, "c": 1}
    for label in "abc":
        expected = sum(s for lab, s in zip(labels, sums) if lab == label)
        np.testing.assert_allclose(acc.sums[label], expected, rtol=1e-15)
    assert not reduce_partials(partials_table([None], np.zeros((1, 0)), [0])).sums
    with pytest.raises(ValueError, match="different embedding dimensions"):
        reduce_partials(pa.concat_tables([partials_table(["a"], np.ones((1, 4)), [1]),
                                          partials_table(["b"], np.ones((1, 2)), [1]),
                                          partials_table(["c"], np.ones((1, 2)), [1])]))
