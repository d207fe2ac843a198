"""CoSteer: a cloud LLM generates, the device's small LM steers each token with what the private context changes.

Layout (each sub-package imports only the ones listed before it):
  fusion/    the math: closed form, FTRL loop, rules, named methods, guards, the leakage measure
  streams/   the `Stream` protocol and its KV-cached implementations (dynamic, static, the device pair)
  downlink/  truncated (top-k) cloud steps and their certification
  cloud/     cloud backends: in process, the step server's client and wire format, OpenAI-compatible servers
  engine.py  the decode loop (`SteerEngine`), with plan.py (per-generation bookkeeping), overlap.py, vocab.py
  session.py builds an engine from two model specs

The public API is re-exported here, lazily: importing one sub-module (e.g. the server's pool importing
streams.llama_step) does not load the engine and every backend.
"""

import importlib

_API = {
    "DEFAULT_SYSTEM": "engine", "Generation": "engine", "Sampling": "engine", "SteerEngine": "engine",
    "SteerRequest": "engine", "chat_ids": "engine", "GenerateStats": "engine",
    "METHODS": "fusion.methods", "Method": "fusion.methods", "get_method": "fusion.methods",
    "parse_methods": "fusion.methods", "load_engine": "session",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'pocketlm.steer' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
