"""Tests for embcam.pairs.make (embcam make-pairs): nearest neighbours against a brute-force
reference (scipy's cosine distance, every pair), a hand-computed case with exact ties,
block independence, query sampling, same-label pairs against itertools' enumeration of
every pair, and the one-line errors of the command."""

import itertools
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.spatial.distance import cdist

from embcam.cli import main as embcam_main
from embcam.data.schemas import conform
from embcam.pairs.make import _triangle, make_pairs, nearest_neighbours, read_embeddings, same_label_pairs


def ok_row(image_id, embedding, label="a", split="eval"):
    return dict(image_id=image_id, label=label, split=split, status="ok", error=None, proxy_kind="self",
                embedding=[float(v) for v in embedding])


def error_row(image_id, label="a"):
    return dict(image_id=image_id, label=label, split="eval", status="error", error="image: gone",
                proxy_kind="self")


def write_run(path, rows, files=2):
    """A run folder: the rows spread over ``files`` result files, in the order given."""
    (path / "results").mkdir(parents=True)
    for k in range(files):
        if rows[k::files]:
            pq.write_table(conform(rows[k::files], "results"), path / "results" / f"part-{k}.parquet")
    (path / "summary.json").write_text(json.dumps({"config": {"proxy": "self"}}))
    return str(path)


@pytest.fixture()
def random_run(tmp_path):
    """37 ok rows (ids in shuffled order), 3 error rows, 6-dimensional float32 embeddings."""
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(37, 6)).astype(np.float32)
    ids = [f"im{k:02d}" for k in rng.permutation(37)]
    rows = [ok_row(i, v, label="abc"[n % 3]) for n, (i, v) in enumerate(zip(ids, vectors))]
    rows[5:5] = [error_row("err0"), error_row("err1")]
    rows.append(error_row("err2"))
    return write_run(tmp_path / "run", rows), dict(zip(ids, vectors))


def reference_neighbours(by_id: dict, k: int) -> pd.DataFrame:
    """Every query's k best by scipy's cosine distance in float64, ties by image_id."""
    ids = sorted(by_id)
    x = np.array([by_id[i] for i in ids], np.float64)
    cos = 1.0 - cdist(x, x, "cosine")
    rows = []
    for q, query in enumerate(ids):
        others = sorted((j for j in range(len(ids)) if j != q), key=lambda j: (-cos[q, j], ids[j]))
        rows += [(query, ids[j], r + 1, cos[q, j]) for r, j in enumerate(others[:k])]
    return pd.DataFrame(rows, columns=["query_id", "match_id", "rank", "neighbour_cosine"])


def test_neighbours_equal_the_brute_force_reference(random_run):
    run, by_id = random_run
    table, emb = make_pairs(run, neighbours=4)
    got = table.to_pandas()
    want = reference_neighbours(by_id, 4)
    assert list(got.columns) == ["query_id", "match_id", "rank", "neighbour_cosine"]
    assert table.schema.field("rank").type == pa.int32()
    assert table.schema.field("neighbour_cosine").type == pa.float64()
    for column in ("query_id", "match_id", "rank"):
        assert got[column].tolist() == want[column].tolist()
    np.testing.assert_allclose(got["neighbour_cosine"], want["neighbour_cosine"], rtol=0, atol=1e-14)
    assert emb.left_out == 0 and len(emb.ids) == 37  # error rows never enter


def test_blocks_of_any_size_give_the_same_bits(random_run):
    run, _ = random_run
    whole, _ = make_pairs(run, neighbours=5, block_rows=1000)
    for rows in (1, 3, 7, 36):
        assert make_pairs(run, neighbours=5, block_rows=rows)[0].equals(whole)
    assert make_pairs(run, neighbours=5)[0].equals(whole)  # the default block


