"""The bounded benchmark suite (`pocketlm bench gpu`): runs on a CPU at tiny sizes with only the GPU machine's
packages importable, isolates each configuration in a process with a watchdog, and reports every outcome."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pocketlm.bench import gpu_suite
from pocketlm.errors import PocketLMError

SRC = Path(__file__).resolve().parents[1] / "src"
ABSENT_ON_GPU_MACHINE = ("gguf", "rouge_score", "nltk", "matplotlib")


def test_suite_runs_on_cpu_without_the_packages_the_gpu_machine_lacks(tmp_path):
    """End to end through the CLI, every child process included, with gguf / rouge-score / nltk / matplotlib
    made unimportable (the H200 machine has none of them and nothing can be installed there)."""
    stubs = tmp_path / "stubs"
    for name in ABSENT_ON_GPU_MACHINE:
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ImportError('{name} is absent on the GPU machine')\n")
    out = tmp_path / "suite.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stubs), str(SRC)]), "POCKETLM_PROGRESS": "0"}
    res = subprocess.run([sys.executable, "-c", "from pocketlm.cli import main; main()", "bench", "gpu", "--size",
                          "tiny", "--kv", "dynamic,hf_static", "--device", "cpu", "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["hardware"]["torch"] and doc["suite"]["experts"] == [2]
    rows = {r["config"]: r for r in doc["train"]}
    assert [r["status"] for r in doc["train"]] == ["ok"] * 3, doc["train"]
    assert rows["single"]["step_s"] > 0 and rows["single"]["ratio"] == 1.0
    assert rows["mixture"]["ratio_vs_peft"] == rows["mixture"]["step_s"] / rows["peft"]["step_s"]
    dyn = doc["steer"]["dynamic"]
    assert dyn["status"] == "ok" and dyn["plain_tok_s"] > 0 and dyn["plain_vs_dynamic"] == 1.0
    assert set(dyn["methods"]) == {"closed_form", "closed_form/unbatched_device", "closed_form/overlap"}
    hf = doc["steer"]["hf_static"]  # transformers' own generate: StaticCache vs its DynamicCache
    assert hf["status"] == "ok" and hf["static_tok_s"] > 0 and hf["dynamic_tok_s"] > 0 and hf["plain_vs_dynamic"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| tiny-llama | 2 | fused |" in md and "| dynamic | closed_form |" in md


def test_a_configuration_past_its_time_limit_is_killed_and_reported():
    t0 = time.perf_counter()
    outcome = gpu_suite.run_job({"kind": "train"}, timeout=0.2)  # cannot even import torch in 0.2 s
    assert outcome["status"] == "timeout" and "0 s" in outcome["error"]
    assert time.perf_counter() - t0 < 30


def test_a_crashing_configuration_is_an_error_row():
    outcome = gpu_suite.run_job({"kind": "train", "model": "no-such-model", "device": "cpu", "dtype": "float32",
                                 "config": "single", "batch": 1, "seq": 4, "steps": 1, "warmup": 0}, timeout=120)
    assert outcome["status"] == "error" and "no-such-model" in outcome["error"]


def test_spent_budget_skips_and_every_status_renders(monkeypatch):
    s = gpu_suite.size("tiny", budget=0.0)
    doc = gpu_suite.run_suite(s, "cpu")  # nothing starts: no process is spawned
    assert {r["status"] for r in doc["train"]} == {"skipped"}
    assert {m["status"] for m in doc["steer"].values()} == {"skipped"}
    done = [({"kind": "train", "model": "m", "config": c, "experts": e, "path": p},
             {"status": st, "seconds": 1.0, "error": err, "result": res})
            for c, e, p, st, err, res in [
                ("single", 1, "single", "ok", None, {"step_s": 0.2}),
                ("peft", 1, "peft", "ok", None, {"step_s": 0.25}),
                ("mixture", 8, "reference", "oom", None, {"step_s": None, "oom": True}),
                ("mixture", 8, "fused", "timeout", "no result within 40 s", None)]]
    rows = gpu_suite._train_rows(done)
    assert rows[1]["ratio"] == pytest.approx(1.25) and rows[0]["ratio_vs_peft"] == pytest.approx(0.8)
    assert rows[2]["ratio"] is None
    md = gpu_suite.markdown({**doc, "train": rows})
    assert "| OOM |" in md and "timeout: no result within 40 s" in md and "skipped" in md


def test_bad_sizes_are_rejected():
    with pytest.raises(PocketLMError, match="unknown suite size"):
        gpu_suite.size("huge")
    with pytest.raises(PocketLMError, match="sparse"):
        gpu_suite.size("tiny", paths=("sparse",))
