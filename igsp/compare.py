"""Run several strategies on one recipe and compare them in one table and one figure.

Every strategy runs with the same seed, stream, backbone, budget and selector, each into its own
run folder ``<out_dir>/<strategy>/``. The comparison then writes ``comparison.csv``,
``comparison.json`` and, when matplotlib is installed, ``comparison.png`` into ``out_dir``. A
strategy that fails is recorded with its error and the others still run; the tasks it finished
stay in its run folder.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import resource
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .config import apply_overrides, load_recipe, resolve_settings, settings_to_dict
from .exceptions import ConfigError
from .results import RESULTS_FILE, RunResults, write_text_atomic
from .settings import RunSettings, StrategySettings

__all__ = [
    "DEFAULT_STRATEGIES",
    "TABLE_FILE",
    "SUMMARY_FILE",
    "FIGURE_FILE",
    "COLUMNS",
    "FINISHED",
    "PARTIAL",
    "FAILED",
    "CUDA_MEMORY",
    "PROCESS_MEMORY",
    "StrategyResult",
    "Comparison",
    "ComparisonPlan",
    "load_plan",
    "parse_strategy_list",
    "comparison_settings",
    "run_comparison",
    "summarise_run",
    "write_figure",
]

logger = logging.getLogger(__name__)

DEFAULT_STRATEGIES = ("zeroshot", "finetune", "lora-per-task", "similarity-moe", "moe-adapters")
TABLE_FILE = "comparison.csv"
SUMMARY_FILE = "comparison.json"
FIGURE_FILE = "comparison.png"
FIGURE_COLUMNS = 4
FINISHED, PARTIAL, FAILED = "finished", "partial", "failed"
CUDA_MEMORY = "CUDA max allocated"
PROCESS_MEMORY = "process peak RSS"
PLAN_KEYS = {"recipe", "strategies", "set", "options", "description"}

# Column name and meaning, in table order; comparison.csv uses these names as its header.
COLUMNS = {
    "strategy": "registered strategy name",
    "status": "finished, partial (stopped without an error) or failed",
    "tasks_done": "tasks with a filled accuracy-matrix row",
    "transfer": "Transfer: mean accuracy on tasks before they were trained (percent)",
    "avg": "Avg: mean of all filled accuracy-matrix entries (percent)",
    "last": "Last: mean of the last filled row (percent)",
    "bwt": "backward transfer: mean final minus just-trained accuracy (percent points)",
    "mean_trainable": "mean over tasks of the trainable parameter count",
    "total_added": "added parameters after the last finished task, selector state included",
    "train_seconds": "sum over tasks of the training time the learner measured",
    "images_per_second": "training images per second: steps x batch size x trained tasks / train_seconds",
    "peak_memory_mib": "peak memory in MiB, of the kind named in memory_kind",
    "memory_kind": "CUDA max allocated (this strategy) or process peak RSS (whole process so far)",
    "selector_accuracy": "mean share of test images routed to their own task after the last task (percent)",
    "wall_seconds": "wall-clock time of the whole run, evaluation and loading included",
    "run_dir": "the strategy's run folder",
    "error": "the error that stopped a failed run",
}


@dataclass
class StrategyResult:
    """One strategy's row of the comparison, with its accuracy matrix."""

    strategy: str
    status: str
    run_dir: str
    tasks_done: int = 0
    transfer: float = math.nan
    avg: float = math.nan
    last: float = math.nan
    bwt: float = math.nan
    mean_trainable: float = math.nan
    total_added: int | None = None
    train_seconds: float = math.nan
    images_per_second: float = math.nan
    peak_memory_mib: float = math.nan
    memory_kind: str = ""
    selector_accuracy: float = math.nan
    wall_seconds: float = math.nan
    error: str = ""
    matrix: list[list[float]] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """Return the table columns of this result (no matrix)."""
        return {name: getattr(self, name) for name in COLUMNS}


