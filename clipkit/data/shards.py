"""WebDataset-style tar shards (`key.jpg` + `key.txt`) streamed without extracting, and `pair_dataset`.

A shard spec is a brace pattern (`shards/{00000..00099}.tar`), a `::` list, or a folder of `*.tar` files; the
per-shard sample counts live in `sizes.json` beside the shards (open_clip's convention). `pipe:` and remote specs
are refused unless allowed explicitly: webdataset would hand them to a shell.
"""
from __future__ import annotations

import json
import os
import random
import re
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.tariterators import base_plus_ext, group_by_keys

from ..errors import DataError
from ..model.tokenizer import Tokenizer
from ..model.transforms import Preprocess
from .samples import PairDataset, Sample, load_sample
from .tables import IMAGE_EXTS, NA_CAPTIONS, SCHEME, PathLike, is_shard_spec, read_pairs

CAPTION_EXTS = ("txt", "caption", "text")
META_EXTS = ("json", "cls")  # sidecars a sample may carry besides its image and caption
MAX_MEMBER_BYTES = 256 << 20  # a tar member is read into memory whole
SIZES_FILE = "sizes.json"  # {shard file name: samples}, beside the shards
OVERSIZE = "__oversize__"  # the marker member standing for a member over MAX_MEMBER_BYTES (never read)
_SHELL_META = re.compile(r"[;&|$`<>()'\"\\\n\r\x00]")

def _check_shard(url: str) -> None:
    """Refuse what webdataset would hand to a shell (`pipe:`, http(s)/gs/s3 URLs) or shell metacharacters."""
    if (SCHEME.match(url) and not url.startswith("file:")) or _SHELL_META.search(url):
        raise DataError(f"refused shard spec {url!r}: 'pipe:' and remote URLs run shell commands and shell "
                        "metacharacters are not allowed; pass allow_pipe=True (clipkit train --allow-pipe) only "
                        "for a trusted spec")


def _local_path(url: str) -> str:
    return re.sub(r"^file:(//)?", "", url)


def shard_folder_files(spec: Any) -> Optional[list[str]]:
    """The `*.tar` files of a folder of shards (sorted), or None when `spec` is no such folder. A folder holding
    images next to its tars is ambiguous and refused."""
    if not isinstance(spec, (str, os.PathLike)) or not os.path.isdir(spec):
        return None
    files = sorted(p for p in Path(spec).iterdir() if p.is_file())
    tars = [str(p.absolute()) for p in files if p.suffix == ".tar"]
    if tars and any(p.suffix.lower().lstrip(".") in IMAGE_EXTS for p in files):
        raise DataError(f"{spec}: holds both tar shards and images; keep shards in a folder of their own")
    return tars or None


def is_streamed(spec: Any) -> bool:
    """True for tar shard specs (patterns, lists, URLs, folders of `*.tar`): data that is streamed, not read whole."""
    return is_shard_spec(spec) or shard_folder_files(spec) is not None


def expand_shards(spec: Union[PathLike, Iterable[PathLike]], *, allow_pipe: bool = False) -> list[str]:
    """Expand braces (`shard-{000..009}.tar`), `::` lists and shard folders into shard URLs, rejecting unsafe ones."""
    folder = shard_folder_files(spec)
    if folder is not None:
        return folder
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


