"""Static KV stream (fixed-shape decode steps, CUDA graphs on GPUs) == the dynamic-cache stream: logits per
step, row dropping, growth past the reserved slots, CoMiGS mixture models, and identical steered tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from pocketlm.errors import PocketLMError
from pocketlm.models import build_tiny
from pocketlm.moe import MoEConfig, inject_moe
from pocketlm.steer.cloud.in_process import HFCloudBackend
from pocketlm.steer.engine import SteerEngine, SteerRequest
from pocketlm.steer.fusion.methods import parse_methods
from pocketlm.steer.streams.dynamic import LMStream
from pocketlm.steer.streams.kvmode import make_stream, resolve_kv
from pocketlm.steer.streams.static import StaticLMStream, static_unsupported

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]
EXPAND = [0, 1, 1, 2]  # row 1 and 2 share a prompt (prefilled once)


def tiny_qwen3(seed=0):
    cfg = Qwen3Config(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def family_model(name):
    return tiny_qwen3() if name == "tiny-qwen3" else build_tiny(name, seed=3)[0]


def run(stream, steps, keep_at=None, keep_rows=None):
    """Prefill, then feed each step's argmax back; returns the logits of every call."""
    out = [stream.prefill(PROMPTS, EXPAND)]
    for s in range(steps):
        ids = out[-1].argmax(-1)
        if s == keep_at:
            stream.keep(keep_rows)
            ids = ids[keep_rows]
        out.append(stream.step(ids))
    return out


def assert_same(a, b, tol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        assert (x - y).abs().max().item() < tol
        assert torch.equal(x.argmax(-1), y.argmax(-1))


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_static_equals_dynamic_with_row_dropping(family):
    model = family_model(family)
    keep = torch.tensor([3, 0, 1])  # drop row 2 and reorder
    dyn = run(LMStream(model), 6, keep_at=3, keep_rows=keep)
    sta = run(StaticLMStream(model, graphs=False), 6, keep_at=3, keep_rows=keep)
    assert_same(dyn, sta)


def test_static_grows_past_reserved_slots_and_reuses_buffers():
    model = family_model("tiny-llama")
    stream = StaticLMStream(model, graphs=False, headroom=2)
    dyn = run(LMStream(model), 7)
    assert_same(dyn, run(stream, 7))
    assert stream.capacity >= len(PROMPTS[0]) + 7
    ptr, cap = stream.k[0].data_ptr(), stream.capacity
    stream.release()
    assert_same(run(LMStream(model), 3), run(stream, 3))  # fits: same buffers, no reallocation
    assert stream.k[0].data_ptr() == ptr and stream.capacity == cap


def test_static_stream_runs_a_comigs_mixture_model():
    model = inject_moe(copy.deepcopy(build_tiny("tiny-qwen2", seed=4)[0]), MoEConfig(num_experts=3, top_k=2))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if "lora_B" in n or ".router." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    assert_same(run(LMStream(model), 5), run(StaticLMStream(model, graphs=False), 5))


def test_unsupported_architectures_fall_back_or_fail_clearly():
    gpt2 = build_tiny("tiny-gpt2")[0]
    assert "gpt2" in static_unsupported(gpt2)
    with pytest.raises(PocketLMError, match="static KV decoding does not support"):
        StaticLMStream(gpt2)
    assert isinstance(make_stream(gpt2, kv="auto"), LMStream)
    llama = build_tiny("tiny-llama")[0]
    assert resolve_kv(llama, "auto") == "static" and resolve_kv(gpt2, "auto") == "dynamic"
    assert isinstance(make_stream(llama, kv="static"), StaticLMStream)
    with pytest.raises(PocketLMError, match="kv must be one of"):
        resolve_kv(llama, "paged")
    with pytest.raises(PocketLMError, match="CUDA graphs need a CUDA device"):
        StaticLMStream(llama, graphs=True)


@pytest.mark.parametrize("fused,overlap", [(True, False), (False, False), (True, True)])
def test_engine_tokens_identical_static_vs_dynamic(fused, overlap):
    cloud, tok = build_tiny("tiny-qwen2", seed=1, vocab_size=300)
    device, _ = build_tiny("tiny-llama", seed=2)
    secret = "My private notes: I sail at dawn."
    reqs = [SteerRequest(q, f"{secret}\n\n{q}") for q in ("Hi.", "Tell me about the sea, please.", "Why?")]
    ms = parse_methods("costeer,plausible,light_costeer")
    out = {}
    for kv in ("dynamic", "static"):
        eng = SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok, kv=kv, fuse_device_streams=fused,
                          overlap=overlap)
        first = eng.generate(reqs, ms, max_new_tokens=9)
        again = eng.generate(reqs[:1], ms[:1], max_new_tokens=4)  # reuses the static buffers
        eng.close()
        out[kv] = [g.token_ids for g in first + again]
    assert out["static"] == out["dynamic"]


