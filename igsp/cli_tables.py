"""Rich tables of a run's results: accuracy matrix, MTIL metrics, parameters, task selection."""

from __future__ import annotations

import json
import math
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from . import metrics
from .results import RunResults

__all__ = [
    "format_percent",
    "matrix_table",
    "matrix_note",
    "metrics_table",
    "summary_line",
    "parameter_table",
    "parameter_note",
    "selector_table",
    "selector_note",
    "task_info_table",
    "results_renderables",
    "print_results",
]


def format_percent(value: float | None) -> str:
    """Format a percentage with one decimal; NaN and None (not measured yet) become a blank."""
    if value is None or math.isnan(value):
        return ""
    return f"{value:.1f}"


def format_count(value: int | float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{int(round(value)):,}"


def plain(text: str, style: str = "") -> Text:
    """Return ``text`` as a rich Text, so brackets in names and values are never read as markup."""
    return Text(text, style=style)


def matrix_table(results: RunResults) -> Table:
    """Return the accuracy matrix: row t is accuracy on every task after training task t (percent)."""
    table = Table(title="Accuracy (%) after each task", title_justify="left")
    table.add_column("After task", no_wrap=True)
    for name in results.task_names:
        table.add_column(plain(name), justify="right")

    for row_index, (name, row) in enumerate(zip(results.task_names, results.matrix)):
        cells = []
        for column_index, value in enumerate(row):
            text = format_percent(value)
            cells.append(plain(text, "bold" if column_index == row_index else ""))
        table.add_row(plain(f"{row_index + 1}. {name}"), *cells)
    return table


def matrix_note(results: RunResults) -> Text | None:
    """Return a note for a partial run, whose unfilled rows print as blanks, else None."""
    done, total = results.rows_done, len(results.task_names)
    if done == total:
        return None
    return Text(f"Partial run: {done} of {total} tasks trained; blank rows are tasks not trained yet.", style="yellow")


def metrics_table(results: RunResults, per_task_decimals: int | None = None) -> Table:
    """Return each task's Transfer, Avg and Last with their means, as MTIL papers tabulate them."""
    columns = metrics.per_task(results.matrix)
    summary = metrics.summary(results.matrix, per_task_decimals)
    table = Table(title="MTIL metrics (%)", title_justify="left")
    table.add_column("Metric", no_wrap=True)
    for name in results.task_names:
        table.add_column(plain(name), justify="right")
    table.add_column("Mean", justify="right", style="bold")

    for label, key in (("Transfer", "transfer"), ("Avg", "avg"), ("Last", "last")):
        cells = [format_percent(value) for value in columns[key]]
        table.add_row(label, *cells, format_percent(summary[key]))
    return table


def summary_line(results: RunResults, per_task_decimals: int | None = None) -> Text:
    """Return one line with Transfer, Avg, Last, backward transfer and forgetting (percent)."""
    summary = metrics.summary(results.matrix, per_task_decimals)
    parts = [
        ("Transfer", summary["transfer"]),
        ("Avg", summary["avg"]),
        ("Last", summary["last"]),
        ("BWT", summary["bwt"]),
        ("Forgetting", summary["forgetting"]),
    ]
    line = Text()
    for index, (label, value) in enumerate(parts):
        if index:
            line.append("   ")
        line.append(f"{label} ", style="bold")
        line.append(format_percent(value) or "-")
    return line


def _phase_order(results: RunResults) -> list[str]:
    phases: list[str] = []
    for record in results.trainable:
        if record["phase"] not in phases:
            phases.append(record["phase"])
    return phases


def parameter_table(results: RunResults) -> Table:
    """Return trainable parameters per task and phase, and the added parameters after each task."""
    phases = _phase_order(results)
    table = Table(title="Parameters", title_justify="left")
    table.add_column("Task", no_wrap=True)
    for phase in phases:
        table.add_column(plain(f"Trainable ({phase})"), justify="right")
    table.add_column("Total added after task", justify="right")

    for name in results.task_names:
        cells = []
        for phase in phases:
            counts = [r["trainable"] for r in results.trainable if r["task"] == name and r["phase"] == phase]
            cells.append(" / ".join(format_count(count) for count in counts))
        table.add_row(plain(name), *cells, format_count(results.total_added.get(name)))
    return table


def parameter_note(results: RunResults) -> Text:
    """Return the mean trainable count and the count added when the model was set up."""
    return Text(
        f"Mean trainable (largest phase of each task): {format_count(results.mean_trainable())}. "
        f"Added at model setup, before the first task: {format_count(results.zero_shot_added) or '-'}."
    )


def selector_table(results: RunResults) -> Table | None:
    """Return the task selection of the last evaluated row, or None before the first evaluation."""
    if not results.selection:
        return None
    last_row = results.selection[-1]
    after = results.task_names[len(results.selection) - 1]
    table = Table(title=plain(f"Task selection after {after} (selector {results.selector})"), title_justify="left")
    table.add_column("Task", no_wrap=True)
    table.add_column("Own task selected (%)", justify="right")
    table.add_column("Zero-shot fallback (%)", justify="right")

    for name in results.task_names:
        stats = last_row.get(name, {})
        table.add_row(plain(name), format_percent(stats.get("selected_correct")), format_percent(stats.get("fallback")))
    return table


def selector_note(results: RunResults) -> Text:
    mean = format_percent(results.mean_selection_accuracy()) or "-"
    return Text(f"Own task selected, mean over trained tasks: {mean}%. Blank: task not trained yet.")


def format_info_value(value: Any) -> str:
    """Format one ``task_info`` value: floats with 4 significant digits, also inside lists and tables."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(round_floats(value), separators=(", ", ": "), default=str)
    return str(value)


def round_floats(value: Any) -> Any:
    """Return ``value`` with every float inside rounded to 4 significant digits."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {key: round_floats(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_floats(item) for item in value]
    return value


def task_info_table(results: RunResults) -> Table:
    """Return training seconds and the facts strategies stored per task (``task_info``).

    Tables and lists of more than six entries (per-layer details) stay in results.json only.
    """
    table = Table(title="Per-task facts (per-layer details: results.json)", title_justify="left")
    table.add_column("Task", no_wrap=True)
    table.add_column("Train (s)", justify="right")
    table.add_column("Stored by the strategy", overflow="fold")

    for name in results.task_names:
        seconds = results.train_seconds.get(name)
        info = results.task_info.get(name, {})
        facts = "\n".join(
            f"{key}: {format_info_value(value)}"
            for key, value in info.items()
            if not (isinstance(value, (dict, list)) and len(value) > 6)
        )
        table.add_row(plain(name), "" if seconds is None else f"{seconds:.2f}", plain(facts))
    return table


def results_renderables(results: RunResults) -> list[RenderableType]:
    """Return every results table with its note, in print order. The selector table needs one evaluation."""
    header = Text(f"Strategy {results.strategy}, selector {results.selector}", style="bold")
    items: list[RenderableType] = [
        header,
        Group(*(item for item in (matrix_table(results), matrix_note(results)) if item is not None)),
        Group(metrics_table(results), summary_line(results)),
        Group(parameter_table(results), parameter_note(results)),
    ]
    selection = selector_table(results)
    if selection is not None:
        items.append(Group(selection, selector_note(results)))
    items.append(task_info_table(results))
    return items


def print_results(console: Console, results: RunResults) -> None:
    """Print every results table on ``console``, one blank line apart."""
    for item in results_renderables(results):
        console.print(item, soft_wrap=isinstance(item, Text))
        console.print()


def reference_table(results: RunResults | None = None) -> Table:
    """Return published MTIL Order-I results, with this run's numbers as the last row when given."""
    from .published import PUBLISHED_ORDER1

    table = Table(title="Published MTIL Order I, full shot (%)", title_justify="left")
    for column in ("Method", "Transfer", "Avg", "Last"):
        table.add_column(column, justify="left" if column == "Method" else "right")
    for method, values in PUBLISHED_ORDER1.items():
        table.add_row(method, *(f"{value:.1f}" for value in values))
    if results is not None:
        summary = results.summary()
        label = f"this run ({results.strategy})"
        table.add_row(plain(label, "bold"), *(format_percent(summary[key]) for key in ("transfer", "avg", "last")))
    return table


def imported_renderables(results: RunResults) -> list[RenderableType]:
    """Return the tables of an imported matrix, rounded per task as published tables are."""
    note = Text("Means of per-task values rounded to one decimal, as published MTIL tables compute them.")
    return [
        Text(f"Imported matrix {results.strategy}", style="bold"),
        matrix_table(results),
        Group(metrics_table(results, per_task_decimals=1), summary_line(results, per_task_decimals=1), note),
    ]
