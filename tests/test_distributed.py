"""Data-parallel runs under torchrun match single-process runs of the same recipe.

Each comparison starts ``torchrun --standalone --nproc_per_node 2 -m igsp recipe run`` on the CPU
(gloo, a local rendezvous on a free port) and runs the same recipe in this process, then compares
the accuracy matrices, the trained weights, the logged losses and iGSP's phase decisions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import builtin_plugins_only
from igsp import distributed
from igsp.config import load_recipe, resolve_settings
from igsp.data.synthetic import SYNTHETIC_TASKS
from igsp.exceptions import ConfigError
from igsp.runner import run_settings

LEARNING_RATE = 0.005
TEST_PER_CLASS = 8

RECIPE = """
name = "distributed"
seed = 0

[backbone]
model = "igsp-vit-tiny"
device = "cpu"

[stream]
name = "synthetic"
tasks = ["colors", "stripes"]
train_per_class = 8
test_per_class = {test_per_class}

[train]
steps = {steps}
batch_size = 16
lr = {lr}
warmup_steps = 1
cache_images = {cache_images}
num_workers = {num_workers}

[eval]
selector = "oracle"
batch_size = 20

[adapter]
rank = 4

[strategy]
name = "{strategy}"
{options}
"""

IGSP_OPTIONS = """candidates = 2
candidates_first = 3
check_every = 2
min_phase1_steps = 2
max_phase1_fraction = 0.5
tau_factor = 1.0"""

# The finetune run reads images through DataLoader workers instead of the tensor cache, so the
# comparison also covers the streamed, sharded input path.
CASES = {
    "finetune": {"steps": 6, "options": "", "cache_images": "false", "num_workers": 0},
    "igsp": {"steps": 8, "options": IGSP_OPTIONS, "cache_images": "true", "num_workers": 0},
}


def write_recipe(folder: Path, strategy: str) -> Path:
    path = folder / f"{strategy}.toml"
    path.write_text(RECIPE.format(strategy=strategy, lr=LEARNING_RATE, test_per_class=TEST_PER_CLASS, **CASES[strategy]), encoding="utf-8")
    return path


def torchrun(recipe: Path, out: Path) -> subprocess.CompletedProcess:
    """Run the recipe with two gloo ranks on this machine and return the finished process."""
    executable = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "IGSP_LOAD_PLUGINS": "", "COLUMNS": "400", "OMP_NUM_THREADS": "1"}
    command = [executable, "--standalone", "--nproc_per_node", "2", "-m", "igsp", "recipe", "run", str(recipe), "--out", str(out)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def single_process(recipe: Path, out: Path) -> None:
    settings = resolve_settings(load_recipe(str(recipe)))
    settings.train.cache_images = True
    settings.train.num_workers = 0
    with builtin_plugins_only():
        run_settings(settings, out)


def read_run(folder: Path) -> tuple[dict, dict]:
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    checkpoint = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
    return results, checkpoint


@dataclass
class Pair:
    """The same recipe run by two torchrun ranks and by one process."""

    strategy: str
    two: dict
    two_checkpoint: dict
    one: dict
    one_checkpoint: dict
    log: str


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory) -> Pair:
    folder = tmp_path_factory.mktemp(request.param)
    recipe = write_recipe(folder, request.param)
    finished = torchrun(recipe, folder / "two")
    assert finished.returncode == 0, finished.stderr[-3000:]
    single_process(recipe, folder / "one")
    two, two_checkpoint = read_run(folder / "two")
    one, one_checkpoint = read_run(folder / "one")
    return Pair(request.param, two, two_checkpoint, one, one_checkpoint, finished.stdout + finished.stderr)


def test_torchrun_accuracy_matrix_matches(pair: Pair) -> None:
    # An argmax decision may flip on a float32 rounding difference, so an entry may differ by
    # one test image at most.
    for j, name in enumerate(pair.one["task_names"]):
        one_image = 100.0 / (TEST_PER_CLASS * len(SYNTHETIC_TASKS[name][1]))
        for i, row in enumerate(pair.one["matrix"]):
            assert abs(pair.two["matrix"][i][j] - row[j]) <= one_image + 1e-9, (i, name)


def test_torchrun_weights_match(pair: Pair) -> None:
    # AdamW moves every coordinate by about lr per step whatever the gradient's size. A coordinate
    # whose gradient is near zero (router rows start at zero) can therefore move differently
    # after a float32 rounding difference, and lr / 2 bounds that over these few steps.
    assert pair.two_checkpoint["structure"] == pair.one_checkpoint["structure"]
    for key, value in pair.one_checkpoint["added_state"].items():
        other = pair.two_checkpoint["added_state"][key]
        if value.dtype == torch.bool:
            assert torch.equal(value, other), key
        else:
            assert torch.allclose(value, other, atol=LEARNING_RATE / 2, rtol=0), key


def test_torchrun_logged_losses_match(pair: Pair) -> None:
    losses_one = [h["train/loss"] for h in pair.one["history"] if "train/loss" in h]
    losses_two = [h["train/loss"] for h in pair.two["history"] if "train/loss" in h]
    assert len(losses_one) == 2
    assert losses_two == pytest.approx(losses_one, rel=1e-4)


def test_torchrun_rank_zero_writes_once(pair: Pair) -> None:
    assert pair.log.count("Wrote checkpoint") == len(pair.one["task_names"])


def test_torchrun_igsp_phase_decisions_match(pair: Pair) -> None:
    if pair.strategy != "igsp":
        pytest.skip("phase decisions exist only in iGSP runs")
    for name, info in pair.one["task_info"].items():
        other = pair.two["task_info"][name]
        assert other["phase1_steps"] == info["phase1_steps"], name
        assert other["phase1_end"] == info["phase1_end"], name
        assert other["kept_per_layer"] == info["kept_per_layer"], name
        assert other["masked_per_layer"] == info["masked_per_layer"], name
        # The convergence test reads routing statistics summed over both ranks.
        assert other["tv_changes"] == pytest.approx(info["tv_changes"], abs=1e-5), name


# ---- helpers in one process -------------------------------------------------------------------


def test_shard_single_process_returns_input() -> None:
    index = torch.arange(7)
    assert torch.equal(distributed.shard(index), index)
    assert distributed.world_size() == 1
    assert distributed.is_main()


def test_init_from_env_missing_master(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        distributed.init_from_env("cpu")


def test_init_from_env_rank_out_of_range(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK=2"):
        distributed.init_from_env("cpu")


def test_init_from_env_one_process_is_noop(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = distributed.init_from_env("cpu")
    assert not context.enabled
    assert not torch.distributed.is_initialized()
