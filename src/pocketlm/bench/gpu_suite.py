"""One bounded benchmark suite: the training step on two geometries and decoding on every KV mode, one JSON.

Every configuration runs in its own subprocess under its own time limit (a watchdog): a configuration that
hangs, runs out of memory or crashes becomes one `timeout` / `oom` / `error` row and frees everything it held
when its process ends, and the rest still run. A total budget stops starting new configurations once spent
(`skipped` rows), so the suite ends in bounded time whatever happens (under 6 minutes on an H200 by default).

Training rows: the single LoRA, PEFT's LoRA and every (E, path), each timed alone in its process; ratios are
computed here against the single LoRA and against PEFT of the same geometry. Decoding rows: one process per KV
mode runs `bench_steer` (plain decoding, every method, the unbatched-device and overlapped variants); ratios
are against plain decoding on the same cache, and plain decoding on each cache is also compared to the dynamic
cache. Only torch, transformers, typer, rich, safetensors and peft are needed (no gguf / rouge / nltk import).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..errors import PocketLMError
from ..progress import progress

log = logging.getLogger(__name__)

STEER_METHODS = "costeer,light_costeer,closed_form,plausible,adaptive,ada_costeer,device_with_context"
TRAIN_PATHS = ("fused", "fused_recompute", "reference")
# hf_static: transformers' own generate on its StaticCache (compiled with mode="reduce-overhead" on a GPU)
KV_MODES = ("static", "dynamic", "hf_static", "compiled")


@dataclass
class SuiteSize:
    """Sizes of one suite run. `gpu` is the issue's setting; `small` fits a CPU in minutes; `tiny` is for tests."""

    train_models: tuple[str, ...]
    batch: int
    seq: int
    steps: int
    warmup: int
    cloud: str
    local: str
    tokens: int
    context_tokens: int
    repeats: int
    dtype: str
    experts: tuple[int, ...] = (2, 4, 8)
    paths: tuple[str, ...] = TRAIN_PATHS
    kv_modes: tuple[str, ...] = KV_MODES
    methods: str = STEER_METHODS
    train_timeout: float = 40.0      # seconds per training configuration (process start included)
    steer_timeout: float = 90.0      # seconds per KV mode
    compiled_timeout: float = 100.0  # compiled and hf_static compile each step shape first
    budget: float = 330.0            # total; no configuration starts after it is spent


SIZES = {
    "gpu": SuiteSize(train_models=("smollm2-135m-geometry", "qwen2.5-0.5b-geometry"), batch=64, seq=128, steps=3,
                     warmup=1, cloud="qwen2.5-7b-geometry", local="qwen2.5-0.5b-geometry", tokens=32,
                     context_tokens=1024, repeats=2, dtype="bfloat16"),
    "small": SuiteSize(train_models=("smollm2-135m-geometry",), batch=2, seq=64, steps=2, warmup=1,
                       cloud="smollm2-135m-geometry", local="smollm2-135m-geometry", tokens=8, context_tokens=128,
                       repeats=1, dtype="float32", train_timeout=180, steer_timeout=300, compiled_timeout=300,
                       budget=3600),
    "tiny": SuiteSize(train_models=("tiny-llama",), batch=2, seq=16, steps=1, warmup=0, cloud="tiny-qwen2",
                      local="tiny-qwen2", tokens=4, context_tokens=32, repeats=1, dtype="float32", experts=(2,),
                      paths=("fused",), kv_modes=("static", "dynamic", "hf_static"), methods="closed_form",
                      train_timeout=120, steer_timeout=120, budget=600),
}


def size(name: str, **overrides) -> SuiteSize:
    if name not in SIZES:
        raise PocketLMError(f"unknown suite size {name!r}; choose from {', '.join(SIZES)}")
    s = replace(SIZES[name], **{k: v for k, v in overrides.items() if v is not None})
    bad = [p for p in s.paths if p not in TRAIN_PATHS]
    bad += [m for m in s.kv_modes if m not in KV_MODES]
    if bad:
        raise PocketLMError(f"unknown suite path/KV mode {', '.join(bad)}; paths: {', '.join(TRAIN_PATHS)}; "
                            f"KV modes: {', '.join(KV_MODES)}")
    return s


