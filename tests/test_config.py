"""Recipes and overrides: every invalid input raises ConfigError naming the key."""

from __future__ import annotations

import pytest

from igsp.config import (
    apply_overrides,
    list_recipes,
    load_recipe,
    resolve_settings,
    settings_from_dict,
    settings_to_dict,
)
from igsp.exceptions import ConfigError
from igsp.runner import build_learner


def resolve(*overrides: str):
    return resolve_settings(apply_overrides({}, overrides))


def config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        resolve(*overrides)
    return str(caught.value)


# ---- invalid keys, types and values -------------------------------------------------------------


def test_config_unknown_key_named():
    message = config_error("train.stepz=5")

    assert "stepz" in message
    assert "steps" in message, "the message lists the valid keys"


def test_config_unknown_top_level_key_named():
    assert "colour" in config_error("colour=5")


def test_config_wrong_type_named():
    message = config_error('train.steps="abc"')

    assert "steps" in message
    assert "[train]" in message
    assert "abc" in message


def test_config_bare_word_for_number_named():
    message = config_error("train.steps=abc")

    assert "steps" in message
    assert "integer" in message


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("train.lr=-1", "train.lr", "-1"),
        ("backbone.precision=fp8", "backbone.precision", "fp8"),
        ("train.batch_size=0", "train.batch_size", "0"),
        ("train.schedule=linear", "train.schedule", "linear"),
        ('adapter.towers=["audio"]', "adapter.towers", "audio"),
        ("train.label_smoothing=1.5", "train.label_smoothing", "1.5"),
    ],
)
def test_config_invalid_value_named(override, key, value):
    message = config_error(override)

    assert key in message
    assert value in message


def test_config_table_expected_named():
    message = config_error("train=5")

    assert "[train]" in message


def test_config_unknown_strategy_option_named(core_plugins_only):
    settings = resolve("strategy=igsp", "strategy.bogus=1")

    with pytest.raises(ConfigError) as caught:
        build_learner(settings, out_dir=None)

    assert "bogus" in str(caught.value)
    assert "igsp" in str(caught.value)


def test_config_invalid_strategy_option_named(core_plugins_only):
    settings = resolve("strategy=igsp", "strategy.orthogonal=sometimes")

    with pytest.raises(ConfigError) as caught:
        build_learner(settings, out_dir=None)

    assert "strategy.orthogonal" in str(caught.value)
    assert "sometimes" in str(caught.value)


def test_config_unknown_strategy_name_listed(core_plugins_only):
    settings = resolve("strategy=nope")

    with pytest.raises(ConfigError) as caught:
        build_learner(settings, out_dir=None)

    assert "nope" in str(caught.value)
    assert "igsp" in str(caught.value), "the message lists the available strategies"


def test_config_unknown_selector_listed(core_plugins_only):
    settings = resolve("selector=psychic")

    with pytest.raises(ConfigError) as caught:
        build_learner(settings, out_dir=None)

    assert "psychic" in str(caught.value)
    assert "prototype" in str(caught.value)


# ---- overrides ------------------------------------------------------------------------------------


def test_override_names_and_aliases():
    recipe = apply_overrides({}, ["strategy=igsp", "steps=5", "data.root=/x", "selector=router", "rank=16"])

    assert recipe["strategy"] == {"name": "igsp"}
    assert recipe["train"] == {"steps": 5}
    assert recipe["stream"] == {"root": "/x"}
    assert recipe["eval"] == {"selector": "router"}
    assert recipe["adapter"] == {"rank": 16}


def test_override_value_types():
    recipe = apply_overrides({}, [
        'adapter.towers=["image"]', "adapter.blocks=[0, -1]", "train.lr=0.01", "deterministic=true", "name=my run",
    ])

    assert recipe["adapter"]["towers"] == ["image"]
    assert recipe["adapter"]["blocks"] == [0, -1]
    assert recipe["train"]["lr"] == 0.01
    assert recipe["deterministic"] is True
    assert recipe["name"] == "my run"


