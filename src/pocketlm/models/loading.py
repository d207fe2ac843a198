"""Load any causal LM as `(model, tokenizer)`: an HF directory, a `.gguf` file, a built-in name, a tiny config.

GGUF files are dequantised by transformers (needs `gguf` + `accelerate`) and converted once into an
ordinary HF directory under the cache, because dequantising takes ~20-50 s while reloading safetensors
takes ~2 s. Nothing is ever fetched from a hub: `HF_HUB_OFFLINE=1` is set before transformers loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..paths import home
from .builtin import BUILTIN_MODELS, builtin_gguf
from .tiny import TINY_MODELS, build_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | None = None) -> torch.device:
    """`None`/"auto" picks CUDA when present; otherwise the named device, checked."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA device is available")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}") from None


def load_model(spec: str, *, device: str | None = None, dtype: str | torch.dtype | None = None, seed: int = 0):
    """Return `(model, tokenizer)` in eval mode on `device` for a model spec.

    spec: `tiny-llama` | `tiny-qwen2` | `tiny-gpt2` | a built-in name (`smollm2-135m`) |
    a directory holding `config.json` | a `.gguf` file.
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if spec in TINY_MODELS:
        model, tok = build_tiny(spec, seed=seed, dtype=dt)
    elif spec in BUILTIN_MODELS:
        model, tok = _load_hf_dir(convert_gguf(builtin_gguf(spec), name=spec), dt)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelLoadError(
                f"model {spec!r} not found: not a file or directory, and not one of the built-in names "
                f"{sorted(BUILTIN_MODELS)} or tiny configs {list(TINY_MODELS)}"
            )
        if path.is_file() and path.suffix == ".gguf":
            model, tok = _load_hf_dir(convert_gguf(path), dt)
        elif path.is_dir():
            model, tok = _load_hf_dir(path, dt)
        else:
            raise ModelLoadError(f"{spec!r} is neither an HF model directory nor a .gguf file")
    model.to(dev)
    model.eval()
    return model, tok


def _load_hf_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}/config.json cannot be read or names an unsupported architecture: {e}") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, local_files_only=True)
    except ValueError as e:
        raise ModelLoadError(f"unsupported architecture in {path}: {e}") from e
    except Exception as e:  # safetensors/torch raise assorted errors on corrupt files
        raise ModelLoadError(f"cannot load weights from {path} (corrupt or incomplete?): {type(e).__name__}: {e}") from e
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {e}") from e
    return model, tok


def _gguf_cache_dir(gguf: Path, name: str | None) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return home() / "models" / (name or f"{gguf.stem}-{key}")


def convert_gguf(gguf: Path, *, name: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantise a GGUF into a cached HF directory (once) and return the directory.

    transformers refuses `save_pretrained` on a GGUF-loaded model ("not serializable"), so the weights are
    copied into a fresh model built from the cleaned config, which saves normally.
    """
    out = _gguf_cache_dir(gguf, name)
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (once; later loads take seconds)", gguf, out)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    except ValueError as e:
        raise ModelLoadError(f"cannot read {gguf}: unsupported architecture or not a GGUF file ({e})") from e
    except Exception as e:  # the gguf reader raises assorted errors on truncated files
        raise ModelLoadError(f"cannot read {gguf} (corrupt or truncated GGUF?): {type(e).__name__}: {e}") from e
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    clean = type(model)(cfg).to(dtype)
    missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion mismatch for {gguf}: missing={missing} unexpected={unexpected}")
    clean.generation_config = model.generation_config
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text(str(gguf))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
