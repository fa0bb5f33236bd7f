"""Embed an image collection in resumable, shardable chunks, and build search indexes from the chunks.

A collection directory holds `collection.json` and, per chunk c of `shard_size` rows (global row order),
`emb-{c:05d}.npy` image embeddings, `txt-{c:05d}.npy` caption embeddings (optional) and
`meta-{c:05d}.parquet` (id, image, image_rel, caption, extra columns, ok, error). The meta file is written
last, so it marks a finished chunk. Worker i of n embeds the chunks c with c % n == i, so several
processes or machines can fill one directory. Ids are row numbers that never shift: an unreadable image
keeps its row with ok=False and a zero vector, and is tombstoned in the index built from the collection.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import faiss
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.samples import PairDataset, make_loader
from ..data.tables import read_folder, read_pairs, read_raw, resolve_images
from ..embed import Embedder, as_embedder
from ..errors import DataError
from ..fileio import atomic_path, check_free_space, files_fingerprint, reserve_space, write_json_atomic
from .build import eval_rows, make_index, resolve_factory, train, train_rows
from .dedup import drop_near_duplicates, duplicate_groups, near_duplicate_pairs, remove_near_duplicates
from .exact import check_vectors, drop_self, exact_search_blocks
from .index import SearchIndex, tune
from .io import c_stdout_to_stderr
from .query import IMAGE_WEIGHT, parse_query, query_vector

PathLike = Union[str, os.PathLike]
FORMAT_VERSION = 2  # 2: the image columns are `image` / `image_rel`, as in pairs tables (1 named them path)
INFO = "collection.json"
DUPLICATES = "duplicates.csv"  # written by `collection_duplicates` (`clipkit embed --dedup`)
ADDED_COLUMNS = ("id", "ok", "error")  # what the collection adds to the source's columns
MUST_MATCH = ("format_version", "model_id", "precision", "dim", "dtype", "count", "shard_size", "captions",
              "source_hash")  # a resume with other values would mix chunks that are not comparable


@dataclass
class EmbedSummary:
    """What one `embed_collection` call did: chunks written/skipped, images/s, and the unreadable images."""

    out_dir: Path
    count: int
    chunks: int
    shard: tuple[int, int]
    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    embedded: int = 0
    failures: list[dict] = field(default_factory=list)  # {"id", "image", "reason"}
    dropped_rows: int = 0  # table rows read_pairs dropped (empty captions, skipped bad lines): not in the collection
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------- sources


def _read_table(path: Path) -> pd.DataFrame:
    """`data.read_pairs`; a table without a caption column is read as image rows with empty captions."""
    try:
        return read_pairs(path)
    except DataError as e:
        if "no column 'caption'" not in str(e):
            raise
    raw = read_raw(path.absolute(), "error")
    if "image" not in raw.columns:
        raise DataError(f"{path}: no column 'image'; available columns: {', '.join(map(str, raw.columns))}")
    return resolve_images(raw.assign(caption=""), path.absolute().parent)


def read_source(source: PathLike) -> pd.DataFrame:
    """A folder or a table (captions optional) as collection rows in id order; `attrs` count dropped rows."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such folder or table")
    table = read_folder(path, keep_uncaptioned=True) if path.is_dir() else _read_table(path)
    clash = sorted(set(table.columns) & set(ADDED_COLUMNS))
    if clash:
        raise DataError(f"{path}: columns {clash} are reserved by the collection format; rename them")
    if table.empty:
        raise DataError(f"{path}: no images found")
    dropped = table.attrs.get("dropped_empty_captions", 0) + table.attrs.get("bad_lines_skipped", 0)
    table = table.reset_index(drop=True).rename_axis("id").reset_index()
    table.attrs["dropped_rows"] = dropped
    return table


def shard_from_env(env: Optional[dict] = None) -> tuple[int, int]:
    """(RANK, WORLD_SIZE) of a torchrun launch, or (0, 1) when not launched by torchrun."""
    env = os.environ if env is None else env
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))


# ---------------------------------------------------------------------------------------------- embedding


