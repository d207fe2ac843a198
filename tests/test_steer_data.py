"""Steering data readers (CoGenesis, LongLaMP) and text metrics."""

from __future__ import annotations

import json

import pytest

from pocketlm.data.steering import load_steer_data
from pocketlm.errors import DataError
from pocketlm.eval import text_metrics
from pocketlm.eval.text_metrics import meteor, meteor_status, rouge_scores


def write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


COG = {"id": "1_2_3", "input": "Write a poem.", "personalized_input": "## User Profile\nName: Ann\n## Task\nWrite a poem.",
       "output": "A poem.", "output_without_context": "A poem."}


def test_cogenesis_row(tmp_path):
    ex = load_steer_data(write(tmp_path, [COG, {**COG, "id": "2"}]))
    assert len(ex) == 2 and ex[0].id == "1_2_3" and ex[0].query == "Write a poem."
    assert ex[0].private.startswith("## User Profile") and ex[0].reference == "A poem." and ex[0].format == "cogenesis"
    assert len(load_steer_data(write(tmp_path, [COG, COG, COG]), limit=2)) == 2


def test_longlamp_profile_uses_top5_by_bge_score(tmp_path):
    profile = [{"description": f"product {i}", "reviewText": f"review {i}", "overall": 5, "summary": "s",
                "bge_score": float(i)} for i in range(8)]
    row = {"reviewerId": "R1", "input": "Generate the review text.", "output": "ref", "profile": profile}
    ex = load_steer_data(write(tmp_path, [row]))[0]
    assert ex.format == "longlamp-review" and ex.id == "R1"
    lines = ex.private.split("\n")
    assert lines[0] == "The following are product descriptions with their user reviews."
    assert "Product[1]: product 7" in ex.private and "Review[5]: review 3" in ex.private
    assert "product 2" not in ex.private
    assert ex.private.endswith("Now it's your turn\n\nGenerate the review text.")


def test_longlamp_top5_and_abstract(tmp_path):
    top = [{"title": f"T{i}", "abstract": f"A{i}"} for i in range(5)]
    ex = load_steer_data(write(tmp_path, [{"id": 3, "input": "Write an abstract.", "output": "x", "top_5": top}]))[0]
    assert ex.format == "longlamp-abstract" and "Title[1]: T0\nAbstract[1]: A0" in ex.private


@pytest.mark.parametrize("bad, msg", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"input": "q", "output": "r"}), "neither 'personalized_input'"),
    (json.dumps({**COG, "input": ""}), "'input' must be a non-empty string"),
    (json.dumps({"input": "q", "output": "r", "profile": [{"title": "t", "abstract": "a"}]}), "bge_score"),
    (json.dumps({"input": "q", "output": "r", "top_5": [{"foo": 1}]}), "unknown fields"),
])
def test_malformed_rows_name_the_line(tmp_path, bad, msg):
    p = write(tmp_path, [COG, bad])
    with pytest.raises(DataError, match=msg) as e:
        load_steer_data(p)
    assert f"{p}:2" in str(e.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_steer_data(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_steer_data(tmp_path / "e.jsonl")


def test_shared_cogenesis_file(shared):
    path = shared / "data" / "steering" / "cogenesis.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    ex = load_steer_data(path)
    assert len(ex) == 240 and all(e.format == "cogenesis" for e in ex)
    assert all(e.query in e.private for e in ex[:20])


def test_rouge():
    assert rouge_scores(["the cat sat"], ["the cat sat"]) == {"rouge1": 100.0, "rougeL": 100.0}
    s = rouge_scores(["the cats sat on mats", "x"], ["the cat sat", "y"])
    assert 0 < s["rouge1"] < 100


def test_meteor_reports_unavailable_without_data(monkeypatch):
    ok, reason = meteor_status()
    assert isinstance(ok, bool) and reason
    monkeypatch.setattr(text_metrics, "meteor_status", lambda: (False, "no wordnet"))
    assert meteor(["a"], ["a"]) is None
