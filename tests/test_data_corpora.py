"""Corpus readers, bad inputs, deterministic disjoint splits, scenarios, packing."""

from __future__ import annotations

import json

import pytest
import torch

from pocketlm.data import (
    build_scenario,
    load_corpus,
    pack_blocks,
    read_agnews,
    read_folder,
    read_jsonl,
    read_shakespeare,
    sample_windows,
    split_corpus,
    split_user,
    token_summary,
    tokenize_docs,
)
from pocketlm.data.fortunes import fortunes_available, read_fortunes, split_entries
from pocketlm.errors import DataError
from pocketlm.models import build_tiny


@pytest.fixture(scope="module")
def tok():
    return build_tiny("tiny-llama")[1]


def test_folder_reader(folder_corpus):
    corpus = read_folder(folder_corpus)
    assert sorted(corpus) == ["alice", "bob", "carol"]
    assert all(len(d) == 12 for d in corpus.values())
    assert load_corpus(str(folder_corpus)) == corpus


def test_folder_empty_user(folder_corpus):
    (folder_corpus / "dave").mkdir()
    with pytest.raises(DataError, match="dave"):
        read_folder(folder_corpus)


def test_folder_unreadable_file(folder_corpus):
    (folder_corpus / "alice" / "zz.txt").symlink_to(folder_corpus / "missing-target")
    with pytest.raises(DataError, match="cannot read"):
        read_folder(folder_corpus)


def test_jsonl_reader_and_errors(tmp_path):
    good = tmp_path / "u.jsonl"
    good.write_text("\n".join(json.dumps({"user": u, "text": f"{u} says {i}"}) for u in "ab" for i in range(5)))
    corpus = read_jsonl(good)
    assert sorted(corpus) == ["a", "b"] and len(corpus["a"]) == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user": "a", "text": "ok"}\n{"user": "a", "text": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        read_jsonl(bad)
    keys = tmp_path / "keys.jsonl"
    keys.write_text('{"who": "a", "text": "x"}\n')
    with pytest.raises(DataError, match=":1: expected an object"):
        read_jsonl(keys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"user": "a", "text": "   "}\n')
    with pytest.raises(DataError, match="no users"):
        read_jsonl(empty)


def test_missing_corpus_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_corpus(str(tmp_path / "nope"))
    f = tmp_path / "x.parquet"
    f.write_text("x")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_corpus(str(f))
    with pytest.raises(DataError, match="unknown corpus format"):
        load_corpus(str(f), fmt="xml")


def test_shakespeare_reader_synthetic(tmp_path):
    blocks = [f"ROMEO:\nline {i}" for i in range(25)] + [f"First Citizen:\nspeak {i}" for i in range(21)]
    blocks += ["Nurse:\nonly once"]
    f = tmp_path / "input.txt"
    f.write_text("\n\n".join(blocks) + "\n")
    corpus = read_shakespeare(f)
    assert list(corpus) == ["ROMEO", "First Citizen"]
    assert corpus["ROMEO"][3] == "line 3"


def test_shakespeare_shared_file(shared):
    path = shared / "data" / "shakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    corpus = read_shakespeare(path)
    # SOURCE.md counts 99 speakers with >= 20 turns and 229 GLOUCESTER turns, empty turns included
    # (a speaker line with no speech); without those, 98 speakers and 211 non-empty GLOUCESTER turns.
    assert len(corpus) == 98
    assert len(corpus["GLOUCESTER"]) == 211
    assert all(doc.strip() for docs in corpus.values() for doc in docs)


