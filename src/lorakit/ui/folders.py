"""Paths a client names, kept inside a folder the page was started with (--runs DIR, --adapters DIR).

A client names a run or an adapter by its path relative to the folder ("sweep/r=4"). It must be
relative, hold no '..' or empty parts, and resolve (symlinks followed) to a folder inside the root:
a symlink that points out of the root is refused like '..'.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LorakitError


class Refused(LorakitError):
    """A path that is not a relative path inside the folder (HTTP 400)."""


class Missing(LorakitError):
    """A path inside the folder that does not exist or is not what was asked for (HTTP 404)."""


def inside(root: Path, relative: str, what: str) -> Path:
    """root/relative, resolved; Refused for absolute paths, '..', NUL or a resolution outside root."""
    if not isinstance(relative, str) or not relative.strip() or "\x00" in relative or "\\" in relative:
        raise Refused(f"{what} must be a non-empty path relative to its folder (forward slashes)")
    given = Path(relative)
    if given.is_absolute() or relative.startswith("/") or any(p in ("..", "") for p in relative.split("/")):
        raise Refused(f"{what} {relative!r} must be relative to its folder, without '..' or empty parts")
    real_root = root.resolve()
    path = (real_root / given).resolve()
    if not path.is_relative_to(real_root) or path == real_root:
        raise Refused(f"{what} {relative!r} resolves outside its folder; refused")
    if not path.is_dir():
        raise Missing(f"{what} {relative!r} does not exist in its folder")
    return path


def contained(root: Path, path: Path) -> bool:
    """Whether `path` (symlinks followed) lies inside `root` (found by a scan: symlinks out are skipped)."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return False
