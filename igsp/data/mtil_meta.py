"""Fixed facts of the MTIL benchmark: task orders, prompts, class folders and published counts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any
from collections.abc import Sequence

from igsp.exceptions import ConfigError

__all__ = [
    "MTIL_ORDER_1",
    "MTIL_ORDER_2",
    "MTIL_TASKS",
    "FEWSHOT16_TASKS",
    "LAYOUTS",
    "ExpectedCounts",
    "ZSCL_EXPECTED",
    "COOP_EXPECTED",
    "CALTECH101_FOLDERS",
    "EUROSAT_FOLDERS",
    "DTD_CLASSES",
    "OXFORD_PET_CLASSES",
    "MNIST_CLASSES",
    "load_mtil_prompts",
    "mtil_templates",
    "mtil_classnames",
    "select_task_names",
]

MTIL_ORDER_1: tuple[str, ...] = (
    "Aircraft",
    "Caltech101",
    "CIFAR100",
    "DTD",
    "EuroSAT",
    "Flowers",
    "Food",
    "MNIST",
    "OxfordPet",
    "StanfordCars",
    "SUN397",
)
MTIL_ORDER_2: tuple[str, ...] = (
    "StanfordCars",
    "Food",
    "MNIST",
    "OxfordPet",
    "Flowers",
    "SUN397",
    "Aircraft",
    "Caltech101",
    "DTD",
    "EuroSAT",
    "CIFAR100",
)
MTIL_TASKS = MTIL_ORDER_1

# The 16-shot protocol leaves out EuroSAT, MNIST and OxfordPet; the 5-shot one uses all 11 tasks.
FEWSHOT16_TASKS: tuple[str, ...] = tuple(
    name for name in MTIL_ORDER_1 if name not in {"EuroSAT", "MNIST", "OxfordPet"}
)

LAYOUTS: tuple[str, ...] = ("zscl", "coop")


@dataclass(frozen=True)
class ExpectedCounts:
    """Image counts of the full dataset's train and test splits, and its class count."""

    train: int
    test: int
    classes: int


# Counts of the complete downloads, split as the MTIL protocol splits them. Caltech101 (8,677
# images without BACKGROUND_Google), EuroSAT (27,000) and SUN397 (108,754) are split 80/20 with
# int(0.8 * n) training images.
ZSCL_EXPECTED: dict[str, ExpectedCounts] = {
    "Aircraft": ExpectedCounts(3334, 3333, 100),
    "Caltech101": ExpectedCounts(6941, 1736, 101),
    "CIFAR100": ExpectedCounts(50000, 10000, 100),
    "DTD": ExpectedCounts(1880, 1880, 47),
    "EuroSAT": ExpectedCounts(21600, 5400, 10),
    "Flowers": ExpectedCounts(1020, 6149, 102),
    "Food": ExpectedCounts(75750, 25250, 101),
    "MNIST": ExpectedCounts(60000, 10000, 10),
    "OxfordPet": ExpectedCounts(3680, 3669, 37),
    "StanfordCars": ExpectedCounts(8144, 8041, 196),
    "SUN397": ExpectedCounts(87003, 21751, 397),
}

# Train and test sizes of the split_zhou_*.json files (CoOp, Zhou et al. 2022, dataset table).
# Their validation split is not used. CIFAR100 and MNIST have no CoOp split and keep their own.
COOP_EXPECTED: dict[str, ExpectedCounts] = {
    "Aircraft": ExpectedCounts(3334, 3333, 100),
    "Caltech101": ExpectedCounts(4128, 2465, 100),
    "CIFAR100": ZSCL_EXPECTED["CIFAR100"],
    "DTD": ExpectedCounts(2820, 1692, 47),
    "EuroSAT": ExpectedCounts(13500, 8100, 10),
    "Flowers": ExpectedCounts(4093, 2463, 102),
    "Food": ExpectedCounts(50500, 30300, 101),
    "MNIST": ZSCL_EXPECTED["MNIST"],
    "OxfordPet": ExpectedCounts(2944, 3669, 37),
    "StanfordCars": ExpectedCounts(6509, 8041, 196),
    "SUN397": ExpectedCounts(15880, 19850, 397),
}

