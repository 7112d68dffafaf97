"""Measure each strategy's training and evaluation cost against the frozen backbone in one run.

Every configuration gets its own learner on the drawn ``synthetic`` stream, trained on the first
two tasks with a few small steps so that iGSP and the baselines have history. The timed steps are
steps of the third task through igsp's own training loop (forward, loss, backward, hooks,
optimiser). Configurations are timed in interleaved rounds, and the median round counts, so a
change in machine load affects every configuration alike.

Training configurations:

- ``frozen``: the backbone without experts; forward and backward through both towers (their
  inputs require gradients), no optimiser. The reference for every ratio.
- ``finetune``: a single low-rank adapter of rank r in every injected block.
- ``igsp-phase1``: dense routing over K candidates plus the history, with the subspace regulariser.
- ``igsp-phase2``: top-k routing over the survivors, with the orthogonal projection of updates.
- ``lora-per-task``, ``similarity-moe``, ``moe-adapters``: the igsp-baselines plugin, if installed.
- ``experts-E``: one dense learnable router over E trainable experts per block, E = 1 .. 64.

Evaluation configurations time one pass over the second task's test images: the frozen pass alone
(zero-shot), the frozen pass plus the routed pass for the known task (oracle), and the same with
prototype task selection.

On CUDA, ``syncs/step`` counts the host-device synchronisations per training step that
``torch.cuda.set_sync_debug_mode("warn")`` reports, outside the logging steps.

Peak memory is the peak during three steps minus the memory in use before them, after one
untimed step (which creates the optimiser state): on CUDA from ``torch.cuda.max_memory_allocated``
in this process, on the CPU from the peak resident set size of a child process per configuration
(``--no-memory`` skips those children).

    python benchmarks/bench_strategies.py                       # igsp-vit-small, 64 px, CPU
    python benchmarks/bench_strategies.py --device cuda --model ViT-B-16 --precision bf16
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import gc
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from igsp.backbone import Backbone, load_backbone
from igsp.data.loading import TensorCache
from igsp.data.streams import load_stream
from igsp.data.task import TaskStream
from igsp.evaluation import route_table
from igsp.hookspecs import hookimpl
from igsp.learner import ContinualLearner
from igsp.plugins import get_registry
from igsp.selectors import OracleSelector
from igsp.settings import RunSettings
from igsp.strategies.base import inject_from_settings
from igsp.training import DefaultLoop, collect_param_groups, make_grad_scaler

STRATEGY_CONFIGS = ["frozen", "finetune", "igsp-phase1", "igsp-phase2", "lora-per-task", "similarity-moe", "moe-adapters"]
BASELINES = ("lora-per-task", "similarity-moe", "moe-adapters")
EXPERT_COUNTS = (1, 2, 4, 8, 16, 32, 64)
MEASURED_TASK = 2
EVAL_TASK = MEASURED_TASK - 1
SETUP_STEPS = 2
SETUP_BATCH = 8
# Phase 1 never ends during timing: the convergence check would run only every 10**9 steps.
IGSP_OPTIONS = {"check_every": 10**9}


@dataclass
class Options:
    """Command-line settings of one benchmark run."""

    device: str
    model: str
    precision: str
    batch_size: int
    steps: int
    rounds: int
    rank: int
    train_per_class: int
    test_per_class: int
    experts: list[int]
    memory: bool
    baselines: bool
    threads: int
    clock: str


@dataclass
class Measurement:
    """One configuration's timing and memory."""

    name: str
    kind: str
    experts_per_layer: float = 0.0
    trainable: int = 0
    step_ms: float = 0.0
    images_per_s: float = 0.0
    memory_mb: float | None = None
    syncs_per_step: float | None = None
    round_ms: list[float] = field(default_factory=list)


# ---- building configurations -------------------------------------------------------------------


def make_settings(options: Options) -> RunSettings:
    settings = RunSettings()
    settings.backbone.model = options.model
    settings.backbone.device = options.device
    settings.backbone.precision = options.precision
    settings.stream.name = "synthetic"
    settings.stream.options = {"train_per_class": options.train_per_class, "test_per_class": options.test_per_class,
                               "image_size": image_size_of(options.model)}
    settings.train.steps = SETUP_STEPS
    settings.train.batch_size = SETUP_BATCH
    settings.train.warmup_steps = 0
    settings.adapter.rank = options.rank
    settings.eval.batch_size = options.batch_size
    return settings


