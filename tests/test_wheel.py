"""The wheel carries what the package reads at run time: the data contracts, the demo
model and the typing marker; the package works from it outside the repository.
(.ci/wheel_check.sh also installs it into a fresh venv and runs a job with it.)"""
import filecmp
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import embcam
from embcam.data.schemas import arrow_schema

pytestmark = pytest.mark.slow  # builds the wheel in a subprocess
REPO = Path(__file__).resolve().parents[1]
CONTRACTS = ("manifest.json", "maps.json", "pairs.json", "proxies.json", "results.json")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel, built offline (this venv's setuptools) from a copy of the tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "embcam", src / "embcam", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True, text=True)
    [path] = (tmp / "dist").glob("embcam-*.whl")
    return path


def test_schemas_folder_is_the_packaged_contracts():
    """One copy of each contract: the top-level schemas/ is a link into the package."""
    assert (REPO / "schemas").is_symlink()
    assert (REPO / "schemas").resolve() == (REPO / "embcam" / "contracts").resolve()
    assert sorted(p.name for p in (REPO / "embcam" / "contracts").iterdir()) == list(CONTRACTS)


def test_wheel_version_is_embcams(wheel):
    """pyproject's dynamic version: the wheel is named and labelled with embcam.__version__."""
    assert wheel.name.startswith(f"embcam-{embcam.__version__}-")
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(f"embcam-{embcam.__version__}.dist-info/METADATA").decode()
    assert f"\nVersion: {embcam.__version__}\n" in metadata


def test_wheel_holds_the_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"embcam/contracts/{c}" for c in CONTRACTS} | {
        "embcam/py.typed", "embcam/assets/demo_model.pt"} | {
        f"embcam/{package}/__init__.py" for package in ("data", "datasets", "evaluation", "job", "pairs", "report")}
    assert expected <= names
    assert not any(n.startswith(("tests/", "schemas/", "bench/")) for n in names)


def test_package_from_the_wheel_works_outside_the_repository(wheel, tmp_path):
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    for name in CONTRACTS:
        built, source = unpacked / "embcam" / "contracts" / name, REPO / "embcam" / "contracts" / name
        assert filecmp.cmp(built, source, shallow=False)
    code = ("import sys, embcam, embcam.datasets\n"
            "from embcam.cli import DEMO_MODEL\n"
            "from embcam.data.schemas import arrow_schema, schemas_dir\n"
            "assert embcam.__file__.startswith(sys.argv[1]), embcam.__file__\n"
            "assert str(schemas_dir()).startswith(sys.argv[1]) and DEMO_MODEL.is_file()\n"
            "print(*(len(arrow_schema(n)) for n in ('manifest', 'results', 'proxies')))")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(unpacked)}
    done = subprocess.run([sys.executable, "-c", code, str(unpacked)], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(arrow_schema(n))) for n in ("manifest", "results", "proxies")]
