"""The steering decoder: three KV-cached streams, per-row fusion, greedy or top-p sampling, per-row EOS.

Streams (research/costeer.md §2.5):
  cloud         chat(query)            — through `CloudBackend`, which only ever receives token ids
  device plain  chat(query)            — device model
  device ctx    chat(context + query)  — device model; the private context never leaves this process
The two device streams are one batched forward by default (rows [plain..., ctx...], left padded).
With `overlap=True` the cloud step runs in a worker thread while the device streams step on the calling thread:
the two are independent given the chosen token, so a step costs max(cloud, device) instead of their sum when
the two can run at once (a remote cloud, or CPU cores split between them: use 1 torch thread each; on a GPU the
cloud step is issued on its own CUDA stream). Tokens are identical either way (tested).
`kv` picks the cache of the in-process streams: 'static' = fixed-shape steps, CUDA graphs on a GPU
(`static_stream.py`), 'compiled' = static with the step compiled by torch.compile, 'dynamic' = HF
DynamicCache, 'auto' = static where the architecture allows.
Rows may use different methods (one example decoded by several methods shares one prefill per prompt);
finished rows are dropped from every stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..errors import PocketLMError
from .backend import CloudBackend, eos_ids
from .fusion import AdaGate, AdaptiveKappa, closed_form_bd, ftrl_loop_bd, log_policy, plausible_bd
from .methods import Method
from .streams import DeviceStreams, unique_prompts
from .vocab import VocabAlign

log = logging.getLogger(__name__)

DEFAULT_SYSTEM = "You are a helpful assistant."


def chat_ids(tokenizer, user: str, system: str | None = DEFAULT_SYSTEM) -> list[int]:
    """Chat-templated prompt ids (system + user, generation prompt); plain text if no template exists."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             enable_thinking=False)
    else:
        text = (f"{system}\n\n" if system else "") + f"{user}\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class Sampling:
    """temperature 0 = greedy argmax; otherwise softmax(scores / temperature) with top-p, seeded."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise PocketLMError(f"bad sampling settings: temperature={self.temperature}, top_p={self.top_p}")


@dataclass
class SteerRequest:
    """`query` goes to the cloud; `private` (the full device-side user message: context + query) does not."""

    query: str
    private: str | None = None


@dataclass
class Generation:
    method: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: str = "length"
    steered_tokens: int = 0


def choose_tokens(scores: torch.Tensor, sampling: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    if sampling.temperature == 0:
        return scores.argmax(dim=-1)
    logits = scores / sampling.temperature
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(-1) - probs > sampling.top_p  # keeps the first token always
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=gen).squeeze(-1)


class SteerEngine:
    """Decodes requests with named methods: cloud via `CloudBackend`, device model in process."""

    def __init__(self, cloud: CloudBackend | None, cloud_tok, device_model, device_tok, *, vocab: str = "shared",
                 system: str | None = DEFAULT_SYSTEM, fuse_device_streams: bool = True,
                 slice_to_tokenizer: bool = True, overlap: bool = False, kv: str = "auto",
                 sync_timings: bool = False):
        self.cloud, self.cloud_tok = cloud, cloud_tok
        self.device_model, self.device_tok = device_model, device_tok
        self.system = system
        self.fuse_device_streams = fuse_device_streams
        self.overlap = overlap
        self.kv = kv
        # per-part timings synchronise a GPU before and after each part only if asked (it would serialise the
        # overlapped cloud and device steps); otherwise they measure launch time on a GPU. decode_s is exact.
        self.sync_timings = sync_timings
        self._pool: ThreadPoolExecutor | None = None
        self._side_stream = None  # CUDA stream of the overlapped cloud step
        self._device_streams: dict[tuple[bool, str], DeviceStreams] = {}
        dev_rows = device_model.get_output_embeddings().weight.shape[0]
        cloud_rows = cloud.vocab_rows if cloud is not None else dev_rows
        self.align = VocabAlign.build(vocab, cloud_tok, device_tok, cloud_rows, dev_rows, slice_to_tokenizer)
        self.cloud_eos = set(cloud.eos_token_ids) if cloud is not None else set()
        self.device_eos = eos_ids(device_model, device_tok)
        pad = device_tok.pad_token_id
        self.pad_id = pad if pad is not None else (device_tok.eos_token_id or 0)
        self.timings: dict[str, float] = {}  # seconds per part of the last generate()
        self.calls: dict[str, int] = {}      # forward calls (prefill + steps) per stream of the last generate()

    @property
    def kv(self) -> str:
        return self._kv

    @kv.setter
    def kv(self, mode: str) -> None:
        """The device streams' cache mode; an in-process cloud backend follows it."""
        self._kv = mode
        if hasattr(self.cloud, "kv"):
            self.cloud.kv = mode

    def _sync(self, force: bool = False) -> None:
        dev = next(self.device_model.parameters()).device
        if dev.type == "cuda" and (force or self.sync_timings):
            torch.cuda.synchronize(dev)

    def _measure(self, fn, *args):
        """(fn(*args), seconds); with `sync_timings` synchronised so GPU work is inside the interval."""
        self._sync()
        t0 = time.perf_counter()
        out = fn(*args)
        self._sync()
        return out, time.perf_counter() - t0

    def _device_streams_for_run(self) -> DeviceStreams:
        key = (self.fuse_device_streams, self.kv)
        if key not in self._device_streams:
            self._device_streams[key] = DeviceStreams(self.device_model, self.pad_id, *key)
        return self._device_streams[key]

    def _record(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds
        self.calls[key] = self.calls.get(key, 0) + 1

    def _timed(self, key: str, fn, *args):
        out, seconds = self._measure(fn, *args)
        self._record(key, seconds)
        return out

    def _cloud_step_in_worker(self, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        # inference mode is thread-local: the worker must enter it itself; the timing is recorded by the caller
        with torch.inference_mode():
            if self._side_stream is None:
                return self._measure(self.cloud.step, ids)
            # GPU: the cloud step goes on its own stream (ordered after `ids` by the caller)
            with torch.cuda.stream(self._side_stream):
                out, secs = self._measure(self.cloud.step, ids)
            return out, secs

    def _step_both(self, cloud_ids: torch.Tensor, device: DeviceStreams, dev_ids: torch.Tensor):
        """Cloud and device steps at once: cloud in the worker thread, device streams here."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pocketlm-cloud")
        main = None
        if cloud_ids.device.type == "cuda":
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(cloud_ids.device)
            main = torch.cuda.current_stream(cloud_ids.device)
            # order the side stream after the work that made `cloud_ids` here, before the device step is queued
            # (waiting in the worker would also wait for the device step and serialise the two)
            self._side_stream.wait_stream(main)
            cloud_ids.record_stream(self._side_stream)
        fut = self._pool.submit(self._cloud_step_in_worker, cloud_ids)
        try:
            dp, dc = self._timed("device", device.step, dev_ids)
        finally:
            cl, secs = fut.result()  # always join: the cloud's cache must not change under a later step
        if main is not None:  # the logits were made on the side stream: order and keep them for this one
            main.wait_stream(self._side_stream)
            cl.record_stream(main)
        self._record("cloud", secs)
        return cl, dp, dc

    def close(self) -> None:
        """Stop the overlap worker thread (if one was started)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    @torch.inference_mode()
    def generate(self, requests: list[SteerRequest], methods: list[Method], *, max_new_tokens: int = 128,
                 sampling: Sampling | None = None, on_token: Callable[[int, int], None] | None = None,
                 ignore_eos: bool = False) -> list[Generation]:
        """Decode row i of `requests` with `methods[i]`; `on_token(row, device_token_id)` streams tokens."""
        sampling = sampling or Sampling()
        if len(requests) != len(methods) or not requests:
            raise PocketLMError("generate() needs one method per request and at least one request")
        if max_new_tokens < 1:
            raise PocketLMError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for r, m in zip(requests, methods, strict=True):
            if (m.device_ctx or m.cloud_prompt == "context") and not r.private:
                raise PocketLMError(f"method {m.name!r} needs a private context")
        B = len(requests)
        use_cloud = any(m.cloud_prompt for m in methods)
        if use_cloud and self.cloud is None:
            raise PocketLMError("these methods need a cloud model")
        need_plain = any(m.device_plain for m in methods)
        need_ctx = any(m.device_ctx for m in methods)
        use_device = need_plain or need_ctx
        self.timings, self.calls = {}, {}

        gens = [Generation(m.name) for m in methods]
        groups: dict[str, list[int]] = {}
        for i, m in enumerate(methods):
            groups.setdefault(m.name, []).append(i)
        by_name = {m.name: m for m in methods}
        adaptive = {n: AdaptiveKappa(B, by_name[n].fusion.kappa, by_name[n].fusion.adaptive_cap)
                    for n in groups if by_name[n].fusion.rule == "adaptive"}
        gates = {n: AdaGate(B, by_name[n].fusion.gate_threshold, by_name[n].fusion.gate_patience)
                 for n in groups if by_name[n].fusion.rule == "gated"}
        gen = None
        if sampling.temperature > 0:
            gen = torch.Generator(device=next(self.device_model.parameters()).device).manual_seed(sampling.seed)

        # Prefill. The cloud gets chat(query) ids only (chat(context) only for the non-private upper bound).
        cl = dp = dc = None
        if use_cloud:
            # Only `cloud_with_context` rows (the non-private upper bound) put the context in the cloud prompt.
            texts = [r.private if m.cloud_prompt == "context" else r.query for r, m in zip(requests, methods, strict=True)]
            uniq, expand = unique_prompts([chat_ids(self.cloud_tok, t, self.system) for t in texts])
            if hasattr(self.cloud, "reserve"):
                self.cloud.reserve(max_new_tokens)
            cl = self._timed("cloud", self.cloud.prefill, uniq, expand)
        device = self._device_streams_for_run()
        device.reserve(max_new_tokens)
        if use_device:
            plain = [chat_ids(self.device_tok, r.query, self.system) for r in requests] if need_plain else None
            ctx = [chat_ids(self.device_tok, r.private, self.system) for r in requests] if need_ctx else None
            dp, dc = self._timed("device", device.prefill, plain, ctx)

        self.timings["prefill_s"] = self.timings.get("cloud", 0.0) + self.timings.get("device", 0.0)
        self._sync(force=True)
        t_decode = time.perf_counter()
        live = torch.arange(B)  # original row of each live position
        for step in range(max_new_tokens):
            t0 = time.perf_counter()
            c = self.align.cloud_view(cl) if cl is not None else None
            vp = self.align.device_view(dp) if dp is not None else None
            vc = self.align.device_view(dc) if dc is not None else None
            ref = c if c is not None else vc
            # Normalise once per step and share across the methods in the batch.
            b = log_policy(c) if c is not None else None
            lc = log_policy(vc) if vc is not None else None
            lp = log_policy(vp) if vp is not None else None
            delta = lc - lp if lc is not None and lp is not None else None
            scores = torch.empty(live.numel(), self.align.size, device=ref.device)
            steered = torch.zeros(live.numel(), dtype=torch.bool)
            live_list = live.tolist()
            pos_of = {r: p for p, r in enumerate(live_list)}
            for name, rows in groups.items():
                pos = [pos_of[r] for r in rows if r in pos_of]
                if not pos:
                    continue
                f = by_name[name].fusion
                ip = torch.tensor(pos, device=ref.device)
                if f.rule == "cloud":
                    scores[ip] = b[ip]
                    continue
                if f.rule == "device":
                    scores[ip] = lc[ip]
                    continue
                if f.rule == "gated":  # AdaCoSteer: cloud policy once the gate has closed for this row
                    on = gates[name].update(c[ip], live[pos])
                    steered[pos] = on.cpu()
                    out = b[ip].clone()
                    if bool(on.any()):
                        ion = ip[on]
                        out[on] = closed_form_bd(b[ion], delta[ion], f.kappa)
                    scores[ip] = out
                    continue
                steered[pos] = True
                bi, di = b[ip], delta[ip]
                if f.rule == "loop":
                    scores[ip] = ftrl_loop_bd(bi, di, T=f.T, alpha=f.alpha, beta=f.beta, lam=f.lam, eta=f.eta)
                elif f.rule == "closed":
                    scores[ip] = closed_form_bd(bi, di, f.kappa)
                elif f.rule == "plausible":
                    scores[ip] = plausible_bd(bi, di, f.kappa, f.plausibility)
                elif f.rule == "adaptive":
                    k = adaptive[name](lc[ip], lp[ip], live[pos], normalised=True)
                    scores[ip] = closed_form_bd(bi, di, k)
                else:
                    raise PocketLMError(f"unknown fusion rule {f.rule!r}")
            tok = choose_tokens(scores, sampling, gen)
            cloud_ids, dev_ids = self.align.to_cloud(tok), self.align.to_device(tok)
            self.timings["fusion"] = self.timings.get("fusion", 0.0) + time.perf_counter() - t0

            finished = torch.zeros(live.numel(), dtype=torch.bool)
            cloud_list, dev_list = cloud_ids.tolist(), dev_ids.tolist()  # one host transfer each per step
            for p, r in enumerate(live_list):
                ci, di = cloud_list[p], dev_list[p]
                is_eos = (ci in self.cloud_eos and use_cloud) or di in self.device_eos
                if self.align.mode == "intersection" and use_cloud and self.cloud_eos and methods[r].cloud_prompt:
                    eos_mass = log_policy(cl[p:p + 1])[0, sorted(self.cloud_eos)].exp().sum()
                    is_eos = is_eos or bool(eos_mass > 0.5)  # official forced stop for mapped vocabularies
                if is_eos and not ignore_eos:
                    gens[r].finish = "eos"
                    finished[p] = True
                    continue
                gens[r].token_ids.append(di)
                gens[r].steered_tokens += int(steered[p])
                if on_token is not None:
                    on_token(r, di)
            if step == max_new_tokens - 1:
                break
            keep = (~finished).nonzero().flatten()
            if keep.numel() == 0:
                break
            if keep.numel() < live.numel():
                live, cloud_ids, dev_ids = live[keep], cloud_ids[keep.to(cloud_ids.device)], dev_ids[keep.to(dev_ids.device)]
                if use_cloud:
                    self.cloud.keep(keep)
                if use_device:
                    device.keep(keep)
            if use_device and not self._device_needed(live, methods, gates):
                use_device, dp, dc = False, None, None
                device.release()
                log.debug("device streams stopped at step %d (all steered rows gated off)", step)
            if use_cloud and use_device and self.overlap:
                cl, dp, dc = self._step_both(cloud_ids, device, dev_ids)
                continue
            if use_cloud:
                cl = self._timed("cloud", self.cloud.step, cloud_ids)
            if use_device:
                dp, dc = self._timed("device", device.step, dev_ids)
        if use_cloud:
            self.cloud.release()
        device.release()
        n_tok = len(self.device_tok)
        for g in gens:  # ids past the tokenizer only occur with random benchmark geometries
            g.text = self.device_tok.decode([t for t in g.token_ids if t < n_tok], skip_special_tokens=True)
        self._sync(force=True)
        self.timings["decode_s"] = time.perf_counter() - t_decode
        return gens

    @staticmethod
    def _device_needed(live: torch.Tensor, methods: list[Method], gates: dict[str, AdaGate]) -> bool:
        for r in live.tolist():
            m = methods[r]
            if not (m.device_plain or m.device_ctx):
                continue
            if m.fusion.rule == "gated" and not bool(gates[m.name].active[r]):
                continue
            return True
        return False
