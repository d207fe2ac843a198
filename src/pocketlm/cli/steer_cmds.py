"""`pocketlm steer`, `pocketlm eval-steer`, `pocketlm bench steer`: CoSteer decoding-time personalization."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import typer
from rich.table import Table

from ..bench.geometries import GEOMETRIES, load_bench_model
from ..errors import DataError, PocketLMError
from ..jsonfile import write_json
from ..steer.engine import Sampling, SteerRequest
from ..steer.fusion.guards import build_guards
from ..steer.fusion.leak_guard import parse_front_matter
from ..steer.fusion.methods import METHODS, get_method, parse_methods
from ..steer.session import load_engine
from ..steer.streams.kvmode import KV_MODES
from .app import app, bench_app, console
from .bench_cmds import hardware
from .options import (
    CloudLogprobsOpt,
    CloudPromptOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOutOpt,
    KvOpt,
    MaxCopyOpt,
    MaxNewTokensOpt,
    NoRepeatOpt,
    OverlapOpt,
    ProtectOpt,
    SeedOpt,
    TemperatureOpt,
    ThreadsOpt,
    TopPOpt,
    VocabOpt,
)

EVAL_METHODS = "cloud,cloud_with_context,device_with_context,costeer,light_costeer,closed_form,plausible,adaptive"
BENCH_METHODS = "costeer,light_costeer,closed_form,plausible,adaptive,ada_costeer,device_with_context"


def _threads(n: int | None) -> None:
    if n is not None:
        if n < 1:
            raise PocketLMError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def _kv_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    modes = [m.strip() for m in text.split(",") if m.strip() and m.strip() != "none"]
    bad = [m for m in modes if m not in KV_MODES or m == "auto"]
    if bad:
        raise PocketLMError(f"--compare-kv: unknown KV mode(s) {', '.join(bad)}; choose from static, compiled, dynamic")
    return modes


def _kappa_desc(m):
    """A method's kappa for the result JSON: a number, the loop's equivalent, or None (no steering)."""
    if m.rule.kind == "loop":
        return f"T={m.rule.T} loop == kappa {m.rule.kappa_value():.5f}"
    return m.rule.kappa_value() if m.rule.steers else None


def _words(text: str | None) -> list[str]:
    return [w.strip() for w in (text or "").split(",") if w.strip()]


def _sampling(temperature: float, top_p: float, seed: int, downlink: str = "exact") -> Sampling:
    return Sampling(temperature=temperature, top_p=top_p, seed=seed, downlink=downlink)


@app.command("steer")
def steer_cmd(
    prompt: str = typer.Argument(..., help="The public prompt (the only text the cloud sees)."),
    cloud: str = typer.Option(..., help="Cloud model spec, a step server http://HOST:PORT, or an OpenAI-compatible "
                              "server openai+http://HOST:PORT (sees the prompt's tokens only)."),
    local: str = typer.Option(..., help="On-device model spec (sees the private context)."),
    context: Path = typer.Option(None, help="Private context file (stays on the device)."),
    cloud_token: str = typer.Option(None, envvar="POCKETLM_CLOUD_TOKEN", help="Bearer token of the step server."),
    cloud_format: str = typer.Option("f32", help="Step-server score format: f32 (exact) | f16 | bf16 | topk[:K] "
                                     "(certified top-k downlink: greedy tokens equal f32's, ~8K bytes per token)."),
    cloud_logprobs: CloudLogprobsOpt = 20,
    cloud_prompt: CloudPromptOpt = "auto",
    downlink_sampling: str = typer.Option("exact", help="With --cloud-format topk and --temperature > 0: exact "
                                          "(fetch full rows) | truncated (sample among the top-k ids only)."),
    method: str = typer.Option("closed_form", help=f"One of: {', '.join(METHODS)} (name@kappa allowed)."),
    kappa: float = typer.Option(None, help="Steering strength for closed_form/plausible/adaptive/ada_costeer."),
    max_new_tokens: MaxNewTokensOpt = 128,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    vocab: VocabOpt = "shared",
    overlap: OverlapOpt = None,
    kv: KvOpt = "auto",
    max_copy: MaxCopyOpt = None,
    protect: ProtectOpt = None,
    no_repeat_ngram: NoRepeatOpt = None,
    adapters: Path = typer.Option(None, help="A user's adapter folder from a CoMiGS run (runs/.../users/<user>): "
                                  "the device becomes that user's personal model."),
    signal: str = typer.Option("context", help="What steers: context (log p(.|ctx,x) - log p(.|x)) | weights "
                               "(log p_personal(.|x) - log p_base(.|x), needs --adapters, no context) | both | specialist "
                               "(log p_personal(.|x) - log p_shared(.|x): what the private experts add; no context)."),
) -> None:
    """Generate one steered answer, streaming tokens to the terminal (overlap defaults to on for a step server)."""
    ctx, protected = "", _words(protect)
    if context is not None:
        if not context.is_file():
            raise DataError(f"context file {context} not found")
        ctx, front = parse_front_matter(context.read_text(encoding="utf-8"))
        protected += front
    m = get_method(method, kappa).with_guards(*build_guards(max_copy, protected, no_repeat_ngram)).with_signal(signal)
    if signal != "context" and adapters is None:
        raise PocketLMError(f"--signal {signal} steers with a personal model's adapters: give --adapters DIR")
    if m.needs_context and not ctx.strip():
        raise PocketLMError(f"method {m.name!r} with signal {signal!r} needs --context FILE")
    sampling = _sampling(temperature, top_p, seed, downlink_sampling)
    engine = load_engine(cloud, local, device=device, dtype=dtype, vocab=vocab, overlap=overlap, kv=kv,
                         adapters=str(adapters) if adapters else None, cloud_token=cloud_token,
                         cloud_format=cloud_format, cloud_logprobs=cloud_logprobs, cloud_prompt=cloud_prompt)
    ids: list[int] = []
    shown = ""

    def on_token(_row: int, tok: int) -> None:
        nonlocal shown
        ids.append(tok)
        text = engine.device_tok.decode(ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    engine.generate([SteerRequest.with_context(prompt, ctx)], [m],
                    max_new_tokens=max_new_tokens, sampling=sampling, on_token=on_token)
    sys.stdout.write("\n")


@app.command("eval-steer")
def eval_steer_cmd(
    data: Path = typer.Option(..., help="CoGenesis or LongLaMP jsonl."),
    cloud: str = typer.Option(..., help="Cloud model spec, or openai+http://HOST:PORT (an OpenAI-compatible server)."),
    local: str = typer.Option(..., help="On-device model spec."),
    methods: str = typer.Option(EVAL_METHODS, help=f"Comma list of: {', '.join(METHODS)} (name@kappa allowed)."),
    kappas: str = typer.Option(None, help="Extra closed_form kappas for sensitivity, e.g. 0.5,1,3."),
    limit: int = typer.Option(None, help="First N rows only (after --offset)."),
    offset: int = typer.Option(0, help="Skip the first N rows (run slices separately, pool with eval-steer-merge)."),
    ids: str = typer.Option(None, help="Only the rows with these ids (comma list), e.g. the rows "
                            "eval-steer-overlay --plan says a guard may change."),
    max_new_tokens: MaxNewTokensOpt = 128,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    vocab: VocabOpt = "shared",
    threads: ThreadsOpt = None,
    overlap: OverlapOpt = False,
    kv: KvOpt = "auto",
    cloud_logprobs: CloudLogprobsOpt = 20,
    cloud_prompt: CloudPromptOpt = "auto",
    max_copy: MaxCopyOpt = None,
    protect: ProtectOpt = None,
    no_repeat_ngram: NoRepeatOpt = None,
    json_out: Path = typer.Option(None, "--json", help="Write scores (+ every generation) here."),
) -> None:
    """Generate with every method on each row and score ROUGE-1/ROUGE-L (METEOR when WordNet is installed)."""
    from ..data.steering import load_steer_data
    from ..eval.steer_eval import evaluate

    if limit is not None and limit < 1:
        raise PocketLMError(f"--limit must be >= 1, got {limit}")
    if offset < 0:
        raise PocketLMError(f"--offset must be >= 0, got {offset}")
    examples = _select_ids(load_steer_data(data, limit, offset), ids)
    guards = build_guards(max_copy, _words(protect), no_repeat_ngram)
    ms = [m.with_guards(*guards) for m in parse_methods(methods, kappas)]
    _threads(threads)
    sampling = _sampling(temperature, top_p, seed)
    engine = load_engine(cloud, local, device=device, dtype=dtype, vocab=vocab, overlap=overlap, kv=kv,
                         cloud_logprobs=cloud_logprobs, cloud_prompt=cloud_prompt)
    settings = {"settings": {"data": str(data), "cloud": cloud, "local": local, "limit": limit, "offset": offset,
                             "ids": [e.id for e in examples] if ids else None,
                             "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                             "seed": seed, "dtype": dtype, "vocab": vocab, "kv": kv, "hardware": hardware(),
                             "guards": [g.name for g in guards],
                             "methods": [m.name for m in ms], "kappas": {m.name: _kappa_desc(m) for m in ms},
                             "torch": torch.__version__}}
    doc = evaluate(engine, examples, ms, max_new_tokens=max_new_tokens, sampling=sampling, json_out=json_out,
                   settings=settings)
    _print_scores(doc, f"eval-steer on {data.name}: {len(examples)} rows, {max_new_tokens} new tokens max")


@app.command("eval-steer-merge")
def eval_steer_merge_cmd(
    runs: list[Path] = typer.Argument(..., help="eval-steer JSON files of disjoint row slices."),
    data: Path = typer.Option(..., help="The data file the runs read (for the references)."),
    json_out: Path = typer.Option(None, "--json", help="Write the pooled scores here."),
) -> None:
    """Pool eval-steer runs over disjoint slices (--offset) into one score: ROUGE and paired deltas recomputed."""
    from ..data.steering import load_steer_data
    from ..eval.steer_eval import merge_runs

    docs = [_read_eval_doc(path) for path in runs]
    doc = merge_runs(docs, load_steer_data(data))
    doc["settings"]["data"] = str(data)
    _print_scores(doc, f"eval-steer pooled over {len(runs)} runs: {doc['examples_done']} rows")
    if json_out:
        write_json(doc, json_out, indent=1, ensure_ascii=False)


def _select_ids(examples: list, ids: str | None) -> list:
    if not ids:
        return examples
    wanted = _words(ids)
    known = {e.id for e in examples}
    unknown = [i for i in wanted if i not in known]
    if not wanted or unknown:
        raise PocketLMError(f"--ids: no row with id {', '.join(map(repr, unknown[:5]))}" if unknown
                            else "--ids needs at least one id")
    keep = set(wanted)
    return [e for e in examples if e.id in keep]


def _read_eval_doc(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise PocketLMError(f"eval-steer result {path} not found") from None
    except json.JSONDecodeError as e:
        raise PocketLMError(f"{path} is not an eval-steer JSON file ({e.msg})") from None
    if not isinstance(doc, dict) or "examples" not in doc or "methods" not in doc:
        raise PocketLMError(f"{path} is not an eval-steer JSON file (no 'methods'/'examples')")
    return doc


@app.command("eval-steer-overlay")
def eval_steer_overlay_cmd(
    base: Path = typer.Argument(..., help="An unguarded greedy eval-steer (or eval-steer-merge) JSON."),
    patches: list[Path] = typer.Argument(None, help="eval-steer JSONs of the rows regenerated with --max-copy N."),
    data: Path = typer.Option(..., help="The data file the runs read."),
    max_copy: int = typer.Option(..., help="The guard's N (words)."),
    methods: str = typer.Option(None, help="Comma list of the base's methods to score (default: all)."),
    plan: bool = typer.Option(False, "--plan", help="Only list, per method, the rows the guard may change."),
    json_out: Path = typer.Option(None, "--json", help="Write the guarded run's scores here."),
) -> None:
    """Score a --max-copy N run from an unguarded one plus the rows the guard may change, regenerated.

    Greedy rows that the guard provably leaves alone are reused (each one is checked)."""
    from ..data.steering import load_steer_data
    from ..eval.steer_overlay import needs_regeneration, overlay_runs

    doc = _read_eval_doc(base)
    examples = load_steer_data(data)
    names = _words(methods) or None
    if plan:
        for name, rows in needs_regeneration(doc, examples, max_copy, names).items():
            typer.echo(f"{name}: {len(rows)} of {len(doc['examples'])} rows" + (f" --ids {','.join(rows)}" if rows else ""))
        return
    out = overlay_runs(doc, [(str(p), _read_eval_doc(p)) for p in patches or []], examples, max_copy, names)
    ov = out["overlay"]
    _print_scores(out, f"--max-copy {max_copy}: {ov['regenerated']} rows regenerated, {ov['reused']} reused unchanged")
    if json_out:
        write_json(out, json_out, indent=1, ensure_ascii=False)


def _leak_cells(leak: dict | None) -> tuple[str, str, str]:
    if not leak:
        return "-", "-", "-"
    return (f"{100 * leak['ngram5_share']:.1f}%", str(leak["longest_copy_words"]),
            f"{100 * leak['context_word_share']:.0f}%")


def _print_scores(doc: dict, title: str) -> None:
    table = Table(title=title)
    for col in ("method", "private", "n", "ROUGE-1", "ROUGE-L", "METEOR", "dR1 vs cloud (se)", "5-gram leak",
                "longest copy", "ctx-word outputs"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=col == "method")
    for name, r in doc["methods"].items():
        d = r.get("rouge1_delta_vs_cloud")
        table.add_row(name, "yes" if r["private"] else "NO", str(r["n"]), f"{r['rouge1']:.2f}", f"{r['rougeL']:.2f}",
                      "n/a" if r["meteor"] is None else f"{r['meteor']:.2f}",
                      f"{d['mean']:+.2f} ({d['se']:.2f})" if d else "-", *_leak_cells(r.get("leak")))
    console.print(table)
    if not doc["meteor"]["available"]:
        console.print(f"METEOR unavailable: {doc['meteor']['reason']}")


@bench_app.command("steer")
def bench_steer_cmd(
    cloud: str = typer.Option("smollm2-135m-geometry", help=f"Cloud spec or geometry: {', '.join(GEOMETRIES)}"),
    local: str = typer.Option("smollm2-135m-geometry", help="Device spec or geometry."),
    tokens: int = typer.Option(32, help="New tokens per timed generation (EOS ignored)."),
    context_tokens: int = typer.Option(1024, help="Private-context length in tokens."),
    methods: str = typer.Option(BENCH_METHODS),
    repeats: int = typer.Option(3, help="Timed rounds (median), interleaved across methods."),
    unbatched: bool = typer.Option(True, help="Also time closed_form with the two device streams unbatched."),
    overlap: bool = typer.Option(True, help="Also time closed_form with the cloud step overlapped (worker thread)."),
    kv: KvOpt = "auto",
    compare_kv: str = typer.Option(None, help="KV modes to also time plain and closed_form on, comma list "
                                   "(default: the other of static/dynamic; 'none' for none)."),
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    json_out: JsonOutOpt = None,
) -> None:
    """Decoding tokens/s of plain cloud greedy decoding and of each steering method, in one run."""
    from ..bench.steer_bench import bench_steer

    ms = parse_methods(methods)
    _threads(threads)
    geometry = cloud in GEOMETRIES or local in GEOMETRIES
    engine = load_engine(cloud, local, device=device, dtype=dtype, loader=load_bench_model,
                         slice_to_tokenizer=not geometry, kv=kv)
    doc = bench_steer(engine, ms, tokens=tokens, context_tokens=context_tokens, repeats=repeats,
                      unbatched=unbatched, overlap=overlap, compare_kv=_kv_list(compare_kv))
    doc.update(cloud=cloud, local=local, dtype=dtype, hardware=hardware(), torch=torch.__version__)
    table = Table(title=f"steer decoding, cloud {cloud} / device {local}, {doc['context_tokens']}-token context, "
                        f"{tokens} tokens, batch 1, {dtype}, {doc['kv']} KV cache on {doc['hardware']}")
    for col in ("method", "tok/s", "ratio vs plain", "steered tokens"):
        table.add_column(col, justify="right")
    table.add_row("plain cloud", f"{doc['plain_tok_s']:.2f}", "1.00", "-")
    for name, r in doc["methods"].items():
        table.add_row(name, f"{r['tok_s']:.2f}", f"{r['ratio']:.3f}", str(r.get("steered_tokens", "-")))
    console.print(table)
    if json_out:
        write_json(doc, json_out)
