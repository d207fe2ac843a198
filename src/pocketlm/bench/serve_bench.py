"""Step-server benchmark: the same decoding in process and through a loopback `pocketlm serve`, in one run.

The server runs as a separate process (as deployed: its Python threads do not share the client's GIL) on the
same machine, so on a CPU the two compete for the same cores. Rows (batch 1, EOS ignored, `tokens` tokens):
  plain/in_process           cloud greedy decoding, in-process model (the baseline, ratio 1)
  plain/server               the same through the server (one WebSocket round trip per token)
  closed_form/in_process     steered, in process (overlap off: the CPU-best setting here)
  closed_form/server         steered through the server, overlap on (device steps while the answer travels)
  closed_form/server_no_overlap, closed_form/server_f16 (half the downlink)
  sessions/1, sessions/N     aggregate tokens/s of N concurrent plain sessions vs 1 (continuous batching)
Bytes per token count WebSocket message payloads (open + steps + close) divided by generated tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import numpy as np

from ..errors import PocketLMError
from ..models.vocab import head_rows
from ..progress import progress
from ..steer.cloud.in_process import HFCloudBackend
from ..steer.cloud.remote import RemoteCloud, ws_url
from ..steer.cloud.wire import decode_scores, op
from ..steer.engine import SteerEngine, SteerRequest, chat_ids
from ..steer.fusion.methods import get_method
from .geometries import GEOMETRIES, load_bench_model
from .steer_bench import QUERY, synthetic_context

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`pocketlm serve` in a child process on a free loopback port; stopped (terminate, then kill) on exit."""

    def __init__(self, model: str, *, device: str | None, dtype: str, slots: int, max_new_tokens: int,
                 max_prompt_tokens: int, threads: int | None = None, quantize: str | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["serve", "--model", model, "--port", str(self.port), "--dtype", dtype, "--slots", str(slots),
                "--max-rows", str(min(slots, 64)), "--max-new-tokens", str(max_new_tokens),
                "--max-prompt-tokens", str(max_prompt_tokens)]
        args += ["--device", device] if device else []
        args += ["--threads", str(threads)] if threads else []
        args += ["--quantize", quantize] if quantize else []
        code = f"import sys; from pocketlm.cli import main; sys.argv = ['pocketlm'] + {args!r}; main()"
        env = {**os.environ, "POCKETLM_PROGRESS": "0"}
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:]
                raise PocketLMError(f"step server exited ({self.proc.returncode}): {err}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise PocketLMError(f"step server did not start within {timeout:g} s")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
        self.proc.stderr.close()

    def __enter__(self) -> ServerProcess:
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


async def _plain_session(url: str, prompt: list[int], tokens: int) -> int:
    """One greedy plain-decoding session over the raw protocol (argmax on the client); returns tokens made."""
    from websockets.asyncio.client import connect

    async with connect(ws_url(url), compression=None, proxy=None, max_size=2**31, open_timeout=60) as ws:
        await ws.recv()  # hello
        await ws.send(op("open", prompts=[prompt], expand=None, max_new_tokens=tokens, format="f32"))
        for i in range(tokens):
            scores = decode_scores(await ws.recv())
            if i == tokens - 1:
                break
            await ws.send(op("step", ids=[int(np.argmax(scores.numpy(), axis=-1)[0])]))
        await ws.send(op("close"))
    return tokens


async def _concurrent(url: str, prompt: list[int], tokens: int, n: int) -> float:
    t0 = time.perf_counter()
    made = await asyncio.gather(*(_plain_session(url, prompt, tokens) for _ in range(n)))
    return sum(made) / (time.perf_counter() - t0)


def bench_serve(cloud: str, local: str, *, tokens: int = 32, context_tokens: int = 256, sessions: int = 64,
                repeats: int = 3, device: str | None = None, dtype: str = "float32", threads: int | None = None) -> dict:
    """`threads`: torch threads of the server process (the caller sets its own)."""
    geometry = cloud in GEOMETRIES or local in GEOMETRIES
    cloud_model, cloud_tok = load_bench_model(cloud, device=device, dtype=dtype, seed=0)
    dev_model, dev_tok = load_bench_model(local, device=device, dtype=dtype, seed=1)
    local_engine = SteerEngine(HFCloudBackend(cloud_model, cloud_tok), cloud_tok, dev_model, dev_tok,
                               slice_to_tokenizer=not geometry)
    ctx = synthetic_context(dev_tok, context_tokens)
    req = SteerRequest(QUERY, f"{ctx}\n\n{QUERY}")
    prompt_len = len(chat_ids(dev_tok, req.private))
    doc: dict = {"cloud": cloud, "local": local, "tokens": tokens, "context_tokens": context_tokens,
                 "sessions": sessions, "repeats": repeats, "dtype": dtype, "server_threads": threads, "rows": {}}
    with ServerProcess(cloud, device=device, dtype=dtype, slots=max(sessions, 8), max_new_tokens=tokens + 8,
                       max_prompt_tokens=prompt_len + 64, threads=threads) as server:
        remotes = {fmt: RemoteCloud(server.url, tokenizer=dev_tok, format=fmt, timeout=600) for fmt in ("f32", "f16")}
        engines = {fmt: SteerEngine(r, dev_tok, dev_model, dev_tok, slice_to_tokenizer=not geometry)
                   for fmt, r in remotes.items()}
        configs = [  # name, engine, method, overlap
            ("plain/in_process", local_engine, "cloud", False),
            ("plain/server", engines["f32"], "cloud", False),
            ("closed_form/in_process", local_engine, "closed_form", False),
            ("closed_form/in_process_overlap", local_engine, "closed_form", True),
            ("closed_form/server", engines["f32"], "closed_form", True),
            ("closed_form/server_no_overlap", engines["f32"], "closed_form", False),
            ("closed_form/server_f16", engines["f16"], "closed_form", True),
        ]
        times: dict[str, list[float]] = {name: [] for name, *_ in configs}
        traffic: dict[str, tuple[int, int]] = {}
        for rnd in progress(range(repeats + 1), desc="serve bench rounds", total=repeats + 1):
            for name, eng, method, overlap in configs:
                eng.overlap = overlap
                r = remotes["f16" if eng is engines["f16"] else "f32"] if eng is not local_engine else None
                up0, down0 = (r.bytes_up, r.bytes_down) if r else (0, 0)
                n = 4 if rnd == 0 else tokens
                out = eng.generate([req], [get_method(method)], max_new_tokens=n, ignore_eos=True)
                if rnd > 0:
                    times[name].append(out.stats.timings["decode_s"])
                    if r:
                        traffic[name] = ((r.bytes_up - up0) // tokens, (r.bytes_down - down0) // tokens)
        for eng in (local_engine, *engines.values()):
            eng.close()
        for r in remotes.values():
            r.close()
        tok_s = {name: (tokens - 1) / statistics.median(t) for name, t in times.items()}
        base = {"plain": tok_s["plain/in_process"], "closed_form": tok_s["closed_form/in_process"]}
        for name, v in tok_s.items():
            row = {"tok_s": v, "ratio": v / base[name.split("/")[0]]}
            if name in traffic:
                row["up_per_token"], row["down_per_token"] = traffic[name]
            doc["rows"][name] = row
        prompt = chat_ids(dev_tok, QUERY)
        agg = {}
        for n in (1, sessions):
            runs = [asyncio.run(_concurrent(server.url, prompt, tokens, n)) for _ in range(max(1, repeats - 1))]
            agg[n] = statistics.median(runs)
        doc["rows"]["sessions/1"] = {"tok_s": agg[1], "ratio": 1.0}
        doc["rows"][f"sessions/{sessions}"] = {"tok_s": agg[sessions], "ratio": agg[sessions] / agg[1]}
        doc["server_metrics"] = _idle_metrics(server)
    doc["vocab_rows"] = head_rows(cloud_model)
    doc["device"] = str(next(dev_model.parameters()).device)
    log.info("serve bench: %s", json.dumps({k: round(v["tok_s"], 2) for k, v in doc["rows"].items()}))
    return doc


def _idle_metrics(server, timeout: float = 5.0) -> dict[str, str]:
    """The server's metrics once the clients' disconnects have been handled (they are asynchronous: read at once,
    a just-closed connection can still count as a session), or after `timeout` seconds as they are."""
    deadline = time.monotonic() + timeout
    while True:
        m = {k: v for k, v in (ln.split(" ", 1) for ln in server.metrics().splitlines()
                               if ln and not ln.startswith("#"))}
        if m.get("pocketlm_sessions") == "0" or time.monotonic() > deadline:
            return m
        time.sleep(0.05)
