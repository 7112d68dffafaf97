"""``igsp compare``: run several strategies on one recipe and print the comparison table."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .cli_progress import RichProgress
from .compare import (
    DEFAULT_STRATEGIES,
    FAILED,
    FIGURE_FILE,
    FINISHED,
    PARTIAL,
    PROCESS_MEMORY,
    SUMMARY_FILE,
    TABLE_FILE,
    Comparison,
    ComparisonPlan,
    StrategyResult,
    comparison_settings,
    load_plan,
    parse_strategy_list,
    run_comparison,
)
from .exceptions import ConfigError
from .hookspecs import PROJECT

__all__ = ["compare", "comparison_tables", "result_line"]

EXIT_STRATEGY_FAILED = 1
STATUS_STYLE = {FINISHED: "green", FAILED: "red"}


def compare(
    recipe: Annotated[
        Optional[str], typer.Argument(help="Recipe name (see `igsp recipe list`) or .toml path; optional with --from.")
    ] = None,
    strategies: Annotated[
        Optional[str],
        typer.Option(
            "--strategies",
            help="Comma-separated strategy names; default: the --from file's list, else " + ",".join(DEFAULT_STRATEGIES) + ".",
        ),
    ] = None,
    overrides: Annotated[
        Optional[list[str]],
        typer.Option("--set", "-s", help="Override a recipe value for every strategy as key=value, e.g. train.steps=50; repeatable."),
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Comparison folder; default: runs/compare-<recipe>-<time>.")
    ] = None,
    plan_file: Annotated[
        Optional[Path],
        typer.Option("--from", help="Comparison file with recipe, strategies, set and options (see recipes/compare/)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log only warnings and errors; draw no progress bars.")] = False,
) -> None:
    """Run several strategies with the same recipe, seed and budget, and print the comparison tables."""
    plan = load_plan(plan_file) if plan_file is not None else None
    settings = comparison_settings(_recipe_name(recipe, plan), (plan.overrides if plan else []) + list(overrides or []))
    names = _strategy_names(strategies, plan)
    options = {name: table for name, table in (plan.options if plan else {}).items() if name in names}
    out_dir = out if out is not None else Path("runs") / f"compare-{settings.name}-{time.strftime('%Y%m%d-%H%M%S')}"

    console, err = Console(), Console(stderr=True)
    if quiet:
        logging.getLogger(PROJECT).setLevel(logging.WARNING)
    progress = RichProgress(err, enabled=not quiet and console.is_terminal and err.is_terminal)
    started = time.perf_counter()
    try:
        comparison = run_comparison(
            settings,
            names,
            out_dir,
            callbacks=[progress],
            options=options,
            on_result=None if quiet else lambda result: err.print(result_line(result), soft_wrap=True),
        )
    finally:
        progress.close()

    for table in comparison_tables(comparison):
        console.print(table)
    console.print(Text(comparison_note(comparison, time.perf_counter() - started)), soft_wrap=True, highlight=False)
    failed = [result.strategy for result in comparison.results if result.status == FAILED]
    if failed:
        err.print(Text(f"Failed strategies: {', '.join(failed)}; their errors are in {out_dir / SUMMARY_FILE}.", style="red"),
                  soft_wrap=True)
        raise typer.Exit(EXIT_STRATEGY_FAILED)


def _recipe_name(recipe: str | None, plan: ComparisonPlan | None) -> str:
    """Return the recipe argument, else the comparison file's recipe."""
    if recipe:
        return recipe
    if plan is not None:
        return plan.recipe
    raise ConfigError("Pass a recipe name or path, or a comparison file with --from.")


def _strategy_names(strategies: str | None, plan: ComparisonPlan | None) -> list[str]:
    """Return the --strategies list, else the comparison file's list, else the default list."""
    if strategies:
        return parse_strategy_list(strategies)
    if plan is not None:
        return list(plan.strategies)
    return list(DEFAULT_STRATEGIES)


def result_line(result: StrategyResult) -> Text:
    """Return the one-line status printed when a strategy's run ends."""
    style = STATUS_STYLE.get(result.status, "yellow")
    line = Text(f"{result.strategy}: {result.status}", style=style)
    line.append(f" after {result.tasks_done} tasks in {result.wall_seconds:.0f} s", style="default")
    if result.error:
        line.append(f" ({result.error})", style="red")
    return line


def _number(value: float | int | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, int) or digits == 0:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _new_table(title: str, comparison: Comparison, headers: tuple[str, ...], caption: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", caption=caption)
    longest = max((len(result.strategy) for result in comparison.results), default=8)
    table.add_column("Strategy", no_wrap=True, min_width=longest)
    for header in headers:
        justify = "left" if header == "Status" else "right"
        table.add_column(header, justify=justify, no_wrap=True, min_width=len(PARTIAL) if header == "Status" else None)
    return table


def comparison_tables(comparison: Comparison) -> list[Table]:
    """Return two rich tables of a comparison, accuracy and cost, each with one row per strategy.

    Two narrow tables fit an 80-column terminal, where one table of every column would cut numbers.
    """
    accuracy = _new_table(
        f"Accuracy on {comparison.recipe} ({len(comparison.task_names)} tasks, percent)",
        comparison,
        ("Status", "Transfer", "Avg", "Last", "BWT", "Selector"),
    )
    kinds = sorted({result.memory_kind for result in comparison.results if result.memory_kind})
    cost = _new_table(
        "Parameters, time and memory",
        comparison,
        ("Trainable", "Added", "Train s", "Img/s", "Peak MiB"),
        caption=f"Trainable: mean over tasks. Added: after the last task. Peak MiB: {', '.join(kinds) or 'not measured'}.",
    )
    for result in comparison.results:
        style = STATUS_STYLE.get(result.status, "yellow")
        status = f"[{style}]{result.status}[/{style}]"
        accuracy.add_row(
            result.strategy,
            status,
            _number(result.transfer),
            _number(result.avg),
            _number(result.last),
            _number(result.bwt),
            _number(result.selector_accuracy),
        )
        cost.add_row(
            result.strategy,
            _number(result.mean_trainable, 0),
            _number(result.total_added, 0),
            _number(result.train_seconds),
            _number(result.images_per_second, 0),
            _number(result.peak_memory_mib, 0),
        )
    return [accuracy, cost]


def comparison_note(comparison: Comparison, seconds: float) -> str:
    """Return the lines printed under the table: wall time, files and what the memory column means."""
    files = ", ".join(name for name in (TABLE_FILE, SUMMARY_FILE, FIGURE_FILE) if (comparison.out_dir / name).is_file())
    lines = [f"Wall time {seconds:.0f} s. Comparison folder: {comparison.out_dir} ({files}); one run folder per strategy."]
    if any(result.memory_kind == PROCESS_MEMORY for result in comparison.results):
        lines.append("On the CPU, peak memory is the whole process's peak RSS so far, so it never decreases down the table.")
    return "\n".join(lines)
