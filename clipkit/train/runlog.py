"""The run's `metrics.jsonl`: one JSON record per line, appended while training, cut back on resume.

A resumed run replays the steps after its checkpoint, so their records are dropped first (they would appear
twice); a line torn by a kill is skipped when reading and dropped when cutting back.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..fileio import write_text_atomic

log = logging.getLogger("clipkit.train")


class RunLog:
    """Appends records to `path` (flushed per line) and reads them back, tolerating a torn last line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """Every complete record; a line that is not JSON (torn by a kill) is skipped with a warning."""
        if not self.path.exists():
            return []
        records = []
        for n, line in enumerate(self.path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            try:
                if line.strip():
                    records.append(json.loads(line))
            except ValueError:
                log.warning("%s line %d is torn (a killed run); skipped", self.path, n)
        return records

    def keep_until(self, step: int) -> int:
        """Rewrite the log (atomically) with only the records of steps <= `step`; returns how many were dropped."""
        if not self.path.exists():
            return 0
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept = [json.dumps(r) for r in self.read() if r.get("step", 0) <= step]
        dropped = sum(1 for line in lines if line.strip()) - len(kept)
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        return dropped