def test_engine_kv_switch_reaches_the_cloud_backend():
    cloud, tok = build_tiny("tiny-llama", seed=1)
    eng = SteerEngine(HFCloudBackend(cloud, tok), tok, cloud, tok, kv="static")
    assert isinstance(eng.cloud.stream, StaticLMStream)
    eng.kv = "dynamic"
    assert isinstance(eng.cloud.stream, LMStream)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_equals_eager_static():
    model = family_model("tiny-qwen2").cuda()
    keep = torch.tensor([3, 0, 1], device="cuda")
    eager = run(StaticLMStream(model, graphs=False), 6, keep_at=3, keep_rows=keep)
    graphed = StaticLMStream(model, graphs=True)
    assert_same(eager, run(graphed, 6, keep_at=3, keep_rows=keep), tol=1e-4)
    assert sorted(graphed._graphs) == [3, 4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compile", [False, "inductor"])
def test_cuda_graphs_recaptured_after_the_buffers_grow(compile):
    """The H200 failure (allocator `use_count > 0` assert): a longer second generation reallocates the buffers
    and drops the graphs; the next capture must work, with no fallback to eager steps."""
    torch._dynamo.reset()
    model = family_model("tiny-qwen2").cuda()
    stream = StaticLMStream(model, graphs=True, compile=compile)
    first = run(stream, 3)
    stream.reserve(64)
    second = run(stream, 6)
    assert stream.graphs_enabled and stream._graphs
    eager = StaticLMStream(model, graphs=False)
    assert_same(run(eager, 3), first, tol=1e-3)
    assert_same(run(eager, 6), second, tol=1e-3)


def test_failed_graph_capture_falls_back_to_eager_steps(monkeypatch, caplog):
    model = family_model("tiny-llama")
    stream = StaticLMStream(model, graphs=False)
    stream.graphs_enabled = True  # as on a GPU; capture fails the way a synchronising module would make it

    def fail(n):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(stream, "_graph", fail)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    with caplog.at_level("WARNING"):
        got = run(stream, 4)
    assert "decodes without graphs" in caplog.text and not stream.graphs_enabled
    assert_same(run(LMStream(model), 4), got)


def test_compiled_static_step_equals_dynamic():
    """torch.compile traces the step (aot_eager here: no C++ toolchain needed; GPUs use inductor)."""
    torch._dynamo.reset()
    model = family_model("tiny-qwen2")
    stream = StaticLMStream(model, graphs=False, compile="aot_eager")
    keep = torch.tensor([2, 0])
    assert_same(run(LMStream(model), 4, keep_at=1, keep_rows=keep), run(stream, 4, keep_at=1, keep_rows=keep))
    assert isinstance(make_stream(model, kv="compiled"), StaticLMStream)


def test_graph_step_semantics_on_cpu():
    """What a GPU does per new batch size: run the step once (warm-up), record it, replay it — so the step runs
    twice at the same slot, over the full capacity. Both must leave the result unchanged."""
    model = family_model("tiny-qwen3")
    stream = StaticLMStream(model, graphs=False, headroom=3)
    stream.compiled = True  # full-capacity attention, as in a graph

    def warmup_then_replay(n, span):  # a compiled step is warmed up twice before capture: three runs
        for _ in range(2):
            stream._decode(n, span)
        return stream._decode(n, span)

    stream._step_fn = warmup_then_replay
    keep = torch.tensor([1, 3])
    assert_same(run(LMStream(model), 6, keep_at=2, keep_rows=keep), run(stream, 6, keep_at=2, keep_rows=keep))


def test_no_recompile_inside_a_capture():
    """Inside a capture a compiled step must hit its cache; a recompile raises instead of compiling there
    (where inductor's compile-time RNG broke the H200 capture)."""
    from pocketlm.steer.streams.static import _no_recompile

    if not hasattr(torch.compiler, "set_stance"):
        pytest.skip("torch.compiler.set_stance needs torch >= 2.6")
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
    fn(torch.ones(3))
    with _no_recompile(True):
        assert torch.equal(fn(torch.ones(3)), torch.full((3,), 3.0))
        with pytest.raises(Exception, match="(?i)recompil"):
            fn(torch.ones(5))
    with _no_recompile(False):
        fn(torch.ones(7))