@dataclass
class Comparison:
    """The results of every strategy of one comparison, in run order."""

    recipe: str
    task_names: list[str]
    results: list[StrategyResult]
    out_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        return [result.row() for result in self.results]

    def get(self, strategy: str) -> StrategyResult:
        for result in self.results:
            if result.strategy == strategy:
                return result
        raise KeyError(f"Strategy {strategy!r} is not in this comparison; it has {[r.strategy for r in self.results]}.")

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(
            {
                "recipe": self.recipe,
                "task_names": self.task_names,
                "columns": COLUMNS,
                "results": [asdict(result) for result in self.results],
                "settings": self.settings,
            }
        )

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in self.table():
            writer.writerow({key: _csv_value(value) for key, value in row.items()})
        return buffer.getvalue()

    def write(self) -> None:
        """Write the CSV table, the JSON summary and the figure into ``out_dir``."""
        write_text_atomic(self.out_dir / TABLE_FILE, self.to_csv())
        write_text_atomic(self.out_dir / SUMMARY_FILE, json.dumps(self.to_dict(), indent=1))
        write_figure(self, self.out_dir / FIGURE_FILE)


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else round(value, 3)
    return "" if value is None else value


def _json_safe(value: Any) -> Any:
    """Replace NaN with None so the JSON is standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


# ---- plans: a recipe plus the strategies to compare --------------------------------------------


@dataclass
class ComparisonPlan:
    """A comparison read from a TOML file: the recipe, the strategies, overrides and options.

    ``options`` maps a strategy name to its option table. A strategy without an entry gets the
    recipe's ``[strategy]`` options when it is the recipe's strategy, and no options otherwise.
    """

    recipe: str
    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_STRATEGIES))
    overrides: list[str] = field(default_factory=list)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""


def load_plan(path: str | Path) -> ComparisonPlan:
    """Read a comparison file with the keys ``recipe``, ``strategies``, ``set``, ``options``, ``description``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Comparison file {str(path)!r} does not exist; see recipes/compare/ for examples.")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"Comparison file {str(path)!r} is not valid TOML: {error}.") from error

    unknown = sorted(set(data) - PLAN_KEYS)
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in comparison file {str(path)!r}; valid keys: {sorted(PLAN_KEYS)}.")
    if not isinstance(data.get("recipe"), str) or not data["recipe"]:
        raise ConfigError(f"Comparison file {str(path)!r} needs `recipe = \"<recipe name or .toml path>\"`.")

    plan = ComparisonPlan(recipe=data["recipe"], description=str(data.get("description", "")))
    if "strategies" in data:
        plan.strategies = _string_list(data["strategies"], "strategies", path)
    if "set" in data:
        plan.overrides = _string_list(data["set"], "set", path)
    options = data.get("options", {})
    if not isinstance(options, dict) or not all(isinstance(table, dict) for table in options.values()):
        raise ConfigError(f"`options` in {str(path)!r} must contain one table per strategy, e.g. [options.similarity-moe].")
    plan.options = {name: dict(table) for name, table in options.items()}
    return plan


def _string_list(value: Any, key: str, path: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"`{key}` in {str(path)!r} must be a list of strings, got {value!r}.")
    return list(value)


def parse_strategy_list(text: str) -> list[str]:
    """Split a comma-separated strategy list, dropping blanks."""
    return [name.strip() for name in text.split(",") if name.strip()]


def comparison_settings(recipe: str, overrides: Sequence[str] = ()) -> RunSettings:
    """Load a recipe by name or path and apply ``key=value`` overrides shared by every strategy."""
    return resolve_settings(apply_overrides(load_recipe(recipe), overrides))


# ---- running -----------------------------------------------------------------------------------


def run_comparison(
    settings: RunSettings,
    strategies: Sequence[str],
    out_dir: str | Path,
    callbacks: Sequence[Any] = (),
    options: dict[str, dict[str, Any]] | None = None,
    on_result: Callable[[StrategyResult], None] | None = None,
) -> Comparison:
    """Run each strategy on ``settings`` into ``out_dir/<strategy>/`` and return the comparison.

    ``options`` maps strategy names to their option tables. ``callbacks`` are passed to every
    run; ``on_result`` is called with each strategy's row as soon as it is known. Unknown
    strategies and invalid options raise ConfigError before anything runs.
    """
    out_dir = Path(out_dir)
    names = list(strategies)
    strategy_options = _check_strategies(settings, names, options or {})
    _check_out_dir(out_dir, names)

    comparison = Comparison(settings.name, [], [], out_dir, settings_to_dict(settings))
    for name in names:
        result = _run_one(settings, name, strategy_options[name], out_dir / name, callbacks)
        comparison.results.append(result)
        if not comparison.task_names and result.matrix:
            comparison.task_names = _task_names(out_dir / name)
        comparison.write()
        if on_result is not None:
            on_result(result)
    return comparison


