"""MTIL readers, the data-root check and ``igsp data check``, on miniature datasets on disk."""

from __future__ import annotations

import dataclasses
import gzip
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from igsp.cli_data import app
from igsp.data.mtil import (
    FEWSHOT16_TASKS,
    MTIL_ORDER_1,
    MTIL_ORDER_2,
    build_mtil_stream,
    check_mtil_root,
    load_mtil_prompts,
    sample_few_shot,
)
from igsp.data import mtil_readers
from igsp.data.mtil_check import FOUND, INCOMPLETE, MISSING
from igsp.data.mtil_files import ImageFileDataset
from igsp.exceptions import ConfigError, DataError
from mtil_fixtures import (
    SPLIT_PER_CLASS,
    TEST_PER_CLASS,
    TRAIN_PER_CLASS,
    make_miniature_mtil,
)

FULL_CLASS_COUNTS = {
    "Aircraft": 100,
    "Caltech101": 101,
    "CIFAR100": 100,
    "DTD": 47,
    "EuroSAT": 10,
    "Flowers": 102,
    "Food": 101,
    "MNIST": 10,
    "OxfordPet": 37,
    "StanfordCars": 196,
    "SUN397": 397,
}
RANDOM_SPLIT_TASKS = ("Caltech101", "EuroSAT", "SUN397")

# Labels present in the zscl miniature, and the class name of the last one.
ZSCL_LABELS = {
    "Aircraft": ({0, 1, 72}, "F-16A/B"),
    "Caltech101": ({0, 4, 100}, "yin and yang symbol"),
    "CIFAR100": ({0, 1, 99}, "worm"),
    "DTD": ({0, 10, 46}, "zigzagged"),
    "EuroSAT": ({0, 1, 9}, "lake or sea"),
    "Flowers": ({0, 1, 101}, "blackberry lily"),
    "Food": ({0, 2, 100}, "waffles"),
    "MNIST": ({0, 3, 9}, "9 - nine"),
    "OxfordPet": ({0, 1, 36}, "Yorkshire Terrier"),
    "StanfordCars": ({0, 1, 195}, "Car Model 196 2012"),
    "SUN397": ({0, 1, 396}, "scene 397"),
}


@pytest.fixture(scope="module")
def zscl_root(tmp_path_factory) -> Path:
    return make_miniature_mtil(tmp_path_factory.mktemp("zscl"), "zscl")


@pytest.fixture(scope="module")
def zscl_stream(zscl_root):
    return build_mtil_stream(zscl_root)


@pytest.fixture(scope="module")
def coop_root(tmp_path_factory) -> Path:
    return make_miniature_mtil(tmp_path_factory.mktemp("coop"), "coop")


@pytest.fixture
def fresh_root(tmp_path) -> Path:
    """A zscl miniature that the test may damage."""
    return make_miniature_mtil(tmp_path / "data", "zscl")


def _all_labels(task) -> set[int]:
    return set(task.train.labels) | set(task.test.labels)


# Streams ---------------------------------------------------------------------------------------


def test_stream_order_one_tasks(zscl_stream):
    assert zscl_stream.name == "mtil"
    assert zscl_stream.task_names == list(MTIL_ORDER_1)
    assert zscl_stream.metadata["layout"] == "zscl"
    assert zscl_stream.metadata["protocol"] == "full"


def test_stream_full_class_counts(zscl_stream):
    counts = {task.name: task.num_classes for task in zscl_stream}
    assert counts == FULL_CLASS_COUNTS


def test_stream_labels_match_class_names(zscl_stream):
    for task in zscl_stream:
        labels, last_name = ZSCL_LABELS[task.name]
        assert _all_labels(task) == labels, task.name
        assert task.classnames[max(labels)] == last_name, task.name
        assert task.metadata["layout"] == "zscl"


def test_stream_prompts_from_packaged_json(zscl_stream):
    prompts = load_mtil_prompts()["datasets"]
    for task in zscl_stream:
        assert task.templates == prompts[task.name]["templates"], task.name
    caltech = zscl_stream.tasks[1]
    assert caltech.classnames == prompts["Caltech101"]["classnames"]
    assert caltech.classnames[0] == "off-center face"
    assert len(caltech.templates) == 34


