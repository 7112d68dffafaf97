"""The zero-shot reference: no training, the frozen backbone classifies every task."""

from __future__ import annotations

from ..hookspecs import hookimpl
from .base import Strategy

__all__ = ["ZeroShot"]


class ZeroShot(Strategy):
    """Adds nothing and trains nothing; its accuracy matrix is the zero-shot row repeated."""

    name = "zeroshot"

    @hookimpl
    def igsp_param_groups(self) -> list:
        return []