def test_agnews_reader_synthetic(tmp_path):
    (tmp_path / "classes.txt").write_text("World\nSports\nBusiness\nSci/Tech\n")
    rows = ['"1","Title A","Desc with #36;5 and a\\\\newline"', '"4","Chips","Faster #39;chips#39;"', '"2","Goal","Won"']
    (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
    corpus = read_agnews(tmp_path)
    assert sorted(corpus) == ["Sci-Tech", "Sports", "World"]
    assert "$5" in corpus["World"][0] and "'chips'" in corpus["Sci-Tech"][0]
    (tmp_path / "test.csv").write_text('"x","only two"\n')
    with pytest.raises(DataError, match="test.csv:1"):
        read_agnews(tmp_path)


def test_agnews_shared_file(shared):
    path = shared / "data" / "agnews"
    if not (path / "test.csv").is_file():
        pytest.skip(f"{path}/test.csv absent")
    corpus = load_corpus(str(path))
    assert sorted(corpus) == ["Business", "Sci-Tech", "Sports", "World"]
    assert all(len(d) == 1900 for d in corpus.values())


def test_fortune_entry_splitting():
    text = "first one\n%\nsecond\nline two\n%\n%\nthird\n"
    assert split_entries(text) == ["first one", "second\nline two", "third"]


@pytest.mark.skipif(not fortunes_available(), reason="fortunes corpus not cached: run `pocketlm prepare` (make test does)")
def test_builtin_fortunes_four_languages():
    corpus = read_fortunes()
    assert list(corpus) == ["en", "de", "es", "it"]
    assert all(len(v) > 1000 for v in corpus.values())
    assert load_corpus("fortunes:de,it").keys() == {"de", "it"}
    with pytest.raises(DataError, match="unknown fortunes language"):
        read_fortunes(["xx"])


def test_splits_deterministic_and_disjoint(folder_corpus):
    corpus = read_folder(folder_corpus)
    a = split_corpus(corpus, seed=7)
    b = split_corpus(corpus, seed=7)
    c = split_corpus(corpus, seed=8)
    assert a == b
    assert any(a[u] != c[u] for u in corpus)
    for u, s in a.items():
        parts = [set(s.train), set(s.val), set(s.test)]
        assert all(parts[i].isdisjoint(parts[j]) for i in range(3) for j in range(i + 1, 3))
        assert sorted(s.train + s.val + s.test) == sorted(corpus[u])
    # a user's split does not depend on the other users
    assert split_corpus({"alice": corpus["alice"]}, seed=7)["alice"] == a["alice"]


def test_split_too_small_and_bad_fractions():
    with pytest.raises(DataError, match="at least 3"):
        split_user("u", ["a", "b"])
    with pytest.raises(DataError, match="sum to 1"):
        split_user("u", ["a"] * 10, fractions=(0.5, 0.1, 0.1))


def test_max_chars_caps_text():
    docs = [f"document number {i}" for i in range(100)]
    s = split_user("u", docs, max_chars=200)
    assert sum(len(d) for d in s.train + s.val + s.test) < 200 + 20


def test_scenarios(folder_corpus, tok):
    corpus = read_folder(folder_corpus)
    ind = build_scenario(corpus, tok, scenario="id", seed=1)
    ood = build_scenario(corpus, tok, scenario="ood", seed=1)
    for u in corpus:
        assert torch.equal(ind[u].train, ood[u].train)
    first = next(iter(ood.values()))
    assert all(torch.equal(t.test, first.test) and torch.equal(t.val, first.val) for t in ood.values())
    share = min(t.test.numel() for t in ind.values())
    assert first.test.numel() == share * len(corpus)
    assert torch.equal(first.test[:share], ind["alice"].test[:share])
    summary = token_summary(ind)
    assert set(summary["bob"]) == {"train", "val", "test"}
    with pytest.raises(DataError, match="unknown scenario"):
        build_scenario(corpus, tok, scenario="xyz")


def test_tokenize_and_pack(tok):
    stream = tokenize_docs(tok, ["ab", "cde"])
    assert stream.tolist()[-1] == tok.eos_token_id and (stream == tok.eos_token_id).sum() == 2
    s = torch.arange(1, 24)
    blocks = pack_blocks(s, 5, pad_id=0)
    assert blocks.input_ids.shape == (5, 5)
    kept = blocks.input_ids[blocks.attention_mask.bool()]
    assert torch.equal(kept, s)  # every token exactly once, in order
    assert (blocks.labels[-1, 3:] == -100).all() and blocks.labels[-1, 2] == 23
    assert len(pack_blocks(s, 5, drop_last=True)) == 4
    with pytest.raises(DataError):
        pack_blocks(s, 1)


def test_sample_windows_reproducible():
    s = torch.arange(1000)
    a = sample_windows(s, 4, 16, torch.Generator().manual_seed(0))
    b = sample_windows(s, 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (4, 16)
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()
    with pytest.raises(DataError, match="too short"):
        sample_windows(torch.arange(10), 2, 16, torch.Generator())
