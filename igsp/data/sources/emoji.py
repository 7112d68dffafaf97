"""Emoji images rendered with Pillow from Noto Color Emoji, labelled by their Unicode group."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from igsp.data.sources.arrays import LabelledImages
from igsp.exceptions import DataError

__all__ = ["EMOJI_GROUPS", "EmojiEntry", "parse_emoji_test", "render_emoji", "load_emoji_images"]

logger = logging.getLogger(__name__)

# Unicode group name in emoji-test.txt -> class name. The "Component" group is left out.
EMOJI_GROUPS: dict[str, str] = {
    "Smileys & Emotion": "smiley or emotion",
    "People & Body": "person or body part",
    "Animals & Nature": "animal or nature",
    "Food & Drink": "food or drink",
    "Travel & Places": "travel or place",
    "Activities": "activity",
    "Objects": "object",
    "Symbols": "symbol",
    "Flags": "flag",
}

# Noto Color Emoji contains bitmaps of one size, so FreeType loads it only at this pixel size.
_FONT_SIZE = 109
_CANVAS = 160
_MARGIN = 0.08
_SKIN_TONES = range(0x1F3FB, 0x1F400)
# A single-code-point emoji whose advance width is that of one glyph.
_ONE_GLYPH = "\U0001F600"
# Bump when the rendering changes, so that cached arrays of the old rendering are not reused.
_RENDER_VERSION = 2


@dataclass(frozen=True)
class EmojiEntry:
    """One fully-qualified emoji: its text, code points, name and group index."""

    text: str
    code_points: str
    name: str
    label: int


def parse_emoji_test(path: Path) -> list[EmojiEntry]:
    """Return the fully-qualified emoji of ``emoji-test.txt`` that have no skin-tone modifier.

    Skin-tone variants are left out because they repeat a drawing with another colour, which
    would put near copies of one image in both train and test. Groups missing from
    ``EMOJI_GROUPS`` are skipped with a warning.
    """
    group_names = list(EMOJI_GROUPS)
    entries: list[EmojiEntry] = []
    unknown_groups: set[str] = set()
    group: str | None = None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"Cannot read the emoji test file {path}: {error}.") from error

    for line in lines:
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
            continue
        if not line.strip() or line.startswith("#"):
            continue

        entry = _parse_line(line, path)
        if entry is None or group == "Component":
            continue
        code_points, status, name = entry
        if status != "fully-qualified" or any(point in _SKIN_TONES for point in code_points):
            continue
        if group not in EMOJI_GROUPS:
            unknown_groups.add(str(group))
            continue
        text = "".join(chr(point) for point in code_points)
        code_text = " ".join(f"{point:04X}" for point in code_points)
        entries.append(EmojiEntry(text, code_text, name, group_names.index(group)))

    if unknown_groups:
        logger.warning("Skipped emoji of unknown groups %s in %s.", sorted(unknown_groups), path)
    _check_groups(entries, path)
    return entries


def _parse_line(line: str, path: Path) -> tuple[list[int], str, str] | None:
    """Parse ``code points ; status # emoji E<version> name``, or return ``None`` for another form."""
    fields, _, comment = line.partition("#")
    points_text, separator, status = fields.partition(";")
    if not separator:
        return None
    try:
        code_points = [int(point, 16) for point in points_text.split()]
    except ValueError as error:
        raise DataError(f"Corrupt emoji test file {path}: invalid code points in {line!r}.") from error
    words = comment.split()
    name = " ".join(words[2:]) if len(words) > 2 else comment.strip()
    return code_points, status.strip(), name


def _check_groups(entries: list[EmojiEntry], path: Path) -> None:
    present = {entry.label for entry in entries}
    missing = [name for index, name in enumerate(EMOJI_GROUPS) if index not in present]
    if missing:
        raise DataError(
            f"The emoji test file {path} has no fully-qualified emoji in the groups {missing}, so "
            "it is incomplete or not an emoji-test.txt file."
        )


