"""CLI: steer streams text, eval-steer writes its JSON, bench steer writes ratios, bad input exits 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pocketlm.cli import app

runner = CliRunner()


def _data(tmp_path, n=2):
    rows = [{"id": str(i), "input": f"Write note {i}.", "personalized_input": f"I am Ann, a baker.\nWrite note {i}.",
             "output": "A short note from Ann the baker."} for i in range(n)]
    p = tmp_path / "cg.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def test_eval_steer_writes_json(tmp_path):
    out = tmp_path / "res.json"
    res = runner.invoke(app, ["eval-steer", "--data", str(_data(tmp_path)), "--cloud", "tiny-qwen2", "--local",
                              "tiny-llama", "--methods", "cloud,cloud_with_context,costeer,plausible",
                              "--kappas", "0.5,3", "--limit", "2", "--max-new-tokens", "4", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert set(doc["methods"]) == {"cloud", "cloud_with_context", "costeer", "plausible", "closed_form@0.5",
                                   "closed_form@3"}
    for r in doc["methods"].values():
        assert r["n"] == 2 and isinstance(r["rouge1"], float) and isinstance(r["rougeL"], float)
    assert doc["methods"]["cloud_with_context"]["private"] is False
    assert "available" in doc["meteor"] and len(doc["examples"]) == 2
    assert "costeer" in res.output


def test_steer_streams_tokens(tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("I love sailing.")
    res = runner.invoke(app, ["steer", "Hello", "--cloud", "tiny-qwen2", "--local", "tiny-llama", "--context",
                              str(ctx), "--max-new-tokens", "5", "--method", "plausible", "--kappa", "1.0"])
    assert res.exit_code == 0, res.output
    assert res.output.endswith("\n")


def test_bench_steer_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    res = runner.invoke(app, ["bench", "steer", "--cloud", "tiny-qwen2", "--local", "tiny-llama", "--tokens", "4",
                              "--context-tokens", "32", "--repeats", "1", "--methods", "costeer,closed_form",
                              "--device", "cpu", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["plain_tok_s"] > 0
    assert doc["kv"] == "static"  # auto, for these architectures
    assert set(doc["methods"]) == {"costeer", "closed_form", "closed_form/unbatched_device", "closed_form/overlap",
                                   "plain/dynamic_kv", "closed_form/dynamic_kv"}
    assert all(r["tok_s"] > 0 and r["ratio"] > 0 for r in doc["methods"].values())


def test_bench_steer_dynamic_kv_compares_with_static(tmp_path):
    out = tmp_path / "bench.json"
    res = runner.invoke(app, ["bench", "steer", "--cloud", "tiny-qwen2", "--local", "tiny-llama", "--tokens", "3",
                              "--context-tokens", "16", "--repeats", "1", "--methods", "closed_form", "--kv", "dynamic",
                              "--no-unbatched", "--no-overlap", "--device", "cpu", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["kv"] == "dynamic"
    assert set(doc["methods"]) == {"closed_form", "plain/static_kv", "closed_form/static_kv"}
    res = runner.invoke(app, ["bench", "steer", "--cloud", "tiny-qwen2", "--local", "tiny-llama", "--tokens", "3",
                              "--context-tokens", "16", "--repeats", "1", "--methods", "closed_form", "--compare-kv",
                              "none", "--no-unbatched", "--no-overlap", "--device", "cpu", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert set(json.loads(out.read_text())["methods"]) == {"closed_form"}
    res = runner.invoke(app, ["bench", "steer", "--cloud", "tiny-qwen2", "--local", "tiny-llama", "--compare-kv",
                              "paged", "--device", "cpu"])
    assert res.exit_code != 0 and "unknown KV mode" in str(res.exception)


def _cli(*args):
    return subprocess.run([sys.executable, "-c", "from pocketlm.cli import main; main()", *args],
                          capture_output=True, text=True)


def test_missing_data_file_is_a_clean_error(tmp_path):
    proc = _cli("eval-steer", "--data", str(tmp_path / "missing.jsonl"), "--cloud", "tiny-qwen2", "--local",
                "tiny-llama")
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_method_and_context_are_clean_errors(tmp_path):
    proc = _cli("steer", "hi", "--cloud", "tiny-qwen2", "--local", "tiny-llama", "--method", "magic")
    assert proc.returncode == 2 and "unknown steering method" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("steer", "hi", "--cloud", "tiny-qwen2", "--local", "tiny-llama", "--context", str(tmp_path / "x"))
    assert proc.returncode == 2 and "not found" in proc.stderr


def _eval(tmp_path, data, name, *extra):
    out = tmp_path / name
    res = runner.invoke(app, ["eval-steer", "--data", str(data), "--cloud", "tiny-qwen2", "--local", "tiny-llama",
                              "--methods", "cloud,costeer,light_costeer", "--max-new-tokens", "4", "--json", str(out),
                              *extra])
    assert res.exit_code == 0, res.output
    return out


def test_slices_pooled_equal_one_run(tmp_path):
    """Rows 0-1 and 2-3 run separately (--offset) and pooled score exactly like one run over rows 0-3."""
    data = _data(tmp_path, n=4)
    whole = json.loads(_eval(tmp_path, data, "whole.json", "--limit", "4").read_text())
    a = _eval(tmp_path, data, "a.json", "--limit", "2")
    b = _eval(tmp_path, data, "b.json", "--offset", "2")
    assert [e["id"] for e in json.loads(b.read_text())["examples"]] == ["2", "3"]
    out = tmp_path / "pooled.json"
    res = runner.invoke(app, ["eval-steer-merge", str(a), str(b), "--data", str(data), "--json", str(out)])
    assert res.exit_code == 0, res.output
    pooled = json.loads(out.read_text())
    assert [e["id"] for e in pooled["examples"]] == ["0", "1", "2", "3"]
    assert [e["outputs"] for e in pooled["examples"]] == [e["outputs"] for e in whole["examples"]]
    for name in ("cloud", "costeer", "light_costeer"):
        p, w = pooled["methods"][name], whole["methods"][name]
        assert p["n"] == w["n"] == 4
        assert (p["rouge1"], p["rougeL"]) == (w["rouge1"], w["rougeL"])
        assert p["rouge1_delta_vs_cloud"]["mean"] == w["rouge1_delta_vs_cloud"]["mean"]


def test_merge_rejects_overlap_mismatch_and_junk(tmp_path):
    data = _data(tmp_path, n=3)
    a = _eval(tmp_path, data, "a.json", "--limit", "2")
    b = _eval(tmp_path, data, "b.json", "--offset", "1")          # row 1 in both
    res = runner.invoke(app, ["eval-steer-merge", str(a), str(b), "--data", str(data)])
    assert "more than one run" in str(res.exception)
    c = _eval(tmp_path, data, "c.json", "--offset", "2", "--max-new-tokens", "3")
    res = runner.invoke(app, ["eval-steer-merge", str(a), str(c), "--data", str(data)])
    assert "different settings: max_new_tokens" in str(res.exception)
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    res = runner.invoke(app, ["eval-steer-merge", str(a), str(junk), "--data", str(data)])
    assert "not an eval-steer JSON" in str(res.exception)
    res = runner.invoke(app, ["eval-steer-merge", str(a), str(tmp_path / "none.json"), "--data", str(data)])
    assert "not found" in str(res.exception)
    res = runner.invoke(app, ["eval-steer", "--data", str(data), "--cloud", "tiny-qwen2", "--local", "tiny-llama",
                              "--offset", "3"])
    assert "no rows after the first 3" in str(res.exception)


def test_merge_compares_kappas_by_value():
    """A hand-written kappa description and the CLI's own agree when the number agrees; another kappa does not."""
    from pocketlm.data.steering import SteerExample
    from pocketlm.errors import DataError
    from pocketlm.eval.steer_eval import merge_runs

    def run(ids, costeer_kappa):
        return {"settings": {"max_new_tokens": 8, "kappas": {"cloud": None, "costeer": costeer_kappa}},
                "methods": {"cloud": {"private": True}, "costeer": {"private": True}},
                "examples": [{"id": i, "outputs": {"cloud": {"text": "a b"}, "costeer": {"text": "a c"}}} for i in ids]}

    exs = [SteerExample(str(i), "q", "p", "a b c", "cogenesis") for i in range(4)]
    doc = merge_runs([run(["0", "1"], "T=20 loop (alpha=2, beta=1, lambda=2, eta=10) == kappa 1.78326"),
                      run(["2", "3"], "T=20 loop == kappa 1.78326")], exs)
    assert doc["methods"]["costeer"]["n"] == 4
    with pytest.raises(DataError, match="different kappas"):
        merge_runs([run(["0", "1"], 1.0), run(["2", "3"], 3.0)], exs)


@pytest.mark.parametrize("spec", ["closed_form@nan", "closed_form@inf", "plausible@-2"])
def test_non_finite_kappa_is_a_clean_error_and_writes_nothing(tmp_path, spec):
    out = tmp_path / "res.json"
    proc = _cli("eval-steer", "--data", str(_data(tmp_path)), "--cloud", "tiny-qwen2", "--local", "tiny-llama",
                "--methods", f"cloud,{spec}", "--json", str(out))
    assert proc.returncode == 2 and "finite number >= 0" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