def _chunk_file(out: Path, kind: str, c: int) -> Path:
    return out / (f"{kind}-{c:05d}.parquet" if kind == "meta" else f"{kind}-{c:05d}.npy")


def _check_info(out: Path, info: dict) -> None:
    """Write collection.json, or refuse when the directory holds a different collection."""
    path = out / INFO
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = [f"{k}: {old.get(k)!r} -> {info[k]!r}" for k in MUST_MATCH if old.get(k) != info[k]]
        if diff:
            raise DataError(f"{out} holds a different collection ({'; '.join(diff)}); use a new output folder")
        return
    write_json_atomic(path, info)


def _collection_info(table: pd.DataFrame, embedder: Embedder, source: PathLike, shard_size: int, dtype: str,
                     captions: bool) -> dict:
    precision = f"image {embedder.precision.image}, text {embedder.precision.text}"  # auto resolved: per machine
    return {"format_version": FORMAT_VERSION, "model_id": embedder.model.fingerprint(), "precision": precision,
            "dim": embedder.dim,
            "dtype": dtype, "count": len(table), "shard_size": shard_size, "chunks": -(-len(table) // shard_size),
            "captions": captions, "source": str(Path(source).absolute()),
            "source_hash": files_fingerprint(table["image"].astype(str))[:16]}


def _batches(chunks: Sequence[int], count: int, shard_size: int, batch_size: int) -> list[list[list[int]]]:
    """Per chunk, its batches of row ids; batches never cross a chunk boundary."""
    out = []
    for c in chunks:
        lo, hi = c * shard_size, min((c + 1) * shard_size, count)
        out.append([list(range(b, min(b + batch_size, hi))) for b in range(lo, hi, batch_size)])
    return out


@torch.inference_mode()
def _embed_chunk(embedder: Embedder, loader: Iterator, batches: list[list[int]], bar: tqdm
                 ) -> tuple[np.ndarray, dict[int, str]]:
    """Image embeddings `[rows, D]` of one chunk (zero rows for failures) and {id: reason} of failures."""
    lo = batches[0][0]
    out = np.zeros((batches[-1][-1] + 1 - lo, embedder.dim), np.float32)
    failed: dict[int, str] = {}
    for ids in batches:
        batch = next(loader)
        good = batch["index"].numpy()
        failed.update((i, reason) for i, (_, reason) in zip(batch["skipped_index"], batch["skipped"]))
        if good.size:
            pixels = batch["pixels"].to(embedder.device)
            out[good - lo] = embedder.pixels(pixels)  # in the embedder's precision (auto: bf16 where native)
        bar.update(len(ids))
    return out, failed


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # np.save(name) would append ".npy" to a temp name
        np.save(f, array)


def _write_chunk(out: Path, c: int, rows: pd.DataFrame, emb: np.ndarray, txt: Optional[np.ndarray],
                 failed: dict[int, str], dtype: str) -> None:
    """Write one chunk; the meta file goes last and marks the chunk finished."""
    _save_npy(_chunk_file(out, "emb", c), emb.astype(dtype))
    if txt is not None:
        _save_npy(_chunk_file(out, "txt", c), txt.astype(dtype))
    meta = rows.assign(ok=~rows["id"].isin(list(failed)), error=rows["id"].map(failed).astype("string"))
    with atomic_path(_chunk_file(out, "meta", c)) as tmp:
        meta.to_parquet(tmp, index=False)


def _caption_vectors(embedder: Embedder, captions: pd.Series) -> np.ndarray:
    """Caption embeddings; rows without a caption stay zero."""
    out = np.zeros((len(captions), embedder.dim), np.float32)
    has = (captions.astype(str).str.len() > 0).to_numpy()
    if has.any():
        out[has] = embedder.texts(captions[has].astype(str).tolist())
    return out


def _loader(table: pd.DataFrame, embedder: Embedder, batches: list[list[int]], num_workers: int) -> DataLoader:
    dataset = PairDataset(table, embedder.preprocess, embedder.tokenizer)
    return make_loader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=embedder.device.type == "cuda")


