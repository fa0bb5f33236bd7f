"""Image-caption tables: CSV/TSV/parquet/JSON(L) files and folders of images -> clean pairs DataFrames.

`read_table` / `read_folder` return the columns `image` (absolute path, resolved against the table's folder),
`image_rel` (the path as written), `caption` (one clean caption per row) and any extra columns passed
through. Empty and NA-like captions are dropped and counted, never kept as the text "nan".
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Union

import pandas as pd

from ..errors import DataError

PathLike = Union[str, os.PathLike]
TABLE_READERS = (".csv", ".tsv", ".parquet", ".jsonl", ".json")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")
NA_CAPTIONS = frozenset({"", "na", "n/a", "nan", "null", "none"})
MIN_PYARROW = (14, 0, 1)  # CVE-2023-47248: arbitrary code execution when reading untrusted parquet
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")

def _require_pyarrow() -> None:
    import pyarrow

    have = tuple(int(x) for x in re.findall(r"\d+", pyarrow.__version__)[:3])
    if have < MIN_PYARROW:
        raise DataError(f"pyarrow {pyarrow.__version__} is unsafe for parquet (CVE-2023-47248); need >= 14.0.1")


def _encoding_error(path: Path) -> DataError:
    """A DataError naming the file and the line of its first non-UTF-8 byte."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
        where = ""
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        where = f" line {line} (byte {e.start}):"
    return DataError(f"{path}:{where} not UTF-8 text; re-save the table as UTF-8")


def _read_delimited(path: Path, sep: str, on_bad_lines: str) -> pd.DataFrame:
    """CSV/TSV as strings. The header is read as a data row so that a row with more fields than the header
    is an error with its line number: pandas would otherwise treat the extra field as an index column
    (a trailing comma shifts every column) or drop it silently under `index_col=False`."""
    kw = dict(sep=sep, header=None, dtype=str, keep_default_na=False, index_col=False, encoding="utf-8-sig")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            raw = pd.read_csv(path, on_bad_lines="warn" if on_bad_lines == "skip" else "error", **kw)
        except pd.errors.EmptyDataError:
            raise DataError(f"{path}: empty table") from None
        except pd.errors.ParserError as e:
            msg = str(e).replace("Error tokenizing data. C error: ", "").strip()
            raise DataError(f"{path}: {msg} (a stray comma, or a trailing comma on each row? "
                            "quote captions that contain the separator; on_bad_lines='skip' drops such rows)") from None
    bad = sum(len(re.findall(r"Skipping line \d+", str(w.message))) for w in caught)
    header = [h.strip() for h in raw.iloc[0]]
    df = raw.iloc[1:].set_axis(header, axis=1).reset_index(drop=True)
    keep = [i for i, h in enumerate(header) if h or (df.iloc[:, i] != "").any()]
    df = df.iloc[:, keep]  # drops the empty column of a trailing comma on the header and on every row
    if df.columns.duplicated().any():
        raise DataError(f"{path}: duplicate column names {sorted(set(df.columns[df.columns.duplicated()]))}")
    df.attrs["bad_lines_skipped"] = bad
    return df


def read_raw(path: Path, on_bad_lines: str) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix not in TABLE_READERS:
        raise DataError(f"{path}: unsupported table type {suffix!r}; use one of {', '.join(TABLE_READERS)}")
    if not path.is_file():
        raise DataError(f"{path}: no such table file")
    try:
        if suffix in (".csv", ".tsv"):
            return _read_delimited(path, "\t" if suffix == ".tsv" else ",", on_bad_lines)
        if suffix == ".parquet":
            _require_pyarrow()
            return pd.read_parquet(path)
        return pd.read_json(path, lines=suffix == ".jsonl", dtype=False, convert_dates=False, encoding="utf-8-sig")
    except DataError:
        raise
    except UnicodeDecodeError:
        raise _encoding_error(path) from None
    except Exception as e:  # pyarrow/json errors have no common base: name the file whatever broke
        raise DataError(f"{path}: unreadable {suffix[1:]} table ({type(e).__name__}: {e})") from None


def _rename(df: pd.DataFrame, path: Path, image_column: str, caption_column: str) -> pd.DataFrame:
    """Rename the user's columns to `image` and `caption`, listing what exists when one is missing."""
    for want in (image_column, caption_column):
        if want not in df.columns:
            raise DataError(f"{path}: no column {want!r}; available columns: {', '.join(map(str, df.columns))} "
                            "(pick others with image_column= / caption_column=)")
    clash = [c for c, src in (("image", image_column), ("caption", caption_column)) if c != src and c in df.columns]
    if clash:
        raise DataError(f"{path}: column(s) {clash} exist besides the chosen image/caption columns; rename them")
    return df.rename(columns={image_column: "image", caption_column: "caption"})


