"""A self-contained HTML report (tables + inline PNGs) that a person opens in a browser.

Every string from data (captions, paths, queries) is HTML-escaped; images are embedded as base64
so the file can be mailed or archived on its own.
"""
from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..fileio import write_text_atomic

PathLike = Union[str, os.PathLike]
STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:0}.sub{color:#666;margin-top:.2em}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ddd;padding:4px 10px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child,td.text{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.3em 0}.note{color:#555;font-size:.95em}
code{background:#f4f4f4;padding:1px 4px}
"""


@dataclass
class Section:
    """One report section: a heading, optional paragraphs, tables (header + rows) and PNG files."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[list[str], list[list[Any]]]] = field(default_factory=list)
    images: list[tuple[PathLike, str]] = field(default_factory=list)  # (png path, caption)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return html.escape("" if v is None else str(v))


def _align(v: Any) -> str:
    return "" if isinstance(v, (int, float)) else ' class="text"'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{_align(v)}>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(path: PathLike, caption: str) -> str:
    p = Path(path)
    if not p.exists():
        return f'<p class="note">(missing image: {html.escape(p.name)})</p>'
    data = base64.b64encode(p.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}"><figcaption class="note">{html.escape(caption)}</figcaption></figure>'


def render(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><p class='sub'>{html.escape(subtitle)}</p>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        parts += [f"<p>{html.escape(p)}</p>" for p in s.paragraphs]
        parts += [_table(h, rows) for h, rows in s.tables]
        parts += [_image(p, c) for p, c in s.images]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: PathLike, title: str, subtitle: str, sections: Sequence[Section]) -> Path:
    """Render and write the report atomically; returns its path."""
    write_text_atomic(path, render(title, subtitle, sections))
    return Path(path)


def metric_rows(metrics: dict[str, Any], keys: Optional[Sequence[str]] = None) -> list[list[Any]]:
    """Rows of (metric, value, chance) for the keys that have a value, chance beside it when known."""
    keys = keys or [k for k in metrics if not k.startswith("chance_")]
    return [[k, metrics[k], metrics.get(f"chance_{k}", "")] for k in keys if k in metrics]