def test_hand_computed_cosines_and_exact_ties_by_image_id(tmp_path):
    # x: (1, 0); "e" and "b" point the same way (cosine 1, tied: b before e); c at 3-4-5
    # (cosine 3/5), d orthogonal (0), f opposite (-1).
    rows = [ok_row("x", [1, 0]), ok_row("e", [5, 0]), ok_row("c", [3, 4]), ok_row("b", [2, 0]),
            ok_row("f", [-7, 0]), ok_row("d", [0, 2])]
    table, _ = make_pairs(write_run(tmp_path / "run", rows), neighbours=5)
    of_x = table.to_pandas().query("query_id == 'x'")
    assert list(of_x["match_id"]) == ["b", "e", "c", "d", "f"]
    assert list(of_x["neighbour_cosine"]) == [1.0, 1.0, pytest.approx(0.6, abs=1e-15), 0.0, -1.0]
    of_d = table.to_pandas().query("query_id == 'd'")
    assert list(of_d["match_id"]) == ["c", "b", "e", "f", "x"]  # 4/5, then four at 0 by id
    assert list(of_d["neighbour_cosine"])[1:] == [0.0] * 4


def test_sampled_queries_are_rows_of_the_full_answer(random_run):
    run, _ = random_run
    full = make_pairs(run, neighbours=3)[0].to_pandas()
    sample = make_pairs(run, neighbours=3, max_queries=6, seed=11)[0].to_pandas()
    queries = sample["query_id"].unique()
    assert len(queries) == 6 and len(sample) == 18
    expected = full[full["query_id"].isin(queries)].reset_index(drop=True)
    assert sample.equals(expected)
    assert make_pairs(run, neighbours=3, max_queries=6, seed=11)[0].to_pandas().equals(sample)
    other = make_pairs(run, neighbours=3, max_queries=6, seed=12)[0].to_pandas()
    assert set(other["query_id"]) != set(queries)


def test_split_filter_and_unusable_embeddings(tmp_path):
    rows = [ok_row("a0", [1, 0]), ok_row("a1", [1, 1]), ok_row("a2", [0, 1]),
            ok_row("t0", [1, 0.5], split="train"), ok_row("z", [0, 0]), ok_row("n", [np.nan, 1])]
    run = write_run(tmp_path / "run", rows)
    emb = read_embeddings(run, split="eval")
    assert list(emb.ids) == ["a0", "a1", "a2"] and emb.left_out == 2
    table, _ = make_pairs(run, neighbours=2, split="eval")
    assert set(table.column("match_id").to_pylist()) == {"a0", "a1", "a2"}


