"""Multilingual text towers by distillation (as Multilingual-CLIP does): a student text tower learns to put a
sentence in language X where the frozen teacher (the model's own text tower) puts its English translation.

Three students (`DistillConfig.student`). "extend" (the default, and what won the measurement in
benchmarks/RESULTS.md): a copy of the teacher whose tokenizer gains one token per character it could not represent
as a single token (Hangul syllables, CJK ideographs, ...), so English keeps its meaning; each word of a single-word
pair ("고양이" / "cat") also becomes one token that starts at its English word's embedding. By default only those
added tokens' embeddings train (`tune="tokens"`): the tower stays the teacher's, so English embeds exactly as before.
"bpe": a fresh CLIP text transformer (a preset's shape) with a byte-level BPE trained on both columns of the parallel
table, trained whole with English kept where the teacher puts it. "pretrained": a transformers text model that
already reads the language (`student_tower`, e.g. `hf-hub:sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2`,
as Multilingual-CLIP starts from XLM-R), with its own tokenizer and a new projection, trained whole the same way. The
image tower is untouched in every case: every existing index and embedding stays valid. The result is a normal
clipkit model directory.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import DataError
from ..fileio import write_json_atomic
from ..formats.auto import load
from ..formats.native import save
from ..model.clip import CLIPModel
from ..model.config import ModelConfig
from ..model.factory import bind_tokenizer, resolve_config
from ..model.precision import training_autocast, training_precision
from ..model.tokenizer import Tokenizer, load_tokenizer
from ..model.towers import resolve_pretrained
from . import runstate
from .setup import caption_tokenizer
from .trainer import cosine_with_warmup, param_groups

log = logging.getLogger("clipkit.train")
STUDENTS = ("extend", "bpe", "pretrained")
TUNES = ("tokens", "tower")


@dataclass
class DistillConfig:
    """A distillation run: teacher model, parallel table (columns en, text[, lang]), output folder, schedule."""

    model: str
    parallel: str
    output: str
    steps: int = 600
    batch_size: int = 64
    lr: Optional[float] = None  # None: 1e-3 when only the added tokens train, 1e-4 for a whole tower
    weight_decay: float = 0.01
    warmup_steps: int = 50
    english_fraction: float = 0.25  # tune "tower": share of each batch that is English -> English (keeps English in
    # place; 0.10 gave Korean +2 points but cost the demo's English R@10 2 points: benchmarks/RESULTS.md)
    held_out: float = 0.05  # share of the pairs kept out of training to measure the distance on
    seed: int = 0
    precision: str = "auto"  # the training step (on CPU): bf16 autocast where the CPU multiplies bf16 natively
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 20
    resume: bool = False
    progress: bool = True
    student: str = "extend"  # extend: the teacher's tower, tokenizer extended; bpe: fresh tower + byte-level BPE;
    # pretrained: the transformers text model `student_tower`, with its tokenizer and a new projection
    student_preset: str = "tiny"  # bpe: the preset whose CLIP text transformer (shape, BPE vocabulary) it takes
    student_tower: Optional[str] = None  # pretrained: a local transformers model directory, hf:/dir or hf-hub:org/name
    word_tokens: bool = True  # extend: each single-word pair's word becomes one token, started at its English word
    tune: Optional[str] = None  # tokens: only the added tokens' input embeddings train, so every English text embeds
    # exactly as the teacher's (the default for extend); tower: the whole text tower and projection (bpe: always)

    def __post_init__(self) -> None:
        if self.student not in STUDENTS:
            raise DataError(f"student must be one of {STUDENTS}, got {self.student!r}")
        if (self.student == "pretrained") != bool(self.student_tower):
            raise DataError("student 'pretrained' needs `student_tower` (a transformers text model: a directory, "
                            "hf:/dir or hf-hub:org/name), and `student_tower` needs student 'pretrained'")
        self.tune = self.tune or ("tokens" if self.student == "extend" else "tower")
        if self.tune not in TUNES or (self.student != "extend" and self.tune == "tokens"):
            raise DataError(f"tune must be one of {TUNES} ('tower' for the {self.student} student, whose tower or "
                            f"projection is new), got {self.tune!r}")
        if self.lr is None:
            self.lr = 1e-3 if self.tune == "tokens" else 1e-4


def read_parallel(path: str | Path) -> pd.DataFrame:
    """A parallel table (TSV/CSV by suffix) with text columns `en` and `text`; empty rows are dropped."""
    path = Path(path)
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable parallel table ({e})") from None
    missing = [c for c in ("en", "text") if c not in table.columns]
    if missing:
        raise DataError(f"{path}: no column(s) {missing}; a parallel table needs `en` and `text` "
                        f"(columns: {', '.join(table.columns)})")
    table = table[(table["en"].str.strip() != "") & (table["text"].str.strip() != "")].reset_index(drop=True)
    if table.empty:
        raise DataError(f"{path}: no non-empty (en, text) pairs")
    return table


def extend_tokenizer(tokenizer: Tokenizer, texts: Iterable[str], words: Iterable[str] = ()) -> tuple[Tokenizer, list[str]]:
    """A copy of `tokenizer` with one added token per character of `texts` it cannot encode as a single token,
    and one per word of `words` it cannot.

    Added tokens match the raw text (before the tokenizer's normaliser, which would e.g. split Hangul syllables
    into jamo), so a Korean word becomes its syllables, or itself when it is one of `words` (longest match wins).
    """
    from tokenizers import AddedToken

    hf = copy.deepcopy(tokenizer.hf)
    chars = sorted({c for t in texts for c in t if not c.isspace() and not c.isascii()})
    new = [c for c in chars + sorted(set(words) - set(chars))
           if len(hf.tokenize(c)) != 1 or hf.unk_token in hf.tokenize(c)]
    hf.add_tokens([AddedToken(c, normalized=False, single_word=False) for c in new])
    return Tokenizer(hf, tokenizer.context_length), new


def word_lexicon(pairs: pd.DataFrame) -> dict[str, str]:
    """Single-word pairs (no space in `text` nor in `en`) as {word: English word}; a word given several English
    words keeps the one it is paired with most often (the first of those)."""
    single = pairs[~pairs["text"].str.contains(r"\s") & ~pairs["en"].str.contains(r"\s")]
    counts = single.groupby(["text", "en"], sort=False).size().reset_index(name="n")
    best = counts.sort_values("n", ascending=False, kind="stable").drop_duplicates("text")
    return dict(zip(best["text"], best["en"]))


def build_student(teacher: CLIPModel, tokenizer: Tokenizer, texts: Iterable[str],
                  lexicon: dict[str, str] | None = None) -> tuple[CLIPModel, Tokenizer, int]:
    """A copy of `teacher` whose text tower's vocabulary is extended for `texts`; returns (student, tokenizer, added).

    Each word of `lexicon` ({word: English word}) becomes one token whose input embedding starts at the mean of
    its English word's (so "사과" starts as "apple" does: a bilingual lexicon's vocabulary transfer); the other new
    tokens start at the mean of the teacher's rows (transformers' `mean_resizing`, whose notice is kept quiet)."""
    from transformers.utils import logging as hf_logging

    lexicon = lexicon or {}
    tok, added = extend_tokenizer(tokenizer, texts, lexicon)
    student = copy.deepcopy(teacher)
    if added:
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            student.text.resize_token_embeddings(len(tok.hf), mean_resizing=True)
        finally:
            hf_logging.set_verbosity(level)
        student.config.text.hf_config["vocab_size"] = len(tok.hf)
        table = student.text.get_input_embeddings().weight
        with torch.no_grad():
            for word in set(added) & set(lexicon):
                english = tokenizer.hf(lexicon[word], add_special_tokens=False)["input_ids"]
                table[tok.hf.convert_tokens_to_ids(word)] = table[english].mean(0)
    return _train_text_only(student, teacher), tok, len(added)


def build_bpe_student(teacher: CLIPModel, texts: Iterable[str], preset: str, saved: Path) -> tuple[CLIPModel, Tokenizer]:
    """The teacher's image tower beside a fresh CLIP text transformer of `preset`'s shape (at the teacher's context
    length) and a byte-level BPE trained on `texts` up to the preset's vocabulary (saved in `saved` for a resume)."""
    text = resolve_config(preset, context_length=teacher.config.text.context_length).text
    if text.hf_config.get("model_type") != "clip_text_model":
        raise DataError(f"student preset {preset!r} has no fresh CLIP text transformer (its text tower is "
                        f"{text.pretrained or text.hf_config.get('model_type')})")
    tok = caption_tokenizer(list(texts), text.hf_config["vocab_size"], text.context_length, saved, rank=0)
    cfg = copy.deepcopy(teacher.config)
    cfg.text = text
    return _new_text_tower(teacher, cfg, tok), tok