def embed_collection(model: Union[PathLike, Embedder], source: PathLike, out_dir: PathLike, *,
                     shard: tuple[int, int] = (0, 1), shard_size: int = 10_000, batch_size: int = 64,
                     num_workers: int = 2, dtype: str = "float16", captions: bool = True, progress: bool = True,
                     device: Any = None) -> EmbedSummary:
    """Embed this worker's chunks of a folder or table into `out_dir`; finished chunks are skipped (resume)."""
    i, n = shard
    if not (n >= 1 and 0 <= i < n) or shard_size < 1 or batch_size < 1:
        raise ValueError(f"need shard i/n with 0 <= i < n, shard_size >= 1, batch_size >= 1; got {i}/{n}, "
                         f"{shard_size}, {batch_size}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    table = read_source(source)
    embedder = as_embedder(model, batch_size=batch_size, device=device, progress=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = _collection_info(table, embedder, source, shard_size, dtype, captions)
    _check_info(out, info)
    mine = range(i, info["chunks"], n)
    summary = EmbedSummary(out, len(table), info["chunks"], (i, n), dropped_rows=table.attrs["dropped_rows"])
    summary.skipped = [c for c in mine if _chunk_file(out, "meta", c).is_file()]
    todo = sorted(set(mine) - set(summary.skipped))
    if not todo:
        return summary
    plan = _batches(todo, len(table), shard_size, batch_size)
    in_order = [batch for chunk in plan for batch in chunk]
    t0 = time.perf_counter()
    loader = iter(_loader(table, embedder, in_order, num_workers))
    total = sum(len(batch) for batch in in_order)
    with tqdm(total=total, unit="img", desc=f"embed {i}/{n}", disable=not progress, smoothing=0.1) as bar:
        for c, batches in zip(todo, plan):
            rows = table.iloc[c * shard_size:(c + 1) * shard_size]
            emb, failed = _embed_chunk(embedder, loader, batches, bar)
            txt = _caption_vectors(embedder, rows["caption"]) if captions else None
            _write_chunk(out, c, rows, emb, txt, failed, dtype)
            summary.written.append(c)
            summary.embedded += len(rows) - len(failed)
            summary.failures += [{"id": k, "image": table.at[k, "image"], "reason": r} for k, r in failed.items()]
    summary.seconds = time.perf_counter() - t0
    return summary


# ---------------------------------------------------------------------------------------------- loading


def read_collection_info(emb_dir: PathLike) -> dict:
    """collection.json, after checking that every chunk is finished (the error lists missing chunks)."""
    d = Path(emb_dir)
    if not (d / INFO).is_file():
        raise DataError(f"{d}: not an embeddings folder (missing {INFO}; create it with `clipkit embed`)")
    info = json.loads((d / INFO).read_text(encoding="utf-8"))
    if info.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{d}: collection format {info.get('format_version')}, this clipkit reads {FORMAT_VERSION}; "
                        "embed it again into a new folder")
    missing = [c for c in range(info["chunks"]) if not _chunk_file(d, "meta", c).is_file()]
    if missing:
        raise DataError(f"{d}: collection incomplete: missing chunks {missing[:20]}"
                        f"{' ...' if len(missing) > 20 else ''} of {info['chunks']}; run `clipkit embed` for them")
    return info


def _chunk_meta(d: Path, info: dict) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(_chunk_file(d, "meta", c)) for c in range(info["chunks"])],
                     ignore_index=True)


def load_collection(emb_dir: PathLike, *, texts: bool = False) -> tuple[np.ndarray, pd.DataFrame]:
    """All chunks in id order: (float32 `[N, D]` image, or caption, vectors; meta with id/ok/error columns).

    Row i is id i; rows with ok=False hold zero vectors and are left out of indexes.
    """
    d = Path(emb_dir)
    info = read_collection_info(d)
    if texts and not info["captions"]:
        raise DataError(f"{d}: embedded without captions (--no-captions)")
    kind = "txt" if texts else "emb"
    vectors = np.concatenate([np.load(_chunk_file(d, kind, c)) for c in range(info["chunks"])], dtype=np.float32)
    meta = _chunk_meta(d, info)
    if vectors.shape != (info["count"], info["dim"]) or not np.array_equal(meta["id"], np.arange(len(meta))):
        raise DataError(f"{d}: chunks do not add up: vectors {vectors.shape}, {len(meta)} meta rows, "
                        f"collection.json says {info['count']} x {info['dim']}")
    return vectors, meta


