"""Expert injection targets in open_clip's timm convolutional image towers and Hugging Face text towers.

Both finders register with :func:`igsp.inject.register_tower_finder` when :mod:`igsp.backbones`
is imported, so :meth:`igsp.backbone.Backbone.inject` works on igsp-lite and on open_clip's
ConvNeXt-timm configurations.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from torch import nn

from igsp.exceptions import InjectionError
from igsp.inject import InjectionTarget, pooled_channels, register_tower_finder
from igsp.moe import RoutingContext

__all__ = [
    "timm_conv_targets",
    "hf_text_targets",
    "matching_conv_blocks",
    "register_finders",
]

logger = logging.getLogger(__name__)

# Shape-matching blocks per timm trunk: a probe forward pass finds them once per model.
_BLOCK_CACHE: "weakref.WeakKeyDictionary[nn.Module, list[tuple[str, int]]]" = weakref.WeakKeyDictionary()


# ---- timm convolutional image towers --------------------------------------------------------------


def _candidate_blocks(trunk: nn.Module) -> dict[str, nn.Module]:
    """Return the numbered children of ``nn.Sequential`` containers that contain a convolution.

    These are the residual blocks of timm's EfficientNet, MobileNet, ResNet and ConvNeXt models
    (``blocks.2.1``, ``layer3.0``, ``stages.1.blocks.0``) and, in ConvNeXt, the stages themselves.
    """
    modules = dict(trunk.named_modules())
    candidates = {}
    for name, module in modules.items():
        parent_name, _, index = name.rpartition(".")
        parent = modules.get(parent_name)
        if not index.isdigit() or not isinstance(parent, (nn.Sequential, nn.ModuleList)):
            continue
        if isinstance(module, (nn.Sequential, nn.ModuleList)) or not any(True for _ in module.children()):
            continue
        if any(isinstance(child, nn.Conv2d) for child in module.modules()):
            candidates[name] = module
    return candidates


def matching_conv_blocks(trunk: nn.Module, image_size: tuple[int, int]) -> list[tuple[str, int]]:
    """Return ``(name, channels)`` of the trunk's blocks whose input and output shapes are equal.

    A probe forward pass on one blank image of ``image_size`` records every candidate block's
    input and output shapes. Only 4-d maps (N, C, H, W) that keep their shape qualify. A
    qualifying block that contains another qualifying block (a ConvNeXt stage) is left out in
    favour of the inner ones. BatchNorm statistics do not change, because the probe runs in
    eval mode without gradients.
    """
    if trunk in _BLOCK_CACHE:
        return _BLOCK_CACHE[trunk]
    candidates = _candidate_blocks(trunk)
    shapes = _probe_shapes(trunk, candidates, image_size)
    matching = [name for name in candidates if name in shapes and shapes[name][0] == shapes[name][1]]
    innermost = [name for name in matching if not any(other.startswith(name + ".") for other in matching)]
    blocks = [(name, shapes[name][0][1]) for name in innermost]
    _BLOCK_CACHE[trunk] = blocks
    return blocks


def _probe_shapes(
    trunk: nn.Module, candidates: dict[str, nn.Module], image_size: tuple[int, int]
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if inputs and torch.is_tensor(inputs[0]) and torch.is_tensor(output):
                if inputs[0].dim() == 4 and output.dim() == 4:
                    shapes[name] = (tuple(inputs[0].shape), tuple(output.shape))

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in candidates.items()]
    reference = next(trunk.parameters())
    probe = torch.zeros(1, 3, *image_size, device=reference.device, dtype=reference.dtype)
    was_training = trunk.training
    trunk.eval()
    try:
        with torch.no_grad():
            trunk(probe)
    finally:
        trunk.train(was_training)
        for handle in handles:
            handle.remove()
    return shapes


def timm_conv_targets(model: nn.Module) -> list[InjectionTarget]:
    """List the shape-keeping blocks of an open_clip timm convolutional image tower.

    Each expert branch runs in parallel with a whole block (its residual included): it reads the
    block's input map and adds to the block's output map, layout ``"channels_first"``. A block's
    routing token is the global average pool of its input map. Timm towers without such blocks
    (vision transformers) yield no target.
    """
    from open_clip.timm_model import TimmModel

    visual = getattr(model, "visual", None)
    if not isinstance(visual, TimmModel):
        return []
    prefix = _qualified_name(model, visual.trunk)
    modules = dict(visual.trunk.named_modules())
    targets = []
    for name, channels in matching_conv_blocks(visual.trunk, tuple(visual.image_size)):
        targets.append(
            InjectionTarget(
                name=f"{prefix}.{name}",
                tower="image",
                module=modules[name],
                in_features=channels,
                out_features=channels,
                layout="channels_first",
                routing_token=pooled_channels,
            )
        )
    return targets


# ---- Hugging Face text towers ---------------------------------------------------------------------


class _AttentionMaskRecorder:
    """Keeps the attention mask of the text batch that the HF text tower is encoding.

    open_clip's ``HFTextEncoder.forward(ids)`` derives the mask as ``ids != pad_token_id``. A
    forward pre-hook stores the same mask here and a forward hook clears it afterwards. The
    routing function of every layer reads it to average over real tokens only.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id
        self.mask: torch.Tensor | None = None

    def start(self, module: nn.Module, inputs: tuple) -> None:
        self.mask = inputs[0] != self.pad_token_id

    def stop(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        self.mask = None

    def masked_mean(self, u: torch.Tensor, context: RoutingContext) -> torch.Tensor:
        """Return each prompt's mean hidden state over its attention mask, (N, D)."""
        if self.mask is None or self.mask.shape != u.shape[:2]:
            raise InjectionError(
                "The HF text tower's experts route on the mean over the attention mask, but no mask of "
                f"shape {tuple(u.shape[:2])} was recorded; encode text through the CLIP model's "
                "encode_text (or Backbone.encode_texts), not through its inner transformer."
            )
        weights = self.mask.to(device=u.device, dtype=u.dtype).unsqueeze(-1)
        return (u * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _mask_recorder(text: nn.Module) -> _AttentionMaskRecorder:
    """Return the text tower's mask recorder, attaching its two hooks on the first call only."""
    recorder = getattr(text, "_igsp_mask_recorder", None)
    if recorder is None:
        recorder = _AttentionMaskRecorder(int(text.config.pad_token_id))
        text.register_forward_pre_hook(recorder.start)
        text.register_forward_hook(recorder.stop)
        text._igsp_mask_recorder = recorder
    return recorder


def hf_text_targets(model: nn.Module) -> list[InjectionTarget]:
    """List the feed-forward parts of an open_clip HF text tower of BERT layout (BERT, RoBERTa, MiniLM).

    A BERT layer is post-LayerNorm: with ``a`` the normalised output of the attention sublayer,
    the feed-forward part computes ``LayerNorm(W2 gelu(W1 a) + a)``, split across the modules
    ``intermediate`` (``gelu(W1 a)``) and ``output`` (``W2``, dropout, residual sum, LayerNorm).
    The expert branch attaches to ``intermediate``: it reads ``a``, the normalised hidden state,
    and adds its output (width of W1's output) to ``gelu(W1 a)``, so the layer computes
    ``LayerNorm(W2 (gelu(W1 a) + experts(a)) + a)``. The experts thus run in parallel with the
    feed-forward part, before the residual sum and LayerNorm, and their up-projection passes
    through the frozen linear W2. At ``B = 0`` the layer is unchanged.

    The routing token is the mean of the layer input over the attention mask, not the [CLS]
    token. all-MiniLM-L6-v2 was trained with mean pooling, and its [CLS] output was never trained
    as a sentence summary. The tower pools that same mean, so the router reads the summary that
    the tower itself uses, as routing in CLIP's text transformer reads the token it pools.
    """
    from open_clip.hf_model import HFTextEncoder

    text = getattr(model, "text", None)
    if not isinstance(text, HFTextEncoder):
        return []
    encoder = getattr(text.transformer, "encoder", text.transformer)
    layers = getattr(encoder, "layer", None)
    if layers is None:
        return []
    recorder = None
    targets = []
    for layer in layers:
        intermediate = getattr(layer, "intermediate", None)
        dense = getattr(intermediate, "dense", None)
        if not isinstance(dense, nn.Linear) or not hasattr(layer, "output"):
            continue
        recorder = recorder or _mask_recorder(text)
        targets.append(
            InjectionTarget(
                name=_qualified_name(model, intermediate),
                tower="text",
                module=intermediate,
                in_features=dense.in_features,
                out_features=dense.out_features,
                layout="tokens",
                routing_token=recorder.masked_mean,
            )
        )
    return targets


def _qualified_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise InjectionError(f"Module {type(module).__name__} is not part of {type(model).__name__}.")


def register_finders() -> None:
    """Register both finders with :func:`igsp.inject.register_tower_finder` (repeat calls are harmless)."""
    register_tower_finder("timm_conv", timm_conv_targets)
    register_tower_finder("hf_text", hf_text_targets)
