"""Expert injection into open_clip models, and the errors of backbone loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from igsp.backbone import Routes, load_backbone
from igsp.exceptions import BackboneError, InjectionError
from igsp.inject import find_targets

from conftest import fresh_backbone, random_images

# ViT-B-32 is open_clip's own config, built with random weights in about 3 s on 2 CPU cores.
# Its forward pass takes seconds here, so only the layer counts run on it. The two igsp configs
# are the small ones that the tests and the offline stream use.
CONFIGS = ["igsp-vit-tiny", "igsp-vit-small", "ViT-B-32"]


@pytest.fixture(scope="module", params=CONFIGS)
def backbone(request):
    return fresh_backbone(request.param)


def add_route(backbone, key: str = "task", rank: int = 4) -> None:
    for _, layer in backbone.layers():
        layer.add_router(key, [layer.add_expert(rank)])


def set_up_projections(backbone, value: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in backbone.layers():
            for expert_id in layer.expert_ids:
                up = layer.expert(expert_id).B
                up.copy_(torch.randn(up.shape, generator=generator) * value)


def test_inject_counts_blocks_of_both_towers(backbone):
    backbone.remove_experts()
    image_blocks = len(backbone.clip.visual.transformer.resblocks)
    text_blocks = len(backbone.clip.transformer.resblocks)

    keys = backbone.inject()

    assert len(keys) == image_blocks + text_blocks
    assert len(backbone.layers("image")) == image_blocks
    assert len(backbone.layers("text")) == text_blocks
    assert backbone.inject() == keys, "a second inject must keep the existing layers"
    assert len(backbone.experts) == len(keys)


@pytest.mark.parametrize("name", ["igsp-vit-tiny", "igsp-vit-small"])
def test_inject_forward_changes_with_up_projection(name):
    backbone = fresh_backbone(name)
    backbone.inject()
    add_route(backbone)
    images = random_images(backbone, 2)
    tokens = backbone.tokenize(["a photo of a dog.", "a green square."])
    with torch.no_grad():
        image_zero = backbone.encode_images(images, Routes.uniform("task", 2))
        text_zero = backbone.encode_texts(tokens, Routes.uniform("task", 2))

    set_up_projections(backbone)
    with torch.no_grad():
        image_routed = backbone.encode_images(images, Routes.uniform("task", 2))
        text_routed = backbone.encode_texts(tokens, Routes.uniform("task", 2))
        image_frozen = backbone.encode_images(images)

    assert (image_routed - image_zero).abs().max() > 1e-3
    assert (text_routed - text_zero).abs().max() > 1e-3
    assert torch.equal(image_frozen, image_zero) or torch.allclose(image_frozen, image_zero, atol=1e-6)


def test_inject_image_tower_only(tiny_backbone):
    tokens = tiny_backbone.tokenize(["a photo of a dog.", "a green square."])
    images = random_images(tiny_backbone, 2)
    with torch.no_grad():
        text_before = tiny_backbone.encode_texts(tokens)
        image_before = tiny_backbone.encode_images(images)

    tiny_backbone.inject(towers=["image"])
    add_route(tiny_backbone)
    set_up_projections(tiny_backbone)
    with torch.no_grad():
        text_after = tiny_backbone.encode_texts(tokens, Routes.uniform("task", 2))
        image_after = tiny_backbone.encode_images(images, Routes.uniform("task", 2))

    assert tiny_backbone.layers("text") == []
    assert len(tiny_backbone.layers("image")) == 2
    assert torch.equal(text_after, text_before)
    assert (image_after - image_before).abs().max() > 1e-3


def test_inject_selected_blocks(tiny_backbone):
    keys = tiny_backbone.inject(blocks=[-1])

    assert keys == ["visual-transformer-resblocks-1-mlp", "transformer-resblocks-1-mlp"]


def test_inject_matching_nothing_raises():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    with pytest.raises(InjectionError, match="matched no block of Sequential"):
        find_targets(model)


def test_inject_unknown_tower_raises(tiny_backbone):
    with pytest.raises(InjectionError, match="audio"):
        tiny_backbone.inject(towers=["audio"])


def test_inject_block_out_of_range_names_range(tiny_backbone):
    with pytest.raises(InjectionError) as caught:
        tiny_backbone.inject(blocks=[5])

    message = str(caught.value)
    assert "5" in message
    assert "2 blocks" in message
    assert "-2..1" in message


def test_remove_experts_restores_backbone(tiny_backbone):
    images = random_images(tiny_backbone, 2)
    with torch.no_grad():
        before = tiny_backbone.encode_images(images)
    tiny_backbone.inject()
    add_route(tiny_backbone)
    set_up_projections(tiny_backbone)

    tiny_backbone.remove_experts()
    with torch.no_grad():
        after = tiny_backbone.encode_images(images, Routes.uniform("task", 2))

    assert len(tiny_backbone.experts) == 0
    assert torch.equal(after, before)


# ---- backbone loading errors -------------------------------------------------------------------


def test_load_unknown_model_suggests_names():
    with pytest.raises(BackboneError) as caught:
        load_backbone("igsp-vit-tiniy")

    assert "igsp-vit-tiniy" in str(caught.value)
    assert "igsp-vit-tiny" in str(caught.value).replace("'igsp-vit-tiniy'", "")


def test_load_unknown_tag_lists_tags():
    with pytest.raises(BackboneError) as caught:
        load_backbone("ViT-B-32", "not-a-tag")

    assert "not-a-tag" in str(caught.value)
    assert "openai" in str(caught.value)


def test_load_missing_checkpoint_names_path(tmp_path):
    missing = tmp_path / "missing.pt"

    with pytest.raises(BackboneError, match="does not exist") as caught:
        load_backbone("igsp-vit-tiny", str(missing))

    assert str(missing) in str(caught.value)


def test_load_mismatched_checkpoint_raises(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(fresh_backbone("igsp-vit-tiny").clip.state_dict(), path)

    with pytest.raises(BackboneError) as caught:
        load_backbone("igsp-vit-small", str(path))

    assert str(path) in str(caught.value)
    assert "igsp-vit-small" in str(caught.value)


def test_load_local_checkpoint_same_features(tmp_path, tiny_backbone):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_backbone.clip.state_dict(), path)
    images = random_images(tiny_backbone, 2)
    tokens = tiny_backbone.tokenize(["a photo of a dog.", "a green square."])

    torch.manual_seed(123)  # different random init, so equal features come from the file
    loaded = load_backbone("igsp-vit-tiny", str(path))

    assert loaded.pretrained == str(path)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_images(images), tiny_backbone.encode_images(images), atol=1e-6)
        assert torch.allclose(loaded.encode_texts(tokens), tiny_backbone.encode_texts(tokens), atol=1e-6)
    assert not any(p.requires_grad for p in loaded.clip.parameters())
