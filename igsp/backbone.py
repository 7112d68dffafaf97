"""The frozen CLIP backbone: loading from open_clip, expert injection and routed encoding.

A :class:`Backbone` wraps an open_clip model with its tokenizer and image transform. Its own
parameters are frozen; the experts and routers that strategies add live in ``backbone.experts``
(one :class:`~igsp.moe.MoELayer` per injected block), so a checkpoint of the added parameters is
``backbone.added_state_dict()`` and never contains backbone weights.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .exceptions import BackboneError
from .inject import TOWERS, InjectionTarget, attach_layer, find_targets
from .moe import MoELayer, RoutingContext

__all__ = [
    "Backbone",
    "Routes",
    "load_backbone",
    "register_backbone",
    "list_backbones",
    "CONFIG_DIR",
    "CHECKPOINT_SUFFIXES",
]

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")

BackboneFactory = Callable[..., "Backbone"]
_BACKBONES: dict[str, BackboneFactory] = {}
_configs_registered = False


@dataclass
class Routes:
    """Per-sample router assignment: sample n uses ``keys[assignment[n]]``, or no experts for -1."""

    keys: list[str]
    assignment: torch.Tensor

    @classmethod
    def uniform(cls, key: str | None, batch_size: int, device: torch.device | str = "cpu") -> "Routes | None":
        """Send every sample of a batch through router ``key`` (None: the frozen backbone)."""
        if key is None:
            return None
        return cls([key], torch.zeros(batch_size, dtype=torch.long, device=device))


def register_backbone(name: str, factory: BackboneFactory) -> None:
    """Register a named backbone builder, called as ``factory(pretrained=..., cache_dir=...)``."""
    _BACKBONES[name] = factory


def list_backbones() -> list[str]:
    """Return igsp's named backbones and every open_clip architecture name."""
    import open_clip

    _register_configs()
    return sorted(set(_BACKBONES) | set(open_clip.list_models()))


def _register_configs() -> None:
    """Register igsp's open_clip configs and its named backbones (with their tower finders) once."""
    global _configs_registered
    if not _configs_registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _configs_registered = True
        from . import backbones  # noqa: F401  registers igsp-lite and the conv / HF tower finders


class Backbone(nn.Module):
    """A frozen CLIP model with its tokenizer, transform and the experts injected into it."""

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        transform: Callable,
        name: str = "",
        pretrained: str = "",
        train_transform: Callable | None = None,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.transform = transform
        self.train_transform = train_transform or transform
        self.name = name
        self.pretrained = pretrained
        self.experts = nn.ModuleDict()
        self.layer_names: dict[str, str] = {}
        self.contexts = {tower: RoutingContext() for tower in TOWERS}
        self.always_record = False
        self._targets: dict[str, InjectionTarget] = {}
        self._handles: dict[str, Any] = {}
        self.freeze()

    # ---- frozen backbone ---------------------------------------------------------------------

    def freeze(self) -> None:
        for parameter in self.clip.parameters():
            parameter.requires_grad_(False)
        self.clip.eval()

    def train(self, mode: bool = True) -> "Backbone":
        """Switch experts and routers to ``mode``; the frozen CLIP stays in eval mode."""
        self.training = mode
        self.experts.train(mode)
        self.clip.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().clamp(max=100.0)

    # ---- injection ---------------------------------------------------------------------------

    def inject(self, towers: Sequence[str] = TOWERS, blocks: Sequence[int] | None = None) -> list[str]:
        """Attach an empty MoE layer beside every selected block and return the layer keys.

        Blocks that already carry a layer are kept, so calling this twice is harmless.
        """
        keys = []
        for target in find_targets(self.clip, towers, blocks):
            key = target.name.replace(".", "-")
            keys.append(key)
            if key in self.experts:
                continue
            layer = MoELayer(target.in_features, target.out_features, name=target.name).to(self.device)
            self.experts[key] = layer
            self.layer_names[key] = target.tower
            self._targets[key] = target
            self._handles[key] = attach_layer(target, layer, self.contexts[target.tower])
        logger.debug("Injected MoE layers into %d blocks: %s", len(keys), keys)
        return keys

    def remove_experts(self) -> None:
        """Detach every MoE layer, which restores the plain backbone."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self._targets.clear()
        self.layer_names.clear()
        for key in list(self.experts.keys()):
            del self.experts[key]

    def layers(self, tower: str | None = None) -> list[tuple[str, MoELayer]]:
        """Return ``(key, layer)`` pairs, optionally of one tower, in injection order."""
        return [(key, layer) for key, layer in self.experts.items() if tower is None or self.layer_names[key] == tower]

    def tower_of(self, key: str) -> str:
        return self.layer_names[key]

    # ---- routed encoding ---------------------------------------------------------------------

    @contextlib.contextmanager
    def routing(
        self,
        tower: str,
        routes: Routes | None,
        record: bool = False,
        capture: bool = False,
        token_index: torch.Tensor | None = None,
    ) -> Iterator[RoutingContext]:
        """Set the routing of one tower for the forward passes inside the block."""
        context = self.contexts[tower]
        context.route_keys = list(routes.keys) if routes is not None else []
        context.assignment = routes.assignment if routes is not None else None
        context.record = record or self.always_record
        context.capture = capture
        context.token_index = token_index
        try:
            yield context
        finally:
            context.route_keys = []
            context.assignment = None
            context.record = False
            context.capture = False
            context.token_index = None

    def encode_images(
        self,
        images: torch.Tensor,
        routes: Routes | None = None,
        record: bool = False,
        capture: bool = False,
    ) -> torch.Tensor:
        """Return L2-normalised image features, each sample routed as ``routes`` assigns it."""
        with self.routing("image", routes, record=record, capture=capture):
            features = self.clip.encode_image(images)
        return F.normalize(features.float(), dim=-1)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_texts(
        self,
        tokens: torch.Tensor,
        routes: Routes | None = None,
        record: bool = False,
        capture: bool = False,
    ) -> torch.Tensor:
        """Return L2-normalised text features of tokenized prompts."""
        token_index = text_routing_index(self.clip, tokens)
        with self.routing("text", routes, record=record, capture=capture, token_index=token_index):
            features = self.clip.encode_text(tokens)
        return F.normalize(features.float(), dim=-1)

    # ---- added parameters ------------------------------------------------------------------

    def added_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the experts' and routers' tensors only, detached and on the CPU."""
        return {key: value.detach().cpu().clone() for key, value in self.experts.state_dict().items()}

    def load_added_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load expert and router tensors into a structure built by :meth:`rebuild`."""
        missing, unexpected = self.experts.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise BackboneError(
                "The saved expert weights do not fit the rebuilt expert structure: "
                f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}."
            )

    def structure(self) -> dict[str, Any]:
        """Return every layer's experts and routers as plain data."""
        return {key: layer.describe() for key, layer in self.experts.items()}

    def rebuild(self, structure: dict[str, Any]) -> None:
        """Recreate the saved expert structure; the layers themselves must already be injected."""
        unknown = sorted(set(structure) - set(self.experts.keys()))
        if unknown:
            raise BackboneError(
                f"The saved structure names layers {unknown[:5]} that this backbone has not injected; "
                "the checkpoint was made with another backbone or injection setting."
            )
        for key, layer_structure in structure.items():
            self.experts[key].rebuild(layer_structure)

    def count_added_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.experts.parameters() if p.requires_grad or not trainable_only)


