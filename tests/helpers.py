"""Plain functions the tests share (test data builders); fixtures that use them live in conftest.py."""
from __future__ import annotations

import contextlib
import os
import shutil
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


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_repo(hf_home: Path, repo_id: str, files: dict, commit: str = HUB_COMMIT) -> Path:
    """Lay out `repo_id` in the Hugging Face cache under `hf_home` as huggingface_hub does
    (`hub/models--org--name/snapshots/<commit>/...` and `refs/main`); `files` maps names to `Path`s (copied) or
    bytes/str (written). Returns the snapshot folder."""
    root = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for name, content in files.items():
        dst = snapshot / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, dst)
        else:
            dst.write_bytes(content.encode() if isinstance(content, str) else content)
    return snapshot


def offline_hub(monkeypatch, hf_home: Path) -> None:
    """This process reads the Hugging Face cache under `hf_home` offline, as `HF_HOME=... HF_HUB_OFFLINE=1` would
    make it (huggingface_hub reads those at import, so its constants are set too); any network connection
    attempt fails the test."""
    import socket

    from huggingface_hub import constants

    hub_dir = str(Path(hf_home) / "hub")
    for key, value in (("HF_HOME", str(hf_home)), ("HF_HUB_CACHE", hub_dir), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", hub_dir)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError(f"a test opened a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)


def offline_env(hf_home: Path) -> dict:
    """The environment of a fresh process that reads the Hugging Face cache under `hf_home` offline; the hub
    endpoint is a closed local port, so a request that escaped offline mode fails instead of downloading."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
            "HF_ENDPOINT": "http://127.0.0.1:9"}


def run_script(code: str, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `code` (a plain program reading its inputs from sys.argv) in a fresh interpreter, text output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def make_emoji_packs(folder: Path, codes: list[str], names: list[str], version: str = "9.9.9") -> Path:
    """Small npm emoji packs as `npm pack` writes them (NAME-VERSION.tgz, files under package/): a Noto-style
    PNG pack named by code point and a Fluent-style SVG pack named by CLDR name, one coloured disc per emoji."""
    import io
    import json
    import re
    import tarfile

    from PIL import Image, ImageDraw

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(f"package/{name}")
        info.size, info.mtime = len(data), 0
        tar.addfile(info, io.BytesIO(data))

    folder.mkdir(parents=True, exist_ok=True)
    for package, kind in (("emoji-datasource-google", "png"), ("fluentui-emoji", "svg")):
        with tarfile.open(folder / f"{package}-{version}.tgz", "w:gz") as tar:
            add(tar, "package.json", json.dumps({"name": package, "version": version, "license": "MIT"}).encode())
            for i, (code, name) in enumerate(zip(codes, names)):
                hue = (37 * i) % 256
                if kind == "png":
                    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
                    ImageDraw.Draw(img).ellipse((8, 8, 56, 56), fill=(hue, 255 - hue, 90, 255))
                    buf = io.BytesIO()
                    img.save(buf, format="PNG")
                    add(tar, f"img/google/64/{code}.png", buf.getvalue())
                else:
                    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect x="4" y="6" '
                           f'width="24" height="20" rx="4" fill="rgb({hue},80,{255 - hue})"/></svg>')
                    add(tar, f"icons/modern/{re.sub('[^a-z0-9]+', '-', name.lower()).strip('-')}.svg", svg.encode())
    return folder


def make_keywords_pack(folder: Path, chars: dict[str, dict[str, list[str]]], version: str = "9.9.9") -> Path:
    """An `emojibase-data` npm pack: `package/{lang}/data.json` entries with `emoji` and `tags`, for
    `chars` = lang -> emoji -> tags."""
    import io
    import json
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / f"emojibase-data-{version}.tgz", "w:gz") as tar:
        files = {"package.json": {"name": "emojibase-data", "version": version, "license": "MIT"}}
        for lang, tags in chars.items():
            files[f"{lang}/data.json"] = [{"emoji": c, "label": c, "tags": t} for c, t in tags.items()]
        for name, obj in files.items():
            data = json.dumps(obj, ensure_ascii=False).encode()
            info = tarfile.TarInfo(f"package/{name}")
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return folder


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    """Mount a tmpfs of `size` (e.g. "1M") at `path` for a full-disk test; skips where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                             text=True) if os.geteuid() == 0 else None
    if mounted is None or mounted.returncode != 0:
        import pytest

        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() if mounted else 'not root'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def make_multilingual_tower(texts: list[str], folder: Path) -> Path:
    """A random 2-layer BERT with a WordPiece trained on `texts`, saved in `folder`: a stand-in for a multilingual
    sentence model (paraphrase-multilingual-MiniLM) that reads Hangul with its own vocabulary."""
    from tokenizers import Tokenizer as RawTokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    raw = RawTokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    raw.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=3000, special_tokens=special))
    raw.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", raw.token_to_id("[CLS]")), ("[SEP]", raw.token_to_id("[SEP]"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=raw.get_vocab_size(), hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=96, max_position_embeddings=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)
