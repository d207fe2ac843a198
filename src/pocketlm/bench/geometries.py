"""Randomly initialised models with real geometries, for speed and memory benchmarks (no weights needed)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from ..errors import ModelLoadError
from ..models import load_model, tiny_tokenizer

GEOMETRIES = {
    "smollm2-135m-geometry": lambda: LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0),
    "qwen2.5-0.5b-geometry": lambda: Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen2.5-7b-geometry": lambda: Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=32768, tie_word_embeddings=False, rope_theta=1000000.0),
}


def load_bench_model(spec: str, *, device: str | None = None, dtype: str | torch.dtype | None = None, seed: int = 0):
    """A geometry name builds a random model directly on the device (with a byte tokenizer: ids are random
    anyway); anything else goes through `pocketlm.models.load_model`."""
    if spec not in GEOMETRIES:
        return load_model(spec, device=device, dtype=dtype, seed=seed)
    from ..models import resolve_device, resolve_dtype

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    try:
        with torch.device(dev), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(GEOMETRIES[spec](), dtype=dt)
    except torch.OutOfMemoryError as e:
        raise ModelLoadError(f"{spec} does not fit on {dev}: {e}") from e
    model.eval()
    return model, tiny_tokenizer()
