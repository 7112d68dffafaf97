"""Readers for the CoOp folder layout (``coop``), where ``split_zhou_*.json`` files set the splits.

A split file maps ``train``, ``val`` and ``test`` to ``[image path, label, class name]`` entries,
with paths relative to the dataset's image folder. Class names come from these entries, with
``_`` replaced by a space as CoOp's prompt learner does. The ``val`` split is not used. Aircraft
has no split file in this layout and is read from its ``images_variant_*.txt`` files. CoOp does
not cover CIFAR100 and MNIST, so they are read from the torchvision layout under the same root.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from igsp.data.mtil_files import DatasetSpec, ImageFileDataset, SplitData, underscores_to_spaces
from igsp.data.mtil_readers import ZSCL_SPECS, read_aircraft_split_file
from igsp.exceptions import DataError

__all__ = ["COOP_SPECS", "read_coop_split_file", "read_coop_aircraft"]

COOP_GUIDE = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"


def _read_entries(
    split_file: Path, key: str, entries: object, image_dir: Path, names: dict[int, str]
):
    if not isinstance(entries, list):
        raise DataError(f"{split_file}: {key!r} is a {type(entries).__name__}, expected a list.")
    paths, labels = [], []
    for position, entry in enumerate(entries):
        try:
            relative, label, classname = entry
            label = int(label)
        except (TypeError, ValueError) as error:
            raise DataError(
                f"{split_file}: {key}[{position}] = {entry!r} is not "
                "[image path, label, class name]."
            ) from error
        if label < 0:
            raise DataError(f"{split_file}: {key}[{position}] has negative label {label}.")
        if names.setdefault(label, str(classname)) != str(classname):
            raise DataError(
                f"{split_file}: label {label} is named both {names[label]!r} and {classname!r}."
            )
        paths.append(image_dir.joinpath(*str(relative).split("/")))
        labels.append(label)
    return ImageFileDataset(paths, labels)


def read_coop_split_file(split_file: Path, image_dir: Path) -> SplitData:
    """Read a CoOp ``split_zhou_*.json``; class names come from its entries."""
    try:
        with open(split_file, encoding="utf-8") as handle:
            split = json.load(handle)
    except json.JSONDecodeError as error:
        raise DataError(f"{split_file} is not valid JSON ({error}). Download it again.") from error
    if not isinstance(split, dict) or "train" not in split or "test" not in split:
        raise DataError(f"{split_file} has no 'train' and 'test' lists. Download it again.")

    names: dict[int, str] = {}
    train = _read_entries(split_file, "train", split["train"], image_dir, names)
    test = _read_entries(split_file, "test", split["test"], image_dir, names)
    # The validation entries are parsed only for their class names.
    val = _read_entries(split_file, "val", split.get("val", []), image_dir, names)

    if not names:
        raise DataError(f"{split_file} lists no images.")
    num_classes = max(names) + 1
    unnamed = [label for label in range(num_classes) if label not in names]
    if unnamed:
        raise DataError(
            f"{split_file}: labels {unnamed[:10]} appear in no entry, so their class names are "
            "unknown. Use the complete split file."
        )
    classnames = underscores_to_spaces(names[label] for label in range(num_classes))
    return SplitData(classnames, train, test, {"split_file": str(split_file), "num_val": len(val)})


def read_coop_aircraft(root: Path) -> SplitData:
    """Read ``fgvc_aircraft/`` (CoOp): variants.txt and images_variant_{train,test}.txt."""
    base = root / "fgvc_aircraft"
    with open(base / "variants.txt", encoding="utf-8") as handle:
        classes = [line.strip() for line in handle if line.strip()]
    label_of = {name: index for index, name in enumerate(classes)}

    train = read_aircraft_split_file(base / "images_variant_train.txt", base / "images", label_of)
    test = read_aircraft_split_file(base / "images_variant_test.txt", base / "images", label_of)
    return SplitData(underscores_to_spaces(classes), train, test)


def _json_spec(name: str, folder: str, image_folder: str, split_name: str) -> DatasetSpec:
    """Build the spec of a dataset whose CoOp split file is ``<folder>/split_zhou_<name>.json``."""
    split_path = f"{folder}/split_zhou_{split_name}.json"
    image_path = f"{folder}/{image_folder}" if image_folder else folder

    def read(root: Path) -> SplitData:
        return read_coop_split_file(root / split_path, root / image_path)

    required = [split_path]
    if image_folder:
        required.insert(0, image_path)
    return DatasetSpec(
        name=name,
        layout="coop",
        folder=folder,
        required=tuple(required),
        reader=read,
        split_rule=f"split_zhou_{split_name}.json train / test",
        classnames_source=f"split_zhou_{split_name}.json entries, '_' -> ' '",
        fix=(
            f"prepare {{root}}/{folder} as CoOp's dataset guide describes ({COOP_GUIDE}): the "
            f"images and split_zhou_{split_name}.json from the link given there"
        ),
    )


def _cars_spec() -> DatasetSpec:
    spec = _json_spec("StanfordCars", "stanford_cars", "", "StanfordCars")
    required = ("stanford_cars/cars_train", "stanford_cars/cars_test", *spec.required)
    return dataclasses.replace(spec, required=required)


def _torchvision_fallback(name: str) -> DatasetSpec:
    return dataclasses.replace(ZSCL_SPECS[name], layout="coop", folder_layout="torchvision")


COOP_SPECS: dict[str, DatasetSpec] = {
    "Aircraft": DatasetSpec(
        name="Aircraft",
        layout="coop",
        folder="fgvc_aircraft",
        required=(
            "fgvc_aircraft/images",
            "fgvc_aircraft/variants.txt",
            "fgvc_aircraft/images_variant_train.txt",
            "fgvc_aircraft/images_variant_test.txt",
        ),
        reader=read_coop_aircraft,
        split_rule="images_variant_train.txt / images_variant_test.txt",
        classnames_source="variants.txt",
        fix=(
            "prepare {root}/fgvc_aircraft as CoOp's dataset guide describes "
            f"({COOP_GUIDE}): the contents of fgvc-aircraft-2013b/data moved up one level"
        ),
    ),
    "Caltech101": _json_spec("Caltech101", "caltech-101", "101_ObjectCategories", "Caltech101"),
    "CIFAR100": _torchvision_fallback("CIFAR100"),
    "DTD": _json_spec("DTD", "dtd", "images", "DescribableTextures"),
    "EuroSAT": _json_spec("EuroSAT", "eurosat", "2750", "EuroSAT"),
    "Flowers": _json_spec("Flowers", "oxford_flowers", "jpg", "OxfordFlowers"),
    "Food": _json_spec("Food", "food-101", "images", "Food101"),
    "MNIST": _torchvision_fallback("MNIST"),
    "OxfordPet": _json_spec("OxfordPet", "oxford_pets", "images", "OxfordPets"),
    "StanfordCars": _cars_spec(),
    "SUN397": _json_spec("SUN397", "sun397", "SUN397", "SUN397"),
}
