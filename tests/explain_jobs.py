"""Helpers for the tests that run explain jobs in processes of their own (test_resume,
test_multinode): stop every process of a job by the marker in its environment, and the
Python API's numbers that a mean-proxy run must give, however it was interrupted."""
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from embcam import EmbeddingCAM, load_model
from embcam.job.stages import load_images, manifest_batch


def _environ_has(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def kill_all(marker: str) -> None:
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        if pid != os.getpid() and _environ_has(pid, f"EMBCAM_TEST_JOB={marker}".encode()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def api_explained(dataset, df: pd.DataFrame, proxies: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and flat heatmaps of ``df``'s rows by the Python API (no Ray): the job's
    own decode, the checkpoint's model, EmbeddingCAM against each row's class proxy."""
    manifest, checkpoint, _ = dataset
    model, prep, _ = load_model(checkpoint=checkpoint)
    rows = manifest_batch(pq.read_table(manifest))
    images = load_images(rows, str(manifest.parent), prep.size)["image"]
    position = {image_id: i for i, image_id in enumerate(rows["image_id"])}
    x = prep(torch.from_numpy(images[[position[i] for i in df.image_id]]))
    p = torch.from_numpy(np.stack([proxies[label] for label in df.label]).astype(np.float32))
    out = EmbeddingCAM(model, strategy="autograd")(x, p)
    return out.embeddings.numpy(), out.heatmaps.flatten(1).numpy()


def assert_as_the_python_api(dataset, df: pd.DataFrame, out: Path) -> None:
    """A mean-proxy run's results (every row) are the Python API's: embeddings, heatmaps
    against the run's proxies, and the proxies themselves, normalise(mean of the normalised
    embeddings) of every image of the class."""
    proxies = pd.read_parquet(out / "proxies.parquet").set_index("label")
    embeddings, heatmaps = api_explained(dataset, df, proxies.proxy)
    np.testing.assert_allclose(np.stack(df.embedding), embeddings, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack(df.heatmap), heatmaps, rtol=1e-4, atol=1e-6 * heatmaps.max())
    y = embeddings.astype(np.float64) / np.linalg.norm(embeddings, axis=1, keepdims=True)
    for label in proxies.index:
        mean = y[(df.label == label).to_numpy()].mean(0)
        np.testing.assert_allclose(proxies.proxy[label], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
    assert proxies["count"].sum() == len(df) == dataset[2]
