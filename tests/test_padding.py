"""No compute on padding: every text batch is cut at its longest sequence, and embeddings (and training gradients)
equal the padded full-context path, for the CLIP text tower, MiniLM and an imported Hugging Face CLIP."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import clipkit
from clipkit.model.clip import _project
from clipkit.model.towers import pool_text

TEXTS = ["a cat", "two dogs running in the snow at night", "🐱", "a photo of a red apple on a wooden table"]


def _padded_reference(model, ids: torch.Tensor, mask) -> torch.Tensor:
    """The text embedding computed over the whole padded context, as before the cut."""
    hidden = model.text(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L_full, W]
    cfg = model.config.text
    return F.normalize(_project(model.text_proj, pool_text(hidden, ids, mask, cfg.pooling, cfg.eot_token_id)), dim=-1)


def _seen_lengths(model) -> tuple[list[int], object]:
    seen: list[int] = []
    handle = model.text.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]),
                                                  with_kwargs=True)
    return seen, handle


def _check_cut(model, tok) -> None:
    tokens = tok(TEXTS)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert ids.shape[1] == tok.context_length  # the tokenizer pads to the full context
    seen, handle = _seen_lengths(model)
    with torch.no_grad():
        got = model.encode_text(tokens)
        handle.remove()
        want = _padded_reference(model, ids, mask)
    longest = int(mask.sum(1).max())
    assert seen == [longest] and longest < tok.context_length  # the tower ran on the longest sequence only
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():  # a single short text runs on its own length
        one = model.encode_text(tok(["a cat"]))
    torch.testing.assert_close(one[0], got[0], atol=1e-5, rtol=0)


def test_clip_text_tower_cut_at_longest_matches_padded_to_77() -> None:
    torch.manual_seed(0)
    model, tok = clipkit.create_model_and_tokenizer("tiny", context_length=77)
    _check_cut(model.eval(), tok)


def test_clip_text_tower_raw_ids_without_mask_cut_at_end_token() -> None:
    """Raw ids (no mask, open_clip style): the causal tower is cut after the last end-of-text token."""
    torch.manual_seed(0)
    model, tok = clipkit.create_model_and_tokenizer("tiny", context_length=77)
    model.eval()
    ids = tok(TEXTS)["input_ids"].clone()
    seen, handle = _seen_lengths(model)
    with torch.no_grad():
        got = model.encode_text(ids)
        handle.remove()
        want = _padded_reference(model, ids, None)
    last_eot = int((ids == tok.eot_token_id).int().argmax(1).max())
    assert seen == [last_eot + 1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_minilm_cut_at_longest_matches_padded_to_77() -> None:
    torch.manual_seed(0)
    model, tok = clipkit.create_model_and_tokenizer("tiny-minilm", context_length=77)
    assert model.config.text.pooling == "mean"
    _check_cut(model.eval(), tok)


def test_imported_hf_clip_cut_matches_transformers_padded(hf_clip_dir) -> None:
    """An imported random HF CLIP: clipkit's cut batch equals transformers' own text features at full padding."""
    from transformers import CLIPModel as HFCLIPModel

    d = hf_clip_dir(257)
    model, _, tok = clipkit.load(d)
    model.eval()
    hf = HFCLIPModel.from_pretrained(str(d)).eval()
    tokens = tok(["a cat", "a red square", "x"])
    seen, handle = _seen_lengths(model)
    with torch.no_grad():
        got = model.encode_text(tokens)
        handle.remove()
        want = hf.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        want = getattr(want, "pooler_output", want)
    assert seen == [int(tokens["attention_mask"].sum(1).max())] and seen[0] < tokens["input_ids"].shape[1]
    torch.testing.assert_close(got, F.normalize(want, dim=-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["tiny", "tiny-minilm"])
def test_training_gradients_equal_the_padded_path(preset: str) -> None:
    """Training goes through the same cut: the text tower's gradients equal those of the padded computation."""
    torch.manual_seed(0)
    model, tok = clipkit.create_model_and_tokenizer(preset, context_length=77)
    model.train()
    for m in model.modules():  # dropout off, so both passes compute the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    tokens = tok(TEXTS)
    target = torch.randn(len(TEXTS), model.embed_dim)

    def grads(fn) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        (fn() * target).sum().backward()
        return {n: p.grad.clone() for n, p in model.text.named_parameters() if p.grad is not None}

    cut = grads(lambda: model.encode_text(tokens))
    full = grads(lambda: _padded_reference(model, tokens["input_ids"], tokens["attention_mask"]))
    assert cut.keys() == full.keys() and cut
    for name in cut:
        torch.testing.assert_close(cut[name], full[name], atol=1e-5, rtol=1e-4, msg=name)
