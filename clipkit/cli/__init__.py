"""The `clipkit` command: parses arguments, calls the library, prints. No logic lives here; each command's
arguments and printing are in the module of its job."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Optional, Sequence

from ..errors import ClipkitError
from .data import add_data
from .embed import add_embed, add_index
from .evaluate import add_eval, add_rerank, add_score
from .models import add_convert, add_demo, add_presets
from .search import add_dedup, add_search, add_serve
from .train import add_distill, add_train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipkit", description="CLIP-style image-text embeddings: train, evaluate, search, score.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_demo, add_data, add_train, add_distill, add_eval, add_score, add_rerank, add_convert,
                add_presets, add_embed, add_index, add_search, add_dedup, add_serve):
        add(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Plain log lines to whatever `sys.stderr` is when a record comes (tests swap it between calls)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _configure_logging() -> logging.Logger:
    """The library's log lines (the "clipkit" loggers, INFO and up) to stderr as plain messages, set up once."""
    logger = logging.getLogger("clipkit")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return logger


def _os_message(e: OSError) -> str:
    if e.strerror is None:
        return str(e)
    return f"{e.filename}: {e.strerror}" if e.filename else e.strerror


def _faiss_cause(e: RuntimeError) -> Optional[str]:
    """The cause in a FAISS C++ error ("Error in faiss::... at FILE:LINE: Error: 'COND' failed: CAUSE"), else None."""
    msg = str(e).strip()
    if not (msg.startswith("Error in ") and "faiss" in msg):
        return None
    return msg.rsplit("failed: ", 1)[-1].splitlines()[0]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns the exit code (tests call this directly)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    args = build_parser().parse_args(argv)
    try:
        with logging_redirect_tqdm(loggers=[_configure_logging()]):  # log lines print above progress bars
            return args.func(args)
    except (ClipkitError, ValueError) as e:
        print(f"clipkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a missing or unwritable path: one line, not a traceback
        print(f"clipkit {args.command}: error: {_os_message(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if (cause := _faiss_cause(e)) is None:
            raise
        print(f"clipkit {args.command}: error: {cause}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())

