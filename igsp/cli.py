"""The ``igsp`` command line: run recipes, resume and report runs, inspect plugins and hooks.

Every :class:`~igsp.exceptions.IgspError` ends the command with one red ``error: ...`` line on
stderr and exit code 2 (``--debug`` shows the traceback instead). Logs of the ``igsp`` logger go
to stderr through rich; tables go to stdout.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import platform
import shlex
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from . import __version__
from . import checkpoint as checkpoints
from .cli_progress import RichProgress
from .cli_tables import imported_renderables, print_results, reference_table
from .config import apply_overrides, find_recipe, list_recipes, load_recipe, resolve_settings, settings_to_dict
from .exceptions import ConfigError, IgspError
from .hookspecs import PROJECT, LoopSpec
from .plugins import BUILTIN_PLUGINS, RegistryEntry, get_registry, make_loop_manager
from .results import RESULTS_FILE, RunResults
from .settings import RunSettings

__all__ = ["app", "recipe_app", "main", "recipe_description", "to_toml", "loop_hook_names", "hook_call_order"]

logger = logging.getLogger(__name__)

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
HOOKIMPL_MARKER = f"{PROJECT}_impl"


# ---- state shared by one invocation ------------------------------------------------------------


def make_console(stderr: bool = False) -> Console:
    """Return a console; when output is not a terminal, wide enough for an 11-task matrix."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=max(console.width, 200))
    return console


@dataclass
class CliState:
    """Consoles and flags of the current invocation, set by the root callback."""

    out: Console = field(default_factory=make_console)
    err: Console = field(default_factory=lambda: make_console(stderr=True))
    debug: bool = False
    quiet: bool = False
    handler: RichHandler | None = None

    def set_log_level(self, level: int) -> None:
        logging.getLogger(PROJECT).setLevel(level)
        if self.handler is not None:
            self.handler.setLevel(level)


_state = CliState()


def state() -> CliState:
    return _state


def print_error(message: str) -> None:
    state().err.print(Text(f"error: {message}", style="red"), soft_wrap=True, highlight=False)


class IgspGroup(TyperGroup):
    """The root command group: turns igsp errors into one line and exit code 2."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except IgspError as error:
            if ctx.params.get("debug"):
                raise
            print_error(str(error))
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            if ctx.params.get("debug"):
                raise
            print_error("interrupted.")
            raise typer.Exit(EXIT_INTERRUPTED) from None


app = typer.Typer(
    cls=IgspGroup,
    name="igsp",
    help="Continual learning of CLIP models with mixture-of-experts low-rank layers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
recipe_app = typer.Typer(help="List, show and run recipes (TOML files of run settings).", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


def make_rich_handler(console: Console, level: int) -> RichHandler:
    handler = RichHandler(console=console, show_path=False, markup=False, log_time_format="[%X]")
    handler.setLevel(level)
    return handler


def install_logging(console: Console, level: int) -> tuple[RichHandler, Callable[[], None]]:
    """Send igsp's logs at ``level`` and other libraries' warnings to ``console``.

    Returns the igsp handler and a function that removes both handlers again.

    The root logger gets its own handler because open_clip logs through the root logger, and a
    root logger without handlers makes ``logging.info()`` call ``basicConfig()``, which would print
    every igsp record a second time. igsp's records therefore stop at the ``igsp`` logger.
    """
    package_logger = logging.getLogger(PROJECT)
    root_logger = logging.getLogger()
    previous = (package_logger.level, package_logger.propagate)
    package_handler = make_rich_handler(console, level)
    root_handler = make_rich_handler(console, logging.WARNING)

    package_logger.addHandler(package_handler)
    package_logger.setLevel(level)
    package_logger.propagate = False
    root_logger.addHandler(root_handler)

    def undo() -> None:
        package_logger.removeHandler(package_handler)
        root_logger.removeHandler(root_handler)
        package_logger.setLevel(previous[0])
        package_logger.propagate = previous[1]

    return package_handler, undo


@app.callback()
def root(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log DEBUG messages.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log only warnings and errors; draw no progress bars.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of igsp errors.")] = False,
) -> None:
    """Continual learning of CLIP models with mixture-of-experts low-rank layers."""
    global _state
    _state = CliState(debug=debug, quiet=quiet)
    level = logging.INFO
    if verbose:
        level = logging.DEBUG
    elif quiet:
        level = logging.WARNING
    _state.handler, undo = install_logging(_state.err, level)

    # The handlers go away when the command ends, so running the CLI in-process (tests,
    # notebooks) leaves logging as it was.
    ctx.call_on_close(undo)


# ---- recipes -----------------------------------------------------------------------------------


SetOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set",
        "-s",
        help="Override a recipe value as key=value, for example train.steps=50 or strategy=zeroshot; repeatable.",
    ),
]


def recipe_description(path: Path) -> str:
    """Return the recipe's ``description`` key, else the first comment line at the top of the file."""
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        return f"invalid TOML: {error}"

    description = data.get("description")
    if isinstance(description, str) and description.strip():
        return description.strip()
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        return stripped.lstrip("#").strip() if stripped.startswith("#") else ""
    return ""


