"""The step-server wire format, shared by the server (`pocketlm.serve`) and the device client (`remote.py`).

One WebSocket per client. After the handshake the server sends a `hello` (JSON text); then the client sends
JSON text ops and the server answers `open` and `step` with one binary scores frame each:

  up    {"op": "open", "prompts": [[id, ...], ...], "expand": [i, ...] | null, "max_new_tokens": n, "format": "f32"}
        {"op": "open", ..., "format": "topk", "topk": k, "columns": n}   the certified top-k downlink
        {"op": "step", "ids": [id, ...]}        one chosen id per live row
        {"op": "verify", "ids": [[id, ...], ...]}   T ids per live row (a chosen id + a draft): T score rows each
        {"op": "verify", ..., "candidates": [[[id, ...] x T] per row]}   topk only: ids to score exactly per position
        {"op": "rewind", "drop": [d, ...]}      forget each live row's last d ids (a rejected draft; no reply)
        {"op": "keep", "rows": [r, ...]}        strictly increasing live-row indices (no reply)
        {"op": "exact", "rows": [r, ...], "ids": [[id, ...], ...]}   topk only: this step's exact logits of a few ids
        {"op": "more", "rows": [r, ...], "depth": d}   topk only: this step's d best ids (a top-k frame)
        {"op": "full", "rows": [r, ...]}        topk only: this step's full rows (exact sampling)
        exact / more / full take "position": j to ask about position j of the last verify instead of the step
        {"op": "close"}                         end the session (no reply); a new `open` may follow
  down  binary: HEADER (magic, version, format code, rows, cols) + payload; errors: JSON {"error", "code"}

The uplink is token ids and session operations only (the privacy audit test parses every byte of it). The
payload format is named by the client at `open`: full-vocabulary `f32` (exact, the default), `f16` or `bf16`
(half the bytes; greedy choices may flip at near-ties), or `topk`: per row the k best ids (int32) and their
logits (f32) over the first `columns` columns, then the (k+1)-th logit (the bound no other id exceeds) and the
row's logsumexp (f32), about 8k + 8 bytes per row instead of 4V. A verify's frame holds B*T rows, live row
i's position j at row i*T + j; in the top-k format each position lists k + 1 ids: the k best and the draft token
sent after it (exactly scored, so accepting it needs no `exact` ask), or the k + 1 best when the draft is among
them (the bound is then the (k + 2)-th), plus the position's `candidates` (up to MAX_CANDIDATES ids the device
expects to need, exactly scored; short lists are padded with the id `columns`, which the client drops). The
device certifies its greedy choice from
that and asks `exact` for the few ids it cannot rule out (`steer/certify.py`); answers to `exact` / `full` are
`f32` frames (`exact`: one row of all asked ids in order).
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch

from ...errors import PocketLMError
from ..downlink.topk import TopKLogits

PROTOCOL = 1
PATH = "/v1/steer"
MAGIC = b"PLMS"
HEADER = struct.Struct("<4sHHII")  # magic, protocol, format code, rows, cols
FORMATS = {"f32": (1, torch.float32), "f16": (2, torch.float16), "bf16": (3, torch.bfloat16)}
_BY_CODE = {code: (name, dtype) for name, (code, dtype) in FORMATS.items()}
TOPK, TOPK_CODE, MAX_TOPK = "topk", 4, 4096
OPS = ("open", "step", "verify", "rewind", "keep", "exact", "more", "full", "close")
MAX_VERIFY = 33  # ids per row in one verify: a chosen token and a draft of up to 32
MAX_CANDIDATES = 1024  # ids per verified position whose exact scores a top-k verify may ask for up front
OLD_MAX_CANDIDATES = 32  # what a server whose hello does not say `max_candidates` takes
# hello `features`: after a rewind that follows a verify, asks without a position read each row's newest kept row
LAST_AFTER_REWIND = "last_after_rewind"


class RemoteCloudError(PocketLMError):
    """The step server refused a request, or the connection to it failed or timed out."""


def is_remote(spec: str) -> bool:
    """A cloud spec naming a step server (http://HOST:PORT) rather than a model."""
    return spec.startswith(("http://", "https://", "ws://", "wss://"))


def topk_of(fmt: str, default: int = 64) -> tuple[int, bool]:
    """(K, ask) of a `topk`, `topk:K` or `topk:K:noexact` format name (the CLI's `--cloud-format`). `noexact`:
    never send candidate ids up; a step the top-k cannot certify takes the best known token (counted)."""
    parts = fmt.split(":")
    k, flag = (parts + ["", ""])[1:3]
    if parts[0] != TOPK or len(parts) > 3 or (k and not k.isdigit()) or flag not in ("", "noexact"):
        raise RemoteCloudError(f"unknown score format {fmt!r}; use f32, f16, bf16, topk, topk:K or topk:K:noexact")
    return (int(k) if k else default), flag != "noexact"


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


def encode_topk(top: TopKLogits) -> bytes:
    """A `TopKLogits` as one binary frame: ids int32 `[B, k]`, scores f32 `[B, k]`, bound f32 `[B]`, lse f32 `[B]`."""
    rows, k = top.ids.shape
    parts = [top.ids.to("cpu", torch.int32), top.scores.to("cpu", torch.float32), top.bound.to("cpu", torch.float32),
             top.lse.to("cpu", torch.float32)]
    return HEADER.pack(MAGIC, PROTOCOL, TOPK_CODE, rows, k) + b"".join(t.contiguous().numpy().tobytes() for t in parts)


def _decode_topk(frame: bytes, rows: int, k: int) -> TopKLogits:
    if len(frame) != HEADER.size + rows * (8 * k + 8):
        raise RemoteCloudError(f"step server sent {len(frame)} bytes for a {rows}x{k} top-k frame")
    body = bytearray(frame[HEADER.size:])
    n = rows * k
    ids = torch.frombuffer(body, dtype=torch.int32, count=n).view(rows, k).long()
    vals = torch.frombuffer(body, dtype=torch.float32, count=n + 2 * rows, offset=4 * n)
    return TopKLogits(ids, vals[:n].view(rows, k), vals[n:n + rows], vals[n + rows:])


def decode_scores(frame: bytes) -> torch.Tensor | TopKLogits:
    """A binary scores frame back to fp32 `[B, V]` scores (or a `TopKLogits` for a top-k frame)."""
    if len(frame) < HEADER.size:
        raise RemoteCloudError(f"step server sent a {len(frame)}-byte frame, shorter than a header")
    magic, proto, code, rows, cols = HEADER.unpack_from(frame)
    if magic == MAGIC and proto == PROTOCOL and code == TOPK_CODE:
        return _decode_topk(frame, rows, cols)
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
