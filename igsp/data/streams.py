"""Built-in stream registrations; each builder is imported only when its stream is requested."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from ..exceptions import ConfigError
from ..hookspecs import hookimpl

__all__ = ["load_stream", "LazyBuilder"]


class LazyBuilder:
    """A stream factory that imports ``module.function`` on first call and checks option names."""

    def __init__(self, module: str, function: str) -> None:
        self.module = module
        self.function = function

    def resolve(self):
        return getattr(importlib.import_module(self.module, __package__), self.function)

    def __call__(self, **options: Any):
        builder = self.resolve()
        accepted = inspect.signature(builder).parameters
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ConfigError(f"Unknown stream option(s) {unknown} for {self.function}; valid: {sorted(accepted)}.")
        return builder(**options)


@hookimpl
def igsp_register_streams(register) -> None:
    register("synthetic", LazyBuilder(".synthetic", "build_synthetic_stream"),
             "three drawn tasks (colors, stripes, quadrants) for tests and smoke runs")
    register("mtil-lite", LazyBuilder(".offline", "build_mtil_lite"),
             "six real offline tasks from packaged datasets (digits, fashion, animals, emoji, textures, textile)")
    register("lookalike", LazyBuilder(".offline", "build_lookalike_stream"),
             "the same digit images under different labels, next to visually different tasks")
    register("mtil", LazyBuilder(".mtil", "build_mtil_stream"),
             "the 11 MTIL datasets from a local data root (orders I and II, few-shot)")


def load_stream(name: str, **options: Any):
    """Build a registered stream by name with its factory's options."""
    from ..plugins import get_registry

    return get_registry().get("stream", name).factory(**options)
