"""Shared pieces of strategy plugins: option parsing and expert bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..options import parse_options

if TYPE_CHECKING:
    from ..learner import ContinualLearner

__all__ = ["Strategy", "NoOptions", "inject_from_settings"]


@dataclass
class NoOptions:
    """A strategy without options of its own."""


class Strategy:
    """Base class for strategy plugins: parses ``options`` into ``self.config``.

    Subclasses set ``name`` and ``Config`` (a dataclass) and implement loop hooks with
    ``@hookimpl``. The base class implements no hook, so a strategy only does what it declares.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoOptions

    def __init__(self, **options: Any) -> None:
        self.config = parse_options(self.Config, options, f"strategy {self.name!r}")


def inject_from_settings(learner: ContinualLearner) -> list[str]:
    """Inject MoE layers where the recipe's ``[adapter]`` section places them and return their keys."""
    settings = learner.settings.adapter
    return learner.backbone.inject(settings.towers, settings.blocks or None)
