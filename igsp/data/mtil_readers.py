"""Readers for the 11 MTIL datasets in torchvision's folder layout (the ``zscl`` layout).

Each reader parses the split and label files the way torchvision 0.29's dataset class does, but
without integrity checks or downloads, and returns the MTIL splits. torchvision derives some class
lists from the files of a split (DTD, OxfordPet) or from the folders on disk (Caltech101,
EuroSAT). For these the reader uses the full dataset's fixed list instead, so that a partial copy
keeps the real label numbering and class count.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Callable

import numpy as np

from igsp.data.mtil_files import (
    ArrayImageDataset,
    DatasetSpec,
    IdxImages,
    ImageFileDataset,
    SplitData,
    list_images,
    load_mat,
    random_split_indices,
    read_cifar_batch,
    read_idx_header,
    read_idx_labels,
    underscores_to_spaces,
)
from igsp.data.mtil_meta import (
    CALTECH101_FOLDERS,
    DTD_CLASSES,
    EUROSAT_FOLDERS,
    MNIST_CLASSES,
    OXFORD_PET_CLASSES,
    mtil_classnames,
)
from igsp.exceptions import DataError

__all__ = [
    "ZSCL_SPECS",
    "read_aircraft",
    "read_aircraft_split_file",
    "read_caltech101",
    "read_cifar100",
    "read_dtd",
    "read_eurosat",
    "read_flowers",
    "read_food",
    "read_mnist",
    "read_oxford_pet",
    "read_stanford_cars",
    "read_sun397",
]

SPLIT_8020 = "random 80/20 split of all images, torch.Generator().manual_seed(42)"


def _read_lines(path: Path) -> list[str]:
    """Return the non-empty lines of a text file, stripped."""
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def _random_split(
    full: ImageFileDataset, metadata: dict
) -> tuple[ImageFileDataset, ImageFileDataset]:
    train_indices, test_indices = random_split_indices(len(full))
    metadata["num_images"] = len(full)
    return full.subset(train_indices), full.subset(test_indices)


def read_aircraft_split_file(
    labels_file: Path, image_dir: Path, label_of: dict[str, int]
) -> ImageFileDataset:
    """Read an FGVC-Aircraft ``images_variant_<split>.txt``: ``<image id> <variant name>`` lines."""
    paths, labels = [], []
    for number, line in enumerate(_read_lines(labels_file), start=1):
        image_id, _, variant = line.partition(" ")
        if variant not in label_of:
            raise DataError(
                f"{labels_file} line {number}: variant {variant!r} is not listed in variants.txt. "
                "The annotation files are inconsistent; download the dataset again."
            )
        paths.append(image_dir / f"{image_id}.jpg")
        labels.append(label_of[variant])
    return ImageFileDataset(paths, labels)


def read_aircraft(root: Path) -> SplitData:
    """Read FGVC-Aircraft 2013b, variant labels, train and test splits."""
    data = root / "fgvc-aircraft-2013b" / "data"
    classes = _read_lines(data / "variants.txt")
    label_of = {name: index for index, name in enumerate(classes)}

    train = read_aircraft_split_file(data / "images_variant_train.txt", data / "images", label_of)
    test = read_aircraft_split_file(data / "images_variant_test.txt", data / "images", label_of)
    return SplitData(underscores_to_spaces(classes), train, test)


def _class_folder_images(
    folder: Path, label_of: dict[str, int], skip: set[str], dataset: str
) -> ImageFileDataset:
    """List ``folder/<class>/<image>`` in sorted class-folder and file-name order."""
    paths, labels = [], []
    for category in sorted(os.listdir(folder)):
        if category in skip or not (folder / category).is_dir():
            continue
        if category not in label_of:
            raise DataError(
                f"{dataset}: folder {folder / category} is not one of the dataset's "
                f"{len(label_of)} class folders ({', '.join(sorted(label_of)[:5])}, ...). "
                "Remove or rename it."
            )
        images = list_images(folder / category)
        paths += images
        labels += [label_of[category]] * len(images)
    return ImageFileDataset(paths, labels)


def read_caltech101(root: Path) -> SplitData:
    """Read Caltech101 (BACKGROUND_Google skipped), split 80/20 with seed 42."""
    folder = root / "caltech101" / "101_ObjectCategories"
    label_of = {name: index for index, name in enumerate(CALTECH101_FOLDERS)}
    full = _class_folder_images(folder, label_of, {"BACKGROUND_Google"}, "Caltech101")

    metadata: dict = {}
    train, test = _random_split(full, metadata)
    return SplitData(mtil_classnames("Caltech101"), train, test, metadata, verify_files=False)


def _read_cifar_split(path: Path, num_classes: int) -> ArrayImageDataset:
    entry = read_cifar_batch(path)
    if "data" not in entry or "fine_labels" not in entry:
        raise DataError(
            f"CIFAR-100 file {path} has keys {sorted(entry)}; expected 'data' and 'fine_labels'. "
            "Download it again."
        )
    data = np.asarray(entry["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"CIFAR-100 file {path} has data of shape {data.shape}, expected (N, 3072)."
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = [int(label) for label in entry["fine_labels"]]
    if any(not 0 <= label < num_classes for label in labels):
        raise DataError(f"CIFAR-100 file {path} has fine labels outside 0..{num_classes - 1}.")
    return ArrayImageDataset(images, labels)


def read_cifar100(root: Path) -> SplitData:
    """Read CIFAR-100 (python version), fine labels, train and test files."""
    folder = root / "cifar-100-python"
    meta = read_cifar_batch(folder / "meta")
    if "fine_label_names" not in meta:
        raise DataError(f"CIFAR-100 file {folder / 'meta'} has no 'fine_label_names'.")
    classes = list(meta["fine_label_names"])

    train = _read_cifar_split(folder / "train", len(classes))
    test = _read_cifar_split(folder / "test", len(classes))
    return SplitData(underscores_to_spaces(classes), train, test, verify_files=False)


def _read_dtd_split(labels_file: Path, image_dir: Path) -> ImageFileDataset:
    label_of = {name: index for index, name in enumerate(DTD_CLASSES)}
    paths, labels = [], []
    for number, line in enumerate(_read_lines(labels_file), start=1):
        category, _, name = line.partition("/")
        if category not in label_of or not name:
            raise DataError(
                f"{labels_file} line {number}: {line!r} is not '<class>/<image>' with one of "
                "the 47 DTD classes. Download the dataset again."
            )
        paths.append(image_dir / category / name)
        labels.append(label_of[category])
    return ImageFileDataset(paths, labels)


def read_dtd(root: Path) -> SplitData:
    """Read DTD partition 1: ``labels/train1.txt`` and ``labels/test1.txt``."""
    data = root / "dtd" / "dtd"
    train = _read_dtd_split(data / "labels" / "train1.txt", data / "images")
    test = _read_dtd_split(data / "labels" / "test1.txt", data / "images")
    return SplitData(underscores_to_spaces(DTD_CLASSES), train, test)


def read_eurosat(root: Path) -> SplitData:
    """Read EuroSAT RGB (``2750/<class>/``), split 80/20 with seed 42."""
    folder = root / "eurosat" / "2750"
    label_of = {name: index for index, name in enumerate(EUROSAT_FOLDERS)}
    full = _class_folder_images(folder, label_of, set(), "EuroSAT")

    metadata: dict = {}
    train, test = _random_split(full, metadata)
    return SplitData(mtil_classnames("EuroSAT"), train, test, metadata, verify_files=False)


def _read_flowers_split(
    set_ids: dict, key: str, labels: np.ndarray, image_dir: Path, setid_path: Path
) -> ImageFileDataset:
    if key not in set_ids:
        raise DataError(f"{setid_path} has no {key!r} entry; download setid.mat again.")
    paths, split_labels = [], []
    for image_id in np.atleast_1d(set_ids[key]).astype(int).tolist():
        if not 1 <= image_id <= len(labels):
            raise DataError(
                f"{setid_path} names image {image_id}, but imagelabels.mat labels only "
                f"{len(labels)} images. Download both files again."
            )
        paths.append(image_dir / f"image_{image_id:05d}.jpg")
        split_labels.append(int(labels[image_id - 1]))
    return ImageFileDataset(paths, split_labels)


def read_flowers(root: Path) -> SplitData:
    """Read Oxford Flowers-102: ``setid.mat`` trnid (train) and tstid (test)."""
    base = root / "flowers-102"
    label_file = load_mat(base / "imagelabels.mat")
    if "labels" not in label_file:
        raise DataError(f"{base / 'imagelabels.mat'} has no 'labels' entry; download it again.")
    labels = np.atleast_1d(label_file["labels"]).astype(int) - 1
    set_ids = load_mat(base / "setid.mat")

    train = _read_flowers_split(set_ids, "trnid", labels, base / "jpg", base / "setid.mat")
    test = _read_flowers_split(set_ids, "tstid", labels, base / "jpg", base / "setid.mat")
    return SplitData(mtil_classnames("Flowers"), train, test)


def _read_food_split(
    meta_file: Path, image_dir: Path, label_of: dict[str, int]
) -> ImageFileDataset:
    with open(meta_file, encoding="utf-8") as handle:
        metadata = json.load(handle)
    paths, labels = [], []
    for category, relative_paths in metadata.items():
        if category not in label_of:
            raise DataError(
                f"{meta_file} lists class {category!r}, which meta/train.json does not. "
                "Download the dataset again."
            )
        paths += [image_dir.joinpath(*f"{relative}.jpg".split("/")) for relative in relative_paths]
        labels += [label_of[category]] * len(relative_paths)
    return ImageFileDataset(paths, labels)


def read_food(root: Path) -> SplitData:
    """Read Food-101: ``meta/train.json`` and ``meta/test.json``; classes sorted as torchvision."""
    base = root / "food-101"
    with open(base / "meta" / "train.json", encoding="utf-8") as handle:
        classes = sorted(json.load(handle))
    label_of = {name: index for index, name in enumerate(classes)}

    train = _read_food_split(base / "meta" / "train.json", base / "images", label_of)
    test = _read_food_split(base / "meta" / "test.json", base / "images", label_of)
    return SplitData(underscores_to_spaces(classes), train, test)


def _idx_file(raw: Path, name: str) -> Path:
    """Return ``raw/name``, or ``raw/name.gz`` where only the compressed file exists."""
    path = raw / name
    if path.exists() or not (raw / f"{name}.gz").exists():
        return path
    return raw / f"{name}.gz"


def _read_mnist_split(raw: Path, prefix: str) -> ArrayImageDataset:
    images_path = _idx_file(raw, f"{prefix}-images-idx3-ubyte")
    labels_path = _idx_file(raw, f"{prefix}-labels-idx1-ubyte")
    count, height, width = read_idx_header(images_path, 2051)
    labels = read_idx_labels(labels_path)
    if count != len(labels):
        raise DataError(
            f"MNIST files {images_path} and {labels_path} disagree: {count} images, "
            f"{len(labels)} labels. Download them again."
        )
    expected_size = 16 + count * height * width
    if images_path.suffix != ".gz" and images_path.stat().st_size < expected_size:
        raise DataError(
            f"MNIST file {images_path} is truncated: {images_path.stat().st_size} bytes, "
            f"expected {expected_size}. Download it again."
        )
    return ArrayImageDataset(IdxImages(images_path, count, height, width), labels)


def read_mnist(root: Path) -> SplitData:
    """Read MNIST from ``MNIST/raw`` IDX files (uncompressed, or .gz where only that exists)."""
    raw = root / "MNIST" / "raw"
    train = _read_mnist_split(raw, "train")
    test = _read_mnist_split(raw, "t10k")
    return SplitData(list(MNIST_CLASSES), train, test, verify_files=False)


def _read_pet_split(annotations: Path, image_dir: Path) -> ImageFileDataset:
    paths, labels = [], []
    for number, line in enumerate(_read_lines(annotations), start=1):
        if line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 4 or not fields[1].isdigit():
            raise DataError(
                f"{annotations} line {number}: {line!r} is not '<image> <class id> <species> "
                "<breed id>'. Download the annotations again."
            )
        image_id, label = fields[0], int(fields[1]) - 1
        if not 0 <= label < len(OXFORD_PET_CLASSES):
            raise DataError(f"{annotations} line {number}: class id {label + 1} is not in 1..37.")
        breed = " ".join(part.title() for part in image_id.rsplit("_", 1)[0].split("_"))
        if breed != OXFORD_PET_CLASSES[label]:
            raise DataError(
                f"{annotations} line {number}: image {image_id!r} has class id {label + 1}, "
                f"which is {OXFORD_PET_CLASSES[label]!r}, not {breed!r}. Download the "
                "annotations again."
            )
        paths.append(image_dir / f"{image_id}.jpg")
        labels.append(label)
    return ImageFileDataset(paths, labels)


def read_oxford_pet(root: Path) -> SplitData:
    """Read Oxford-IIIT Pet: ``annotations/trainval.txt`` (train) and ``annotations/test.txt``."""
    base = root / "oxford-iiit-pet"
    train = _read_pet_split(base / "annotations" / "trainval.txt", base / "images")
    test = _read_pet_split(base / "annotations" / "test.txt", base / "images")
    return SplitData(list(OXFORD_PET_CLASSES), train, test)


def _read_cars_split(annotations_path: Path, image_dir: Path, num_classes: int) -> ImageFileDataset:
    content = load_mat(annotations_path)
    if "annotations" not in content:
        raise DataError(f"{annotations_path} has no 'annotations' entry; download it again.")
    paths, labels = [], []
    for annotation in np.atleast_1d(content["annotations"]):
        try:
            name, label = str(annotation["fname"]), int(annotation["class"]) - 1
        except (ValueError, IndexError, KeyError) as error:
            raise DataError(
                f"{annotations_path}: an annotation has no usable 'fname' and 'class' ({error}). "
                "This file needs the class labels (cars_test_annos_withlabels.mat for the test "
                "split)."
            ) from error
        if not 0 <= label < num_classes:
            raise DataError(
                f"{annotations_path}: image {name} has class {label + 1}, outside 1..{num_classes}."
            )
        paths.append(image_dir / name)
        labels.append(label)
    return ImageFileDataset(paths, labels)


def read_stanford_cars(root: Path) -> SplitData:
    """Read Stanford Cars: devkit train annotations, ``cars_test_annos_withlabels.mat`` for test."""
    base = root / "stanford_cars"
    meta = load_mat(base / "devkit" / "cars_meta.mat")
    if "class_names" not in meta:
        raise DataError(
            f"{base / 'devkit' / 'cars_meta.mat'} has no 'class_names'; download it again."
        )
    classes = [str(name) for name in np.atleast_1d(meta["class_names"]).tolist()]

    train = _read_cars_split(
        base / "devkit" / "cars_train_annos.mat", base / "cars_train", len(classes)
    )
    test = _read_cars_split(
        base / "cars_test_annos_withlabels.mat", base / "cars_test", len(classes)
    )
    return SplitData(underscores_to_spaces(classes), train, test)


def read_sun397(root: Path) -> SplitData:
    """Read SUN397, split 80/20 with seed 42 after sorting the image list.

    torchvision lists the images with ``rglob`` in file-system order, which differs between
    machines and so changes the seeded split. This reader sorts the paths (relative to
    ``SUN397/``, compared as POSIX strings) before splitting.
    """
    base = root / "SUN397"
    classes = [line[3:].strip() for line in _read_lines(base / "ClassName.txt")]
    label_of = {name: index for index, name in enumerate(classes)}

    relative = sorted(path.relative_to(base).as_posix() for path in base.rglob("sun_*.jpg"))
    labels = []
    for path in relative:
        category = path.rsplit("/", 1)[0].split("/", 1)[-1]
        if category not in label_of:
            raise DataError(
                f"SUN397: image {base / path} lies in class folder {category!r}, which "
                f"{base / 'ClassName.txt'} does not list. Remove it or restore ClassName.txt."
            )
        labels.append(label_of[category])
    full = ImageFileDataset([base / path for path in relative], labels)

    metadata: dict = {"sorted_file_list": True}
    train, test = _random_split(full, metadata)
    return SplitData(underscores_to_spaces(classes), train, test, metadata, verify_files=False)


def _torchvision_download(class_name: str) -> Callable[[Path], None]:
    """Return a function that runs ``torchvision.datasets.<class_name>(root, download=True)``."""

    def download(root: Path) -> None:
        import torchvision.datasets

        getattr(torchvision.datasets, class_name)(str(root), download=True)

    return download


def _download_fix(class_name: str, folder: str) -> str:
    return (
        f"run torchvision.datasets.{class_name}('{{root}}', download=True) or pass "
        f"download=True to build_mtil_stream; it creates {{root}}/{folder}"
    )


CALTECH101_FIX = (
    "download manually (torchvision's Caltech101 download links, on Google Drive, have been "
    "broken in many releases): get caltech-101.zip from CaltechDATA, "
    "https://doi.org/10.22002/D1.20086, unzip it, extract caltech-101/101_ObjectCategories.tar.gz "
    "and move the 101_ObjectCategories folder to {root}/caltech101/101_ObjectCategories"
)
STANFORD_CARS_FIX = (
    "download manually (the original host ai.stanford.edu/~jkrause is offline, so torchvision's "
    "download=True fails with HTTP 404): get the images and devkit from a mirror, for example "
    "the Kaggle dataset jessicali9530/stanford-cars-dataset, and cars_test_annos_withlabels.mat "
    "(sources are listed in https://github.com/pytorch/vision/issues/7545), then place "
    "cars_train/, cars_test/, devkit/cars_train_annos.mat, devkit/cars_meta.mat and "
    "cars_test_annos_withlabels.mat in {root}/stanford_cars"
)

_TORCHVISION_CLASSES = "torchvision dataset .classes, '_' -> ' '"

ZSCL_SPECS: dict[str, DatasetSpec] = {
    "Aircraft": DatasetSpec(
        name="Aircraft",
        layout="zscl",
        folder="fgvc-aircraft-2013b",
        required=(
            "fgvc-aircraft-2013b/data/images",
            "fgvc-aircraft-2013b/data/variants.txt",
            "fgvc-aircraft-2013b/data/images_variant_train.txt",
            "fgvc-aircraft-2013b/data/images_variant_test.txt",
        ),
        reader=read_aircraft,
        split_rule="images_variant_train.txt / images_variant_test.txt",
        classnames_source="data/variants.txt, '_' -> ' '",
        fix=_download_fix("FGVCAircraft", "fgvc-aircraft-2013b"),
        download=_torchvision_download("FGVCAircraft"),
    ),
    "Caltech101": DatasetSpec(
        name="Caltech101",
        layout="zscl",
        folder="caltech101",
        required=("caltech101/101_ObjectCategories",),
        reader=read_caltech101,
        split_rule=SPLIT_8020,
        classnames_source="hard-coded MTIL list",
        fix=CALTECH101_FIX,
    ),
    "CIFAR100": DatasetSpec(
        name="CIFAR100",
        layout="zscl",
        folder="cifar-100-python",
        required=("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
        reader=read_cifar100,
        split_rule="train / test files",
        classnames_source="meta fine_label_names, '_' -> ' '",
        fix=_download_fix("CIFAR100", "cifar-100-python"),
        download=_torchvision_download("CIFAR100"),
    ),
    "DTD": DatasetSpec(
        name="DTD",
        layout="zscl",
        folder="dtd",
        required=("dtd/dtd/images", "dtd/dtd/labels/train1.txt", "dtd/dtd/labels/test1.txt"),
        reader=read_dtd,
        split_rule="partition 1: labels/train1.txt / labels/test1.txt",
        classnames_source=_TORCHVISION_CLASSES,
        fix=_download_fix("DTD", "dtd"),
        download=_torchvision_download("DTD"),
    ),
    "EuroSAT": DatasetSpec(
        name="EuroSAT",
        layout="zscl",
        folder="eurosat",
        required=("eurosat/2750",),
        reader=read_eurosat,
        split_rule=SPLIT_8020,
        classnames_source="hard-coded MTIL list",
        fix=_download_fix("EuroSAT", "eurosat"),
        download=_torchvision_download("EuroSAT"),
    ),
    "Flowers": DatasetSpec(
        name="Flowers",
        layout="zscl",
        folder="flowers-102",
        required=("flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"),
        reader=read_flowers,
        split_rule="setid.mat trnid / tstid",
        classnames_source="hard-coded MTIL list",
        fix=_download_fix("Flowers102", "flowers-102"),
        download=_torchvision_download("Flowers102"),
    ),
    "Food": DatasetSpec(
        name="Food",
        layout="zscl",
        folder="food-101",
        required=("food-101/images", "food-101/meta/train.json", "food-101/meta/test.json"),
        reader=read_food,
        split_rule="meta/train.json / meta/test.json",
        classnames_source=_TORCHVISION_CLASSES,
        fix=_download_fix("Food101", "food-101"),
        download=_torchvision_download("Food101"),
    ),
    "MNIST": DatasetSpec(
        name="MNIST",
        layout="zscl",
        folder="MNIST",
        required=tuple(
            (f"MNIST/raw/{name}", f"MNIST/raw/{name}.gz")
            for name in (
                "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte",
            )
        ),
        reader=read_mnist,
        split_rule="train / t10k files",
        classnames_source=_TORCHVISION_CLASSES,
        fix=_download_fix("MNIST", "MNIST/raw"),
        download=_torchvision_download("MNIST"),
    ),
    "OxfordPet": DatasetSpec(
        name="OxfordPet",
        layout="zscl",
        folder="oxford-iiit-pet",
        required=(
            "oxford-iiit-pet/images",
            "oxford-iiit-pet/annotations/trainval.txt",
            "oxford-iiit-pet/annotations/test.txt",
        ),
        reader=read_oxford_pet,
        split_rule="annotations/trainval.txt / annotations/test.txt",
        classnames_source=_TORCHVISION_CLASSES,
        fix=_download_fix("OxfordIIITPet", "oxford-iiit-pet"),
        download=_torchvision_download("OxfordIIITPet"),
    ),
    "StanfordCars": DatasetSpec(
        name="StanfordCars",
        layout="zscl",
        folder="stanford_cars",
        required=(
            "stanford_cars/cars_train",
            "stanford_cars/cars_test",
            "stanford_cars/devkit/cars_train_annos.mat",
            "stanford_cars/devkit/cars_meta.mat",
            "stanford_cars/cars_test_annos_withlabels.mat",
        ),
        reader=read_stanford_cars,
        split_rule="devkit/cars_train_annos.mat / cars_test_annos_withlabels.mat",
        classnames_source="devkit/cars_meta.mat class_names, '_' -> ' '",
        fix=STANFORD_CARS_FIX,
    ),
    "SUN397": DatasetSpec(
        name="SUN397",
        layout="zscl",
        folder="SUN397",
        required=("SUN397/ClassName.txt",),
        reader=read_sun397,
        split_rule=SPLIT_8020 + ", over the file list sorted by relative path",
        classnames_source="ClassName.txt, '_' -> ' '",
        fix=_download_fix("SUN397", "SUN397"),
        download=_torchvision_download("SUN397"),
    ),
}
