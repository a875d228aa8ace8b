"""The Chen et al. baseline: "Adapting Grad-CAM for Embedding Networks" (Lei Chen, Jianhui
Chen, Hajimirsadeghi, Mori; WACV 2020, arXiv 2001.06538). No official code exists; this
follows the paper's description. No Ray here.

The method
----------
1. Training images, with triplets: for an anchor a with positive p (same label) and
   negative n (another label), Grad-CAM's channel weights are the spatial mean of a
   triplet loss's gradient with respect to the anchor's target-layer activation A_a.
   Each training image's weights are averaged over the triplets it anchors and stored
   with its embedding.
2. A test image gets no backward pass: it takes the stored weights w of its nearest
   training embedding (cosine), keeps only the k channels with the largest weights
   (k = 50 in the paper) and its heatmap is ReLU(sum_{c in top k} w_c A_c) on its own
   activations A.

Choices the paper leaves open, and ours
---------------------------------------
- Distance: squared Euclidean between L2-normalised embeddings, ||a^ - p^||^2 (the
  metric of a cosine-trained model; ``normalise`` as in ``embcam.cam``). The anchor's
  normalisation is differentiated through; the positive's and negative's embeddings are
  constants (each image's gradient is taken with respect to its own activation only).
- Loss without the hinge: L = ||a^ - p^||^2 - ||a^ - n^||^2 (+ a margin, a constant that
  changes no gradient). With the hinge max(0, L + m), every triplet the trained model
  already orders with the margin gives a zero gradient; on a trained model that is
  most random triplets (``summary.json`` ``train.hinge_zero_share`` measures it), and an
  image whose triplets are all easy would have no weights at all. Averaging the
  un-hinged gradient over the triplets is then the gradient of the averaged loss, which
  is what ``triplet_weights`` differentiates (one backward per batch of anchors).
- Sign: w = -mean_ij dL/dA_ij, the gradient of the triplet's evidence ||a^ - n^||^2 -
  ||a^ - p^||^2. As in Grad-CAM, a positive weight is a channel whose activation supports
  the decision (the anchor nearer its positive than its negative); +dL/dA would weight
  the evidence against it.
- Triplets per image: T (``--triplets-per-image``, default 32), every ok, labelled
  training image with at least one other image of its label being an anchor. Positives
  are drawn uniformly with replacement from the other training images of its label,
  negatives uniformly with replacement from the training images of every other label
  (numpy ``default_rng(seed)``); without a hinge, T costs no extra network pass.
- Nearest neighbour: largest cosine between the test image's embedding and the stored
  training embeddings of the anchors (the images that have weights); ties to the first.
- Top-k: the k largest signed weights (not the largest |w|), the others set to 0;
  k >= K keeps every channel. Nothing is min-max scaled: the raw map goes to the
  metrics, as for EmbeddingCAM (docs/design.md §7).

The run folder
--------------
``run_chen`` writes an explain-style run folder (``embcam.data.runstate``) over the rows of
the evaluation split: ``_embcam/run.json`` and the manifest copy of those rows first,
``results/part-<start>-<stop>.parquet`` (schema ``results``, ``proxy_kind`` "chen"),
``summary.json``, ``_SUCCESS`` last; the training weights and each test row's source
image under ``_embcam/chen/``. The method's only map is its top-k map: it is the row's
``heatmap`` (so accuracy, the threshold sweep, overlays and ``embcam show`` are of that
map) and also its ``heatmap_topk``; the config says ``top_k_only`` so that the report
shows it in the top-k column only. ``proxy_label`` is the label of the training image
whose weights were transferred and ``cosine`` the cosine to it; ``score`` is null (no
proxy score is differentiated for a test image).
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from .. import __version__
from ..arguments import OneLineParser, config_from, error_line
from ..cam import RESHAPES, EmbeddingCAM, normalise
from ..data.fetch import ReadLimits
from ..data.locations import default_image_root
from ..data.manifest import read_manifest
from ..data.runstate import (
    RESULTS,
    STATE,
    SUMMARY,
    ManifestCopy,
    RunFolder,
    covered,
    file_sha256,
    pending_blocks,
    piece_name,
)
from ..data.schemas import OK
from ..inference import prepare_for_inference
from ..job.lifecycle import RunLifecycle, build_summary
from ..job.model_stage import resolved_target
from ..job.progress import Progress
from ..job.stages import compute_metrics, load_images, manifest_batch, to_results
from ..models import load_model

PROXY_KIND = "chen"
CHEN = "chen"  # RUN/_embcam/chen/: the training weights, and the transfer of each test row ...
TRAIN_WEIGHTS, TRAIN_STATS = "train_weights.parquet", "train.json"
TRANSFER = "transfer"  # ... in pieces named as the results pieces
HINGE_MARGINS = (0.0, 0.2)  # margins at which summary.json reports the share of zero-gradient triplets


# --- the method ---------------------------------------------------------------------------


def sample_triplets(labels, per_image: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(anchors (A,), positives (A, T), negatives (A, T)): indices into ``labels``.

    Every image whose label has another image, when some other label exists, anchors
    ``per_image`` triplets: positives uniform with replacement over the other images of
    its label, negatives uniform with replacement over the images of all other labels."""
    if per_image < 1:
        raise ValueError(f"triplets per image must be >= 1, got {per_image}")
    labels = np.asarray(labels, dtype=object)
    rng = np.random.default_rng(seed)
    anchors, positives, negatives = [], [], []
    if len(set(labels.tolist())) < 2:
        return np.zeros(0, np.int64), np.zeros((0, per_image), np.int64), np.zeros((0, per_image), np.int64)
    for label in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue
        others = np.flatnonzero(labels != label)
        # the r-th other member of the label, counting on from the anchor: never the anchor itself
        steps = rng.integers(0, len(members) - 1, (len(members), per_image)) + 1
        positives.append(members[(np.arange(len(members))[:, None] + steps) % len(members)])
        negatives.append(others[rng.integers(0, len(others), (len(members), per_image))])
        anchors.append(members)
    if not anchors:
        return np.zeros(0, np.int64), np.zeros((0, per_image), np.int64), np.zeros((0, per_image), np.int64)
    order = np.argsort(np.concatenate(anchors), kind="stable")
    return (np.concatenate(anchors)[order], np.concatenate(positives)[order],
            np.concatenate(negatives)[order])