# Category folders of 101_ObjectCategories in torchvision's order (sorted, BACKGROUND_Google
# dropped). Position i is the label whose name is classnames[i] in the MTIL class list.
CALTECH101_FOLDERS: tuple[str, ...] = (
    "Faces", "Faces_easy", "Leopards", "Motorbikes", "accordion", "airplanes", "anchor", "ant",
    "barrel", "bass", "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha",
    "butterfly", "camera", "cannon", "car_side", "ceiling_fan", "cellphone", "chair",
    "chandelier", "cougar_body", "cougar_face", "crab", "crayfish", "crocodile",
    "crocodile_head", "cup", "dalmatian", "dollar_bill", "dolphin", "dragonfly",
    "electric_guitar", "elephant", "emu", "euphonium", "ewer", "ferry", "flamingo",
    "flamingo_head", "garfield", "gerenuk", "gramophone", "grand_piano", "hawksbill",
    "headphone", "hedgehog", "helicopter", "ibis", "inline_skate", "joshua_tree", "kangaroo",
    "ketch", "lamp", "laptop", "llama", "lobster", "lotus", "mandolin", "mayfly", "menorah",
    "metronome", "minaret", "nautilus", "octopus", "okapi", "pagoda", "panda", "pigeon", "pizza",
    "platypus", "pyramid", "revolver", "rhino", "rooster", "saxophone", "schooner", "scissors",
    "scorpion", "sea_horse", "snoopy", "soccer_ball", "stapler", "starfish", "stegosaurus",
    "stop_sign", "strawberry", "sunflower", "tick", "trilobite", "umbrella", "watch",
    "water_lilly", "wheelchair", "wild_cat", "windsor_chair", "wrench", "yin_yang",
)  # fmt: skip

# Class folders of EuroSAT's 2750/ in sorted order, the label order of the MTIL class list.
EUROSAT_FOLDERS: tuple[str, ...] = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
    "PermanentCrop", "Residential", "River", "SeaLake",
)  # fmt: skip

# torchvision's DTD.classes: the sorted class folders named in a split file, which for
# partition 1 name all 47 classes.
DTD_CLASSES: tuple[str, ...] = (
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked",
    "crosshatched", "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy",
    "grid", "grooved", "honeycombed", "interlaced", "knitted", "lacelike", "lined", "marbled",
    "matted", "meshed", "paisley", "perforated", "pitted", "pleated", "polka-dotted", "porous",
    "potholed", "scaly", "smeared", "spiralled", "sprinkled", "stained", "stratified", "striped",
    "studded", "swirly", "veined", "waffled", "woven", "wrinkled", "zigzagged",
)  # fmt: skip

# torchvision's OxfordIIITPet.classes on the full annotation files: breed ids 1..37 in order,
# each the image-name prefix with words title-cased.
OXFORD_PET_CLASSES: tuple[str, ...] = (
    "Abyssinian", "American Bulldog", "American Pit Bull Terrier", "Basset Hound", "Beagle",
    "Bengal", "Birman", "Bombay", "Boxer", "British Shorthair", "Chihuahua", "Egyptian Mau",
    "English Cocker Spaniel", "English Setter", "German Shorthaired", "Great Pyrenees",
    "Havanese", "Japanese Chin", "Keeshond", "Leonberger", "Maine Coon", "Miniature Pinscher",
    "Newfoundland", "Persian", "Pomeranian", "Pug", "Ragdoll", "Russian Blue", "Saint Bernard",
    "Samoyed", "Scottish Terrier", "Shiba Inu", "Siamese", "Sphynx", "Staffordshire Bull Terrier",
    "Wheaten Terrier", "Yorkshire Terrier",
)  # fmt: skip

# torchvision's MNIST.classes.
MNIST_CLASSES: tuple[str, ...] = (
    "0 - zero", "1 - one", "2 - two", "3 - three", "4 - four",
    "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine",
)  # fmt: skip


@lru_cache(maxsize=1)
def load_mtil_prompts() -> dict[str, Any]:
    """Load the packaged MTIL prompt templates and hard-coded class-name lists."""
    text = resources.files("igsp.data").joinpath("mtil_prompts.json").read_text(encoding="utf-8")
    return json.loads(text)


def mtil_templates(name: str) -> list[str]:
    """Return the prompt templates of MTIL task ``name``; ``{}`` marks the class name."""
    return list(load_mtil_prompts()["datasets"][name]["templates"])


def mtil_classnames(name: str) -> list[str] | None:
    """Return the hard-coded class names of MTIL task ``name``; None where they come from disk."""
    names = load_mtil_prompts()["datasets"][name].get("classnames")
    return None if names is None else list(names)


def select_task_names(tasks: Sequence[str] | str | None, order: Sequence[str]) -> list[str]:
    """Return the tasks of ``order`` named in ``tasks``, in ``order``'s sequence.

    ``tasks`` is a list of names or one comma-separated string; names match case-insensitively.
    None selects every task of ``order``.
    """
    if tasks is None:
        return list(order)
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    canonical = {name.lower(): name for name in order}
    requested = [name.strip() for name in tasks if name.strip()]
    if not requested:
        raise ConfigError(f"The task selection is empty; accepted names: {', '.join(order)}.")
    unknown = [name for name in requested if name.lower() not in canonical]
    if unknown:
        raise ConfigError(
            f"Unknown MTIL task name(s) {unknown}; accepted values: {', '.join(order)}."
        )
    chosen = {canonical[name.lower()] for name in requested}
    return [name for name in order if name in chosen]
