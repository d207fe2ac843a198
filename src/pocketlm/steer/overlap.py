"""Timing of the decoder's parts, and the overlapped step: the cloud step in a worker thread while the device
streams step on the calling thread.

The two only meet at the fusion, so they can run at once; on a GPU the worker issues the cloud step on its own
CUDA stream, ordered after the chosen ids from the calling thread *before* the device step is queued (waiting
from the worker could also wait on the device step and serialise the two). Per-part timings synchronise a GPU
only if asked (`sync_timings`): synchronising would serialise the overlapped steps; decode_s is always exact.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor

import torch


class Overlap:
    def __init__(self, model, sync_timings: bool = False):
        self.device = next(model.parameters()).device
        self.sync_timings = sync_timings
        self.timings: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._side_stream = None

    # -- timing --------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.timings, self.calls = {}, {}

    def _sync(self, force: bool = False) -> None:
        if self.device.type == "cuda" and (force or self.sync_timings):
            torch.cuda.synchronize(self.device)

    def measure(self, fn, *args):
        """(fn(*args), seconds); with `sync_timings` synchronised so GPU work is inside the interval."""
        self._sync()
        t0 = time.perf_counter()
        out = fn(*args)
        self._sync()
        return out, time.perf_counter() - t0

    def add(self, key: str, seconds: float, count: bool = False) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds
        if count:
            self.calls[key] = self.calls.get(key, 0) + 1

    def timed(self, key: str, fn, *args):
        out, seconds = self.measure(fn, *args)
        self.add(key, seconds, count=True)
        return out

    def start_decode(self) -> float:
        self._sync(force=True)
        return time.perf_counter()

    def end_decode(self, t0: float) -> None:
        self._sync(force=True)
        self.timings["decode_s"] = time.perf_counter() - t0

    # -- one decode step -----------------------------------------------------------------------------
    def step(self, cloud, cloud_ids: torch.Tensor, device, dev_ids: torch.Tensor, overlap: bool,
             cloud_op: str = "step", then=None, **cloud_kw):
        """Step the cloud and/or the device streams (either may be None); returns (cloud logits, device scores).
        `cloud_op="extend"`: the cloud verifies a speculative draft (`cloud_ids` `[B, T]`) meanwhile. `then(dev)`
        (overlapped only): called with the device's scores as soon as they exist, while the cloud's are in flight."""
        if cloud is not None and device is not None and overlap:
            def work(fut):
                dev = self.timed("device", device.step, dev_ids)
                return then(dev) if then is not None else dev
            return self.beside(cloud, cloud_ids, work, cloud_op, **cloud_kw)
        op = functools.partial(getattr(cloud, cloud_op), **cloud_kw) if cloud is not None else None
        cl = self.timed("cloud", op, cloud_ids) if cloud is not None else None
        dev = self.timed("device", device.step, dev_ids) if device is not None else None
        return cl, dev

    def _cloud_in_worker(self, op, ids: torch.Tensor):
        # inference mode is thread-local: the worker enters it itself; the timing is recorded by the caller
        with torch.inference_mode():
            if self._side_stream is None:
                return self.measure(op, ids)
            with torch.cuda.stream(self._side_stream):
                return self.measure(op, ids)

    def _worker(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pocketlm-cloud")
        return self._pool

    def alongside(self, cloud_call, work):
        """`cloud_call()` in the worker and `work(future)` here meanwhile; returns (its result, work's result). For
        a cloud behind a network (a remote prefill: no CUDA stream to order), whose call is mostly a round trip."""
        fut = self._worker().submit(self._cloud_in_worker, lambda _: cloud_call(), None)
        try:
            out = work(fut)
        finally:
            cl, secs = fut.result()
        self.add("cloud", secs, count=True)
        return cl, out

    def beside(self, cloud, cloud_ids: torch.Tensor, work, cloud_op: str = "step", **cloud_kw):
        """Run the cloud's `cloud_op` (with `cloud_kw`) in the worker and `work(future)` here meanwhile (it may
        poll `future.done()` to stop in time); returns (cloud result, work's result)."""
        main = None
        if cloud_ids.device.type == "cuda":
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(cloud_ids.device)
            main = torch.cuda.current_stream(cloud_ids.device)
            self._side_stream.wait_stream(main)
            cloud_ids.record_stream(self._side_stream)
        op = getattr(cloud, cloud_op)
        fut = self._worker().submit(self._cloud_in_worker, functools.partial(op, **cloud_kw) if cloud_kw else op,
                                    cloud_ids)
        try:
            dev = work(fut)
        finally:
            cl, secs = fut.result()  # always join: the cloud's cache must not change under a later step
        if main is not None:  # the logits were made on the side stream: order and keep them for this one
            main.wait_stream(self._side_stream)
            for t in cl if isinstance(cl, list) else [cl]:
                if isinstance(t, torch.Tensor):
                    t.record_stream(main)
        self.add("cloud", secs, count=True)
        return cl, dev

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
