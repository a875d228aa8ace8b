"""The embcam command line: in-process, and as a user runs it (the console script in a
subprocess, for what only a real process shows: Ray's console output). The explain job
itself is tested in test_pipeline."""
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import tomllib

import embcam
from embcam import cli
from embcam.arguments import error_line
from embcam.cli import DEMO_MODEL, main
from embcam.datasets.synthetic import generate_dataset

EMBCAM = str(Path(sys.executable).with_name("embcam"))
# Ray's C++ core worker's line on every Ray Data actor pool (outside Python logging), kept
# off a quiet run's console: see ray-project/ray#57733
RAY_ACTOR_ARGS_NOTICE = ("[2026-12-07 23:00:16,899 E 1931 1931] core_worker.cc:2465: Actor with class name: "
                         "'MapWorker(MapBatches(ExplainModel))' and ID: '62015de1bcee22bcb79a5f9501000000' has "
                         "constructor arguments in the object store and max_restarts > 0. If the arguments in the "
                         "object store go out of scope or are lost, the actor restart will fail.")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return generate_dataset(root, num_classes=2, images_per_class=2, min_side=40, max_side=56, seed=5)


def test_make_manifest_synthetic_and_folders(tmp_path, capsys):
    assert main(["make-manifest", "synthetic", str(tmp_path / "synth"), "--classes", "2", "--per-class", "3"]) == 0
    info = json.loads(capsys.readouterr().out)
    df = pd.read_parquet(info["manifest"])
    assert len(df) == 6 and info["images"] == 6 and set(df.split) == {"train", "eval"}
    images = str(tmp_path / "synth" / "images")
    assert main(["make-manifest", "folders", images, "--out", str(tmp_path / "f.parquet")]) == 0
    folders = pd.read_parquet(tmp_path / "f.parquet")
    assert sorted(folders.label.unique()) == sorted(df.label.unique()) and len(folders) == 6


