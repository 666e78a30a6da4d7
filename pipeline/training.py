"""Metric learning (Approach 1): a timm backbone whose head is an embedding, trained on class-balanced
batches with triplet loss (the research's) or the multi-similarity loss (Wang et al., CVPR 2019),
or supervised contrastive loss (Khosla et al., NeurIPS 2020).

The trained model is saved as one ``.safetensors`` file with metadata that :func:`pipeline.models.
load_embedder` recognises, so ``timm:<backbone>@<file>`` is an embedder spec like any other.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from pipeline.files import replace_atomically
from pipeline.images import ImageDecodeError, Preprocess, decode_image, resize_image
from pipeline.models import (
    EMBEDDING_FORMAT,
    ModelSpec,
    Runtime,
    as_spec,
    create_timm_model,
    timm_preprocess,
    to_model_input,
)
from pipeline.sources import read_uri

MINING = ("batch-hard", "semi-hard")
LOSSES = ("triplet", "multi-similarity", "supcon")
AUGMENTATIONS = ("crop", "flip", "erase")


def parse_augment(text: str) -> tuple[str, ...]:
    """``"crop,flip"`` -> ``("crop", "flip")``; ``"none"`` or ``""`` -> ``()``.

    Raises:
        ValueError: an unknown augmentation.
    """
    names = tuple(n.strip() for n in text.split(",") if n.strip() and n.strip() != "none")
    unknown = sorted(set(names) - set(AUGMENTATIONS))
    if unknown:
        raise ValueError(f"unknown augmentation {', '.join(unknown)}; use none or a comma list of {AUGMENTATIONS}")
    return names


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how.

    Attributes:
        backbone: timm spec of the starting model (``timm:tf_efficientnet_lite0`` loads the offline
            ImageNet weights; ``@random`` starts from scratch).
        dim: embedding size (the new head's outputs).
        input_size: training and embedding resolution in pixels (square); None keeps the model's.
        loss: ``multi-similarity``, ``triplet`` or ``supcon``.
        margin: triplet margin on the distance between unit vectors.
        mining: triplet mining: ``batch-hard`` (hardest positive and negative per anchor) or ``semi-hard``.
        temperature: supcon's softmax temperature.
        classes_per_batch: P of a P x K class-balanced batch.
        per_class: K of a P x K batch.
        steps: optimiser steps in total.
        lr: AdamW learning rate (the new head gets 10x).
        weight_decay: AdamW weight decay.
        seed: sampling and head initialisation.
        augment: what each training image goes through, a comma list: ``crop`` (a random crop of 50-100 %
            of the area, aspect 3:4 to 4:3, resized back), ``flip`` (left-right, half of the images; not
            for sets where a mirror image is another class, such as digits), ``erase`` (half of the images
            get a rectangle of 2-40 % of the area, aspect 0.3 to 3.3, filled with random pixels; applied
            last), or ``none``.
        classify: weight of a cross-entropy term beside the metric loss: a cosine classifier over the
            embedding with one learned vector per class (normalised softmax, scale 16); 0 turns it off.
            The class vectors serve training only; the saved embedder is the same model either way.
        average_from: 0 (off), or a step: the saved embedder is then the mean of the weights after every
            step past it (stochastic weight averaging, Izmailov et al., UAI 2018, at the constant learning
            rate used here; BatchNorm statistics are averaged alike). A schedule setting like ``steps``:
            a run may be resumed with another value.
    """

    backbone: str = "timm:tf_efficientnet_lite0"
    dim: int = 128
    input_size: int | None = None
    loss: str = "multi-similarity"
    margin: float = 0.2
    mining: str = "batch-hard"
    temperature: float = 0.1
    classes_per_batch: int = 8
    per_class: int = 4
    steps: int = 300
    lr: float = 1e-4
    weight_decay: float = 1e-4
    seed: int = 0
    augment: str = "none"
    classify: float = 0.0
    average_from: int = 0

    def __post_init__(self) -> None:
        if as_spec(self.backbone).library != "timm":
            raise ValueError(f"the backbone must be a timm model spec, got {self.backbone!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.mining not in MINING:
            raise ValueError(f"mining must be one of {MINING}, got {self.mining!r}")
        if self.classes_per_batch < 2 or self.per_class < 2:
            raise ValueError("a class-balanced batch needs classes_per_batch >= 2 and per_class >= 2")
        if self.dim < 1 or self.steps < 1 or self.margin <= 0 or self.lr <= 0 or self.temperature <= 0:
            raise ValueError("dim and steps must be >= 1, margin, lr and temperature > 0")
        parse_augment(self.augment)
        if not 0 <= self.average_from < self.steps:
            raise ValueError(f"average_from must be 0 (off) or a step below steps ({self.steps}), "
                             f"got {self.average_from}")
        if self.classify < 0:
            raise ValueError(f"classify must be >= 0, got {self.classify}")
        if self.input_size is not None and self.input_size < 32:
            raise ValueError(f"input_size must be >= 32 pixels, got {self.input_size}")

    @property
    def batch_size(self) -> int:
        return self.classes_per_batch * self.per_class


def create_embedding_model(config: TrainConfig) -> tuple[torch.nn.Module, Preprocess]:
    """The backbone (with its weights) and a fresh, seeded ``dim``-wide head; and its input preprocess.

    Raises:
        FileNotFoundError: the backbone's weights are not available (use ``@random`` to start from scratch).
    """
    spec = as_spec(config.backbone)
    model = create_timm_model(spec, num_classes=config.dim)
    generator = torch.Generator().manual_seed(config.seed)
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) / head.weight.shape[1] ** 0.5)
        head.bias.zero_()
    return model, timm_preprocess(model, config.input_size)


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between L2-normalised rows (from their dot products; 0 on the diagonal)."""
    squared = (2 - 2 * embeddings @ embeddings.T).clamp_min(0)
    eye = torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    # sqrt has an infinite gradient at 0: keep the diagonal (and exact duplicates) away from it.
    return torch.where(eye, torch.zeros_like(squared), (squared + 1e-12).sqrt())


def triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float,
                 mining: str = "batch-hard") -> tuple[torch.Tensor, dict[str, float]]:
    """Triplet loss with in-batch mining over L2-normalised embeddings.

    ``batch-hard``: each anchor's farthest positive against its closest negative.
    ``semi-hard``: each anchor's farthest positive against the closest negative that is still
    farther than it (the hardest negative when none is).

    Returns:
        The mean loss over anchors that have a positive and a negative, and statistics: the fraction
        of those anchors with a non-zero loss, and the mean positive and negative distances.
    """
    if mining not in MINING:
        raise ValueError(f"mining must be one of {MINING}, got {mining!r}")
    distances = pairwise_distances(embeddings)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive, negative = same & ~eye, ~same
    valid = positive.any(1) & negative.any(1)
    if not valid.any():
        raise ValueError("no anchor has both a positive and a negative in this batch; use class-balanced batches")
    hardest_positive = distances.masked_fill(~positive, float("-inf")).max(1).values
    negatives = distances.masked_fill(~negative, float("inf"))
    chosen_negative = negatives.min(1).values
    if mining == "semi-hard":
        farther = negatives.masked_fill(negatives <= hardest_positive[:, None], float("inf")).min(1).values
        chosen_negative = torch.where(torch.isfinite(farther), farther, chosen_negative)
    losses = (hardest_positive - chosen_negative + margin).clamp_min(0)[valid]
    with torch.no_grad():
        stats = {"active": float((losses > 0).float().mean()),
                 "positive_distance": float(hardest_positive[valid].mean()),
                 "negative_distance": float(chosen_negative[valid].mean())}
    return losses.mean(), stats


def multi_similarity_loss(embeddings: torch.Tensor, labels: torch.Tensor, alpha: float = 2.0, beta: float = 50.0,
                          base: float = 0.5, epsilon: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """Multi-similarity loss with its pair mining, over L2-normalised embeddings.

    Per anchor, a negative is kept when it is more similar than the least similar positive minus
    ``epsilon``, a positive when it is less similar than the most similar negative plus
    ``epsilon``; the loss weighs the kept pairs by their own and their relative similarities:
    ``log(1 + sum exp(-alpha (s_p - base))) / alpha + log(1 + sum exp(beta (s_n - base))) / beta``.

    Returns:
        The mean loss over anchors with a kept pair, and statistics: the fraction of anchors with
        a kept pair, the mean positive and negative similarity.
    """
    sims = embeddings @ embeddings.T
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive, negative = same & ~eye, ~same
    if not (positive.any(1) & negative.any(1)).any():
        raise ValueError("no anchor has both a positive and a negative in this batch; use class-balanced batches")
    with torch.no_grad():
        least_positive = sims.masked_fill(~positive, float("inf")).min(1, keepdim=True).values
        most_negative = sims.masked_fill(~negative, float("-inf")).max(1, keepdim=True).values
    kept_negative = negative & (sims + epsilon > least_positive)
    kept_positive = positive & (sims - epsilon < most_negative)
    pos_term = torch.log1p((torch.exp(-alpha * (sims - base)) * kept_positive).sum(1)) / alpha
    neg_term = torch.log1p((torch.exp(beta * (sims - base)) * kept_negative).sum(1)) / beta
    active = kept_positive.any(1) | kept_negative.any(1)
    loss = (pos_term + neg_term)[active].mean() if active.any() else sims.sum() * 0
    with torch.no_grad():
        stats = {"active": float(active.float().mean()), "positive_similarity": float(sims[positive].mean()),
                 "negative_similarity": float(sims[negative].mean())}
    return loss, stats


def supcon_loss(embeddings: torch.Tensor, labels: torch.Tensor,
                temperature: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """Supervised contrastive loss over L2-normalised embeddings: per anchor, the mean over its
    positives of ``-log softmax`` of the similarity (divided by ``temperature``) among all other rows.

    Returns:
        The mean loss over anchors with a positive, and statistics as :func:`multi_similarity_loss`.
    """
    sims = embeddings @ embeddings.T
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = same & ~eye
    has_positive = positive.any(1)
    if not has_positive.any() or same.all():
        raise ValueError("no anchor has both a positive and a negative in this batch; use class-balanced batches")
    logits = (sims / temperature).masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    per_anchor = -(log_prob.masked_fill(~positive, 0).sum(1) / positive.sum(1).clamp_min(1))
    with torch.no_grad():
        stats = {"active": float(has_positive.float().mean()), "positive_similarity": float(sims[positive].mean()),
                 "negative_similarity": float(sims[~same].mean())}
    return per_anchor[has_positive].mean(), stats


def metric_loss(config: "TrainConfig", embeddings: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The configured loss of a batch, and its statistics."""
    if config.loss == "triplet":
        return triplet_loss(embeddings, labels, config.margin, config.mining)
    if config.loss == "supcon":
        return supcon_loss(embeddings, labels, config.temperature)
    return multi_similarity_loss(embeddings, labels)