def resolve_recipe(name: str, overrides: list[str] | None) -> RunSettings:
    """Load a recipe by name or path, apply ``key=value`` overrides and validate the result."""
    recipe = apply_overrides(load_recipe(name), overrides or [])
    return resolve_settings(recipe)


def build_plugin(kind: str, name: str, options: dict[str, Any]) -> Any:
    """Build a registered strategy or selector with its options, as the learner does."""
    entry = get_registry().get(kind, name)
    try:
        plugin = entry.factory(**options)
    except TypeError as error:
        raise ConfigError(f"Invalid options {options} for {kind} {name!r}: {error}.") from error
    if not getattr(plugin, "name", None):
        plugin.name = name
    return plugin


def check_names(settings: RunSettings) -> None:
    """Check that the strategy, selector and stream exist and that their plugins accept the options."""
    build_plugin("strategy", settings.strategy.name, settings.strategy.options)
    build_plugin("selector", settings.eval.selector, settings.eval.selector_options)
    get_registry().get("stream", settings.stream.name)


def toml_key(key: str) -> str:
    if key and all(character.isalnum() or character in "-_" for character in key):
        return key
    return json.dumps(key)


def toml_value(value: Any) -> str:
    """Format a value as TOML. Strings use JSON escapes, which TOML basic strings accept."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if value is None:
        raise ConfigError("TOML has no null value; remove the key or give it a value.")
    return json.dumps(str(value))


def to_toml(data: dict[str, Any]) -> str:
    """Format a recipe-shaped dict as TOML: top-level values first, then one table per section."""
    lines = [f"{toml_key(key)} = {toml_value(value)}" for key, value in data.items() if not isinstance(value, dict)]
    for section, table in data.items():
        if not isinstance(table, dict):
            continue
        lines += ["", f"[{toml_key(section)}]"]
        lines += [f"{toml_key(key)} = {toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


@recipe_app.command("list")
def recipe_list() -> None:
    """List the recipes found in $IGSP_RECIPE_PATH, ./recipes and the installed package."""
    recipes = list_recipes()
    if not recipes:
        print_error("no recipes found; add .toml files to ./recipes or set IGSP_RECIPE_PATH.")
        raise typer.Exit(EXIT_ERROR)

    table = Table(title="Recipes", title_justify="left")
    table.add_column("Name", no_wrap=True, style="bold")
    table.add_column("File", overflow="fold")
    table.add_column("Description", overflow="fold")
    for name, path in recipes.items():
        table.add_row(Text(name), Text(str(path)), Text(recipe_description(path)))
    state().out.print(table)


@recipe_app.command("show")
def recipe_show(
    name: Annotated[str, typer.Argument(help="Recipe name (see `igsp recipe list`) or path to a .toml file.")],
    overrides: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of TOML.")] = False,
) -> None:
    """Print the resolved recipe after `extends` and overrides, with every default filled in."""
    settings = resolve_recipe(name, overrides)
    check_names(settings)
    data = settings_to_dict(settings)
    if as_json:
        state().out.print(json.dumps(data, indent=2), markup=False, highlight=False, soft_wrap=True)
        return

    header = f"# Recipe {name} ({find_recipe(name)})"
    if overrides:
        header += " with " + " ".join(overrides)
    state().out.print(header + "\n" + to_toml(data), markup=False, highlight=False, soft_wrap=True, end="")


def progress_enabled(quiet: bool) -> bool:
    """Return whether to draw bars: only when stdout and stderr are both terminals, so piping either hides them."""
    current = state()
    return not (quiet or current.quiet) and current.out.is_terminal and current.err.is_terminal


def run_with_progress(run: Callable[[list[Any]], RunResults], run_dir: Path, quiet: bool) -> RunResults:
    """Run ``run(callbacks)`` with progress bars. On Ctrl-C, print how to resume and exit with 130."""
    if quiet:
        state().set_log_level(logging.WARNING)
    progress = RichProgress(state().err, enabled=progress_enabled(quiet))
    try:
        return run([progress])
    except KeyboardInterrupt:
        progress.close()
        report_interrupt(run_dir)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        progress.close()


def report_interrupt(run_dir: Path) -> None:
    if (run_dir / checkpoints.FILENAME).is_file():
        message = (
            f"Interrupted. The run folder {run_dir} keeps every finished task; "
            f"continue with: igsp resume {shlex.quote(str(run_dir))}"
        )
    else:
        message = f"Interrupted before the first task finished, so {run_dir} has no checkpoint; run the recipe again."
    state().err.print(Text(message, style="yellow"), soft_wrap=True, highlight=False)


def print_run_end(results: RunResults, run_dir: Path) -> None:
    from .distributed import is_main

    if not is_main():
        return
    out = state().out
    print_results(out, results)
    done, total = results.rows_done, len(results.task_names)
    if done < total:
        out.print(
            Text(f"The run stopped after {done} of {total} tasks; continue with: igsp resume {shlex.quote(str(run_dir))}", style="yellow"),
            soft_wrap=True,
        )
    out.print(Text(f"Run folder: {run_dir}"), soft_wrap=True, highlight=False)


def check_out_dir(run_dir: Path, overwrite: bool) -> None:
    existing = [name for name in (checkpoints.FILENAME, RESULTS_FILE) if (run_dir / name).exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"The run folder {str(run_dir)!r} already contains {existing}; choose another --out, "
            f"continue that run with `igsp resume {run_dir}`, or pass --overwrite."
        )


@recipe_app.command("run")
def recipe_run(
    name: Annotated[str, typer.Argument(help="Recipe name (see `igsp recipe list`) or path to a .toml file.")],
    overrides: SetOption = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Run folder; default: the recipe's `out`, else runs/<name>-<strategy>-<time>.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log only warnings and errors; draw no progress bars.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Reuse a run folder that already contains a run.")] = False,
) -> None:
    """Run a recipe on the whole task stream and print the accuracy matrix and metrics."""
    from .runner import default_out_dir, run_settings

    settings = resolve_recipe(name, overrides)
    run_dir = out if out is not None else default_out_dir(settings)
    check_out_dir(run_dir, overwrite)
    results = run_with_progress(lambda callbacks: run_settings(settings, run_dir, callbacks), run_dir, quiet)
    print_run_end(results, run_dir)


# ---- finished and partial runs -----------------------------------------------------------------


RunDirArgument = Annotated[Path, typer.Argument(help="Run folder written by `igsp recipe run`.")]


def read_results(run_dir: Path) -> RunResults:
    """Read a run folder's results, with an igsp error naming the folder when that fails."""
    if not run_dir.is_dir():
        raise ConfigError(f"Run folder {str(run_dir)!r} does not exist; pass the folder that `igsp recipe run` printed.")
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        raise ConfigError(
            f"No {RESULTS_FILE} in {str(run_dir)!r}: it is not a run folder, or its run stopped before the "
            f"first task finished. Pass the folder that `igsp recipe run` printed."
        )
    try:
        return RunResults.read(run_dir)
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{str(path)!r} cannot be read ({error!r}); it is corrupt or was not written by igsp.") from error