def triplet_weights(cam: EmbeddingCAM, images: Tensor, positives: Tensor, negatives: Tensor
                    ) -> tuple[Tensor, Tensor]:
    """(y (B, d), w (B, K)) for anchors ``images`` (B, 3, H, W) with the embeddings of their
    ``positives`` and ``negatives`` (B, T, d):

        L_b = mean_t ||a^_b - p^_bt||^2 - ||a^_b - n^_bt||^2,   w_b = -mean_ij dL_b/dA_b,ij

    (x^ = x / ||x||). One backward for the batch: anchors do not interact in an eval model."""
    size = images.shape[-2:]
    with cam.target_graph(images) as (activation, y):
        a = normalise(y)[:, None, :]
        p, n = normalise(positives.to(y)), normalise(negatives.to(y))
        loss = ((a - p).pow(2).sum(-1) - (a - n).pow(2).sum(-1)).mean(1)
        (grad,) = torch.autograd.grad(loss.sum(), activation)
    return y.detach(), -cam.as_map(grad, size).mean((-2, -1))


def top_k_weights(weights: Tensor, k: int) -> Tensor:
    """``weights`` (B, K) with all but the k largest of each row set to 0 (k >= K: unchanged)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k >= weights.shape[-1]:
        return weights
    keep = weights.topk(k, dim=-1).indices
    return torch.zeros_like(weights).scatter_(-1, keep, weights.gather(-1, keep))


def nearest(embeddings: Tensor, bank: Tensor) -> tuple[Tensor, Tensor]:
    """(index (B,), cosine (B,)) of the row of ``bank`` (N, d) nearest each embedding (B, d)
    by cosine; ties to the first row."""
    similarity = normalise(embeddings) @ normalise(bank.to(embeddings)).T
    cosine, index = similarity.max(dim=1)  # max returns the first maximal index
    return index, cosine


def transferred_heatmaps(activation: Tensor, weights: Tensor, k: int) -> Tensor:
    """ReLU(sum_{c in top k} w_c A_c): (B, h, w) from activations (B, K, h, w) and weights (B, K)."""
    w = top_k_weights(weights.to(torch.promote_types(activation.dtype, torch.float32)), k)
    return torch.relu(torch.einsum("bk,bkhw->bhw", w, activation.to(w.dtype)))


@dataclass
class TransferBank:
    """The training images that have weights: their ids, labels, embeddings y (N, d) and
    channel weights w (N, K)."""

    image_ids: np.ndarray
    labels: np.ndarray
    embeddings: Tensor
    weights: Tensor


def explain(cam: EmbeddingCAM, images: Tensor, bank: TransferBank, k: int
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, heatmaps, nearest training index, its cosine) of test ``images``: one forward, no backward."""
    with torch.inference_mode():
        act, y = cam.activations(images)
        index, cosine = nearest(y, bank.embeddings.to(y.device))
        heat = transferred_heatmaps(act, bank.weights.to(y.device)[index], k)
    return y.clone(), heat.clone(), index.clone(), cosine.clone()