class WithClassVectors(torch.nn.Module):
    """The embedding model plus one learned vector per class, for the ``classify`` cross-entropy term.

    ``forward`` is the model's; :func:`classify_loss` reads ``class_vectors``. Wrapping them in one module
    lets DistributedDataParallel average their gradients with the model's.
    """

    def __init__(self, model: torch.nn.Module, classes: int, dim: int, generator: torch.Generator) -> None:
        super().__init__()
        self.model = model
        self.class_vectors = torch.nn.Parameter(torch.randn(classes, dim, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def classify_loss(embeddings: torch.Tensor, labels: torch.Tensor, class_vectors: torch.Tensor,
                  scale: float = 16.0) -> tuple[torch.Tensor, float]:
    """Cross-entropy of a cosine classifier (normalised softmax) over L2-normalised embeddings; and its accuracy."""
    logits = scale * embeddings @ torch.nn.functional.normalize(class_vectors.float(), dim=-1).T
    with torch.no_grad():
        accuracy = float((logits.argmax(1) == labels).float().mean())
    return torch.nn.functional.cross_entropy(logits, labels), accuracy


def augment_images(images: np.ndarray, augment: tuple[str, ...], rng: np.random.Generator) -> np.ndarray:
    """Random crops (50-100 % of the area, aspect 3:4 to 4:3, resized back), left-right flips and/or
    erased rectangles (random pixels) of uint8 images (N, H, W, 3); the same ``rng`` state gives the
    same result."""
    if not augment or not len(images):
        return images
    out = images.copy()
    height, width = images.shape[1:3]
    for i in range(len(out)):
        if "crop" in augment:
            area = rng.uniform(0.5, 1.0) * height * width
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            w = int(round(min(width, np.sqrt(area * aspect))))
            h = int(round(min(height, np.sqrt(area / aspect))))
            top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            crop = Image.fromarray(out[i, top:top + h, left:left + w])
            out[i] = np.asarray(crop.resize((width, height), Image.BILINEAR))
        if "flip" in augment and rng.random() < 0.5:
            out[i] = out[i, :, ::-1]
        if "erase" in augment and rng.random() < 0.5:
            area = rng.uniform(0.02, 0.4) * height * width
            aspect = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3)))
            h = int(round(min(height, max(1.0, np.sqrt(area * aspect)))))
            w = int(round(min(width, max(1.0, np.sqrt(area / aspect)))))
            top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            out[i, top:top + h, left:left + w] = rng.integers(0, 256, size=(h, w, out.shape[3]), dtype=np.uint8)
    return out


