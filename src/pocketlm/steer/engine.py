"""The steering decoder: a cloud stream and the device's stream pair, per-row fusion rules and guards, per-row EOS.

One step, stage by stage: the cloud's answer becomes a `CloudStep` (a log-policy and, if truncated, a
known-mask), the plan fuses every method's rows, certifies a truncated step, chooses under the guards and
records; finished rows leave every stream. `generate` returns the generations with their statistics.

Streams (research/costeer.md §2.5), each a `protocol.Stream`:
  cloud         chat(query)            — a `CloudBackend`, which only ever receives token ids
  device plain  chat(query)            — device model
  device ctx    chat(context + query)  — device model; the private context never leaves this process
The two device streams are one batched forward by default (`DeviceStreams`). With `overlap=True` the cloud
step runs in a worker thread while the device streams step on the calling thread (`overlap.py`): the two are
independent given the chosen token, so a step costs max(cloud, device) instead of their sum when they can run
at once (a remote cloud, or CPU cores split between them). Tokens are identical either way (tested).
Rows may use different methods (one example decoded by several methods shares one prefill per prompt); a
method is a fusion rule (`rules.py`) plus guards (`guards.py`); finished rows are dropped from every stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import PocketLMError
from ..models.vocab import head_rows
from .cloud.in_process import eos_ids
from .cloud_step import CloudStep
from .deferred import Pending, may_defer
from .fusion.formulas import log_policy
from .fusion.methods import NO_CONTEXT_SIGNALS, REFERENCE_MODE, Method
from .fusion.rules import StepView
from .overlap import Overlap
from .pipelined import PipelinedAsks
from .plan import DecodePlan, Generation, Sampling
from .speculative import Speculation, SpeculativeRound, acceptance, draft_lengths
from .stats import GenerateStats, Generations
from .streams.device import DevicePrompt, DeviceScores, DeviceStreams
from .streams.kvmode import KV_MODES
from .streams.prefill import unique_prompts
from .streams.protocol import CloudBackend
from .vocab import VocabAlign

log = logging.getLogger(__name__)

DEFAULT_SYSTEM = "You are a helpful assistant."
__all__ = ["DEFAULT_SYSTEM", "GenerateStats", "Generation", "Generations", "Sampling", "SteerEngine", "SteerRequest",
           "chat_ids"]


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
class SteerRequest:
    """`query` goes to the cloud; `private` (the full device-side user message: context + query) does not."""

    query: str
    private: str | None = None

    @classmethod
    def with_context(cls, query: str, context: str | None) -> SteerRequest:
        """The device-side user message is the private context, a blank line, then the public query."""
        ctx = (context or "").strip()
        return cls(query, f"{ctx}\n\n{query}" if ctx else None)

    @property
    def context(self) -> str:
        """The private part alone (the device message without the public query)."""
        if not self.private:
            return ""
        return self.private.removesuffix(self.query).strip() if self.private.endswith(self.query) else self.private


class SteerEngine:
    """Decodes requests with named methods: the cloud through a `CloudBackend`, the device model in process."""

    def __init__(self, cloud: CloudBackend | None, cloud_tok, device_model, device_tok, *, vocab: str = "shared",
                 system: str | None = DEFAULT_SYSTEM, fuse_device_streams: bool = True,
                 slice_to_tokenizer: bool = True, overlap: bool = False, kv: str = "auto",
                 sync_timings: bool = False, speculate: Speculation | int = 0):
        self.cloud, self.cloud_tok = cloud, cloud_tok
        self.device_model, self.device_tok = device_model, device_tok
        self.system = system
        self.fuse_device_streams = fuse_device_streams
        self.overlap = overlap
        self.kv = kv
        self.speculation = speculate if isinstance(speculate, Speculation) else Speculation(speculate)
        self.clock = Overlap(device_model, sync_timings)
        self._device_streams: dict[tuple[bool, str], DeviceStreams] = {}
        dev_rows = head_rows(device_model)
        cloud_rows = cloud.vocab_rows if cloud is not None else dev_rows
        self.align = VocabAlign.build(vocab, cloud_tok, device_tok, cloud_rows, dev_rows, slice_to_tokenizer)
        self.partial = bool(getattr(cloud, "truncates", False))
        if self.partial:  # a truncated downlink: the cloud must know the fused width to bound the rest
            if self.align.mode != "shared":
                raise PocketLMError("a top-k cloud downlink needs one shared vocabulary (vocab='shared')")
            cloud.narrow(self.align.size)
        self.cloud_eos = set(cloud.eos_token_ids) if cloud is not None else set()
        self.device_eos = eos_ids(device_model, device_tok)
        pad = device_tok.pad_token_id
        self.pad_id = pad if pad is not None else (device_tok.eos_token_id or 0)

    @property
    def kv(self) -> str:
        return self._kv

    @kv.setter
    def kv(self, mode: str) -> None:
        """The device streams' cache mode; the cloud follows it where it can decode with that mode."""
        if mode not in KV_MODES:
            raise PocketLMError(f"kv must be one of {', '.join(KV_MODES)}, got {mode!r}")
        self._kv = mode
        if self.cloud is not None and (mode == "auto" or mode in self.cloud.cache_modes()):
            self.cloud.set_cache_mode(mode)

    def settings(self) -> dict:
        """The settings a benchmark may change, to be restored with `restore()`."""
        return {"fuse_device_streams": self.fuse_device_streams, "overlap": self.overlap, "kv": self.kv,
                "speculation": self.speculation}

    def restore(self, settings: dict) -> None:
        for key in ("fuse_device_streams", "overlap", "kv", "speculation"):
            setattr(self, key, settings[key])

    def close(self) -> None:
        """Stop the overlap worker thread (if one was started)."""
        self.clock.close()

    def _device_streams_for_run(self) -> DeviceStreams:
        key = (self.fuse_device_streams, self.kv)
        if key not in self._device_streams:
            self._device_streams[key] = DeviceStreams(self.device_model, self.pad_id, *key)
        return self._device_streams[key]

    @torch.inference_mode()
    def generate(self, requests: list[SteerRequest], methods: list[Method], *, max_new_tokens: int = 128,
                 sampling: Sampling | None = None, on_token: Callable[[int, int], None] | None = None,
                 ignore_eos: bool = False) -> Generations:
        """Decode row i of `requests` with `methods[i]`; `on_token(row, device_token_id)` streams tokens. Returns
        the generations (a list) with `.stats` (timings, forward calls, downlink counts)."""
        sampling = sampling or Sampling()
        if max_new_tokens < 1:
            raise PocketLMError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        drafts = self._draft_lengths(methods, sampling)
        plan = DecodePlan(requests, methods, self.device_tok, drafting=any(drafts))
        if plan.uses_cloud and self.cloud is None:
            raise PocketLMError("these methods need a cloud model")
        dev_device = next(self.device_model.parameters()).device
        gen = torch.Generator(device=dev_device).manual_seed(sampling.seed) if sampling.temperature > 0 else None
        self.clock.reset()
        if any(drafts):
            return self._speculative(requests, plan, sampling, gen, drafts, max_new_tokens, on_token, ignore_eos)
        cloud, device = self.cloud if plan.uses_cloud else None, self._device_streams_for_run()
        use_device = plan.uses_plain or plan.uses_ctx
        asks = PipelinedAsks(self, plan, cloud, sampling)
        cl, dev = self._prefill(requests, plan, cloud, device if use_device else None, max_new_tokens, asks)
        t_decode = self.clock.start_decode()
        for step in range(max_new_tokens):
            t0 = time.perf_counter()
            cloud_step = CloudStep.of(cl, self.align, dev_device)
            view = self._view(cloud_step, dev, plan.live)
            fused = plan.fuse(view, self.align.size)
            certifier = plan.certify(fused, view, cloud_step.top, cloud, sampling)
            choice = plan.choose(fused, sampling, gen, self.align.to_device, certifier)
            cloud_ids, dev_ids = self.align.to_cloud(choice.tokens), self.align.to_device(choice.tokens)
            self.clock.add("fusion", time.perf_counter() - t0)
            is_eos = self._eos_check(cloud_ids.tolist(), dev_ids.tolist(), cloud_step, plan)
            finished = plan.record(choice, dev_ids.tolist(), fused.steered, is_eos, ignore_eos, on_token)
            keep = (~finished).nonzero().flatten()
            if step == max_new_tokens - 1 or keep.numel() == 0:
                break
            if keep.numel() < plan.live.numel():  # finished rows leave every stream
                plan.keep(keep)
                cloud_ids, dev_ids = cloud_ids[keep.to(cloud_ids.device)], dev_ids[keep.to(dev_ids.device)]
                for s in (cloud, device if use_device else None):
                    if s is not None:
                        s.keep(keep)
            if use_device and not plan.needs_device():
                use_device, dev = False, None
                device.release()
                log.debug("device streams stopped at step %d (no live row needs them)", step)
            mark = asks.mark()
            cl, dev = self.clock.step(cloud, cloud_ids, device if use_device else None, dev_ids, self.overlap,
                                      then=lambda d, mark=mark: asks.send(d, mark))
            cl = asks.merge(cl)
        return self._finish(plan, (cloud, device), t_decode)

    def _draft_lengths(self, methods: list[Method], sampling: Sampling) -> list[int]:
        """Per row, how many tokens the device drafts per round (0: decode one token per cloud call)."""
        if self.cloud is None:
            return [0] * len(methods)
        drafts = draft_lengths(methods, self.speculation, sampling)
        if any(drafts) and not hasattr(self.cloud, "extend"):  # e.g. an OpenAI-compatible server (no verify yet)
            if any(getattr(m.rule, "accepts", None) for m in methods):
                raise PocketLMError(f"specsteer needs a cloud that verifies drafts; {type(self.cloud).__name__} "
                                    "does not (use the step server or an in-process cloud)")
            log.warning("--speculate is off: %s cannot verify a draft in one call", type(self.cloud).__name__)
            return [0] * len(methods)
        if any(drafts) and not getattr(self.cloud, "round_trips", True):
            log.info("--speculate saves cloud round trips; this in-process cloud has none to save, and verifying a "
                     "draft costs extra compute: expect no gain here (BENCHMARKS.md, speculative steering)")
        return drafts

    def _speculative(self, requests, plan: DecodePlan, sampling, gen, drafts, max_new_tokens: int, on_token,
                     ignore_eos: bool) -> Generations:
        """Rounds of draft -> verify -> accept (speculative.py); the first token comes from the prefill's scores."""
        cloud, device = self.cloud, self._device_streams_for_run()
        rnd = SpeculativeRound(self, plan, self.speculation, sampling, gen, drafts, on_token, ignore_eos,
                               max_new_tokens)
        # where a bonus position may be decided a round later (deferred.py), so may the first: its asks then ride
        # behind the first verify instead of following the open (which costs a round trip when the device's
        # prefill, with the context, takes longer than the cloud's)
        # elsewhere the first position is still drafted and verified in the first round, and its expected asks ride
        # behind that verify (an ask without a position reads the open's row until the first rewind)
        first_later = may_defer(rnd, cloud)
        asks = rnd._asks(cloud)  # the round's own (may_defer made it): the prefill's ask is merged before round 1
        rnd.first_behind = not first_later and asks.on and max(drafts) > 0 and max_new_tokens > 1
        cl, dev = self._prefill(requests, plan, cloud, device, max_new_tokens + max(drafts),
                                None if first_later or rnd.first_behind else asks)
        t_decode = self.clock.start_decode()
        if first_later:
            rnd.pending = Pending(cl, dev)
            z, finished = rnd.round(None, cloud, device)
        else:
            z, finished = rnd.round(None, cloud, device, prefilled=(cl, dev))
        while True:
            full = torch.tensor([len(plan.gens[r].token_ids) >= max_new_tokens for r in plan.live.tolist()])
            keep = (~(finished | full)).nonzero().flatten()
            if keep.numel() == 0:
                break
            if keep.numel() < plan.live.numel():  # finished rows leave every stream
                plan.keep(keep)
                cloud.keep(keep)
                device.keep(keep)
                z = z[keep]
            z, finished = rnd.round(z, cloud, device)
        rnd.stats["tokens"] = sum(len(g.token_ids) for g in plan.gens)
        return self._finish(plan, (cloud, device), t_decode, speculation=acceptance(rnd.stats))

    def _finish(self, plan: DecodePlan, streams, t_decode: float, speculation: dict | None = None) -> Generations:
        """Release the streams, decode the texts and gather the call's statistics."""
        for s in streams:
            if s is not None:
                s.release()
        n_tok = len(self.device_tok)
        for g in plan.gens:  # ids past the tokenizer only occur with random benchmark geometries
            g.text = self.device_tok.decode([t for t in g.token_ids if t < n_tok], skip_special_tokens=True)
        self.clock.end_decode(t_decode)
        stats = GenerateStats(dict(self.clock.timings), dict(self.clock.calls),
                              plan.downlink.as_dict() if self.partial else None, speculation)
        return Generations(plan.gens, stats)

    def _prefill(self, requests, plan: DecodePlan, cloud, device, max_new_tokens: int,
                 asks: PipelinedAsks | None = None):
        """The cloud gets chat(query) ids only (chat(context + query) only for the non-private upper bound). With
        the overlap on and a cloud behind a network, the device prefills while the cloud's prefill travels, and
        the asks its first position is expected to need follow the open on the wire (pipelined.py): the first
        token, where the context shifts the most, then costs no extra round trip."""
        cl = dev = prompts = None
        if cloud is not None:
            texts = [r.private if m.cloud_prompt == "context" else r.query
                     for r, m in zip(requests, plan.methods, strict=True)]
            uniq, expand = unique_prompts([chat_ids(self.cloud_tok, t, self.system) for t in texts])
            cloud.reserve(max_new_tokens)
        if device is not None:
            device.reserve(max_new_tokens)
            prompts = [DevicePrompt(chat_ids(self.device_tok, r.query, self.system) if plan.uses_plain else None,
                                    chat_ids(self.device_tok, r.query if m.signal in NO_CONTEXT_SIGNALS or not r.private
                                             else r.private, self.system) if plan.uses_ctx else None,
                                    plain_mode=REFERENCE_MODE[m.signal])
                       for r, m in zip(requests, plan.methods, strict=True)]
        if cloud is not None and device is not None and self.overlap and getattr(cloud, "round_trips", True):
            mark = asks.mark() if asks is not None else None

            def work(_fut):
                d = self.clock.timed("device", device.prefill, prompts)
                return asks.send(d, mark) if asks is not None else d
            cl, dev = self.clock.alongside(lambda: cloud.prefill(uniq, expand), work)
            if asks is not None:
                cl = asks.merge(cl)
        else:
            if cloud is not None:
                cl = self.clock.timed("cloud", cloud.prefill, uniq, expand)
            if device is not None:
                dev = self.clock.timed("device", device.prefill, prompts)
        self.clock.timings["prefill_s"] = self.clock.timings.get("cloud", 0.0) + self.clock.timings.get("device", 0.0)
        return cl, dev

    def _view(self, cloud: CloudStep, dev: DeviceScores | None, live: torch.Tensor) -> StepView:
        """This step's aligned log-policies, normalised once and shared by every method in the batch."""
        def norm(t):
            return None if t is None else log_policy(self.align.device_view(t))
        return StepView(cloud.policy, norm(dev.ctx if dev else None), norm(dev.plain if dev else None), live,
                        cloud.known)

    def _eos_check(self, cloud_ids: list[int], dev_ids: list[int], cloud: CloudStep, plan: DecodePlan):
        has_cloud = cloud.policy is not None

        def is_eos(p: int, r: int) -> bool:
            eos = (has_cloud and cloud_ids[p] in self.cloud_eos) or dev_ids[p] in self.device_eos
            if (self.align.mode == "intersection" and has_cloud and self.cloud_eos
                    and plan.methods[r].cloud_prompt):  # official forced stop for mapped vocabularies
                eos = eos or cloud.eos_mass(p, sorted(self.cloud_eos)) > 0.5
            return eos
        return is_eos