# --- the command ---------------------------------------------------------------------------


@dataclass
class ChenConfig:
    manifest: str
    out: str
    checkpoint: str | None = None
    model: str | None = None
    train_split: str = "train"
    eval_split: str = "eval"
    top_k_channels: int = 50
    triplets_per_image: int = 32
    seed: int = 0
    image_root: str | None = None
    image_size: int | None = None
    batch_size: int = 32
    target_layer: str | None = None
    reshape: str | None = None
    overwrite: bool = False

    def check(self) -> None:
        for name in ("top_k_channels", "triplets_per_image", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.reshape is not None and self.reshape not in RESHAPES:
            raise ValueError(f"--reshape must be one of {RESHAPES}, got {self.reshape!r}")
        if self.train_split == self.eval_split:
            raise ValueError(f"--train-split and --eval-split are both {self.train_split!r}: the weights must come "
                             "from other images than those explained")

    def as_run_config(self, spec: str) -> dict:
        """What summary.json and run.json say: the options, plus what ``embcam report`` reads."""
        return {**asdict(self), "proxy": PROXY_KIND, "spec": spec, "top_k_only": True,
                "strategy": "chen-weight-transfer"}


class _Images:
    """Decoded, preprocessed model inputs of manifest rows (``embcam.job.stages.load_images``:
    a row that cannot be read becomes an error row with its reason)."""

    def __init__(self, preprocess, image_root: str, device: torch.device, limits: ReadLimits = ReadLimits()):
        self.preprocess, self.image_root, self.device, self.limits = preprocess, image_root, device, limits

    def load(self, batch: dict) -> tuple[dict, np.ndarray, Tensor]:
        """(the batch after decoding, its ok rows, their model input)."""
        loaded = load_images(batch, self.image_root, self.preprocess.size, self.limits)
        ok = np.flatnonzero(loaded["status"] == OK)
        pixels = torch.from_numpy(np.ascontiguousarray(loaded["image"][ok])).to(self.device)
        return loaded, ok, self.preprocess(pixels)


def _columns(table: pa.Table, names) -> dict:
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in names if name in table.column_names}


def _rows_of_split(table: pa.Table, split: str, manifest: str, role: str) -> pa.Table:
    rows = table.filter(pc.equal(table.column("split"), split).fill_null(False))
    if rows.num_rows == 0:
        found = sorted(set(table.column("split").drop_null().to_pylist()))
        raise ValueError(f"manifest {manifest}: no rows with split == {split!r} (splits found: {found}); "
                         f"Chen et al.'s {role}")
    return rows


