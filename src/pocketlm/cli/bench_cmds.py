"""`pocketlm bench train` (the CoMiGS training-step benchmark) and other benchmarks that need no server module."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from rich.table import Table

from ..bench.geometries import GEOMETRIES, load_bench_model
from ..bench.train_bench import bench_train
from ..errors import PocketLMError
from ..jsonfile import write_json
from .app import bench_app, console
from .common import hardware, machine, show
from .options import (
    BatchOpt,
    DeviceOpt,
    DtypeOpt,
    ExpertsOpt,
    JsonOutOpt,
    PathsOpt,
    SeqOpt,
    int_list,
    key_values,
    str_list,
)


@bench_app.command("train")
def bench_train_cmd(
    model: str = typer.Option("smollm2-135m-geometry", help=f"Model spec or a random geometry: {', '.join(GEOMETRIES)}"),
    experts: ExpertsOpt = "2,4,8",
    paths: PathsOpt = "fused,fused_dense,reference",
    batch: BatchOpt = 4,
    seq: SeqOpt = 128,
    steps: int = typer.Option(5, help="Timed steps (median reported)."),
    warmup: int = typer.Option(2),
    peft: bool = typer.Option(True, help="Also time a PEFT LoraConfig LoRA (same rank, scale and modules)."),
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    json_out: JsonOutOpt = None,
) -> None:
    """Median training-step time of single-LoRA vs mixture (fused and reference) on one model and batch."""
    e_list, p_list = list(int_list(experts, "--experts")), str_list(paths, "--paths")
    base, _ = load_bench_model(model, device=device, dtype=dtype)
    doc = bench_train(base, experts=e_list, paths=p_list, batch=batch, seq=seq, steps=steps, warmup=warmup, peft=peft)
    doc.update(model=model, **machine())
    show(train_table(doc, f"training step, {model}, batch {batch} x {seq}, {doc['dtype']} on {doc['hardware']}"),
         doc, json_out)


def train_table(doc: dict, title: str) -> Table:
    """The `bench train` table; a row that ran out of memory (or did not run) shows OOM (or its status)."""
    table = Table(title=title)
    for col in ("experts", "path", "s/step", "ratio vs single LoRA", "vs peft", "saved activations", "peak mem",
                "per-user state"):
        table.add_column(col, justify="right")
    rows = [("1", "single LoRA", doc["single_lora"])]
    if "peft" in doc:
        rows.append(("1", "peft LoRA", doc["peft"]))
    rows += [(str(r["experts"]), r["path"], r) for r in doc["results"]]
    for experts, path, r in rows:
        table.add_row(experts, path, _status(r) or f"{r['step_s']:.3f}", _x(r.get("ratio")), _x(r.get("ratio_vs_peft")),
                      _mb(r.get("saved_activation_bytes")), _mb(r.get("peak_mem_bytes")), _mb(r.get("per_user_bytes")))
    return table


def _status(r: dict) -> str | None:
    """OOM / timeout / error for a row without a time (None when it has one)."""
    if r.get("step_s") is not None:
        return None
    return "OOM" if r.get("oom") else r.get("status") or "-"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}"


@bench_app.command("gpu")
def bench_gpu_cmd(
    json_out: Path = typer.Option(..., "--json", help="Write every row here (and the tables to the same name .md)."),
    size: str = typer.Option("gpu", help="gpu (the issue's sizes, < 6 min on an H200) | small (a CPU) | tiny."),
    device: DeviceOpt = None,
    models: str = typer.Option(None, help="Training geometries/models, comma separated (default: by size)."),
    experts: str = typer.Option(None, help="Expert counts, comma separated (default: 2,4,8)."),
    paths: str = typer.Option(None, help="Mixture paths (default: fused,fused_recompute,reference)."),
    kv: str = typer.Option(None, help="Decoding KV modes (default: static,dynamic,compiled)."),
    methods: str = typer.Option(None, help="Steering methods (default: all)."),
    budget: float = typer.Option(None, help="Total seconds; no configuration starts after them (default by size)."),
) -> None:
    """The bounded benchmark suite: training (both geometries, E 2/4/8, every path and PEFT) and decoding (every
    method, every KV mode), each configuration in its own process under its own time limit; one JSON."""
    from ..bench.gpu_suite import markdown, run_suite
    from ..bench.gpu_suite import size as suite_size

    s = suite_size(size, train_models=str_list(models, "--models"), experts=int_list(experts, "--experts"),
                   paths=str_list(paths, "--paths"), kv_modes=str_list(kv, "--kv"), methods=methods, budget=budget)
    doc = run_suite(s, device)
    write_json(doc, json_out)
    md = markdown(doc)
    json_out.with_suffix(".md").write_text(md)
    console.print(md, markup=False, highlight=False, soft_wrap=True)


def _mb(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


@bench_app.command("memory")
def bench_memory_cmd(
    model: str = typer.Option("qwen2.5-0.5b-geometry", help=f"A geometry: {', '.join(GEOMETRIES)}"),
    experts: ExpertsOpt = "2,4,8",
    paths: PathsOpt = "fused,fused_recompute,fused_dense,reference",
    batch: BatchOpt = 64,
    seq: SeqOpt = 128,
    dtype: DtypeOpt = "bfloat16",
    json_out: JsonOutOpt = None,
) -> None:
    """Exact training-step activation memory at a real geometry, computed on the meta device (no GPU needed)."""
    from ..bench.memory import bench_memory, meta_model

    e_list, p_list = list(int_list(experts, "--experts")), str_list(paths, "--paths")
    doc = bench_memory(meta_model(model, dtype), experts=e_list, paths=p_list, batch=batch, seq=seq)
    doc.update(model=model, torch=torch.__version__)
    show(_memory_table(doc, f"training-step memory, {model}, batch {batch} x {seq}, {doc['dtype']} "
                            f"(weights {_gb(doc['weights_bytes'])})"), doc, json_out)
    console.print("resident at backward = weights + adapters, their gradients and AdamW moments + saved activations;"
                  " a GPU's peak adds backward's transient buffers")


def _memory_table(doc: dict, title: str) -> Table:
    table = Table(title=title)
    for col in ("experts", "path", "saved activations", "x single LoRA", "per-user state", "resident at backward"):
        table.add_column(col, justify="right")
    s = doc["single_lora"]
    table.add_row("1", "single LoRA", _gb(s["saved_activation_bytes"]), "1.00", _mb(s["per_user_bytes"]),
                  _gb(s["resident_at_backward_bytes"]))
    for r in doc["results"]:
        table.add_row(str(r["experts"]), r["path"], _gb(r["saved_activation_bytes"]), f"{r['activation_ratio']:.2f}",
                      _mb(r["per_user_bytes"]), _gb(r["resident_at_backward_bytes"]))
    return table


def _gb(n) -> str:
    return f"{n / 2**30:.2f} GiB"


@bench_app.command("fl-overhead")
def bench_fl_overhead_cmd(
    config: str = typer.Option(None, "--config", "-c", help="pocketlm TOML (users = the corpus's users)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a training key (repeatable)."),
    users: int = typer.Option(4, help="Users in the corpus (one SuperNode each)."),
    out: str = typer.Option("runs/bench-fl", help="Working folder."),
    json_out: JsonOutOpt = None,
) -> None:
    """Seconds per round: in-process simulation vs a Flower deployment on loopback (same work)."""
    from ..bench.fl_bench import overhead
    from ..collab import load_config

    cfg = load_config(config, overrides)
    doc = overhead(cfg.to_dict(), users, Path(out) / "overhead")
    doc["hardware"] = hardware()
    console.print(f"simulation s/round {doc['simulation_s_per_round']}; flower s/round {doc['flower_s_per_round']}; "
                  f"ratio {doc['ratio_all_rounds']:.2f} (after round 1: {doc['ratio_after_round_1']})")
    if json_out:
        write_json(doc, json_out)


@bench_app.command("fl-scale")
def bench_fl_scale_cmd(
    users: str = typer.Option("10,1000", help="Numbers of virtual users (comma-separated)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a training key (repeatable)."),
    out: str = typer.Option("runs/bench-fl", help="Working folder."),
    json_out: JsonOutOpt = None,
) -> None:
    """Flower's simulation engine: time per round and peak memory vs the number of virtual users (tiny model)."""
    from ..bench.fl_bench import scale

    train = {"model": "tiny-llama", "rounds": 1, "local_steps": 1, "batch_size": 1, "seq_len": 16,
             "router_every": 1, "router_steps": 1, **key_values(overrides, "--set")}
    rows = []
    for n in int_list(users, "--users"):
        rows.append(scale(train, n, Path(out) / f"scale-{n}"))
        console.print(rows[-1])
    doc = {"hardware": hardware(), "train": train, "rows": rows}
    if json_out:
        write_json(doc, json_out)