def test_explain_rejects_bad_input_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse: --proxy and --proxies are exclusive
        main(["explain", "--manifest", "m.parquet", "--out", str(tmp_path), "--proxy", "mean",
              "--proxies", "b.parquet"])
    assert main(["explain", "--manifest", "m.parquet", "--out", str(tmp_path), "--proxy-split", "train"]) == 2
    assert "error: --proxy-split only applies to --proxy mean" in capsys.readouterr().err
    assert main(["explain", "--manifest", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert "none.parquet" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_make_manifest_kinds_have_their_own_help(capsys):
    helps = {}
    for kind in ("synthetic", "cub", "folders"):
        with pytest.raises(SystemExit) as done:
            main(["make-manifest", kind, "--help"])
        assert done.value.code == 0
        helps[kind] = capsys.readouterr().out
    assert helps["synthetic"].startswith("usage: embcam make-manifest synthetic [-h] [--classes CLASSES]")
    assert "--per-class" in helps["synthetic"] and "--out" not in helps["synthetic"]
    assert helps["cub"].startswith("usage: embcam make-manifest cub [-h] --out MANIFEST.parquet CUB_200_2011")
    assert helps["folders"].startswith("usage: embcam make-manifest folders [-h] --out MANIFEST.parquet ROOT")
    assert "--classes" not in helps["cub"] + helps["folders"]


def test_a_manifest_whose_uri_column_is_called_path_says_so(tmp_path, capsys):
    pd.DataFrame({"image_id": ["a"], "path": ["a.jpg"], "label": ["x"]}).to_parquet(tmp_path / "m.parquet")
    assert main(["explain", "--manifest", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (
        f"embcam explain: error: manifest file {tmp_path / 'm.parquet'}: missing required column(s) 'uri' "
        "(columns found: image_id, path, label); did you mean 'path'? rename it to 'uri'\n")


def test_a_mean_proxy_without_label_names_the_likely_column(tmp_path, capsys):
    pd.DataFrame({"image_id": ["a"], "uri": ["a.jpg"], "class": ["x"]}).to_parquet(tmp_path / "m.parquet")
    assert main(["explain", "--manifest", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "o"),
                 "--proxy", "mean", "--checkpoint", str(DEMO_MODEL)]) == 2
    assert capsys.readouterr().err == (
        "embcam explain: error: column 'label': --proxy mean needs a label per image, and the manifest has none; "
        "did you mean 'class'? rename it to 'label'\n")


def test_train_and_report_are_reachable(capsys):
    with pytest.raises(SystemExit) as exit_train:
        main(["train", "--help"])
    assert exit_train.value.code == 0 and "--manifest" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_report:
        main(["report", "--help"])
    assert exit_report.value.code == 0 and "--overlays" in capsys.readouterr().out


# --- --version -------------------------------------------------------------------------------


def test_version_has_one_source(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"embcam {embcam.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", embcam.__version__)
    # pyproject.toml says no version of its own: it reads embcam.__version__ (the built wheel's
    # metadata is checked in test_wheel)
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "embcam.__version__"}


# --- bad input: one line, exit status 2 ----------------------------------------------------


def _exit_status(argv: list[str]) -> int:
    """main's status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as done:
        return done.code


BAD_INPUTS = {
    "unknown model source": (["explain", "--out", "{tmp}/o", "--model", "nope:x"],
                             "embcam explain: error: --model nope:x: no module named 'nope' here"),
    "missing manifest": (["explain", "--manifest", "{tmp}/none.parquet", "--out", "{tmp}/o"],
                         "embcam explain: error: manifest source '{tmp}/none.parquet': no such file or directory"),
    "checkpoint that is not one": (["explain", "--out", "{tmp}/o", "--checkpoint", "{tmp}/garbage.pt"],
                                   "embcam explain: error: checkpoint {tmp}/garbage.pt is not a weights-only"),
    "missing checkpoint": (["explain", "--out", "{tmp}/o", "--checkpoint", "{tmp}/none.pt"],
                           "embcam explain: error: --checkpoint {tmp}/none.pt: no such file\n"),
    "misspelt source": (["explain", "--out", "{tmp}/o", "--model", "torchvison:resnet18+linear:128"],
                        "embcam explain: error: --model torchvison:resnet18+linear:128: no module named "
                        "'torchvison' here; did you mean 'torchvision:resnet18+linear:128'?; for your own code: "
                        "ship it with --py-modules PATH or --working-dir DIR, or install it on every node\n"),
    "misspelt architecture": (["explain", "--out", "{tmp}/o", "--model", "torchvision:resnet81"],
                              "embcam explain: error: unknown architecture 'resnet81' in 'torchvision:resnet81'; "
                              "did you mean 'resnet18' or 'resnet152' or 'resnet101'?; `embcam models torchvision:` "
                              "lists its 58 architectures; sources: "),
    "missing proxy bank": (["explain", "--out", "{tmp}/o", "--proxies", "{tmp}/none.parquet",
                            "--checkpoint", str(DEMO_MODEL)],
                           "embcam explain: error: {tmp}/none.parquet: no such file or directory"),
    "missing required option": (["explain", "--manifest", "m.parquet"],
                                ("embcam explain: error: the following arguments are required: --out "
                                 "(see embcam explain --help)")),
    "not a number": (["explain", "--out", "{tmp}/o", "--batch-size", "x"],
                     "embcam explain: error: argument --batch-size: invalid int value: 'x' (see embcam"),
    "unknown command": (["nosuch"], "embcam: error: argument command: invalid choice: 'nosuch'"),
    "train, missing manifest": (["train", "--manifest", "{tmp}/none.parquet", "--out", "{tmp}/m.pt"],
                                "embcam train: error: manifest source '{tmp}/none.parquet': no such file"),
    "report, missing option": (["report", "{tmp}"],
                               ("embcam report: error: the following arguments are required: --out "
                                "(see embcam report --help)")),
    "make-manifest, missing option": (["make-manifest", "folders", "{tmp}"],
                                      "embcam make-manifest folders: error: the following arguments are required: "
                                      "--out (see embcam make-manifest folders --help)\n"),
    "make-manifest, no kind": (["make-manifest"], "embcam make-manifest: error: the following arguments are "
                                                  "required: KIND (see embcam make-manifest --help)\n"),
    "make-manifest, option of another kind": (["make-manifest", "cub", "{tmp}", "--out", "{tmp}/m.parquet",
                                               "--classes", "3"],
                                              "embcam: error: unrecognized arguments: --classes 3"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_status_2(case, manifest, tmp_path, capsys):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint\n")
    argv, expected = BAD_INPUTS[case]
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    if argv[0] == "explain" and "--manifest" not in argv:
        argv += ["--manifest", str(manifest)]
    assert _exit_status(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.endswith("\n") and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(expected.replace("{tmp}", str(tmp_path))), captured.err
    assert captured.out == ""


def test_no_mean_proxy_is_one_line_too(ray_session, tmp_path, capsys):
    """Found only once the job ran: every labelled image unreadable leaves no mean proxy."""
    manifest = generate_dataset(tmp_path / "data", num_classes=2, images_per_class=2, min_side=40, max_side=56, seed=5)
    images = [path for path in (tmp_path / "data" / "images").rglob("*") if path.is_file()]
    assert len(images) == 4
    for image in images:
        image.unlink()
    argv = ["explain", "--manifest", str(manifest), "--out", str(tmp_path / "run"), "--checkpoint", str(DEMO_MODEL),
            "--proxy", "mean", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == ("embcam explain: error: no labelled image could be embedded, so there is no mean proxy to "
                   "explain against: are the images where the manifest's uris and --image-root say?\n")


@pytest.mark.slow  # a subprocess
def test_the_console_script_says_it_in_one_line(tmp_path):
    done = subprocess.run([EMBCAM, "explain", "--manifest", str(tmp_path / "none.parquet"), "--out", str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == f"embcam explain: error: manifest source '{tmp_path / 'none.parquet'}': " \
                          "no such file or directory\n"


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "list_models", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["models"])


def test_error_line():
    assert error_line(FileNotFoundError(2, "No such file or directory", "/x/m.pt")) == \
        "/x/m.pt: No such file or directory"
    assert error_line(FileNotFoundError("/x/m.parquet")) == "/x/m.parquet: no such file or directory"
    assert error_line(FileNotFoundError("run r: no summary.json")) == "run r: no summary.json"
    assert error_line(ValueError("column 'uri':\n  rows 3, 4\n")) == "column 'uri': rows 3, 4"
    assert error_line(ValueError()) == "ValueError"


# --- what a real run shows --------------------------------------------------------------------


def test_quiet_ray_hides_infos_and_known_noise_for_the_call_only():
    import ray.data  # noqa: F401  (creates Ray Data's console handlers)

    from embcam.job.console import RAY_DATA_LOGGER, quiet_ray

    # Read what Ray Data's own console handlers print: they hold the stderr of whenever
    # Ray Data was first imported, so capsys does not see them after another test did.
    consoles = [h for h in logging.getLogger(RAY_DATA_LOGGER).handlers if isinstance(h, logging.StreamHandler)]
    assert consoles
    stream = io.StringIO()
    old = [h.stream for h in consoles]
    for h in consoles:
        h.stream = stream  # not setStream: it flushes the old stream, maybe an earlier test's closed capture
    try:
        data = logging.getLogger("ray.data.dataset")  # one of Ray Data's loggers
        with quiet_ray(True):
            data.info("an INFO line")
            data.warning("Warning: The Ray cluster currently does not have any available CPUs. The Dataset job "
                         "will hang unless more CPUs are freed up.")
            data.warning("a warning that matters")
        quiet = stream.getvalue()
        data.info("an INFO line, after")
        after = stream.getvalue()[len(quiet):]
    finally:
        for h, s in zip(consoles, old):
            h.stream = s
    assert "a warning that matters" in quiet and "INFO" not in quiet and "will hang" not in quiet, quiet
    assert "of memory per worker" not in quiet, quiet
    assert "an INFO line, after" in after


def test_ray_data_memory_advice_is_kept_off_for_the_model_stage_only():
    """Ray Data's own text, for the model actors (a fixed pool) and for another operator."""
    from ray.data._internal.issue_detection.detectors.high_memory_detector import (
        HIGH_MEMORY_PERIODIC_WARNING,
        _format_message,
    )

    from embcam.job.console import RayNoise

    def warning(op_name):
        text = _format_message(HIGH_MEMORY_PERIODIC_WARNING.format(
            op_name=op_name, memory_per_task="2.6GiB", max_memory="2.7GiB", initial_memory_request="0.0B",
            recommended_memory="3.2GiB", recommended_memory_bytes=3435973837, detection_time_interval_s=30))
        return logging.LogRecord("ray.data", logging.WARNING, __file__, 1, text, None, None)

    assert not RayNoise().filter(warning("MapBatches(ExplainModel)"))
    assert RayNoise().filter(warning("ReadManifestImages"))


def test_ray_native_lines_stay_off_stderr_and_the_rest_passes(capfd):
    """What reaches the real stderr (fd 2) while Ray's C++ core writes to it among other lines,
    in pieces that split lines; an unknown Ray line is dropped and counted."""
    from embcam.job.console import NativeLines

    other = "[2026-12-07 23:00:17,001 E 1931 1990] raylet_client.cc:70: an error of Ray's own"
    written = [RAY_ACTOR_ARGS_NOTICE[:30], RAY_ACTOR_ARGS_NOTICE[30:] + "\nembcam explain: heat",
               "maps: 4 rows to do\n[not Ray's] a line in brackets\n", other + "\n",
               "\r- bar 1/4", "\r- bar 4/4\n", "a last line without its end", ", and its end\n"]
    with NativeLines() as native:
        for piece in written:
            os.write(2, piece.encode())
    assert capfd.readouterr().err == ("embcam explain: heatmaps: 4 rows to do\n[not Ray's] a line in brackets\n"
                                      "\r- bar 1/4\r- bar 4/4\na last line without its end, and its end\n")
    assert native.dropped == 1  # the other one: the notice is known and moot
    os.write(2, (RAY_ACTOR_ARGS_NOTICE + "\n").encode())  # the real stderr is back
    assert capfd.readouterr().err == RAY_ACTOR_ARGS_NOTICE + "\n"


def test_progress_lines_say_rows_done_of_total_and_images_per_second():
    from embcam.job.progress import Progress

    lines = []
    progress = Progress(lines.append, interval=0.0)  # a line at every batch
    with progress.step("heatmaps", 10):
        progress.add(4)
        progress.add(6)  # the last batch: the step's end line says it
    assert lines[0] == "embcam explain: heatmaps: 10 rows to do"
    assert re.fullmatch(r"embcam explain: heatmaps: 4/10 rows, \d+\.\d images/s", lines[1]), lines
    assert re.fullmatch(r"embcam explain: heatmaps: 10/10 rows in \d+\.\d s, \d+\.\d images/s", lines[2]), lines
    assert len(lines) == 3
    silent = Progress(None, interval=0.0)
    with silent.step("heatmaps", 1):
        silent.add(1)  # nothing to show it to, and no error


def _session_processes(session: int) -> list[int]:
    """Live processes of a session (the embcam process and every Ray process it started)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[3]) == session:
            found.append(int(entry))
    return found


def _run_embcam(args: list[str], home: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``embcam ARGS`` as a user runs it: stdout and stderr are pipes, Ray's defaults (token
    authentication on, bars on). Every process it leaves behind is stopped."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_AUTH_MODE", "RAY_DATA_DISABLE_PROGRESS_BARS")} | {"HOME": str(home)} | (env or {})
    process = subprocess.Popen([EMBCAM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, start_new_session=True)
    try:
        out, err = process.communicate(timeout=300)
    finally:
        deadline = time.monotonic() + 15  # Ray's processes end with their driver; wait, then stop them
        while _session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in _session_processes(process.pid):
            os.kill(pid, signal.SIGKILL)
        process.kill()
        process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.slow  # a job in a process of its own
def test_demo_is_quiet_and_finishes_on_one_cpu(tmp_path):
    """A 1-CPU machine (Ray told so through RAY_OVERRIDE_RESOURCES): the model actor once took
    its only CPU slot and the job waited forever. The console shows embcam's lines only."""
    done = _run_embcam(["demo", "--out", str(tmp_path / "demo"), "--per-class", "2"], tmp_path,
                       env={"RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 1})})
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert not [line for line in lines if "INFO" in line], done.stderr
    assert "will hang" not in done.stderr and "Token authentication" not in done.stderr
    assert not [line for line in lines if not line.startswith("embcam explain: ")], done.stderr  # Ray's C++ too
    # the progress lines, plain: no terminal here
    ends = [line for line in lines if re.fullmatch(r"embcam explain: .+: 20/20 rows in \d+\.\d s, \d+\.\d images/s",
                                                   line)]
    assert len(ends) == 2, done.stderr  # the model pass keeping the maps, then the heatmaps
    # embcam's summary, of a complete run
    assert "embcam explain: 20 rows (20 ok, 0 error, 0 degenerate)" in done.stdout, done.stdout
    summary = json.loads((tmp_path / "demo" / "run" / "summary.json").read_text())
    assert summary["counts"]["ok"] == 20 and (tmp_path / "demo" / "run" / "_SUCCESS").exists()
    # and it ends where the report is
    page = tmp_path / "demo" / "report" / "report.html"
    assert done.stdout.splitlines()[-1].startswith(f"embcam demo: 1 run -> {page}") and page.is_file()
    assert "## Table 1" in (tmp_path / "demo" / "report" / "report.md").read_text()


@pytest.mark.slow  # a job in a process of its own
def test_explain_verbose_shows_rays_lines(manifest, tmp_path, ray_session):
    """On the session's Ray (--address), as on a cluster: a Ray start is the demo test's."""
    address = ray_session.get_runtime_context().gcs_address
    done = _run_embcam(["explain", "--manifest", str(manifest), "--out", str(tmp_path / "run"),
                        "--checkpoint", str(DEMO_MODEL), "--verbose", "--address", address], tmp_path,
                       env={"RAY_AUTH_MODE": "disabled"})  # as the session's Ray was started
    assert done.returncode == 0, done.stderr
    assert "INFO worker.py" in done.stderr and f"Connecting to existing Ray cluster at address: {address}" \
        in done.stderr, done.stderr
    assert "Execution plan of Dataset" in done.stderr, done.stderr
    assert "embcam explain: 4 rows (4 ok, 0 error, 0 degenerate)" in done.stdout, done.stdout


def test_the_cluster_guides_option_list_is_the_parsers():
    """docs/cluster.md lists the job's options: exactly those the parser has."""
    import argparse

    from embcam.cli import add_explain_arguments

    text = (Path(__file__).resolve().parents[1] / "docs" / "cluster.md").read_text()
    block = text.split("The job's options:", 1)[1].split("```", 2)[1]
    listed = set(re.findall(r"--[a-z][a-z-]*", block))
    parser = argparse.ArgumentParser()
    add_explain_arguments(parser)
    options = {o for action in parser._actions for o in action.option_strings if o.startswith("--")} - {"--help"}
    assert listed == options, (sorted(options - listed), sorted(listed - options))
