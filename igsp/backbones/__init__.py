"""Named backbones beyond open_clip's architectures, and expert injection into non-ViT towers.

Importing this package registers ``igsp-lite`` with :func:`igsp.backbone.register_backbone` and
the timm convolutional and Hugging Face text tower finders with
:func:`igsp.inject.register_tower_finder`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from igsp.backbone import register_backbone
from igsp.backbones.lite import NAME as IGSP_LITE
from igsp.backbones.lite import create_igsp_lite, heads_path
from igsp.backbones.towers import hf_text_targets, register_finders, timm_conv_targets

__all__ = ["IGSP_LITE", "BUILDERS", "BuildStep", "create_igsp_lite", "hf_text_targets", "timm_conv_targets"]


@dataclass(frozen=True)
class BuildStep:
    """The one-off offline step of a named backbone: ``build(cache_dir, force)`` and the file it writes."""

    build: Callable[..., Any]
    artifact: Callable[[str | os.PathLike | None], Path]


def _build_igsp_lite(cache_dir: str | os.PathLike | None = None, force: bool = False) -> Any:
    from igsp.backbones.align import build_igsp_lite

    return build_igsp_lite(cache_dir=cache_dir, force=force)


# Named backbones that `igsp backbone build NAME` builds.
BUILDERS: dict[str, BuildStep] = {IGSP_LITE: BuildStep(_build_igsp_lite, heads_path)}

register_backbone(IGSP_LITE, create_igsp_lite)
register_finders()
