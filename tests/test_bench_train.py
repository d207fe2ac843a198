"""The training-step benchmark runs end to end and writes the documented JSON (speed is not asserted)."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from pocketlm.bench.geometries import GEOMETRIES, load_bench_model
from pocketlm.bench.train_bench import peft_model, saved_activation_bytes
from pocketlm.cli import app
from pocketlm.errors import PocketLMError
from pocketlm.models import build_tiny
from pocketlm.moe import MixtureMLP, MoEConfig, inject_moe, shared_base_view


def test_bench_train_json(tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "train", "--model", "tiny-qwen2", "--experts", "2,4", "--batch", "2",
                                   "--seq", "16", "--steps", "1", "--warmup", "0", "--paths", "fused,fused_recompute,reference",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["single_lora_step_s"] > 0 and doc["peft"]["step_s"] > 0
    assert doc["peft"]["ratio"] == doc["peft"]["step_s"] / doc["single_lora_step_s"]
    assert [(r["experts"], r["path"]) for r in doc["results"]] == [
        (2, "fused"), (2, "fused_recompute"), (2, "reference"), (4, "fused"), (4, "fused_recompute"), (4, "reference")]
    for r in doc["results"]:
        assert r["step_s"] > 0 and r["ratio"] > 0 and r["per_user_bytes"] > doc["single_lora"]["per_user_bytes"]
        assert r["ratio_vs_peft"] == r["step_s"] / doc["peft"]["step_s"]
        assert r["saved_activation_bytes"] > 0
    saved = {(r["experts"], r["path"]): r["saved_activation_bytes"] for r in doc["results"]}
    assert saved[(4, "fused_recompute")] < saved[(4, "fused")] < saved[(4, "reference")]


def test_bench_train_rejects_unknown_path():
    res = CliRunner().invoke(app, ["bench", "train", "--model", "tiny-qwen2", "--paths", "fused,sparse"])
    assert isinstance(res.exception, PocketLMError) and "unknown benchmark path 'sparse'" in str(res.exception)


def test_shared_base_view_shares_weights():
    base, _ = build_tiny("tiny-llama")
    view = shared_base_view(base)
    assert all(a is b for a, b in zip(base.parameters(), view.parameters(), strict=True))


def test_geometry_configs_are_real_sizes():
    cfg = GEOMETRIES["qwen2.5-0.5b-geometry"]()
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size) == (896, 4864, 24, 151936)
    assert GEOMETRIES["qwen2.5-7b-geometry"]().vocab_size == 152064
    model, _ = load_bench_model("tiny-gpt2")
    assert next(model.parameters()).dtype == torch.float32


def test_bench_memory_on_meta_device(tmp_path):
    """Exact activation bytes at a real geometry without allocating: top-k keeps E=8 near E=2, recompute less."""
    out = tmp_path / "mem.json"
    res = CliRunner().invoke(app, ["bench", "memory", "--model", "smollm2-135m-geometry", "--experts", "2,8",
                                   "--batch", "8", "--seq", "128", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    saved = {(r["experts"], r["path"]): r["saved_activation_bytes"] for r in doc["results"]}
    assert doc["weights_bytes"] > 2 * 134e6  # bf16 SmolLM2-135M
    assert saved[(8, "fused")] < 1.05 * saved[(2, "fused")] < saved[(8, "fused_dense")] < saved[(8, "reference")]
    assert saved[(8, "fused_recompute")] < saved[(8, "fused")]
    assert all(r["resident_at_backward_bytes"] > doc["weights_bytes"] + r["saved_activation_bytes"]
               for r in doc["results"])


def test_bench_memory_needs_a_geometry():
    res = CliRunner().invoke(app, ["bench", "memory", "--model", "tiny-llama"])
    assert isinstance(res.exception, PocketLMError) and "geometry" in str(res.exception)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_saved_activation_bytes_retains_no_graph(graph_tensors):
    """The measuring forward must free its graph on return (issue 10: it used to keep every configuration's
    whole forward alive through saved-tensor hooks that returned the tensor itself)."""
    model = inject_moe(build_tiny("tiny-llama")[0], MoEConfig(num_experts=4, path="reference"))
    ids = torch.randint(0, 200, (16, 256), generator=torch.Generator().manual_seed(0))
    saved = saved_activation_bytes(model, ids)  # first call: the allocator's arenas grow once
    assert saved > 50 * 2**20 and graph_tensors() == []
    before = _rss()
    for _ in range(6):
        assert saved_activation_bytes(model, ids) == saved
    assert graph_tensors() == []
    # a leak would add about 2 x `saved` per call (12 x over the loop); the allocator's own arenas may move by
    # about one `saved` in a long test process
    assert _rss() - before < 3 * saved


def test_oom_rows_print_oom_and_json_still_comes_out(tmp_path, monkeypatch):
    """A configuration that runs out of memory (here the single LoRA and the reference path) is one OOM row;
    the table, the other rows and the JSON still come out."""
    forward = MixtureMLP.forward

    def fail(self, x):
        if self.num_experts == 1 or self.path == "reference":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, x)

    monkeypatch.setattr(MixtureMLP, "forward", fail)
    out = tmp_path / "oom.json"
    res = CliRunner().invoke(app, ["bench", "train", "--model", "tiny-llama", "--experts", "2", "--batch", "2",
                                   "--seq", "8", "--steps", "1", "--warmup", "0", "--paths", "fused,reference",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.count("OOM") == 2
    doc = json.loads(out.read_text())
    assert doc["single_lora"]["oom"] and doc["single_lora_step_s"] is None
    fused, ref = doc["results"]
    assert fused["step_s"] > 0 and fused["ratio"] is None and fused["ratio_vs_peft"] > 0
    assert ref["oom"] and ref["step_s"] is None


def test_peft_row_is_the_same_lora_and_leaves_the_base_alone():
    base, _ = build_tiny("tiny-qwen2")
    types = [type(m) for m in base.modules()]
    peft = peft_model(base, rank=8, alpha=16.0)
    ours = inject_moe(shared_base_view(base), MoEConfig(num_experts=1, router=False, rank=8, alpha=16.0))
    trainable = [p.numel() for p in peft.parameters() if p.requires_grad]
    assert sum(trainable) == sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert [type(m) for m in base.modules()] == types  # the wrapped copy changed, not the shared base
    shared = {id(p) for p in base.parameters()}
    assert all(id(p) in shared for p in peft.parameters() if not p.requires_grad)
