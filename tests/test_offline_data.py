"""Tests of the offline real-image streams built from installed packages."""

from __future__ import annotations

import gzip
import hashlib
import logging
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from igsp.data.offline import (
    LOOKALIKE_TASKS,
    MTIL_LITE_TASKS,
    SOURCES,
    ArrayImageDataset,
    OfflineSource,
    build_lookalike_stream,
    build_mtil_lite,
    find_missing_sources,
)
from igsp.data.sources.arrays import split_per_class
from igsp.data.sources.textures import PATCH_SIZE, TRAIN_FRACTION
from igsp.data.task import TaskStream
from igsp.exceptions import DataError, SourceNotInstalledError

TRAIN, TEST, SIZE = 6, 3, 32
EXPECTED_CLASSES = {
    "digits": 10,
    "fashion": 10,
    "animals": 10,
    "emoji": 9,
    "textures": 3,
    "textile": 3,
    "digit-value": 10,
    "digit-parity": 2,
    "digit-small": 2,
}

_MISSING = find_missing_sources()
needs_all_sources = pytest.mark.skipif(
    bool(_MISSING), reason=f"offline sources not installed: {sorted(_MISSING)}"
)


def _build(cache_dir: Path, **kwargs) -> TaskStream:
    options = dict(train_per_class=TRAIN, test_per_class=TEST, image_size=SIZE, cache_dir=cache_dir)
    options.update(kwargs)
    return build_mtil_lite(**options)


def _digest(image: Image.Image) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


def _ids(dataset: ArrayImageDataset) -> list[str]:
    return dataset.ids.tolist()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("offline-cache")