@app.command()
def resume(
    run_dir: RunDirArgument,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log only warnings and errors; draw no progress bars.")] = False,
) -> None:
    """Continue a run from its checkpoint with the next unfinished task, using the run's saved recipe."""
    from .runner import resume_run

    if not run_dir.is_dir():
        raise ConfigError(f"Run folder {str(run_dir)!r} does not exist; pass the folder that `igsp recipe run` printed.")
    if (run_dir / RESULTS_FILE).is_file():
        done = read_results(run_dir)
        if done.rows_done == len(done.task_names):
            state().out.print(Text(f"All {done.rows_done} tasks of {run_dir} are finished; nothing to resume."), soft_wrap=True)
            print_run_end(done, run_dir)
            return

    results = run_with_progress(lambda callbacks: resume_run(run_dir, callbacks), run_dir, quiet)
    print_run_end(results, run_dir)


@app.command()
def report(
    run_dir: Annotated[Optional[Path], typer.Argument(help="Run folder written by `igsp recipe run`.")] = None,
    import_file: Annotated[
        Optional[Path],
        typer.Option("--import", help="A published accuracy matrix (CSV or .npy, 11 x 11 or 11 x 12) to report instead of a run."),
    ] = None,
    drop_column: Annotated[int, typer.Option(help="Column dropped from an 11 x 12 matrix (CIFAR10 is column 2 in Order I).")] = 2,
    reference: Annotated[bool, typer.Option("--reference", help="Also show the published Order-I results of earlier methods.")] = False,
) -> None:
    """Print the tables of a finished or partial run, or of an imported published matrix."""
    if import_file is not None:
        report_import(import_file, drop_column)
        return
    if run_dir is None:
        raise ConfigError("Pass a run folder, or --import FILE for a published matrix.")
    results = read_results(run_dir)
    print_results(state().out, results)
    if reference:
        state().out.print(reference_table(results))
    done, total = results.rows_done, len(results.task_names)
    if done < total:
        state().out.print(
            Text(f"Continue the run with: igsp resume {shlex.quote(str(run_dir))}", style="yellow"),
            soft_wrap=True,
        )


