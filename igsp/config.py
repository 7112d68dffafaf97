"""Recipes: TOML files that resolve to :class:`~igsp.settings.RunSettings`, with dotted overrides.

A recipe has the top-level keys ``name``, ``seed``, ``out``, ``deterministic`` and ``extends``
(another recipe whose values this one overrides), and the tables ``[backbone]``, ``[stream]``,
``[train]``, ``[eval]``, ``[adapter]`` and ``[strategy]``. ``[stream]`` and ``[strategy]`` take
``name`` plus the options of the named stream or strategy. Unknown keys and values of the wrong
type are rejected with the key named.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Iterable

from .exceptions import ConfigError
from .options import parse_options
from .settings import (
    AdapterSettings,
    BackboneSettings,
    EvalSettings,
    RunSettings,
    StrategySettings,
    StreamSettings,
    TrainSettings,
)

__all__ = [
    "recipe_dirs",
    "list_recipes",
    "find_recipe",
    "load_recipe",
    "apply_overrides",
    "resolve_settings",
    "settings_from_dict",
    "settings_to_dict",
]

TOP_LEVEL = {"name", "seed", "out", "deterministic", "extends", "description"}
TYPED_SECTIONS = {"backbone": BackboneSettings, "train": TrainSettings, "adapter": AdapterSettings}
NAMED_SECTIONS = {"stream": "name", "strategy": "name", "backbone": "model", "eval": "selector"}
ALIASES = {
    "steps": "train.steps",
    "batch_size": "train.batch_size",
    "selector": "eval.selector",
    "rank": "adapter.rank",
    "data.root": "stream.root",
    "data.layout": "stream.layout",
}


def recipe_dirs() -> list[Path]:
    """Folders searched for recipes: ``$IGSP_RECIPE_PATH`` entries, ./recipes, the source checkout's."""
    folders = [Path(p) for p in os.environ.get("IGSP_RECIPE_PATH", "").split(os.pathsep) if p]
    folders += [Path.cwd() / "recipes", Path(__file__).resolve().parent.parent / "recipes"]
    unique = []
    for folder in folders:
        if folder.is_dir() and folder.resolve() not in [u.resolve() for u in unique]:
            unique.append(folder)
    return unique


def list_recipes() -> dict[str, Path]:
    """Return recipe names and their files, earlier folders taking precedence."""
    found: dict[str, Path] = {}
    for folder in recipe_dirs():
        for path in sorted(folder.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def find_recipe(name_or_path: str) -> Path:
    """Return the file of a recipe given by name or path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"Recipe file {str(path)!r} does not exist.")
        return path
    recipes = list_recipes()
    if name_or_path not in recipes:
        raise ConfigError(
            f"Unknown recipe {name_or_path!r}; available: {sorted(recipes)}. "
            "Pass a .toml path or set IGSP_RECIPE_PATH."
        )
    return recipes[name_or_path]


def load_recipe(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a recipe (following ``extends``) into a plain nested dict."""
    path = find_recipe(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"Recipe {str(path)!r} is not valid TOML: {error}.") from error
    parent = data.pop("extends", None)
    if parent is None:
        return data
    sibling = path.parent / str(parent)
    if str(parent).endswith(".toml") and not Path(parent).is_absolute() and sibling.is_file():
        parent = str(sibling)  # a relative recipe path is read next to the recipe that names it
    if parent in _seen:
        raise ConfigError(f"Recipe {str(path)!r} extends {parent!r}, which extends it again.")
    base = load_recipe(parent, _seen + (name_or_path,))
    return deep_merge(base, data)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_value(text: str) -> Any:
    """Parse an override value as TOML (numbers, booleans, lists, quoted strings), else as a bare string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(recipe: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides in order.

    A bare table name sets that table's main key: ``strategy=igsp`` sets ``strategy.name`` and
    ``backbone=ViT-B-32`` sets ``backbone.model`` (and clears ``backbone.pretrained``). Naming
    another strategy drops the recipe's options of its own strategy. Short
    aliases: ``steps``, ``batch_size``, ``selector``, ``rank``, ``data.root``, ``data.layout``.
    """
    result = copy.deepcopy(recipe)
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"Override {override!r} is not of the form key=value (for example train.steps=50).")
        key, text = override.split("=", 1)
        key = ALIASES.get(key.strip(), key.strip())
        value = parse_value(text.strip())
        parts = key.split(".")
        if parts == ["backbone"]:
            # Another model name means that model's default weights unless pretrained is set too.
            result.setdefault("backbone", {})["pretrained"] = ""
        if parts == ["strategy"] and result.get("strategy", {}).get("name") != value:
            # The recipe's strategy options belong to its own strategy, not to the new one.
            result["strategy"] = {}
        if len(parts) == 1 and parts[0] in NAMED_SECTIONS:
            parts = [parts[0], NAMED_SECTIONS[parts[0]]]
        target = result
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"Override {override!r}: {part!r} is a value, not a table.")
        target[parts[-1]] = value
    return result


