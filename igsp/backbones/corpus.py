"""The caption corpus that aligns igsp-lite's towers: Tux Paint stamps and Open Clip Art drawings.

Both come from Debian packages: ``tuxpaint-stamps-default`` (drawings, each with a one-line
English caption, in topic folders) and ``openclipart-png`` (public-domain clip art in a category
tree, captioned here from the category path and the file name). Neither shares an image with
the offline stream's sources (MNIST, Fashion-MNIST, animal silhouettes, Noto emoji,
scikit-image textures, textile images).
"""

from __future__ import annotations

import logging
import re
import struct
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from igsp.exceptions import DataError, SourceNotInstalledError

__all__ = [
    "CaptionedImage",
    "TUXPAINT_ROOT",
    "OPENCLIPART_ROOT",
    "MAX_PIXELS",
    "MAX_PER_FOLDER",
    "tuxpaint_corpus",
    "openclipart_corpus",
    "build_corpus",
    "png_size",
    "load_corpus_image",
]

logger = logging.getLogger(__name__)

TUXPAINT_ROOT = Path("/usr/share/tuxpaint/stamps")
OPENCLIPART_ROOT = Path("/usr/share/openclipart/png")
# Open Clip Art contains a few posters of up to 21k x 30k pixels. Decoding one takes seconds and
# gigabytes, so drawings above this pixel count are left out (20 of 8,121 in the package).
MAX_PIXELS = 4_000_000
# Cap per folder, so that near-duplicate series (1,378 generated stars, 598 toolbar icons) do not
# dominate the corpus.
MAX_PER_FOLDER = 60
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class CaptionedImage:
    """One corpus image with its caption variants; ``captions[0]`` is the main one."""

    path: Path
    captions: tuple[str, ...]
    source: str
    folder: str


def png_size(path: Path) -> tuple[int, int]:
    """Return ``(width, height)`` from a PNG header without decoding the image."""
    with open(path, "rb") as handle:
        header = handle.read(24)
    if len(header) < 24 or header[:8] != _PNG_SIGNATURE:
        raise DataError(f"{str(path)!r} is not a PNG file (invalid signature).")
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def load_corpus_image(path: Path, max_side: int = 256) -> Image.Image:
    """Decode a corpus drawing as RGB, its transparent parts composited onto white.

    The drawing is first shrunk to at most ``max_side`` pixels per side, which keeps decoding fast
    and loses nothing at igsp-lite's input size.
    """
    with Image.open(path) as image:
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def _words(text: str) -> str:
    """Turn a file or folder name into words: separators become spaces, digits and dots go."""
    text = re.sub(r"[_\-.]+", " ", text)
    text = re.sub(r"\d+", " ", text)
    return " ".join(text.split()).lower()


def _category(parts: Sequence[str]) -> str:
    """Return folder names from the most specific to the most general: ``"bears, mammals, animals"``."""
    names = [_words(part) for part in reversed(parts)]
    return ", ".join(name for name in names if name)


def _check_root(root: Path, package: str) -> None:
    if not root.is_dir():
        raise SourceNotInstalledError(
            f"The caption corpus needs the Debian package {package}, but {str(root)!r} does not exist. "
            f"Install it with `apt-get install --no-install-recommends {package}`, or pass the folder "
            "where you unpacked it (`apt-get download NAME && dpkg -x NAME*.deb DIR`)."
        )


def _cap_per_folder(items: list[CaptionedImage], limit: int) -> list[CaptionedImage]:
    """Keep at most ``limit`` images per folder, spread evenly over the folder's sorted list."""
    by_folder: dict[str, list[CaptionedImage]] = defaultdict(list)
    for item in items:
        by_folder[item.folder].append(item)
    kept = []
    for folder in sorted(by_folder):
        group = by_folder[folder]
        if len(group) > limit:
            step = len(group) / limit
            group = [group[int(i * step)] for i in range(limit)]
        kept += group
    return kept


# ---- Tux Paint -----------------------------------------------------------------------------------


