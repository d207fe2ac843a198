"""`pocketlm train` and `pocketlm compare` on a tiny model: JSON schema, PNGs, resume, clean errors."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from pocketlm.cli import app

runner = CliRunner()


def _args(folder_corpus, tmp_path):
    sets = {"model": "tiny-gpt2", "corpus": str(folder_corpus), "max_chars": "none", "rounds": 2,
            "local_steps": 1, "batch_size": 2, "seq_len": 16, "router_every": 1, "router_steps": 1,
            "out_dir": str(tmp_path / "runs" / "{strategy}")}
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


def test_compare_writes_json_and_plots(folder_corpus, tmp_path):
    out = tmp_path / "out" / "cmp.json"
    res = runner.invoke(app, ["compare", "--strategies", "1g1s,fedavg,pretrained", "--json", str(out),
                              *_args(folder_corpus, tmp_path)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["scenario"] == "id"
    assert set(doc["strategies"]) == {"1g1s", "fedavg", "pretrained"}
    for s in doc["strategies"].values():
        assert set(s["per_user_ppl"]) == {"alice", "bob", "carol"}
        assert abs(s["mean_ppl"] - sum(s["per_user_ppl"].values()) / 3) < 1e-9
    assert (out.parent / "ppl_vs_round.png").stat().st_size > 1000
    assert (out.parent / "routing_1g1s.png").is_file()
    assert not (out.parent / "routing_fedavg.png").exists()


def test_train_then_resume(folder_corpus, tmp_path):
    args = ["train", "--strategy", "2s", *_args(folder_corpus, tmp_path)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "runs" / "2s" / "checkpoint.pt").is_file()
    assert (tmp_path / "runs" / "2s" / "ppl_vs_round.png").is_file()
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output


def test_bad_config_gives_clean_error(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "from pocketlm.cli import main; main()", "train",
                           "--set", "rounds=lots"], capture_output=True, text=True)
    assert proc.returncode == 2 and "error:" in proc.stderr and "rounds expects int" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-c", "from pocketlm.cli import main; main()", "compare",
                           "--strategies", "1g1s,bogus", "--set", "model=tiny-llama", "--set",
                           f"corpus={tmp_path / 'none'}"], capture_output=True, text=True)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_runs_on_a_tiny_model(folder_corpus, tmp_path):
    res = runner.invoke(app, ["demo", "--model", "tiny-llama", "--corpus", str(folder_corpus), "--rounds", "1",
                              "--local-steps", "1", "--batch-size", "2", "--seq-len", "16", "--out", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "demo" / "compare.json").read_text())
    assert list(doc["strategies"]) == ["pretrained", "1g1s", "local", "fedavg"]
    assert "test perplexity per user" in res.output
    assert "cloud alone:" in res.output and "steered" in res.output and "leak guard" in res.output
