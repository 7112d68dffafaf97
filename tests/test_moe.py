"""Mixture-of-experts layers: the batched forward against a per-expert loop, structure changes."""

from __future__ import annotations

import pytest
import torch

from igsp.backbone import Routes
from igsp.moe import LowRankExpert, MoELayer, Router, RoutingContext

IN, OUT = 16, 12


def randomise(layer: MoELayer, seed: int = 0, router_scale: float = 1.0) -> MoELayer:
    """Give every expert a non-zero up-projection and every learnable router random weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for expert_id in layer.expert_ids:
            expert = layer.expert(expert_id)
            expert.A.copy_(torch.randn(expert.A.shape, generator=generator))
            expert.B.copy_(torch.randn(expert.B.shape, generator=generator))
        for router in layer.routers.values():
            if router.weight is not None:
                router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * router_scale)
    return layer


def inputs(batch: int = 6, tokens: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, tokens, IN, generator=generator)
    return u, u[:, 0]


def naive(layer: MoELayer, u: torch.Tensor, z: torch.Tensor, keys: list[str], assignment: list[int]) -> torch.Tensor:
    """Compute the layer's contribution sample by sample, expert by expert."""
    out = torch.zeros(*u.shape[:-1], layer.out_features)
    for n, route in enumerate(assignment):
        if route < 0 or keys[route] not in layer.routers:
            continue
        router = layer.routers[keys[route]]
        gates, _ = router.gates(z[n:n + 1])
        for column, expert_id in enumerate(router.expert_ids):
            out[n] += gates[0, column] * layer.expert(expert_id)(u[n])
    return out


def run(layer: MoELayer, u: torch.Tensor, z: torch.Tensor, keys: list[str], assignment: list[int]) -> torch.Tensor:
    context = RoutingContext(route_keys=keys, assignment=torch.tensor(assignment))
    out = layer(u, z, context)
    return torch.zeros(*u.shape[:-1], layer.out_features) if out is None else out


def layer_with(ranks: list[int], activations: list[str] | None = None, scales: list[float] | None = None) -> MoELayer:
    layer = MoELayer(IN, OUT, name="test")
    activations = activations or ["none"] * len(ranks)
    scales = scales or [1.0] * len(ranks)
    for rank, activation, scale in zip(ranks, activations, scales):
        layer.add_expert(rank, scale=scale, activation=activation)
    return layer


# ---- batched forward equals the per-expert loop -------------------------------------------------


def test_moe_dense_matches_naive():
    layer = layer_with([4, 4, 4])
    layer.add_router("task", [0, 1, 2], gating="dense")
    randomise(layer)
    u, z = inputs()
    assignment = [0] * 6

    expected = naive(layer, u, z, ["task"], assignment)

    assert torch.allclose(run(layer, u, z, ["task"], assignment), expected, atol=1e-5)


def test_moe_topk_matches_naive():
    layer = layer_with([4, 4, 4, 4])
    layer.add_router("task", [0, 1, 2, 3], gating="topk", top_k=2)
    randomise(layer)
    u, z = inputs()
    assignment = [0] * 6

    expected = naive(layer, u, z, ["task"], assignment)

    assert torch.allclose(run(layer, u, z, ["task"], assignment), expected, atol=1e-5)


def test_moe_mixed_routes_match_naive():
    layer = layer_with([4, 4, 4, 4])
    layer.add_router("old", [0, 1], gating="dense")
    layer.add_router("new", [0, 1, 2, 3], gating="topk", top_k=2)
    layer.routers["new"].set_mask([1, 2, 3])
    randomise(layer)
    u, z = inputs()
    keys = ["old", "new"]
    assignment = [0, 1, -1, 1, 0, -1]

    out = run(layer, u, z, keys, assignment)

    assert torch.allclose(out, naive(layer, u, z, keys, assignment), atol=1e-5)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.equal(out[5], torch.zeros_like(out[5]))
    assert out[0].abs().max() > 0


def test_moe_route_missing_in_layer_adds_nothing():
    layer = layer_with([4])
    layer.add_router("task", [0])
    randomise(layer)
    u, z = inputs()

    assert layer(u, z, RoutingContext(route_keys=["other"], assignment=torch.zeros(6, dtype=torch.long))) is None


@pytest.mark.parametrize("gating", ["dense", "topk"])
def test_moe_mixed_ranks_activations(gating):
    layer = layer_with([2, 4, 4, 2, 8], ["none", "relu", "gelu", "gelu", "none"], [1.0, 0.5, 2.0, 1.0, 0.1])
    layer.add_router("task", layer.expert_ids, gating=gating, top_k=3)
    randomise(layer)
    u, z = inputs()
    assignment = [0, 0, 0, -1, 0, 0]

    expected = naive(layer, u, z, ["task"], assignment)

    assert torch.allclose(run(layer, u, z, ["task"], assignment), expected, atol=1e-5)


def test_expert_forward_formula():
    expert = LowRankExpert(IN, OUT, rank=3, scale=0.5, activation="relu")
    with torch.no_grad():
        expert.B.copy_(torch.randn(OUT, 3))
    u = torch.randn(2, IN)

    assert torch.allclose(expert(u), 0.5 * torch.relu(u @ expert.A.T) @ expert.B.T, atol=1e-6)


# ---- new experts, removal, masks, top-k --------------------------------------------------------


def test_moe_new_expert_is_silent():
    layer = layer_with([4])
    layer.add_router("task", [0])
    u, z = inputs()

    out = run(layer, u, z, ["task"], [0] * 6)

    assert torch.equal(out, torch.zeros_like(out))


def test_moe_new_expert_keeps_other_routes():
    layer = layer_with([4, 4])
    layer.add_router("old", [0, 1])
    randomise(layer)
    u, z = inputs()
    before = run(layer, u, z, ["old"], [0] * 6)

    new_id = layer.add_expert(4)
    layer.add_router("new", [0, 1, new_id])

    assert torch.equal(run(layer, u, z, ["old"], [0] * 6), before)
    assert torch.equal(layer.expert(new_id).B, torch.zeros(OUT, 4))


def test_backbone_new_expert_keeps_features(tiny_backbone, image_factory):
    images = image_factory(tiny_backbone, 4)
    tokens = tiny_backbone.tokenize(["a photo of a cat.", "a red square.", "stripes"])
    with torch.no_grad():
        image_before = tiny_backbone.encode_images(images)
        text_before = tiny_backbone.encode_texts(tokens)

    for key in tiny_backbone.inject():
        layer = tiny_backbone.experts[key]
        layer.add_router("task", [layer.add_expert(4), layer.add_expert(4)])
    with torch.no_grad():
        image_after = tiny_backbone.encode_images(images, Routes.uniform("task", 4))
        text_after = tiny_backbone.encode_texts(tokens, Routes.uniform("task", 3))
        image_unrouted = tiny_backbone.encode_images(images)

    assert torch.allclose(image_after, image_before, atol=1e-5)
    assert torch.allclose(text_after, text_before, atol=1e-5)
    assert torch.allclose(image_unrouted, image_before, atol=1e-5)


def test_moe_remove_expert_updates_routers():
    layer = layer_with([4, 4, 4])
    layer.add_router("a", [0, 1, 2])
    layer.add_router("b", [1, 2])
    randomise(layer)
    weight_a = layer.routers["a"].weight.detach().clone()

    layer.remove_expert(1)

    assert layer.expert_ids == [0, 2]
    assert layer.routers["a"].expert_ids == [0, 2]
    assert layer.routers["b"].expert_ids == [2]
    assert torch.equal(layer.routers["a"].weight, weight_a[[0, 2]])
    assert layer.routers["a"].mask.tolist() == [True, True]
    u, z = inputs()
    assert torch.allclose(run(layer, u, z, ["a", "b"], [0, 1, 0, 1, 0, 1]), naive(layer, u, z, ["a", "b"], [0, 1, 0, 1, 0, 1]), atol=1e-5)


def test_moe_remove_unknown_expert_raises():
    layer = layer_with([4])

    with pytest.raises(KeyError, match="5"):
        layer.remove_expert(5)


def test_moe_expert_ids_never_reused():
    layer = layer_with([4, 4])
    layer.remove_expert(1)

    assert layer.add_expert(4) == 2


