"""The runbooks and analyst notebooks shipped inside the package, where the runner looks by default, and copying them out.

The wheel carries ``bridgekit/shipped/runbooks`` and ``bridgekit/shipped/notebooks``; in a checkout those are links
to the repository's ``runbooks/`` and ``notebooks/`` folders, the one copy that is edited and committed. Where a
checkout cannot hold links (some Windows set-ups), the folders beside the package are used instead.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KINDS", "PROJECT_DIR", "Copied", "copy_shipped", "default_dirs", "shipped_dir", "shipped_dirs"]

#: The shipped folders: headless runbooks, then the analyst notebooks (also runnable with ``bridgekit run``).
KINDS = ("runbooks", "notebooks")
#: A project's own runbooks (for instance copied out with ``bridgekit runbooks --copy-to runbooks``) come first.
PROJECT_DIR = Path("runbooks")
_PACKAGE = Path(__file__).resolve().parent.parent


def shipped_dir(kind: str) -> Path:
    """The installed folder of ``kind`` (``runbooks`` or ``notebooks``)."""
    inside = _PACKAGE / "shipped" / kind
    if inside.is_dir():
        return inside
    return _PACKAGE.parent / kind  # a checkout whose links were not created: the repository's own folder


def shipped_dirs() -> list[Path]:
    """The shipped runbooks folder, then the shipped notebooks folder (those that exist)."""
    return [d for d in (shipped_dir(kind) for kind in KINDS) if d.is_dir()]


def default_dirs() -> list[Path]:
    """Where ``bridgekit run NAME`` looks without ``--path``: ``./runbooks`` when there is one, then the shipped ones.

    A name found in an earlier folder hides the same name in a later one, so a customised copy in ``./runbooks``
    runs instead of the shipped runbook.
    """
    dirs: list[Path] = [PROJECT_DIR] if PROJECT_DIR.is_dir() else []
    for d in shipped_dirs():
        if not any(_same(d, seen) for seen in dirs):
            dirs.append(d)
    return dirs


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


@dataclass(frozen=True)
class Copied:
    """What :func:`copy_shipped` did: the files written and the existing files it left alone."""

    written: tuple[Path, ...]
    kept: tuple[Path, ...]


def copy_shipped(dest: str | Path) -> Copied:
    """Copy every shipped runbook and notebook into ``dest`` (created), never overwriting a file already there.

    ``bridgekit run NAME --path DEST`` then runs the copy; a copy in ``./runbooks`` runs without ``--path``.
    """
    out = Path(dest).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    kept: list[Path] = []
    for folder in shipped_dirs():
        for nb in sorted(folder.glob("*.ipynb")):
            target = out / nb.name
            if target.exists():
                kept.append(target)
                continue
            shutil.copyfile(nb, target)
            written.append(target)
    return Copied(tuple(written), tuple(kept))
