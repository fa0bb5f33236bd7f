"""Tokenizers: load from a model directory, byte-level default, BPE trained on captions.

Every tokenizer here is a transformers fast tokenizer whose post-processor adds the start and
end tokens *after* truncation, so an over-long caption keeps its end-of-text token (CLIP pools
the text embedding at that token; dropping it silently changes the embedding).
"""
from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, SOT, EOT = "<pad>", "<|startoftext|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, SOT, EOT]  # ids 0, 1, 2 in every tokenizer clipkit trains


class TokenIds(torch.Tensor):
    """`[B, L]` token ids, as open_clip's tokenizers return them, that also carry their attention mask and read
    as clipkit's dict form: `t["input_ids"]`, `t["attention_mask"]`, `dict(t)`. Operations on it (`.to`,
    slicing, arithmetic) give plain tensors; `CLIPModel.encode_text` reads the mask when it is there."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    attention_mask: torch.Tensor
    KEYS = ("input_ids", "attention_mask")

    @staticmethod
    def of(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> "TokenIds":
        out = input_ids.as_subclass(TokenIds)
        out.attention_mask = attention_mask
        return out

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            if key == "input_ids":
                return self.as_subclass(torch.Tensor)
            if key == "attention_mask":
                return self.attention_mask
            raise KeyError(key)
        return super().__getitem__(key)

    def keys(self) -> tuple[str, ...]:
        return self.KEYS

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return [(k, self[k]) for k in self.KEYS]

    def get(self, key: str, default=None):
        return self[key] if key in self.KEYS else default


class Tokenizer:
    """Turns strings into fixed-length token ids `[B, L]` with their attention mask (`TokenIds`)."""

    def __init__(self, hf: PreTrainedTokenizerBase, context_length: int) -> None:
        self.hf = hf
        self.context_length = context_length

    def __call__(self, texts: Union[str, Sequence[str]]) -> TokenIds:
        """Ids like open_clip's tokenizer (`model.encode_text(tokenizer(texts))`); `["input_ids"]` and
        `["attention_mask"]` give clipkit's dict form."""
        if isinstance(texts, str):
            texts = [texts]
        enc = self.hf(
            list(texts), padding="max_length", truncation=True,
            max_length=self.context_length, return_tensors="pt",
            split_special_tokens=True,  # a caption saying "<|endoftext|>" is text, not an end marker
        )
        return TokenIds.of(enc["input_ids"], enc["attention_mask"])

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eot_token_id(self) -> Optional[int]:
        """The id that closes a sequence: CLIP's end-of-text, or BERT's [SEP]."""
        hf = self.hf
        return hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id

    @property
    def pad_token_id(self) -> Optional[int]:
        return self.hf.pad_token_id

    def save(self, directory: Union[str, os.PathLike]) -> None:
        self.hf.save_pretrained(str(directory))

    def __repr__(self) -> str:
        return f"Tokenizer({type(self.hf).__name__}, vocab={self.vocab_size}, context={self.context_length})"


def load_tokenizer(directory: Union[str, os.PathLike], context_length: int) -> Tokenizer:
    """Load the tokenizer files of a local model directory (tokenizer.json, vocab/merges, vocab.txt)."""
    hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    if hf.pad_token is None:  # GPT-2 style tokenizers ship without one
        hf.pad_token = hf.eos_token
    return Tokenizer(hf, context_length)


def _wrap(raw: RawTokenizer) -> PreTrainedTokenizerFast:
    sot, eot = raw.token_to_id(SOT), raw.token_to_id(EOT)
    raw.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, sot), (EOT, eot)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=SOT, eos_token=EOT, pad_token=PAD)


def _byte_level_skeleton(model: models.Model) -> RawTokenizer:
    raw = RawTokenizer(model)
    raw.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase(), normalizers.Strip()])
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    raw.decoder = decoders.ByteLevel()
    return raw


def byte_level_tokenizer(context_length: int) -> Tokenizer:
    """A BPE with no merges: one token per UTF-8 byte. Needs no training and never emits unknowns."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + alphabet)}
    raw = _byte_level_skeleton(models.BPE(vocab=vocab, merges=[]))
    return Tokenizer(_wrap(raw), context_length)


def train_bpe(texts: Iterable[str], vocab_size: int, context_length: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on captions; any script (Korean included) tokenizes without unknowns."""
    raw = _byte_level_skeleton(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    raw.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(_wrap(raw), context_length)


@lru_cache(maxsize=1)
def _openai_bpe() -> Optional[tuple[dict[str, int], list[tuple[str, str]]]]:
    """Vocab and merges of OpenAI CLIP's BPE, read from the copy open_clip ships (if installed)."""
    try:
        import open_clip.tokenizer as oct
    except ImportError:
        return None
    gz = Path(oct.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not gz.exists():
        return None
    lines = gzip.open(gz).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in lines]
    byte_chars = list(oct.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT, EOT]
    return {t: i for i, t in enumerate(vocab)}, merges


def openai_clip_tokenizer(context_length: int = 77) -> Optional[Tokenizer]:
    """OpenAI CLIP's 49408-token BPE as a transformers CLIPTokenizer, or None if unavailable offline."""
    bpe = _openai_bpe()
    if bpe is None:
        return None
    from transformers import CLIPTokenizer

    vocab, merges = bpe
    return Tokenizer(CLIPTokenizer(vocab=dict(vocab), merges=list(merges)), context_length)