def _check_strategies(settings: RunSettings, names: list[str], options: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return each strategy's options after checking names, repeats and options."""
    from .plugins import get_registry

    if not names:
        raise ConfigError("No strategies to compare; pass a comma-separated list such as zeroshot,finetune.")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"Strategies {repeated} are listed twice; each strategy runs once per comparison.")
    extra = sorted(set(options) - set(names))
    if extra:
        raise ConfigError(f"Options are given for {extra}, which are not among the compared strategies {names}.")

    if settings.strategy.options and settings.strategy.name not in names:
        logger.warning(
            "The recipe's options %s for strategy %s are not used, because %s is not compared; "
            "pass per-strategy options in a comparison file's [options.<strategy>] table.",
            settings.strategy.options, settings.strategy.name, settings.strategy.name,
        )

    registry = get_registry()
    resolved = {}
    for name in names:
        entry = registry.get("strategy", name)
        if name in options:
            resolved[name] = dict(options[name])
        elif name == settings.strategy.name:
            resolved[name] = dict(settings.strategy.options)
        else:
            resolved[name] = {}
        try:
            entry.factory(**resolved[name])
        except TypeError as error:
            raise ConfigError(f"Invalid options {resolved[name]} for strategy {name!r}: {error}.") from error
    return resolved


def _check_out_dir(out_dir: Path, names: list[str]) -> None:
    used = [name for name in names if (out_dir / name).is_dir() and any((out_dir / name).iterdir())]
    if used:
        raise ConfigError(
            f"The comparison folder {str(out_dir)!r} already contains runs of {used}; choose another --out "
            "or delete those folders."
        )


def _task_names(run_dir: Path) -> list[str]:
    return RunResults.read(run_dir).task_names if (run_dir / RESULTS_FILE).is_file() else []


def _run_one(
    settings: RunSettings, name: str, options: dict[str, Any], run_dir: Path, callbacks: Sequence[Any]
) -> StrategyResult:
    """Run one strategy; an error is logged and recorded instead of raised."""
    from .learner import resolve_device
    from .runner import run_settings

    strategy_settings = copy.deepcopy(settings)
    strategy_settings.strategy = StrategySettings(name=name, options=dict(options))
    strategy_settings.out = ""
    device = resolve_device(settings.backbone.device)
    _reset_peak_memory(device)

    logger.info("Comparison: running strategy %s into %s.", name, run_dir)
    started = time.perf_counter()
    error = ""
    try:
        results: RunResults | None = run_settings(strategy_settings, run_dir, callbacks)
    except Exception as caught:  # noqa: BLE001 - a failing strategy must not stop the comparison
        logger.error("Strategy %s failed: %s: %s", name, type(caught).__name__, caught)
        logger.debug("Traceback of strategy %s's failure:", name, exc_info=True)
        error = f"{type(caught).__name__}: {caught}"
        results = RunResults.read(run_dir) if (run_dir / RESULTS_FILE).is_file() else None
    wall = time.perf_counter() - started

    memory, memory_kind = _peak_memory_mib(device)
    result = summarise_run(name, results, settings, run_dir, error)
    result.peak_memory_mib, result.memory_kind, result.wall_seconds = memory, memory_kind, wall
    return result


