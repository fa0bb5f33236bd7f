"""Image-caption data: tables, folders and tar shards -> (pixels, token ids) samples, with exact skip counts.

Tables come out of `read_table` / `read_folder` with the columns `image` (absolute path, resolved against the
table's folder), `image_rel` (the path as written), `caption` (one clean caption per row) and any extra columns
passed through. A dataset item is `{"pixels", "input_ids", "attention_mask", "index"}` or, for an image that
cannot be read, `{"skip": (path, reason), "index"}`; `collate` moves the skips into the batch so that the main
process counts them (exact across DataLoader workers) with a `SkipCounter`.
"""
from __future__ import annotations

import json
import os
import random
import re
import tarfile
import warnings
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Sequence, Union

import numpy as np
import pandas as pd
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate
from webdataset.tariterators import group_by_keys

from .errors import DataError, ImageLoadError
from .tokenizer import Tokenizer
from .transforms import ImageSource, Preprocess

PathLike = Union[str, os.PathLike]
Sample = dict[str, Any]
TABLE_READERS = (".csv", ".tsv", ".parquet", ".jsonl", ".json")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")
CAPTION_EXTS = ("txt", "caption", "text")
NA_CAPTIONS = frozenset({"", "na", "n/a", "nan", "null", "none"})
MIN_PYARROW = (14, 0, 1)  # CVE-2023-47248: arbitrary code execution when reading untrusted parquet
MIN_SEEN_FOR_CHECK = 50
MAX_MEMBER_BYTES = 256 << 20  # a tar member is read into memory whole
_SHELL_META = re.compile(r"[;&|$`<>()'\"\\\n\r\x00]")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_TENSOR_KEYS = ("pixels", "input_ids", "attention_mask", "index")


# ---------------------------------------------------------------------------------------------- tables


def _require_pyarrow() -> None:
    import pyarrow

    have = tuple(int(x) for x in re.findall(r"\d+", pyarrow.__version__)[:3])
    if have < MIN_PYARROW:
        raise DataError(f"pyarrow {pyarrow.__version__} is unsafe for parquet (CVE-2023-47248); need >= 14.0.1")


def _encoding_error(path: Path) -> DataError:
    """A DataError naming the file and the line of its first non-UTF-8 byte."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
        where = ""
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        where = f" line {line} (byte {e.start}):"
    return DataError(f"{path}:{where} not UTF-8 text; re-save the table as UTF-8")


def _read_delimited(path: Path, sep: str, on_bad_lines: str) -> pd.DataFrame:
    """CSV/TSV as strings. The header is read as a data row so that a row with more fields than the header
    is an error with its line number: pandas would otherwise treat the extra field as an index column
    (a trailing comma shifts every column) or drop it silently under `index_col=False`."""
    kw = dict(sep=sep, header=None, dtype=str, keep_default_na=False, index_col=False, encoding="utf-8-sig")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            raw = pd.read_csv(path, on_bad_lines="warn" if on_bad_lines == "skip" else "error", **kw)
        except pd.errors.EmptyDataError:
            raise DataError(f"{path}: empty table") from None
        except pd.errors.ParserError as e:
            msg = str(e).replace("Error tokenizing data. C error: ", "").strip()
            raise DataError(f"{path}: {msg} (a stray comma, or a trailing comma on each row? "
                            "quote captions that contain the separator; on_bad_lines='skip' drops such rows)") from None
    bad = sum(len(re.findall(r"Skipping line \d+", str(w.message))) for w in caught)
    header = [h.strip() for h in raw.iloc[0]]
    df = raw.iloc[1:].set_axis(header, axis=1).reset_index(drop=True)
    keep = [i for i, h in enumerate(header) if h or (df.iloc[:, i] != "").any()]
    df = df.iloc[:, keep]  # drops the empty column of a trailing comma on the header and on every row
    if df.columns.duplicated().any():
        raise DataError(f"{path}: duplicate column names {sorted(set(df.columns[df.columns.duplicated()]))}")
    df.attrs["bad_lines_skipped"] = bad
    return df


def _read_raw(path: Path, on_bad_lines: str) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix not in TABLE_READERS:
        raise DataError(f"{path}: unsupported table type {suffix!r}; use one of {', '.join(TABLE_READERS)}")
    if not path.is_file():
        raise DataError(f"{path}: no such table file")
    try:
        if suffix in (".csv", ".tsv"):
            return _read_delimited(path, "\t" if suffix == ".tsv" else ",", on_bad_lines)
        if suffix == ".parquet":
            _require_pyarrow()
            return pd.read_parquet(path)
        return pd.read_json(path, lines=suffix == ".jsonl", dtype=False, convert_dates=False, encoding="utf-8-sig")
    except DataError:
        raise
    except UnicodeDecodeError:
        raise _encoding_error(path) from None
    except Exception as e:  # pyarrow/json errors have no common base: name the file whatever broke
        raise DataError(f"{path}: unreadable {suffix[1:]} table ({type(e).__name__}: {e})") from None


def _rename(df: pd.DataFrame, path: Path, image_col: str, caption_col: str) -> pd.DataFrame:
    """Rename the user's columns to `image` and `caption`, listing what exists when one is missing."""
    for want in (image_col, caption_col):
        if want not in df.columns:
            raise DataError(f"{path}: no column {want!r}; available columns: {', '.join(map(str, df.columns))} "
                            "(pick others with image_col= / caption_col=)")
    clash = [c for c, src in (("image", image_col), ("caption", caption_col)) if c != src and c in df.columns]
    if clash:
        raise DataError(f"{path}: column(s) {clash} exist besides the chosen image/caption columns; rename them")
    return df.rename(columns={image_col: "image", caption_col: "caption"})