@pytest.fixture(scope="module")
def stream(cache_dir) -> TaskStream:
    return _build(cache_dir)


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def _write_fashion_root(root: Path, per_class: int = 2) -> Path:
    """Write a small valid Fashion-MNIST folder: ``per_class`` random images per class and split."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        labels = np.repeat(np.arange(10), per_class)
        images = rng.integers(0, 256, size=(len(labels), 28, 28))
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", images, 0x00000803)
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels, 0x00000801)
    return root


# Streams and tasks


@needs_all_sources
def test_mtil_lite_task_order(stream):
    assert stream.name == "mtil-lite"
    assert stream.task_names == list(MTIL_LITE_TASKS)


@needs_all_sources
def test_mtil_lite_class_counts(stream):
    for task in stream:
        assert task.num_classes == EXPECTED_CLASSES[task.name], task.name
        assert len(task.train) == task.num_classes * TRAIN, task.name
        assert len(task.test) == task.num_classes * TEST, task.name
        assert task.metadata["train_counts"] == [TRAIN] * task.num_classes, task.name
        assert task.metadata["test_counts"] == [TEST] * task.num_classes, task.name


@needs_all_sources
def test_mtil_lite_label_ranges(stream):
    for task in stream:
        for dataset in (task.train, task.test):
            labels = dataset.labels
            assert labels.min() == 0, task.name
            assert labels.max() == task.num_classes - 1, task.name


@needs_all_sources
def test_mtil_lite_items_rgb_at_size(stream):
    for task in stream:
        for dataset in (task.train, task.test):
            for index in (0, len(dataset) - 1):
                image, label = dataset[index]
                assert isinstance(image, Image.Image), task.name
                assert image.mode == "RGB", task.name
                assert image.size == (SIZE, SIZE), task.name
                assert type(label) is int, task.name


@needs_all_sources
def test_mtil_lite_templates_and_metadata(stream):
    for task in stream:
        assert 2 <= len(task.templates) <= 6, task.name
        assert all("{}" in template for template in task.templates), task.name
        for key in ("source", "licence", "install_command", "paths", "split"):
            assert task.metadata[key], (task.name, key)
        assert task.metadata["install_command"].startswith(("pip install", "apt-get install"))


@needs_all_sources
def test_mtil_lite_digit_templates(stream):
    digits = stream[0]
    assert digits.templates[0] == "a photo of the digit {}."
    assert digits.classnames[:3] == ["zero", "one", "two"]


@needs_all_sources
def test_mtil_lite_task_selection(cache_dir):
    built = _build(cache_dir, tasks=["textures", "digits"])
    assert built.task_names == ["textures", "digits"]


@needs_all_sources
def test_mtil_lite_class_size_cap_bounds(cache_dir):
    built = _build(cache_dir, tasks=["textile"], train_per_class=2, test_per_class=1)
    assert len(built[0].train) == 6
    assert len(built[0].test) == 3


# Splits


@needs_all_sources
def test_splits_disjoint_ids(stream):
    for task in stream:
        shared = set(_ids(task.train)) & set(_ids(task.test))
        assert not shared, (task.name, sorted(shared)[:3])


@needs_all_sources
def test_splits_disjoint_pixels(stream):
    for task in stream:
        train = {_digest(task.train[index][0]) for index in range(len(task.train))}
        test = {_digest(task.test[index][0]) for index in range(len(task.test))}
        assert not train & test, task.name


@needs_all_sources
def test_textures_regions_disjoint(stream):
    textures = stream.select(["textures"])[0]
    boundary = int(512 * TRAIN_FRACTION)
    for image_id in _ids(textures.train):
        top = int(image_id.split(":y=")[1].split(",")[0])
        assert top + PATCH_SIZE <= boundary, image_id
    for image_id in _ids(textures.test):
        top = int(image_id.split(":y=")[1].split(",")[0])
        assert top >= boundary, image_id


@needs_all_sources
def test_splits_deterministic_across_builds(stream, cache_dir):
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    again = _build(cache_dir)
    for first, second in zip(stream, again):
        assert _ids(first.train) == _ids(second.train), first.name
        assert _ids(first.test) == _ids(second.test), first.name
        assert np.array_equal(first.train.images, second.train.images), first.name
        assert np.array_equal(first.test.images, second.test.images), first.name


@needs_all_sources
def test_splits_differ_by_seed(stream, cache_dir):
    other = _build(cache_dir, seed=1)
    for first, second in zip(stream, other):
        assert _ids(first.train) != _ids(second.train), first.name
        assert _ids(first.test) != _ids(second.test), first.name


def test_split_short_class_keeps_ratio():
    labels = np.array([0] * 50 + [1] * 7)
    rng = np.random.default_rng(0)
    train, test = split_per_class(labels, 2, train_cap=10, test_cap=4, rng=rng, source="demo")
    assert np.bincount(labels[train]).tolist() == [10, 5]
    assert np.bincount(labels[test]).tolist() == [4, 2]
    assert not set(train) & set(test)


def test_split_single_image_class_raises():
    labels = np.array([0, 0, 0, 1])
    with pytest.raises(DataError, match="Class 1 of demo has 1 image"):
        split_per_class(labels, 2, 5, 5, np.random.default_rng(0), source="demo")


@needs_all_sources
def test_short_classes_logged_once(cache_dir, caplog):
    caplog.set_level(logging.INFO, logger="igsp.data.offline")
    for _ in range(2):
        built = _build(cache_dir, tasks=["emoji"], train_per_class=91, test_per_class=9)
    messages = [record.getMessage() for record in caplog.records]
    messages = [message for message in messages if "fewer images" in message]
    assert len(messages) == 1
    assert "'activity'" in messages[0]
    activity = built[0].classnames.index("activity")
    assert built[0].metadata["train_counts"][activity] < 91


# Look-alike stream


@needs_all_sources
def test_lookalike_task_names(cache_dir):
    built = build_lookalike_stream(
        train_per_class=TRAIN, test_per_class=TEST, image_size=SIZE, cache_dir=cache_dir
    )
    assert built.name == "lookalike"
    assert built.task_names == list(LOOKALIKE_TASKS)
    for task in built:
        assert task.num_classes == EXPECTED_CLASSES[task.name], task.name


@needs_all_sources
def test_lookalike_digit_tasks_share_images(cache_dir):
    built = build_lookalike_stream(
        tasks=["digit-value", "digit-parity", "digit-small"],
        train_per_class=TRAIN, test_per_class=TEST, image_size=SIZE, cache_dir=cache_dir,
    )
    value, parity, small = built.tasks
    for split in ("train", "test"):
        values = getattr(value, split).labels
        assert _ids(getattr(parity, split)) == _ids(getattr(value, split))
        assert _ids(getattr(small, split)) == _ids(getattr(value, split))
        assert np.array_equal(getattr(parity, split).labels, values % 2)
        assert np.array_equal(getattr(small, split).labels, (values >= 5).astype(np.int64))
    assert parity.classnames == ["even", "odd"]
    assert small.classnames == ["less than five", "five or more"]
    assert len(parity.train) == 10 * TRAIN


@needs_all_sources
def test_lookalike_digits_match_mtil_lite(stream, cache_dir):
    built = build_lookalike_stream(
        tasks=["digit-value"],
        train_per_class=TRAIN, test_per_class=TEST, image_size=SIZE, cache_dir=cache_dir,
    )
    assert _ids(built[0].train) == _ids(stream[0].train)


# Input errors


def test_unknown_task_raises(tmp_path):
    with pytest.raises(ValueError, match="Valid names") as error:
        build_mtil_lite(tasks=["digits", "cifar"], cache_dir=tmp_path)
    assert "'cifar'" in str(error.value)
    assert "'textile'" in str(error.value)


def test_lookalike_unknown_task_raises(tmp_path):
    with pytest.raises(ValueError, match="digit-parity"):
        build_lookalike_stream(tasks=["emoji"], cache_dir=tmp_path)


def test_task_string_raises(tmp_path):
    with pytest.raises(ValueError, match="sequence of task names"):
        build_mtil_lite(tasks="digits", cache_dir=tmp_path)


@pytest.mark.parametrize(
    "option, value",
    [("train_per_class", 0), ("test_per_class", -1), ("image_size", 0), ("seed", -1), ("seed", 1.5)],
)
def test_invalid_count_raises(tmp_path, option, value):
    with pytest.raises(ValueError, match=option):
        build_mtil_lite(tasks=["digits"], cache_dir=tmp_path, **{option: value})


def test_unknown_root_name_raises(tmp_path):
    with pytest.raises(ValueError, match="fashion-mnist"):
        build_mtil_lite(tasks=["fashion"], roots={"fashion": tmp_path}, cache_dir=tmp_path)


# Missing and corrupt sources


def test_missing_fashion_root_names_install(tmp_path):
    missing = tmp_path / "no-fashion"
    with pytest.raises(SourceNotInstalledError) as error:
        build_mtil_lite(tasks=["fashion"], roots={"fashion-mnist": missing}, cache_dir=tmp_path)
    message = str(error.value)
    assert "'fashion'" in message
    assert str(missing) in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_incomplete_fashion_root_lists_files(tmp_path):
    root = _write_fashion_root(tmp_path / "fashion")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SourceNotInstalledError, match="t10k-labels-idx1-ubyte.gz"):
        build_mtil_lite(tasks=["fashion"], roots={"fashion-mnist": root}, cache_dir=tmp_path)


def test_fashion_root_reads_idx(tmp_path):
    root = _write_fashion_root(tmp_path / "fashion")
    built = build_mtil_lite(
        tasks=["fashion"], train_per_class=2, test_per_class=1, image_size=16,
        roots={"fashion-mnist": root}, cache_dir=tmp_path,
    )
    task = built[0]
    assert len(task.train) == 20
    assert len(task.test) == 10
    assert task.metadata["paths"]["fashion-mnist"] == str(root)
    assert task.train[0][0].size == (16, 16)


@pytest.mark.parametrize("damage", ["not gzip", "bad magic", "truncated"])
def test_corrupt_idx_raises_data_error(tmp_path, damage):
    root = _write_fashion_root(tmp_path / "fashion")
    target = root / "train-images-idx3-ubyte.gz"
    if damage == "not gzip":
        target.write_bytes(b"this is not a gzip stream")
    elif damage == "bad magic":
        _write_idx(target, np.zeros((20, 28, 28)), 0x00000801)
    else:
        data = gzip.decompress(target.read_bytes())
        target.write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        build_mtil_lite(tasks=["fashion"], roots={"fashion-mnist": root}, cache_dir=tmp_path)


def test_idx_labels_out_of_range_raise(tmp_path):
    root = _write_fashion_root(tmp_path / "fashion")
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", np.full(20, 12), 0x00000801)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        build_mtil_lite(tasks=["fashion"], roots={"fashion-mnist": root}, cache_dir=tmp_path)


def test_corrupt_mnist_csv_raises(tmp_path):
    path = tmp_path / "mnist_5k.csv.gz"
    path.write_bytes(gzip.compress(b"1,2,300\n"))
    with pytest.raises(DataError, match="mnist_5k.csv.gz"):
        build_mtil_lite(tasks=["digits"], roots={"mnist": path}, cache_dir=tmp_path)


def _write_animal_root(root: Path, images: object, labels: object) -> Path:
    root.mkdir()
    for name, value in (("animal_data_version_3.gz", images), ("animal_label_version_3.gz", labels)):
        with gzip.open(root / name, "wb") as stream:
            pickle.dump(value, stream)
    return root


def test_animal_pickle_global_rejected(tmp_path):
    root = _write_animal_root(tmp_path / "animals", Path("/tmp"), np.zeros(3, dtype=np.int64))
    with pytest.raises(DataError, match="animal_data_version_3.gz"):
        build_mtil_lite(tasks=["animals"], roots={"animal-mnist": root}, cache_dir=tmp_path)


def test_animal_pickle_shape_checked(tmp_path):
    images = np.zeros((4, 28, 27), dtype=np.uint8)
    root = _write_animal_root(tmp_path / "animals", images, np.zeros(4, dtype=np.int64))
    with pytest.raises(DataError, match=r"\(N, 28, 28\)"):
        build_mtil_lite(tasks=["animals"], roots={"animal-mnist": root}, cache_dir=tmp_path)


def test_corrupt_textile_image_raises(tmp_path):
    root = tmp_path / "textile"
    for folder in ("nominal", "local", "global"):
        (root / folder).mkdir(parents=True)
        for index in range(3):
            Image.new("RGB", (40, 40), (index * 40, 90, 30)).save(root / folder / f"t_{index}.jpg")
    (root / "local" / "t_1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="t_1.jpg"):
        build_mtil_lite(
            tasks=["textile"], train_per_class=2, test_per_class=1,
            roots={"textile-simulated": root}, cache_dir=tmp_path,
        )


def test_corrupt_texture_photo_raises(tmp_path):
    for name in ("brick.png", "grass.png", "gravel.png"):
        Image.new("L", (300, 300), 128).save(tmp_path / name)
    (tmp_path / "grass.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="grass.png"):
        build_mtil_lite(tasks=["textures"], roots={"skimage-textures": tmp_path}, cache_dir=tmp_path)


# Source registry


def test_sources_cover_every_task():
    covered = {task for source in SOURCES.values() for task in source.tasks}
    assert covered == set(MTIL_LITE_TASKS) | set(LOOKALIKE_TASKS)


@needs_all_sources
def test_sources_check_installed():
    for name, source in SOURCES.items():
        assert source.check().exists(), name


def test_find_missing_sources_with_roots(tmp_path):
    missing = find_missing_sources({"fashion-mnist": tmp_path / "none"})
    assert "fashion-mnist" in missing
    assert "apt-get install dataset-fashion-mnist" in str(missing["fashion-mnist"])


def test_source_missing_module_message():
    source = OfflineSource(
        name="demo",
        title="demo images",
        tasks=("demo-task",),
        install_command="pip install igsp-no-such-package",
        licence="MIT",
        kind="directory",
        module="igsp_no_such_module",
        module_subpath="data",
    )
    with pytest.raises(SourceNotInstalledError) as error:
        source.check()
    message = str(error.value)
    assert "'demo-task'" in message
    assert "'igsp_no_such_module'" in message
    assert "pip install igsp-no-such-package" in message


# Emoji cache


@needs_all_sources
def test_emoji_cache_written_atomically(tmp_path):
    built = build_mtil_lite(
        tasks=["emoji"], train_per_class=2, test_per_class=1, image_size=16, cache_dir=tmp_path
    )
    files = sorted(path.name for path in tmp_path.iterdir())
    assert len(files) == 1
    assert files[0].startswith("emoji-16px-")
    assert files[0].endswith(".npz")
    again = build_mtil_lite(
        tasks=["emoji"], train_per_class=2, test_per_class=1, image_size=16, cache_dir=tmp_path
    )
    assert np.array_equal(built[0].train.images, again[0].train.images)


@needs_all_sources
def test_emoji_corrupt_cache_rerendered(tmp_path, caplog):
    first = build_mtil_lite(
        tasks=["emoji"], train_per_class=2, test_per_class=1, image_size=16, cache_dir=tmp_path
    )
    cache_file = next(tmp_path.iterdir())
    cache_file.write_bytes(b"broken")
    caplog.set_level(logging.WARNING)
    second = build_mtil_lite(
        tasks=["emoji"], train_per_class=2, test_per_class=1, image_size=16, cache_dir=tmp_path
    )
    assert "unreadable emoji cache" in caplog.text
    assert np.array_equal(first[0].test.images, second[0].test.images)
    assert cache_file.stat().st_size > 1000


# Dataset


def test_array_dataset_grey_to_rgb():
    images = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8)
    dataset = ArrayImageDataset(images, np.array([0, 1]), np.array(["a", "b"]))
    image, label = dataset[1]
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image)[..., 0], images[1])
    assert label == 1
    assert len(dataset) == 2


def test_array_dataset_read_only():
    images = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    dataset = ArrayImageDataset(images, np.array([0]), np.array(["a"]))
    with pytest.raises(ValueError):
        dataset.images[0, 0, 0, 0] = 1
    assert images.flags.writeable
    assert np.shares_memory(images, dataset.images)


def test_array_dataset_rejects_float():
    with pytest.raises(ValueError, match="uint8"):
        ArrayImageDataset(np.zeros((1, 4, 4)), np.array([0]), np.array(["a"]))