def test_stream_images_are_rgb(zscl_stream):
    for task in zscl_stream:
        for dataset in (task.train, task.test):
            image, label = dataset[len(dataset) - 1]
            assert isinstance(image, Image.Image), task.name
            assert image.mode == "RGB", task.name
            assert isinstance(label, int), task.name


def test_split_sizes_and_disjoint(zscl_stream):
    for task in zscl_stream:
        if task.name in RANDOM_SPLIT_TASKS:
            total = 3 * SPLIT_PER_CLASS
            assert len(task.train) == int(0.8 * total), task.name
            assert len(task.test) == total - int(0.8 * total), task.name
        else:
            assert len(task.train) == 3 * TRAIN_PER_CLASS, task.name
            assert len(task.test) == 3 * TEST_PER_CLASS, task.name
        if isinstance(task.train, ImageFileDataset):
            assert not set(task.train.paths) & set(task.test.paths), task.name


def _expected_full_list(root: Path, name: str) -> list[Path]:
    """List the images as torchvision orders them, sorted for SUN397."""
    if name == "SUN397":
        base = root / "SUN397"
        return [
            base / path
            for path in sorted(p.relative_to(base).as_posix() for p in base.rglob("sun_*.jpg"))
        ]
    folder = root / ("caltech101/101_ObjectCategories" if name == "Caltech101" else "eurosat/2750")
    return [
        folder / category / image
        for category in sorted(p.name for p in folder.iterdir() if p.name != "BACKGROUND_Google")
        for image in sorted(p.name for p in (folder / category).iterdir())
    ]


@pytest.mark.parametrize("name", RANDOM_SPLIT_TASKS)
def test_random_split_matches_torch_seed_42(zscl_root, zscl_stream, name):
    task = zscl_stream.select([name]).tasks[0]
    full = _expected_full_list(zscl_root, name)
    train_size = int(0.8 * len(full))
    train, test = torch.utils.data.random_split(
        range(len(full)),
        [train_size, len(full) - train_size],
        generator=torch.Generator().manual_seed(42),
    )
    assert task.train.paths == [full[i] for i in train.indices]
    assert task.test.paths == [full[i] for i in test.indices]
    assert task.metadata["num_images"] == len(full)


def test_random_split_repeatable(zscl_root, zscl_stream):
    again = build_mtil_stream(zscl_root, tasks=list(RANDOM_SPLIT_TASKS))
    for task in again:
        first = zscl_stream.select([task.name]).tasks[0]
        assert task.train.paths == first.train.paths, task.name
        assert task.test.paths == first.test.paths, task.name


def test_sun397_list_sorted_before_split(zscl_stream):
    sun = zscl_stream.select(["SUN397"]).tasks[0]
    all_paths = sun.train.paths + sun.test.paths
    assert sun.metadata["sorted_file_list"] is True
    assert sorted(all_paths) != all_paths  # the split permutes the sorted list
    assert len(set(all_paths)) == 3 * SPLIT_PER_CLASS


def test_cifar_pixels_match_pickle(zscl_root, zscl_stream):
    with open(zscl_root / "cifar-100-python" / "test", "rb") as handle:
        entry = pickle.load(handle, encoding="latin1")
    cifar = zscl_stream.select(["CIFAR100"]).tasks[0]
    image, label = cifar.test[4]
    expected = entry["data"][4].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(image), expected)
    assert label == entry["fine_labels"][4]