def training_bank(cam: EmbeddingCAM, train: pa.Table, images: _Images, cfg: ChenConfig,
                  progress: Progress) -> tuple[TransferBank, dict]:
    """The training images' weights: embeddings of every training row (pass 1), then the
    triplet weights of every anchor (pass 2). Returns the bank and what the summary says of it."""
    labelled = train.filter(pc.is_valid(train.column("label")))
    cols = _columns(labelled, ("image_id", "uri"))
    labels = np.array([str(v) for v in labelled.column("label").to_pylist()], dtype=object)
    n = labelled.num_rows
    embeddings = torch.zeros(0)
    has = np.zeros(n, bool)
    errors = []
    with progress.step("training images, embeddings", n):
        for start in range(0, n, cfg.batch_size):
            stop = min(n, start + cfg.batch_size)
            loaded, ok, x = images.load({k: v[start:stop] for k, v in cols.items()})
            errors += [str(e) for e in loaded["error"][loaded["status"] != OK]]
            if len(ok):
                with torch.inference_mode():
                    y = cam.model(x).float().cpu()
                if embeddings.numel() == 0:
                    embeddings = torch.zeros(n, y.shape[1])
                norms = y.norm(dim=1)
                keep = torch.isfinite(norms) & (norms > 0)
                embeddings[start + ok[keep.numpy()]] = y[keep]
                has[start + ok[keep.numpy()]] = True
            progress.add(stop - start)
    usable = np.flatnonzero(has)
    anchors, positives, negatives = sample_triplets(labels[usable], cfg.triplets_per_image, cfg.seed)
    if not len(anchors):
        raise ValueError(f"manifest {cfg.manifest}: split {cfg.train_split!r} gives no training triplet: "
                         f"{len(usable)} of its {train.num_rows} rows are labelled and readable, in "
                         f"{len(set(labels[usable].tolist()))} label(s); a triplet needs a label with 2 such images "
                         "and a second label" + (f" (first unreadable row: {errors[0][:200]})" if errors else ""))
    anchors, positives, negatives = usable[anchors], usable[positives], usable[negatives]
    weights = torch.zeros(0)
    done = np.zeros(len(anchors), bool)
    with progress.step(f"training images, weights from {cfg.triplets_per_image} triplets each", len(anchors)):
        for start in range(0, len(anchors), cfg.batch_size):
            rows = anchors[start:start + cfg.batch_size]
            _, ok, x = images.load({k: v[rows] for k, v in cols.items()})  # read again: same bytes, same rows ok
            if len(ok):
                at = start + ok
                y, w = triplet_weights(cam, x, embeddings[positives[at]].to(x.device),
                                       embeddings[negatives[at]].to(x.device))
                if weights.numel() == 0:
                    weights = torch.zeros(len(anchors), w.shape[1])
                weights[at] = w.float().cpu()
                done[at] = True
            progress.add(len(rows))
    kept = anchors[done]
    a, p, n_ = (normalise(embeddings[i]) for i in (anchors, positives, negatives))
    gap = (a[:, None] - p).pow(2).sum(-1) - (a[:, None] - n_).pow(2).sum(-1)  # the un-hinged loss without margin
    stats = {"rows": train.num_rows, "labelled": n, "readable": int(len(usable)),
             "unreadable": len(errors), "first_error": errors[0][:300] if errors else None,
             "labels": len(set(labels[usable].tolist())), "anchors": int(done.sum()),
             "triplets": int(done.sum()) * cfg.triplets_per_image,
             "hinge_zero_share": {f"{m:g}": float((gap + m <= 0).float().mean()) for m in HINGE_MARGINS}}
    bank = TransferBank(cols["image_id"][kept], labels[kept], embeddings[kept], weights[done])
    return bank, stats


def _bank_table(bank: TransferBank) -> pa.Table:
    def lists(t: Tensor) -> pa.Array:
        values = t.float().numpy()
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    return pa.table({"image_id": pa.array([str(v) for v in bank.image_ids], pa.string()),
                     "label": pa.array([str(v) for v in bank.labels], pa.string()),
                     "embedding": lists(bank.embeddings), "weights": lists(bank.weights)})


