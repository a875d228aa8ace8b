"""Train a reference embedding network with the Proxy-Anchor loss.

The recipe follows Kim et al., "Proxy Anchor Loss for Deep Metric Learning" (CVPR
2020): one learned proxy per training class, alpha = 32, margin delta = 0.1, the
proxies learned at a higher rate than the network, AdamW. Batches are class
balanced (``batch_classes`` classes x ``per_class`` images). Augmentation is a mild
random resized crop of the *whole* image (area 0.6-1.0, aspect 3/4-4/3) and a
horizontal flip; never a crop to the ground-truth box, which would teach the network
where the object is and make the localisation metrics trivial. The crop is resized
to S x S without keeping the aspect ratio, exactly as images are resized at explain
time (:class:`embcam.models.Preprocessing`).

The network trains on the manifest rows with ``split == "train"`` and is evaluated
by Recall@1 on the held-out ``split == "eval"`` classes (open set, as in deep metric
learning on CUB), before training and after. Images are read into memory once.
Runs are reproducible on CPU for a given seed: the seed drives the initialisation
(torch), and the batch order and augmentation (one numpy generator).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .architectures import resolve
from .arguments import OneLineParser
from .data.fetch import read_bytes
from .data.images import ImageDecodeError, decode_image, resize_square
from .data.locations import CredentialsInUri, default_image_root, redact, resolve_manifest_uri
from .data.manifest import read_manifest
from .models import Preprocessing, build_model, save_checkpoint

DEFAULT_MODEL = "embcam:small-resnet+linear:128"
SMALL_MODEL_IMAGE_SIZE = 128
CROP_SCALE = (0.6, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


# ---------------------------------------------------------------- loss and metric


def proxy_anchor_loss(embeddings: Tensor, labels: Tensor, proxies: Tensor,
                      alpha: float = 32.0, margin: float = 0.1) -> Tensor:
    """Proxy-Anchor loss (Kim et al. 2020).

    ``embeddings`` (B, d), integer ``labels`` (B,) in [0, C), ``proxies`` (C, d). With
    s(x, p) the cosine similarity, P+ the proxies that have a positive in the batch
    and X_p+ / X_p- the batch embeddings of / not of p's class::

        l = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x,p) - margin)))
          + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x,p) + margin)))
    """
    if embeddings.dim() != 2 or proxies.dim() != 2 or embeddings.shape[1] != proxies.shape[1]:
        raise ValueError(f"need embeddings (B, d) and proxies (C, d); got {tuple(embeddings.shape)} "
                         f"and {tuple(proxies.shape)}")
    cos = F.normalize(embeddings, dim=1) @ F.normalize(proxies, dim=1).T  # (B, C)
    positive = F.one_hot(labels, proxies.shape[0]).bool()
    zero = torch.zeros((), dtype=cos.dtype, device=cos.device)
    # log(1 + sum exp(z)) = softplus(logsumexp(z)); masked terms contribute exp(-inf) = 0.
    pos_logits = torch.where(positive, -alpha * (cos - margin), -math.inf)
    neg_logits = torch.where(positive, -math.inf, alpha * (cos + margin))
    pos_terms = F.softplus(torch.logsumexp(pos_logits, dim=0))  # (C,), 0 where no positive
    neg_terms = F.softplus(torch.logsumexp(neg_logits, dim=0))
    with_positive = positive.any(dim=0)
    pos_loss = torch.where(with_positive, pos_terms, zero).sum() / with_positive.sum()
    return pos_loss + neg_terms.sum() / proxies.shape[0]


class ProxyAnchorLoss(nn.Module):
    """Proxy-Anchor loss with ``num_classes`` learned proxies of size ``dim``."""

    def __init__(self, num_classes: int, dim: int, alpha: float = 32.0, margin: float = 0.1):
        super().__init__()
        self.proxies = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")  # as in the official code
        self.alpha, self.margin = alpha, margin

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return proxy_anchor_loss(embeddings, labels, self.proxies, self.alpha, self.margin)


def recall_at_1(embeddings, labels: Sequence) -> float:
    """Recall@1: the fraction of images whose nearest other image (cosine similarity,
    the query itself excluded) has the same label. Ties go to the lower index."""
    if isinstance(embeddings, Tensor):
        embeddings = embeddings.detach().cpu()
    y = torch.as_tensor(np.asarray(embeddings), dtype=torch.float64)
    labels = np.asarray(labels)
    if y.dim() != 2 or y.shape[0] != len(labels):
        raise ValueError(f"need (N, d) embeddings and N labels; got {tuple(y.shape)} and {len(labels)} labels")
    if y.shape[0] < 2:
        raise ValueError(f"Recall@1 needs at least 2 images, got {y.shape[0]}")
    y = F.normalize(y, dim=1)
    similarity = y @ y.T
    similarity.fill_diagonal_(-math.inf)
    nearest = similarity.argmax(dim=1).numpy()
    return float(np.mean(labels[nearest] == labels))


# ---------------------------------------------------------------- images


def load_split(manifest: str | Path, split: str, image_root: str | Path | None = None
               ) -> tuple[list[np.ndarray], list[str]]:
    """RGB uint8 images and labels of the rows with ``split == split``, in manifest
    order. Relative uris are resolved against ``image_root`` (default: the manifest's
    folder). Raises ValueError naming the column/row when labels or splits are missing."""
    table = read_manifest(str(manifest))
    root = str(image_root) if image_root is not None else default_image_root(str(manifest))
    columns = {name: table.column(name).to_pylist() for name in ("image_id", "uri", "label", "split")}
    if all(value is None for value in columns["split"]):
        raise ValueError(f"manifest {manifest}: column 'split' is missing or all null; training needs "
                         f"'train' rows and held-out 'eval' rows")
    rows = [r for r, value in enumerate(columns["split"]) if value == split]
    if not rows:
        found = sorted({value for value in columns["split"] if value is not None})
        raise ValueError(f"manifest {manifest}: no rows with split == {split!r} (splits found: {found})")
    images, labels = [], []
    for r in rows:
        image_id, uri, label = columns["image_id"][r], columns["uri"][r], columns["label"][r]
        if label is None:
            raise ValueError(f"manifest {manifest}: row {r} (image_id {image_id!r}) has no 'label'")
        try:
            images.append(decode_image(read_bytes(resolve_manifest_uri(uri, root))))
        except (OSError, ImageDecodeError, CredentialsInUri) as exc:
            raise ValueError(redact(f"manifest {manifest}: row {r} (image_id {image_id!r}, uri {uri!r}): {exc}")) \
                from None
        labels.append(label)
    return images, labels


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = CROP_SCALE,
                        ratio: tuple[float, float] = CROP_RATIO) -> np.ndarray:
    """A random window of area ``scale`` x image area and aspect ``ratio``, resized to
    size x size (torchvision's RandomResizedCrop sampling; whole image as fallback)."""
    height, width = image.shape[:2]
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(area * aspect)))
        h = int(round(math.sqrt(area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(rng.integers(0, height - h + 1))
            x0 = int(rng.integers(0, width - w + 1))
            return resize_square(image[y0:y0 + h, x0:x0 + w], size)
    return resize_square(image, size)


def augment(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random resized crop (whole image, never the box) + horizontal flip with p = 0.5."""
    out = random_resized_crop(image, size, rng)
    return np.ascontiguousarray(out[:, ::-1]) if rng.random() < 0.5 else out


def class_balanced_batches(labels: np.ndarray, batch_classes: int, per_class: int,
                           rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of index batches: ceil(N / (batch_classes * per_class)) batches, each
    ``per_class`` images (without replacement where the class has enough) from each of
    ``batch_classes`` distinct random classes."""
    classes = np.unique(labels)
    if batch_classes > len(classes):
        raise ValueError(f"batch_classes={batch_classes} but the training split has only "
                         f"{len(classes)} classes")
    members = {c: np.flatnonzero(labels == c) for c in classes}
    batches = []
    for _ in range(math.ceil(len(labels) / (batch_classes * per_class))):
        chosen = rng.choice(classes, size=batch_classes, replace=False)
        batches.append(np.concatenate([
            rng.choice(members[c], size=per_class, replace=len(members[c]) < per_class) for c in chosen]))
    return batches


# ---------------------------------------------------------------- training


@torch.no_grad()
def embed(model: nn.Module, images: np.ndarray, preprocessing: Preprocessing, device: torch.device,
          batch_size: int = 128) -> Tensor:
    """Embeddings (N, d) on the CPU of (N, S, S, 3) uint8 RGB images, model in eval mode."""
    model.eval()
    out = [model(preprocessing(torch.from_numpy(images[i:i + batch_size]).to(device))).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda[:i]``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but torch sees no CUDA device")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def fit(manifest: str | Path, *, model: str = DEFAULT_MODEL, image_size: int | None = None,
        epochs: int = 10, batch_classes: int = 8, per_class: int = 4, lr: float = 1e-3,
        proxy_lr_scale: float = 100.0, weight_decay: float = 1e-4, alpha: float = 32.0, margin: float = 0.1,
        seed: int = 0, device: str = "auto", image_root: str | Path | None = None,
        log: Callable[[str], None] | None = print) -> tuple[nn.Module, Preprocessing, dict]:
    """Train ``model`` (a spec of :func:`embcam.models.build_model`, randomly initialised)
    on the manifest's ``train`` rows with the Proxy-Anchor loss; evaluate Recall@1 on the
    ``eval`` rows before and after. Nothing is saved (see :func:`train`).

    ``image_size`` defaults to 128 for ``embcam:small-resnet`` and to the architecture's
    own input size otherwise (``embcam models`` lists them); mean and std are the
    architecture's. The seed drives the initialisation. The learning rate follows a cosine decay over all
    steps; the proxies use ``lr * proxy_lr_scale`` and no weight decay. ``log``
    receives one line per epoch (None: silent).

    Returns (model in eval mode on the CPU, its preprocessing, result) with result
    ``{"model", "image_size", "epochs", "seed", "device", "train_images", "train_classes",
    "eval_images", "eval_classes", "recall_at_1_before", "recall_at_1_after", "losses"
    (mean training loss per epoch), "seconds"}``.
    """
    if epochs < 0 or batch_classes < 2 or per_class < 1:
        raise ValueError(f"need epochs >= 0, batch_classes >= 2, per_class >= 1; got epochs={epochs}, "
                         f"batch_classes={batch_classes}, per_class={per_class}")
    log = log or (lambda line: None)
    started = time.perf_counter()
    dev = resolve_device(device)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    # build_model, not load_model: load_model pins the random init to seed 0.
    spec = model
    found = resolve(spec)
    default = found[0].preprocessing if found else Preprocessing()
    size = image_size or (SMALL_MODEL_IMAGE_SIZE if spec.startswith("embcam:small-resnet") else default.size)
    preprocessing = replace(default, size=size)
    net = found[0].build(found[1], size) if found else build_model(spec)  # a ViT is built for its input size
    net.to(dev)

    train_images, train_labels = load_split(manifest, "train", image_root)
    eval_images, eval_labels = load_split(manifest, "eval", image_root)
    class_names = sorted(set(train_labels))
    if batch_classes > len(class_names):
        raise ValueError(f"batch_classes={batch_classes} but the train split of {manifest} has only "
                         f"{len(class_names)} classes")
    index = {name: i for i, name in enumerate(class_names)}
    targets = np.asarray([index[label] for label in train_labels])
    eval_batch = np.stack([resize_square(image, size) for image in eval_images])
    log(f"train: {len(train_images)} images, {len(class_names)} classes; eval: {len(eval_images)} images, "
        f"{len(set(eval_labels))} classes; {spec} at {size} px on {dev}")

    before = embed(net, eval_batch, preprocessing, dev)
    recall_before = recall_at_1(before, eval_labels)
    log(f"Recall@1 on eval classes before training: {recall_before:.4f}")

    criterion = ProxyAnchorLoss(len(class_names), before.shape[1], alpha, margin).to(dev)
    optimizer = torch.optim.AdamW([
        {"params": net.parameters(), "lr": lr, "weight_decay": weight_decay},
        {"params": criterion.parameters(), "lr": lr * proxy_lr_scale, "weight_decay": 0.0},
    ])
    steps_per_epoch = math.ceil(len(targets) / (batch_classes * per_class))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))
    losses = []
    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        net.train()
        total = 0.0
        batches = class_balanced_batches(targets, batch_classes, per_class, rng)
        for indices in batches:
            pixels = np.stack([augment(train_images[i], size, rng) for i in indices])
            x = preprocessing(torch.from_numpy(pixels).to(dev))
            loss = criterion(net(x), torch.from_numpy(targets[indices]).to(dev))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
        losses.append(total / len(batches))
        log(f"epoch {epoch}/{epochs}: loss {losses[-1]:.4f}, {time.perf_counter() - epoch_start:.1f} s")

    recall_after = recall_at_1(embed(net, eval_batch, preprocessing, dev), eval_labels)
    log(f"Recall@1 on eval classes after training: {recall_after:.4f}")
    result = {
        "model": spec, "image_size": size, "epochs": epochs, "seed": seed, "device": str(dev),
        "train_images": len(train_images), "train_classes": len(class_names),
        "eval_images": len(eval_images), "eval_classes": len(set(eval_labels)),
        "recall_at_1_before": recall_before, "recall_at_1_after": recall_after,
        "losses": losses, "seconds": round(time.perf_counter() - started, 2),
    }
    return net.cpu().eval(), preprocessing, result


def train(manifest: str | Path, out: str | Path, *, command: str = "", **options) -> dict:
    """:func:`fit` (same keyword ``options``), then save the model to ``out`` with
    :func:`embcam.models.save_checkpoint` (metadata: seed, epochs, recall_at_1,
    recall_at_1_before, image_size, train_manifest, command).

    Returns :func:`fit`'s result with ``"out"`` (the checkpoint path) added.
    """
    net, preprocessing, result = fit(manifest, **options)
    save_checkpoint(out, net, result["model"], preprocessing, seed=result["seed"], epochs=result["epochs"],
                    recall_at_1=result["recall_at_1_after"], recall_at_1_before=result["recall_at_1_before"],
                    image_size=result["image_size"], train_manifest=str(manifest), command=command)
    return {**result, "out": str(out)}


# --- command line (embcam train, jobs/train_embedding.py) ---------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="embcam train", description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="Parquet manifest with label and split columns")
    parser.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL})")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input size S (S x S, no crop); default 128 for embcam:small-resnet, "
                             "else 224")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-classes", type=int, default=8, help="classes per batch")
    parser.add_argument("--per-class", type=int, default=4, help="images per class in a batch")
    parser.add_argument("--lr", type=float, default=1e-3, help="network learning rate (AdamW)")
    parser.add_argument("--proxy-lr-scale", type=float, default=100.0, help="proxy lr = lr x this")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--image-root", default=None, help="root of relative uris (default: the manifest's folder)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; "
                        "on a busy shared machine 1 can be much faster)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["embcam", "train", *(sys.argv[1:] if argv is None else argv)])
    result = train(args.manifest, args.out, model=args.model, image_size=args.image_size, epochs=args.epochs,
                   batch_classes=args.batch_classes, per_class=args.per_class, lr=args.lr,
                   proxy_lr_scale=args.proxy_lr_scale, weight_decay=args.weight_decay, seed=args.seed,
                   device=args.device, image_root=args.image_root, command=command)
    print(json.dumps({key: result[key] for key in (
        "recall_at_1_before", "recall_at_1_after", "epochs", "seconds", "out", "model", "image_size", "seed",
        "device")}))
    return result
