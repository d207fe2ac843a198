"""The step-server wire format, shared by the server (`pocketlm.serve`) and the device client (`remote.py`).

One WebSocket per client. After the handshake the server sends a `hello` (JSON text); then the client sends
JSON text ops and the server answers `open` and `step` with one binary scores frame each:

  up    {"op": "open", "prompts": [[id, ...], ...], "expand": [i, ...] | null, "max_new_tokens": n, "format": "f32"}
        {"op": "step", "ids": [id, ...]}        one chosen id per live row
        {"op": "keep", "rows": [r, ...]}        strictly increasing live-row indices (no reply)
        {"op": "close"}                         end the session (no reply); a new `open` may follow
  down  binary: HEADER (magic, version, format code, rows, cols) + payload; errors: JSON {"error", "code"}

The uplink is token ids and session operations only (the privacy audit test parses every byte of it). The
payload format is named by the client at `open`: full-vocabulary `f32` (exact, the default), `f16` or `bf16`
(half the bytes; greedy choices may flip at near-ties). A top-k downlink is one more format code with its own
payload layout (ids + values); the header already carries the code.
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch

from ..errors import PocketLMError

PROTOCOL = 1
PATH = "/v1/steer"
MAGIC = b"PLMS"
HEADER = struct.Struct("<4sHHII")  # magic, protocol, format code, rows, cols
FORMATS = {"f32": (1, torch.float32), "f16": (2, torch.float16), "bf16": (3, torch.bfloat16)}
_BY_CODE = {code: (name, dtype) for name, (code, dtype) in FORMATS.items()}
OPS = ("open", "step", "keep", "close")


class RemoteCloudError(PocketLMError):
    """The step server refused a request, or the connection to it failed or timed out."""


def is_remote(spec: str) -> bool:
    """A cloud spec naming a step server (http://HOST:PORT) rather than a model."""
    return spec.startswith(("http://", "https://", "ws://", "wss://"))


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the token -> id map (and the specials): equal fingerprints mean the same ids for the same text."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    blob = json.dumps([vocab, special], ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def encode_scores(scores: torch.Tensor, fmt: str) -> bytes:
    """`[B, V]` scores as one binary frame in format `fmt`."""
    code, dtype = FORMATS[fmt]
    rows, cols = scores.shape
    data = scores.detach().to("cpu", dtype).contiguous()
    if dtype == torch.bfloat16:  # numpy has no bf16: send the raw 16-bit words
        data = data.view(torch.int16)
    return HEADER.pack(MAGIC, PROTOCOL, code, rows, cols) + data.numpy().tobytes()


def decode_scores(frame: bytes) -> torch.Tensor:
    """A binary scores frame back to fp32 `[B, V]` scores."""
    if len(frame) < HEADER.size:
        raise RemoteCloudError(f"step server sent a {len(frame)}-byte frame, shorter than a header")
    magic, proto, code, rows, cols = HEADER.unpack_from(frame)
    if magic != MAGIC or proto != PROTOCOL or code not in _BY_CODE:
        raise RemoteCloudError(f"step server sent an unknown frame (magic {magic!r}, protocol {proto}, format {code})")
    _, dtype = _BY_CODE[code]
    width = torch.empty(0, dtype=dtype).element_size()
    if len(frame) != HEADER.size + rows * cols * width:
        raise RemoteCloudError(f"step server sent {len(frame)} bytes for a {rows}x{cols} frame")
    raw = torch.frombuffer(bytearray(frame[HEADER.size:]), dtype=torch.int16 if dtype == torch.bfloat16 else dtype)
    if dtype == torch.bfloat16:
        raw = raw.view(torch.bfloat16)
    return raw.view(rows, cols).float()


def op(name: str, **fields) -> str:
    """One uplink message (compact JSON text)."""
    return json.dumps({"op": name, **fields}, separators=(",", ":"))