def class_balanced_batches(labels: np.ndarray, classes_per_batch: int, per_class: int, seed: int,
                           start: int = 0) -> Iterator[np.ndarray]:
    """Endless P x K batches of indices: ``classes_per_batch`` classes, ``per_class`` images of each.

    Classes with fewer than ``per_class`` images are drawn with replacement. Batch ``i`` depends only
    on ``(seed, i)``, so a resumed run (``start=i``) sees exactly the batches the first run would have.

    Raises:
        ValueError: fewer than two classes.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError(f"metric learning needs at least two classes, found {len(classes)}")
    members = {c: np.flatnonzero(labels == c) for c in classes}
    step = start
    while True:
        rng = np.random.default_rng([seed, step])
        chosen = rng.choice(classes, size=min(classes_per_batch, len(classes)), replace=False)
        yield np.concatenate([rng.choice(members[c], size=per_class, replace=len(members[c]) < per_class)
                              for c in chosen])
        step += 1


def embed(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's L2-normalised embeddings (what :class:`pipeline.models.Embedder` returns)."""
    return torch.nn.functional.normalize(model(x).float(), dim=-1)


def embedding_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model that is saved as the embedder: without DistributedDataParallel and class vectors."""
    model = getattr(model, "module", model)
    return model.model if isinstance(model, WithClassVectors) else model


class WeightAverage:
    """The running mean of the embedding model's weights, one :meth:`add` per step (stochastic weight
    averaging). Floating-point tensors, BatchNorm statistics included, are averaged; integer ones (the
    BatchNorm step counters) keep the latest value.

    Attributes:
        state: the averaged state dict (None before the first :meth:`add`).
        count: how many steps are in the mean.
        first_step: the first step in the mean.
    """

    def __init__(self, first_step: int, state: dict[str, torch.Tensor] | None = None, count: int = 0) -> None:
        self.first_step, self.state, self.count = first_step, state, count

    @torch.no_grad()
    def add(self, model: torch.nn.Module) -> None:
        """Adds the model's current weights; the mean stays on the model's device (no copy per step)."""
        current = embedding_model(model).state_dict()
        self.count += 1
        if self.state is None:
            self.state = {k: v.detach().clone() for k, v in current.items()}
            return
        for k, v in current.items():
            if v.is_floating_point():
                mean = self.state[k] = self.state[k].to(v.device)  # a no-op but after a resume (on the CPU)
                mean.lerp_(v.detach(), 1 / self.count)
            else:
                self.state[k] = v.detach().clone()


def save_embedder(model: torch.nn.Module, path: Path, config: TrainConfig, preprocess: Preprocess,
                  extra: dict | None = None, state: dict[str, torch.Tensor] | None = None) -> str:
    """Writes the trained model (or ``state``, e.g. averaged weights, in its place) as a safetensors file
    that ``load_embedder`` reads; returns its spec."""
    state = embedding_model(model).state_dict() if state is None else state
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    spec = as_spec(config.backbone)
    metadata = {"format": EMBEDDING_FORMAT, "backbone": spec.name, "dim": str(config.dim),
                "input_size": str(preprocess.size[0]), "config": json.dumps(dataclasses.asdict(config)),
                **{k: str(v) for k, v in (extra or {}).items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with replace_atomically(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return str(ModelSpec("timm", spec.name, weights=str(path.resolve())))


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; the new head (and the class vectors) learn 10x faster than the pretrained backbone."""
    inner = getattr(model, "module", model)
    backbone = inner.model if isinstance(inner, WithClassVectors) else inner
    head = {id(p) for p in backbone.get_classifier().parameters()}
    head |= {id(p) for name, p in inner.named_parameters() if name == "class_vectors"}
    params = list(model.parameters())
    return torch.optim.AdamW([{"params": [p for p in params if id(p) not in head], "lr": config.lr},
                              {"params": [p for p in params if id(p) in head], "lr": config.lr * 10}],
                             weight_decay=config.weight_decay)


