"""Checkpoint files: round trip, corrupt files, and that they hold added parameters only."""

from __future__ import annotations

import re

import pytest
import torch

from igsp import checkpoint as checkpoints
from igsp.backbone import Routes, load_backbone
from igsp.exceptions import BackboneError, CheckpointError

from conftest import RunRecord, random_images

ADDED_KEY = re.compile(r"^[\w-]+\.(experts\.\d+\.(A|B)|routers\.[\w-]+\.(weight|mask))$")


def checkpoint_path(run: RunRecord):
    return run.out_dir / checkpoints.FILENAME


def tensors_in(value) -> list[torch.Tensor]:
    """Return every tensor inside nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors_in(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_in(item)]
    return []


def test_checkpoint_save_load_round_trip(tmp_path):
    payload = {key: None for key in checkpoints.REQUIRED_KEYS}
    payload.update(format=checkpoints.FORMAT_VERSION, task_index=2, task_names=["a", "b", "c"],
                   added_state={"layer.experts.0.A": torch.randn(4, 8)}, settings={"seed": 1})
    path = tmp_path / "run" / checkpoints.FILENAME

    checkpoints.save(path, payload)
    loaded = checkpoints.load(path)

    assert loaded["task_index"] == 2
    assert loaded["task_names"] == ["a", "b", "c"]
    assert torch.equal(loaded["added_state"]["layer.experts.0.A"], payload["added_state"]["layer.experts.0.A"])
    assert [p.name for p in path.parent.iterdir()] == [checkpoints.FILENAME], "no temporary file is left"


def test_checkpoint_of_run_rebuilds_same_model(finetune_run: RunRecord):
    payload = checkpoints.load(checkpoint_path(finetune_run))
    original = finetune_run.learner.backbone

    copy = load_backbone("igsp-vit-tiny")
    copy.clip.load_state_dict(original.clip.state_dict())
    copy.inject()
    copy.rebuild(payload["structure"])
    copy.load_added_state_dict(payload["added_state"])

    assert payload["task_index"] == 2
    assert copy.structure() == original.structure()
    images = random_images(original, 3)
    with torch.no_grad():
        expected = original.encode_images(images, Routes.uniform("shared", 3))
        assert torch.equal(copy.encode_images(images, Routes.uniform("shared", 3)), expected)


def test_checkpoint_holds_no_backbone_weight(finetune_run: RunRecord):
    path = checkpoint_path(finetune_run)
    payload = checkpoints.load(path)
    backbone = finetune_run.learner.backbone
    backbone_bytes = sum(p.numel() * p.element_size() for p in backbone.clip.state_dict().values())

    keys = list(payload["added_state"])
    assert keys
    assert all(ADDED_KEY.match(key) for key in keys), [key for key in keys if not ADDED_KEY.match(key)]
    assert set(keys) == set(backbone.experts.state_dict())
    added = sum(t.numel() for t in payload["added_state"].values())
    assert added == sum(t.numel() for t in backbone.experts.state_dict().values())
    assert added < 0.01 * sum(p.numel() for p in backbone.clip.parameters())
    assert path.stat().st_size < 0.05 * backbone_bytes
    assert sum(t.numel() for t in tensors_in(payload)) < 0.05 * sum(p.numel() for p in backbone.clip.parameters())


def test_checkpoint_truncated_raises(tmp_path, finetune_run: RunRecord):
    data = checkpoint_path(finetune_run).read_bytes()
    path = tmp_path / checkpoints.FILENAME
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError, match="truncated") as caught:
        checkpoints.load(path)

    assert str(path) in str(caught.value)


def test_checkpoint_garbage_raises(tmp_path):
    path = tmp_path / checkpoints.FILENAME
    path.write_bytes(b"not a checkpoint at all" * 10)

    with pytest.raises(CheckpointError) as caught:
        checkpoints.load(path)

    assert str(path) in str(caught.value)


def test_checkpoint_missing_raises(tmp_path):
    with pytest.raises(CheckpointError, match="No checkpoint"):
        checkpoints.load(tmp_path / checkpoints.FILENAME)


def test_checkpoint_foreign_file_raises(tmp_path):
    path = tmp_path / checkpoints.FILENAME
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, path)

    with pytest.raises(CheckpointError, match="lacks") as caught:
        checkpoints.load(path)

    assert "task_index" in str(caught.value)


def test_checkpoint_other_format_raises(tmp_path):
    payload = {key: None for key in checkpoints.REQUIRED_KEYS}
    payload["format"] = checkpoints.FORMAT_VERSION + 1
    path = tmp_path / checkpoints.FILENAME
    torch.save(payload, path)

    with pytest.raises(CheckpointError, match="format"):
        checkpoints.load(path)


def test_checkpoint_other_injection_rejected(finetune_run: RunRecord):
    payload = checkpoints.load(checkpoint_path(finetune_run))
    backbone = load_backbone("igsp-vit-tiny")
    backbone.inject(towers=["image"])

    with pytest.raises(BackboneError, match="transformer-resblocks-0-mlp"):
        backbone.rebuild(payload["structure"])