def report_import(path: Path, drop_column: int) -> None:
    """Print the metrics of a published matrix; 11-task matrices get the MTIL Order-I task names."""
    from .data.mtil import MTIL_ORDER_1
    from .published import import_matrix

    matrix = import_matrix(path, drop_column)
    size = matrix.shape[0]
    names = list(MTIL_ORDER_1) if size == len(MTIL_ORDER_1) else [f"task {i + 1}" for i in range(size)]
    results = RunResults.empty(names, path.name, "-")
    results.matrix = matrix.tolist()
    for item in imported_renderables(results):
        state().out.print(item, soft_wrap=isinstance(item, Text))
        state().out.print()


# ---- plugins and hooks -------------------------------------------------------------------------


def loop_hook_names() -> list[str]:
    """Return the loop hook names in the order LoopSpec lists them (their firing order)."""
    return [name for name, value in vars(LoopSpec).items() if name.startswith(f"{PROJECT}_") and callable(value)]


def implemented_hooks(entry: RegistryEntry) -> str:
    """Return the loop hooks that a registered component implements, comma-separated."""
    target: Any = entry.factory
    if not isinstance(target, type):
        try:
            target = entry.factory()
        except (IgspError, TypeError, ValueError) as error:
            return f"(cannot be built without options: {error})"
    names = [name for name in loop_hook_names() if getattr(getattr(target, name, None), HOOKIMPL_MARKER, None) is not None]
    prefix = f"{PROJECT}_"
    return ", ".join(name.removeprefix(prefix) for name in names) or "(none)"


def provider(entry: RegistryEntry, distributions: dict[str, str]) -> str:
    """Return the plugin that registered ``entry`` and the distribution that installed it."""
    if entry.plugin in distributions:
        return f"{entry.plugin} ({distributions[entry.plugin]})"
    if entry.plugin in BUILTIN_PLUGINS:
        return f"built in (igsp {__version__})"
    return entry.plugin


@app.command()
def plugins() -> None:
    """List the installed strategies, selectors and streams, the plugin behind each and its hooks."""
    registry = get_registry()
    out = state().out
    for title, table_entries, show_hooks in (
        ("Strategies", registry.strategies, True),
        ("Selectors", registry.selectors, True),
        ("Streams", registry.streams, False),
    ):
        table = Table(title=title, title_justify="left")
        table.add_column("Name", no_wrap=True, style="bold")
        table.add_column("Description", overflow="fold")
        table.add_column("Plugin (distribution)", overflow="fold")
        if show_hooks:
            table.add_column(f"Loop hooks ({PROJECT}_...)", overflow="fold")
        for name in sorted(table_entries):
            entry = table_entries[name]
            row = [name, entry.description, provider(entry, registry.distributions)]
            if show_hooks:
                row.append(implemented_hooks(entry))
            table.add_row(*(Text(cell) for cell in row))
        out.print(table)
        out.print()

    if registry.distributions:
        out.print(Text("Installed plugin packages: " + ", ".join(
            f"{plugin} ({distribution})" for plugin, distribution in sorted(registry.distributions.items())
        )), soft_wrap=True)


