"""`pocketlm serve`: the cloud step server; `pocketlm bench serve`: its latency, throughput and bytes."""

from __future__ import annotations

import logging

import typer
from rich.table import Table

from ..bench.geometries import GEOMETRIES, load_bench_model
from ..errors import PocketLMError
from ..models.quantize import quantize_device_model
from .app import app, bench_app
from .common import machine, require_serve_extra, set_threads, show
from .options import DeviceOpt, DtypeOpt, JsonOutOpt, ThreadsOpt, int_list

log = logging.getLogger(__name__)


@app.command("serve")
def serve_cmd(
    model: str = typer.Option(..., help=f"Cloud model spec (or a random geometry: {', '.join(GEOMETRIES)})."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8400),
    token: str = typer.Option(None, envvar="POCKETLM_SERVE_TOKEN",
                              help="Bearer token clients must send (default: none; set one off loopback)."),
    slots: int = typer.Option(64, help="KV rows for all sessions together (a session uses one per row)."),
    max_rows: int = typer.Option(16, help="Rows in one session."),
    max_prompt_tokens: int = typer.Option(2048, help="Longest prompt accepted."),
    max_new_tokens: int = typer.Option(512, help="Steps per session."),
    ttl: float = typer.Option(300.0, help="Seconds a silent connection is kept (then its rows are freed)."),
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    quantize: str = typer.Option(None, help="Quantize the cloud model (CPU): int8 = int8 weights per output channel, "
                                            "bf16 activations (each row computed on its own, so a verify scores "
                                            "its positions as steps would)."),
) -> None:
    """Serve next-token scores over WebSocket: sessions of token ids in, one score frame per step out."""
    require_serve_extra()
    import uvicorn

    from ..serve import create_app
    from ..serve.runner import uvicorn_config

    limits = _limits(slots, max_rows, max_prompt_tokens, max_new_tokens, ttl)
    set_threads(threads)
    m, tok = load_bench_model(model, device=device, dtype=dtype)
    m = quantize_device_model(m, quantize, role="cloud", option="--quantize")
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a token: anyone who reaches the port can use the model", host)
    asgi = create_app(m, tok, name=model, token=token, limits=limits)
    log.info("step server for %s on http://%s:%d (WebSocket %s)", model, host, port, "/v1/steer")
    uvicorn.Server(uvicorn_config(asgi, limits, host, port, log_level="info")).run()


def _limits(slots: int, max_rows: int, max_prompt_tokens: int, max_new_tokens: int, ttl: float):
    """The server's limits, each checked by its option's name."""
    from ..serve import Limits

    for name, v in (("slots", slots), ("max-rows", max_rows), ("max-prompt-tokens", max_prompt_tokens),
                    ("max-new-tokens", max_new_tokens)):
        if v < 1:
            raise PocketLMError(f"--{name} must be >= 1, got {v}")
    if ttl <= 0:
        raise PocketLMError(f"--ttl must be > 0, got {ttl}")
    return Limits(slots=slots, max_rows=min(max_rows, slots), max_prompt_tokens=max_prompt_tokens,
                  max_new_tokens=max_new_tokens, ttl_s=ttl)


@bench_app.command("serve")
def bench_serve_cmd(
    cloud: str = typer.Option("smollm2-135m-geometry", help="Cloud spec or geometry (served on loopback)."),
    local: str = typer.Option("smollm2-135m-geometry", help="Device spec or geometry."),
    tokens: int = typer.Option(32, help="New tokens per generation (EOS ignored)."),
    context_tokens: int = typer.Option(256, help="Private-context length in tokens."),
    sessions: int = typer.Option(64, help="Concurrent sessions for the aggregate-throughput figure."),
    repeats: int = typer.Option(3, help="Timed rounds (median)."),
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    json_out: JsonOutOpt = None,
) -> None:
    """Plain and steered decoding through a loopback step server vs in process; 1 vs N concurrent sessions;
    bytes per token up and down."""
    require_serve_extra()
    from ..bench.serve_bench import bench_serve

    set_threads(threads)
    doc = bench_serve(cloud, local, tokens=tokens, context_tokens=context_tokens, sessions=sessions,
                      repeats=repeats, device=device, dtype=dtype, threads=threads)
    doc.update(**machine())
    show(_serve_table(doc, f"step server on loopback, cloud {cloud} / device {local}, {tokens} tokens, {dtype} "
                           f"on {doc['hardware']}"), doc, json_out)


def _serve_table(doc: dict, title: str) -> Table:
    table = Table(title=title)
    for col in ("configuration", "tok/s", "ratio", "bytes up/token", "bytes down/token"):
        table.add_column(col, justify="right")
    for name, r in doc["rows"].items():
        table.add_row(name, f"{r['tok_s']:.2f}", f"{r['ratio']:.3f}" if r.get("ratio") else "-",
                      str(r.get("up_per_token", "-")), str(r.get("down_per_token", "-")))
    return table


@bench_app.command("downlink")
def bench_downlink_cmd(
    cloud: str = typer.Option("smollm2-135m", help="Cloud spec (served on loopback)."),
    local: str = typer.Option("smollm2-135m", help="Device spec (same tokenizer)."),
    ks: str = typer.Option("16,64,256", help="Top-k sizes to compare with full f32 rows."),
    methods: str = typer.Option("closed_form,plausible,ada_costeer", help="Steering methods (greedy)."),
    tokens: int = typer.Option(48, help="New tokens per generation at most."),
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    json_out: JsonOutOpt = None,
) -> None:
    """Bytes per token and certification of the top-k downlink vs full f32 rows (tokens must be identical)."""
    require_serve_extra()
    from ..bench.downlink_bench import bench_downlink

    set_threads(threads)
    k_list = int_list(ks, "--ks")
    doc = bench_downlink(cloud, local, ks=k_list, tokens=tokens, methods=methods, device=device, dtype=dtype)
    doc.update(**machine())
    show(_downlink_table(doc, f"downlink, cloud {cloud} / device {local} ({doc['vocab_rows']} rows), {methods}, "
                              f"greedy, on {doc['hardware']}"), doc, json_out)


def _downlink_table(doc: dict, title: str) -> Table:
    table = Table(title=title)
    for col in ("format", "identical to f32", "bytes down/token", "÷ f32", "bytes up/token", "certified by top-k",
                "ids asked/token"):
        table.add_column(col, justify="right")
    for name, r in doc["rows"].items():
        table.add_row(name, f"{r['identical_to_f32']}/{r['generations']}", f"{r['down_per_token']:,.0f}",
                      f"{r['down_ratio_vs_f32']:.4f}", f"{r['up_per_token']:,.0f}",
                      f"{r['certified_share']:.1%}" if "certified_share" in r else "-",
                      f"{r['exact_ids_per_token']:.2f}" if "exact_ids_per_token" in r else "-")
    return table
