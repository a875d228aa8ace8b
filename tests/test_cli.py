"""The embcam command line, in-process (the explain job itself is tested in test_pipeline)."""
import json

import pandas as pd
import pytest

from embcam.cli import main


def test_make_manifest_synthetic_and_folders(tmp_path, capsys):
    assert main(["make-manifest", "synthetic", str(tmp_path / "synth"), "--classes", "2", "--per-class", "3"]) == 0
    info = json.loads(capsys.readouterr().out)
    df = pd.read_parquet(info["manifest"])
    assert len(df) == 6 and info["images"] == 6 and set(df.split) == {"train", "eval"}
    assert main(["make-manifest", "folders", str(tmp_path / "synth" / "images"), "--out", str(tmp_path / "f.parquet")]) == 0
    folders = pd.read_parquet(tmp_path / "f.parquet")
    assert sorted(folders.label.unique()) == sorted(df.label.unique()) and len(folders) == 6


def test_explain_rejects_bad_input_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse: --proxy and --proxies are exclusive
        main(["explain", "--manifest", "m.parquet", "--out", str(tmp_path), "--proxy", "mean", "--proxies", "b.parquet"])
    assert main(["explain", "--manifest", "m.parquet", "--out", str(tmp_path), "--proxy-split", "train"]) == 2
    assert "error: --proxy-split only applies to --proxy mean" in capsys.readouterr().err
    assert main(["explain", "--manifest", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert "none.parquet" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_train_and_report_are_reachable(capsys):
    with pytest.raises(SystemExit) as exit_train:
        main(["train", "--help"])
    assert exit_train.value.code == 0 and "--manifest" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_report:
        main(["report", "--help"])
    assert exit_report.value.code == 0 and "--overlays" in capsys.readouterr().out
