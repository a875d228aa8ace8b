"""Vision transformers through the explain job, by spec: the job's heatmaps equal a
hand-written Grad-CAM on the same model (random weights, seeded as every worker seeds
them), computed here without EmbeddingCAM."""
import numpy as np
import pandas as pd
import pytest
import torch

from embcam.data.images import decode_image, resize_square
from embcam.datasets import generate_dataset
from embcam.job.pipeline import ExplainConfig, run_explain
from embcam.models import load_model

from test_cam_models import reference


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, generate_dataset(root, num_classes=2, images_per_class=3, min_side=64, max_side=96, seed=5)


def explained_by_hand(root, manifest, spec, size, target, to_map):
    """(image_ids, embeddings, heatmaps) for the self proxy, by hand."""
    table = pd.read_parquet(manifest).sort_values("image_id")
    model, prep, _ = load_model(spec, image_size=size)
    images = np.stack([resize_square(decode_image((root / u).read_bytes()), size) for u in table.uri])
    y, heat = reference(model, model.get_submodule(target), prep(torch.from_numpy(images)), "self", to_map)
    return list(table.image_id), y.numpy(), heat.detach().numpy()


def job(root, manifest, out, **kw):
    """The job's results; every JPEG decoded at full size, as the reference decodes them (at
    32 px the job would decode these 64-96 px images at 1/2 scale: images.decode_resized)."""
    summary = run_explain(ExplainConfig(manifest=str(manifest), out=str(out), batch_size=4, full_decode=True, **kw),
                          progress=False)
    df = pd.read_parquet(out / "results").sort_values("image_id")
    assert summary["counts"]["ok"] == len(df) == 6
    heat = np.stack(df.heatmap).reshape(len(df), int(df.heatmap_height.iloc[0]), int(df.heatmap_width.iloc[0]))
    return list(df.image_id), np.stack(df.embedding), heat


def assert_same(got, want):
    assert got[0] == want[0]
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5 * np.abs(want[1]).max())
    assert (want[2].max((1, 2)) > 0).all()  # not a comparison of empty maps
    np.testing.assert_allclose(got[2], want[2], rtol=1e-4, atol=1e-4 * want[2].max())


def test_vit_b_16_by_spec_with_its_defaults(ray_session, dataset, tmp_path):
    """torchvision:vit_b_16 at 32 px: target encoder_layer_11.ln_1 and the token reshape
    come from the registry (a class token, then a 2 x 2 patch grid)."""
    root, manifest = dataset
    spec = "torchvision:vit_b_16+linear:16"
    got = job(root, manifest, tmp_path, model=spec, image_size=32)

    def tokens(t):
        return t[:, 1:].reshape(len(t), 2, 2, t.shape[-1]).permute(0, 3, 1, 2)
    assert_same(got, explained_by_hand(root, manifest, spec, 32, "encoder.layers.encoder_layer_11.ln_1", tokens))


def test_swin_t_by_spec_at_an_nhwc_layer(ray_session, dataset, tmp_path):
    """torchvision:swin_t at 64 px, explained at its final LayerNorm (NHWC, 2 x 2) with
    --reshape nhwc: the tail is permute, average pool, Linear (the closed form)."""
    root, manifest = dataset
    spec = "torchvision:swin_t+linear:16"
    got = job(root, manifest, tmp_path, model=spec, image_size=64, target_layer="backbone.norm", reshape="nhwc")
    assert got[2].shape[1:] == (2, 2)
    assert_same(got, explained_by_hand(root, manifest, spec, 64, "backbone.norm", lambda t: t.permute(0, 3, 1, 2)))