def test_moe_mask_switches_expert_off():
    masked = layer_with([4, 4, 4])
    masked.add_router("task", [0, 1, 2])
    randomise(masked)
    reference = layer_with([4, 4])
    reference.add_router("task", [0, 1])
    with torch.no_grad():
        for reference_id, masked_id in ((0, 0), (1, 2)):
            reference.expert(reference_id).A.copy_(masked.expert(masked_id).A)
            reference.expert(reference_id).B.copy_(masked.expert(masked_id).B)
        reference.routers["task"].weight.copy_(masked.routers["task"].weight[[0, 2]])
    u, z = inputs()

    masked.routers["task"].set_mask([0, 2])

    probabilities = masked.routers["task"].probabilities(z)
    assert torch.equal(probabilities[:, 1], torch.zeros(6))
    assert torch.allclose(probabilities.sum(dim=-1), torch.ones(6))
    assert torch.allclose(run(masked, u, z, ["task"], [0] * 6), run(reference, u, z, ["task"], [0] * 6), atol=1e-5)


def test_moe_mask_all_off_adds_nothing():
    layer = layer_with([4, 4])
    layer.add_router("task", [0, 1])
    randomise(layer)
    layer.routers["task"].set_mask([])
    u, z = inputs()

    assert torch.equal(run(layer, u, z, ["task"], [0] * 6), torch.zeros(6, 5, OUT))


def test_router_mask_unknown_expert_raises():
    router = Router(IN, [3, 4])

    with pytest.raises(ValueError, match="9"):
        router.set_mask([9])


def test_router_topk_keeps_k_and_renormalises():
    router = Router(IN, [0, 1, 2, 3, 4], gating="topk", top_k=2)
    with torch.no_grad():
        router.weight.copy_(torch.randn(5, IN, generator=torch.Generator().manual_seed(3)))
    z = torch.randn(8, IN, generator=torch.Generator().manual_seed(4))

    gates, dense = router.gates(z)

    assert ((gates > 0).sum(dim=-1) == 2).all()
    assert torch.allclose(gates.sum(dim=-1), torch.ones(8), atol=1e-6)
    top = dense.topk(2, dim=-1)
    assert torch.equal((gates > 0), torch.zeros_like(gates, dtype=torch.bool).scatter(-1, top.indices, True))
    kept = gates.gather(-1, top.indices)
    assert torch.allclose(kept, top.values / top.values.sum(dim=-1, keepdim=True), atol=1e-6)


def test_router_topk_single_unmasked_gets_one():
    router = Router(IN, [0, 1, 2], gating="topk", top_k=2)
    router.set_mask([1])
    z = torch.randn(4, IN)

    gates, _ = router.gates(z)

    assert torch.equal(gates[:, 1], torch.ones(4))
    assert torch.equal(gates[:, [0, 2]], torch.zeros(4, 2))


def test_router_uniform_without_weights():
    router = Router(IN, [0, 1, 2, 3], learnable=False)

    gates, _ = router.gates(torch.randn(3, IN))

    assert router.weight is None
    assert torch.allclose(gates, torch.full((3, 4), 0.25))


def test_router_rejects_duplicate_experts():
    with pytest.raises(ValueError, match="unique"):
        Router(IN, [1, 1])


# ---- structure round trip ----------------------------------------------------------------------


def test_moe_describe_rebuild_round_trip():
    layer = layer_with([2, 4, 4, 8], ["none", "relu", "gelu", "none"], [1.0, 0.5, 2.0, 0.1])
    layer.add_router("old", [0, 1], gating="dense")
    layer.add_router("new", [0, 1, 2, 3], gating="topk", top_k=2)
    layer.add_router("fixed", [3], learnable=False)
    layer.routers["new"].set_mask([1, 2, 3])
    layer.expert(0).set_trainable(False)
    layer.remove_expert(2)
    randomise(layer)

    copy = MoELayer(IN, OUT, name="copy")
    copy.rebuild(layer.describe())
    copy.load_state_dict(layer.state_dict(), strict=True)

    assert copy.describe() == layer.describe()
    assert copy.expert(0).frozen
    assert not copy.expert(1).frozen
    assert copy.add_expert(4) == layer.next_expert_id
    u, z = inputs()
    keys, assignment = ["old", "new", "fixed"], [0, 1, 2, -1, 1, 0]
    assert torch.equal(run(copy, u, z, keys, assignment), run(layer, u, z, keys, assignment))
