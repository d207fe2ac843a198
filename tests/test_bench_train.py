"""The training-step benchmark runs end to end and writes the documented JSON (speed is not asserted)."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from pocketlm.bench.geometries import GEOMETRIES, load_bench_model
from pocketlm.cli import app
from pocketlm.errors import PocketLMError
from pocketlm.models import build_tiny
from pocketlm.moe import shared_base_view


def test_bench_train_json(tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "train", "--model", "tiny-qwen2", "--experts", "2,4", "--batch", "2",
                                   "--seq", "16", "--steps", "1", "--warmup", "0", "--paths", "fused,fused_recompute,reference",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["single_lora_step_s"] > 0
    assert [(r["experts"], r["path"]) for r in doc["results"]] == [
        (2, "fused"), (2, "fused_recompute"), (2, "reference"), (4, "fused"), (4, "fused_recompute"), (4, "reference")]
    for r in doc["results"]:
        assert r["step_s"] > 0 and r["ratio"] > 0 and r["per_user_bytes"] > doc["single_lora"]["per_user_bytes"]
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
