"""``igsp backbone``: build the named backbones that need a one-off offline step, and list backbones."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from igsp.exceptions import BackboneError, IgspError

__all__ = ["app", "zero_shot_renderable", "build_summary"]

logger = logging.getLogger(__name__)

app = typer.Typer(help="Build and list backbones.", no_args_is_help=True)


@app.callback()
def backbone() -> None:
    """Build and list backbones."""


def zero_shot_renderable(rows: list[dict[str, Any]], title: str = "Zero-shot accuracy (%)") -> Table:
    """Return a rich table of zero-shot results (dicts with task, classes, images, accuracy, chance)."""
    table = Table(title=title)
    table.add_column("Task", no_wrap=True)
    table.add_column("Classes", justify="right")
    table.add_column("Test images", justify="right")
    table.add_column("Zero-shot", justify="right")
    table.add_column("Chance", justify="right")
    for row in rows:
        style = "green" if row["accuracy"] > row["chance"] else "red"
        table.add_row(
            row["task"],
            str(row["classes"]),
            str(row["images"]),
            f"[{style}]{row['accuracy']:.2f}[/{style}]",
            f"{row['chance']:.2f}",
        )
    if rows:
        mean_accuracy = sum(row["accuracy"] for row in rows) / len(rows)
        mean_chance = sum(row["chance"] for row in rows) / len(rows)
        table.add_row("mean", "", "", f"{mean_accuracy:.2f}", f"{mean_chance:.2f}", end_section=True)
    return table


def build_summary(record: Any) -> Table:
    """Return a rich table of a build record: corpus, training, validation and timings."""
    table = Table(title=f"{record.name} build", show_header=False)
    table.add_column("Item", no_wrap=True)
    table.add_column("Value")
    table.add_row("heads file", record.heads_path)
    table.add_row("corpus", ", ".join(f"{key} {value:,}" for key, value in record.corpus.items()))
    settings = record.settings
    table.add_row(
        "training",
        f"{settings['steps']} steps, batch {settings['batch_size']}, lr {settings['learning_rate']}, seed {settings['seed']}",
    )
    table.add_row("final training loss", f"{record.final_loss:.4f}")
    if record.validation:
        validation = record.validation
        table.add_row(
            "held-out corpus",
            f"loss {validation['loss']:.4f}, image-to-caption recall@1 {validation['recall_at_1']:.1f}%, "
            f"recall@5 {validation['recall_at_5']:.1f}% ({validation['images']} images)",
        )
    seconds = record.seconds
    cached = " (tower features from cache)" if record.features_cached else ""
    table.add_row(
        "time",
        f"{seconds['total']:.0f} s: features {seconds['features']:.0f} s{cached}, training {seconds['training']:.0f} s",
    )
    return table


def _zero_shot(name: str, cache_dir: Optional[Path], test_per_class: int) -> list[dict[str, Any]]:
    """Return the zero-shot rows of the freshly built backbone on the offline ``mtil-lite`` stream."""
    from igsp.backbone import load_backbone
    from igsp.backbones.zeroshot import zero_shot_table
    from igsp.data.offline import build_mtil_lite

    stream = build_mtil_lite(train_per_class=1, test_per_class=test_per_class)
    backbone = load_backbone(name, cache_dir=str(cache_dir) if cache_dir else None)
    return [result.to_dict() for result in zero_shot_table(backbone, stream, workers=1)]


@app.command()
def build(
    name: Annotated[str, typer.Argument(help="Backbone to build, e.g. igsp-lite.")],
    cache_dir: Annotated[
        Optional[Path],
        typer.Option(help="Cache folder; the files go to CACHE_DIR/NAME/. Default: ~/.cache/igsp/backbones."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if the heads file exists.")] = False,
    zero_shot: Annotated[
        bool, typer.Option(help="Measure zero-shot accuracy on the offline mtil-lite stream afterwards.")
    ] = True,
    test_per_class: Annotated[int, typer.Option(min=1, help="Test images per class for the zero-shot table.")] = 40,
) -> None:
    """Build a backbone's trained parts once, offline (igsp-lite: align its projection heads)."""
    from igsp.backbones import BUILDERS
    from igsp.backbones.align import write_record
    from igsp.backbones.lite import record_path

    if name not in BUILDERS:
        raise BackboneError(
            f"Backbone {name!r} has no build step; buildable backbones: {sorted(BUILDERS)}. "
            "open_clip architectures load directly with their pretrained tag or a checkpoint path."
        )
    console = Console()
    record = BUILDERS[name].build(cache_dir=cache_dir, force=force)
    console.print(build_summary(record))
    if zero_shot and (force or not record.zero_shot):
        try:
            record.zero_shot = _zero_shot(name, cache_dir, test_per_class)
        except IgspError as error:
            logger.warning("Skipped the zero-shot table: %s", error)
        else:
            write_record(record, record_path(cache_dir))
    if record.zero_shot:
        console.print(zero_shot_renderable(record.zero_shot, title=f"{name} zero-shot accuracy (%) on mtil-lite"))


@app.command("list")
def list_command(
    cache_dir: Annotated[Optional[Path], typer.Option(help="Cache folder to look for built heads in.")] = None,
    all_architectures: Annotated[
        bool, typer.Option("--all", help="Also list every open_clip architecture name.")
    ] = False,
) -> None:
    """List igsp's named backbones with their build status, and optionally open_clip's architectures."""
    import open_clip

    from igsp.backbone import CONFIG_DIR, list_backbones
    from igsp.backbones import BUILDERS

    own_configs = {path.stem for path in CONFIG_DIR.glob("*.json")}
    architectures = set(open_clip.list_models())
    table = Table(title="Backbones")
    table.add_column("Name", no_wrap=True)
    table.add_column("Kind")
    table.add_column("Status")
    hidden = 0
    for name in list_backbones():
        if name in BUILDERS:
            path = BUILDERS[name].artifact(cache_dir)
            status = f"[green]built[/green] {path}" if path.is_file() else f"[yellow]not built[/yellow]: igsp backbone build {name}"
            table.add_row(name, "igsp, pretrained towers", status)
        elif name in own_configs:
            table.add_row(name, "igsp open_clip config", "random weights, or a checkpoint path")
        elif name not in architectures:
            table.add_row(name, "igsp", "ready")
        elif all_architectures:
            tags = open_clip.list_pretrained_tags_by_model(name)
            table.add_row(name, "open_clip architecture", f"tags: {', '.join(tags)}" if tags else "no pretrained tag")
        else:
            hidden += 1
    console = Console()
    console.print(table)
    if hidden:
        console.print(f"{hidden} open_clip architectures are not shown; pass --all to list them with their pretrained tags.")
