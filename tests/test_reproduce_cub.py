"""bench/reproduce_cub.sh end to end on a generated tree with CUB-200-2011's exact layout
(3 training and 3 held-out classes, 4 images each), a tiny torchvision model at 64 px and
0 epochs, from an "ImageNet" state dict in torchvision's names written here: the script
must build the manifest with the paper's split, start the backbone from that file, explain,
run the Chen et al. baseline and report MaxBoxAccV2 and PxAP."""
import json
import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision

from embcam.wsol_run import evaluate_run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "reproduce_cub.sh"
CLASSES = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross", 3: "003.Sooty_Albatross",
           101: "101.White_Pelican", 102: "102.Western_Wood_Pewee", 103: "103.Sayornis"}
PER_CLASS = 4


def write_cub(root: Path) -> Path:
    """CUB_200_2011/{images,classes,image_class_labels,bounding_boxes,train_test_split}.txt,
    images/<class>/<file>.jpg and CUB_200_2011/segmentations/<class>/<file>.png: a bright
    ellipse (the bird) on a noisy background, its box and its mask."""
    cub = root / "CUB_200_2011"
    rng = np.random.default_rng(0)
    images, labels, boxes, split = [], [], [], []
    image_id = 0
    for class_id, name in CLASSES.items():
        (cub / "images" / name).mkdir(parents=True)
        (cub / "segmentations" / name).mkdir(parents=True)
        for k in range(PER_CLASS):
            image_id += 1
            width, height = int(rng.integers(70, 110)), int(rng.integers(60, 90))
            picture = rng.integers(0, 90, (height, width, 3)).astype(np.uint8)
            mask = np.zeros((height, width), np.uint8)
            cx, cy = int(rng.integers(25, width - 25)), int(rng.integers(20, height - 20))
            ax, ay = int(rng.integers(10, 20)), int(rng.integers(8, 16))
            cv2.ellipse(mask, (cx, cy), (ax, ay), 0, 0, 360, 255, -1)
            colour = (40 * (class_id % 5) + 60, 200, 255 - 30 * k)
            picture[mask > 0] = colour
            file = f"{name.split('.')[1]}_{image_id:04d}_{k}.jpg"
            cv2.imwrite(str(cub / "images" / name / file), picture)
            cv2.imwrite(str(cub / "segmentations" / name / file.replace(".jpg", ".png")), mask)
            ys, xs = np.nonzero(mask)
            images.append(f"{image_id} {name}/{file}")
            labels.append(f"{image_id} {class_id}")
            x, y, w, h = xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
            boxes.append(f"{image_id} {x}.0 {y}.0 {w}.0 {h}.0")
            split.append(f"{image_id} {k % 2}")
    for file, lines in (("images.txt", images), ("image_class_labels.txt", labels), ("bounding_boxes.txt", boxes),
                        ("train_test_split.txt", split),
                        ("classes.txt", [f"{c} {n}" for c, n in CLASSES.items()])):
        (cub / file).write_text("\n".join(lines) + "\n")
    return cub


def run_script(*args, env=None, timeout=300):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_reproduce_cub_end_to_end(tmp_path, ray_session):
    cub = write_cub(tmp_path)
    # the explain jobs join the session's Ray (RAY_ADDRESS) instead of starting one each
    address = ray_session.get_runtime_context().gcs_address
    torch.manual_seed(5)
    imagenet = tmp_path / "resnet18-imagenet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), imagenet)  # torchvision's names, fc of 1000 classes
    work = tmp_path / "work"
    done = run_script(cub, work, imagenet, env={
        "EMBCAM_CUB_MODEL": "torchvision:resnet18+linear:16", "EMBCAM_CUB_IMAGE_SIZE": "64",
        "EMBCAM_CUB_EPOCHS": "0", "EMBCAM_CUB_BATCH_CLASSES": "2", "EMBCAM_CUB_PER_CLASS": "2",
        "EMBCAM_CUB_TOP_K": "8", "EMBCAM_CUB_TRIPLETS": "4", "EMBCAM_CUB_DEVICE": "cpu", "RAY_ADDRESS": address})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"backbone initialised from {imagenet}" in done.stderr + done.stdout

    manifest = pq.read_table(work / "data" / "manifest.parquet").to_pylist()
    assert len(manifest) == 6 * PER_CLASS
    assert {r["label"]: r["split"] for r in manifest} == {
        n: "train" if c <= 100 else "eval" for c, n in CLASSES.items()}  # the paper's split, not train_test_split.txt
    assert all(r["mask_uri"] and Path(r["mask_uri"]).is_file() for r in manifest)

    # 0 epochs: the trained checkpoint's backbone is the ImageNet file's, its classifier dropped
    saved = torch.load(work / "models" / "cub.pt", weights_only=True)
    source = torch.load(imagenet, weights_only=True)
    assert saved["spec"] == "embcam_cub_init:imagenet_backbone"
    for key, value in source.items():
        if not key.startswith("fc."):
            assert torch.equal(saved["state_dict"]["backbone." + key], value), key

    report = json.loads((work / "report" / "report.json").read_text())
    table = report["table1"]
    assert [m["key"] for m in table["methods"]] == ["self", "mean", "chen"]
    for run in table["runs"]:
        assert run["counts"]["ok"] == 3 * PER_CLASS  # the held-out classes only
        assert run["model"] == "torchvision:resnet18+linear:16"
        direct = evaluate_run(run["run"])
        assert run["wsol"]["maxboxacc_v2"] == direct["maxboxacc_v2"]
        assert run["wsol"]["maxboxacc_v2"]["images"] == 3 * PER_CLASS
        assert run["wsol"]["pxap"]["value"] == direct["pxap"]["value"] is not None
        assert run["wsol"]["pxap"]["masks_unreadable"] == 0
    markdown = (work / "report" / "report.md").read_text()
    assert "MaxBoxAccV2 (BBox) / PxAP (Mask)" in markdown and "Chen et al. 2020" in markdown


@pytest.mark.slow  # a subprocess, though only bash's (it stops before any Python starts)
def test_reproduce_cub_refuses_bad_arguments(tmp_path):
    done = run_script(tmp_path / "nowhere")
    assert done.returncode == 2 and "not a CUB_200_2011 folder" in done.stderr
    cub = tmp_path / "CUB_200_2011"
    cub.mkdir()
    (cub / "images.txt").write_text("")
    done = run_script(cub, tmp_path / "work", tmp_path / "missing.pth")
    assert done.returncode == 2 and "missing.pth not found" in done.stderr
    assert run_script().returncode == 2
