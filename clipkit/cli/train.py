"""`clipkit train` and `clipkit distill-text`."""
from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_train(args: argparse.Namespace) -> int:
    from ..evaluate.zeroshot import load_templates
    from ..train import TrainConfig, train

    if args.val_templates:
        args.val_templates = load_templates(args.val_templates)
    fields = set(TrainConfig.__dataclass_fields__) - {"extra"}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    summary = train(cfg)
    if "model_dir" in summary:
        print(f"trained {summary['steps']} steps; model saved to {summary['model_dir']}")
    if "wise_ft" in summary:
        print(f"\nWiSE-FT ({summary['wise_ft']['plot']}):\n" + Path(summary["wise_ft"]["table"]).read_text().rstrip())
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune or train a CLIP model on image-caption pairs")
    p.add_argument("--train-data", required=True, help="table (CSV/TSV/parquet/JSONL), folder of image+.txt pairs, "
                   "or tar shards ('shards/shard-{00000..00099}.tar' or a folder of *.tar): streamed, not cached")
    p.add_argument("--train-num-samples", type=int, help="tar shards: samples per epoch (default: their sizes.json)")
    p.add_argument("--shuffle-buffer", type=int, help="tar shards: samples each reader shuffles among (default 1000)")
    p.add_argument("--allow-pipe", action="store_true", default=None,
                   help="tar shards: accept pipe: and remote specs (they run a shell command: trusted specs only)")
    p.add_argument("--val-data", help="validation table (retrieval, and zero-shot if it has a label column)")
    p.add_argument("--model", default="tiny", help="model name (ViT-B-32, tiny, ...; random unless --pretrained, "
                   "*-minilm: packaged weights), hf-hub:org/name, clipkit/HF directory, or OpenCLIP file (default: tiny)")
    p.add_argument("--pretrained", help="weights for a model name: an open_clip tag such as laion2b_s34b_b79k "
                   "(fetched into the Hugging Face cache), or a weights file")
    p.add_argument("--arch", help="the model name an OpenCLIP file's weights are (ViT-B-32 GELU, ViT-B-32-quickgelu)")
    p.add_argument("--text-tower", help="text tower override for a preset: minilm, hf-hub:org/name or hf:/dir")
    p.add_argument("--output", required=True, help="run folder: checkpoints/, model/, metrics.jsonl, loss_curve.png")
    p.add_argument("--image-column", help="image column name (default: image)")
    p.add_argument("--caption-column", help="caption column name (default: caption)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, help="per-process batch size (default 64)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 5e-4)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--loss", choices=["clip", "siglip"])
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--grad-checkpointing", action="store_true", default=None)
    p.add_argument("--grad-cache-chunk", type=int, help="gradient cache: embed the batch in chunks of this many rows")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="auto (default): bf16 autocast on CUDA and on CPUs with native bf16 (AVX-512 BF16, AMX), "
                        "else fp32")
    p.add_argument("--augment", action="store_true", default=None, help="random resized crops while training")
    p.add_argument("--style-augment", action="store_true", default=None,
                   help="style-robust augmentation: random background colour, colour jitter, grey-scale, blur, crops")
    p.add_argument("--patch-dropout", type=float, metavar="RATE",
                   help="ViT image towers: drop this fraction of each image's patches while training (FLIP; 0.5 "
                        "halves the tokens; default 0)")
    p.add_argument("--unmasked-steps", type=int, metavar="N",
                   help="with --patch-dropout: the last N steps see every patch (FLIP's unmasked tuning)")
    p.add_argument("--no-image-cache", dest="cache_images", action="store_false", default=None,
                   help="decode images every epoch instead of once into a uint8 cache")
    p.add_argument("--checkpoint-every", type=int, help="save a checkpoint every N steps (default 200)")
    p.add_argument("--keep-checkpoints", type=int)
    p.add_argument("--workers", dest="num_workers", type=int, help="data loader worker processes")
    p.add_argument("--log-every", type=int)
    p.add_argument("--max-bad-fraction", type=float, help="abort when more than this fraction of images is unreadable")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the newest good checkpoint")
    p.add_argument("--resume-ignore-config", action="store_true", default=None,
                   help="resume even though the config or the training data changed since the checkpoint")
    p.add_argument("--val-templates", help="validation zero-shot: file with one prompt template per line, each "
                   "containing {} (default: the library's templates)")
    p.add_argument("--quiet", dest="progress", action="store_false", default=None, help="no progress bar")
    _add_finetune_flags(p)
    p.set_defaults(func=_cmd_train)


