"""Build a `SteerEngine` from two model specs (cloud and device), loading a shared model only once."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

from ..models import load_model
from ..models.quantize import quantize_device_model
from ..moe.personal import load_personal
from .cloud.in_process import HFCloudBackend
from .cloud.openai import is_openai
from .cloud.wire import TOPK, is_remote, topk_of
from .engine import SteerEngine
from .speculative import Speculation


def load_engine(cloud_spec: str, local_spec: str, *, device: str | None = None, dtype: str | None = None,
                vocab: str = "shared", fuse_device_streams: bool = True, seed: int = 0,
                loader: Callable = load_model, slice_to_tokenizer: bool = True,
                overlap: bool | None = None, kv: str = "auto", cloud_token: str | None = None,
                cloud_format: str = "f32", adapters: str | None = None, cloud_logprobs: int = 20,
                cloud_prompt: str = "auto", speculate: Speculation | int = 0,
                cloud_verify: str = "parallel", device_quantize: str | None = None) -> SteerEngine:
    """Specs: anything `loader` takes (default `load_model`; the CLI passes the benchmark loader, which also
    knows random geometries such as `qwen2.5-7b-geometry`), or `http(s)://HOST:PORT` for a step server.
    One spec for both roles loads one model.
    `overlap=None`: on for a step server (the device steps while the cloud's answer is on the wire), else off.
    `adapters`: a user's folder of a CoMiGS run (`runs/.../users/<user>`) or a Flower device's state directory
    (moe.personal.load_personal reads both): the device becomes that user's personal model (the base tensors stay shared with the cloud when both specs name one model).
    `cloud_format` (step server only): f32 | f16 | bf16 full rows, or `topk[:K]` for the certified top-k
    downlink (K best ids per step, default 64; certify.py; `topk:K:noexact` never sends candidate ids up).
    `speculate`: draft tokens per cloud round trip (speculative.py; 0 = off), or a `Speculation`.
    `cloud_verify` (OpenAI-compatible cloud): parallel | echo, how a draft is verified (openai_verify.py).
    `device_quantize`: None | int8, the device model's weights (models/quantize.py; CPU; with `adapters` the
    personal model's frozen base layers, its adapters in bf16)."""
    if is_remote(cloud_spec) or is_openai(cloud_spec):
        dev_model, dev_tok = loader(local_spec, device=device, dtype=dtype, seed=seed + 1)
        if adapters:
            dev_model = load_personal(dev_model, adapters)
        dev_model = quantize_device_model(dev_model, device_quantize)
        token = cloud_token or os.environ.get("POCKETLM_CLOUD_TOKEN")  # eval-steer etc. take it from the env
        if is_openai(cloud_spec):
            from .cloud.openai import OpenAICloud  # httpx: the `serve` extra

            cloud = OpenAICloud(cloud_spec, dev_tok, api_key=token, logprobs=cloud_logprobs, prompt=cloud_prompt,
                                verify=cloud_verify)
        else:
            from .cloud.remote import RemoteCloud, RemoteTopK  # the `serve` extra

            if cloud_format.startswith(TOPK):
                k, ask = topk_of(cloud_format)
                cloud = RemoteTopK(cloud_spec, token, tokenizer=dev_tok, k=k, ask=ask)
            else:
                cloud = RemoteCloud(cloud_spec, token, tokenizer=dev_tok, format=cloud_format)
        return SteerEngine(cloud, dev_tok, dev_model, dev_tok, vocab=vocab, fuse_device_streams=fuse_device_streams,
                           slice_to_tokenizer=slice_to_tokenizer, overlap=True if overlap is None else overlap, kv=kv,
                           speculate=speculate)
    cloud_model, cloud_tok = loader(cloud_spec, device=device, dtype=dtype, seed=seed)
    if local_spec == cloud_spec:
        dev_model, dev_tok = cloud_model, cloud_tok  # demo: one model plays both roles; streams stay separate
        if device_quantize:  # the cloud keeps its float weights
            dev_model = copy.deepcopy(cloud_model)
    else:
        dev_model, dev_tok = loader(local_spec, device=device, dtype=dtype, seed=seed + 1)
    if adapters:
        dev_model = load_personal(dev_model, adapters)
    dev_model = quantize_device_model(dev_model, device_quantize)
    cloud = HFCloudBackend(cloud_model, cloud_tok, kv="auto")
    return SteerEngine(cloud, cloud_tok, dev_model, dev_tok, vocab=vocab, fuse_device_streams=fuse_device_streams,
                       slice_to_tokenizer=slice_to_tokenizer, overlap=bool(overlap), kv=kv, speculate=speculate)
