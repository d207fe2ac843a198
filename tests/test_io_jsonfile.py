"""Result files are written whole: parents created, no partial file left behind, non-ASCII kept on request."""

from __future__ import annotations

import json

from pocketlm.jsonfile import write_json


def test_write_json_replaces_whole_file(tmp_path):
    path = tmp_path / "a" / "b" / "res.json"
    write_json({"x": 1}, path)
    write_json({"text": "Grüße"}, path, indent=1, ensure_ascii=False)
    assert json.loads(path.read_text(encoding="utf-8")) == {"text": "Grüße"}
    assert "Grüße" in path.read_text(encoding="utf-8")
    assert [p.name for p in path.parent.iterdir()] == ["res.json"]


def test_non_finite_numbers_become_null_never_bare_nan(tmp_path):
    path = tmp_path / "res.json"
    write_json({"se": float("nan"), "rows": [1.0, float("inf"), {"k": -float("inf")}]}, path)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"se": None, "rows": [1.0, None, {"k": None}]}
