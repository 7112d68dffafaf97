"""Lazy image datasets and the file-format parsers that MTIL readers share.

Nothing here decodes an image before ``__getitem__``: readers parse split and label files only,
so checking a data root stays cheap.
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from igsp.exceptions import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFileDataset",
    "ArrayImageDataset",
    "SplitData",
    "DatasetSpec",
    "IdxImages",
    "read_idx_labels",
    "read_idx_header",
    "read_cifar_batch",
    "load_mat",
    "list_images",
    "random_split_indices",
    "underscores_to_spaces",
    "missing_files",
]

# torchvision.datasets.folder.IMG_EXTENSIONS, compared lower-case as ImageFolder does.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFileDataset(Dataset):
    """Images stored one per file; each item is ``(PIL RGB image, label)``, read on access."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int]) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"Got {len(paths)} image paths but {len(labels)} labels.")
        self.paths = [Path(path) for path in paths]
        self.labels = [int(label) for label in labels]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB"), self.labels[index]

    def subset(self, indices: Sequence[int]) -> ImageFileDataset:
        """Return the items at ``indices``, in that order."""
        return ImageFileDataset([self.paths[i] for i in indices], [self.labels[i] for i in indices])


class IdxImages:
    """Image array of an IDX file (MNIST), memory-mapped or decompressed on first access.

    The array is dropped when pickled, so DataLoader workers open the file themselves.
    """

    def __init__(self, path: Path, count: int, height: int, width: int) -> None:
        self.path = path
        self.shape = (count, height, width)
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> np.ndarray:
        return self.array[index]

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = self._load()
        return self._array

    def _load(self) -> np.ndarray:
        if self.path.suffix == ".gz":
            with gzip.open(self.path, "rb") as handle:
                data = np.frombuffer(handle.read(), dtype=np.uint8, offset=16)
            return data[: int(np.prod(self.shape))].reshape(self.shape)
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=16, shape=self.shape)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_array"] = None
        return state


class ArrayImageDataset(Dataset):
    """Images stored in one array (CIFAR pickles, MNIST IDX); ``indices`` selects the items.

    ``images[i]`` is an ``H x W`` (grayscale) or ``H x W x 3`` uint8 array. Items are
    ``(PIL RGB image, label)`` built on access.
    """

    def __init__(self, images: Any, labels: Sequence[int], indices: Sequence[int] | None = None):
        if len(images) != len(labels):
            raise ValueError(f"Got {len(images)} images but {len(labels)} labels.")
        self.images = images
        self.all_labels = [int(label) for label in labels]
        self.indices = list(range(len(labels))) if indices is None else [int(i) for i in indices]
        self.labels = [self.all_labels[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        pixels = np.asarray(self.images[self.indices[index]])
        # Pillow infers mode "L" for H x W and "RGB" for H x W x 3 uint8 arrays.
        return Image.fromarray(pixels).convert("RGB"), self.labels[index]

    def subset(self, indices: Sequence[int]) -> ArrayImageDataset:
        """Return the items at ``indices`` (positions in this dataset), in that order."""
        return ArrayImageDataset(self.images, self.all_labels, [self.indices[i] for i in indices])


@dataclass
class SplitData:
    """Output of a reader: class names and the full train and test splits of one dataset."""

    classnames: list[str]
    train: ImageFileDataset | ArrayImageDataset
    test: ImageFileDataset | ArrayImageDataset
    metadata: dict[str, Any] = field(default_factory=dict)
    # True where image paths come from split files and may name files that are not on disk.
    verify_files: bool = True


@dataclass(frozen=True)
class DatasetSpec:
    """Location, reader and download route of one MTIL dataset in one layout.

    ``required`` lists paths relative to the data root. An entry that is a tuple is satisfied by
    any one of its paths (the first is the one named in messages). ``download`` is None where no
    working downloader exists and the user must follow ``fix`` by hand.
    """

    name: str
    layout: str
    folder: str
    required: tuple[str | tuple[str, ...], ...]
    reader: Callable[[Path], SplitData]
    split_rule: str
    classnames_source: str
    fix: str
    download: Callable[[Path], None] | None = None
    folder_layout: str = ""


def read_idx_header(path: Path, expected_magic: int) -> tuple[int, ...]:
    """Read an IDX header (MNIST format) and return its dimension sizes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        header = handle.read(4)
        if len(header) < 4:
            raise DataError(f"IDX file {path} is truncated: it has no header. Download it again.")
        magic = int.from_bytes(header, "big")
        if magic != expected_magic:
            raise DataError(
                f"IDX file {path} has magic number {magic}, expected {expected_magic}; "
                "it is not an MNIST file of this kind or is corrupt. Download it again."
            )
        num_dims = magic & 0xFF
        dims = handle.read(4 * num_dims)
    if len(dims) < 4 * num_dims:
        raise DataError(f"IDX file {path} is truncated inside its header. Download it again.")
    return tuple(int.from_bytes(dims[4 * i : 4 * i + 4], "big") for i in range(num_dims))


def read_idx_labels(path: Path) -> list[int]:
    """Read an IDX label file (magic 2049) into a list of ints."""
    (count,) = read_idx_header(path, 2049)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    labels = np.frombuffer(data, dtype=np.uint8, offset=8)
    if len(labels) < count:
        raise DataError(
            f"IDX label file {path} declares {count} labels but contains {len(labels)}. "
            "Download it again."
        )
    return labels[:count].astype(int).tolist()


def read_cifar_batch(path: Path) -> dict[str, Any]:
    """Unpickle a CIFAR python-version file as torchvision does (latin1 strings)."""
    try:
        with open(path, "rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise DataError(
            f"CIFAR file {path} is not a readable pickle ({error}). Download it again."
        ) from error
    if not isinstance(entry, dict):
        raise DataError(f"CIFAR file {path} contains a {type(entry).__name__}, expected a dict.")
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in entry.items()}


def load_mat(path: Path) -> dict[str, Any]:
    """Load a MATLAB .mat file with ``squeeze_me=True``, as torchvision's readers do."""
    from scipy.io import loadmat

    try:
        return loadmat(str(path), squeeze_me=True)
    except (ValueError, TypeError, OSError) as error:
        raise DataError(
            f"MATLAB file {path} could not be read ({error}). Download it again."
        ) from error


def list_images(folder: Path) -> list[Path]:
    """Return the image files directly inside ``folder``, sorted by file name."""
    names = sorted(os.listdir(folder))
    return [folder / name for name in names if name.lower().endswith(IMAGE_EXTENSIONS)]


def random_split_indices(
    count: int, ratio: float = 0.8, seed: int = 42
) -> tuple[list[int], list[int]]:
    """Split ``range(count)`` exactly as ``torch.utils.data.random_split`` does with this seed.

    The train part has ``int(ratio * count)`` items. Both parts keep the permutation order.
    """
    train_size = int(ratio * count)
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(count, generator=generator).tolist()
    return permutation[:train_size], permutation[train_size:]


def underscores_to_spaces(names: Iterable[str]) -> list[str]:
    """Replace ``_`` with a space in each class name."""
    return [str(name).replace("_", " ") for name in names]


def missing_files(paths: Iterable[Path]) -> list[Path]:
    """Return the paths that do not exist, listing each parent folder once."""
    listings: dict[Path, set[str] | None] = {}
    missing = []
    for path in paths:
        parent = path.parent
        if parent not in listings:
            listings[parent] = set(os.listdir(parent)) if parent.is_dir() else None
        names = listings[parent]
        if names is None or path.name not in names:
            missing.append(path)
    return missing
