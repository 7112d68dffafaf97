"""Miniature copies of the 11 MTIL datasets, in the exact file formats the readers expect.

Each dataset gets three classes with a few small generated images, but every class list file
(variants.txt, the CIFAR meta pickle, cars_meta.mat, ClassName.txt, the Food-101 meta JSON) is
complete, so label numbers and class counts match the full datasets. Where the real class names
are not needed, numbered stand-ins fill the list (Stanford Cars, SUN397). The CoOp split files
name every class through one val image per class.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from collections.abc import Callable

import numpy as np
from PIL import Image

from igsp.data.mtil_meta import (
    CALTECH101_FOLDERS,
    DTD_CLASSES,
    EUROSAT_FOLDERS,
    OXFORD_PET_CLASSES,
    mtil_classnames,
)

__all__ = [
    "make_miniature_mtil",
    "AIRCRAFT_VARIANTS",
    "CIFAR100_CLASSES",
    "FOOD101_CLASSES",
    "IMAGE_SIZE",
    "TRAIN_PER_CLASS",
    "TEST_PER_CLASS",
    "SPLIT_PER_CLASS",
]

IMAGE_SIZE = 16
TRAIN_PER_CLASS = 3
TEST_PER_CLASS = 2
# Images per class of the datasets split 80/20 (Caltech101, EuroSAT, SUN397).
SPLIT_PER_CLASS = 5

AIRCRAFT_VARIANTS = [
    "707-320", "727-200", "737-200", "737-300", "737-400", "737-500", "737-600", "737-700",
    "737-800", "737-900", "747-100", "747-200", "747-300", "747-400", "757-200", "757-300",
    "767-200", "767-300", "767-400", "777-200", "777-300", "A300B4", "A310", "A318", "A319",
    "A320", "A321", "A330-200", "A330-300", "A340-200", "A340-300", "A340-500", "A340-600",
    "A380", "ATR-42", "ATR-72", "An-12", "BAE 146-200", "BAE 146-300", "BAE-125",
    "Beechcraft 1900", "Boeing 717", "C-130", "C-47", "CRJ-200", "CRJ-700", "CRJ-900",
    "Cessna 172", "Cessna 208", "Cessna 525", "Cessna 560", "Challenger 600", "DC-10", "DC-3",
    "DC-6", "DC-8", "DC-9-30", "DH-82", "DHC-1", "DHC-6", "DHC-8-100", "DHC-8-300", "DR-400",
    "Dornier 328", "E-170", "E-190", "E-195", "EMB-120", "ERJ 135", "ERJ 145",
    "Embraer Legacy 600", "Eurofighter Typhoon", "F-16A/B", "F/A-18", "Falcon 2000",
    "Falcon 900", "Fokker 100", "Fokker 50", "Fokker 70", "Global Express", "Gulfstream IV",
    "Gulfstream V", "Hawk T1", "Il-76", "L-1011", "MD-11", "MD-80", "MD-87", "MD-90",
    "Metroliner", "Model B200", "PA-28", "SR-20", "Saab 2000", "Saab 340", "Spitfire", "Tornado",
    "Tu-134", "Tu-154", "Yak-42",
]  # fmt: skip

CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
]  # fmt: skip

FOOD101_CLASSES = [
    "apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beef_tartare", "beet_salad",
    "beignets", "bibimbap", "bread_pudding", "breakfast_burrito", "bruschetta", "caesar_salad",
    "cannoli", "caprese_salad", "carrot_cake", "ceviche", "cheese_plate", "cheesecake",
    "chicken_curry", "chicken_quesadilla", "chicken_wings", "chocolate_cake", "chocolate_mousse",
    "churros", "clam_chowder", "club_sandwich", "crab_cakes", "creme_brulee", "croque_madame",
    "cup_cakes", "deviled_eggs", "donuts", "dumplings", "edamame", "eggs_benedict", "escargots",
    "falafel", "filet_mignon", "fish_and_chips", "foie_gras", "french_fries",
    "french_onion_soup", "french_toast", "fried_calamari", "fried_rice", "frozen_yogurt",
    "garlic_bread", "gnocchi", "greek_salad", "grilled_cheese_sandwich", "grilled_salmon",
    "guacamole", "gyoza", "hamburger", "hot_and_sour_soup", "hot_dog", "huevos_rancheros",
    "hummus", "ice_cream", "lasagna", "lobster_bisque", "lobster_roll_sandwich",
    "macaroni_and_cheese", "macarons", "miso_soup", "mussels", "nachos", "omelette",
    "onion_rings", "oysters", "pad_thai", "paella", "pancakes", "panna_cotta", "peking_duck",
    "pho", "pizza", "pork_chop", "poutine", "prime_rib", "pulled_pork_sandwich", "ramen",
    "ravioli", "red_velvet_cake", "risotto", "samosa", "sashimi", "scallops", "seaweed_salad",
    "shrimp_and_grits", "spaghetti_bolognese", "spaghetti_carbonara", "spring_rolls", "steak",
    "strawberry_shortcake", "sushi", "tacos", "takoyaki", "tiramisu", "tuna_tartare", "waffles",
]  # fmt: skip

CARS_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"] + [
    f"Car Model {index:03d} 2012" for index in range(4, 197)
]

SUN397_CLASS_LINES = ["/a/abbey", "/a/airplane_cabin", "/a/apartment_building/outdoor"] + [
    f"/s/scene_{index:03d}" for index in range(4, 398)
]


class _Pixels:
    """Deterministic images: one base colour per class plus noise, so classes are separable."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def array(self, label: int, size: int = IMAGE_SIZE, channels: int = 3) -> np.ndarray:
        base = np.array([(label * 67) % 256, (label * 139 + 80) % 256, (label * 29 + 160) % 256])
        noise = self.rng.integers(-30, 31, size=(size, size, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        return pixels if channels == 3 else pixels.mean(axis=2).astype(np.uint8)

    def save(self, path: Path, label: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.array(label)).save(path)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _save_mat(path: Path, content: dict) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), content)


def _split_counts() -> dict[str, int]:
    return {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS}


# torchvision (zscl) layout ---------------------------------------------------------------------


def _aircraft(pixels: _Pixels, base: Path, with_val: bool = False) -> None:
    _write_lines(base / "variants.txt", AIRCRAFT_VARIANTS)
    chosen = [0, 1, AIRCRAFT_VARIANTS.index("F-16A/B")]
    image_id = 1000000
    splits = {**_split_counts(), **({"val": 1} if with_val else {})}
    for split, per_class in splits.items():
        lines = []
        for label in chosen:
            for _ in range(per_class):
                image_id += 1
                pixels.save(base / "images" / f"{image_id}.jpg", label)
                lines.append(f"{image_id} {AIRCRAFT_VARIANTS[label]}")
        _write_lines(base / f"images_variant_{split}.txt", lines)


def _caltech101(root: Path, pixels: _Pixels) -> None:
    folder = root / "caltech101" / "101_ObjectCategories"
    for label, category in enumerate(["BACKGROUND_Google", "Faces", "accordion", "yin_yang"]):
        for number in range(1, SPLIT_PER_CLASS + 1):
            pixels.save(folder / category / f"image_{number:04d}.jpg", label)


def _cifar100(root: Path, pixels: _Pixels) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    chosen = [0, 1, 99]
    for split, per_class in _split_counts().items():
        labels = [label for label in chosen for _ in range(per_class)]
        data = np.stack(
            [pixels.array(label, 32).transpose(2, 0, 1).reshape(-1) for label in labels]
        )
        entry = {
            "filenames": [f"image_{index}.png" for index in range(len(labels))],
            "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": labels,
            "coarse_labels": [label // 5 for label in labels],
            "data": data,
        }
        with open(folder / split, "wb") as handle:
            pickle.dump(entry, handle)
    meta = {
        "fine_label_names": CIFAR100_CLASSES,
        "coarse_label_names": [f"group_{i}" for i in range(20)],
    }
    with open(folder / "meta", "wb") as handle:
        pickle.dump(meta, handle)


def _dtd(root: Path, pixels: _Pixels) -> None:
    data = root / "dtd" / "dtd"
    number = 0
    for split, per_class in {**_split_counts(), "val": 1}.items():
        lines = []
        for label, category in enumerate(["banded", "dotted", "zigzagged"]):
            for _ in range(per_class):
                number += 1
                name = f"{category}_{number:04d}.jpg"
                pixels.save(data / "images" / category / name, label)
                lines.append(f"{category}/{name}")
        _write_lines(data / "labels" / f"{split}1.txt", lines)


def _eurosat(root: Path, pixels: _Pixels) -> None:
    folder = root / "eurosat" / "2750"
    for label, category in enumerate(["AnnualCrop", "Forest", "SeaLake"]):
        for number in range(1, SPLIT_PER_CLASS + 1):
            pixels.save(folder / category / f"{category}_{number}.jpg", label)


def _flowers(root: Path, pixels: _Pixels) -> None:
    base = root / "flowers-102"
    chosen = [1, 2, 102]
    labels, set_ids = [], {"trnid": [], "valid": [], "tstid": []}
    for key, per_class in (("trnid", TRAIN_PER_CLASS), ("valid", 1), ("tstid", TEST_PER_CLASS)):
        for label in chosen:
            for _ in range(per_class):
                labels.append(label)
                set_ids[key].append(len(labels))
                pixels.save(base / "jpg" / f"image_{len(labels):05d}.jpg", label)
    _save_mat(base / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    _save_mat(
        base / "setid.mat", {key: np.array([ids], dtype=np.uint16) for key, ids in set_ids.items()}
    )


def _food(root: Path, pixels: _Pixels) -> None:
    base = root / "food-101"
    chosen = ["apple_pie", "baklava", "waffles"]
    image_id = 100000
    for split, per_class in _split_counts().items():
        metadata: dict[str, list[str]] = {name: [] for name in FOOD101_CLASSES}
        for category in chosen:
            for _ in range(per_class):
                image_id += 1
                pixels.save(
                    base / "images" / category / f"{image_id}.jpg", FOOD101_CLASSES.index(category)
                )
                metadata[category].append(f"{category}/{image_id}")
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(metadata), encoding="utf-8")
    _write_lines(base / "meta" / "classes.txt", FOOD101_CLASSES)


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(size.to_bytes(4, "big") for size in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _mnist(root: Path, pixels: _Pixels) -> None:
    raw = root / "MNIST" / "raw"
    for prefix, per_class in (("train", TRAIN_PER_CLASS), ("t10k", TEST_PER_CLASS)):
        labels = np.array([digit for digit in (0, 3, 9) for _ in range(per_class)], dtype=np.uint8)
        images = np.stack([pixels.array(int(label), 28, channels=1) for label in labels])
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images, 2051)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, 2049)


