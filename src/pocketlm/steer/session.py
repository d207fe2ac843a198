"""Build a `SteerEngine` from two model specs (cloud and device), loading a shared model only once.

A cloud spec `http://HOST:PORT` is a `pocketlm serve` step server: only the device model is loaded, the
device's tokenizer is used for both sides (the server's must match), and overlap defaults to on.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..models import load_model
from .backend import HFCloudBackend
from .decoding import SteerEngine
from .wire import is_remote


def load_engine(cloud_spec: str, local_spec: str, *, device: str | None = None, dtype: str | None = None,
                vocab: str = "shared", fuse_device_streams: bool = True, seed: int = 0,
                loader: Callable = load_model, slice_to_tokenizer: bool = True,
                overlap: bool | None = None, kv: str = "auto", cloud_token: str | None = None,
                cloud_format: str = "f32") -> SteerEngine:
    """Specs: anything `loader` takes (default `load_model`; the CLI passes the benchmark loader, which also
    knows random geometries such as `qwen2.5-7b-geometry`). One spec for both roles loads one model.
    `overlap=None`: on for a step server (the device steps while the cloud's answer is on the wire), else off."""
    if is_remote(cloud_spec):
        from .remote import RemoteCloud  # the `serve` extra

        dev_model, dev_tok = loader(local_spec, device=device, dtype=dtype, seed=seed + 1)
        token = cloud_token or os.environ.get("POCKETLM_CLOUD_TOKEN")  # eval-steer etc. take it from the env
        cloud = RemoteCloud(cloud_spec, token, tokenizer=dev_tok, format=cloud_format)
        return SteerEngine(cloud, dev_tok, dev_model, dev_tok, vocab=vocab, fuse_device_streams=fuse_device_streams,
                           slice_to_tokenizer=slice_to_tokenizer, overlap=True if overlap is None else overlap, kv=kv)
    cloud_model, cloud_tok = loader(cloud_spec, device=device, dtype=dtype, seed=seed)
    if local_spec == cloud_spec:
        dev_model, dev_tok = cloud_model, cloud_tok  # demo: one model plays both roles; streams stay separate
    else:
        dev_model, dev_tok = loader(local_spec, device=device, dtype=dtype, seed=seed + 1)
    return SteerEngine(HFCloudBackend(cloud_model, cloud_tok), cloud_tok, dev_model, dev_tok, vocab=vocab,
                       fuse_device_streams=fuse_device_streams, slice_to_tokenizer=slice_to_tokenizer,
                       overlap=bool(overlap), kv=kv)