def _json_list(text: Any) -> Any:
    """A CSV cell holding a JSON list of captions becomes that list; anything else is returned unchanged."""
    if isinstance(text, str) and text.startswith("[") and text.endswith("]"):
        try:
            value = json.loads(text)
        except ValueError:
            return text
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    return text


def _explode_captions(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """One row per caption: list cells (JSONL/parquet lists, JSON lists in CSV) are exploded."""
    df = df.assign(caption=df["caption"].map(_json_list)).explode("caption", ignore_index=True)
    for col in ("image", "caption"):
        kind = pd.api.types.infer_dtype(df[col], skipna=True)
        if kind not in ("string", "empty"):
            raise DataError(f"{path}: column {col!r} must hold text (or lists of text), found {kind} values")
    return df


def _drop_empty_captions(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Strip captions and drop empty, whitespace and NA-like ones (never keep the literal text "nan")."""
    text = df["caption"].astype(object).where(df["caption"].notna(), "").astype(str).str.strip()
    bad = text.str.lower().isin(NA_CAPTIONS)
    return df.assign(caption=text)[~bad].reset_index(drop=True), int(bad.sum())


def resolve_images(df: pd.DataFrame, base: Path) -> pd.DataFrame:
    """`image` becomes an absolute path (relative ones resolve against `base`, not the CWD); `image_rel` keeps
    the path as written."""
    rel = df["image"].astype(object).where(df["image"].notna(), "").astype(str).str.strip()
    absolute = rel.map(lambda p: os.path.abspath(os.path.join(base, p)))
    rest = [c for c in df.columns if c not in ("image", "caption")]
    return pd.concat([absolute.rename("image"), df["caption"], rel.rename("image_rel"), df[rest]], axis=1)


def read_table(path: PathLike, *, image_column: str = "image", caption_column: str = "caption",
               on_bad_lines: str = "error") -> pd.DataFrame:
    """Read a CSV/TSV/parquet/JSON(L) pairs table into clean `image`/`caption` rows (see the module docstring).

    `df.attrs` holds `dropped_empty_captions` and `bad_lines_skipped` (rows dropped by on_bad_lines="skip").
    """
    if on_bad_lines not in ("error", "skip"):
        raise ValueError(f"on_bad_lines must be 'error' or 'skip', got {on_bad_lines!r}")
    path = Path(path).absolute()
    raw = read_raw(path, on_bad_lines)
    bad_lines = raw.attrs.get("bad_lines_skipped", 0)
    df = _explode_captions(_rename(raw, path, image_column, caption_column), path)
    df, dropped = _drop_empty_captions(df)
    df = resolve_images(df, path.parent)
    df.attrs.update(source=str(path), dropped_empty_captions=dropped, bad_lines_skipped=bad_lines)
    return df


def read_folder(path: PathLike, *, keep_uncaptioned: bool = False) -> pd.DataFrame:
    """Images with sidecar captions (`x.jpg` + `x.txt`) under `path`, recursively, as a pairs table.

    Images in sub-folders get a `label` column: the first sub-folder's name (class folders). Images without a
    caption file are dropped and counted in `attrs["missing_captions"]`, empty ones in `dropped_empty_captions`.
    With `keep_uncaptioned` (a search collection needs no captions) every image is kept, captions stripped,
    missing ones "".
    """
    root = Path(path).absolute()
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS
                    and not any(part.startswith(".") for part in p.relative_to(root).parts))
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8-sig", errors="replace")
                if p.with_suffix(".txt").is_file() else None for p in images]
    if keep_uncaptioned:
        kept, captions = images, [(c or "").strip() for c in captions]
    else:
        kept, captions = [p for p, c in zip(images, captions) if c is not None], [c for c in captions if c is not None]
    rel = [p.relative_to(root) for p in kept]
    df = pd.DataFrame({"image": [str(p) for p in kept], "caption": captions, "image_rel": [r.as_posix() for r in rel]})
    if any(len(r.parts) > 1 for r in rel):
        df["label"] = [r.parts[0] if len(r.parts) > 1 else "" for r in rel]
    df.attrs["source"] = str(root)
    if not keep_uncaptioned:
        df, dropped = _drop_empty_captions(df)
        df.attrs.update(source=str(root), missing_captions=len(images) - len(kept), dropped_empty_captions=dropped)
    return df


def is_shard_spec(spec: Any) -> bool:
    if not isinstance(spec, (str, os.PathLike)):
        return True  # a list of shards
    s = os.fspath(spec)
    return bool(re.search(r"\.(tar|tgz|tar\.gz)$", s)) or (bool(SCHEME.match(s)) and not s.startswith("file:"))


def read_pairs(spec: PathLike, **kw: Any) -> pd.DataFrame:
    """A pairs table from a table file (`read_table` keywords apply) or a folder of images + sidecar captions."""
    if is_shard_spec(spec):
        raise DataError(f"{spec}: tar shards are streamed; use TarShardDataset (or pair_dataset)")
    return read_folder(spec) if Path(spec).is_dir() else read_table(spec, **kw)