# -- the configurations, each run in a child process ------------------------------------------------------
def jobs(s: SuiteSize, device: str | None) -> list[dict]:
    """Decoding on the static and dynamic caches first (the issue's main question), then every training row,
    then the two compiled decoders (slowest to start): if the budget runs out, the last rows are skipped."""
    common = {"device": device, "dtype": s.dtype}
    late = ("hf_static", "compiled")
    steer = {m: {"kind": "hf" if m == "hf_static" else "steer", "kv": m, "cloud": s.cloud, "local": s.local,
                 "tokens": s.tokens, "context_tokens": s.context_tokens, "repeats": s.repeats, "methods": s.methods,
                 **common, "timeout": s.compiled_timeout if m in late else s.steer_timeout} for m in s.kv_modes}
    out = [steer[m] for m in s.kv_modes if m not in late]
    for model in s.train_models:
        train = {"kind": "train", "model": model, "batch": s.batch, "seq": s.seq, "steps": s.steps,
                 "warmup": s.warmup, "timeout": s.train_timeout, **common}
        out += [{**train, "config": c} for c in ("single", "peft")]
        out += [{**train, "config": "mixture", "experts": e, "path": p} for e in s.experts for p in s.paths]
    return out + [steer[m] for m in late if m in steer]


def run_child(job: dict) -> dict:
    """Runs in the child process: one configuration, its result as a dict."""
    from .geometries import load_bench_model

    if job["kind"] == "train":
        from .train_bench import bench_train

        base, _ = load_bench_model(job["model"], device=job["device"], dtype=job["dtype"])
        mixture = job["config"] == "mixture"
        doc = bench_train(base, experts=[job["experts"]] if mixture else [], paths=(job.get("path", "fused"),),
                          batch=job["batch"], seq=job["seq"], steps=job["steps"], warmup=job["warmup"],
                          single=job["config"] == "single", peft=job["config"] == "peft")
        row = doc["results"][0] if mixture else doc["single_lora"] if job["config"] == "single" else doc["peft"]
        return {k: v for k, v in row.items() if not k.startswith("ratio")}
    if job["kind"] == "hf":
        from .hf_decode import bench_hf_generate

        model, tok = load_bench_model(job["cloud"], device=job["device"], dtype=job["dtype"])
        doc = bench_hf_generate(model, tok, tokens=job["tokens"], repeats=job["repeats"])
        return {**doc, "plain_tok_s": doc["static_tok_s"], "kv": "hf_static"}
    from ..steer.fusion.methods import parse_methods
    from ..steer.session import load_engine
    from .geometries import GEOMETRIES
    from .steer_bench import bench_steer

    geometry = job["cloud"] in GEOMETRIES or job["local"] in GEOMETRIES
    engine = load_engine(job["cloud"], job["local"], device=job["device"], dtype=job["dtype"],
                         loader=load_bench_model, slice_to_tokenizer=not geometry, kv=job["kv"])
    return bench_steer(engine, parse_methods(job["methods"]), tokens=job["tokens"],
                       context_tokens=job["context_tokens"], repeats=job["repeats"], compare_kv=[])


