"""`--speculate K` on the command line: steer and eval-steer decode the same greedy text with and without it and
record it; `bench spec` runs end to end over the delay proxy and writes its records; bad values exit 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pocketlm.cli import app
from serve_fixtures import IGNORE_UVICORN_WARNINGS

runner = CliRunner()
SECRET = "I am Ann Quist, a baker on Mill Road; I write tersely."


def test_steer_with_speculate_prints_the_same_text(tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(SECRET)
    args = ["steer", "Write a haiku.", "--cloud", "tiny-llama", "--local", "tiny-qwen2", "--context", str(ctx),
            "--max-new-tokens", "16", "--method", "closed_form"]
    plain = runner.invoke(app, args)
    spec = runner.invoke(app, [*args, "--speculate", "4"])
    ahead = runner.invoke(app, [*args, "--speculate", "4", "--draft-ahead", "--overlap"])
    assert plain.exit_code == 0 and spec.exit_code == 0 and ahead.exit_code == 0, ahead.output
    assert spec.stdout == plain.stdout == ahead.stdout


def test_eval_steer_records_speculation(tmp_path):
    rows = [{"id": str(i), "input": f"Write note {i}.", "personalized_input": f"{SECRET}\nWrite note {i}.",
             "output": "A short note."} for i in range(2)]
    data = tmp_path / "cg.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "res.json"
    res = runner.invoke(app, ["eval-steer", "--data", str(data), "--cloud", "tiny-llama", "--local", "tiny-qwen2",
                              "--methods", "cloud,closed_form", "--max-new-tokens", "8", "--speculate", "3",
                              "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["settings"]["speculate"] == 3
    assert doc["methods"]["closed_form"]["drafted_per_token"] > 0
    assert "leak_sent" in doc["methods"]["closed_form"]


@pytest.mark.parametrize("bad", ["-1", "33", "two"])
def test_bad_speculate_exits_2(bad):
    res = runner.invoke(app, ["steer", "Hi.", "--cloud", "tiny-llama", "--local", "tiny-llama", "--speculate", bad])
    assert res.exit_code == 2


def test_bad_bandwidth_is_refused_before_anything_loads():
    res = runner.invoke(app, ["bench", "spec", "--cloud", "tiny-llama", "--local", "tiny-llama", "--mbit", "0"])
    assert res.exit_code == 2 and "--mbit" in res.output


@pytest.mark.filterwarnings(IGNORE_UVICORN_WARNINGS)
def test_bench_spec_runs_over_the_delay_proxy(tmp_path):
    out, png = tmp_path / "spec.json", tmp_path / "spec.png"
    res = runner.invoke(app, ["bench", "spec", "--cloud", "tiny-llama", "--local", "tiny-llama", "--rtt", "0,40",
                              "--ks", "2", "--tokens", "6", "--prompts", "1", "--mbit", "100", "--json", str(out),
                              "--cloud-format", "f32,topk:8", "--repeats", "2",
                              "--plot", str(png)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    recs = doc["records"]
    keys = {"method", "k", "rtt_ms", "tok_s", "tokens_per_round_trip", "acceptance", "bytes_up_per_token",
            "bytes_down_per_token", "identical"}
    assert all(keys <= set(r) for r in recs)
    assert {r["rtt_ms"] for r in recs} == {0, 40}
    assert doc["mbit_s"] == 100
    assert {r["format"] for r in recs} == {"f32", "topk:8"}  # every configuration in both formats
    assert all(len(r["tok_s_runs"]) == 2 and r["tok_s"] in r["tok_s_runs"] for r in recs)
    assert all(r["identical"] for r in recs if r["method"] == "closed_form" and r["format"] == "topk:8")
    assert all(r["identical"] for r in recs if r["method"] == "closed_form")
    spec = next(r for r in recs if r["config"] == "closed_form/spec2" and r["rtt_ms"] == 40)
    assert spec["tokens_per_round_trip"] > 1
    ahead = next(r for r in recs if r["config"] == "closed_form/spec2/ahead" and r["rtt_ms"] == 40)
    assert ahead["ahead"] and ahead["identical"] and ahead["ahead_hit_rate"] is not None
    assert next(r for r in recs if r["config"] == "specsteer/ahead")["identical"]  # the same drafts, written earlier
    assert png.stat().st_size > 0
