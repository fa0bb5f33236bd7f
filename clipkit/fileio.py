"""Atomic file and directory writes plus sha256 manifests, so a crash never destroys the last good artifact.

`torch.save` and `faiss.write_index` truncate their destination before writing; every artifact
clipkit writes therefore goes to a temporary sibling first, is fsynced, then renamed into place.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd

from .errors import ClipkitError

MANIFEST = "manifest.json"


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


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `path` as a whole once the block succeeds.

    The old directory (if any) is moved aside before the new one is renamed in, and only deleted
    afterwards, so at every instant either the old or the new complete directory exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
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


def verify_manifest(directory: str | os.PathLike, error: type[ClipkitError] = ClipkitError) -> bool:
    """Check every file listed in manifest.json; raise `error` on a mismatch. False if no manifest."""
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not mpath.exists():
        return False
    try:
        files = json.loads(mpath.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError) as e:
        raise error(f"{mpath}: unreadable manifest ({e})") from None
    for name, want in files.items():
        p = directory / name
        if not p.exists():
            raise error(f"{p}: listed in the manifest but missing")
        if p.stat().st_size != want["bytes"]:
            raise error(f"{p}: truncated or corrupt (size {p.stat().st_size}, expected {want['bytes']})")
        if sha256_file(p) != want["sha256"]:
            raise error(f"{p}: checksum mismatch (file changed or corrupt since it was written)")
    return True