def test_override_resolves_to_settings():
    settings = resolve("strategy=igsp", "steps=5", "data.root=/x", 'adapter.towers=["image"]', "strategy.top_k=1")

    assert settings.strategy.name == "igsp"
    assert settings.strategy.options == {"top_k": 1}
    assert settings.train.steps == 5
    assert settings.stream.options == {"root": "/x"}
    assert settings.adapter.towers == ["image"]


def test_override_later_wins():
    assert resolve("steps=5", "train.steps=7").train.steps == 7


def test_override_without_equals_named():
    with pytest.raises(ConfigError, match="'steps'"):
        apply_overrides({}, ["steps"])


def test_override_into_value_named():
    with pytest.raises(ConfigError, match="'steps' is a value"):
        apply_overrides({"train": {"steps": 5}}, ["train.steps.x=1"])


# ---- recipe files ---------------------------------------------------------------------------------


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_recipe_extends_cycle_named(tmp_path, monkeypatch):
    monkeypatch.setenv("IGSP_RECIPE_PATH", str(tmp_path))
    write(tmp_path / "first.toml", 'extends = "second"\n')
    write(tmp_path / "second.toml", 'extends = "first"\n')

    with pytest.raises(ConfigError) as caught:
        load_recipe("first")

    assert "first" in str(caught.value)
    assert "second" in str(caught.value)


def test_recipe_extends_itself_named(tmp_path, monkeypatch):
    monkeypatch.setenv("IGSP_RECIPE_PATH", str(tmp_path))
    write(tmp_path / "loop.toml", 'extends = "loop"\n')

    with pytest.raises(ConfigError, match="loop"):
        load_recipe("loop")


def test_recipe_extends_merges_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("IGSP_RECIPE_PATH", str(tmp_path))
    write(tmp_path / "base.toml", "seed = 3\n[train]\nsteps = 10\nlr = 0.01\n")
    write(tmp_path / "child.toml", 'extends = "base"\n[train]\nsteps = 20\n')

    settings = resolve_settings(load_recipe("child"))

    assert settings.seed == 3
    assert settings.train.steps == 20
    assert settings.train.lr == 0.01


def test_recipe_extends_path_next_to_recipe(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    write(folder / "base.toml", "[train]\nsteps = 10\n")
    child = write(folder / "child.toml", 'extends = "base.toml"\n[train]\nlr = 0.01\n')
    monkeypatch.chdir(tmp_path)

    settings = resolve_settings(load_recipe(str(child)))

    assert settings.train.steps == 10
    assert settings.train.lr == 0.01


def test_recipe_invalid_toml_named(tmp_path):
    path = write(tmp_path / "broken.toml", "[train\nsteps = 1\n")

    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_recipe(str(path))

    assert str(path) in str(caught.value)


def test_recipe_unknown_name_lists_recipes():
    with pytest.raises(ConfigError) as caught:
        load_recipe("no-such-recipe")

    assert "no-such-recipe" in str(caught.value)
    assert "smoke" in str(caught.value)


def test_recipe_missing_file_named(tmp_path):
    missing = tmp_path / "missing.toml"

    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(str(missing))


@pytest.mark.parametrize("name", ["smoke", "mtil-lite"])
def test_shipped_recipes_resolve(name):
    assert name in list_recipes()

    settings = resolve_settings(load_recipe(name))

    assert settings.name == name


def test_settings_dict_round_trip():
    settings = resolve("strategy=igsp", "strategy.top_k=1", "data.root=/x", "seed=4", 'adapter.towers=["text"]')

    assert settings_from_dict(settings_to_dict(settings)) == settings


def test_strategy_shorthand_drops_other_options():
    recipe = {"strategy": {"name": "igsp", "check_every": 5}}
    switched = apply_overrides(recipe, ["strategy=finetune"])
    kept = apply_overrides(recipe, ["strategy=igsp"])
    assert switched["strategy"] == {"name": "finetune"}
    assert kept["strategy"] == {"name": "igsp", "check_every": 5}