def _load_font(path: Path) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(str(path), _FONT_SIZE)
    except OSError as error:
        raise DataError(
            f"Cannot load the emoji font {path} at size {_FONT_SIZE}: {error}. It must be the "
            "Noto Color Emoji bitmap font (apt-get install --reinstall fonts-noto-color-emoji)."
        ) from error


def render_emoji(text: str, font: ImageFont.FreeTypeFont, size: int) -> np.ndarray | None:
    """Render one emoji centred on white, as a ``(size, size, 3)`` uint8 array.

    Returns ``None`` when the font draws nothing, or when the text advances further than one
    glyph: a sequence that Pillow could not shape into one glyph (Pillow without the raqm
    layout engine draws a flag as two letters, for example).
    """
    if font.getlength(text) > 1.1 * font.getlength(_ONE_GLYPH):
        return None
    canvas = Image.new("RGBA", (_CANVAS, _CANVAS), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((0, 0), text, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    width, height = box[2] - box[0], box[3] - box[1]

    side = int(round(max(width, height) * (1 + 2 * _MARGIN)))
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    glyph = canvas.crop(box)
    square.alpha_composite(glyph, ((side - width) // 2, (side - height) // 2))
    square = square.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(square)


def _render_all(entries: list[EmojiEntry], font_path: Path, size: int) -> LabelledImages:
    font = _load_font(font_path)
    images, labels, ids = [], [], []
    skipped = []
    for entry in entries:
        image = render_emoji(entry.text, font, size)
        if image is None:
            skipped.append(entry.code_points)
            continue
        images.append(image)
        labels.append(entry.label)
        ids.append(f"{entry.code_points} {entry.name}")

    if skipped:
        logger.warning(
            "Skipped %d emoji that %s does not draw as one glyph (raqm layout available: %s), "
            "for example %s.",
            len(skipped), font_path, features.check("raqm"), skipped[:3],
        )
    if not images:
        raise DataError(f"The font {font_path} drew none of the {len(entries)} emoji.")
    return LabelledImages(np.stack(images), np.asarray(labels), np.asarray(ids))


def _cache_file(cache_dir: Path, font_path: Path, test_path: Path, size: int) -> Path:
    """Name the cache file after everything the rendering depends on."""
    font_stat = font_path.stat()
    key = hashlib.sha1()
    key.update(f"{_RENDER_VERSION}|{size}|{font_stat.st_size}|{font_stat.st_mtime_ns}|".encode())
    key.update(test_path.read_bytes())
    return cache_dir / f"emoji-{size}px-{key.hexdigest()[:16]}.npz"


def _read_cache(path: Path) -> LabelledImages | None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return LabelledImages(archive["images"], archive["labels"], archive["ids"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        logger.warning("Ignoring the unreadable emoji cache %s (%s) and rendering again.", path, error)
        return None


def _write_cache(path: Path, rendered: LabelledImages) -> None:
    """Write the cache through a temporary file and a rename, so readers never see half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez_compressed(
                    stream, images=rendered.images, labels=rendered.labels, ids=rendered.ids
                )
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as error:
        logger.warning("Could not write the emoji cache %s: %s.", path, error)


def load_emoji_images(
    font_path: Path, test_path: Path, size: int, cache_dir: Path | None
) -> LabelledImages:
    """Return every usable emoji rendered at ``size``, from the cache when it contains them."""
    entries = parse_emoji_test(test_path)
    cache_path = _cache_file(cache_dir, font_path, test_path, size) if cache_dir else None
    if cache_path is not None:
        cached = _read_cache(cache_path)
        if cached is not None and cached.images.shape[1:] == (size, size, 3):
            logger.debug("Loaded %d rendered emoji from %s.", len(cached), cache_path)
            return cached

    rendered = _render_all(entries, font_path, size)
    if cache_path is not None:
        _write_cache(cache_path, rendered)
    return rendered