# ---------------------------------------------------------------------------------------------- indexes


def _index_metadata(meta: pd.DataFrame) -> pd.DataFrame:
    """Search metadata: everything but the id (the row number) and the ok/error status."""
    return meta.drop(columns=list(ADDED_COLUMNS)).reset_index(drop=True)


def _set_ids(index: faiss.IndexIDMap2, ids: np.ndarray) -> None:
    """Point the IDMap's internal labels 0..n-1 at collection ids (skipping failed rows)."""
    faiss.copy_array_to_vector(np.ascontiguousarray(ids, dtype=np.int64), index.id_map)
    index.construct_rev_map()


def build_index_from_collection(emb_dir: PathLike, out_dir: PathLike, kind: str = "auto",
                                memory_budget: Optional[int] = None, *, on_disk: bool = False,
                                train_sample: int = 100_000, seed: int = 0, keep_vectors: bool = True,
                                progress: bool = True, dedup: Optional[float] = None) -> SearchIndex:
    """Build, save and return a SearchIndex over a collection; ids are collection ids, failed rows tombstoned.

    `on_disk=True` builds an IVF index whose inverted lists stay on disk (`build_ivf_ondisk`). `dedup=t`
    tombstones near-duplicates (cosine >= t) but the first of each group (`dedup.remove_near_duplicates`).
    """
    info = read_collection_info(emb_dir)
    if on_disk and dedup is not None:
        raise ValueError("dedup applies to in-memory builds; list an on-disk index's duplicates with `clipkit dedup`")
    if on_disk:
        factory = ondisk_factory(kind, info["count"], info["dim"], memory_budget)
        return build_ivf_ondisk(emb_dir, out_dir, factory, train_sample=train_sample, seed=seed,
                                keep_vectors=keep_vectors, progress=progress)
    vectors, meta = load_collection(emb_dir)
    ok = meta["ok"].to_numpy(bool)
    if not ok.any():
        raise DataError(f"{emb_dir}: no image in the collection could be embedded")
    built = SearchIndex.build(vectors[ok], kind=kind, memory_budget_bytes=memory_budget,
                              train_sample=train_sample, seed=seed, keep_vectors=keep_vectors,
                              model_id=info["model_id"])
    full = built.vectors
    if not ok.all():
        _set_ids(built.index, np.flatnonzero(ok))
        if keep_vectors:
            full = np.zeros_like(vectors)
            full[ok] = built.vectors
    report = {**built.build_report, "count": len(ok), "failed": int((~ok).sum())}
    index = SearchIndex(built.index, _index_metadata(meta), built.factory, vectors=full, deleted=~ok,
                        model_id=built.model_id, build_report=report)
    if dedup is not None:
        index.build_report["dedup"] = remove_near_duplicates(index, dedup)
    index.save(out_dir)
    return index


def collection_duplicates(emb_dir: PathLike, threshold: float = 0.95) -> pd.DataFrame:
    """Near-duplicate groups of a finished collection (`dedup.duplicate_groups`: group, id, keep, similarity and
    the metadata; ids are collection ids), found exactly over its image vectors and written to `duplicates.csv`
    beside the chunks. The embeddings are not changed: `index build --dedup` leaves the copies out."""
    vectors, meta = load_collection(emb_dir)
    ok = meta["ok"].to_numpy(bool)
    full = np.zeros_like(vectors)
    if ok.any():
        full[ok] = check_vectors(vectors[ok])
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    flat.add_with_ids(full[ok], np.flatnonzero(ok).astype(np.int64))
    index = SearchIndex(flat, _index_metadata(meta), "Flat", vectors=full, deleted=~ok)
    groups = duplicate_groups(near_duplicate_pairs(index, threshold), index.metadata)
    with atomic_path(Path(emb_dir) / DUPLICATES) as tmp:
        groups.to_csv(tmp, index=False)
    return groups


