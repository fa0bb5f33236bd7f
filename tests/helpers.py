"""Plain functions the tests share (test data builders); fixtures that use them live in conftest.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
HF_VOCAB = 300  # model vocab; the tokenizer below uses ids 0..257 (256 bytes, then SOT, EOT)
HF_CONTEXT = 16


def small_clip_tokenizer():
    """A byte-level tokenizer laid out like OpenAI CLIP's: start and end tokens are the two largest ids.

    End-of-text is the largest id (257), so HF's legacy argmax pooling (eos_token_id == 2) and pooling at
    the real end token agree, as they do for OpenAI's 49408-token BPE. Padding uses end-of-text, as HF's
    CLIPTokenizer does.
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(alphabet + [SOT, EOT])}
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, vocab[SOT]), (EOT, vocab[EOT])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=SOT, eos_token=EOT, pad_token=EOT)


def make_hf_clip(eos_token_id: int, seed: int = 0, hidden_act: str = "quick_gelu"):
    """A small random `transformers.CLIPModel` (2 layers per tower, 32 px images, patch 8)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=HF_CONTEXT, hidden_act=hidden_act,
                bos_token_id=256, eos_token_id=eos_token_id, pad_token_id=257)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8, hidden_act=hidden_act)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=48))
    with torch.no_grad():  # random non-trivial norms/biases, so a swapped or dropped tensor shows up
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()



def random_image(seed: int, size: tuple[int, int] = (48, 40)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def run_script(code: str, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `code` (a plain program reading its inputs from sys.argv) in a fresh interpreter, text output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)