def summarise_run(name: str, results: RunResults | None, settings: RunSettings, run_dir: Path, error: str = "") -> StrategyResult:
    """Build a strategy's comparison row from its run results (None when it failed before task 1)."""
    if results is None:
        return StrategyResult(name, FAILED, str(run_dir), error=error)

    summary = results.summary()
    train_seconds = float(sum(results.train_seconds.values()))
    if error:
        status = FAILED
    elif results.finished:
        status = FINISHED
    else:
        status = PARTIAL
    return StrategyResult(
        strategy=name,
        status=status,
        run_dir=str(run_dir),
        tasks_done=results.rows_done,
        transfer=summary["transfer"],
        avg=summary["avg"],
        last=summary["last"],
        bwt=summary["bwt"],
        mean_trainable=results.mean_trainable(),
        total_added=results.final_total_added() if results.total_added else None,
        train_seconds=train_seconds,
        images_per_second=_images_per_second(results, settings, train_seconds),
        selector_accuracy=results.mean_selection_accuracy(),
        error=error,
        matrix=[list(row) for row in results.matrix],
    )


def _images_per_second(results: RunResults, settings: RunSettings, train_seconds: float) -> float:
    """Return trained images per second; NaN when no task trained any parameter (zero-shot)."""
    trained_tasks = {record["task"] for record in results.trainable if record["trainable"] > 0}
    images = settings.train.steps * settings.train.batch_size * len(trained_tasks)
    if images == 0 or train_seconds <= 0:
        return math.nan
    return images / train_seconds


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mib(device: torch.device) -> tuple[float, str]:
    """Return the peak memory in MiB and its kind.

    On CUDA it is this strategy's maximum allocated memory. On the CPU the operating system only
    reports the whole process's peak resident set size, which never decreases, so a later
    strategy shows at least an earlier one's value.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, CUDA_MEMORY
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in bytes on macOS and in KiB on Linux.
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024
    return peak_bytes / 2**20, PROCESS_MEMORY


# ---- figure ------------------------------------------------------------------------------------


def write_figure(comparison: Comparison, path: Path) -> Path | None:
    """Draw each strategy's accuracy matrix and a scatter of Last against total added parameters.

    Returns the file written, or None when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("matplotlib is not installed, so no %s is drawn; `pip install matplotlib` adds it.", path.name)
        return None

    drawn = [result for result in comparison.results if result.matrix]
    panels = len(drawn) + 1
    columns = min(FIGURE_COLUMNS, panels)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(3.8 * columns, 3.6 * rows), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).flat)
    for ax, result in zip(axes, drawn):
        _draw_matrix(ax, result, comparison.task_names)
    _draw_scatter(axes[len(drawn)], comparison.results)
    for ax in axes[panels:]:
        ax.set_axis_off()
    FigureCanvasAgg(figure)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=110)
    temporary.replace(path)
    return path


def _draw_matrix(ax: Any, result: StrategyResult, task_names: list[str]) -> None:
    image = ax.imshow(result.matrix, vmin=0, vmax=100, cmap="viridis")
    size = len(result.matrix)
    labels = task_names if len(task_names) == size else [str(i + 1) for i in range(size)]
    ax.set_xticks(range(size), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(size), labels, fontsize=7)
    ax.set_xlabel("evaluated task", fontsize=8)
    ax.set_ylabel("after training task", fontsize=8)
    title = f"{result.strategy}\nLast {result.last:.1f}" if not math.isnan(result.last) else result.strategy
    ax.set_title(title if result.status == FINISHED else f"{title} ({result.status})", fontsize=9)
    if size <= 12:
        for row in range(size):
            for column in range(size):
                value = result.matrix[row][column]
                if not math.isnan(value):
                    ax.text(column, row, f"{value:.0f}", ha="center", va="center", fontsize=6, color="white")
    ax.figure.colorbar(image, ax=ax, shrink=0.7)


def _draw_scatter(ax: Any, results: list[StrategyResult]) -> None:
    points = [r for r in results if r.total_added is not None and not math.isnan(r.last)]
    for result in points:
        ax.scatter(result.total_added, result.last, s=30)
        ax.annotate(result.strategy, (result.total_added, result.last), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    if points and min(r.total_added for r in points) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("total added parameters", fontsize=8)
    ax.set_ylabel("Last (%)", fontsize=8)
    ax.set_title("Last against added parameters", fontsize=9)
    ax.grid(alpha=0.3)
