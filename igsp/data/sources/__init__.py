"""Readers of the packaged data sources behind the offline streams of ``igsp.data.offline``."""

from __future__ import annotations

from igsp.data.sources.registry import SOURCES, OfflineSource, find_missing_sources, resolve_roots

__all__ = ["SOURCES", "OfflineSource", "find_missing_sources", "resolve_roots"]
