"""Which indexed files the service may open: regular files under the image roots, reached without symlinks.

The default root is the deepest folder that holds every image of the index (the collection's root).
A path is resolved, checked to lie under a root, then opened one component at a time from the root with
`O_NOFOLLOW`, so a symlink inside the collection that points out of it (or one swapped in after the
check) is never followed, and FIFOs and devices are refused.
"""
from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import pandas as pd

log = logging.getLogger(__name__)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
_FILE_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def absolute_paths(paths: pd.Series, base: Path) -> list[str]:
    """The string paths of `paths`, relative ones taken from `base` (as the index stores them)."""
    return [p if os.path.isabs(p) else os.path.join(base, p) for p in paths if isinstance(p, str)]


def find_image_roots(paths: list[str], roots: Iterable[str | os.PathLike] | None) -> tuple[Path, ...]:
    """The resolved roots thumbnails may come from: `roots`, else the common folder of `paths` (none
    when that is the file-system root, which would allow everything)."""
    if roots is not None:
        found = tuple(Path(os.path.realpath(r)) for r in roots)
        missing = [str(r) for r in found if not r.is_dir()]
        if missing:
            raise ValueError(f"image roots are not folders: {missing}")
        return found
    if not paths:
        return ()
    lo, hi = min(paths), max(paths)  # the common prefix of all strings is that of the extremes
    prefix = os.path.commonprefix([lo, hi])
    common = prefix if prefix.endswith(os.sep) else os.path.dirname(prefix)
    root = Path(os.path.realpath(common or os.sep))
    if root == Path(root.anchor):
        log.warning("the indexed images share no folder below %s: thumbnails are off; pass image_roots "
                    "(clipkit serve --image-root DIR) to serve them", root)
        return ()
    return (root,)


def open_under(path: str, roots: tuple[Path, ...]) -> BinaryIO | None:
    """`path` opened for reading if it resolves to a regular file under one of `roots`, else None."""
    real = Path(os.path.realpath(path))
    root = next((r for r in roots if real.is_relative_to(r) and real != r), None)
    if root is None:
        return None
    parts = real.relative_to(root).parts
    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError:
        return None
    try:
        for part in parts[:-1]:
            inner = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = inner
        handle = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
    except OSError:  # missing, not a folder, or a symlink on the way: ELOOP / ENOTDIR
        return None
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(handle).st_mode):
        os.close(handle)
        return None
    return os.fdopen(handle, "rb")
