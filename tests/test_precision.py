"""Mixed precision, compiled encoders and the routing path that avoids device syncs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from conftest import IGSP_TEST_OPTIONS, builtin_plugins_only, fresh_backbone, make_settings, random_images
from igsp.backbone import Routes
from igsp.data.synthetic import SYNTHETIC_TASKS
from igsp.exceptions import ConfigError
from igsp.learner import ContinualLearner, check_precision, compile_encoders
from igsp.moe import MoELayer, RoutingContext
from igsp.results import RunResults
from igsp.runner import build_learner
from igsp.training import make_grad_scaler

TEST_PER_CLASS = 8


@dataclass
class PrecisionRun:
    learner: ContinualLearner
    results: RunResults


def run_with_precision(precision: str) -> PrecisionRun:
    settings = make_settings(
        "igsp", steps=6, tasks=["colors", "stripes"], options=IGSP_TEST_OPTIONS,
        test_per_class=TEST_PER_CLASS, overrides=[f"backbone.precision={precision}"],
    )
    with builtin_plugins_only():
        learner = build_learner(settings, None)
        results = learner.fit_stream()
    return PrecisionRun(learner, results)


@pytest.fixture(scope="module")
def fp32_run() -> PrecisionRun:
    return run_with_precision("fp32")


@pytest.fixture(scope="module")
def bf16_run() -> PrecisionRun:
    return run_with_precision("bf16")


def train_losses(results: RunResults) -> list[float]:
    return [record["train/loss"] for record in results.history if "train/loss" in record]


def test_bf16_accuracy_matches_fp32(fp32_run: PrecisionRun, bf16_run: PrecisionRun) -> None:
    # bf16 keeps 8 significant bits, so matrix products round at about 0.4% relative error.
    # After a few steps that moves only samples whose logit margin is that small; an entry may
    # differ by two test images at most (of 16 to 24 per task here).
    for j, name in enumerate(fp32_run.results.task_names):
        two_images = 2 * 100.0 / (TEST_PER_CLASS * len(SYNTHETIC_TASKS[name][1]))
        for i, row in enumerate(fp32_run.results.matrix):
            assert abs(bf16_run.results.matrix[i][j] - row[j]) <= two_images + 1e-9, (i, name)


def test_bf16_losses_close_to_fp32(fp32_run: PrecisionRun, bf16_run: PrecisionRun) -> None:
    assert train_losses(bf16_run.results) == pytest.approx(train_losses(fp32_run.results), rel=2e-2)


def test_bf16_autocast_in_effect(fp32_run: PrecisionRun, bf16_run: PrecisionRun) -> None:
    # Identical losses would mean that autocast never ran in bf16.
    assert train_losses(bf16_run.results) != train_losses(fp32_run.results)
    with bf16_run.learner.autocast():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_bf16_grad_scaler_absent(bf16_run: PrecisionRun) -> None:
    assert make_grad_scaler(bf16_run.learner) is None


def test_fp32_autocast_is_noop(fp32_run: PrecisionRun) -> None:
    with fp32_run.learner.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_precision_fp16_on_cpu_rejected() -> None:
    settings = make_settings("finetune", overrides=["backbone.precision=fp16"])
    with builtin_plugins_only(), pytest.raises(ConfigError, match="bf16"):
        build_learner(settings, None)


def test_check_precision_unknown_value() -> None:
    with pytest.raises(ConfigError, match="fp8"):
        check_precision("fp8", torch.device("cpu"))


def test_router_logits_float32_under_bf16() -> None:
    layer = MoELayer(16, 16)
    ids = [layer.add_expert(2) for _ in range(3)]
    router = layer.add_router("task", ids, learnable=True, gating="topk", top_k=2)
    torch.nn.init.normal_(router.weight)
    u = torch.randn(4, 5, 16)
    context = RoutingContext(route_keys=["task"], assignment=torch.zeros(4, dtype=torch.long))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gates, dense = router.gates(u[:, 0])
        output = layer(u, u[:, 0], context)
    assert gates.dtype == torch.float32
    assert dense.dtype == torch.float32
    assert output.shape == u.shape


# ---- torch.compile ------------------------------------------------------------------------------


def test_compile_encoders_match_eager() -> None:
    # The eager backend traces with TorchDynamo but skips code generation, which keeps this
    # test fast; the learner uses inductor.
    backbone = fresh_backbone()
    images = random_images(backbone, 4)
    expected = backbone.encode_images(images)
    compile_encoders(backbone, backend="eager")
    assert getattr(backbone.clip.encode_image, "igsp_compiled", False)
    assert getattr(backbone.clip.encode_text, "igsp_compiled", False)
    assert torch.allclose(backbone.encode_images(images), expected, atol=1e-5)


def test_compile_encoders_twice_keeps_wrapper() -> None:
    backbone = fresh_backbone()
    compile_encoders(backbone, backend="eager")
    first = backbone.clip.encode_image
    compile_encoders(backbone, backend="eager")
    assert backbone.clip.encode_image is first


def test_compile_failure_names_setting() -> None:
    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("no code generator for this graph")

    backbone = fresh_backbone()
    compile_encoders(backbone, backend=failing_backend)
    with pytest.raises(ConfigError, match="backbone.compile = false"):
        backbone.encode_images(random_images(backbone, 2))


def test_learner_compile_setting_compiles_encoders() -> None:
    settings = make_settings("finetune", overrides=["backbone.compile=true"])
    with builtin_plugins_only():
        learner = build_learner(settings, None)
        learner._setup_model()
    assert getattr(learner.backbone.clip.encode_image, "igsp_compiled", False)


def test_routed_forward_unchanged_by_cpu_assignment() -> None:
    """A CPU route assignment (no device sync) gives the same features as a tensor one."""
    backbone = fresh_backbone()
    backbone.inject()
    for _, layer in backbone.layers():
        expert = layer.add_expert(2)
        torch.nn.init.normal_(layer.expert(expert).B)
        layer.add_router("task", [expert], learnable=False)
    images = random_images(backbone, 6)
    assignment = torch.tensor([0, -1, 0, 0, -1, 0])
    mixed = backbone.encode_images(images, Routes(["task"], assignment))
    routed = backbone.encode_images(images[assignment == 0], Routes.uniform("task", 4))
    frozen = backbone.encode_images(images[assignment < 0])
    assert torch.allclose(mixed[assignment == 0], routed, atol=1e-5)
    assert torch.allclose(mixed[assignment < 0], frozen, atol=1e-5)