def ondisk_factory(kind: str, n: int, d: int, memory_budget: Optional[int] = None) -> str:
    """The factory for an on-disk build (auto means ivf); fast-scan PQ becomes 8-bit PQ, whose lists can go on disk."""
    factory = resolve_factory("ivf" if kind == "auto" else kind, n, d, memory_budget)
    if "IVF" not in factory:
        raise ValueError(f"on-disk indexes need an IVF kind (auto, ivf, ivfpq or an IVF factory), got {kind!r}")
    return factory.replace("x4fsr", "")


def _ok_chunks(d: Path, info: dict, meta: pd.DataFrame) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(chunk, normalised float32 vectors of its ok rows, their ids) per chunk, one chunk in memory at a time."""
    size = info["shard_size"]
    for c in range(info["chunks"]):
        rows = meta.iloc[c * size:(c + 1) * size]
        ok = rows["ok"].to_numpy(bool)
        yield c, check_vectors(np.load(_chunk_file(d, "emb", c), mmap_mode="r")[ok]), rows["id"].to_numpy()[ok]


def _gather(d: Path, info: dict, ids: np.ndarray) -> np.ndarray:
    """The stored image vectors of sorted collection ids, as float32, read chunk by chunk (memory-mapped)."""
    chunk, row = np.divmod(ids, info["shard_size"])
    parts = [np.load(_chunk_file(d, "emb", c), mmap_mode="r")[row[chunk == c]] for c in np.unique(chunk)]
    return np.concatenate(parts).astype(np.float32)


def _add_blocks(d: Path, info: dict, meta: pd.DataFrame, trained: str, work: Path,
                vectors: Optional[np.ndarray], progress: bool) -> list[str]:
    """Add each chunk to its own copy of the trained index (labels: running position), FAISS's on-disk recipe."""
    blocks, start = [], 0
    for c, x, ids in tqdm(_ok_chunks(d, info, meta), total=info["chunks"], desc="add chunks", unit="chunk",
                          disable=not progress):
        block = faiss.read_index(trained)
        block.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
        blocks.append(str(work / f"block-{c:05d}.index"))
        faiss.write_index(block, blocks[-1])
        if vectors is not None:
            vectors[ids] = x
        start += len(x)
    return blocks


def _vectors_memmap(path: Path, shape: tuple[int, int]) -> np.memmap:
    """A new float32 .npy memmap whose space is reserved: writing a sparse map on a full disk is SIGBUS."""
    vectors = np.lib.format.open_memmap(path, "w+", np.float32, shape)
    reserve_space(path, path.stat().st_size)
    return vectors


