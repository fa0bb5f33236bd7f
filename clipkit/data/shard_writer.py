"""Write a pairs table or image folder as WebDataset tar shards (`clipkit data shards`), with `sizes.json`.

Each row becomes one sample: `KEY.EXT` (the image file's bytes, never re-encoded), `KEY.txt` (the caption) and
`KEY.json` (the row's other columns, such as `image_rel` and `label`). Keys are the table's row numbers,
zero-padded, so a sample can be traced back to its row. Shards are `shard-00000.tar`, ...; each is written to
a temp file and renamed, and `sizes.json` (the per-shard counts the streamed trainer reads) comes last.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pandas as pd
import webdataset as wds
from tqdm.auto import tqdm

from ..errors import DataError
from ..fileio import atomic_path, json_safe, write_json_atomic
from .shards import SIZES_FILE
from .tables import IMAGE_EXTS, PathLike, read_pairs

SHARD_NAME = "shard-{:05d}.tar"


@dataclass
class ShardSummary:
    """What `write_shards` wrote: the shard files, their sample counts, and the rows it could not write."""

    out: Path
    shards: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows (missing or unsupported image files)
    examples: list[str] = field(default_factory=list)  # the first skipped image paths
    dropped_rows: int = 0  # table rows read_pairs dropped (empty captions, skipped bad lines)
    bytes: int = 0
    seconds: float = 0.0

    @property
    def samples(self) -> int:
        return sum(self.counts)

    @property
    def spec(self) -> str:
        """The brace pattern of the shards written, for `clipkit train --train-data`."""
        last = len(self.shards) - 1
        return str(self.out / ("shard-{00000..%05d}.tar" % last)) if last > 0 else str(self.out / self.shards[0])


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not an empty folder; write shards into a new folder")


def _samples(table: pd.DataFrame, summary: ShardSummary) -> Iterator[dict[str, Any]]:
    """One webdataset sample per row whose image file can be read; the others are counted in `summary`."""
    width = max(9, len(str(len(table))))
    extra = [c for c in table.columns if c not in ("image", "caption")]
    for row, (image, caption, *rest) in enumerate(table[["image", "caption", *extra]].itertuples(index=False)):
        ext = Path(image).suffix.lower().lstrip(".")
        reason, data = ("unsupported_extension", None) if ext not in IMAGE_EXTS else (None, None)
        if reason is None:
            try:
                data = Path(image).read_bytes()
            except OSError:
                reason = "missing"
        if reason is not None:
            summary.skipped[reason] = summary.skipped.get(reason, 0) + 1
            if len(summary.examples) < 10:
                summary.examples.append(str(image))
            continue
        meta = json.dumps({c: json_safe(v) for c, v in zip(extra, rest)}, ensure_ascii=False)
        yield {"__key__": f"{row:0{width}d}", ext: data, "txt": str(caption).encode("utf-8"),
               "json": meta.encode("utf-8")}


def _write_one(path: Path, samples: list[dict[str, Any]]) -> int:
    """One shard, atomically; returns its size in bytes. mtime 0: the same rows give the same bytes."""
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as sink:
        for sample in samples:
            sink.write(sample)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def write_shards(source: PathLike, out_dir: PathLike, *, shard_size: int = 1000, image_column: str = "image",
                 caption_column: str = "caption", progress: bool = True,
                 table: Optional[pd.DataFrame] = None) -> ShardSummary:
    """Write the rows of a pairs table or image folder as shards of `shard_size` samples into a new `out_dir`."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    t0, out = time.perf_counter(), Path(out_dir).absolute()
    _check_out(out)
    if table is None:
        table = read_pairs(source, image_column=image_column, caption_column=caption_column)
    if table.empty:
        raise DataError(f"{source}: no captioned images to write")
    summary = ShardSummary(out, dropped_rows=table.attrs.get("dropped_empty_captions", 0)
                           + table.attrs.get("bad_lines_skipped", 0))
    out.mkdir(parents=True, exist_ok=True)
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        name = SHARD_NAME.format(len(summary.shards))
        summary.bytes += _write_one(out / name, pending)
        summary.shards.append(name)
        summary.counts.append(len(pending))
        pending.clear()

    for sample in tqdm(_samples(table, summary), total=len(table), desc="writing shards", unit="img",
                       disable=not progress):
        pending.append(sample)
        if len(pending) == shard_size:
            flush()
    if pending:
        flush()
    if not summary.shards:
        raise DataError(f"{source}: none of the {len(table)} image files could be read ({summary.skipped})")
    write_json_atomic(out / SIZES_FILE, dict(zip(summary.shards, summary.counts)))
    summary.seconds = time.perf_counter() - t0
    return summary