def resolve_settings(recipe: dict[str, Any]) -> RunSettings:
    """Validate a recipe dict and return typed settings."""
    unknown = sorted(set(recipe) - TOP_LEVEL - set(TYPED_SECTIONS) - {"stream", "strategy", "eval"})
    if unknown:
        raise ConfigError(
            f"Unknown recipe key(s) {unknown}; valid top-level keys: {sorted(TOP_LEVEL)} and tables "
            f"{sorted(set(TYPED_SECTIONS) | {'stream', 'strategy', 'eval'})}."
        )
    settings = RunSettings()
    for key in ("name", "seed", "out", "deterministic"):
        if key in recipe:
            setattr(settings, key, parse_options(_TopLevel, {key: recipe[key]}, "recipe").__dict__[key])
    for section, config_class in TYPED_SECTIONS.items():
        setattr(settings, section, parse_options(config_class, _table(recipe, section), f"[{section}]"))
    settings.stream = _named(recipe, "stream", StreamSettings)
    settings.strategy = _named(recipe, "strategy", StrategySettings)
    settings.eval = parse_options(EvalSettings, _table(recipe, "eval"), "[eval]")
    _check_values(settings)
    return settings


@dataclasses.dataclass
class _TopLevel:
    name: str = "run"
    seed: int = 0
    out: str = ""
    deterministic: bool = False


def _table(recipe: dict[str, Any], section: str) -> dict[str, Any]:
    value = recipe.get(section, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{section}] must be a table, got {value!r}.")
    return value


def _named(recipe: dict[str, Any], section: str, config_class: type) -> Any:
    table = dict(_table(recipe, section))
    name = table.pop("name", None)
    if name is None:
        return config_class(options=table)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{section}.name must be a non-empty string, got {name!r}.")
    return config_class(name=name, options=table)


def _check_values(settings: RunSettings) -> None:
    checks = [
        (settings.train.steps >= 0, "train.steps", settings.train.steps, "a count >= 0"),
        (settings.train.batch_size >= 1, "train.batch_size", settings.train.batch_size, "at least 1"),
        (settings.train.lr > 0, "train.lr", settings.train.lr, "a positive number"),
        (0 <= settings.train.label_smoothing < 1, "train.label_smoothing", settings.train.label_smoothing, "in [0, 1)"),
        (settings.train.warmup_steps >= 0, "train.warmup_steps", settings.train.warmup_steps, "a count >= 0"),
        (settings.train.schedule in ("cosine", "constant"), "train.schedule", settings.train.schedule, "'cosine' or 'constant'"),
        (settings.backbone.precision in ("fp32", "bf16", "fp16"), "backbone.precision", settings.backbone.precision, "fp32, bf16 or fp16"),
        (settings.adapter.rank >= 1, "adapter.rank", settings.adapter.rank, "at least 1"),
        (set(settings.adapter.towers) <= {"image", "text"} and settings.adapter.towers != [], "adapter.towers", settings.adapter.towers, "a non-empty subset of ['image', 'text']"),
        (settings.eval.batch_size >= 1, "eval.batch_size", settings.eval.batch_size, "at least 1"),
        (settings.eval.max_test_per_task >= 0, "eval.max_test_per_task", settings.eval.max_test_per_task, "a count >= 0 (0 keeps all)"),
    ]
    for valid, key, value, expected in checks:
        if not valid:
            raise ConfigError(f"Invalid {key} = {value!r}; expected {expected}.")


def settings_to_dict(settings: RunSettings) -> dict[str, Any]:
    """Return settings as a recipe-shaped dict (the resolved recipe written into run folders)."""
    data = dataclasses.asdict(settings)
    data["stream"] = {"name": settings.stream.name, **settings.stream.options}
    data["strategy"] = {"name": settings.strategy.name, **settings.strategy.options}
    return data


def settings_from_dict(data: dict[str, Any]) -> RunSettings:
    """Inverse of :func:`settings_to_dict` (also accepts ``dataclasses.asdict`` output)."""
    data = copy.deepcopy(data)
    for section in ("stream", "strategy"):
        table = data.get(section, {})
        if "options" in table:
            data[section] = {"name": table["name"], **table["options"]}
    return resolve_settings(data)


def dump_resolved(settings: RunSettings) -> str:
    return json.dumps(settings_to_dict(settings), indent=1)