def build_ivf_ondisk(emb_dir: PathLike, out_dir: PathLike, factory: str, *, train_sample: int = 100_000,
                     seed: int = 0, keep_vectors: bool = True, progress: bool = True) -> SearchIndex:
    """IVF index for collections larger than memory: train on a sample, index each chunk separately, then
    `faiss.contrib.ondisk.merge_ondisk` the lists into one OnDiskInvertedLists file saved with the index."""
    from faiss.contrib.ondisk import merge_ondisk

    t0, d = time.perf_counter(), Path(emb_dir)
    info = read_collection_info(d)
    meta = _chunk_meta(d, info)
    ok = meta["ok"].to_numpy(bool)
    if not ok.any():
        raise DataError(f"{d}: no image in the collection could be embedded")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.ondisk-", dir=out.parent))
    try:
        index = make_index(info["dim"], factory)
        faiss.extract_index_ivf(index)  # raises for a factory without IVF
        live = np.flatnonzero(ok)  # the rows SearchIndex.build would train on: the same seeded choice
        train(index, check_vectors(_gather(d, info, live[train_rows(live.size, train_sample, seed)])))
        faiss.write_index(index, str(work / "trained.index"))
        vectors = _vectors_memmap(work / "vectors.npy", (len(ok), info["dim"])) if keep_vectors else None
        blocks = _add_blocks(d, info, meta, str(work / "trained.index"), work, vectors, progress)
        wrapped = faiss.IndexIDMap2(faiss.read_index(str(work / "trained.index")))
        inner = faiss.downcast_index(wrapped.index)
        # FAISS sizes the list file with truncate() and writes it through mmap: on a full disk, SIGBUS
        check_free_space(work / "lists.ivfdata", int(ok.sum()) * (inner.code_size + 8))
        with c_stdout_to_stderr():  # merge_ondisk printf()s the file size
            merge_ondisk(inner, blocks, str(work / "lists.ivfdata"))
        wrapped.ntotal = inner.ntotal
        _set_ids(wrapped, np.flatnonzero(ok))
        result = SearchIndex(wrapped, _index_metadata(meta), factory, vectors=vectors, deleted=~ok,
                             model_id=info["model_id"])
        result.build_report = _ondisk_report(result, d, info, meta, seed, time.perf_counter() - t0, work)
        result.save(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return SearchIndex.load(out, verify=False)


def _ondisk_report(index: SearchIndex, d: Path, info: dict, meta: pd.DataFrame, seed: int, seconds: float,
                   work: Path) -> dict:
    """The build report of an on-disk index, tuned and measured as `SearchIndex.build` does (exact truth
    streamed over the chunks)."""
    live = np.flatnonzero(meta["ok"].to_numpy(bool))
    qi = np.sort(live[eval_rows(live.size, seed)])
    q = check_vectors(_gather(d, info, qi))
    blocks = ((x, ids) for _, x, ids in _ok_chunks(d, info, meta))
    measured = tune(index, q, qi, drop_self(exact_search_blocks(blocks, q, 11)[1], qi, 10))
    size = sum(f.stat().st_size for f in (work / "lists.ivfdata", work / "trained.index"))
    return {"kind": "ondisk", "factory": index.factory, "count": len(meta), "failed": int(len(meta) - live.size),
            "on_disk": True, "build_seconds": round(seconds, 3), "bytes_per_vector": round(size / live.size, 1),
            **measured}


# ---------------------------------------------------------------------------------------------- searching


def open_search(index_dir: PathLike, model: Union[PathLike, Embedder]) -> tuple[SearchIndex, Embedder, list[str]]:
    """Load an index and a model that can query it: a dim mismatch raises, a different model only warns."""
    index = SearchIndex.load(index_dir)
    embedder = as_embedder(model, progress=False)
    if embedder.dim != index.dim:
        raise ValueError(f"dim mismatch: index {index_dir} holds {index.dim}-d vectors but model {model} embeds "
                         f"to {embedder.dim}; query it with the model that embedded the collection")
    warnings, model_id = [], embedder.model.fingerprint() if index.model_id else None
    if index.model_id not in (model_id, embedder.model.config.text_space):  # a distilled text tower is at home
        warnings.append(f"index was built from model {index.model_id}, querying with {model_id}")
    return index, embedder, warnings


def search_collection(index: SearchIndex, embedder: Embedder, *, text: Optional[str] = None,
                      image: Optional[PathLike] = None, k: int = 10, rerank: int = 0, filter: Any = None,
                      mmr: Optional[float] = None, negative: Any = None, image_weight: float = IMAGE_WEIGHT,
                      dedup: Optional[float] = None) -> dict:
    """A text and/or image query (`cat -dog`, `negative=`; see `query`) -> `{"results": [{"id", "score", "image",
    ...metadata}]}` (the HTTP shape); `dedup`: drop near-duplicates of better results at this cosine."""
    q = query_vector(embedder, parse_query(text, image, negative, image_weight))
    scores, ids = index.search(q, k, rerank=rerank, filter=filter, mmr=mmr)
    if dedup is not None:
        scores, ids = drop_near_duplicates(index, scores, ids, dedup)
    return {"results": index.results(scores, ids)[0]}