def build_pretrained_student(teacher: CLIPModel, tower: str) -> tuple[CLIPModel, Tokenizer]:
    """The teacher's image tower beside the pretrained transformers text model `tower` (mean-pooled, at the
    teacher's context length), its own tokenizer and a new projection into the teacher's space."""
    cfg = resolve_config(teacher.config, text_tower=tower)
    cfg.text.pretrained = resolve_pretrained(tower)  # a clear error where there is no model; fetched once
    try:
        tok = load_tokenizer(cfg.text.pretrained, cfg.text.context_length)
    except (OSError, ValueError) as e:
        raise DataError(f"student tower {tower!r}: no tokenizer there ({e})") from None
    return _new_text_tower(teacher, cfg, tok), tok


def _new_text_tower(teacher: CLIPModel, cfg: ModelConfig, tok: Tokenizer) -> CLIPModel:
    """A model of `cfg` (the teacher's but for its text tower) holding the teacher's weights outside the text
    tower and its projection."""
    student = CLIPModel(bind_tokenizer(cfg, tok))
    kept = {k: v for k, v in teacher.state_dict().items() if not k.startswith(("text.", "text_proj."))}
    missing, unexpected = student.load_state_dict(kept, strict=False)
    assert not unexpected and all(k.startswith(("text.", "text_proj.")) for k in missing), (missing, unexpected)
    return _train_text_only(student, teacher)


