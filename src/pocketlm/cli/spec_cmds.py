"""`pocketlm bench spec`: speculative steering over a simulated WAN (a delay proxy on loopback)."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from .app import bench_app
from .common import machine, require_serve_extra, set_threads, show
from .options import DeviceOpt, DeviceQuantizeOpt, DtypeOpt, JsonOutOpt, ThreadsOpt, int_list


@bench_app.command("spec")
def bench_spec_cmd(
    cloud: str = typer.Option("smollm2-135m", help="Cloud spec (served by a `pocketlm serve` child process)."),
    local: str = typer.Option("smollm2-135m", help="Device spec (the same tokenizer)."),
    rtt: str = typer.Option("0,50,100,200", "--rtt", help="Round-trip times to simulate, ms (comma list)."),
    mbit: float = typer.Option(None, "--mbit", help="Link bandwidth, Mbit/s each way (default: unlimited, a "
                                                   "latency-only link)."),
    ks: str = typer.Option("2,4,8", help="Draft lengths for --speculate (comma list)."),
    tokens: int = typer.Option(48, help="New tokens per generation at most (greedy)."),
    prompts: int = typer.Option(3, min=1, max=4, help="Built-in prompts with a private profile (1..4)."),
    repeats: int = typer.Option(1, min=1, help="Runs of each configuration (formats interleaved); the median's "
                                               "record is kept, every run's tok/s listed."),
    kappa: float = typer.Option(1.0, help="kappa of closed_form (and SpecSteer's beta is its own default 1)."),
    cloud_format: str = typer.Option("f32", help="Downlink: f32 | f16 | bf16 | topk[:K]; a comma list runs each "
                                                 "configuration in every format back to back."),
    overlap: bool = typer.Option(True, help="Overlap the device's last draft step with the verify in flight."),
    ahead: bool = typer.Option(True, "--ahead/--no-ahead",
                               help="Run each speculative configuration also with the next draft written during "
                                    "the verify in flight (--draft-ahead), to compare with and without."),
    plot: Path = typer.Option(None, help="Write a PNG of tok/s against RTT."),
    device: DeviceOpt = None,
    device_quantize: DeviceQuantizeOpt = None,
    cloud_quantize: str = typer.Option(None, help="Quantize the served cloud model (`pocketlm serve --quantize`): "
                                                  "int8 on a CPU, where its multi-token verify then costs closer "
                                                  "to one step."),
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    json_out: JsonOutOpt = None,
) -> None:
    """tok/s of the cloud alone, closed_form, closed_form --speculate K and SpecSteer at each RTT; tokens per
    round trip, acceptance, bytes per token, identical greedy tokens; a projection to GPU cloud step times."""
    if mbit is not None and not (math.isfinite(mbit) and mbit > 0):
        raise typer.BadParameter(f"a bandwidth in Mbit/s > 0, got {mbit:g}", param_hint="--mbit")
    require_serve_extra()
    from ..bench.spec_bench import bench_spec, plot_spec, spec_table

    set_threads(threads)
    doc = bench_spec(cloud, local, rtts=int_list(rtt, "--rtt"), ks=int_list(ks, "--ks"), tokens=tokens,
                     prompts=prompts, kappa=kappa, fmt=cloud_format, overlap=overlap, device=device, dtype=dtype,
                     threads=threads, ahead=ahead, device_quantize=device_quantize, mbit_s=mbit,
                     cloud_quantize=cloud_quantize, repeats=repeats)
    doc.update(**machine())
    quant = f" ({device_quantize})" if device_quantize else ""
    cloud_quant = f" ({cloud_quantize})" if cloud_quantize else ""
    link = f"{mbit:g} Mbit/s, " if mbit else ""
    table = Table(title=f"speculative steering over a simulated WAN: {local}{quant} drafting for {cloud}{cloud_quant}, {cloud_format}, "
                        f"{tokens} tokens x {prompts} prompts, {link}overlap {'on' if overlap else 'off'}, "
                        f"on {doc['hardware']}")
    for col in ("configuration", "RTT ms", "tok/s", "vs closed_form", "tokens/round trip", "acceptance",
                "ahead kept", "bytes up/token", "bytes down/token", "identical"):
        table.add_column(col, justify="right")
    for row in spec_table(doc):
        table.add_row(*row)
    show(table, doc, json_out)
    if plot:
        plot_spec(doc, plot)