def hook_call_order(strategy: Any, selector: Any) -> list[tuple[str, bool, list[str]]]:
    """Return, per loop hook in firing order, whether it is firstresult and its plugins in call order.

    The plugin manager is the learner's: defaults first, then the selector, then the strategy, so
    pluggy calls the strategy first and the defaults last. Callbacks, registered after the strategy,
    would run before it.
    """
    from .training import DefaultLoop

    manager = make_loop_manager([("defaults", DefaultLoop()), ("selector", selector), ("strategy", strategy)])
    labels = {"defaults": "defaults", "selector": f"selector ({selector.name})", "strategy": f"strategy ({strategy.name})"}
    order = []
    for name in loop_hook_names():
        caller = getattr(manager.hook, name)
        firstresult = bool(caller.spec.opts.get("firstresult")) if caller.spec else False
        implementations = []
        for implementation in reversed(caller.get_hookimpls()):
            label = labels.get(implementation.plugin_name, implementation.plugin_name)
            flags = [flag for flag in ("tryfirst", "trylast", "wrapper", "hookwrapper") if getattr(implementation, flag, False)]
            implementations.append(f"{label} [{', '.join(flags)}]" if flags else label)
        order.append((name, firstresult, implementations))
    return order


@app.command()
def hooks(
    strategy: Annotated[Optional[str], typer.Option(help="Strategy name; default: the recipe's, else finetune.")] = None,
    selector: Annotated[Optional[str], typer.Option(help="Selector name; default: the recipe's, else prototype.")] = None,
    recipe: Annotated[Optional[str], typer.Option(help="Take the strategy, selector and their options from this recipe.")] = None,
) -> None:
    """Show the loop hooks in firing order and the implementations each would call, in call order."""
    settings = resolve_recipe(recipe, None) if recipe else RunSettings()
    strategy_options = settings.strategy.options if strategy in (None, settings.strategy.name) else {}
    selector_options = settings.eval.selector_options if selector in (None, settings.eval.selector) else {}
    strategy_object = build_plugin("strategy", strategy or settings.strategy.name, strategy_options)
    selector_object = build_plugin("selector", selector or settings.eval.selector, selector_options)

    title = f"Loop hooks for strategy {strategy_object.name}, selector {selector_object.name}"
    table = Table(title=Text(title), title_justify="left")
    table.add_column("Hook (firing order)", no_wrap=True, style="bold")
    table.add_column("Kind", no_wrap=True)
    table.add_column("Implementations (call order)", overflow="fold")
    for name, firstresult, implementations in hook_call_order(strategy_object, selector_object):
        kind = "firstresult" if firstresult else "all"
        table.add_row(name, kind, Text(", ".join(implementations) or "-"))
    out = state().out
    out.print(table)
    out.print(
        Text(
            "firstresult: the first implementation that returns a value other than None wins. "
            "Callbacks (progress bars, loggers) are registered after the strategy and run before it.",
        ),
        soft_wrap=True,
    )


@app.command()
def version() -> None:
    """Print the versions of igsp, Python and the main libraries."""
    out = state().out
    out.print(f"igsp {__version__}", highlight=False)
    out.print(f"python {platform.python_version()}", highlight=False)
    for package in ("torch", "open_clip_torch", "timm", "pluggy", "typer", "rich"):
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            installed = "not installed"
        out.print(f"{package} {installed}", highlight=False)


# ---- commands of other modules -----------------------------------------------------------------


def import_optional(module_name: str) -> Any | None:
    """Import a module of optional commands, or return None when the module itself does not exist."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return None
        raise


def add_unavailable(name: str, error: Exception) -> None:
    """Register a command that explains why the commands of ``name`` could not be imported."""
    message = f"`igsp {name}` is unavailable because its module failed to import: {error!r}"

    @app.command(name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, help=message)
    def unavailable() -> None:
        raise IgspError(message)


def mount_optional_commands() -> None:
    """Add ``igsp data``, ``igsp backbone`` and ``igsp compare`` when their modules exist."""
    for name, module_name, attribute in (
        ("data", "igsp.cli_data", "app"),
        ("backbone", "igsp.cli_backbone", "app"),
        ("compare", "igsp.cli_compare", "compare"),
    ):
        try:
            module = import_optional(module_name)
        except ImportError as error:
            add_unavailable(name, error)
            continue
        if module is None or not hasattr(module, attribute):
            continue
        if attribute == "app":
            app.add_typer(getattr(module, attribute), name=name)
        else:
            app.command(name)(getattr(module, attribute))


mount_optional_commands()


def main() -> None:
    """Run the ``igsp`` command line (the console script)."""
    app(prog_name="igsp")