def shard_sizes(urls: Sequence[str]) -> Optional[int]:
    """The total sample count of local shards from the `sizes.json` beside them; None when any is not listed."""
    total, tables = 0, {}
    for url in urls:
        path = Path(_local_path(url))
        if SCHEME.match(url) and not url.startswith("file:"):
            return None
        if path.parent not in tables:
            try:
                tables[path.parent] = json.loads((path.parent / SIZES_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
        count = tables[path.parent].get(path.name)
        if not isinstance(count, int) or count < 0:
            return None
        total += count
    return total


def _safe_name(name: str) -> bool:
    return not name.startswith("/") and ".." not in PurePosixPath(name).parts


def _safe_member(info: tarfile.TarInfo) -> bool:
    """Only regular files of sane size with names that stay inside a folder (nothing is extracted anyway)."""
    return info.isreg() and info.size <= MAX_MEMBER_BYTES and _safe_name(info.name)


def _oversize_marker(info: tarfile.TarInfo, url: str) -> Optional[Sample]:
    """A file record that marks a too-large member's sample (counted as `oversize`), its data never read."""
    prefix, _ = base_plus_ext(info.name)
    if not info.isreg() or info.size <= MAX_MEMBER_BYTES or prefix is None or not _safe_name(info.name):
        return None
    return {"fname": f"{prefix}.{OVERSIZE}", "data": b"", "__url__": url}


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
                elif (marker := _oversize_marker(info, url)) is not None:
                    yield marker
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


def _open_shard(url: str, allow_pipe: bool) -> Any:
    if allow_pipe and SCHEME.match(url) and not url.startswith("file:"):
        return wds.gopen(url)  # trusted by the caller: may run a shell command or a download
    return open(_local_path(url), "rb")


def read_raw_shards(urls: Iterable[str], *, allow_pipe: bool = False) -> Iterator[Sample]:
    """Raw samples (`__key__`, `__url__` and undecoded bytes by extension) of the shards at `urls`, in order.

    A corrupt, truncated or unreadable shard yields the samples read before the damage, then one
    `{"shard_error": (url, detail)}` record, and the next shard is read. Expand and check `urls` first
    (`expand_shards`): remote and `pipe:` URLs are opened only with `allow_pipe`.
    """
    for url in urls:
        try:
            with _open_shard(url, allow_pipe) as stream:
                yield from group_by_keys(_tar_files(stream, url), handler=_keep_first_duplicate)
        except Exception as e:  # noqa: BLE001 -- truncated/corrupt/unreadable: skip the rest of this shard
            detail = e.args[0] if e.args else ""
            yield {"shard_error": (url, f"{type(e).__name__}: {detail}")}


class TarShardDataset(IterableDataset):
    """Streams (image, caption) samples from webdataset tar shards (`key.jpg` + `key.txt`), never extracting.

    Shards are split by rank and DataLoader worker. A corrupt or truncated shard yields one
    `{"shard_error": (url, detail)}` record and the next shard is read; a bad sample yields a skip record
    (reasons: the image's, `no_image`, `unsupported_extension`, `no_caption`, `empty_caption`, `oversize`).
    Items carry `index=-1` and `key` ("url:key"). `pipe:`/remote specs are refused unless `allow_pipe=True`.
    Training streams through `data.stream.ShardStream`, which adds exact positions and equal batches across ranks.
    """

    def __init__(self, urls_or_paths: Union[PathLike, Iterable[PathLike]], preprocess: Preprocess,
                 tokenizer: Tokenizer, *, allow_pipe: bool = False, shuffle_buffer: int = 0) -> None:
        self.urls = expand_shards(urls_or_paths, allow_pipe=allow_pipe)
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.allow_pipe = allow_pipe
        self.shuffle_buffer = shuffle_buffer

    def read_shards(self, shards: Iterable[dict[str, str]]) -> Iterator[Sample]:
        """Raw samples of `{"url": ...}` records: `read_raw_shards` with this dataset's `allow_pipe`."""
        return read_raw_shards((shard["url"] for shard in shards), allow_pipe=self.allow_pipe)

    def _decode(self, samples: Iterator[Sample]) -> Iterator[Sample]:
        for sample in samples:
            yield sample if "shard_error" in sample else self.decode(sample)

    def decode(self, sample: Sample) -> Sample:
        """One raw sample -> a dataset item (pixels, token ids, key) or a skip record."""
        name = f"{sample['__url__']}:{sample['__key__']}"
        if OVERSIZE in sample:
            return {"skip": (name, "oversize"), "index": -1}
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        raw_caption = next((sample[e] for e in CAPTION_EXTS if e in sample), None)
        if image is None:
            other = [k for k in sample if not k.startswith("__") and k not in CAPTION_EXTS + META_EXTS]
            return {"skip": (name, "unsupported_extension" if other else "no_image"), "index": -1}
        if raw_caption is None:
            return {"skip": (name, "no_caption"), "index": -1}
        caption = raw_caption.decode("utf-8", errors="replace").strip()
        if caption.lower() in NA_CAPTIONS:
            return {"skip": (name, "empty_caption"), "index": -1}
        out = load_sample(self.preprocess, self.tokenizer, image, caption, -1, name)
        return {**out, "key": name} if "pixels" in out else out

    def __iter__(self) -> Iterator[Sample]:
        stages: list[Any] = [wds.SimpleShardList(self.urls), wds.split_by_node, wds.split_by_worker,
                             self.read_shards]
        if self.shuffle_buffer:
            rng = random.Random(random.getrandbits(64))  # seeded per worker by seed_worker
            stages.append(wds.shuffle(self.shuffle_buffer, rng=rng))  # shuffles raw bytes, before decoding
        stages.append(self._decode)
        return iter(wds.DataPipeline(*stages))


def pair_dataset(spec: Union[PathLike, Sequence[PathLike]], preprocess: Preprocess, tokenizer: Tokenizer, *,
                 allow_pipe: bool = False, **table_kw: Any) -> Union[PairDataset, TarShardDataset]:
    """The dataset for a data spec: tar shards (and folders of them) stream, tables and image folders are read whole."""
    if is_streamed(spec):
        return TarShardDataset(spec, preprocess, tokenizer, allow_pipe=allow_pipe)
    return PairDataset(read_pairs(spec, **table_kw), preprocess, tokenizer)
