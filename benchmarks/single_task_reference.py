"""Compare a continual run's Last with fitting every task on its own (same budget, rank, seed).

For each task of the recipe's stream, a fresh learner trains the strategy on a one-task stream and
evaluates it with the oracle selector; the mean of those accuracies is the no-interference
reference that a continual method's Last is measured against. Prints a table and writes JSON.

    python benchmarks/single_task_reference.py mtil-lite --strategy igsp --out runs/reference
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from igsp.config import apply_overrides, load_recipe, resolve_settings
from igsp.data.streams import load_stream
from igsp.data.task import TaskStream
from igsp.runner import build_learner


def run_alone(settings, stream: TaskStream, task_name: str) -> float:
    from igsp.learner import ContinualLearner

    single = stream.select([task_name])
    learner = ContinualLearner(settings.backbone.model, single, settings.strategy.name, "oracle", settings=settings)
    return learner.fit_stream().matrix[0][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--strategy", default="igsp")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default="runs/single-task-reference")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    overrides = [f"strategy={args.strategy}", "selector=oracle", *args.overrides]
    settings = resolve_settings(apply_overrides(load_recipe(args.recipe), overrides))
    stream = load_stream(settings.stream.name, **settings.stream.options)

    started = time.perf_counter()
    continual = build_learner(settings, None).fit_stream()
    continual_seconds = time.perf_counter() - started
    alone = {name: run_alone(settings, stream, name) for name in stream.task_names}

    last_row = dict(zip(continual.task_names, continual.matrix[-1]))
    rows = [(name, last_row[name], alone[name]) for name in stream.task_names]
    print(f"{'task':<14}{'continual (last row)':>22}{'alone':>10}")
    for name, last, single in rows:
        print(f"{name:<14}{last:>22.1f}{single:>10.1f}")
    mean_last, mean_alone = float(np.mean([r[1] for r in rows])), float(np.mean([r[2] for r in rows]))
    print(f"{'mean':<14}{mean_last:>22.1f}{mean_alone:>10.1f}   gap {mean_alone - mean_last:+.1f} points")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "recipe": args.recipe, "strategy": args.strategy, "overrides": args.overrides,
        "continual_last": mean_last, "alone_mean": mean_alone, "per_task": rows,
        "continual_seconds": continual_seconds, "continual_summary": continual.summary(),
    }
    (out / "single_task_reference.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