def explain_rows(cam: EmbeddingCAM, batch: dict, images: _Images, bank: TransferBank, k: int,
                 ) -> tuple[dict, list[str | None]]:
    """A batch of test rows as ``compute_metrics`` takes it, and the image each row's weights came from."""
    out, ok, x = images.load(batch)
    n = len(out["status"])
    source: list[str | None] = [None] * n
    out["proxy_kind"] = np.array([PROXY_KIND] * n, dtype=object)
    out["proxy_label"] = np.array([None] * n, dtype=object)
    out["score"] = np.full(n, np.nan, np.float32)
    out["cosine"] = np.zeros(n, np.float32)
    if len(ok):
        y, heat, index, cosine = explain(cam, x, bank, k)
        index = index.cpu().numpy()
        out["embedding"] = np.zeros((n, y.shape[1]), np.float32)
        out["heatmap"] = np.zeros((n,) + tuple(heat.shape[1:]), np.float32)
        out["embedding"][ok] = y.float().cpu().numpy()
        out["heatmap"][ok] = heat.float().cpu().numpy()
        out["cosine"][ok] = cosine.float().cpu().numpy()
        out["proxy_label"][ok] = bank.labels[index]
        for i, j in zip(ok, index):
            source[i] = str(bank.image_ids[j])
        out["heatmap_topk"] = out["heatmap"]  # the method's only map (see the module docstring)
    return out, source


def run_chen(cfg: ChenConfig, progress: bool = True) -> dict:
    """Compute the baseline over ``cfg.manifest`` and write the run folder ``cfg.out``;
    returns the summary (also in ``cfg.out/summary.json``). A re-run of the same command
    resumes: the training weights once written, and the test pieces already committed,
    are kept."""
    started = time.time()
    cfg.check()
    table = read_manifest(cfg.manifest)
    train = _rows_of_split(table, cfg.train_split, cfg.manifest, "weights come from training triplets")
    test = _rows_of_split(table, cfg.eval_split, cfg.manifest, "baseline explains these rows")
    if train.column("label").null_count == train.num_rows:
        raise ValueError(f"manifest {cfg.manifest}: column 'label' is null in every row of split "
                         f"{cfg.train_split!r}; training triplets need labels")
    net, preprocessing, spec = load_model(cfg.model, cfg.checkpoint, cfg.image_size)
    config = cfg.as_run_config(spec)
    identity = {"manifest": {"path": cfg.manifest, "rows": test.num_rows, "split": cfg.eval_split,
                             "train_split": cfg.train_split, "train_rows": train.num_rows},
                "model": {"spec": spec, "checkpoint_sha256": file_sha256(cfg.checkpoint)},
                "proxy": PROXY_KIND, "top_k_channels": cfg.top_k_channels, "target_layer": cfg.target_layer,
                "reshape": cfg.reshape, "image_size": preprocessing.size,
                "triplets_per_image": cfg.triplets_per_image, "seed": cfg.seed, "embcam": __version__}
    with RunLifecycle(cfg.out, identity, cfg.overwrite) as life:
        run = life.run
        if life.state == "complete":
            return dict(run.read_json(SUMMARY), already_complete=True)
        life.prepare()
        if life.state == "fresh":
            writer = ManifestCopy(run, cfg.batch_size)
            writer.write(test)
            writer.close()
        saved = life.record({"config": config, "plan": "chen-weight-transfer", "rows": test.num_rows,
                             "block_rows": cfg.batch_size})
        copy = ManifestCopy(run, saved["block_rows"])
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = prepare_for_inference(net, resolved_target(net, cfg.target_layer)).to(device)
        cam = EmbeddingCAM(model, cfg.target_layer, "autograd", reshape=cfg.reshape)
        images = _Images(preprocessing, cfg.image_root or default_image_root(cfg.manifest), device)
        shown = Progress((lambda line: print(line, file=sys.stderr, flush=True)) if progress else None,
                         prefix="embcam chen-baseline")
        if run.exists(STATE, CHEN, TRAIN_WEIGHTS):
            bank, train_stats = _read_bank(run), run.read_json(STATE, CHEN, TRAIN_STATS)
        else:
            bank, train_stats = training_bank(cam, train, images, cfg, shown)
            train_stats["seconds"] = round(time.time() - started, 3)
            run.write_json(train_stats, STATE, CHEN, TRAIN_STATS)
            run.write_table(_bank_table(bank), STATE, CHEN, TRAIN_WEIGHTS)  # the marker that they are done

        resumed = covered(run.pieces(RESULTS), test.num_rows)
        todo = pending_blocks(run.pieces(RESULTS), test.num_rows, saved["block_rows"])
        test_started = time.time()
        with shown.step(f"test images ({cfg.eval_split}), transferred weights, top-{cfg.top_k_channels}",
                        test.num_rows - resumed):
            for start, stop in todo:
                out, source = explain_rows(cam, manifest_batch(copy.read(start, stop)), images, bank,
                                           cfg.top_k_channels)
                run.write_table(pa.table({"image_id": pa.array([str(i) for i in out["image_id"]], pa.string()),
                                          "source_image_id": pa.array(source, pa.string())}),
                                STATE, CHEN, TRANSFER, piece_name(start, stop))
                run.write_table(to_results(compute_metrics(out)), RESULTS, piece_name(start, stop))
                shown.add(stop - start)
        return life.finish(build_summary(
            run, test.num_rows, time.time() - started, resumed, config=config, model=spec,
            plan="chen-weight-transfer", identity=identity, run_id=saved["run_id"], train=train_stats,
            test_seconds=round(time.time() - test_started, 3)))


