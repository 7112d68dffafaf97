"""Exceptions and warnings raised by igsp."""

from __future__ import annotations

__all__ = [
    "IgspError",
    "ConfigError",
    "DataError",
    "SourceNotInstalledError",
    "BackboneError",
    "InjectionError",
    "PluginError",
    "CheckpointError",
    "CancelBatch",
    "CancelPhase",
    "CancelTask",
    "CancelRun",
    "IgspWarning",
]


class IgspError(Exception):
    """Base class of igsp's errors."""


class ConfigError(IgspError, ValueError):
    """An invalid recipe or setting: the message names the key and the accepted values."""


class DataError(IgspError):
    """A dataset that is missing, incomplete or corrupt."""


class SourceNotInstalledError(DataError):
    """A packaged data source that is not installed; the message gives the install command."""


class BackboneError(IgspError):
    """A backbone that cannot be built or loaded."""


class InjectionError(IgspError):
    """Expert injection that matched no block or met an unsupported module."""


class PluginError(IgspError):
    """A plugin that failed to load or raised inside a hook."""


class CheckpointError(IgspError):
    """A checkpoint that is missing, corrupt or does not fit the run."""


class CancelBatch(Exception):
    """Raised by a hook to skip the rest of the current training batch."""


class CancelPhase(Exception):
    """Raised by a hook to end the current training phase of a task."""


class CancelTask(Exception):
    """Raised by a hook to end training on the current task; evaluation still runs."""


class CancelRun(Exception):
    """Raised by a hook to stop the run after the current task's checkpoint."""


class IgspWarning(UserWarning):
    """Base class of igsp's warnings."""
