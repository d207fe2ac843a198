"""OpenAI-compatible cloud benchmark: steering through a real `/v1/completions` server (llama.cpp by default).

`LlamaServer` starts llama-cpp-python's OpenAI-compatible server on a free loopback port (a child process in
its own process group, stopped on exit). The device steers the same requests greedily with each method, once
per top-K: per K, the share of cloud rows the top-K alone certified, the exact log-probs the device had to
ask for (wider answers and echo requests), rows left uncertified, requests, bytes up and down and wall time
per generated token, the mean round trip per request (all, and the step requests alone), the rows whose choice
left out ids no answer could name, and how many generations equal the widest K's.

With `speculate=K` each top-K also runs speculative steering (K drafted tokens per verify) with both verify
modes (openai_verify.py: `parallel`, `echo`): tok/s, tokens per round trip and whether the tokens equal the
sequential run of the same top-K. `rtt_ms` puts `serve.wan.DelayProxy` between the device and the server (every
chunk held RTT/2 each way), so a round trip costs what a WAN charges.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import PocketLMError
from ..models.builtin import BUILTIN_MODELS, builtin_gguf
from ..progress import progress
from ..serve.wan import DelayProxy
from ..steer.cloud.openai import OpenAICloud
from ..steer.downlink.certify import DownlinkStats
from ..steer.engine import SteerEngine, SteerRequest
from ..steer.fusion.methods import parse_methods
from ..steer.speculative import Speculation
from .downlink_bench import REQUESTS
from .geometries import load_bench_model
from .serve_bench import _free_port

VERIFY_CONFIGS = ("parallel", "echo")

log = logging.getLogger(__name__)


class LlamaServer:
    """`python -m llama_cpp.server` serving a GGUF (a path or a built-in name such as `smollm2-135m`) on a free
    loopback port with `--logits_all true` (log-probs need every position's logits)."""

    def __init__(self, model: str, *, n_ctx: int = 2048, threads: int | None = None):
        path = builtin_gguf(model) if model in BUILTIN_MODELS else Path(model)
        if not path.is_file():
            raise PocketLMError(f"no GGUF file at {path}")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host", "127.0.0.1",
                "--port", str(self.port), "--n_ctx", str(n_ctx), "--logits_all", "true"]
        args += ["--n_threads", str(threads)] if threads else []
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def _tail(self) -> str:
        self._log.seek(0)
        return " ".join(self._log.read().decode(errors="replace").split())[-600:]

    def wait_ready(self, timeout: float = 120.0) -> LlamaServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PocketLMError(f"llama.cpp server exited ({self.proc.returncode}): {self._tail()}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2):
                    return self
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise PocketLMError(f"llama.cpp server did not answer on {self.url} within {timeout:g} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self._log.close()

    def __enter__(self) -> LlamaServer:
        return self.wait_ready()

    def __exit__(self, exc_type, exc, tb) -> None:
        """A client error while the server process is dead names the real cause (say, a segfault in llama.cpp's
        kernels), not only "server disconnected"."""
        died = exc is not None and self.proc.poll() is not None
        code = self.proc.returncode
        tail = self._tail() if died else ""
        self.stop()
        if died:
            how = f"signal {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else f"{code}"
            raise PocketLMError(f"the llama.cpp server died during the run ({how}): {tail}") from exc


def _steer(cloud: OpenAICloud, dev_model, dev_tok, methods: str, tokens: int, requests: int,
           speculate: int = 0) -> dict:
    ms = parse_methods(methods)
    engine = SteerEngine(cloud, dev_tok, dev_model, dev_tok, speculate=Speculation(speculate))
    stats = DownlinkStats()
    gens, t0 = [], time.perf_counter()
    spec_tokens = spec_trips = 0
    for q, c in REQUESTS[:requests]:  # one request's methods per generate (a device batch)
        out = engine.generate([SteerRequest.with_context(q, c)] * len(ms), ms, max_new_tokens=tokens)
        gens += out
        stats.add(out.stats.downlink)
        if out.stats.speculation:
            spec_tokens += out.stats.speculation["tokens"]
            spec_trips += out.stats.speculation["row_round_trips"]
    wall = time.perf_counter() - t0
    engine.close()
    made = sum(len(g.token_ids) for g in gens)
    totals = stats.as_dict()
    http = cloud.http
    return {**totals, "tokens": made,
            "generations": [g.token_ids for g in gens], "texts": [g.text for g in gens],
            "cloud_stats": dict(cloud.stats), "requests_per_token": http.requests / made,
            "bytes_up_per_token": http.bytes_up / made, "bytes_down_per_token": http.bytes_down / made,
            "round_trip_ms": 1000 * http.seconds / http.requests, "ms_per_token": 1000 * wall / made,
            "step_round_trip_ms": 1000 * cloud.step_seconds / cloud.stats["step_requests"],
            "excluded_share": cloud.stats["excluded_steps"] / totals["rows"],
            "exact_ids_per_token": totals["exact_ids"] / made, "tok_s": made / wall, "speculate": speculate,
            "tokens_per_round_trip": spec_tokens / spec_trips if spec_trips else None}


def bench_openai(server: str | None, local: str, *, gguf: str = "smollm2-135m", ks: tuple[int, ...] = (20, 50),
                 tokens: int = 32, requests: int = 4, methods: str = "closed_form,plausible", prompt: str = "auto",
                 threads: int | None = None, speculate: int = 0, rtt_ms: float = 0.0) -> dict:
    """Steer through `server` (`openai+http://...`), or through a llama.cpp server started here on `gguf`."""
    dev_model, dev_tok = load_bench_model(local, seed=1)
    doc: dict = {"local": local, "tokens": tokens, "methods": methods, "requests": requests, "rows": {},
                 "speculate": speculate, "rtt_ms": rtt_ms}
    started = None
    if server is None:
        started = LlamaServer(gguf, threads=threads).wait_ready()
        server, doc["cloud"] = started.url, f"llama-cpp-python server, {gguf}"
    else:
        doc["cloud"] = server
    proxy = None
    try:
        url = server.removeprefix("openai+")
        if rtt_ms:
            where = urlsplit(url)
            if where.hostname is None or where.port is None:
                raise PocketLMError(f"--rtt needs a server URL with a host and a port, got {url!r}")
            proxy = DelayProxy(where.hostname, where.port, rtt_ms).start()
            url = proxy.url
        configs = [(k, 0, "parallel") for k in sorted(ks)]
        configs += [(k, speculate, mode) for k in sorted(ks) for mode in VERIFY_CONFIGS] if speculate else []
        for k, spec, mode in progress(configs, desc="bench openai", total=len(configs)):
            with OpenAICloud(url, dev_tok, logprobs=k, prompt=prompt, timeout=300, verify=mode) as cloud:
                row = _steer(cloud, dev_model, dev_tok, methods, tokens, requests, spec)
                row.update(k=cloud.k, prompt_mode=cloud.prompt_mode, served=cloud.model_name,
                           verify=mode if spec else None)
                doc["rows"][f"K={k}" + (f" speculate={spec} {mode}" if spec else "")] = row
    finally:
        if proxy is not None:
            proxy.stop()
        if started is not None:
            started.stop()
    widest = doc["rows"][f"K={max(ks)}"]["generations"]
    sequential = {r["k"]: r["generations"] for r in doc["rows"].values() if not r["speculate"]}
    for row in doc["rows"].values():
        gens = row.pop("generations")
        row["identical_to_widest"] = sum(a == b for a, b in zip(gens, widest, strict=True))
        row["identical_to_sequential"] = sum(a == b for a, b in zip(gens, sequential[row["k"]], strict=True))
        row["generations"] = len(widest)
    return doc