def train_new_tokens_only(student: CLIPModel, added: int) -> torch.nn.Parameter:
    """Freeze the text tower but for the input embeddings of its last `added` tokens; returns that embedding table.

    The other rows get no gradient (so Adam, without weight decay, never moves them): a text made of the teacher's
    own tokens, every English one, embeds exactly as the teacher's."""
    for p in student.parameters():
        p.requires_grad_(False)
    table = student.text.get_input_embeddings().weight
    table.requires_grad_(True)
    old = table.shape[0] - added
    table.register_hook(lambda g: torch.cat([torch.zeros_like(g[:old]), g[old:]]))
    return table


def _train_text_only(student: CLIPModel, teacher: CLIPModel) -> CLIPModel:
    """Freeze all but the text tower and its projection; record the teacher's joint space as the student's."""
    student.config.text_space = teacher.config.text_space or teacher.fingerprint()
    for p in student.parameters():
        p.requires_grad_(False)
    for p in list(student.text.parameters()) + list(student.text_proj.parameters()):
        p.requires_grad_(True)
    student.locked = {"image"}
    return student


@torch.no_grad()
def embed_texts(model: CLIPModel, tokenizer: Tokenizer, texts: list[str], batch: int = 256) -> torch.Tensor:
    """`[N, D]` normalised text embeddings (the model cuts each batch at its longest sequence)."""
    model.eval()
    out = [model.encode_text(tokenizer(texts[i:i + batch])) for i in range(0, len(texts), batch)]
    return torch.cat(out) if out else torch.zeros(0, model.embed_dim)


