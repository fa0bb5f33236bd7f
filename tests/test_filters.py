"""Filter strings (issue 11, item 9): a parsed grammar, never `eval`; masks equal pandas' own comparisons."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from clipkit.search import SearchIndex
from clipkit.search.filters import MAX_DEPTH, MAX_TERMS, FilterError, filter_mask, parse_filter

# Payloads that ran code or wrote files through DataFrame.eval on the old main (checked by hand):
# `pd` and `self` are in scope where the index evaluated the filter.
ATTACKS = ['@pd.io.common.os.system("touch {s}") == 0', '@os.system("touch {s}") == 0',
           '@self.build.__globals__["logging"].os.system("touch {s}") == 0', '@self.metadata.to_csv("{s}") == 0',
           '__import__("os").system("touch {s}") == 0', 'style.str.len() > 0', "label ** 99999999 > 0"]


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return pd.DataFrame({"style": ["noto", "openmoji", None, "noto", "it's"],
                         "label": [1, 2, 3, -4, 5], "score": [0.5, 1.5, np.nan, 2.0, -1e3],
                         "ok": [True, False, True, True, False], "my col": ["a", "b", "c", "d", "e"]})


@pytest.mark.parametrize("text,want", [
    ('style == "noto"', lambda f: f["style"] == "noto"),
    ("style != 'noto'", lambda f: f["style"] != "noto"),  # a missing value is != everything, as in pandas
    ("label < 2", lambda f: f["label"] < 2), ("label <= 2", lambda f: f["label"] <= 2),
    ("label > -4", lambda f: f["label"] > -4), ("label >= -4", lambda f: f["label"] >= -4),
    ("score >= 1.5e0", lambda f: f["score"] >= 1.5), ("score < -5E2", lambda f: f["score"] < -500),
    ("ok == true", lambda f: f["ok"]), ("ok != True", lambda f: ~f["ok"]),
    ("style in ['noto', 'x']", lambda f: f["style"].isin(["noto", "x"])),
    ("style not in ['noto']", lambda f: ~f["style"].isin(["noto"])),
    ("label in [1, 5]", lambda f: f["label"].isin([1, 5])),
    ("label == 1 or label == 2 and ok == true", lambda f: (f["label"] == 1) | ((f["label"] == 2) & f["ok"])),
    ("(label == 1 or label == 2) and ok == false", lambda f: f["label"].isin([1, 2]) & ~f["ok"]),
    ("not label == 1 and not (ok == true)", lambda f: (f["label"] != 1) & ~f["ok"]),
    ("`my col` == 'c' OR style == 'it\\'s'", lambda f: (f["my col"] == "c") | (f["style"] == "it's")),
    ("not not ok == true", lambda f: f["ok"]),
])
def test_grammar_matches_pandas(frame, text, want):
    np.testing.assert_array_equal(filter_mask(text, frame), want(frame).fillna(False).to_numpy(bool))


@pytest.mark.parametrize("text,position,reason", [
    ("label +", 6, "unexpected character '+'"),
    ("label", 5, "expected a comparison"),
    ("label == ", 9, "expected a value"),
    ("1 == 1", 0, "expected a column name"),
    ("and == 1", 0, "expected a column name"),
    ("(label == 1", 11, "expected ')'"),
    ("label == 1 label == 2", 11, "expected 'and', 'or' or the end"),
    ("style in 'noto'", 9, "expected '['"),
    ("style in ['a' 'b']", 14, "expected ',' or ']'"),
    ("style not ['a']", 10, "expected 'in' after 'not'"),
    ("label == 'x'", 0, "holds number values; 'x' is a string"),
    ("style == 1", 0, "holds string values"),
    ("ok < true", 0, "is boolean: use == or !="),
    ("label == 1 and nope == 2", 15, "no column 'nope'"),
    ("", 0, "empty filter"),
    ("style == \"open", 9, "unexpected character '\"'"),
])
def test_errors_name_the_position(frame, text, position, reason):
    with pytest.raises(FilterError) as e:
        filter_mask(text, frame)
    assert e.value.position == position and reason in str(e.value), str(e.value)
    assert str(e.value).startswith(f"invalid filter at position {position}:")


def test_limits_bound_the_work():
    deep = "(" * (MAX_DEPTH + 5) + "label == 1" + ")" * (MAX_DEPTH + 5)
    with pytest.raises(FilterError, match="nested deeper"):
        parse_filter(deep)
    with pytest.raises(FilterError, match="more than"):
        parse_filter(" or ".join(["label == 1"] * (MAX_TERMS + 1)))
    with pytest.raises(FilterError, match="longer than 50"):
        parse_filter("label == 1 or " * 10, max_chars=50)
    with pytest.raises(FilterError, match="'image' cannot be filtered"):
        parse_filter("style == 'a' and image == '/etc/passwd'", columns={"style"})


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_strings_run_nothing(attack, tmp_path):
    """Each payload is a parse error (or an unknown column), and its sentinel file never appears."""
    sentinel = tmp_path / "owned"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    index = SearchIndex.build(x, pd.DataFrame({"style": list("aabbcc"), "label": range(6)}), kind="flat")
    with pytest.raises(FilterError):
        index.search(x[:1], 3, filter=attack.format(s=sentinel))
    assert not sentinel.exists()


def test_parsed_tree_is_reusable(frame):
    tree = parse_filter("label >= 2 and style != 'noto'", columns={"label", "style"})
    np.testing.assert_array_equal(filter_mask(tree, frame), filter_mask("label >= 2 and style != 'noto'", frame))
