"""Tiny randomly initialised models built from configs: milliseconds to build, no files, real code paths.

Tests and benchmarks use these instead of downloads. The tokenizer is a real byte-level BPE (no merges)
built in memory, so every text round-trips and chat templates work exactly as with real models.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from ..errors import ModelLoadError

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
BYTE_VOCAB = 256
TINY_VOCAB = BYTE_VOCAB + len(SPECIAL_TOKENS)  # 260

# A ChatML template like Qwen's and SmolLM2's, so chat-prompt code paths run on tiny models too.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 256 byte tokens + 4 specials (eos, im_start, im_end, pad)."""
    byte_map = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_map))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _config(name: str, vocab_size: int, layers: int, hidden: int):
    tok_ids = dict(bos_token_id=256, eos_token_id=258, pad_token_id=259)
    if name == "tiny-llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            tie_word_embeddings=True, **tok_ids,
        )
    if name == "tiny-qwen2":
        return Qwen2Config(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            tie_word_embeddings=False, **tok_ids,
        )
    if name == "tiny-gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_inner=4 * hidden, n_layer=layers, n_head=4,
            n_positions=2048, **tok_ids,
        )
    raise ModelLoadError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_MODELS)}")


TINY_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-gpt2")


def build_tiny(
    name: str,
    *,
    seed: int = 0,
    vocab_size: int | None = None,
    layers: int = 2,
    hidden: int = 64,
    dtype: torch.dtype = torch.float32,
):
    """Return `(model, tokenizer)` for a tiny random model.

    `vocab_size` may exceed the tokenizer's 260 ids to mimic padded LM heads (Qwen 7B: 152,064 rows vs
    151,936 for 0.5B), which the vocabulary-alignment code must slice away.
    """
    cfg = _config(name, vocab_size or TINY_VOCAB, layers, hidden)
    if (vocab_size or TINY_VOCAB) < TINY_VOCAB:
        raise ModelLoadError(f"vocab_size {vocab_size} is smaller than the tiny tokenizer ({TINY_VOCAB})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    return model, tiny_tokenizer()