def _split(table: pd.DataFrame, held_out: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out a seeded share of the distinct English sentences (all their translations go with them)."""
    english = np.array(sorted(table["en"].unique()))
    rng = np.random.default_rng(seed)
    held = set(rng.choice(english, int(round(held_out * len(english))), replace=False)) if held_out > 0 else set()
    mask = table["en"].isin(held)
    return table[~mask].reset_index(drop=True), table[mask].reset_index(drop=True)


class Distiller:
    """One distillation run: the teacher's targets computed once, the student trained to meet them."""

    def __init__(self, cfg: DistillConfig) -> None:
        self.cfg, self.out = cfg, Path(cfg.output)
        torch.manual_seed(cfg.seed)
        teacher, _, tok = load(cfg.model)
        self.train_pairs, self.val_pairs = _split(read_parallel(cfg.parallel), cfg.held_out, cfg.seed)
        # from the trained pairs only, so the held-out distance measures pairs the student never saw
        self.lexicon = word_lexicon(self.train_pairs) if cfg.word_tokens and cfg.student == "extend" else {}
        self.student, self.tokenizer, self.added = self._student(teacher, tok)
        english = sorted(set(self.train_pairs["en"]) | set(self.val_pairs["en"]))
        self.target_row = {s: i for i, s in enumerate(english)}
        self.targets = embed_texts(teacher, tok, english)  # [E, D]: where the teacher puts each English sentence
        groups = (param_groups(self.student, cfg.weight_decay, cfg.lr) if cfg.tune == "tower"
                  else [{"params": [train_new_tokens_only(self.student, self.added)], "weight_decay": 0.0}])
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=True)  # fused: the per-tensor loop took 0.18 s
        # of a 0.7 s step
        self.scheduler = cosine_with_warmup(self.optimizer, min(cfg.warmup_steps, cfg.steps // 2), cfg.steps)
        self.step = 0
        self.config = json.loads(json.dumps(dataclasses.asdict(cfg)))
        if cfg.resume:
            self._resume()

    def _student(self, teacher: CLIPModel, tok: Tokenizer) -> tuple[CLIPModel, Tokenizer, int]:
        """The configured student; its tokenizer sees every pair's `text` (and for "bpe" also its `en`)."""
        pairs = pd.concat([self.train_pairs, self.val_pairs])
        if self.cfg.student == "extend":
            return build_student(teacher, tok, pairs["text"], self.lexicon)
        if self.cfg.student == "pretrained":
            return (*build_pretrained_student(teacher, self.cfg.student_tower), 0)
        saved = self.out / "tokenizer"
        if not self.cfg.resume:
            shutil.rmtree(saved, ignore_errors=True)  # a fresh run trains its own; a resume reuses the saved one
        student, tok = build_bpe_student(teacher, pd.concat([pairs["en"], pairs["text"]]), self.cfg.student_preset,
                                         saved)
        return student, tok, 0

    def _batch(self, step: int) -> tuple[list[str], torch.Tensor]:
        """Batch `step` (a pure function of the seed and step, so a resumed run draws the same ones)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        share = self.cfg.english_fraction if self.cfg.tune == "tower" else 0.0  # tokens: English cannot move
        n_en = int(round(share * self.cfg.batch_size))
        pairs = self.train_pairs.iloc[torch.randint(len(self.train_pairs), (self.cfg.batch_size - n_en,), generator=g)]
        english = list(self.target_row)
        en_rows = [english[i] for i in torch.randint(len(english), (n_en,), generator=g)]
        texts = pairs["text"].tolist() + en_rows
        rows = [self.target_row[e] for e in pairs["en"].tolist() + en_rows]
        return texts, self.targets[rows]

    def _train_step(self, texts: list[str], target: torch.Tensor) -> float:
        self.student.train()
        with training_autocast(training_precision(self.cfg.precision, "cpu"), "cpu"):
            z = self.student.encode_text(self.tokenizer(texts))  # [B, D], float32 unit rows
        loss = F.mse_loss(z, target, reduction="sum") / len(texts)  # = 2 (1 - cos) per row, averaged
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.student.parameters() if p.grad is not None], 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def distance(self, pairs: pd.DataFrame) -> float:
        """Mean cosine distance (1 - cos) between the student's embedding of `text` and the teacher's of `en`."""
        if pairs.empty:
            return float("nan")
        z = embed_texts(self.student, self.tokenizer, pairs["text"].tolist())
        t = self.targets[[self.target_row[e] for e in pairs["en"]]]
        return float(1 - (z * t).sum(1).mean())

    def fit(self) -> dict[str, Any]:
        """Train to `steps`, checkpointing; writes the student model and returns a summary."""
        cfg, t0, losses = self.cfg, time.perf_counter(), []
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / "distill_config.json", self.config)
        before = self.distance(self.val_pairs) if self.step == 0 else None
        with tqdm(total=cfg.steps, initial=self.step, desc="distill", disable=not cfg.progress) as bar:
            while self.step < cfg.steps:
                losses.append(self._train_step(*self._batch(self.step)))
                self.step += 1
                bar.update(1)
                if self.step % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-cfg.log_every:]):.4f}")
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self._save()
        model_dir = save(self.student, self.tokenizer, self.out / "model")
        summary = {"steps": self.step, "student": cfg.student, "tune": cfg.tune, "added_tokens": self.added,
                   "word_tokens": len(self.lexicon),
                   "vocab": self.tokenizer.vocab_size, "train_pairs": len(self.train_pairs),
                   "held_out_pairs": len(self.val_pairs), "held_out_distance_before": before,
                   "held_out_distance": self.distance(self.val_pairs), "seconds": round(time.perf_counter() - t0, 1),
                   "model_dir": str(model_dir)}
        write_json_atomic(self.out / "summary.json", summary)
        return summary

    def _save(self) -> None:
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": runstate.rng_state(), "config": json.dumps(self.config)}
        runstate.save_checkpoint(self.out / "checkpoints", self.step, self.student, state, self.cfg.keep_checkpoints)
        log.info("saved step %d", self.step)

    def _resume(self) -> None:
        runstate.clean_stale(self.out / "checkpoints")
        found = runstate.latest_good(self.out / "checkpoints", self.student)
        if found is None:
            log.warning("resume: no usable checkpoint in %s; starting from scratch", self.out / "checkpoints")
            return
        path, state = found
        free = ("resume", "progress", "log_every", "checkpoint_every", "keep_checkpoints", "output")
        old = {k: v for k, v in json.loads(state["config"]).items() if k not in free}
        if old != {k: v for k, v in self.config.items() if k not in free}:
            raise DataError(f"refusing to resume from {path}: the distillation config changed")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        runstate.set_rng_state(state["rng"])
        self.step = int(state["step"])
        log.info("resumed from step %d (%s)", self.step, path)


def distill_text(cfg: DistillConfig) -> dict[str, Any]:
    """Run one distillation (what `clipkit distill-text` calls): see the module docstring."""
    return Distiller(cfg).fit()
