"""Shared builders for the eval-steer-overlay tests: a tiny CoGenesis-style data file and an eval-steer run."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from pocketlm.cli import app


def cogenesis_file(tmp_path, context: str, rows: int, output: str):
    """`rows` CoGenesis-style rows whose private input is `context` + a short query; the path of the JSONL."""
    data = [{"id": f"r{i}", "input": f"Write note {i}.", "personalized_input": f"{context}\nWrite note {i}.",
             "output": output} for i in range(rows)]
    path = tmp_path / "cg.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in data) + "\n")
    return path


def eval_steer(data, out, *extra) -> dict:
    """`eval-steer` of cloud and closed_form@1 on tiny models, 5 tokens; its JSON."""
    res = CliRunner().invoke(app, ["eval-steer", "--data", str(data), "--cloud", "tiny-qwen2", "--local", "tiny-llama",
                                   "--methods", "cloud,closed_form@1", "--max-new-tokens", "5", "--json", str(out),
                                   *extra])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())
