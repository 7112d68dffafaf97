"""Plugin discovery and the plugin managers of the registry and of each training loop.

Installed plugins register through the entry-point group ``igsp``. Discovery is lazy: nothing is
imported until :func:`get_registry` is first called. Environment variables control it:

* ``IGSP_LOAD_PLUGINS``: comma-separated entry-point names to load; unset loads all installed
  plugins, an empty string loads none;
* ``IGSP_DISABLE_PLUGINS``: comma-separated entry-point names never to load;
* ``IGSP_TRACE_HOOKS=1``: log every loop hook call at DEBUG level.
"""

from __future__ import annotations

import importlib
import logging
import os
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterable

import pluggy

from .exceptions import CancelBatch, CancelPhase, CancelRun, CancelTask, ConfigError, IgspError, PluginError
from .hookspecs import PROJECT, LoopSpec, RegistrySpec

__all__ = [
    "ENTRY_POINT_GROUP",
    "BUILTIN_PLUGINS",
    "Registry",
    "RegistryEntry",
    "get_registry",
    "reset_registry",
    "make_loop_manager",
    "HookCaller",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "igsp"
BUILTIN_PLUGINS = (
    "igsp.strategies.builtin",
    "igsp.selectors",
    "igsp.data.streams",
    "igsp.regularisers",
    "igsp.contrib.routing_mass",
)
CONTROL_FLOW = (CancelBatch, CancelPhase, CancelTask, CancelRun, KeyboardInterrupt)


@dataclass
class RegistryEntry:
    """A named component and the plugin that registered it."""

    name: str
    factory: Callable[..., Any]
    description: str
    plugin: str


@dataclass
class Registry:
    """Named strategies, selectors, streams and regularisers from built-in and installed plugins."""

    manager: pluggy.PluginManager
    strategies: dict[str, RegistryEntry] = field(default_factory=dict)
    selectors: dict[str, RegistryEntry] = field(default_factory=dict)
    streams: dict[str, RegistryEntry] = field(default_factory=dict)
    regularisers: dict[str, RegistryEntry] = field(default_factory=dict)
    distributions: dict[str, str] = field(default_factory=dict)

    def get(self, kind: str, name: str) -> RegistryEntry:
        """Return the entry ``name`` of ``kind`` (strategy, selector or stream) or raise ConfigError."""
        table = {
            "strategy": self.strategies,
            "selector": self.selectors,
            "stream": self.streams,
            "regulariser": self.regularisers,
        }[kind]
        if name not in table:
            raise ConfigError(
                f"Unknown {kind} {name!r}; available: {sorted(table)}. "
                f"Install the plugin that provides it, or check `igsp plugins`."
            )
        return table[name]


_registry: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """Build the registry once (built-ins, then allowed entry points) and return it."""
    global _registry
    if _registry is None or refresh:
        _registry = _build_registry()
    return _registry


def reset_registry() -> None:
    """Forget the registry so the next :func:`get_registry` rediscovers plugins."""
    global _registry
    _registry = None


def _split_env(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def _build_registry() -> Registry:
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(RegistrySpec)
    registry = Registry(manager)
    for module_name in BUILTIN_PLUGINS:
        manager.register(importlib.import_module(module_name), name=module_name)
    for entry_point in _allowed_entry_points():
        _load_entry_point(manager, registry, entry_point)
    manager.check_pending()
    _collect(registry)
    return registry


def _allowed_entry_points() -> list[metadata.EntryPoint]:
    allowed = _split_env("IGSP_LOAD_PLUGINS")
    blocked = set(_split_env("IGSP_DISABLE_PLUGINS") or [])
    points = []
    installed = {entry_point.name for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    unknown = sorted(set(allowed or []) - installed)
    if unknown:
        logger.warning("IGSP_LOAD_PLUGINS names %s, which are not installed; installed plugins: %s.", unknown, sorted(installed))
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in blocked or (allowed is not None and entry_point.name not in allowed):
            logger.debug("Skipping plugin %s (IGSP_LOAD_PLUGINS / IGSP_DISABLE_PLUGINS).", entry_point.name)
            continue
        points.append(entry_point)
    return points


def _load_entry_point(manager: pluggy.PluginManager, registry: Registry, entry_point: metadata.EntryPoint) -> None:
    try:
        plugin = entry_point.load()
    except Exception as error:
        raise PluginError(
            f"Plugin {entry_point.name!r} ({entry_point.value}) failed to import: {error!r}. "
            f"Fix or uninstall it, or skip it with IGSP_DISABLE_PLUGINS={entry_point.name}."
        ) from error
    manager.register(plugin, name=entry_point.name)
    distribution = getattr(entry_point, "dist", None)
    if distribution is not None:
        registry.distributions[entry_point.name] = f"{distribution.name} {distribution.version}"


def _collect(registry: Registry) -> None:
    hooks = registry.manager.hook
    for kind, table, hook in (
        ("strategy", registry.strategies, hooks.igsp_register_strategies),
        ("selector", registry.selectors, hooks.igsp_register_selectors),
        ("stream", registry.streams, hooks.igsp_register_streams),
        ("regulariser", registry.regularisers, hooks.igsp_register_regularisers),
    ):
        for implementation in reversed(hook.get_hookimpls()):
            register = _make_register(kind, table, implementation.plugin_name)
            try:
                implementation.function(register=register)
            except Exception as error:
                raise PluginError(
                    f"Plugin {implementation.plugin_name!r} raised {error!r} while registering {kind}s."
                ) from error


def _make_register(kind: str, table: dict[str, RegistryEntry], plugin: str) -> Callable[..., None]:
    def register(name: str, factory: Callable[..., Any], description: str = "") -> None:
        if name in table:
            logger.warning(
                "%s %r from plugin %s replaces the one from %s.", kind.capitalize(), name, plugin, table[name].plugin
            )
        table[name] = RegistryEntry(name, factory, description, plugin)

    return register


def make_loop_manager(plugins: Iterable[tuple[str, object]]) -> pluggy.PluginManager:
    """Return a loop plugin manager with ``plugins`` registered in the given order.

    pluggy calls implementations last-registered first, so list the defaults first and the
    user's callbacks last. Unknown ``igsp_*`` methods are errors (misspelt hook names).
    """
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(LoopSpec)
    for name, plugin in plugins:
        manager.register(plugin, name=name)
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as error:
        raise PluginError(f"A plugin implements an unknown hook: {error}") from error
    if os.environ.get("IGSP_TRACE_HOOKS") == "1":
        manager.trace.root.setwriter(lambda message: logger.debug(message.rstrip()))
        manager.enable_tracing()
    return manager


class HookCaller:
    """Calls loop hooks and names the plugin and the hook when an implementation raises."""

    def __init__(self, manager: pluggy.PluginManager) -> None:
        self.manager = manager

    def __getattr__(self, hook_name: str) -> Callable[..., Any]:
        if not hook_name.startswith("igsp_"):
            raise AttributeError(hook_name)
        hook = getattr(self.manager.hook, hook_name)

        def call(**kwargs: Any) -> Any:
            try:
                return hook(**kwargs)
            except CONTROL_FLOW:
                raise
            except IgspError:
                raise
            except Exception as error:
                plugin = blame_plugin(hook, error)
                raise PluginError(
                    f"Plugin {plugin!r} raised {type(error).__name__} in hook {hook_name}: {error}"
                ) from error

        return call


def blame_plugin(hook: Any, error: BaseException) -> str:
    """Return the name of the plugin whose implementation of ``hook`` raised ``error``."""
    codes = {impl.function.__code__: impl.plugin_name for impl in hook.get_hookimpls()}
    blamed = "unknown"
    for frame, _ in traceback.walk_tb(error.__traceback__):
        if frame.f_code in codes:
            blamed = codes[frame.f_code]
    return blamed