def run_job(job: dict, timeout: float) -> dict:
    """Run one configuration in a fresh process (its own session, so a timeout kills everything it started).
    Returns {"status": ok|oom|timeout|error, "seconds": wall time, "result": ..., "error": ...}."""
    with tempfile.TemporaryDirectory(prefix="pocketlm-suite-") as tmp:
        spec, out = Path(tmp) / "job.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps(job))
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])  # the `src` folder this package runs from
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        env.setdefault("POCKETLM_PROGRESS", "0")
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "pocketlm.bench.gpu_suite", str(spec), str(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return {"status": "timeout", "seconds": round(time.perf_counter() - t0, 1),
                    "error": f"no result within {timeout:.0f} s"}
        except BaseException:  # Ctrl-C in the suite: its own session would not get the signal
            _kill(proc)
            raise
        seconds = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0 or not out.is_file():
            tail = [line for line in (err or "").strip().splitlines() if line.strip()][-3:]
            oom = "OutOfMemoryError" in (err or "") or "out of memory" in (err or "")
            return {"status": "oom" if oom else "error", "seconds": seconds,
                    "error": " | ".join(tail) or f"exit code {proc.returncode}"}
        result = json.loads(out.read_text())
        return {"status": "oom" if result.get("oom") else "ok", "seconds": seconds, "result": result}


def _kill(proc: subprocess.Popen) -> None:
    """End the child's own session: the child and anything it started (e.g. compile workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def hardware_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "cuda": torch.version.cuda, "gpu": None}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a dependency
        pass
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "memory_bytes": p.total_memory, "capability": f"{p.major}.{p.minor}"}
    return info


def run_suite(s: SuiteSize, device: str | None = None) -> dict:
    """Every configuration of `s` under its own time limit and the total budget; one document."""
    start = time.perf_counter()
    done = []
    todo = jobs(s, device)
    for job in progress(todo, desc="benchmark suite", total=len(todo)):
        left = s.budget - (time.perf_counter() - start)
        if left < 5:
            outcome = {"status": "skipped", "seconds": 0.0, "error": "total budget spent"}
        else:
            outcome = run_job(job, min(job["timeout"], left))
        log.info("%s: %s (%.1f s)", _label(job), outcome["status"], outcome["seconds"])
        done.append((job, outcome))
    return {"suite": asdict(s), "device": device, "hardware": hardware_info(),
            "wall_s": round(time.perf_counter() - start, 1), "train": _train_rows(done), "steer": _steer_rows(done)}


def _label(job: dict) -> str:
    if job["kind"] != "train":
        return f"decode {job['kv']}"
    tail = f" E={job['experts']} {job['path']}" if job["config"] == "mixture" else f" {job['config']}"
    return f"train {job['model']}{tail}"


def _ratio(a, b):
    return a / b if a and b else None


def _train_rows(done: list) -> list[dict]:
    rows = []
    for job, outcome in done:
        if job["kind"] != "train":
            continue
        r = outcome.get("result") or {}
        rows.append({"model": job["model"], "config": job["config"], "experts": job.get("experts", 1),
                     "path": job.get("path", job["config"]), "status": outcome["status"],
                     "seconds": outcome["seconds"], "error": outcome.get("error"), **r})
    for row in rows:
        same = {x["config"]: x.get("step_s") for x in rows if x["model"] == row["model"] and x["config"] != "mixture"}
        row["ratio"] = _ratio(row.get("step_s"), same.get("single"))
        row["ratio_vs_peft"] = _ratio(row.get("step_s"), same.get("peft"))
    return rows


def _steer_rows(done: list) -> dict:
    out = {}
    for job, outcome in done:
        if job["kind"] in ("steer", "hf"):
            out[job["kv"]] = {"status": outcome["status"], "seconds": outcome["seconds"],
                              "error": outcome.get("error"), **(outcome.get("result") or {})}
    dynamic = (out.get("dynamic") or {}).get("plain_tok_s")
    for mode in out.values():
        mode["plain_vs_dynamic"] = _ratio(mode.get("plain_tok_s"), dynamic)
    return out


def markdown(doc: dict) -> str:
    """The suite's tables in markdown (for BENCHMARKS.md)."""
    hw = doc["hardware"]
    where = hw["gpu"]["name"] if hw.get("gpu") else f"{hw['cpu']} CPU ({hw['cpu_count']} cores)"
    s = doc["suite"]
    lines = [f"Suite on {where}, torch {hw['torch']}, transformers {hw.get('transformers')}, peft {hw.get('peft')}, "
             f"{s['dtype']}; {doc['wall_s']:.0f} s in total.", "",
             f"Training step (batch {s['batch']} x {s['seq']}, median of {s['steps']} steps, one process per row):", "",
             "| model | experts | path | s/step | vs single LoRA | vs peft | peak memory | status |",
             "|---|---:|---|---:|---:|---:|---:|---|"]
    for r in doc["train"]:
        peak = r.get("peak_mem_bytes")
        lines.append(f"| {r['model']} | {r['experts']} | {r['path']} | {_num(r.get('step_s'), 3)} | "
                     f"{_num(r['ratio'])} | {_num(r['ratio_vs_peft'])} | "
                     f"{'-' if peak is None else f'{peak / 2**30:.1f} GiB'} | {_status(r)} |")
    lines += ["", f"Decoding (cloud {s['cloud']} / device {s['local']}, batch 1, {s['context_tokens']}-token context, "
                  f"{s['tokens']} tokens, median of {s['repeats']}):", "",
              "| KV cache | row | tok/s | vs plain (same cache) | plain vs dynamic cache | status |",
              "|---|---|---:|---:|---:|---|"]
    for mode, m in doc["steer"].items():
        plain = "plain, transformers generate on its StaticCache" if mode == "hf_static" else "plain"
        lines.append(f"| {mode} | {plain} | {_num(m.get('plain_tok_s'))} | 1.00 | {_num(m['plain_vs_dynamic'])} | "
                     f"{_status(m)} |")
        for name, r in (m.get("methods") or {}).items():
            lines.append(f"| {mode} | {name} | {_num(r['tok_s'])} | {_num(r['ratio'], 3)} | | |")
        if m.get("dynamic_tok_s"):
            lines.append(f"| {mode} | transformers generate, its DynamicCache | {_num(m['dynamic_tok_s'])} | "
                         f"{_num(m['dynamic_tok_s'] / m['plain_tok_s'], 3)} | | |")
    return "\n".join(lines) + "\n"


def _num(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _status(r: dict) -> str:
    if r["status"] in ("ok", "oom"):
        return "OOM" if r["status"] == "oom" else "ok"
    return f"{r['status']}: {(r.get('error') or '')[:80]}"


def _child_main(spec: str, out: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    result = run_child(json.loads(Path(spec).read_text()))
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    _child_main(*sys.argv[1:3])