def _add_finetune_flags(p: argparse.ArgumentParser) -> None:
    """Locking (open_clip's flags and layer-group counting), learning rates per layer group, WiSE-FT."""
    p.add_argument("--lock-image", action="store_true", default=None, help="freeze the image tower (not its projection)")
    p.add_argument("--lock-image-unlocked-groups", type=int, metavar="N",
                   help="freeze the image tower but its last N layer groups, counted as open_clip counts them")
    p.add_argument("--lock-image-freeze-bn-stats", action="store_true", default=None,
                   help="BatchNorm layers in frozen groups keep their running statistics")
    p.add_argument("--lock-text", action="store_true", default=None, help="freeze the text tower (its features are computed once)")
    p.add_argument("--lock-text-unlocked-layers", type=int, metavar="N",
                   help="freeze the text tower but its last N layer groups, counted as open_clip counts them")
    p.add_argument("--lock-text-freeze-layer-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="LayerNorms of frozen text layers are frozen too (default: yes)")
    p.add_argument("--lr-layer-decay", type=float, metavar="D",
                   help="layer-wise lr decay: a tower's layer group k below its top trains at lr * D**k (default 1)")
    p.add_argument("--proj-lr", type=float, help="lr of the projections and the logit scale (default: --lr)")
    p.add_argument("--wise-ft", type=float, nargs="+", metavar="ALPHA",
                   help="WiSE-FT sweep: evaluate (1 - ALPHA) * start + ALPHA * fine-tuned for each ALPHA (and 0, 1); "
                   "writes wise_ft.md, wise_ft.png and wise_ft/alpha_ALPHA models")
    p.add_argument("--reference-data", help="WiSE-FT: table from the starting model's domain, evaluated for the trade-off")


def _cmd_distill(args: argparse.Namespace) -> int:
    from ..train.distill import DistillConfig, distill_text

    fields = set(DistillConfig.__dataclass_fields__)
    if args.student_tower and args.student is None:
        args.student = "pretrained"
    s = distill_text(DistillConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None}))
    student = {"extend": f"{s['added_tokens']} tokens added, {s['word_tokens']} started at their English word; "
                         f"--tune {s['tune']}",
               "bpe": f"fresh text tower, byte-level BPE of {s['vocab']} tokens",
               "pretrained": f"pretrained text tower {args.student_tower}, its tokenizer of {s['vocab']} tokens, "
                             "new projection"}[s["student"]]
    print(f"distilled {s['steps']} steps on {s['train_pairs']} pairs ({student}); "
          f"held-out distance to the teacher {s['held_out_distance_before']:.4f} -> {s['held_out_distance']:.4f}")
    print(f"student model saved to {s['model_dir']}")
    return 0


def add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill-text", help="teach a model's text tower other languages from parallel text "
                       "(the image tower and every index built with it stay valid)")
    p.add_argument("--model", required=True, help="teacher: a clipkit model directory")
    p.add_argument("--parallel", required=True, help="TSV/CSV with columns en, text (and optional lang)")
    p.add_argument("--out", dest="output", required=True, help="run folder: checkpoints/, model/, summary.json")
    p.add_argument("--steps", type=int, help="optimizer steps (default 600)")
    p.add_argument("--batch-size", type=int, help="pairs per step (default 64)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 for --tune tokens, 1e-4 for tower)")
    p.add_argument("--tune", choices=["tokens", "tower"], help="tokens (extend's default): only the added tokens "
                   "train, so English embeds exactly as the teacher's; tower: the whole text tower")
    p.add_argument("--english-fraction", type=float, help="--tune tower: English -> English share of a batch (0.25)")
    p.add_argument("--student", choices=["extend", "bpe", "pretrained"], help="extend (default): the teacher's text "
                   "tower, its tokenizer extended; bpe: a fresh tower with a byte-level BPE trained on both columns; "
                   "pretrained: --student-tower")
    p.add_argument("--student-tower", metavar="MODEL", help="a transformers text model that reads the language "
                   "(directory, hf:/dir or hf-hub:org/name, e.g. hf-hub:sentence-transformers/"
                   "paraphrase-multilingual-MiniLM-L12-v2), trained whole with a new projection; implies "
                   "--student pretrained")
    p.add_argument("--no-word-tokens", dest="word_tokens", action="store_false", default=None,
                   help="extend: keep single-word pairs' words as characters (default: one token each, at its English)")
    p.add_argument("--student-preset", help="bpe: the preset whose CLIP text transformer shape it takes (default tiny)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="training step precision (default auto)")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", default=None, help="continue from the newest good checkpoint")
    p.add_argument("--quiet", dest="progress", action="store_false", default=None, help="no progress bar")
    p.set_defaults(func=_cmd_distill)