@bench_app.command("openai")
def bench_openai_cmd(
    server: str = typer.Option(None, help="An OpenAI-compatible server openai+http://HOST:PORT (default: start "
                               "llama-cpp-python's server on --gguf here, on loopback)."),
    gguf: str = typer.Option("smollm2-135m", help="GGUF path or built-in name for the started llama.cpp server."),
    local: str = typer.Option("smollm2-135m", help="Device spec (the served model's tokenizer)."),
    ks: str = typer.Option("20,50", help="Top log-probs per step to compare."),
    methods: str = typer.Option("closed_form,plausible", help="Steering methods (greedy)."),
    tokens: int = typer.Option(32, help="New tokens per generation at most."),
    requests: int = typer.Option(4, help="Built-in requests (query + private context), 1..4."),
    prompt: str = typer.Option("auto", help="Prompt mode: auto | ids | text."),
    speculate: int = typer.Option(0, help="Also steer speculatively with this many drafted tokens per verify, "
                                  "with each verify mode (parallel, echo); 0: sequential only."),
    rtt: float = typer.Option(0.0, help="Round-trip time (ms) added between the device and the server by a "
                              "delaying loopback proxy."),
    threads: int = typer.Option(None, help="Threads of the started llama.cpp server."),
    json_out: JsonOutOpt = None,
) -> None:
    """Steering through an OpenAI-compatible server: top-K certification, exact requests, round trip and bytes;
    with --speculate, speculative steering (tok/s, tokens per round trip, same tokens as sequential)."""
    from ..bench.openai_bench import bench_openai

    k_list = int_list(ks, "--ks")
    if server is None:
        _require_llama_cpp()
    doc = bench_openai(server, local, gguf=gguf, ks=k_list, tokens=tokens, requests=requests, methods=methods,
                       prompt=prompt, threads=threads, speculate=speculate, rtt_ms=rtt)
    doc.update(**machine())
    show(_openai_table(doc, f"OpenAI-compatible cloud: {doc['cloud']} / device {local}, {methods}, greedy, "
                            f"RTT {rtt:g} ms, on {doc['hardware']}"), doc, json_out)