def _json_list(text: Any) -> Any:
    """A CSV cell holding a JSON list of captions becomes that list; anything else is returned unchanged."""
    if isinstance(text, str) and text.startswith("[") and text.endswith("]"):
        try:
            value = json.loads(text)
        except ValueError:
            return text
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    return text


def _explode_captions(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """One row per caption: list cells (JSONL/parquet lists, JSON lists in CSV) are exploded."""
    df = df.assign(caption=df["caption"].map(_json_list)).explode("caption", ignore_index=True)
    for col in ("image", "caption"):
        kind = pd.api.types.infer_dtype(df[col], skipna=True)
        if kind not in ("string", "empty"):
            raise DataError(f"{path}: column {col!r} must hold text (or lists of text), found {kind} values")
    return df


def _drop_empty_captions(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Strip captions and drop empty, whitespace and NA-like ones (never keep the literal text "nan")."""
    text = df["caption"].astype(object).where(df["caption"].notna(), "").astype(str).str.strip()
    bad = text.str.lower().isin(NA_CAPTIONS)
    return df.assign(caption=text)[~bad].reset_index(drop=True), int(bad.sum())


def _resolve_images(df: pd.DataFrame, base: Path) -> pd.DataFrame:
    """`image` becomes an absolute path (relative ones resolve against `base`, not the CWD); `image_rel` keeps
    the path as written."""
    rel = df["image"].astype(object).where(df["image"].notna(), "").astype(str).str.strip()
    absolute = rel.map(lambda p: os.path.abspath(os.path.join(base, p)))
    rest = [c for c in df.columns if c not in ("image", "caption")]
    return pd.concat([absolute.rename("image"), df["caption"], rel.rename("image_rel"), df[rest]], axis=1)


def read_table(path: PathLike, *, image_col: str = "image", caption_col: str = "caption",
               on_bad_lines: str = "error") -> pd.DataFrame:
    """Read a CSV/TSV/parquet/JSON(L) pairs table into clean `image`/`caption` rows (see the module docstring).

    `df.attrs` holds `dropped_empty_captions` and `bad_lines_skipped` (rows dropped by on_bad_lines="skip").
    """
    if on_bad_lines not in ("error", "skip"):
        raise ValueError(f"on_bad_lines must be 'error' or 'skip', got {on_bad_lines!r}")
    path = Path(path).absolute()
    raw = _read_raw(path, on_bad_lines)
    bad_lines = raw.attrs.get("bad_lines_skipped", 0)
    df = _explode_captions(_rename(raw, path, image_col, caption_col), path)
    df, dropped = _drop_empty_captions(df)
    df = _resolve_images(df, path.parent)
    df.attrs.update(source=str(path), dropped_empty_captions=dropped, bad_lines_skipped=bad_lines)
    return df


def read_folder(path: PathLike, *, keep_uncaptioned: bool = False) -> pd.DataFrame:
    """Images with sidecar captions (`x.jpg` + `x.txt`) under `path`, recursively, as a pairs table.

    Images in sub-folders get a `label` column: the first sub-folder's name (class folders). Images without a
    caption file are dropped and counted in `attrs["missing_captions"]`, empty ones in `dropped_empty_captions`.
    With `keep_uncaptioned` (a search collection needs no captions) every image is kept, captions stripped,
    missing ones "".
    """
    root = Path(path).absolute()
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS
                    and not any(part.startswith(".") for part in p.relative_to(root).parts))
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8-sig", errors="replace")
                if p.with_suffix(".txt").is_file() else None for p in images]
    if keep_uncaptioned:
        kept, captions = images, [(c or "").strip() for c in captions]
    else:
        kept, captions = [p for p, c in zip(images, captions) if c is not None], [c for c in captions if c is not None]
    rel = [p.relative_to(root) for p in kept]
    df = pd.DataFrame({"image": [str(p) for p in kept], "caption": captions, "image_rel": [r.as_posix() for r in rel]})
    if any(len(r.parts) > 1 for r in rel):
        df["label"] = [r.parts[0] if len(r.parts) > 1 else "" for r in rel]
    df.attrs["source"] = str(root)
    if not keep_uncaptioned:
        df, dropped = _drop_empty_captions(df)
        df.attrs.update(source=str(root), missing_captions=len(images) - len(kept), dropped_empty_captions=dropped)
    return df


def _is_shard_spec(spec: Any) -> bool:
    if not isinstance(spec, (str, os.PathLike)):
        return True  # a list of shards
    s = os.fspath(spec)
    return bool(re.search(r"\.(tar|tgz|tar\.gz)$", s)) or (bool(_SCHEME.match(s)) and not s.startswith("file:"))


def read_pairs(spec: PathLike, **kw: Any) -> pd.DataFrame:
    """A pairs table from a table file (`read_table` keywords apply) or a folder of images + sidecar captions."""
    if _is_shard_spec(spec):
        raise DataError(f"{spec}: tar shards are streamed; use TarShardDataset (or pair_dataset)")
    return read_folder(spec) if Path(spec).is_dir() else read_table(spec, **kw)


# ---------------------------------------------------------------------------------------------- samples


def make_sample(pixels: torch.Tensor, caption: str, tokenizer: Tokenizer, index: int) -> Sample:
    """The dataset item for one good pair: pixels [3, S, S] and token ids [L]."""
    tokens = tokenizer([caption])
    return {"pixels": pixels, "input_ids": tokens["input_ids"][0], "attention_mask": tokens["attention_mask"][0],
            "index": index}


def load_sample(preprocess: Preprocess, tokenizer: Tokenizer, image: ImageSource, caption: str, index: int,
                name: str) -> Sample:
    """Preprocess `image` into a sample, or a `{"skip": (name, reason)}` record if it cannot be read."""
    try:
        pixels = preprocess(image)
    except ImageLoadError as e:
        return {"skip": (name, e.reason), "index": index}
    except Exception:  # noqa: BLE001 -- a per-sample failure must be counted, never kill the run
        return {"skip": (name, "decode_error"), "index": index}
    return make_sample(pixels, caption, tokenizer, index)


class PairDataset(Dataset):
    """Map-style dataset over a pairs table (DataFrame or anything `read_pairs` reads): row i -> a sample."""

    def __init__(self, table: Union[pd.DataFrame, PathLike], preprocess: Preprocess, tokenizer: Tokenizer) -> None:
        table = table if isinstance(table, pd.DataFrame) else read_pairs(table)
        self.table = table
        # Arrow string arrays, not lists of str: forked workers would copy every object on refcount writes
        self.images, self.captions = table["image"].astype("str").array, table["caption"].astype("str").array
        self.preprocess, self.tokenizer = preprocess, tokenizer

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Sample:
        path = str(self.images[i])
        return load_sample(self.preprocess, self.tokenizer, path, str(self.captions[i]), int(i), path)


def collate(batch: Sequence[Sample]) -> dict[str, Any]:
    """Stack the good samples; skipped images and shard errors travel as lists for the main process to count.

    A batch whose samples were all skipped has `index.numel() == 0` (and empty tensors).
    """
    good = [b for b in batch if "pixels" in b]
    out: dict[str, Any] = (default_collate([{k: b[k] for k in _TENSOR_KEYS} for b in good]) if good else
                           {k: torch.empty(0, dtype=torch.long if k != "pixels" else torch.float32)
                            for k in _TENSOR_KEYS})
    out["skipped"] = [b["skip"] for b in batch if "skip" in b]
    out["shard_errors"] = [b["shard_error"] for b in batch if "shard_error" in b]
    if any("key" in b for b in good):
        out["keys"] = [b.get("key") for b in good]
    return out


class SkipCounter:
    """Counts skipped samples by reason across batches, and aborts when too much of the data is bad."""

    def __init__(self, max_examples: int = 10) -> None:
        self.seen = 0
        self.by_reason: Counter[str] = Counter()
        self.examples: list[str] = []
        self.bad_shards: list[str] = []
        self.max_examples = max_examples

    def add(self, path: str, reason: str) -> None:
        """Count one skipped sample (it also counts as seen)."""
        self.seen += 1
        self.by_reason[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(path))

    def update(self, batch: dict[str, Any]) -> None:
        """Count one collated batch: its good samples, its skips and its shard errors."""
        self.seen += int(batch["index"].numel())
        for path, reason in batch["skipped"]:
            self.add(path, reason)
        self.bad_shards.extend(url for url, _ in batch.get("shard_errors", ()))

    @property
    def skipped(self) -> int:
        return sum(self.by_reason.values())

    @property
    def shard_errors(self) -> int:
        return len(self.bad_shards)

    @property
    def fraction(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0

    def summary(self) -> str:
        """E.g. "skipped 3 of 200 images: decode_error 2, missing 1; first: a.jpg, b.jpg"."""
        text = f"skipped {self.skipped} of {self.seen} images"
        if self.skipped:
            reasons = ", ".join(f"{r} {n}" for r, n in self.by_reason.most_common())
            text += f": {reasons}; first: {', '.join(self.examples)}"
        if self.bad_shards:
            text += f"; {self.shard_errors} unreadable shard(s): {', '.join(self.bad_shards[:self.max_examples])}"
        return text

    def check(self, max_bad_fraction: float, *, final: bool = False) -> None:
        """Raise DataError when more than `max_bad_fraction` of the samples seen were skipped.

        Judged once `MIN_SEEN_FOR_CHECK` samples were seen (so one early bad file does not abort), or at the end.
        """
        if (final or self.seen >= MIN_SEEN_FOR_CHECK) and self.fraction > max_bad_fraction:
            raise DataError(f"too much bad data ({self.fraction:.1%} > max_bad_fraction {max_bad_fraction:.1%}): "
                            f"{self.summary()}")

    def to_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": self.skipped, "by_reason": dict(self.by_reason),
                "examples": list(self.examples), "bad_shards": list(self.bad_shards)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SkipCounter":
        """Restore counters saved with `to_dict` (e.g. from a checkpoint, to resume with exact counts)."""
        out = cls()
        out.seen, out.by_reason = int(d["seen"]), Counter(d["by_reason"])
        out.examples, out.bad_shards = list(d["examples"]), list(d.get("bad_shards", []))
        return out


def seed_worker(worker_id: int) -> None:
    """Seed numpy and `random` in a DataLoader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0, seed: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader with `collate`, a seeded order, seeded workers, and persistent workers when there are any."""
    if shuffle and isinstance(dataset, IterableDataset):
        raise ValueError("a streamed dataset cannot be shuffled by the loader; use TarShardDataset(shuffle_buffer=)")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, collate_fn=collate,
                      generator=generator, worker_init_fn=seed_worker, persistent_workers=num_workers > 0,
                      drop_last=drop_last, pin_memory=torch.cuda.is_available())


# ---------------------------------------------------------------------------------------------- tar shards


def _check_shard(url: str) -> None:
    """Refuse what webdataset would hand to a shell (`pipe:`, http(s)/gs/s3 URLs) or shell metacharacters."""
    if (_SCHEME.match(url) and not url.startswith("file:")) or _SHELL_META.search(url):
        raise DataError(f"refused shard spec {url!r}: 'pipe:' and remote URLs run shell commands and shell "
                        "metacharacters are not allowed; pass allow_pipe=True only for a trusted spec")


def _local_path(url: str) -> str:
    return re.sub(r"^file:(//)?", "", url)


def expand_shards(spec: Union[PathLike, Iterable[PathLike]], *, allow_pipe: bool = False) -> list[str]:
    """Expand braces (`shard-{000..009}.tar`) and `::` lists into shard URLs, rejecting unsafe ones."""
    specs = [os.fspath(spec)] if isinstance(spec, (str, os.PathLike)) else [os.fspath(s) for s in spec]
    if not allow_pipe:
        for s in specs:
            _check_shard(s)  # before expansion too: the spec itself must never reach a shell
    urls = [u for s in specs for u in wds.shardlists.expand_urls(s)]
    if not allow_pipe:
        for u in urls:
            _check_shard(u)
        if not any(os.path.isfile(_local_path(u)) for u in urls):
            raise DataError(f"{specs[0] if specs else spec}: none of the {len(urls)} shard file(s) exists")
    return urls


def _safe_member(info: tarfile.TarInfo) -> bool:
    """Only regular files of sane size with names that stay inside a folder (nothing is extracted anyway)."""
    name = info.name
    return (info.isreg() and info.size <= MAX_MEMBER_BYTES and not name.startswith("/")
            and ".." not in PurePosixPath(name).parts)


class _StrictTarInfo(tarfile.TarInfo):
    """Records a truncated or garbled header, which tarfile silently takes for the end of the archive."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # the zero block that ends a complete archive
            raise
        except tarfile.HeaderError as e:
            tar.clipkit_bad_header = e  # type: ignore[attr-defined]
            raise


def _tar_files(stream: Any, url: str) -> Iterator[Sample]:
    """Members of one tar stream as webdataset file records; a truncated or corrupt archive raises ReadError."""
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            for info in tar:
                if _safe_member(info):
                    yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
                tar.members = []  # streaming: keep no headers
            bad = getattr(tar, "clipkit_bad_header", None)
        if bad is not None:
            raise tarfile.ReadError(f"truncated or corrupt tar header ({type(bad).__name__}: {bad})")
    except Exception:
        yield {}  # webdataset's end-of-shard marker: group_by_keys emits the sample read before the damage
        raise


def _keep_first_duplicate(exn: Exception) -> bool:
    """group_by_keys handler: a repeated file in one sample is ignored (the first wins); all else re-raises."""
    if isinstance(exn, ValueError) and "duplicate file name" in str(exn):
        return True
    raise exn


class TarShardDataset(IterableDataset):
    """Streams (image, caption) samples from webdataset tar shards (`key.jpg` + `key.txt`), never extracting.

    Shards are split by rank and DataLoader worker. A corrupt or truncated shard yields one
    `{"shard_error": (url, detail)}` record and the next shard is read; a bad image yields a skip record.
    Items carry `index=-1` and `key` ("url:key"). `pipe:`/remote specs are refused unless `allow_pipe=True`.
    """

    def __init__(self, urls_or_paths: Union[PathLike, Iterable[PathLike]], preprocess: Preprocess,
                 tokenizer: Tokenizer, *, allow_pipe: bool = False, shuffle_buffer: int = 0) -> None:
        self.urls = expand_shards(urls_or_paths, allow_pipe=allow_pipe)
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.allow_pipe = allow_pipe
        self.shuffle_buffer = shuffle_buffer

    def _open(self, url: str) -> Any:
        if self.allow_pipe and _SCHEME.match(url) and not url.startswith("file:"):
            return wds.gopen(url)  # trusted by the caller: may run a shell command or a download
        return open(_local_path(url), "rb")

    def _read_shards(self, shards: Iterator[dict[str, str]]) -> Iterator[Sample]:
        for shard in shards:
            url = shard["url"]
            try:
                with self._open(url) as stream:
                    yield from group_by_keys(_tar_files(stream, url), handler=_keep_first_duplicate)
            except Exception as e:  # noqa: BLE001 -- truncated/corrupt/unreadable: skip the rest of this shard
                detail = e.args[0] if e.args else ""
                yield {"shard_error": (url, f"{type(e).__name__}: {detail}")}

    def _decode(self, samples: Iterator[Sample]) -> Iterator[Sample]:
        for sample in samples:
            yield sample if "shard_error" in sample else self._decode_one(sample)

    def _decode_one(self, sample: Sample) -> Sample:
        name = f"{sample['__url__']}:{sample['__key__']}"
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        raw_caption = next((sample[e] for e in CAPTION_EXTS if e in sample), None)
        if image is None or raw_caption is None:
            return {"skip": (name, "no_image" if image is None else "no_caption"), "index": -1}
        caption = raw_caption.decode("utf-8", errors="replace").strip()
        if caption.lower() in NA_CAPTIONS:
            return {"skip": (name, "empty_caption"), "index": -1}
        out = load_sample(self.preprocess, self.tokenizer, image, caption, -1, name)
        return {**out, "key": name} if "pixels" in out else out

    def __iter__(self) -> Iterator[Sample]:
        stages: list[Any] = [wds.SimpleShardList(self.urls), wds.split_by_node, wds.split_by_worker,
                             self._read_shards]
        if self.shuffle_buffer:
            rng = random.Random(random.getrandbits(64))  # seeded per worker by seed_worker
            stages.append(wds.shuffle(self.shuffle_buffer, rng=rng))  # shuffles raw bytes, before decoding
        stages.append(self._decode)
        return iter(wds.DataPipeline(*stages))


def pair_dataset(spec: Union[PathLike, Sequence[PathLike]], preprocess: Preprocess, tokenizer: Tokenizer, *,
                 allow_pipe: bool = False, **table_kw: Any) -> Union[PairDataset, TarShardDataset]:
    """The dataset for a data spec: tar shards stream, tables and folders are read whole."""
    if _is_shard_spec(spec):
        return TarShardDataset(spec, preprocess, tokenizer, allow_pipe=allow_pipe)
    return PairDataset(read_pairs(spec, **table_kw), preprocess, tokenizer)
