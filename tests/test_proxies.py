import itertools

import numpy as np
import pyarrow.parquet as pq
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


def test_the_pass_one_reduce_sums_each_class_over_its_pieces(tmp_path):
    """The reduce's steps (tasks.partials_by_bucket over groups of pieces, then
    tasks.proxies_of_bucket per bucket) against MeanProxyAccumulator on every row at once:
    each class lands in one bucket, whichever group holds its rows; a piece without
    labelled rows (a null label, an empty sum) adds nothing; pieces of different dimensions
    are refused."""
    import pyarrow as pa

    from embcam.job.tasks import partials_by_bucket, partials_table, proxies_of_bucket, sum_partials

    rng = np.random.default_rng(4)
    labels = [f"c{i % 7}" for i in range(40)]
    y = rng.normal(size=(40, 4))
    y_hat = y / np.linalg.norm(y, axis=1, keepdims=True)
    expected = MeanProxyAccumulator().add(y, labels)
    paths = []
    for k, rows in enumerate(np.array_split(np.arange(40), 5)):  # five pieces, classes spread over them
        piece = MeanProxyAccumulator().add(y[rows], [labels[i] for i in rows]).partials()
        table = partials_table([p["label"] for p in piece], [p["sum"] for p in piece], [p["count"] for p in piece])
        paths.append(str(tmp_path / f"part-{k}.parquet"))
        pq.write_table(table, paths[-1])
    pq.write_table(partials_table([None], np.zeros((1, 0)), [0]), tmp_path / "empty.parquet")
    paths.append(str(tmp_path / "empty.parquet"))
    assert partials_by_bucket(paths, None, 1).equals(sum_partials(pq.read_table(paths)))  # one bucket: one table
    buckets = [partials_by_bucket(paths[:3], None, 3), partials_by_bucket(paths[3:], None, 3)]
    proxies = [proxies_of_bucket(*(group[b] for group in buckets)) for b in range(3)]
    seen = [label for table in proxies for label in table.column("label").to_pylist()]
    assert sorted(seen) == sorted(expected.sums) and len(seen) == len(set(seen))  # each class once
    assert all(t.num_rows for t in proxies)  # 7 classes over 3 buckets: the hash spreads them
    reference = expected.finalize()
    for table in proxies:
        for label, vector, count in zip(*(table.column(c).to_pylist() for c in ("label", "proxy", "count"))):
            mine = y_hat[[i for i, v in enumerate(labels) if v == label]]
            np.testing.assert_allclose(vector, reference[label], rtol=1e-6)
            np.testing.assert_allclose(vector, mine.mean(0) / np.linalg.norm(mine.mean(0)), rtol=1e-6)
            assert count == expected.counts[label] == len(mine)
    assert sum_partials(partials_table([None], np.zeros((1, 0)), [0])).num_rows == 0
    assert proxies_of_bucket(partials_table([None], np.zeros((1, 0)), [0])).num_rows == 0  # an empty bucket
    with pytest.raises(ValueError, match="different embedding dimensions"):
        sum_partials(pa.concat_tables([partials_table(["a"], np.ones((1, 4)), [1]),
                                       partials_table(["b"], np.ones((1, 2)), [1]),
                                       partials_table(["c"], np.ones((1, 2)), [1])]))
    with pytest.raises(ValueError, match="'a': normalised embeddings cancel out"):
        proxies_of_bucket(partials_table(["a"], np.zeros((1, 2)), [2]))


def test_a_proxy_file_is_read_where_it_is_used_and_ships_as_its_location(tmp_path):
    """ProxyFile answers as the dict load_proxy_bank gives; pickled, it is its path only
    (never the vectors it read); a file rewritten in place is read again."""
    import pickle

    from embcam.proxies import ProxyFile

    bank = {f"c{i}": np.random.default_rng(i).normal(size=8).astype(np.float32) for i in (3, 1, 2)}
    save_proxy_bank(tmp_path / "p.parquet", bank)
    proxies = ProxyFile(str(tmp_path / "p.parquet"))
    for label, vector in bank.items():
        np.testing.assert_array_equal(proxies.get(label), vector)
    assert proxies.get("c9") is None and proxies.get("c") is None and proxies.get("zz", "none") == "none"
    shipped = pickle.dumps(proxies)
    assert len(shipped) < 500 and pickle.loads(shipped).get("c1") is not None
    save_proxy_bank(tmp_path / "p.parquet", {"c1": np.ones(8, np.float32), "c7": np.zeros(8, np.float32)})
    fresh = ProxyFile(str(tmp_path / "p.parquet"))
    np.testing.assert_array_equal(fresh.get("c1"), np.ones(8))
    assert fresh.get("c3") is None