def _require_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise PocketLMError('starting a llama.cpp server needs llama-cpp-python: pip install '
                            '"llama-cpp-python[server]" (or pass --server)') from None


def _openai_table(doc: dict, title: str) -> Table:
    table = Table(title=title)
    for col in ("config", "prompts", "certified by top-K", "ids asked/token", "uncertified", "excluded",
                "requests/token", "step round trip ms", "tok/s", "tokens/round trip", "bytes up/token",
                "bytes down/token", "same as widest K", "same as sequential"):
        table.add_column(col, justify="right")
    for name, r in doc["rows"].items():
        per_rt = r.get("tokens_per_round_trip")
        table.add_row(name, r["prompt_mode"], f"{r['certified_share']:.1%}", f"{r['exact_ids_per_token']:.2f}",
                      str(r["uncertified"]), f"{r['excluded_share']:.1%}", f"{r['requests_per_token']:.2f}",
                      f"{r['step_round_trip_ms']:.0f}", f"{r['tok_s']:.2f}", "-" if per_rt is None else f"{per_rt:.2f}",
                      f"{r['bytes_up_per_token']:,.0f}", f"{r['bytes_down_per_token']:,.0f}",
                      f"{r['identical_to_widest']}/{r['generations']}",
                      f"{r['identical_to_sequential']}/{r['generations']}")
    return table
