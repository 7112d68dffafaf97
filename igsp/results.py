"""Run results: the accuracy matrix, its metrics, parameter counts and per-task facts.

Results are plain data, written as JSON and CSV into the run folder after every task, so a
partial run can be reported and a finished one compared with others.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics

__all__ = ["RunResults", "RESULTS_FILE", "MATRIX_FILE", "write_text_atomic"]

RESULTS_FILE = "results.json"
MATRIX_FILE = "accuracy_matrix.csv"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _clean(value: Any) -> Any:
    """Replace NaN with None so the JSON is standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _restore(value: Any) -> Any:
    if value is None:
        return math.nan
    if isinstance(value, list):
        return [_restore(v) for v in value]
    return value


@dataclass
class RunResults:
    """Everything a run measured; ``matrix[t][i]`` is accuracy on task i after task t (percent)."""

    task_names: list[str]
    strategy: str
    selector: str
    matrix: list[list[float]]
    selection: list[dict[str, dict[str, float]]] = field(default_factory=list)
    trainable: list[dict[str, Any]] = field(default_factory=list)
    total_added: dict[str, int] = field(default_factory=dict)
    train_seconds: dict[str, float] = field(default_factory=dict)
    task_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    zero_shot_added: int | None = None
    finished: bool = False

    @classmethod
    def empty(cls, task_names: list[str], strategy: str, selector: str) -> "RunResults":
        size = len(task_names)
        return cls(list(task_names), strategy, selector, [[math.nan] * size for _ in range(size)])

    @property
    def rows_done(self) -> int:
        return sum(1 for row in self.matrix if not any(math.isnan(v) for v in row))

    def set_row(self, task_index: int, row: dict[str, float], selection: dict[str, dict[str, float]]) -> None:
        self.matrix[task_index] = [float(row[name]) for name in self.task_names]
        while len(self.selection) <= task_index:
            self.selection.append({})
        self.selection[task_index] = selection

    def summary(self) -> dict[str, float]:
        return metrics.summary(np.array(self.matrix))

    def mean_trainable(self) -> float:
        """Mean over tasks of the largest trainable count among a task's phases."""
        per_task: dict[str, int] = {}
        for record in self.trainable:
            per_task[record["task"]] = max(per_task.get(record["task"], 0), record["trainable"])
        return float(np.mean(list(per_task.values()))) if per_task else 0.0

    def final_total_added(self) -> int:
        if not self.total_added:
            return 0
        return int(list(self.total_added.values())[-1])

    def mean_selection_accuracy(self) -> float:
        """Mean over trained tasks of the share of test images routed to their own task (last row)."""
        if not self.selection:
            return math.nan
        last_row = self.selection[-1]
        values = [stats["selected_correct"] for stats in last_row.values() if not math.isnan(stats["selected_correct"])]
        return float(np.mean(values)) if values else math.nan

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["summary"] = self.summary()
        data["mean_trainable"] = self.mean_trainable()
        data["final_total_added"] = self.final_total_added()
        data["mean_selection_accuracy"] = self.mean_selection_accuracy()
        return _clean(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunResults":
        known = {name for name in cls.__dataclass_fields__}
        values = {key: value for key, value in data.items() if key in known}
        values["matrix"] = _restore(values["matrix"])
        values["selection"] = [
            {task: {k: _restore(v) for k, v in stats.items()} for task, stats in row.items()}
            for row in values.get("selection", [])
        ]
        return cls(**values)

    @classmethod
    def read(cls, run_dir: str | Path) -> "RunResults":
        path = Path(run_dir) / RESULTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"No {RESULTS_FILE} in {str(run_dir)!r}; is this a run folder made by `igsp recipe run`?")
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def write(self, run_dir: str | Path) -> None:
        """Write results.json and accuracy_matrix.csv into ``run_dir``."""
        run_dir = Path(run_dir)
        write_text_atomic(run_dir / RESULTS_FILE, json.dumps(self.to_dict(), indent=1))
        write_text_atomic(run_dir / MATRIX_FILE, self.matrix_csv())

    def matrix_csv(self) -> str:
        lines = []
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["after_task", *self.task_names])
        for name, row in zip(self.task_names, self.matrix):
            writer.writerow([name, *("" if math.isnan(v) else f"{v:.2f}" for v in row)])
        lines.append(buffer.getvalue())
        return "".join(lines)
