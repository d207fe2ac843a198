"""Steering through the step server decodes exactly what the in-process engine decodes (greedy), for a batch of
methods with shared prompts and rows that stop early; `pocketlm steer --cloud http://...` matches the in-process
CLI; a device whose tokenizer differs from the server's is refused."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pocketlm.cli import app
from pocketlm.models import load_model, tiny_tokenizer
from pocketlm.steer.cloud.in_process import HFCloudBackend
from pocketlm.steer.cloud.remote import RemoteCloud
from pocketlm.steer.cloud.wire import RemoteCloudError
from pocketlm.steer.engine import SteerEngine, SteerRequest
from pocketlm.steer.fusion.methods import parse_methods
from serve_fixtures import IGNORE_UVICORN_WARNINGS, TOKEN, start_server

pytestmark = pytest.mark.filterwarnings(IGNORE_UVICORN_WARNINGS)
SECRET = "I am Ann Quist, a baker on Mill Road; I write tersely."


def requests() -> list[SteerRequest]:
    qs = ["Write a haiku.", "Tell me about the sea, please, in some detail.", "Why?"]
    return [SteerRequest(q, f"{SECRET}\n\n{q}") for q in qs]


@pytest.mark.parametrize("overlap", [True, False])
def test_server_tokens_equal_in_process(serve_pair, overlap):
    cloud, device, tok = serve_pair
    ms = parse_methods("cloud,closed_form,costeer,plausible,adaptive,ada_costeer")
    reqs = [r for r in requests() for _ in range(2)][: len(ms)]  # shared prompts: the server expands them
    local = SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok).generate(reqs, ms, max_new_tokens=24)
    with start_server(cloud, tok) as srv, RemoteCloud(srv.url, TOKEN, tokenizer=tok) as rc:
        engine = SteerEngine(rc, tok, device, tok, overlap=overlap)
        remote = engine.generate(reqs, ms, max_new_tokens=24)
        again = engine.generate(reqs[:2], ms[:2], max_new_tokens=24)  # a second session on the same socket
        engine.close()
    assert [g.token_ids for g in remote] == [g.token_ids for g in local]
    assert [g.finish for g in remote] == [g.finish for g in local]
    assert {g.finish for g in local} == {"eos", "length"}  # some rows stopped early, some ran to the end
    assert [g.token_ids for g in again] == [g.token_ids for g in local[:2]]


def test_device_with_another_tokenizer_is_refused(serve_server):
    other = tiny_tokenizer()
    other.add_tokens(["<|extra|>"])
    with pytest.raises(RemoteCloudError, match="tokenizer"):
        RemoteCloud(serve_server.url, TOKEN, tokenizer=other)


def test_cli_steer_with_cloud_url_matches_in_process(tmp_path, monkeypatch):
    cloud, tok = load_model("tiny-llama")  # what `--cloud tiny-llama` loads in process
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(SECRET)
    runner = CliRunner()
    args = ["--local", "tiny-qwen2", "--context", str(ctx), "--max-new-tokens", "12", "--method", "closed_form"]
    here = runner.invoke(app, ["steer", "Write a haiku.", "--cloud", "tiny-llama", *args])
    assert here.exit_code == 0, here.output
    with start_server(cloud, tok) as srv:
        monkeypatch.setenv("POCKETLM_CLOUD_TOKEN", TOKEN)
        there = runner.invoke(app, ["steer", "Write a haiku.", "--cloud", srv.url, *args])
        monkeypatch.setenv("POCKETLM_CLOUD_TOKEN", "wrong")
        refused = runner.invoke(app, ["steer", "Write a haiku.", "--cloud", srv.url, *args])
    assert there.exit_code == 0, there.output
    assert there.stdout == here.stdout and len(here.stdout) == 13  # 12 tokens (tiny byte tokens) + newline
    assert refused.exit_code != 0 and isinstance(refused.exception, RemoteCloudError)


@pytest.mark.parametrize("fmt,ahead", [("f32", False), ("topk", False), ("f32", True), ("topk", True)])
def test_speculative_steering_through_the_server_equals_in_process(serve_pair, fmt, ahead):
    """`verify` (T ids per row up, T score rows down) and `rewind` decode exactly the sequential tokens, in the
    dense and the certified top-k format (asks about a verified position carry `position`), with and without
    the next draft written during the verify."""
    from pocketlm.steer.cloud.remote import RemoteTopK
    from pocketlm.steer.speculative import Speculation

    cloud, device, tok = serve_pair
    ms = parse_methods("cloud,closed_form,plausible,ada_costeer")
    reqs = [r for r in requests() for _ in range(2)][: len(ms)]
    local = SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok).generate(reqs, ms, max_new_tokens=20)
    client = RemoteTopK if fmt == "topk" else RemoteCloud
    kw = {"k": 3} if fmt == "topk" else {}
    with start_server(cloud, tok) as srv, client(srv.url, TOKEN, tokenizer=tok, **kw) as rc:
        engine = SteerEngine(rc, tok, device, tok, overlap=True, speculate=Speculation(3, ahead=ahead))
        remote = engine.generate(reqs, ms, max_new_tokens=20)
        engine.close()
    assert [g.token_ids for g in remote] == [g.token_ids for g in local]
    assert [g.finish for g in remote] == [g.finish for g in local]
    assert remote.stats.speculation["drafted"] > 0
