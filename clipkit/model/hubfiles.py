"""Files of Hugging Face hub repositories, through `huggingface_hub`, so its cache and settings apply.

`HF_HOME`/`HF_HUB_CACHE`, `HF_HUB_OFFLINE=1`, `HF_TOKEN` (or `hf auth login`) and `HF_ENDPOINT` mirrors behave as
they do for transformers, timm and open_clip, which share the same cache. Every failure is one line that says
what to do: a missing repository, a file the repository lacks, or a file that is not cached while offline.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from ..errors import CheckpointError

HUB_PREFIX = "hf-hub:"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # safetensors first; a .bin only when the repo has no other
INDEX_SUFFIX = ".index.json"  # a sharded checkpoint: "model.safetensors.index.json" names its shard files


def split_repo(spec: str) -> tuple[str, Optional[str]]:
    """`hf-hub:org/name[@revision]` (or without the prefix) -> (repo id, revision or None)."""
    repo = spec[len(HUB_PREFIX):] if spec.startswith(HUB_PREFIX) else spec
    repo, _, revision = repo.strip("/").partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{spec!r}: expected a hub repository as hf-hub:org/name")
    return repo, revision or None


def cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hub_error(repo: str, filename: str, e: Exception) -> CheckpointError:
    """A one-line CheckpointError for a huggingface_hub failure to get `filename` of `repo`."""
    from huggingface_hub import errors, is_offline_mode

    where = f"hf-hub:{repo}"
    if isinstance(e, errors.GatedRepoError):
        return CheckpointError(f"{where}: the repository is gated; accept its terms on the hub, then log in "
                               "(`hf auth login`) or set HF_TOKEN")
    if isinstance(e, errors.RepositoryNotFoundError):
        return CheckpointError(f"{where}: no such repository on the Hugging Face hub (check the name; a private "
                               "one needs `hf auth login` or HF_TOKEN)")
    if isinstance(e, errors.RevisionNotFoundError):
        return CheckpointError(f"{where}: no such revision (branch, tag or commit) in the repository")
    if isinstance(e, errors.LocalEntryNotFoundError):
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if is_offline_mode() else "the hub could not be reached"
        return CheckpointError(f"{where}: {filename} is not in the Hugging Face cache ({cache_dir()}) and {why}; "
                               f"download it once with network access: hf download {repo} {filename}")
    if isinstance(e, errors.EntryNotFoundError):
        return CheckpointError(f"{where}: the repository has no file {filename}")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CheckpointError(f"{where}: cannot get {filename} ({first})")


def hub_file(repo: str, filename: str, revision: Optional[str] = None, optional: bool = False) -> Optional[Path]:
    """The local path of one file of `repo`, downloaded into the cache if needed. With `optional`, None when the
    repository does not have it (or, offline, when the cache does not hold it)."""
    from huggingface_hub import errors, hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except errors.EntryNotFoundError as e:  # LocalEntryNotFoundError (not cached, offline) is one of these
        if optional:
            return None
        raise hub_error(repo, filename, e) from None
    except (errors.HfHubHTTPError, errors.RepositoryNotFoundError, errors.RevisionNotFoundError, OSError) as e:
        raise hub_error(repo, filename, e) from None


def hub_first(repo: str, filenames: Sequence[str], revision: Optional[str] = None, shards: bool = False) -> Path:
    """The first of `filenames` that the repository (or, offline, the cache) has: safetensors before .bin. With
    `shards`, a name's sharded form counts too (`NAME.index.json` and every shard it lists, which are fetched); the
    index's path is returned then."""
    for name in filenames:
        path = hub_file(repo, name, revision, optional=True)
        if path is not None:
            return path
        index = hub_file(repo, name + INDEX_SUFFIX, revision, optional=True) if shards else None
        if index is not None:
            for shard in shard_files(index):
                hub_file(repo, shard, revision)
            return index
    from huggingface_hub import is_offline_mode

    wanted = ", ".join(f"{n} (or {n}{INDEX_SUFFIX} and its shards)" if shards else n for n in filenames)
    if is_offline_mode():
        raise CheckpointError(f"hf-hub:{repo}: none of {wanted} is in the Hugging Face cache "
                              f"({cache_dir()}) and offline mode is on (HF_HUB_OFFLINE=1); download one once with "
                              f"network access: hf download {repo} {filenames[0]}")
    raise CheckpointError(f"hf-hub:{repo}: the repository has none of {wanted}")


def shard_files(index: Path) -> list[str]:
    """The shard file names a sharded checkpoint's index (`weight_map`: tensor name -> file) lists, in order."""
    import json

    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a sharded-checkpoint index ({e})") from None
    if not files or any(Path(f).name != f for f in files):  # names only: an index never points outside its folder
        raise CheckpointError(f"{index}: its weight_map must name shard files in the same folder")
    return files


def hub_model_dir(spec: str, check_config: Optional[Callable[[Path], None]], weights: Sequence[str] = WEIGHTS,
                  extra: Sequence[str] = TOKENIZER_FILES) -> Path:
    """A local directory of a transformers-style repository: config.json (passed to `check_config` before any
    weights are fetched), the first of `weights` it has, and whichever of `extra` it has."""
    repo, revision = split_repo(spec)
    config = hub_file(repo, "config.json", revision)
    if check_config is not None:
        check_config(config)
    if weights:
        hub_first(repo, weights, revision, shards=True)
    for name in extra:
        hub_file(repo, name, revision, optional=True)
    return config.parent  # every file of one revision lands in the same snapshot folder
