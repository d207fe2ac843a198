"""A small OpenAI-compatible `/v1/completions` server over an HF model, for tests/test_openai_cloud.py.

Real semantics, computed from the model (no canned answers): token-id and text prompts, `max_tokens`
greedy tokens, `logprobs=N` top log-probs per position keyed by the decoded token string (a dict, so two ids
with one string collapse and the lower value wins, as in llama-cpp-python) or by `token_id:N` when
`return_tokens_as_token_ids` is set (vLLM), `echo` with the prompt's own log-probs, `logit_bias` applied to
the sampler only. `llama_style` renders tokens as llama-cpp-python does (special tokens as "", partial UTF-8
dropped) and answers no log-probs when its greedy token ends the text. `echo_after` echoes as llama-cpp-python 0.3
does: at token i the distribution *after* it, only the tokens it evaluated (the prompt, not the completion's last
token). Faults for the error tests:
`fault` = "500" | "malformed" | "nologprobs" | "slow" | "drop_once" (close the connection without an answer, once).
A stdlib `ThreadingHTTPServer` on 127.0.0.1, stopped by `close()`.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class CompletionsModel:
    """The completion semantics, apart from HTTP."""

    def __init__(self, model, tokenizer, *, max_logprobs: int = 50, ids_prompts: bool = True,
                 llama_style: bool = False, echo_after: bool = False):
        self.model, self.tok = model, tokenizer
        self.echo_after = echo_after
        self.max_logprobs, self.ids_prompts, self.llama_style = max_logprobs, ids_prompts, llama_style
        self.special = set(tokenizer.all_special_ids)
        self.eos = {tokenizer.eos_token_id}
        self._lock = threading.Lock()

    @torch.inference_mode()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """`[len(ids), V]` log-probs: row j is the distribution of the token after ids[:j+1]."""
        with self._lock:
            logits = self.model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, -1)

    def piece(self, i: int, as_ids: bool) -> str:
        if as_ids:
            return f"token_id:{i}"
        if self.llama_style:
            return "" if i in self.special else self.tok.decode([i]).replace("\ufffd", "")
        return self.tok.decode([i], skip_special_tokens=False)

    def top(self, row: torch.Tensor, n: int, actual: int, as_ids: bool) -> dict[str, float]:
        vals, idx = row.topk(n)
        top = {self.piece(int(i), as_ids): float(v) for v, i in zip(vals, idx, strict=True)}
        top[self.piece(actual, as_ids)] = float(row[actual])
        return top

    def complete(self, body: dict) -> tuple[int, dict]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            if not self.ids_prompts:
                return 422, {"detail": [{"loc": ["body", "prompt"], "msg": "Input should be a valid string"}]}
            ids = list(prompt)
        elif isinstance(prompt, str):
            ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        else:
            return 400, {"error": {"message": "prompt must be a string or a list of token ids"}}
        n = body.get("logprobs")
        if n is not None and n > self.max_logprobs:
            return 400, {"error": {"message": f"Requested logprobs of {n}, which is greater than max allowed: "
                                              f"{self.max_logprobs}"}}
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        bias = {int(k): float(v) for k, v in (body.get("logit_bias") or {}).items()}
        seq, finish = list(ids), "length"
        for _ in range(int(body.get("max_tokens", 16))):
            nxt = self.logprobs(seq)[-1].clone()
            for i, b in bias.items():
                nxt[i] += b
            t = int(nxt.argmax())
            if t in self.eos:
                finish = "stop"
                if self.llama_style:  # llama-cpp-python keeps no end token, so it has no log-probs for it
                    break
            seq.append(t)
            if finish == "stop":
                break
        echo = bool(body.get("echo"))
        start = 0 if echo else len(ids)
        choice = {"index": 0, "text": self.tok.decode(seq[start:] if echo else seq[len(ids):]),
                  "finish_reason": finish, "logprobs": None}
        if n is not None and echo and self.echo_after:
            lp = self.logprobs(seq)
            shown = seq[:len(seq) - 1] if len(seq) > len(ids) else seq  # the completion's last token is not evaluated
            choice["logprobs"] = {"tokens": [self.piece(t, as_ids) for t in shown],
                                  "token_logprobs": [None] + [float(lp[j, t]) for j, t in enumerate(shown)][1:],
                                  "top_logprobs": [None] + [self.top(lp[j], n, t, as_ids) for j, t in enumerate(shown)][1:],
                                  "text_offset": [len(self.tok.decode(shown[:j])) for j in range(len(shown))]}
        elif n is not None:
            lp = self.logprobs(seq)
            tokens = [self.piece(t, as_ids) for t in seq[start:]]
            values = [None if j == 0 else float(lp[j - 1, seq[j]]) for j in range(start, len(seq))]
            tops = [None if j == 0 else self.top(lp[j - 1], n, seq[j], as_ids) for j in range(start, len(seq))]
            offsets = [len(self.tok.decode(seq[start:j])) for j in range(start, len(seq))]
            choice["logprobs"] = {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                                  "text_offset": offsets}
        return 200, {"object": "text_completion", "model": "tiny", "choices": [choice],
                     "usage": {"prompt_tokens": len(ids), "completion_tokens": len(seq) - len(ids)}}


class OpenAIServer:
    """`CompletionsModel` behind HTTP on a free loopback port. `fault` changes the answers for error tests;
    `requests` counts completions served; `api_key` (if set) is required as a bearer token."""

    def __init__(self, model, tokenizer, *, api_key: str | None = None, **kw):
        self.core = CompletionsModel(model, tokenizer, **kw)
        self.fault: str | None = None
        self.api_key = api_key
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, payload: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _authorized(self) -> bool:
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self._send(401, b'{"error": {"message": "invalid api key"}}')
                    return False
                return True

            def do_GET(self):
                if not self._authorized():
                    return
                if self.path != "/v1/models":
                    return self._send(404, b'{"error": "not found"}')
                self._send(200, json.dumps({"object": "list", "data": [{"id": "tiny-llama", "object": "model"}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not self._authorized():
                    return
                if self.path != "/v1/completions":
                    return self._send(404, b'{"error": "not found"}')
                server.requests += 1
                fault = server.fault
                if fault == "500":
                    return self._send(500, b"Internal Server Error")
                if fault == "malformed":
                    return self._send(200, b'{"choices": [')
                if fault == "slow":
                    time.sleep(3)
                if fault == "drop_once":  # as a server closing a kept-alive connection the client just reused
                    server.fault = None
                    self.close_connection = True
                    return
                code, doc = server.core.complete(body)
                if fault == "nologprobs" and code == 200:
                    doc["choices"][0]["logprobs"] = None
                self._send(code, json.dumps(doc).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)
