"""Build and run a learner from resolved settings; resume a run from its folder."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from . import checkpoint as checkpoints
from .config import settings_from_dict, settings_to_dict
from .learner import ContinualLearner
from .results import RunResults, write_text_atomic
from .settings import RunSettings

__all__ = ["build_learner", "run_settings", "resume_run", "default_out_dir", "RECIPE_FILE"]

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.json"
FEWSHOT_FILE = "fewshot_indices.json"


def default_out_dir(settings: RunSettings) -> Path:
    """Return ``runs/<name>-<strategy>-<time>`` unless the recipe sets ``out``."""
    if settings.out:
        return Path(settings.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{settings.name}-{settings.strategy.name}-{stamp}"


def build_learner(settings: RunSettings, out_dir: str | Path | None, callbacks: Sequence[Any] = ()) -> ContinualLearner:
    """Resolve every name in ``settings`` and return a ready learner.

    The strategy and selector are built before the backbone and the stream, so an invalid option
    fails in a second instead of after loading data.
    """
    from .plugins import get_registry

    registry = get_registry()
    strategy = registry.get("strategy", settings.strategy.name).factory(**settings.strategy.options)
    strategy.name = getattr(strategy, "name", "") or settings.strategy.name
    selector = registry.get("selector", settings.eval.selector).factory(**settings.eval.selector_options)
    selector.name = getattr(selector, "name", "") or settings.eval.selector
    return ContinualLearner(
        settings.backbone.model,
        settings.stream.name,
        strategy,
        selector=selector,
        settings=settings,
        callbacks=callbacks,
        out_dir=out_dir,
    )


def write_recipe(settings: RunSettings, out_dir: Path) -> None:
    write_text_atomic(out_dir / RECIPE_FILE, json.dumps(settings_to_dict(settings), indent=1))


def write_fewshot_indices(learner: ContinualLearner, out_dir: Path) -> None:
    """Save the training indices that few-shot sampling chose, per task, next to the results."""
    chosen = {
        task.name: task.metadata["fewshot_indices"]
        for task in learner.stream
        if "fewshot_indices" in task.metadata
    }
    if chosen:
        write_text_atomic(out_dir / FEWSHOT_FILE, json.dumps(chosen))


def run_settings(settings: RunSettings, out_dir: str | Path | None = None, callbacks: Sequence[Any] = ()) -> RunResults:
    """Run a whole stream and return its results; files go to ``out_dir``."""
    out = Path(out_dir) if out_dir is not None else default_out_dir(settings)
    learner = build_learner(settings, out, callbacks)
    write_recipe(settings, out)
    write_fewshot_indices(learner, out)
    logger.info("Run folder: %s", out)
    return learner.fit_stream()


def resume_run(run_dir: str | Path, callbacks: Sequence[Any] = ()) -> RunResults:
    """Continue the run in ``run_dir`` with its next unfinished task, using its saved recipe."""
    run_dir = Path(run_dir)
    payload = checkpoints.load(run_dir / checkpoints.FILENAME)
    settings = settings_from_dict(payload["settings"])
    learner = build_learner(settings, run_dir, callbacks)
    return learner.resume_from(run_dir)
