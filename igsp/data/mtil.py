"""The MTIL benchmark: 11 image-classification datasets learned in sequence.

``build_mtil_stream`` reads a data root in the torchvision folder layout that ZSCL and
MoE-Adapters use (``zscl``) or in the CoOp layout (``coop``) and returns the tasks in Order I or
Order II. It checks every selected dataset first and raises one ``DataError`` that lists each
missing or incomplete dataset, the path looked at and the fix, before any image is read.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import torch

from igsp.data.mtil_check import (
    DatasetCheck,
    check_mtil_root,
    format_check_failure,
    inspect_dataset,
    specs_for_layout,
)
from igsp.data.mtil_files import DatasetSpec, SplitData
from igsp.data.mtil_meta import (
    FEWSHOT16_TASKS,
    LAYOUTS,
    MTIL_ORDER_1,
    MTIL_ORDER_2,
    MTIL_TASKS,
    load_mtil_prompts,
    mtil_templates,
    select_task_names,
)
from igsp.data.task import Task, TaskStream
from igsp.exceptions import ConfigError, DataError

__all__ = [
    "MTIL_ORDER_1",
    "MTIL_ORDER_2",
    "MTIL_TASKS",
    "FEWSHOT16_TASKS",
    "LAYOUTS",
    "DatasetCheck",
    "build_mtil_stream",
    "check_mtil_root",
    "load_mtil_prompts",
    "sample_few_shot",
]

logger = logging.getLogger(__name__)


def sample_few_shot(labels: Sequence[int], shots: int, seed: int) -> list[int]:
    """Pick ``shots`` indices per class (all of a smaller class), drawn with seed ``seed``.

    Classes are visited in label order and each draws a ``torch.randperm`` of its indices, so
    the result depends only on ``labels``, ``shots`` and ``seed``. Returns sorted indices.
    """
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[int(label)].append(index)

    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in sorted(by_class):
        candidates = by_class[label]
        order = torch.randperm(len(candidates), generator=generator)[:shots].tolist()
        chosen += [candidates[position] for position in order]
    return sorted(chosen)


def _validate_arguments(order: int, layout: str, shots: int | None) -> None:
    if order not in (1, 2):
        raise ConfigError(f"Unknown MTIL order {order!r}; accepted values: 1, 2.")
    if layout not in LAYOUTS:
        raise ConfigError(f"Unknown MTIL layout {layout!r}; accepted values: {', '.join(LAYOUTS)}.")
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
        raise ConfigError(f"shots must be a positive integer or None (full data), got {shots!r}.")


def _download_missing(
    results: dict[str, tuple[DatasetCheck, SplitData | None]],
    specs: dict[str, DatasetSpec],
    root: Path,
) -> None:
    """Run torchvision's downloaders for datasets not found, and check them again."""
    pending = [name for name, (check, _) in results.items() if not check.ok]
    manual = [results[name][0] for name in pending if specs[name].download is None]
    if manual:
        raise DataError(
            "download=True downloads nothing until these datasets, which have no working "
            "download link, are in place by hand:\n"
            + "\n".join(check.describe() for check in manual)
        )

    root.mkdir(parents=True, exist_ok=True)
    for name in pending:
        logger.info("Downloading %s into %s with torchvision", name, root)
        try:
            specs[name].download(root)
        # Network and archive failures come as many exception types (URLError, HTTPError,
        # RuntimeError on a checksum, tarfile errors); each is reported with the fix.
        except Exception as error:
            raise DataError(
                f"Downloading {name} into {root} with torchvision failed: {error}. "
                f"Fix: {specs[name].fix.format(root=root)}"
            ) from error
        results[name] = inspect_dataset(specs[name], root)
        logger.info("%s after download: %s", name, results[name][0].status)


def _make_task(
    spec: DatasetSpec, check: DatasetCheck, data: SplitData, shots: int | None, seed: int
) -> Task:
    metadata: dict[str, Any] = {
        "layout": spec.layout,
        "dataset_dir": str(check.path),
        "split": spec.split_rule,
        "classnames_source": spec.classnames_source,
        "num_train_full": len(data.train),
        "num_test": len(data.test),
        **data.metadata,
    }
    if spec.folder_layout:
        metadata["folder_layout"] = spec.folder_layout

    train = data.train
    if shots is not None:
        indices = sample_few_shot(train.labels, shots, seed)
        train = train.subset(indices)
        metadata.update(shots=shots, fewshot_seed=seed, fewshot_indices=indices)
        counts = Counter(train.labels)
        short = sorted(label for label, count in counts.items() if count < shots)
        if short:
            logger.warning(
                "%s: %d class(es) have fewer than %d training images, so all of theirs are kept.",
                spec.name,
                len(short),
                shots,
            )
            metadata["fewshot_short_classes"] = short
    return Task(
        spec.name, list(data.classnames), mtil_templates(spec.name), train, data.test, metadata
    )


def build_mtil_stream(
    root: str | Path,
    order: int = 1,
    layout: str = "zscl",
    tasks: Sequence[str] | str | None = None,
    shots: int | None = None,
    seed: int = 0,
    download: bool = False,
) -> TaskStream:
    """Build the MTIL task stream from the datasets under ``root``.

    Args:
        root: data root that contains the dataset folders.
        order: 1 (Aircraft first) or 2 (StanfordCars first).
        layout: ``zscl`` (torchvision folders) or ``coop`` (CoOp folders and split files).
        tasks: names of the tasks to keep, for example ``FEWSHOT16_TASKS``; they stay in the
            order's sequence. None keeps all 11.
        shots: keep this many training images per class, chosen by ``sample_few_shot`` with
            ``seed``. The chosen indices into the full train split are stored in
            ``task.metadata["fewshot_indices"]``. None keeps the full train split.
        seed: seed of the few-shot sampling.
        download: run torchvision's downloaders for datasets not found. Caltech101 and
            StanfordCars have no working download link and raise ``DataError`` with the manual
            steps instead.

    Raises:
        DataError: a selected dataset is missing or incomplete; the message lists each one with
            the path looked at, the files expected and the fix.
        ConfigError: an unknown order, layout or task name, or an invalid ``shots``.
    """
    _validate_arguments(order, layout, shots)
    root = Path(root).expanduser()
    task_order = MTIL_ORDER_1 if order == 1 else MTIL_ORDER_2
    names = select_task_names(tasks, task_order)
    specs = specs_for_layout(layout)

    results = {name: inspect_dataset(specs[name], root) for name in names}
    if download:
        _download_missing(results, specs, root)
    checks = [check for check, _ in results.values()]
    if not all(check.ok for check in checks):
        raise DataError(format_check_failure(checks, root, layout))

    stream_tasks = [_make_task(specs[name], *results[name], shots, seed) for name in names]
    metadata = {
        "benchmark": "MTIL",
        "order": order,
        "layout": layout,
        "root": str(root),
        "protocol": "full" if shots is None else f"{shots}-shot",
        "shots": shots,
        "seed": seed,
    }
    return TaskStream("mtil" if order == 1 else "mtil-order2", stream_tasks, metadata)