def test_triangle_numbering_is_every_pair_once():
    pairs = [(i, j) for j in range(80) for i in range(j)]
    i, j = _triangle(np.arange(len(pairs)))
    assert list(zip(i.tolist(), j.tolist())) == pairs
    big = np.array([10**12, 10**15 + 7, 2**52 - 1])
    i, j = _triangle(big)
    assert ((0 <= i) & (i < j)).all() and (j * (j - 1) // 2 + i == big).all()


LABELS = np.array(["a", "b", "a", None, "c", "a", "b", "a", "a", "b"], object)  # a: 5, b: 3, c: 1


def all_same_label_pairs():
    return {(i, j) for i, j in itertools.combinations(range(len(LABELS)), 2)
            if LABELS[i] is not None and LABELS[i] == LABELS[j]}


def test_same_label_pairs_all_of_them():
    pairs = same_label_pairs(LABELS, 13, seed=3)  # C(5,2) + C(3,2) = 13: every pair
    assert {tuple(p) for p in pairs.tolist()} == all_same_label_pairs()
    assert len(pairs) == 13


def test_same_label_pairs_sampled():
    everything = all_same_label_pairs()
    pairs = same_label_pairs(LABELS, 6, seed=3)
    as_set = {tuple(p) for p in pairs.tolist()}
    assert len(as_set) == 6 and as_set <= everything  # distinct, same label, i < j (so no self pair)
    assert np.array_equal(same_label_pairs(LABELS, 6, seed=3), pairs)
    assert any(not np.array_equal(same_label_pairs(LABELS, 6, seed=s), pairs) for s in (4, 5))
    # over seeds every pair is drawn
    drawn = {tuple(p) for s in range(60) for p in same_label_pairs(LABELS, 2, seed=s).tolist()}
    assert drawn == everything


def test_same_label_table_from_a_run(tmp_path):
    rows = [ok_row(f"i{k}", [1, k], label=LABELS[k]) for k in range(len(LABELS))] + [error_row("e", "c")]
    table, _ = make_pairs(write_run(tmp_path / "run", rows), same_label=13, seed=1)
    frame = table.to_pandas()
    assert list(frame.columns) == ["query_id", "match_id", "label"]
    want = {(f"i{i}", f"i{j}", LABELS[i]) for i, j in all_same_label_pairs()}
    assert set(frame.itertuples(index=False, name=None)) == want


def test_nearest_neighbours_refuses_k_too_large():
    with pytest.raises(ValueError, match="K = 3 neighbours need at least 4 images; there are 3"):
        nearest_neighbours(np.eye(3), 3)


@pytest.mark.parametrize("args, message", [
    (["--neighbours", "6"], "K = 6 neighbours need at least 7 images; there are 6"),
    (["--neighbours", "0"], "--neighbours must be >= 1, got 0"),
    (["--same-label", "4"], "N = 4 same-label pairs asked for, but only 3 exist"),
    (["--same-label", "1", "--split", "test"], "no ok row of split 'test' has an embedding"),
    (["--neighbours", "2", "--max-queries", "0"], "--max-queries must be >= 1, got 0"),
])
def test_command_errors_are_one_line(tmp_path, capsys, args, message):
    rows = [ok_row(f"i{k}", [1, k], label="ab"[k // 3]) for k in range(6)]  # a: 3 (3 pairs), b: 3 (3)
    rows[3:] = [dict(r, label=f"solo{k}") for k, r in enumerate(rows[3:])]
    run = write_run(tmp_path / "run", rows)
    assert embcam_main(["make-pairs", run, "--out", str(tmp_path / "p.parquet"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("embcam make-pairs: error: ") and err.endswith(f"{message}\n") and err.count("\n") == 1
    assert not (tmp_path / "p.parquet").exists()


def test_command_errors_on_runs_without_what_it_needs(tmp_path, capsys):
    no_label = write_run(tmp_path / "solo", [ok_row(f"i{k}", [1, k], label=f"l{k}") for k in range(4)])
    plain = tmp_path / "plain"
    (plain / "results").mkdir(parents=True)
    pq.write_table(pa.table({"image_id": ["a"], "status": ["ok"]}), plain / "results" / "part-0.parquet")
    out = str(tmp_path / "p.parquet")
    for run, args, message in [
            (no_label, ["--same-label", "1"], "no label has two ok images with embeddings"),
            (str(plain), ["--neighbours", "1"], f"run {plain}: results have no embedding column"),
            (str(tmp_path / "nothing"), ["--neighbours", "1"], "no results here")]:
        assert embcam_main(["make-pairs", run, "--out", out, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("embcam make-pairs: error: ") and message in err and err.count("\n") == 1


def test_command_writes_the_pairs_file(random_run, tmp_path, capsys):
    run, by_id = random_run
    out = tmp_path / "sub" / "pairs.parquet"
    assert embcam_main(["make-pairs", run, "--out", str(out), "--neighbours", "2", "--block-rows", "5"]) == 0
    assert capsys.readouterr().out == (f"embcam make-pairs: 74 pairs (the 2 nearest neighbours of 37 queries "
                                       f"among 37 images) -> {out}\n")
    frame = pd.read_parquet(out)
    want = reference_neighbours(by_id, 2)
    for column in ("query_id", "match_id", "rank"):
        assert frame[column].tolist() == want[column].tolist()
    with pytest.raises(SystemExit, match="2"):
        embcam_main(["make-pairs", run, "--out", str(out), "--same-label", "5", "--max-queries", "3"])
    assert "--max-queries goes with --neighbours" in capsys.readouterr().err
