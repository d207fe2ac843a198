"""The `serve` and `bench serve` commands: `bench serve` (which runs `pocketlm serve` in a child process) times
every configuration against its in-process baseline and counts bytes per token exactly (header + vocabulary x
bytes per score); `serve` refuses bad limits and architectures it cannot batch, in one line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pocketlm.cli import app
from pocketlm.errors import PocketLMError
from pocketlm.steer.cloud.wire import HEADER
from serve_fixtures import IGNORE_UVICORN_WARNINGS

pytestmark = pytest.mark.filterwarnings(IGNORE_UVICORN_WARNINGS)


def test_bench_serve_writes_rows_ratios_and_bytes(tmp_path):
    out = tmp_path / "serve.json"
    res = CliRunner().invoke(app, ["bench", "serve", "--cloud", "tiny-llama", "--local", "tiny-qwen2", "--tokens", "4",
                                   "--sessions", "3", "--repeats", "1", "--context-tokens", "32", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert {"plain/in_process", "plain/server", "closed_form/server", "sessions/1", "sessions/3"} <= set(rows)
    assert rows["plain/in_process"]["ratio"] == 1.0 and all(r["tok_s"] > 0 for r in rows.values())
    assert rows["closed_form/server"]["down_per_token"] == HEADER.size + 260 * 4   # one f32 frame per token
    assert rows["closed_form/server_f16"]["down_per_token"] == HEADER.size + 260 * 2
    assert 20 < rows["closed_form/server"]["up_per_token"] < 200  # a step op with one id, plus the amortised open
    assert doc["server_metrics"]["pocketlm_sessions"] == "0"


@pytest.mark.parametrize("args, message", [
    (["--model", "tiny-llama", "--slots", "0"], "--slots must be >= 1"),
    (["--model", "tiny-llama", "--ttl", "0"], "--ttl must be > 0"),
    (["--model", "tiny-gpt2"], "Llama / Qwen2 / Qwen3"),
])
def test_serve_refuses_bad_settings(args, message):
    res = CliRunner().invoke(app, ["serve", *args])
    assert isinstance(res.exception, PocketLMError) and message in str(res.exception)