def _oxford_pet(root: Path, pixels: _Pixels) -> None:
    base = root / "oxford-iiit-pet"
    chosen = [(1, "Abyssinian", 1), (2, "american_bulldog", 2), (37, "yorkshire_terrier", 2)]
    number = 0
    for split, per_class in (("trainval", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        lines = []
        for class_id, prefix, species in chosen:
            for _ in range(per_class):
                number += 1
                image_id = f"{prefix}_{number}"
                pixels.save(base / "images" / f"{image_id}.jpg", class_id)
                lines.append(f"{image_id} {class_id} {species} {class_id}")
        _write_lines(base / "annotations" / f"{split}.txt", lines)


def _cars_annotations(labels: list[int], names: list[str]) -> np.ndarray:
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    records = np.zeros((1, len(labels)), dtype=[(name, "O") for name in fields])
    for index, (label, name) in enumerate(zip(labels, names)):
        box = [np.array([[value]], dtype=np.uint16) for value in (1, 1, IMAGE_SIZE, IMAGE_SIZE)]
        records[0, index] = (*box, np.array([[label]], dtype=np.uint8), np.array([name]))
    return records


def _stanford_cars(root: Path, pixels: _Pixels) -> None:
    base = root / "stanford_cars"
    chosen = [1, 2, 196]
    splits = (
        ("cars_train", TRAIN_PER_CLASS, base / "devkit" / "cars_train_annos.mat"),
        ("cars_test", TEST_PER_CLASS, base / "cars_test_annos_withlabels.mat"),
    )
    for folder, per_class, annotations_path in splits:
        labels = [label for label in chosen for _ in range(per_class)]
        names = [f"{index + 1:05d}.jpg" for index in range(len(labels))]
        for label, name in zip(labels, names):
            pixels.save(base / folder / name, label)
        _save_mat(annotations_path, {"annotations": _cars_annotations(labels, names)})
    class_names = np.array(CARS_CLASSES, dtype=object).reshape(1, -1)
    _save_mat(base / "devkit" / "cars_meta.mat", {"class_names": class_names})


def _sun397(root: Path, pixels: _Pixels) -> None:
    base = root / "SUN397"
    _write_lines(base / "ClassName.txt", SUN397_CLASS_LINES)
    # Images are written in reverse name order so that creation order differs from sorted order.
    for label, line in reversed(list(enumerate(SUN397_CLASS_LINES[:2] + SUN397_CLASS_LINES[-1:]))):
        for number in reversed(range(SPLIT_PER_CLASS)):
            pixels.save(base / line.lstrip("/") / f"sun_{label:02d}{number:04d}.jpg", label)


# CoOp layout -----------------------------------------------------------------------------------


def _coop_json(
    split_file: Path,
    image_dir: Path,
    pixels: _Pixels,
    classes: list[tuple[str, str]],
    chosen: list[int],
    name_of: Callable[[str, int, str], str],
) -> None:
    """Write images and a CoOp split file for ``classes`` (image folder, class name) by label.

    The ``chosen`` labels get train and test images; val contains one image of every class, so the
    split file names all classes, as a complete one does.
    """
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    number = 0
    plan = [("train", label, TRAIN_PER_CLASS) for label in chosen]
    plan += [("val", label, 1) for label in range(len(classes))]
    plan += [("test", label, TEST_PER_CLASS) for label in chosen]
    for key, label, count in plan:
        folder, classname = classes[label]
        for _ in range(count):
            number += 1
            relative = name_of(folder, number, key)
            pixels.save(image_dir / relative, label)
            split[key].append([relative, label, classname])
    split_file.parent.mkdir(parents=True, exist_ok=True)
    split_file.write_text(json.dumps(split), encoding="utf-8")


def _coop_caltech_classes() -> list[tuple[str, str]]:
    # CoOp drops BACKGROUND_Google and Faces_easy and renames four folders.
    renamed = {
        "airplanes": "airplane",
        "Faces": "face",
        "Leopards": "leopard",
        "Motorbikes": "motorbike",
    }
    folders = [folder for folder in CALTECH101_FOLDERS if folder != "Faces_easy"]
    return [(folder, renamed.get(folder, folder)) for folder in folders]


def _coop_sun_classes() -> list[tuple[str, str]]:
    # CoOp names a SUN397 class by its path words after the letter, in reverse order.
    classes = []
    for line in SUN397_CLASS_LINES:
        folder = line.lstrip("/")
        classes.append((folder, " ".join(folder.split("/")[1:][::-1])))
    return classes


def _coop(root: Path, pixels: _Pixels) -> None:
    _aircraft(pixels, root / "fgvc_aircraft", with_val=True)

    caltech = root / "caltech-101"
    _coop_json(
        caltech / "split_zhou_Caltech101.json",
        caltech / "101_ObjectCategories",
        pixels,
        _coop_caltech_classes(),
        [0, 1, 99],
        lambda folder, number, key: f"{folder}/image_{number:04d}.jpg",
    )
    dtd = root / "dtd"
    _coop_json(
        dtd / "split_zhou_DescribableTextures.json",
        dtd / "images",
        pixels,
        [(name, name) for name in DTD_CLASSES],
        [0, 1, 46],
        lambda folder, number, key: f"{folder}/{folder}_{number:04d}.jpg",
    )
    eurosat = root / "eurosat"
    eurosat_names = [
        "Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road",
        "Industrial Buildings", "Pasture Land", "Permanent Crop Land", "Residential Buildings",
        "River", "Sea or Lake",
    ]  # fmt: skip
    _coop_json(
        eurosat / "split_zhou_EuroSAT.json",
        eurosat / "2750",
        pixels,
        list(zip(EUROSAT_FOLDERS, eurosat_names)),
        [0, 1, 9],
        lambda folder, number, key: f"{folder}/{folder}_{number}.jpg",
    )
    flowers = root / "oxford_flowers"
    _coop_json(
        flowers / "split_zhou_OxfordFlowers.json",
        flowers / "jpg",
        pixels,
        [("", name) for name in mtil_classnames("Flowers")],
        [0, 1, 101],
        lambda folder, number, key: f"image_{number:05d}.jpg",
    )
    food = root / "food-101"
    _coop_json(
        food / "split_zhou_Food101.json",
        food / "images",
        pixels,
        [(name, name) for name in FOOD101_CLASSES],
        [0, 1, 100],
        lambda folder, number, key: f"{folder}/{100000 + number}.jpg",
    )
    pets = root / "oxford_pets"
    breeds = [name.lower().replace(" ", "_") for name in OXFORD_PET_CLASSES]
    _coop_json(
        pets / "split_zhou_OxfordPets.json",
        pets / "images",
        pixels,
        [(breed, breed) for breed in breeds],
        [0, 1, 36],
        lambda folder, number, key: f"{folder}_{number}.jpg",
    )
    cars = root / "stanford_cars"
    # CoOp moves the year to the front of a Stanford Cars class name.
    car_names = [" ".join([name.split()[-1], *name.split()[:-1]]) for name in CARS_CLASSES]
    _coop_json(
        cars / "split_zhou_StanfordCars.json",
        cars,
        pixels,
        [("", name) for name in car_names],
        [0, 1, 195],
        lambda folder, number, key: f"cars_{'test' if key == 'test' else 'train'}/{number:05d}.jpg",
    )
    sun = root / "sun397"
    _coop_json(
        sun / "split_zhou_SUN397.json",
        sun / "SUN397",
        pixels,
        _coop_sun_classes(),
        [0, 2, 396],
        lambda folder, number, key: f"{folder}/sun_{number:08d}.jpg",
    )


def make_miniature_mtil(root: str | Path, layout: str = "zscl") -> Path:
    """Write a miniature of all 11 MTIL datasets under ``root`` in ``layout`` and return ``root``.

    ``zscl``: torchvision folders, three classes per dataset with ``TRAIN_PER_CLASS`` train and
    ``TEST_PER_CLASS`` test images each; Caltech101, EuroSAT and SUN397 get ``SPLIT_PER_CLASS``
    images per class, split 80/20 by the reader. ``coop``: CoOp folders with split files in which
    three classes have ``TRAIN_PER_CLASS`` train and ``TEST_PER_CLASS`` test images and every
    class has one val image, plus the torchvision CIFAR-100 and MNIST folders that the CoOp
    layout falls back to. Both layouts keep each dataset's full class count.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pixels = _Pixels()
    if layout == "zscl":
        _aircraft(pixels, root / "fgvc-aircraft-2013b" / "data")
        _caltech101(root, pixels)
        _dtd(root, pixels)
        _eurosat(root, pixels)
        _flowers(root, pixels)
        _food(root, pixels)
        _oxford_pet(root, pixels)
        _stanford_cars(root, pixels)
        _sun397(root, pixels)
    elif layout == "coop":
        _coop(root, pixels)
    else:
        raise ValueError(f"Unknown layout {layout!r}; accepted values: zscl, coop.")
    _cifar100(root, pixels)
    _mnist(root, pixels)
    return root