def load_batch(paths: list[str], indices: np.ndarray, preprocess: Preprocess) -> tuple[np.ndarray, np.ndarray, int]:
    """Decodes and resizes the images at ``indices``.

    Returns:
        uint8 images (N, H, W, 3), the kept indices, and how many images failed to decode (skipped).
    """
    images, kept = [], []
    for i in indices:
        try:
            image = decode_image(read_uri(paths[i]), draft_size=preprocess.draft_size)
        except (OSError, ImageDecodeError):
            continue
        images.append(resize_image(image, preprocess))
        kept.append(i)
    return np.stack(images) if images else np.zeros((0, *preprocess.size, 3), np.uint8), np.array(kept), \
        len(indices) - len(kept)


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    config: TrainConfig, history: list[dict], average: WeightAverage | None = None) -> None:
    """Everything a resumed run needs, written atomically (tensors and plain data only)."""
    state = {"model": getattr(model, "module", model).state_dict(), "optimizer": optimizer.state_dict(),
             "step": step, "config": json.dumps(dataclasses.asdict(config)), "history": json.dumps(history)}
    if average is not None and average.state is not None:
        state |= {"average": average.state, "average_count": average.count, "average_first_step": average.first_step}
    with replace_atomically(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    config: TrainConfig) -> tuple[int, list[dict], WeightAverage | None]:
    """Restores model and optimizer from :func:`save_checkpoint`; returns the step, the history and the
    weight average (None when the checkpoint holds none).

    Raises:
        ValueError: the checkpoint was made with other settings (other than ``steps`` and ``average_from``).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = json.loads(state["config"])
    mine = dataclasses.asdict(config)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # fields added since it was saved
    differ = sorted(k for k in mine if k not in ("steps", "average_from") and saved.get(k, defaults[k]) != mine[k])
    if differ:
        raise ValueError(f"{path} was trained with other settings ({', '.join(differ)}); "
                         f"use another output folder or the same settings to resume")
    getattr(model, "module", model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    average = (WeightAverage(int(state["average_first_step"]), state["average"], int(state["average_count"]))
               if "average" in state else None)
    return int(state["step"]), json.loads(state["history"]), average


def train(config: TrainConfig, paths: list[str], labels: list[str], output: Path, device: str = "cpu", *,
          autocast_dtype: torch.dtype | None = None, rank: int = 0, wrap_model=None, report=None,
          checkpoint_every: int = 50, log_every: int = 10) -> dict:
    """Trains (or resumes) on labelled images and writes ``embedder.safetensors`` into ``output``.

    Runs alike in one process and in each Ray Train worker: ``wrap_model`` is Ray's ``prepare_model``
    (DistributedDataParallel), ``report`` receives ``(metrics)`` every ``log_every`` steps, ``rank``
    seeds a different batch stream per worker, and only rank 0 writes files. With ``config.average_from``
    the embedder written is the weight average; a checkpoint carries the average on, and a run resumed
    past ``average_from`` from a checkpoint without one starts the average at its first step.

    Returns:
        A summary: steps, images seen, seconds, first and last loss (mean of ``log_every`` steps),
        the embedder spec, the steps averaged (``averaged_steps``: first and last, or None) and the
        history of logged steps.
    """
    output = Path(output)
    model, preprocess = create_embedding_model(config)
    classes = {c: i for i, c in enumerate(sorted(set(labels)))}
    if config.classify:
        model = WithClassVectors(model, len(classes), config.dim, torch.Generator().manual_seed(config.seed + 1))
    model = model.to(device)
    if wrap_model is not None:
        model = wrap_model(model)
    optimizer = make_optimizer(model, config)
    checkpoint = output / "checkpoint.pt"
    step, history, average = (load_checkpoint(checkpoint, model, optimizer, config) if checkpoint.is_file()
                              else (0, [], None))
    if average is not None and (not config.average_from or average.first_step <= config.average_from):
        average = None  # averaging off, or to start later than the checkpoint's average did
    start_step, start, seen, failed, window = step, time.perf_counter(), 0, 0, []
    batches = class_balanced_batches(np.asarray(labels), config.classes_per_batch, config.per_class,
                                     seed=config.seed + 7919 * rank, start=step)
    label_ids = np.array([classes[c] for c in labels])
    runtime_device = torch.device(device)
    runtime = Runtime(device=device)
    augment = parse_augment(config.augment)
    scaler = torch.amp.GradScaler(runtime_device.type, enabled=autocast_dtype == torch.float16)
    model.train()
    while step < config.steps:
        images, kept, bad = load_batch(paths, next(batches), preprocess)
        failed += bad
        if len(kept) < 2:
            continue
        images = augment_images(images, augment, np.random.default_rng([config.seed + 7919 * rank, step, 1]))
        x = to_model_input(images, preprocess, runtime)
        y = torch.from_numpy(label_ids[kept]).to(runtime_device)
        with torch.autocast(runtime_device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            embeddings = embed(model, x)
        loss, stats = metric_loss(config, embeddings, y)
        if config.classify:
            ce, stats["train_accuracy"] = classify_loss(embeddings, y, getattr(model, "module", model).class_vectors)
            loss = loss + config.classify * ce
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step += 1
        seen += len(kept)
        if config.average_from and step > config.average_from and rank == 0:
            average = average or WeightAverage(first_step=step)
            average.add(model)
        window.append({"loss": float(loss.detach()), **stats})
        if step % log_every == 0 or step == config.steps:
            logged = {"step": step, **{k: round(float(np.mean([w[k] for w in window])), 5) for k in window[0]},
                      "images_per_s": round(seen / (time.perf_counter() - start), 2)}
            history.append(logged)
            window = []
            if report is not None:
                report(logged)
        if rank == 0 and (step % checkpoint_every == 0 or step == config.steps):
            save_checkpoint(checkpoint, model, optimizer, step, config, history, average)
    averaged = [average.first_step, step] if average is not None else None
    spec = save_embedder(model, output / "embedder.safetensors", config, preprocess,
                         extra={"averaged_steps": f"{averaged[0]}-{averaged[1]}"} if averaged else None,
                         state=average.state if averaged else None) if rank == 0 else None
    seconds = time.perf_counter() - start
    return {"steps": step, "steps_this_run": step - start_step, "images_this_run": seen, "failed_images": failed,
            "seconds": round(seconds, 2), "images_per_s": round(seen / seconds, 2) if seconds else None,
            "first_loss": history[0]["loss"] if history else None,
            "last_loss": history[-1]["loss"] if history else None, "embedder": spec, "averaged_steps": averaged,
            "history": history}