def _tuxpaint_caption(path: Path) -> str:
    """Return the English caption: the first line of a stamp's text file (the others are translations)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.readline().strip()


def tuxpaint_corpus(root: Path = TUXPAINT_ROOT, max_per_folder: int = MAX_PER_FOLDER) -> list[CaptionedImage]:
    """Return the Tux Paint stamps that have a PNG drawing and an English caption.

    Stamps that exist only as SVG are left out, because decoding SVG needs a renderer that the
    project does not depend on.
    """
    _check_root(root, "tuxpaint-stamps-default")
    items = []
    for text_path in sorted(root.rglob("*.txt")):
        image_path = text_path.with_suffix(".png")
        caption = _tuxpaint_caption(text_path)
        if not image_path.is_file() or not caption:
            continue
        relative = image_path.relative_to(root)
        title = _words(image_path.stem)
        category = _category(relative.parts[:-1])
        captions = (caption, f"a drawing of {title}" if title else caption, f"{title}, {category}".strip(", "))
        items.append(CaptionedImage(image_path, captions, "tuxpaint", str(relative.parent)))
    return _cap_per_folder(items, max_per_folder)


# ---- Open Clip Art ---------------------------------------------------------------------------


# Open Clip Art names end in "_01", "_r" or "_" when the title is followed by the author's name,
# the whole name cut to 24 characters: "abeille_tanguy_jacq_01", "bucket_michael_moore_".
_AUTHOR_SUFFIX = re.compile(r"_(\d\d|r|)$")


def _author_words(relative_paths: Sequence[Path]) -> set[str]:
    """Guess the author-name words that Open Clip Art appends to titles.

    Only words after the first word of names with the author suffix count. A word is an author
    word if it occurs there at least three times and is never a first word, never part of a name
    without the suffix and never a folder word. A word that occurs there at least twenty times
    is an author word too, if it is a first word at most a tenth as often and no folder word.
    """
    later: Counter[str] = Counter()
    first: Counter[str] = Counter()
    plain: set[str] = set()
    folders: set[str] = set()
    for relative in relative_paths:
        for part in relative.parts[:-1]:
            folders.update(_words(part).split())
        words = _words(_AUTHOR_SUFFIX.sub("", relative.stem)).split()
        if not words:
            continue
        first[words[0]] += 1
        if _AUTHOR_SUFFIX.search(relative.stem):
            later.update(words[1:])
        else:
            plain.update(words)
    rare = {w for w, n in later.items() if n >= 3 and w not in first and w not in plain and w not in folders}
    frequent = {w for w, n in later.items() if n >= 20 and 10 * first[w] <= n and w not in folders and len(w) >= 4}
    return rare | frequent


def _openclipart_title(stem: str, authors: set[str]) -> str:
    """Return a file name's title words: for names with the author suffix, the words before the first author word."""
    if not _AUTHOR_SUFFIX.search(stem):
        return _words(stem)
    words = _words(_AUTHOR_SUFFIX.sub("", stem)).split()
    for index, word in enumerate(words[1:], start=1):
        if word in authors:
            return " ".join(words[:index])
    return " ".join(words)


def openclipart_corpus(
    root: Path = OPENCLIPART_ROOT,
    max_pixels: int = MAX_PIXELS,
    max_per_folder: int = MAX_PER_FOLDER,
) -> list[CaptionedImage]:
    """Return the Open Clip Art drawings of at most ``max_pixels``, captioned from folder and file name."""
    _check_root(root, "openclipart-png")
    paths = sorted(root.rglob("*.png"))
    authors = _author_words([p.relative_to(root) for p in paths])
    items = []
    skipped = 0
    for path in paths:
        width, height = png_size(path)
        if width * height > max_pixels:
            skipped += 1
            continue
        relative = path.relative_to(root)
        category = _category(relative.parts[:-1])
        title = _openclipart_title(path.stem, authors) or _words(relative.parts[-2] if len(relative.parts) > 1 else "")
        captions = (f"{title}, {category}", f"a drawing of {title}", f"clip art of {title}")
        items.append(CaptionedImage(path, captions, "openclipart", str(relative.parent)))
    if skipped:
        logger.info("Left out %d Open Clip Art drawings larger than %d pixels.", skipped, max_pixels)
    return _cap_per_folder(items, max_per_folder)


def build_corpus(
    tuxpaint_root: Path = TUXPAINT_ROOT,
    openclipart_root: Path = OPENCLIPART_ROOT,
    max_per_folder: int = MAX_PER_FOLDER,
    max_pixels: int = MAX_PIXELS,
) -> list[CaptionedImage]:
    """Return the whole caption corpus, Tux Paint first, each source in sorted path order."""
    corpus = tuxpaint_corpus(Path(tuxpaint_root), max_per_folder)
    corpus += openclipart_corpus(Path(openclipart_root), max_pixels, max_per_folder)
    if not corpus:
        raise DataError(
            f"The caption corpus is empty: no captioned PNG under {str(tuxpaint_root)!r} or {str(openclipart_root)!r}."
        )
    return corpus
