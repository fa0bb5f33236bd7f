"""Atomic file and directory writes plus sha256 manifests, so a crash never destroys the last good artifact.

`torch.save` and `faiss.write_index` truncate their destination before writing; every artifact
clipkit writes therefore goes to a temporary sibling first, is fsynced, then renamed into place.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from stat import S_ISREG
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd

from .errors import ClipkitError

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
logger = logging.getLogger(__name__)


def json_safe(v: Any) -> Any:
    """A JSON-safe value: numpy scalars/arrays to Python, NaN/inf/NA to None, timestamps to ISO text."""
    if isinstance(v, (np.ndarray, list, tuple)):
        return [json_safe(x) for x in v]
    if v is None or (np.ndim(v) == 0 and pd.isna(v)):
        return None
    v = v.item() if isinstance(v, np.generic) else v
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v.isoformat() if hasattr(v, "isoformat") else v


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (the rename itself) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (children first), so a rename commits durable contents."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(dirpath)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100
_renameat2: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the system or
    filesystem cannot, so the caller falls back to two renames."""
    global _renameat2
    if _renameat2 is None:
        fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", False) if sys.platform == "linux" else False
        if fn:
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
        _renameat2 = fn
    if not _renameat2:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _old_copies(path: Path) -> list[Path]:
    """`.NAME.old-*` siblings of `path` that a killed two-rename swap left behind, newest first."""
    try:
        olds = [p for p in path.parent.glob(f".{glob.escape(path.name)}.old-*") if p.is_dir() and not p.is_symlink()]
    except OSError:
        return []
    return sorted(olds, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def recover_dir(path: str | os.PathLike) -> None:
    """Finish a directory swap that a killed process left half done: a missing `path` is restored from its newest
    `.NAME.old-*` copy, and old copies are deleted once `path` exists. Called before every save and load."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        return  # a file: never written by atomic_dir, and its folder may be large to list
    olds = _old_copies(path)
    if not olds:
        return
    try:
        if not os.path.lexists(path):
            os.rename(olds.pop(0), path)
            logger.warning("%s: restored from the copy an interrupted save had moved aside", path)
        for old in olds:
            shutil.rmtree(old, ignore_errors=True)
        fsync_dir(path.parent)
    except OSError as e:  # a read-only location: loading goes on and reports what is missing
        logger.warning("%s: cannot recover from the interrupted save's copy %s (%s)", path, olds[0], e)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif os.path.lexists(p):
        p.unlink()


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the complete directory `tmp` at `path`. Where the system can, the two are exchanged in one step, so
    `path` always exists; else the old copy is moved aside under a unique name that `recover_dir` restores."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
        fsync_dir(path.parent)
        return
    if _exchange(tmp, path):
        old = tmp  # the old copy, now under the temporary name
    else:
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:12]}")
        os.rename(path, old)
        os.rename(tmp, path)
    fsync_dir(path.parent)
    _remove(old)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `path` as a whole once the block succeeds.

    Every file and directory in it is fsynced before the swap (`_swap_in`); at every instant either the old or
    the new complete directory exists, and a save killed at any point leaves one that `recover_dir` restores.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_in(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _no_space(path: str | os.PathLike, nbytes: int, code: int = errno.ENOSPC) -> OSError:
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    return OSError(code, f"{path}: not enough disk space: needs {nbytes} bytes ({nbytes / 2**20:.1f} MiB), "
                         f"{free} bytes free ({os.strerror(code)})")


def reserve_space(path: str | os.PathLike, nbytes: int) -> None:
    """Allocate `nbytes` for the file at `path` (created if needed) before it is written through a memory map:
    a sparse map on a full disk kills the process with SIGBUS; this fails first, with ENOSPC naming the need."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if nbytes > 0 and hasattr(os, "posix_fallocate"):  # not on macOS: no reservation there
            os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise _no_space(path, nbytes, e.errno) from None
    finally:
        os.close(fd)


def check_free_space(path: str | os.PathLike, nbytes: int) -> None:
    """Raise ENOSPC unless the filesystem of `path` has `nbytes` free: for files another library maps and
    writes (FAISS's on-disk lists), which cannot be reserved ahead."""
    if shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < nbytes:
        raise _no_space(path, nbytes)


def files_fingerprint(paths: Iterable[str], *, extra: Any = None) -> str:
    """sha256 of `extra` (any JSON value: a config, the captions) and each file's (path, size, mtime); a
    missing file counts as (-1, -1). It changes when a file is added, removed, renamed, replaced or touched."""
    def stat(p: str) -> tuple[int, int]:
        try:
            st = os.stat(p)
            return st.st_size, st.st_mtime_ns
        except OSError:
            return -1, -1

    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for p in paths:
        h.update(json.dumps([str(p), *stat(str(p))]).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    with open(path, "rb") as f:
        return _sha256_fd(f.fileno(), chunk)


def _sha256_fd(fd: int, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    while block := os.read(fd, chunk):
        h.update(block)
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike) -> None:
    """Record size and sha256 of every file in `directory` (non-recursive) in manifest.json."""
    directory = Path(directory)
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    write_json_atomic(directory / MANIFEST, {"files": files})


def _open_regular(path: Path, error: type[ClipkitError]) -> tuple[int, os.stat_result]:
    """An fd of the regular file at `path`, never following a symlink and never blocking on a FIFO or device.
    A missing file raises FileNotFoundError; anything else that is not a plain file raises `error`."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP or os.path.islink(path):
            raise error(f"{path}: is a symbolic link; a manifest lists regular files in its directory only") from None
        raise error(f"{path}: cannot be opened ({e.strerror})") from None
    st = os.fstat(fd)
    if not S_ISREG(st.st_mode):
        os.close(fd)
        raise error(f"{path}: not a regular file (a directory, device or pipe); a manifest lists regular files only")
    return fd, st


def _is_plain_name(name: object) -> bool:
    """A file name directly inside the directory: no separators, no `..`, not the manifest itself."""
    return (isinstance(name, str) and name not in ("", ".", "..", MANIFEST) and "/" not in name
            and "\\" not in name and "\0" not in name)


def read_manifest(directory: str | os.PathLike, error: type[ClipkitError] = ClipkitError) -> dict[str, dict] | None:
    """The `files` table of `directory`'s manifest.json after checking its structure, or None if there is none."""
    mpath = Path(directory) / MANIFEST
    try:
        fd, st = _open_regular(mpath, error)
    except FileNotFoundError:
        return None
    try:
        if st.st_size > MAX_MANIFEST_BYTES:
            raise error(f"{mpath}: {st.st_size} bytes, larger than any manifest clipkit writes")
        raw = os.read(fd, MAX_MANIFEST_BYTES + 1)
    finally:
        os.close(fd)
    try:
        files = json.loads(raw.decode("utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise error(f"{mpath}: unreadable manifest ({type(e).__name__}: {e})") from None
    if not isinstance(files, dict):
        raise error(f"{mpath}: malformed manifest: 'files' must map file names to {{bytes, sha256}}")
    for name, want in files.items():
        if not _is_plain_name(name):
            raise error(f"{mpath}: malformed manifest: entry {name!r} is not a plain file name in the directory")
        ok = isinstance(want, dict) and type(want.get("bytes")) is int and want["bytes"] >= 0 \
            and isinstance(want.get("sha256"), str) and _SHA256.fullmatch(want["sha256"]) is not None
        if not ok:
            raise error(f"{mpath}: malformed manifest: entry {name!r} needs a byte count and a sha256 hex digest, "
                        f"got {str(want)[:100]}")
    return files


def verify_manifest(directory: str | os.PathLike, error: type[ClipkitError] = ClipkitError, *,
                    complete: bool = False) -> bool:
    """Check every file listed in manifest.json; raise `error` on a mismatch. False if no manifest.

    Only regular files directly in `directory` are opened (no symlinks, devices or paths outside it).
    `complete`: every other visible entry of the directory must be listed too, so nothing added later is read.
    """
    directory = Path(directory)
    files = read_manifest(directory, error)
    if files is None:
        return False
    for name, want in files.items():
        p = directory / name
        try:
            fd, st = _open_regular(p, error)
        except FileNotFoundError:
            raise error(f"{p}: listed in the manifest but missing") from None
        try:
            if st.st_size != want["bytes"]:
                raise error(f"{p}: truncated or corrupt (size {st.st_size}, expected {want['bytes']})")
            if _sha256_fd(fd) != want["sha256"]:
                raise error(f"{p}: checksum mismatch (file changed or corrupt since it was written)")
        except OSError as e:
            raise error(f"{p}: unreadable ({e.strerror or e})") from None
        finally:
            os.close(fd)
    if complete:
        extra = sorted(n for n in os.listdir(directory) if n not in files and n != MANIFEST and not n.startswith("."))
        if extra:
            raise error(f"{directory / extra[0]}: not listed in the manifest ({len(extra)} unlisted entries: added "
                        "after the directory was written); remove them, or skip the checks with verify=False")
    return True