def _read_bank(run: RunFolder) -> TransferBank:
    table = pq.read_table(run.join(STATE, CHEN, TRAIN_WEIGHTS), filesystem=run.fs)

    def tensor(column: str) -> Tensor:
        return torch.from_numpy(np.stack(table.column(column).to_numpy(zero_copy_only=False)).astype(np.float32))

    return TransferBank(np.array(table.column("image_id").to_pylist(), dtype=object),
                        np.array(table.column("label").to_pylist(), dtype=object),
                        tensor("embedding"), tensor("weights"))


def format_summary(summary: dict) -> str:
    c, m, t = summary["counts"], summary["metrics"], summary["train"]

    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    k = summary["config"]["top_k_channels"]
    return "\n".join([
        f"embcam chen-baseline: {c['results']} rows ({c['ok']} ok, {c['error']} error, {c['degenerate']} degenerate) "
        f"in {summary['wall_seconds']:.1f} s [{summary['model']}]; weights of {t['anchors']} training images "
        f"from {t['triplets']} triplets",
        f"  top-{k} map: ratio (box) {f(m['ratio_bbox'])} (uniform {f(m['uniform_bbox'])}), ratio (mask) "
        f"{f(m['ratio_mask'])} (uniform {f(m['uniform_mask'])}), loc. acc. @0.2 {f(m['loc_correct'])}",
        f"results: {summary['config']['out']}/results/"])


def build_parser() -> OneLineParser:
    """``embcam chen-baseline``'s options, one per ChenConfig field (and --no-progress)."""
    parser = OneLineParser(
        prog="embcam chen-baseline",
        description="The Chen et al. (WACV 2020) baseline: Grad-CAM channel weights from triplets of the "
                    "training split, transferred to each evaluation image from its nearest training "
                    "embedding; top-k channels. Writes a run folder for embcam report and embcam show.")
    parser.add_argument("--manifest", required=True, help="Parquet manifest with both splits (labels for training)")
    parser.add_argument("--out", required=True, help="run folder to write")
    parser.add_argument("--checkpoint", help="weights (an embcam checkpoint carries its spec)")
    parser.add_argument("--model", help="model spec (default: the checkpoint's)")
    parser.add_argument("--train-split", default="train", help="split whose triplets give the weights (default train)")
    parser.add_argument("--eval-split", default="eval", help="split to explain (default eval)")
    parser.add_argument("--top-k-channels", type=int, default=50, metavar="K",
                        help="channels kept: the K largest transferred weights (default 50, the paper's)")
    parser.add_argument("--triplets-per-image", type=int, default=32, metavar="T",
                        help="triplets each training image anchors (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the triplet sampling (default 0)")
    parser.add_argument("--image-root", help="folder or URI prefix for relative uris (default: the manifest's folder)")
    parser.add_argument("--image-size", type=int, help="model input size (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    parser.add_argument("--target-layer", help="dotted module name to explain (default: the model's)")
    parser.add_argument("--reshape", choices=list(RESHAPES), help="how the target output becomes (K, h, w)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``embcam chen-baseline --manifest M --checkpoint CKPT --out RUN [options]``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from(ChenConfig, args)
    try:
        summary = run_chen(cfg, progress=not args.no_progress)
    except (ValueError, OSError) as e:
        parser.exit(2, f"embcam chen-baseline: error: {error_line(e)}\n")
    print(format_summary(summary))
    return 0
