"""The model stage under failures: a batch that raises is split until the failing rows are
alone, and only they become error rows (no Ray: the stage is called directly)."""
import numpy as np
import torch

from embcam import EmbeddingCAM, load_model, save_checkpoint
from embcam.models import Preprocessing, build_model
from embcam.stages import ExplainModel, ModelConfig


def _batch(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return {"image_id": np.array([f"i{k}" for k in range(n)], dtype=object),
            "row": np.arange(100, 100 + n), "label": np.array(["a", "b"] * (n // 2), dtype=object),
            "status": np.array(["ok"] * n, dtype=object), "error": np.array([None] * n, dtype=object),
            "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)}


def test_a_batch_that_raises_is_split_and_only_the_bad_row_fails(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", build_model("embcam:small-resnet+linear:8"), "embcam:small-resnet+linear:8",
                    Preprocessing(32))
    stage = ExplainModel(ModelConfig(checkpoint=str(tmp_path / "m.pt")), "self")
    batch = _batch(8, 32)
    poison = batch["image"][5].copy()
    real = stage.cam.__call__

    def cam(x, proxies):  # out of memory on any call that holds image 5 with others; image 5 alone fails too
        holds = any(torch.equal(stage.preprocess(torch.from_numpy(poison[None]))[0], xi) for xi in x)
        if holds:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")
        return real(x, proxies)

    stage.cam = cam
    out = stage(batch)
    assert list(out["status"]) == ["ok"] * 5 + ["error"] + ["ok"] * 2
    assert out["error"][5] == "model: RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB"
    model, prep, _ = load_model(checkpoint=str(tmp_path / "m.pt"))
    ref = EmbeddingCAM(model, strategy="autograd")(prep(torch.from_numpy(batch["image"])), "self")
    good = [0, 1, 2, 3, 4, 6, 7]
    np.testing.assert_allclose(out["heatmap"][good], ref.heatmaps[good].numpy(), rtol=1e-4,
                               atol=1e-6 * float(ref.heatmaps.max()))


def test_partials_fail_rows_without_a_direction_and_cover_every_run(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", build_model("embcam:small-resnet+linear:8"), "embcam:small-resnet+linear:8",
                    Preprocessing(32))
    stage = ExplainModel(ModelConfig(checkpoint=str(tmp_path / "m.pt")), "mean", output="partials")
    batch = _batch(6, 32)
    batch["row"] = np.array([7, 8, 9, 20, 21, 30])  # three runs of consecutive rows
    batch["status"][4] = "error"
    out = stage(batch)
    runs = sorted(set(zip(out["start"].tolist(), out["stop"].tolist())))
    assert runs == [(7, 10), (20, 22), (30, 31)]
    counts = {(s, e, lab): c for s, e, lab, c in zip(out["start"], out["stop"], out["label"], out["count"])}
    assert counts[(7, 10, "a")] == 2 and counts[(7, 10, "b")] == 1
    assert counts[(20, 22, "b")] == 1  # row 21 (label a) had failed before the model
    model, prep, _ = load_model(checkpoint=str(tmp_path / "m.pt"))
    with torch.no_grad():
        y = model(prep(torch.from_numpy(batch["image"]))).double().numpy()
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    total = {(s, e, lab): v for s, e, lab, v in zip(out["start"], out["stop"], out["label"], out["sum"])}
    np.testing.assert_allclose(total[(7, 10, "a")], y[0] + y[2], rtol=1e-5, atol=1e-6)
