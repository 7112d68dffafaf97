"""``igsp data``: commands that inspect benchmark data on disk."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from igsp.data.mtil import check_mtil_root
from igsp.data.mtil_check import FOUND, MISSING, DatasetCheck
from igsp.exceptions import ConfigError

__all__ = ["app"]

app = typer.Typer(help="Inspect benchmark data on disk.", no_args_is_help=True)

_STATUS_STYLE = {FOUND: "green", MISSING: "red"}


class Layout(str, Enum):
    """Folder layouts that the MTIL readers accept."""

    zscl = "zscl"
    coop = "coop"


@app.callback()
def data() -> None:
    """Inspect benchmark data on disk."""


def _count(count: int | None, expected: int) -> str:
    text = "-" if count is None else f"{count:,}"
    return f"{text} / {expected:,}"


def _remark(check: DatasetCheck) -> str:
    """Return a short table note; the full problems and fix are printed below the table."""
    if not check.ok:
        return "see the fix below"
    remarks = []
    if check.train_count < check.expected.train or check.test_count < check.expected.test:
        remarks.append("subset")
    if check.train_count > check.expected.train or check.test_count > check.expected.test:
        remarks.append("more images than the full dataset")
    if check.classes_with_images < check.num_classes:
        remarks.append(f"{check.classes_with_images} classes have images")
    return ", ".join(remarks)


def _build_table(checks: list[DatasetCheck]) -> Table:
    table = Table(title="MTIL data check", caption="counts: read / full dataset", show_lines=True)
    table.add_column("Dataset", no_wrap=True)
    table.add_column("Status", no_wrap=True)
    table.add_column("Train", justify="right")
    table.add_column("Test", justify="right")
    table.add_column("Classes", justify="right")
    table.add_column("Notes", overflow="fold")
    for check in checks:
        style = _STATUS_STYLE.get(check.status, "yellow")
        table.add_row(
            check.name,
            f"[{style}]{check.status}[/{style}]",
            _count(check.train_count, check.expected.train),
            _count(check.test_count, check.expected.test),
            _count(check.num_classes, check.expected.classes),
            _remark(check),
        )
    return table


@app.command()
def check(
    root: Annotated[Path, typer.Argument(help="Data root that contains the dataset folders.")],
    layout: Annotated[
        Layout,
        typer.Option(help="Folder layout: zscl (torchvision folders) or coop (CoOp split files)."),
    ] = Layout.zscl,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated task names to check, e.g. Aircraft,DTD. Default: all 11."
        ),
    ] = None,
) -> None:
    """Check the MTIL datasets under ROOT; exit with code 1 if any is missing or incomplete."""
    console = Console()
    try:
        checks = check_mtil_root(root, layout=layout.value, tasks=tasks)
    except ConfigError as error:
        console.print(f"[red]error:[/red] {error}", soft_wrap=True)
        raise typer.Exit(2) from None

    console.print(_build_table(checks))
    if not root.is_dir():
        console.print(f"[red]The data root {root} does not exist.[/red]", soft_wrap=True)
    failed = [check for check in checks if not check.ok]
    for check in failed:
        console.print(check.describe(), soft_wrap=True, markup=False)
    if failed:
        console.print(
            f"[red]{len(failed)} of {len(checks)} datasets are missing or incomplete.[/red]"
        )
        raise typer.Exit(1)
    console.print(f"[green]All {len(checks)} datasets found under {root}.[/green]", soft_wrap=True)