def test_mnist_pixels_match_idx(zscl_root, zscl_stream):
    raw = (zscl_root / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes()
    first = np.frombuffer(raw, dtype=np.uint8, offset=16)[: 28 * 28].reshape(28, 28)
    mnist = zscl_stream.select(["MNIST"]).tasks[0]
    image, label = mnist.train[0]
    assert image.size == (28, 28)
    assert np.array_equal(np.asarray(image)[:, :, 0], first)
    assert label == 0


def test_mnist_dataset_pickles_for_workers(zscl_stream):
    mnist = zscl_stream.select(["MNIST"]).tasks[0]
    mnist.train[0]  # loads the memory map, which pickling must drop
    copy = pickle.loads(pickle.dumps(mnist.train))
    assert np.array_equal(np.asarray(copy[1][0]), np.asarray(mnist.train[1][0]))


def test_mnist_gzip_files_accepted(fresh_root):
    raw = fresh_root / "MNIST" / "raw"
    for path in list(raw.iterdir()):
        (raw / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    mnist = build_mtil_stream(fresh_root, tasks=["MNIST"]).tasks[0]
    assert len(mnist.train) == 3 * TRAIN_PER_CLASS
    assert mnist.train[0][0].size == (28, 28)


# Few-shot ----------------------------------------------------------------------------------------


def test_fewshot_deterministic_and_recorded(zscl_root, zscl_stream):
    first = build_mtil_stream(zscl_root, shots=2, seed=3)
    second = build_mtil_stream(zscl_root, shots=2, seed=3)
    assert first.metadata["protocol"] == "2-shot"
    for task, repeat, full in zip(first, second, zscl_stream):
        indices = task.metadata["fewshot_indices"]
        assert indices == repeat.metadata["fewshot_indices"], task.name
        assert task.metadata["shots"] == 2
        assert task.train.labels == [full.train.labels[i] for i in indices], task.name
        assert sorted(np.bincount(task.train.labels)[sorted(_all_labels(full))]) == [2, 2, 2]
        if isinstance(task.train, ImageFileDataset):
            assert task.train.paths == [full.train.paths[i] for i in indices], task.name
        assert len(task.test) == len(full.test), task.name


def test_fewshot_seed_changes_choice(zscl_root):
    seeds = [build_mtil_stream(zscl_root, shots=1, seed=seed) for seed in (0, 1)]
    choices = [[task.metadata["fewshot_indices"] for task in stream] for stream in seeds]
    assert choices[0] != choices[1]


def test_fewshot_small_class_keeps_all(zscl_root):
    stream = build_mtil_stream(zscl_root, tasks=["DTD"], shots=TRAIN_PER_CLASS + 1)
    dtd = stream.tasks[0]
    assert len(dtd.train) == 3 * TRAIN_PER_CLASS
    assert dtd.metadata["fewshot_short_classes"] == [0, 10, 46]


def test_sample_few_shot_per_class():
    labels = [0, 1, 0, 1, 0, 2, 2, 2, 2]
    chosen = sample_few_shot(labels, 2, seed=5)
    assert chosen == sorted(chosen)
    assert sorted(labels[i] for i in chosen) == [0, 0, 1, 1, 2, 2]
    assert chosen == sample_few_shot(labels, 2, seed=5)


def test_fewshot16_order_two(zscl_root):
    stream = build_mtil_stream(zscl_root, order=2, tasks=FEWSHOT16_TASKS, shots=1)
    assert stream.name == "mtil-order2"
    assert stream.task_names == [name for name in MTIL_ORDER_2 if name in FEWSHOT16_TASKS]
    assert set(MTIL_ORDER_1) - set(FEWSHOT16_TASKS) == {"EuroSAT", "MNIST", "OxfordPet"}


def test_tasks_match_case_insensitively(zscl_root):
    stream = build_mtil_stream(zscl_root, tasks="dtd, aircraft")
    assert stream.task_names == ["Aircraft", "DTD"]


@pytest.mark.parametrize(
    "arguments",
    [{"tasks": ["ImageNet"]}, {"layout": "voc"}, {"order": 3}, {"shots": 0}, {"tasks": []}],
)
def test_invalid_arguments_rejected(zscl_root, arguments):
    with pytest.raises(ConfigError):
        build_mtil_stream(zscl_root, **arguments)


# CoOp layout -------------------------------------------------------------------------------------


def test_coop_stream_class_names(coop_root):
    stream = build_mtil_stream(coop_root, layout="coop")
    assert stream.task_names == list(MTIL_ORDER_1)
    by_name = {task.name: task for task in stream}
    caltech_count = {**FULL_CLASS_COUNTS, "Caltech101": 100}
    assert {task.name: task.num_classes for task in stream} == caltech_count
    assert all(task.metadata["layout"] == "coop" for task in stream)
    assert by_name["Caltech101"].classnames[:2] == ["face", "leopard"]
    assert by_name["StanfordCars"].classnames[0] == "2000 AM General Hummer SUV"
    assert by_name["SUN397"].classnames[2] == "outdoor apartment building"
    assert by_name["OxfordPet"].classnames[1] == "american bulldog"


def test_coop_split_follows_json(coop_root):
    dtd = build_mtil_stream(coop_root, layout="coop", tasks=["DTD"]).tasks[0]
    split = json.loads((coop_root / "dtd" / "split_zhou_DescribableTextures.json").read_text())
    image_dir = coop_root / "dtd" / "images"
    assert dtd.train.paths == [image_dir / entry[0] for entry in split["train"]]
    assert dtd.test.paths == [image_dir / entry[0] for entry in split["test"]]
    assert dtd.train.labels == [entry[1] for entry in split["train"]]
    assert dtd.metadata["num_val"] == len(split["val"])


def test_coop_falls_back_for_cifar_and_mnist(coop_root):
    stream = build_mtil_stream(coop_root, layout="coop", tasks=["CIFAR100", "MNIST"])
    for task in stream:
        assert task.metadata["layout"] == "coop"
        assert task.metadata["folder_layout"] == "torchvision"
    assert stream.tasks[0].num_classes == 100


def test_coop_missing_split_file(coop_root, tmp_path):
    root = tmp_path / "coop"
    shutil.copytree(coop_root / "eurosat", root / "eurosat")
    (root / "eurosat" / "split_zhou_EuroSAT.json").unlink()
    (check,) = check_mtil_root(root, layout="coop", tasks=["EuroSAT"])
    assert check.status == INCOMPLETE
    assert str(root / "eurosat" / "split_zhou_EuroSAT.json") in check.problems[0]
    assert "CoOp" in check.fix


# Data-root check ----------------------------------------------------------------------------------


def test_check_found_with_subset_notes(zscl_root):
    checks = check_mtil_root(zscl_root)
    assert [check.name for check in checks] == list(MTIL_ORDER_1)
    assert all(check.status == FOUND for check in checks)
    aircraft = checks[0]
    assert (aircraft.train_count, aircraft.test_count) == (9, 6)
    assert (aircraft.expected.train, aircraft.expected.test) == (3334, 3333)
    assert aircraft.num_classes == 100
    assert aircraft.classes_with_images == 3
    assert any("subset" in note for note in aircraft.notes)


def test_check_missing_folder(fresh_root):
    shutil.rmtree(fresh_root / "stanford_cars")
    (check,) = check_mtil_root(fresh_root, tasks=["StanfordCars"])
    assert check.status == MISSING
    assert check.path == fresh_root / "stanford_cars"
    assert fresh_root / "stanford_cars" / "cars_test_annos_withlabels.mat" in check.expected_paths
    assert "manually" in check.fix


REMOVALS = {
    "Aircraft": "fgvc-aircraft-2013b/data/images_variant_test.txt",
    "CIFAR100": "cifar-100-python/meta",
    "DTD": "dtd/dtd/labels/train1.txt",
    "Flowers": "flowers-102/setid.mat",
    "Food": "food-101/images/waffles",
    "MNIST": "MNIST/raw/t10k-labels-idx1-ubyte",
    "OxfordPet": "oxford-iiit-pet/images/Abyssinian_1.jpg",
    "StanfordCars": "stanford_cars/devkit/cars_meta.mat",
    "SUN397": "SUN397/ClassName.txt",
    "Caltech101": "caltech101/101_ObjectCategories",
}


def test_check_removed_path_named(fresh_root):
    for relative in REMOVALS.values():
        path = fresh_root / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    checks = {check.name: check for check in check_mtil_root(fresh_root)}
    for name, relative in REMOVALS.items():
        assert checks[name].status == INCOMPLETE, name
        assert str(fresh_root / relative) in "\n".join(checks[name].problems), name
    assert checks["EuroSAT"].status == FOUND


def test_check_corrupt_files_incomplete(fresh_root):
    (fresh_root / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    annotations = fresh_root / "oxford-iiit-pet" / "annotations" / "test.txt"
    annotations.write_text(annotations.read_text().replace(" 37 2 37", " 5 2 37"))
    checks = {
        check.name: check for check in check_mtil_root(fresh_root, tasks="CIFAR100,OxfordPet")
    }
    assert checks["CIFAR100"].status == INCOMPLETE
    assert "cifar-100-python/train" in checks["CIFAR100"].problems[0]
    assert checks["OxfordPet"].status == INCOMPLETE
    assert "'Beagle'" in checks["OxfordPet"].problems[0]


def test_build_error_lists_every_failure(fresh_root, monkeypatch):
    shutil.rmtree(fresh_root / "stanford_cars")
    (fresh_root / "flowers-102" / "setid.mat").unlink()

    def open_image(*args, **kwargs):
        raise AssertionError("an image was opened before the check failed")

    monkeypatch.setattr(Image, "open", open_image)
    with pytest.raises(DataError) as raised:
        build_mtil_stream(fresh_root)
    message = str(raised.value)
    assert "2 MTIL dataset(s)" in message
    assert str(fresh_root / "stanford_cars") in message
    assert str(fresh_root / "flowers-102" / "setid.mat") in message
    assert "Flowers102" in message  # the torchvision download fix
    assert "Caltech101" not in message


def test_download_manual_datasets_raise(tmp_path):
    with pytest.raises(DataError) as raised:
        build_mtil_stream(tmp_path, tasks=["Caltech101", "StanfordCars"], download=True)
    message = str(raised.value)
    assert "by hand" in message
    assert str(tmp_path / "caltech101" / "101_ObjectCategories") in message
    assert "10.22002/D1.20086" in message
    assert "cars_test_annos_withlabels.mat" in message


# CLI ---------------------------------------------------------------------------------------------


def test_cli_check_found_exits_zero(zscl_root):
    result = CliRunner().invoke(app, ["check", str(zscl_root), "--tasks", "Aircraft,MNIST"])
    assert result.exit_code == 0, result.output
    assert "Aircraft" in result.output
    assert "MNIST" in result.output
    assert "DTD" not in result.output
    assert "All 2 datasets found" in result.output


def test_cli_check_missing_exits_one(tmp_path):
    result = CliRunner().invoke(app, ["check", str(tmp_path)])
    assert result.exit_code == 1
    assert "missing" in result.output
    assert str(tmp_path / "fgvc-aircraft-2013b") in result.output
    assert "11 of 11 datasets are missing or incomplete" in result.output


def test_cli_check_coop_layout(coop_root):
    result = CliRunner().invoke(app, ["check", str(coop_root), "--layout", "coop"])
    assert result.exit_code == 0, result.output


def test_cli_check_unknown_task(zscl_root):
    result = CliRunner().invoke(app, ["check", str(zscl_root), "--tasks", "ImageNet"])
    assert result.exit_code == 2
    assert "ImageNet" in result.output


def test_download_fetches_only_missing(zscl_root, tmp_path, monkeypatch):
    """download=True runs the downloader of each missing dataset once, then reads it."""
    calls = []

    def copy_from_miniature(folder: str):
        def download(root: Path) -> None:
            calls.append(folder)
            shutil.copytree(zscl_root / folder, root / folder)

        return download

    for name, folder in (("DTD", "dtd"), ("MNIST", "MNIST")):
        spec = mtil_readers.ZSCL_SPECS[name]
        patched = dataclasses.replace(spec, download=copy_from_miniature(folder))
        monkeypatch.setitem(mtil_readers.ZSCL_SPECS, name, patched)
    shutil.copytree(zscl_root / "MNIST", tmp_path / "MNIST")

    stream = build_mtil_stream(tmp_path, tasks=["DTD", "MNIST"], download=True)
    assert calls == ["dtd"]
    assert stream.task_names == ["DTD", "MNIST"]
    assert len(stream.tasks[0].train) == 3 * TRAIN_PER_CLASS