def image_size_of(model: str) -> int:
    """Draw the synthetic images at the model's input size, so the transform does not resize them."""
    import open_clip

    from igsp.backbone import _register_configs

    _register_configs()
    size = open_clip.get_model_config(model)["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


class ExpertPool:
    """A benchmark strategy: E trainable experts per block under one dense learnable router."""

    name = "expert-pool"

    def __init__(self, experts: int) -> None:
        self.experts = experts

    @hookimpl
    def igsp_setup_model(self, learner: ContinualLearner, backbone: Backbone) -> None:
        adapter = learner.settings.adapter
        for key in inject_from_settings(learner):
            layer = backbone.experts[key]
            ids = [layer.add_expert(adapter.rank, adapter.scale, owner="pool") for _ in range(self.experts)]
            layer.add_router("pool", ids, learnable=True, gating="dense")

    @hookimpl
    def igsp_param_groups(self, learner: ContinualLearner) -> list[dict[str, Any]]:
        return [{"params": list(learner.backbone.experts.parameters())}]

    @hookimpl
    def igsp_task_route(self) -> str:
        return "pool"


def strategy_for(name: str) -> Any:
    if name.startswith("experts-"):
        return ExpertPool(int(name.split("-")[1]))
    if name == "frozen":
        return "zeroshot"
    if name.startswith("igsp"):
        return get_registry().get("strategy", "igsp").factory(**IGSP_OPTIONS)
    return name


@dataclass
class Shared:
    """Objects that every configuration reuses: the clean backbone, the stream and the transformed images."""

    backbone: Backbone
    stream: TaskStream
    cache: TensorCache


def load_shared(options: Options) -> Shared:
    settings = make_settings(options)
    backbone = load_backbone(options.model, device=options.device)
    return Shared(backbone, load_stream("synthetic", **settings.stream.options), TensorCache())


def build_learner(name: str, shared: Shared, options: Options) -> ContinualLearner:
    """Return a learner of configuration ``name`` that has trained the tasks before the measured one."""
    settings = make_settings(options)
    learner = ContinualLearner(copy.deepcopy(shared.backbone), shared.stream, strategy_for(name), "prototype", settings)
    learner.cache = shared.cache
    learner.hooks.igsp_configure(learner=learner)
    learner._setup_model()
    if not name.startswith("experts-") and name != "frozen":
        for task_index in range(MEASURED_TASK):
            learner._fit_task(task_index)
    settings.train.steps = 10**9
    settings.train.batch_size = options.batch_size
    return learner


@dataclass
class StepRunner:
    """A prepared configuration: ``step()`` runs one training step of the measured task."""

    name: str
    learner: ContinualLearner
    step: Callable[[], None]
    experts_per_layer: float
    trainable: int


def prepare(name: str, shared: Shared, options: Options) -> StepRunner:
    learner = build_learner(name, shared, options)
    task = learner.task(MEASURED_TASK)
    learner.current_task_index = MEASURED_TASK
    learner.task_step = 0
    batches = learner.train_batches(task, MEASURED_TASK)
    if name == "frozen":
        return StepRunner(name, learner, frozen_step(learner, task, batches), 0.0, 0)
    learner.hooks.igsp_before_task(learner=learner, task=task, task_index=MEASURED_TASK)
    phases = learner.hooks.igsp_task_phases(learner=learner, task=task, task_index=MEASURED_TASK) or ["train"]
    phase = phases[0]
    if name == "igsp-phase2":
        phase = advance_to_second_phase(learner, task, phases, batches)
    return training_step(name, learner, task, phase, batches)


def advance_to_second_phase(learner: ContinualLearner, task, phases: list[str], batches: Iterator) -> str:
    """Run phase 1 for a few steps, prune as the strategy does at its end, and enter phase 2."""
    runner = training_step("igsp-phase1", learner, task, phases[0], batches)
    for _ in range(SETUP_STEPS):
        runner.step()
    learner.hooks.igsp_after_phase(learner=learner, task=task, phase=phases[0], steps=SETUP_STEPS)
    return phases[1]


def training_step(name: str, learner: ContinualLearner, task, phase: str, batches: Iterator) -> StepRunner:
    learner.hooks.igsp_before_phase(learner=learner, task=task, phase=phase)
    groups = collect_param_groups(learner, task, phase)
    optimizer, scheduler = learner.hooks.igsp_make_optimizer(learner=learner, task=task, phase=phase, param_groups=groups)
    scaler = make_grad_scaler(learner)
    loop = DefaultLoop()
    learner.backbone.train()

    def step() -> None:
        batch = next(batches)
        learner.task_step += 1
        loop._step(learner, task, phase, batch, optimizer, scheduler, scaler)

    trainable = sum(p.numel() for group in groups for p in group["params"])
    return StepRunner(name, learner, step, active_experts_per_layer(learner, task), trainable)


def active_experts_per_layer(learner: ContinualLearner, task) -> float:
    """Return the mean number of experts that the measured task's route computes per block."""
    route = learner.task_route(MEASURED_TASK)
    counts = [len(layer.routers[route].active_ids) for _, layer in learner.backbone.layers() if route in layer.routers]
    return sum(counts) / len(counts) if counts else 0.0


def frozen_step(learner: ContinualLearner, task, batches: Iterator) -> Callable[[], None]:
    """Forward and backward through both frozen towers: their first activations require gradients."""
    clip = learner.backbone.clip
    first_modules = (getattr(clip.visual, "conv1", None), getattr(clip, "token_embedding", None))
    if None in first_modules:
        raise SystemExit(f"error: the frozen reference needs an open_clip ViT (visual.conv1, token_embedding); "
                         f"{learner.backbone.name!r} has another structure. Pass --model with an open_clip ViT.")
    for module in first_modules:
        module.register_forward_hook(lambda _module, _inputs, output: output.detach().requires_grad_(True))

    def step() -> None:
        batch = next(batches)
        with learner.autocast():
            image_features = learner.backbone.encode_images(batch.images)
            text_features = learner.class_text_features(task, None, template_index=0)
            logits = learner.backbone.logit_scale * image_features @ text_features.T
            loss = F.cross_entropy(logits.float(), batch.labels)
        loss.backward()
        learner.task_step += 1
        if learner.task_step % 10 == 0:
            float(loss.detach())

    return step


# ---- timing ----------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_block(runner: StepRunner, steps: int, clock: Callable[[], float]) -> float:
    device = runner.learner.device
    synchronize(device)
    started = clock()
    for _ in range(steps):
        runner.step()
    synchronize(device)
    return (clock() - started) / steps


def time_interleaved(runners: list[StepRunner], options: Options) -> dict[str, list[float]]:
    """Warm every configuration up, then time ``rounds`` blocks of each in turn."""
    clock = CLOCKS[options.clock]
    for runner in runners:
        time_block(runner, 2, clock)
    rounds: dict[str, list[float]] = {runner.name: [] for runner in runners}
    for _ in range(options.rounds):
        for runner in runners:
            rounds[runner.name].append(time_block(runner, options.steps, clock))
    return rounds


def cuda_extra_memory(runner: StepRunner, steps: int) -> float:
    device = runner.learner.device
    runner.step()
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        runner.step()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def count_syncs(runner: StepRunner, steps: int = 3) -> float:
    """Return the host-device synchronisations per training step that CUDA's sync debug mode reports.

    The steps avoid the logging steps (every tenth), whose float() of the loss syncs on purpose.
    """
    while runner.learner.task_step % 10 > 9 - steps:
        runner.step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                runner.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def status_mb(field_name: str) -> float:
    """Return a memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field_name} line; peak memory needs Linux.")


def cpu_extra_memory_child(name: str, options: Options, steps: int = 3) -> None:
    """Entry of a child process: prepare one configuration, run steps, print the peak RSS increase.

    The peak-RSS mark is reset right before the steps (writing 5 to /proc/self/clear_refs), so
    setup does not count. The parent starts the child with glibc returning freed blocks of 64 KiB
    and more to the system, so the resident set follows the memory that tensors use.
    """
    runner = prepare(name, load_shared(options), options)
    runner.step()
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
    before = status_mb("VmRSS")
    for _ in range(steps):
        runner.step()
    print(json.dumps({"name": name, "memory_mb": status_mb("VmHWM") - before}))


def cpu_extra_memory(name: str, argv: list[str]) -> float | None:
    command = [sys.executable, __file__, *argv, "--memory-child", name]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)
    if finished.returncode != 0:
        logging.warning("Memory child for %s failed: %s", name, finished.stderr[-2000:])
        return None
    return float(json.loads(finished.stdout.strip().splitlines()[-1])["memory_mb"])


# ---- evaluation throughput ---------------------------------------------------------------------


def time_evaluation(shared: Shared, options: Options) -> list[Measurement]:
    """Time one evaluation pass over the last trained task's test set in three modes."""
    learner = build_learner("igsp", shared, options)
    learner.current_task_index = EVAL_TASK
    routes = route_table({j: learner.task_route(j) for j in range(EVAL_TASK + 1)}, learner.num_tasks)
    count = learner.split_size(learner.task(EVAL_TASK), "test")
    prototype = learner.selector
    clock = CLOCKS[options.clock]
    modes = [
        ("zero-shot (frozen pass)", OracleSelector(), route_table({}, learner.num_tasks)),
        ("known task (oracle)", OracleSelector(), routes),
        ("prototype selection", prototype, routes),
    ]
    results = []
    for label, selector, table in modes:
        learner.selector = selector
        learner._build_hooks()
        seconds = []
        for repeat in range(options.rounds + 1):
            synchronize(learner.device)
            started = clock()
            learner.evaluator._evaluate_task(EVAL_TASK, EVAL_TASK, table)
            synchronize(learner.device)
            seconds.append(clock() - started)
        median = statistics.median(seconds[1:])
        results.append(Measurement(label, "eval", step_ms=1000 * median, images_per_s=count / median))
    return results


# ---- report ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_model(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_model() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return platform.processor()
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def summarise(measured: dict[str, Measurement]) -> dict[str, float]:
    frozen = measured["frozen"].step_ms
    adapter = measured["finetune"].step_ms
    phase1, phase2 = measured["igsp-phase1"].step_ms, measured["igsp-phase2"].step_ms
    # Phase 1 takes at most max_phase1_fraction (default 0.3) of a task's steps.
    budget = 0.3 * phase1 + 0.7 * phase2
    return {
        "igsp_phase1_over_frozen": phase1 / frozen,
        "igsp_phase2_over_frozen": phase2 / frozen,
        "igsp_phase1_over_adapter": phase1 / adapter,
        "igsp_phase2_over_adapter": phase2 / adapter,
        "igsp_task_over_adapter": budget / adapter,
        "adapter_over_frozen": adapter / frozen,
    }


def print_table(title: str, rows: list[Measurement], frozen_ms: float | None, adapter_ms: float | None) -> None:
    print(f"\n{title}")
    header = (f"{'configuration':<26}{'experts/layer':>14}{'trainable':>12}{'step ms':>10}{'images/s':>10}"
              f"{'x frozen':>10}{'x adapter':>11}{'extra MiB':>11}{'syncs/step':>12}")
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio_frozen = f"{row.step_ms / frozen_ms:.2f}" if frozen_ms else ""
        ratio_adapter = f"{row.step_ms / adapter_ms:.2f}" if adapter_ms else ""
        memory = f"{row.memory_mb:.0f}" if row.memory_mb is not None else ""
        experts = f"{row.experts_per_layer:.1f}" if row.kind == "train" else ""
        trainable = f"{row.trainable:,}" if row.kind == "train" else ""
        syncs = f"{row.syncs_per_step:.1f}" if row.syncs_per_step is not None else ""
        print(f"{row.name:<26}{experts:>14}{trainable:>12}{row.step_ms:>10.1f}{row.images_per_s:>10.1f}"
              f"{ratio_frozen:>10}{ratio_adapter:>11}{memory:>11}{syncs:>12}")


def installed_baselines() -> list[str]:
    strategies = get_registry().strategies
    return [name for name in BASELINES if name in strategies]


def run(options: Options, argv: list[str], out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    shared = load_shared(options)
    names = [n for n in STRATEGY_CONFIGS if n not in BASELINES]
    if options.baselines:
        names += installed_baselines()
    scaling = [f"experts-{count}" for count in options.experts]
    runners = [prepare(name, shared, options) for name in names + scaling]
    rounds = time_interleaved(runners, options)

    measured: dict[str, Measurement] = {}
    for runner in runners:
        step = statistics.median(rounds[runner.name])
        measured[runner.name] = Measurement(
            runner.name, "train", runner.experts_per_layer, runner.trainable, 1000 * step,
            options.batch_size / step, round_ms=[1000 * value for value in rounds[runner.name]],
        )
    if options.memory:
        for runner in runners[:len(names)]:
            if runner.learner.device.type == "cuda":
                measured[runner.name].memory_mb = cuda_extra_memory(runner, 3)
            else:
                measured[runner.name].memory_mb = cpu_extra_memory(runner.name, argv)
    for runner in runners[:len(names)]:
        if runner.learner.device.type == "cuda":
            measured[runner.name].syncs_per_step = count_syncs(runner)
    evaluation = time_evaluation(shared, options)

    frozen_ms, adapter_ms = measured["frozen"].step_ms, measured["finetune"].step_ms
    print(f"\nModel {options.model}, {options.device}, {options.precision}, batch {options.batch_size}, "
          f"{options.rounds} rounds of {options.steps} steps, median round, {torch.get_num_threads()} CPU threads, "
          f"{options.clock} clock")
    print_table("Training step (task 3 of 3)", [measured[n] for n in names], frozen_ms, adapter_ms)
    print_table("Step time against experts per block (dense router, all trainable)", [measured[n] for n in scaling], frozen_ms, adapter_ms)
    print_table("Evaluation of one test set (step ms = whole pass)", evaluation, None, None)
    summary = summarise(measured)
    print("\n" + "  ".join(f"{key} {value:.2f}" for key, value in summary.items()))

    record = {
        "machine": {**machine(), "load_average_at_start": load_at_start}, "options": asdict(options), "summary": summary,
        "training": [asdict(measured[n]) for n in names], "scaling": [asdict(measured[n]) for n in scaling],
        "evaluation": [asdict(m) for m in evaluation], "seconds": time.perf_counter() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1), encoding="utf-8")
    print(f"Wrote {out}")
    return record


def parse(argv: list[str]) -> tuple[Options, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default=None, help="backbone; default igsp-vit-small on cpu, ViT-B-16 on cuda")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, default=None, help="images per step; default 32 on cpu, 128 on cuda")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round; default 4 on cpu, 20 on cuda")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the median counts")
    parser.add_argument("--rank", type=int, default=8, help="expert rank r")
    parser.add_argument("--experts", default=",".join(str(c) for c in EXPERT_COUNTS), help="expert counts per block for the scaling table")

    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0 keeps torch's default")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="wall: elapsed time; cpu: this process's CPU time, which other processes' load does not "
                             "inflate (equal to elapsed time on an idle machine only with --threads 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-baselines", action="store_true", help="skip the igsp-baselines strategies")
    parser.add_argument("--out", default="runs/bench_strategies.json", help="JSON file to write")
    parser.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    cuda = args.device.startswith("cuda")
    options = Options(
        device=args.device,
        model=args.model or ("ViT-B-16" if cuda else "igsp-vit-small"),
        precision=args.precision,
        batch_size=args.batch_size or (128 if cuda else 32),
        steps=args.steps or (20 if cuda else 4),
        rounds=args.rounds,
        rank=args.rank,
        train_per_class=64,
        test_per_class=64,
        experts=[int(value) for value in args.experts.split(",") if value],
        memory=not args.no_memory,
        baselines=not args.no_baselines,
        threads=args.threads,
        clock=args.clock,
    )
    return options, args


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    argv = sys.argv[1:]
    options, args = parse(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    if args.memory_child:
        cpu_extra_memory_child(args.memory_child, options)
        return
    parent_argv = [a for a in argv if a != "--memory-child"]
    run(options, parent_argv, Path(args.out))


if __name__ == "__main__":
    main()
