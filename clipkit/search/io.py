"""A saved search index: writing its directory atomically, reading it back and checking every file.

Files: index.json (`info`), index.faiss, meta.parquet (metadata + tombstones), vectors.npy (optional),
lists.ivfdata (on-disk IVF only) and a sha256 manifest. Every check raises `IndexLoadError` with a
specific reason (missing, truncated or corrupt, dim/count/metric mismatch) so a damaged index is never
served half-loaded.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from ..errors import IndexLoadError
from ..fileio import atomic_dir, atomic_path, recover_dir, verify_manifest, write_json_atomic, write_manifest

FORMAT_VERSION = 1
DELETED_COL = "__deleted__"


def core_index(index: faiss.Index) -> faiss.Index:
    """The index under the IDMap and any pre-transforms (OPQ, PCA): where nprobe/efSearch live."""
    idx = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    while isinstance(idx, faiss.IndexPreTransform):
        idx = faiss.downcast_index(idx.index)
    return idx


def read_info(d: Path) -> dict:
    path = d / "index.json"
    if not path.is_file():
        raise IndexLoadError(f"{d}: not an index directory (missing index.json)")
    if path.is_symlink():  # read before the manifest is checked: never follow it out of the directory
        raise IndexLoadError(f"{path}: is a symbolic link; an index directory holds regular files only")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        version = info["format_version"]
        info["dim"], info["count"] = int(info["dim"]), int(info["count"])
    except (ValueError, KeyError, TypeError) as e:
        raise IndexLoadError(f"{path}: unreadable ({e})") from None
    if version != FORMAT_VERSION:
        raise IndexLoadError(f"{path}: unsupported format_version {version} (expected {FORMAT_VERSION})")
    if info.get("metric") != "ip" or info.get("normalized") is not True:
        raise IndexLoadError(f"{path}: metric/normalization mismatch: expected metric 'ip' on normalized "
                             f"vectors, got {info.get('metric')!r}, normalized={info.get('normalized')!r}")
    info.setdefault("has_vectors", (d / "vectors.npy").exists())
    return info


def ondisk_lists(index: faiss.Index) -> faiss.OnDiskInvertedLists | None:
    """The OnDiskInvertedLists of an IVF index built with FAISS's on-disk merge, else None."""
    core = core_index(index)
    if not isinstance(core, faiss.IndexIVF):
        return None
    lists = faiss.downcast_InvertedLists(core.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (no copy of a large list file) when src and dst share a filesystem, else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@contextlib.contextmanager
def c_stdout_to_stderr():
    """Send C-level stdout to stderr for a moment, so library chatter cannot corrupt `--json` output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def read_faiss(path: Path) -> faiss.Index:
    if not path.is_file():
        raise IndexLoadError(f"{path}: missing")
    try:
        with c_stdout_to_stderr():  # FAISS printf()s the on-disk list path it resolves
            index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    except (RuntimeError, MemoryError, OSError) as e:
        raise IndexLoadError(f"{path}: truncated or corrupt ({str(e).strip().splitlines()[-1]})") from None
    if not isinstance(index, faiss.IndexIDMap2):
        raise IndexLoadError(f"{path}: expected an IndexIDMap2, got {type(index).__name__}")
    return index


def check_index(d: Path, index: faiss.Index, info: dict, expected_dim: int | None) -> None:
    if index.d != info["dim"]:
        raise IndexLoadError(f"{d}: dim mismatch: index.faiss has d={index.d}, index.json says {info['dim']}")
    if expected_dim is not None and index.d != expected_dim:
        raise IndexLoadError(f"{d}: dim mismatch: index has d={index.d} but the model embeds to {expected_dim}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexLoadError(f"{d}: metric mismatch: index.faiss is not an inner-product index")
    if index.ntotal != info["count"]:
        raise IndexLoadError(f"{d}: count mismatch: index.faiss holds {index.ntotal} vectors, "
                             f"index.json says {info['count']}")


def read_meta(path: Path, index: faiss.Index) -> tuple[pd.DataFrame, np.ndarray]:
    """Metadata and tombstones; every live row must be in the index and every index id a row."""
    try:
        meta = pd.read_parquet(path)
        deleted = np.array(meta.pop(DELETED_COL), dtype=bool)  # a copy: pandas 3 hands out read-only views
    except Exception as e:  # pyarrow raises its own types for corrupt files
        raise IndexLoadError(f"{path}: unreadable or not clipkit metadata ({e})") from None
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= len(meta)):
        raise IndexLoadError(f"{path}: count mismatch: index ids reach {ids.max()} but metadata has "
                             f"{len(meta)} rows")
    live_in_index = np.sort(ids[~deleted[ids]])
    if not np.array_equal(live_in_index, np.flatnonzero(~deleted)):
        raise IndexLoadError(f"{path}: count mismatch: index holds {live_in_index.size} live vectors, "
                             f"metadata has {int((~deleted).sum())} live rows")
    return meta.reset_index(drop=True), deleted


def read_vectors(path: Path, shape: tuple[int, int], mmap: bool) -> np.ndarray:
    try:
        vectors = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise IndexLoadError(f"{path}: truncated or corrupt ({e})") from None
    if vectors.shape != shape or vectors.dtype != np.float32:
        raise IndexLoadError(f"{path}: shape/dtype mismatch: {vectors.shape} {vectors.dtype}, "
                             f"expected {shape} float32")
    return vectors


@dataclass
class IndexFiles:
    """What an index directory holds: the FAISS index, metadata rows, tombstones, optional vectors, index.json."""

    index: faiss.Index
    metadata: pd.DataFrame
    deleted: np.ndarray
    vectors: np.ndarray | None
    info: dict


def write_index_dir(directory: str | Path, files: IndexFiles) -> Path:
    """Write the index directory atomically: old or new, never a mix, with a sha256 manifest."""
    with atomic_dir(directory) as tmp:
        with atomic_path(tmp / "index.faiss") as p:  # write_index truncates its target first
            faiss.write_index(files.index, str(p))
        lists = ondisk_lists(files.index)
        if lists is not None:  # index.faiss names the list data; load looks for it beside index.faiss
            link_or_copy(Path(lists.filename), tmp / Path(lists.filename).name)
        files.metadata.assign(**{DELETED_COL: files.deleted}).to_parquet(tmp / "meta.parquet", index=False)
        if files.vectors is not None:
            np.save(tmp / "vectors.npy", files.vectors)
        write_json_atomic(tmp / "index.json", files.info)
        write_manifest(tmp)
    return Path(directory)


def read_index_dir(directory: str | Path, expected_dim: int | None, mmap: bool, verify: bool) -> IndexFiles:
    """Read and cross-check an index directory; any inconsistency raises IndexLoadError. With `verify`, every
    file in it must be listed in its manifest and match (regular files only: no symlinks, devices, subpaths)."""
    d = Path(directory)
    recover_dir(d)  # a save killed mid-swap may have left the directory under its `.NAME.old-*` name
    info = read_info(d)
    if verify and not verify_manifest(d, IndexLoadError, complete=True):
        raise IndexLoadError(f"{d}: missing manifest.json (pass verify=False to skip checksums)")
    index = read_faiss(d / "index.faiss")
    check_index(d, index, info, expected_dim)
    meta, deleted = read_meta(d / "meta.parquet", index)
    vectors = read_vectors(d / "vectors.npy", (len(meta), index.d), mmap) if info["has_vectors"] else None
    return IndexFiles(index, meta, deleted, vectors, info)
