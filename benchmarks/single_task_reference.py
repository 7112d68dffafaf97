"""Compare a continual run's Last with fitting every task on its own (same budget, rank, seed).

For each task of the recipe's stream, a fresh learner trains the strategy on a one-task stream and
evaluates it with the oracle selector; the mean of those accuracies is the no-interference
reference that a continual method's Last is measured against. With several seeds, every seed runs
both the continual stream and the single-task fits, and the table shows the means over seeds.
Prints a table and writes JSON.

    python benchmarks/single_task_reference.py mtil-lite --strategy igsp --seeds 0,1,2 --jobs 2 --out runs/reference

``--jobs N`` runs N seeds at once in separate processes, each with one torch thread. ``--merge``
adds the seeds of earlier JSON records of the same recipe, strategy and overrides to the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
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


def run_seed(recipe: str, overrides: list[str], seed: int) -> dict:
    """Train the continual stream and every task alone with one seed; return the per-task record."""
    settings = resolve_settings(apply_overrides(load_recipe(recipe), [*overrides, f"seed={seed}"]))
    stream = load_stream(settings.stream.name, **settings.stream.options)

    started = time.perf_counter()
    continual = build_learner(settings, None).fit_stream()
    continual_seconds = time.perf_counter() - started
    alone = {name: run_alone(settings, stream, name) for name in stream.task_names}

    last_row = dict(zip(continual.task_names, continual.matrix[-1]))
    return {
        "seed": seed,
        "per_task": [(name, last_row[name], alone[name]) for name in stream.task_names],
        "continual_seconds": continual_seconds,
        "continual_summary": continual.summary(),
        "task_info": continual.task_info,
    }


def run_seed_in_worker(recipe: str, overrides: list[str], seed: int) -> dict:
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    return run_seed(recipe, overrides, seed)


def run_seeds(recipe: str, overrides: list[str], seeds: list[int], jobs: int) -> list[dict]:
    if jobs <= 1 or len(seeds) == 1:
        return [run_seed(recipe, overrides, seed) for seed in seeds]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_seed_in_worker, recipe, overrides, seed) for seed in seeds]
        return [future.result() for future in futures]


def merge_records(paths: list[str], recipe: str, strategy: str, overrides: list[str]) -> list[dict]:
    """Return the runs of earlier records, and reject a record of another setting."""
    runs = []
    for path in paths:
        record = json.loads(Path(path).read_text())
        setting = (record.get("recipe"), record.get("strategy"), record.get("overrides"))
        if setting != (recipe, strategy, overrides) or "runs" not in record:
            raise SystemExit(
                f"--merge {path}: its recipe, strategy and overrides {setting} differ from "
                f"{(recipe, strategy, overrides)} or it has no per-seed runs; merge only records of the same setting."
            )
        runs += record["runs"]
    return runs


def parse_seeds(text: str, merging: bool) -> list[int]:
    """Return the seeds of a comma-separated list; an empty list only when earlier records are merged."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {text!r} is not a comma-separated list of integers, for example 0,1,2.")
    if not seeds and not merging:
        raise SystemExit("--seeds is empty; give at least one seed, for example 0, or records to --merge.")
    return seeds


def print_table(runs: list[dict]) -> tuple[float, float]:
    names = [name for name, _, _ in runs[0]["per_task"]]
    last = np.array([[row[1] for row in run["per_task"]] for run in runs])
    alone = np.array([[row[2] for row in run["per_task"]] for run in runs])
    print(f"{'task':<14}{'continual (last row)':>22}{'alone':>10}{'gap':>8}")
    for k, name in enumerate(names):
        print(f"{name:<14}{last[:, k].mean():>22.1f}{alone[:, k].mean():>10.1f}{alone[:, k].mean() - last[:, k].mean():>+8.1f}")
    mean_last, mean_alone = float(last.mean()), float(alone.mean())
    print(f"{'mean':<14}{mean_last:>22.1f}{mean_alone:>10.1f}{mean_alone - mean_last:>+8.1f}")
    if len(runs) > 1:
        gaps = alone.mean(axis=1) - last.mean(axis=1)
        seeds = ", ".join(f"{run['seed']}: {gap:+.1f}" for run, gap in zip(runs, gaps))
        print(f"gap per seed ({seeds}); mean {gaps.mean():+.1f}, standard deviation {gaps.std(ddof=1):.1f}")
    return mean_last, mean_alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--strategy", default="igsp")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, for example 0,1,2 ('' with --merge only)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds to run at once, in separate processes")
    parser.add_argument("--merge", action="append", default=[], help="an earlier JSON record to include")
    parser.add_argument("--out", default="runs/single-task-reference")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    seeds = parse_seeds(args.seeds, bool(args.merge))
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs} is invalid; give the number of seeds to run at once, at least 1.")
    overrides = [f"strategy={args.strategy}", "selector=oracle", *args.overrides]
    earlier = merge_records(args.merge, args.recipe, args.strategy, args.overrides)
    all_seeds = [run["seed"] for run in earlier] + seeds
    if len(set(all_seeds)) != len(all_seeds):
        raise SystemExit(f"Seeds {all_seeds} repeat across --seeds and --merge; give each seed once.")
    runs = sorted(earlier + run_seeds(args.recipe, overrides, seeds, args.jobs), key=lambda run: run["seed"])
    mean_last, mean_alone = print_table(runs)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "recipe": args.recipe, "strategy": args.strategy, "overrides": args.overrides, "seeds": seeds,
        "continual_last": mean_last, "alone_mean": mean_alone, "runs": runs,
    }
    (out / "single_task_reference.json").write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
