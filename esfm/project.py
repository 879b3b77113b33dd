"""The operator-editable project: the ``mappings/`` and ``templates/`` folders.

A project is found, in order, from an explicit path, ``$ESFM_PROJECT``, the
current directory when it has a ``mappings/`` folder, and finally the copy
shipped inside the package. ``esfm init DIR`` copies the shipped one out.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from esfm.errors import ConfigError

PACKAGED_PROJECT = Path(__file__).resolve().parent / "project"


@dataclasses.dataclass(frozen=True)
class Project:
    """Locations of an esfm project's folders."""

    root: Path

    @property
    def mappings_dir(self) -> Path:
        return self.root / "mappings"

    @property
    def templates_dir(self) -> Path:
        return self.root / "templates"


def discover_project(path: str | os.PathLike[str] | None = None) -> Project:
    """Find the project folder to use; see the module docstring for the order."""
    explicit = path or os.environ.get("ESFM_PROJECT")
    if explicit:
        root = Path(explicit)
        if not (root / "mappings").is_dir():
            raise ConfigError(
                f"project folder {str(root)!r} has no mappings/ folder",
                hint="create one with: esfm init DIR",
            )
        return Project(root)
    if (Path.cwd() / "mappings").is_dir():
        return Project(Path.cwd())
    return Project(PACKAGED_PROJECT)


def init_project(dest: str | os.PathLike[str]) -> Project:
    """Copy the shipped ``mappings/`` and ``templates/`` into a new folder."""
    root = Path(dest)
    for name in ("mappings", "templates"):
        target = root / name
        if target.exists():
            raise ConfigError(
                f"{str(target)!r} already exists; refusing to overwrite it",
                hint="choose an empty folder for esfm init",
            )
    root.mkdir(parents=True, exist_ok=True)
    for name in ("mappings", "templates"):
        shutil.copytree(PACKAGED_PROJECT / name, root / name)
    return Project(root)
