"""`pocketlm steer`, `pocketlm eval-steer`, `pocketlm bench steer`: CoSteer decoding-time personalization.
The engine, sampling and guard options are the groups of groups.py, shared by the three commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from ..bench.geometries import GEOMETRIES, load_bench_model
from ..errors import PocketLMError
from ..jsonfile import write_json
from ..steer import METHODS, Generation, SteerEngine, SteerRequest, get_method, parse_methods
from .app import app, bench_app, console
from .common import machine, show
from .groups import (
    DownlinkOptions,
    EngineOptions,
    GuardOptions,
    PersonalOptions,
    SamplingOptions,
    group,
    read_context,
    with_groups,
)
from .options import JsonOutOpt, kv_modes, str_list

EVAL_METHODS = "cloud,cloud_with_context,device_with_context,costeer,light_costeer,closed_form,plausible,adaptive"
BENCH_METHODS = "costeer,light_costeer,closed_form,plausible,adaptive,ada_costeer,device_with_context"


@app.command("steer")
@with_groups
def steer_cmd(
    prompt: str = typer.Argument(..., help="The public prompt (the only text the cloud sees)."),
    context: Path = typer.Option(None, help="Private context file (stays on the device)."),
    method: str = typer.Option("closed_form", help=f"One of: {', '.join(METHODS)} (name@kappa allowed)."),
    kappa: float = typer.Option(None, help="Steering strength for closed_form/plausible/adaptive/ada_costeer."),
    *,
    engine: EngineOptions,
    personal: PersonalOptions,
    downlink: DownlinkOptions,
    decode: SamplingOptions,
    guards: GuardOptions,
) -> None:
    """Generate one steered answer, streaming tokens to the terminal (overlap defaults to on for a step server)."""
    steer_once(prompt, context, method, kappa, engine=engine, personal=personal, downlink=downlink, decode=decode,
               guards=guards)


def steer_once(prompt: str, context: Path | None, method: str, kappa: float | None, *, engine: EngineOptions,
               personal: PersonalOptions, downlink: DownlinkOptions, decode: SamplingOptions,
               guards: GuardOptions) -> tuple[Generation, list]:
    """`steer`'s work (also `device steer`'s): one answer streamed to stdout; returns it and the guards it ran."""
    ctx, protected = read_context(context)
    gs = guards.build(protected)
    m = personal.apply(get_method(method, kappa).with_guards(*gs))
    if m.needs_context and not ctx.strip():
        raise PocketLMError(f"method {m.name!r} with signal {personal.signal!r} needs --context FILE")
    sampling = decode.sampling(downlink)
    eng = engine.load(personal=personal, downlink=downlink)
    gen = eng.generate([SteerRequest.with_context(prompt, ctx)], [m], max_new_tokens=decode.max_new_tokens,
                       sampling=sampling, on_token=TextStream(eng).on_token)[0]
    sys.stdout.write("\n")
    return gen, gs


class TextStream:
    """Writes a generation to stdout as its tokens arrive, holding back a split multi-byte character."""

    def __init__(self, engine: SteerEngine):
        self.tok, self.ids, self.shown = engine.device_tok, [], ""

    def on_token(self, _row: int, tok: int) -> None:
        self.ids.append(tok)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


@app.command("eval-steer")
@with_groups
def eval_steer_cmd(
    data: Path = typer.Option(..., help="CoGenesis or LongLaMP jsonl."),
    methods: str = typer.Option(EVAL_METHODS, help=f"Comma list of: {', '.join(METHODS)} (name@kappa allowed)."),
    kappas: str = typer.Option(None, help="Extra closed_form kappas for sensitivity, e.g. 0.5,1,3."),
    limit: int = typer.Option(None, help="First N rows only (after --offset)."),
    offset: int = typer.Option(0, help="Skip the first N rows (run slices separately, pool with eval-steer-merge)."),
    ids: str = typer.Option(None, help="Only the rows with these ids (comma list), e.g. the rows "
                            "eval-steer-overlay --plan says a guard may change."),
    json_out: Path = typer.Option(None, "--json", help="Write scores (+ every generation) here."),
    *,
    engine: EngineOptions = group(overlap=False),
    decode: SamplingOptions,
    guards: GuardOptions,
) -> None:
    """Generate with every method on each row and score ROUGE-1/ROUGE-L (METEOR when WordNet is installed)."""
    from ..eval.steer_eval import evaluate

    examples = _load_rows(data, limit, offset, ids)
    gs = guards.build()
    ms = [m.with_guards(*gs) for m in parse_methods(methods, kappas)]
    sampling = decode.sampling()
    eng = engine.load()
    hw = machine()
    settings = {"data": str(data), "cloud": engine.cloud, "local": engine.local, "limit": limit, "offset": offset,
                "ids": [e.id for e in examples] if ids else None, "max_new_tokens": decode.max_new_tokens,
                "temperature": decode.temperature, "top_p": decode.top_p, "seed": decode.seed, "dtype": engine.dtype,
                "vocab": engine.vocab, "kv": engine.kv, "hardware": hw["hardware"], "guards": [g.name for g in gs],
                "methods": [m.name for m in ms], "kappas": {m.name: _kappa_desc(m) for m in ms}, "torch": hw["torch"],
                "speculate": engine.speculate, "draft": engine.draft}
    doc = evaluate(eng, examples, ms, max_new_tokens=decode.max_new_tokens, sampling=sampling, json_out=json_out,
                   settings={"settings": settings})
    _print_scores(doc, f"eval-steer on {data.name}: {len(examples)} rows, {decode.max_new_tokens} new tokens max")


def _load_rows(data: Path, limit: int | None, offset: int, ids: str | None) -> list:
    """The rows eval-steer runs: `--offset`, `--limit`, then `--ids`."""
    from ..data.steering import load_steer_data

    if limit is not None and limit < 1:
        raise PocketLMError(f"--limit must be >= 1, got {limit}")
    if offset < 0:
        raise PocketLMError(f"--offset must be >= 0, got {offset}")
    return _select_ids(load_steer_data(data, limit, offset), ids)


def _kappa_desc(m):
    """A method's kappa for the result JSON: a number, the loop's equivalent, or None (no steering)."""
    if m.rule.kind == "loop":
        return f"T={m.rule.T} loop == kappa {m.rule.kappa_value():.5f}"
    return m.rule.kappa_value() if m.rule.steers else None


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
    wanted = list(str_list(ids, "--ids"))
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
    names: bool = typer.Option(False, "--names", help="Price the default guard: --max-copy N plus the context's "
                                                        "proper names protected (patches from eval-steer without "
                                                        "--no-guard)."),
    plan: bool = typer.Option(False, "--plan", help="Only list, per method, the rows the guard may change."),
    json_out: Path = typer.Option(None, "--json", help="Write the guarded run's scores here."),
) -> None:
    """Score a --max-copy N run (or, with --names, the default guard) from an unguarded one plus the rows the
    guard may change, regenerated.

    Greedy rows that the guard provably leaves alone are reused (each one is checked)."""
    from ..data.steering import load_steer_data
    from ..eval.steer_overlay import needs_regeneration, overlay_runs

    doc = _read_eval_doc(base)
    examples = load_steer_data(data)
    chosen = list(str_list(methods, "--methods") or ()) or None
    if plan:
        for name, rows in needs_regeneration(doc, examples, max_copy, chosen, names).items():
            typer.echo(f"{name}: {len(rows)} of {len(doc['examples'])} rows" + (f" --ids {','.join(rows)}" if rows else ""))
        return
    out = overlay_runs(doc, [(str(p), _read_eval_doc(p)) for p in patches or []], examples, max_copy, chosen, names)
    ov = out["overlay"]
    _print_scores(out, f"{' + '.join(out['settings']['guards'])}: {ov['regenerated']} rows regenerated, {ov['reused']} reused unchanged")
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
@with_groups
def bench_steer_cmd(
    tokens: int = typer.Option(32, help="New tokens per timed generation (EOS ignored)."),
    context_tokens: int = typer.Option(1024, help="Private-context length in tokens."),
    methods: str = typer.Option(BENCH_METHODS),
    repeats: int = typer.Option(3, help="Timed rounds (median), interleaved across methods."),
    unbatched: bool = typer.Option(True, help="Also time closed_form with the two device streams unbatched."),
    overlap: bool = typer.Option(True, help="Also time closed_form with the cloud step overlapped (worker thread)."),
    compare_kv: str = typer.Option(None, help="KV modes to also time plain and closed_form on, comma list "
                                   "(default: the other of static/dynamic; 'none' for none)."),
    json_out: JsonOutOpt = None,
    *,
    engine: EngineOptions = group(
        "overlap",  # this command's --overlap times the overlapped engine beside the plain one
        cloud=typer.Option("smollm2-135m-geometry", help=f"Cloud spec or geometry: {', '.join(GEOMETRIES)}"),
        local=typer.Option("smollm2-135m-geometry", help="Device spec or geometry.")),
) -> None:
    """Decoding tokens/s of plain cloud greedy decoding and of each steering method, in one run."""
    from ..bench.steer_bench import bench_steer

    ms, kv_list = parse_methods(methods), kv_modes(compare_kv, "--compare-kv")
    geometry = engine.cloud in GEOMETRIES or engine.local in GEOMETRIES
    eng = engine.load(loader=load_bench_model, slice_to_tokenizer=not geometry)
    doc = bench_steer(eng, ms, tokens=tokens, context_tokens=context_tokens, repeats=repeats,
                      unbatched=unbatched, overlap=overlap, compare_kv=kv_list)
    doc.update(cloud=engine.cloud, local=engine.local, dtype=engine.dtype, **machine())
    show(_bench_table(doc, f"steer decoding, cloud {engine.cloud} / device {engine.local}, {doc['context_tokens']}"
                           f"-token context, {tokens} tokens, batch 1, {engine.dtype}, {doc['kv']} KV cache on "
                           f"{doc['hardware']}"), doc, json_out)


def _bench_table(doc: dict, title: str) -> Table:
    table = Table(title=title)
    for col in ("method", "tok/s", "ratio vs plain", "steered tokens"):
        table.add_column(col, justify="right")
    table.add_row("plain cloud", f"{doc['plain_tok_s']:.2f}", "1.00", "-")
    for name, r in doc["methods"].items():
        table.add_row(name, f"{r['tok_s']:.2f}", f"{r['ratio']:.3f}", str(r.get("steered_tokens", "-")))
    return table