def text_routing_index(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Return each prompt's routing-token position: the token that the text tower pools."""
    pool_type = getattr(clip, "text_pool_type", None)
    if pool_type == "argmax":
        return tokens.argmax(dim=-1)
    if pool_type == "eos":
        return (tokens == clip.text_eos_id).int().argmax(dim=-1)
    if pool_type == "last":
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long)
    return torch.zeros(tokens.shape[0], dtype=torch.long)


def load_backbone(
    model: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
) -> Backbone:
    """Build a frozen backbone from a registered name or an open_clip architecture.

    ``pretrained`` is empty for random weights, an open_clip pretrained tag (downloaded by
    open_clip into its cache on a machine with internet), or the path of a local checkpoint
    (``.pt``, ``.pth``, ``.bin`` or ``.safetensors``).
    """
    pretrained = pretrained or ""
    _register_configs()
    if model in _BACKBONES:
        backbone = _BACKBONES[model](pretrained=pretrained, cache_dir=cache_dir)
    else:
        backbone = _load_open_clip(model, pretrained, cache_dir)
    return backbone.to(device)


def _load_open_clip(model: str, pretrained: str, cache_dir: str | None) -> Backbone:
    import open_clip

    _register_configs()
    _check_model_name(model)
    checkpoint = _resolve_pretrained(model, pretrained)
    try:
        clip, train_transform, transform = open_clip.create_model_and_transforms(
            model, pretrained=checkpoint or None, cache_dir=cache_dir
        )
    except (RuntimeError, AssertionError) as error:
        # open_clip asserts on a changed positional-embedding width before load_state_dict runs.
        mismatch = isinstance(error, AssertionError) or any(
            text in str(error) for text in ("size mismatch", "Missing key", "Unexpected key")
        )
        if checkpoint and mismatch:
            raise BackboneError(
                f"Checkpoint {checkpoint!r} does not fit architecture {model!r}: {_first_lines(error)} "
                "Pick the architecture that the checkpoint was trained with."
            ) from error
        raise
    tokenizer = open_clip.get_tokenizer(model)
    logger.info("Loaded backbone %s (%s).", model, checkpoint or "random weights")
    return Backbone(clip, tokenizer, transform, name=model, pretrained=checkpoint, train_transform=train_transform)


def _check_model_name(model: str) -> None:
    import open_clip

    if model.startswith(("hf-hub:", "local-dir:")):
        return
    available = open_clip.list_models()
    if model not in available:
        close = difflib.get_close_matches(model, available + list(_BACKBONES), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise BackboneError(
            f"Unknown backbone {model!r}.{hint} Run `igsp backbone list` for the names, or register "
            "a config with open_clip.add_model_config."
        )


def _resolve_pretrained(model: str, pretrained: str) -> str:
    """Return a checkpoint path or tag after checking that it exists."""
    import open_clip

    if not pretrained:
        return ""
    looks_like_path = pretrained.endswith(CHECKPOINT_SUFFIXES) or "/" in pretrained or "\\" in pretrained
    if looks_like_path:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise BackboneError(
                f"Checkpoint file {str(path)!r} does not exist. Pass an existing .pt/.safetensors file "
                "or an open_clip pretrained tag."
            )
        return str(path)
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        raise BackboneError(
            f"Unknown pretrained tag {pretrained!r} for {model!r}; available tags: {tags or 'none'}. "
            "A local checkpoint path also works."
        )
    return pretrained


def _first_lines(error: Exception, count: int = 3) -> str:
    return " ".join(str(error).strip().splitlines()[:count])
