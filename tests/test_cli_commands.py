"""The command line: help lists the commands; per-user perplexity runs; bad input gives a clean error."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from pocketlm.cli import app

runner = CliRunner()


def test_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("demo", "data", "ppl", "prepare", "bench"):
        assert cmd in res.output


def test_ppl_on_folder_corpus(folder_corpus, tmp_path):
    out = tmp_path / "ppl.json"
    res = runner.invoke(app, ["ppl", str(folder_corpus), "--model", "tiny-llama", "--block-len", "16",
                              "--json", str(out)])
    assert res.exit_code == 0, res.output
    ppl = json.loads(out.read_text())
    assert sorted(ppl) == ["alice", "bob", "carol"] and all(v > 1 for v in ppl.values())


def test_data_summary(folder_corpus):
    res = runner.invoke(app, ["data", str(folder_corpus), "--model", "tiny-gpt2", "--scenario", "ood"])
    assert res.exit_code == 0, res.output
    assert "alice" in res.output and "test tokens" in res.output


def test_bad_input_gives_clean_error(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "from pocketlm.cli import main; main()", "ppl",
                           str(tmp_path / "missing"), "--model", "tiny-llama"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr
