"""Check an MTIL data root: which datasets are found, missing or incomplete, and how to fix them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence

from igsp.data.mtil_coop import COOP_SPECS
from igsp.data.mtil_files import DatasetSpec, ImageFileDataset, SplitData, missing_files
from igsp.data.mtil_meta import (
    COOP_EXPECTED,
    LAYOUTS,
    MTIL_ORDER_1,
    ZSCL_EXPECTED,
    ExpectedCounts,
    select_task_names,
)
from igsp.data.mtil_readers import ZSCL_SPECS
from igsp.exceptions import ConfigError, DataError

__all__ = [
    "FOUND",
    "MISSING",
    "INCOMPLETE",
    "DatasetCheck",
    "check_mtil_root",
    "inspect_dataset",
    "specs_for_layout",
    "format_check_failure",
]

logger = logging.getLogger(__name__)

FOUND = "found"
MISSING = "missing"
INCOMPLETE = "incomplete"

# Errors a reader raises on a file that is absent, truncated or in the wrong format.
_READ_ERRORS = (DataError, OSError, ValueError, KeyError, IndexError, TypeError, EOFError)
_MAX_LISTED_FILES = 5


@dataclass
class DatasetCheck:
    """Result of checking one MTIL dataset under a data root.

    ``status`` is ``found`` (readable, possibly a subset), ``missing`` (dataset folder absent) or
    ``incomplete`` (a required file or folder is absent or unreadable). Counts are None where the
    dataset could not be read.
    """

    name: str
    layout: str
    status: str
    path: Path
    expected: ExpectedCounts
    expected_paths: list[Path]
    fix: str
    train_count: int | None = None
    test_count: int | None = None
    num_classes: int | None = None
    classes_with_images: int | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == FOUND

    def describe(self) -> str:
        """Return a multi-line report: status, the path looked at, problems, expected paths, fix."""
        lines = [f"{self.name} ({self.layout} layout): {self.status}, looked at {self.path}"]
        lines += [f"  - {problem}" for problem in self.problems]
        if not self.ok:
            lines.append("  expected: " + ", ".join(str(path) for path in self.expected_paths))
            lines.append(f"  fix: {self.fix}")
        return "\n".join(lines)


def specs_for_layout(layout: str) -> dict[str, DatasetSpec]:
    """Return the dataset specs of a layout name (``zscl`` or ``coop``)."""
    if layout == "zscl":
        return ZSCL_SPECS
    if layout == "coop":
        return COOP_SPECS
    raise ConfigError(f"Unknown MTIL layout {layout!r}; accepted values: {', '.join(LAYOUTS)}.")


def _missing_required(spec: DatasetSpec, root: Path) -> list[Path]:
    missing = []
    for requirement in spec.required:
        alternatives = (requirement,) if isinstance(requirement, str) else requirement
        if not any((root / path).exists() for path in alternatives):
            missing.append(root / alternatives[0])
    return missing


def _file_problems(data: SplitData) -> list[str]:
    """Describe image files that the split files name but the disk lacks."""
    paths = []
    for split in (data.train, data.test):
        if isinstance(split, ImageFileDataset):
            paths += split.paths
    absent = missing_files(paths)
    if not absent:
        return []
    listed = ", ".join(str(path) for path in absent[:_MAX_LISTED_FILES])
    more = f" and {len(absent) - _MAX_LISTED_FILES} more" if len(absent) > _MAX_LISTED_FILES else ""
    return [f"{len(absent)} image file(s) named in the split files not found: {listed}{more}"]


def _content_problems(data: SplitData) -> list[str]:
    problems = []
    for split_name, split in (("train", data.train), ("test", data.test)):
        if len(split) == 0:
            problems.append(f"the {split_name} split contains no images")
        num_classes = len(data.classnames)
        bad = sorted({label for label in split.labels if not 0 <= label < num_classes})
        if bad:
            problems.append(
                f"the {split_name} split has labels {bad[:10]} outside 0..{num_classes - 1}"
            )
    if data.verify_files:
        problems += _file_problems(data)
    return problems


def _count_notes(check: DatasetCheck, spec: DatasetSpec) -> list[str]:
    notes = []
    for split, count, expected in (
        ("train", check.train_count, check.expected.train),
        ("test", check.test_count, check.expected.test),
    ):
        if count < expected:
            notes.append(f"{split}: {count} of {expected} images (a subset of the full dataset)")
        elif count > expected:
            notes.append(f"{split}: {count} images, more than the {expected} of the full dataset")
    if check.num_classes != check.expected.classes:
        notes.append(f"{check.num_classes} classes, the full dataset has {check.expected.classes}")
    if check.classes_with_images < check.num_classes:
        notes.append(f"{check.classes_with_images} of {check.num_classes} classes have images")
    if spec.folder_layout:
        notes.append(f"read from the {spec.folder_layout} layout: CoOp has no split for it")
    return notes


def inspect_dataset(spec: DatasetSpec, root: str | Path) -> tuple[DatasetCheck, SplitData | None]:
    """Check one dataset and return the check with the parsed splits (None unless found).

    Only split, label and metadata files are read, and image files are tested for existence;
    no image is decoded.
    """
    root = Path(root).expanduser()
    expected = (ZSCL_EXPECTED if spec.layout == "zscl" else COOP_EXPECTED)[spec.name]
    check = DatasetCheck(
        name=spec.name,
        layout=spec.layout,
        status=FOUND,
        path=root / spec.folder,
        expected=expected,
        expected_paths=[root / _first(requirement) for requirement in spec.required],
        fix=spec.fix.format(root=root),
    )
    if not check.path.is_dir():
        check.status = MISSING
        check.problems.append(f"folder {check.path} not found")
        return check, None

    missing = _missing_required(spec, root)
    if missing:
        check.status = INCOMPLETE
        check.problems += [f"{path} not found" for path in missing]
        return check, None

    try:
        data = spec.reader(root)
    except _READ_ERRORS as error:
        logger.debug("Reading %s under %s failed", spec.name, root, exc_info=True)
        check.status = INCOMPLETE
        check.problems.append(f"could not be read: {error}")
        return check, None

    problems = _content_problems(data)
    if problems:
        check.status = INCOMPLETE
        check.problems += problems
        return check, None

    check.train_count, check.test_count = len(data.train), len(data.test)
    check.num_classes = len(data.classnames)
    check.classes_with_images = len(set(data.train.labels) | set(data.test.labels))
    check.notes = _count_notes(check, spec)
    return check, data


def _first(requirement: str | tuple[str, ...]) -> str:
    return requirement if isinstance(requirement, str) else requirement[0]


def check_mtil_root(
    root: str | Path, layout: str = "zscl", tasks: Sequence[str] | str | None = None
) -> list[DatasetCheck]:
    """Check each MTIL dataset under ``root`` (all 11 unless ``tasks`` names some), in Order I.

    A dataset with fewer images than the full one is ``found`` with a note, because subsets are
    allowed. ``missing`` and ``incomplete`` results carry the paths expected and the fix.
    """
    specs = specs_for_layout(layout)
    names = select_task_names(tasks, MTIL_ORDER_1)
    checks = [inspect_dataset(specs[name], root)[0] for name in names]
    for check in checks:
        logger.info("MTIL %s (%s layout): %s at %s", check.name, layout, check.status, check.path)
    return checks


def format_check_failure(checks: Sequence[DatasetCheck], root: Path, layout: str) -> str:
    """Return the error message for datasets that are missing or incomplete."""
    failed = [check for check in checks if not check.ok]
    header = (
        f"{len(failed)} MTIL dataset(s) under {root} ({layout} layout) are missing or "
        "incomplete; no image was read:"
    )
    if not Path(root).is_dir():
        header += f"\nThe data root {root} itself does not exist; check the path."
    return "\n".join([header, *(check.describe() for check in failed)])
