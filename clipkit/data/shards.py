"""WebDataset-style tar shards (`key.jpg` + `key.txt`) streamed without extracting, and `pair_dataset`.

`pipe:` and remote specs are refused unless allowed explicitly: webdataset would hand them to a shell.
"""
from __future__ import annotations

import os
import random
import re
import tarfile
from pathlib import PurePosixPath
from typing import Any, Iterable, Iterator, Sequence, Union

import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.tariterators import group_by_keys

from ..errors import DataError
from ..model.tokenizer import Tokenizer
from ..model.transforms import Preprocess
from .samples import PairDataset, Sample, load_sample
from .tables import IMAGE_EXTS, NA_CAPTIONS, SCHEME, PathLike, is_shard_spec, read_pairs

CAPTION_EXTS = ("txt", "caption", "text")
MAX_MEMBER_BYTES = 256 << 20  # a tar member is read into memory whole
_SHELL_META = re.compile(r"[;&|$`<>()'\"\\\n\r\x00]")

def _check_shard(url: str) -> None:
    """Refuse what webdataset would hand to a shell (`pipe:`, http(s)/gs/s3 URLs) or shell metacharacters."""
    if (SCHEME.match(url) and not url.startswith("file:")) or _SHELL_META.search(url):
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
        if self.allow_pipe and SCHEME.match(url) and not url.startswith("file:"):
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
    if is_shard_spec(spec):
        return TarShardDataset(spec, preprocess, tokenizer, allow_pipe=allow_pipe)
    return PairDataset(read_pairs(spec, **table_kw), preprocess, tokenizer)
