"""Command-line options several commands share, declared once (type, flag and help) and used as annotations:
`device: DeviceOpt = None`. Each command keeps its own default. Options that always travel together form the
groups of groups.py; every comma-list option is read by `comma_list` here, so bad input is one line, not a
traceback."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated

import typer

from ..bench.train_bench import BENCH_PATHS
from ..errors import PocketLMError
from ..steer.streams.kvmode import KV_MODES

DeviceOpt = Annotated[str, typer.Option(help="cpu | cuda (default: cuda when present)")]
DtypeOpt = Annotated[str, typer.Option(help="float32 | bfloat16 | float16")]
ThreadsOpt = Annotated[int, typer.Option(help="torch CPU threads (1 is fastest when another job shares the cores).")]
JsonOutOpt = Annotated[Path, typer.Option("--json", help="Write the results here.")]

# the steering engine (groups.EngineOptions)
CloudOpt = Annotated[str, typer.Option(
    help="Cloud model spec, a step server http://HOST:PORT, or an OpenAI-compatible server openai+http://HOST:PORT "
         "(sees the prompt's tokens only).")]
LocalOpt = Annotated[str, typer.Option(help="On-device model spec (sees the private context).")]
VocabOpt = Annotated[str, typer.Option(help="shared (same tokenizer) | intersection (cross-family).")]
OverlapOpt = Annotated[bool, typer.Option(
    help="Run the cloud step in a worker thread while the device streams step (same tokens; default: on for a "
         "step server).")]
SpeculateOpt = Annotated[int, typer.Option(
    "--speculate", min=0, max=32,
    help="Speculative steering: the device drafts up to K tokens, the cloud checks them in one round trip; the "
         "output is exactly the non-speculative one (greedy: the same tokens). 0 = off.")]
DraftOpt = Annotated[str, typer.Option(
    "--draft", help="Draft policy for --speculate: fused (each method's device-only stand-in) | ctx (the device "
                    "with the context).")]
DraftAheadOpt = Annotated[bool, typer.Option(
    "--draft-ahead/--no-draft-ahead",
    help="With --speculate (greedy, overlap on): draft the next round while the cloud verifies this one; kept "
         "when the whole draft and the device's guess of the next token are accepted, rewound otherwise.")]
DeviceQuantizeOpt = Annotated[str, typer.Option(
    help="Quantize the device model (CPU): int8 = int8 weights per output channel, bf16 activations; about 2.5x "
         "faster device steps than float32. The quantized model is the device model (its scores steer).")]
KvOpt = Annotated[str, typer.Option(
    help="KV cache: static (fixed-shape steps, CUDA graphs on a GPU) | compiled (static, step compiled by "
         "torch.compile first) | dynamic (HF) | auto (static where supported).")]
CloudTokenOpt = Annotated[str, typer.Option(envvar="POCKETLM_CLOUD_TOKEN", help="Bearer token of the step server.")]
CloudLogprobsOpt = Annotated[int, typer.Option(
    help="OpenAI-compatible cloud: top log-probs asked per step (lowered to the server's cap; vLLM "
         "--max-logprobs, llama.cpp answered up to 50).")]
CloudVerifyOpt = Annotated[str, typer.Option(
    help="OpenAI-compatible cloud, with --speculate: how a draft is scored in one round trip: parallel (one step "
         "request per drafted position, all at once; exactly the sequential scores) | echo (one echo request per "
         "row beside one step; llama.cpp's echoed scores drift by ~0.1 nat).")]
CloudPromptOpt = Annotated[str, typer.Option(
    help="OpenAI-compatible cloud prompts: ids (vLLM; exact) | text (llama.cpp; the server re-tokenizes) | auto "
         "(ids, else text).")]

# decoding (groups.SamplingOptions, eval-personal)
MaxNewTokensOpt = Annotated[int, typer.Option(help="Stop after this many new tokens.")]
TemperatureOpt = Annotated[float, typer.Option(help="0 = greedy.")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")]
SeedOpt = Annotated[int, typer.Option(help="Sampling seed.")]

# guards after any fusion rule (groups.GuardOptions, demo)
MaxCopyOpt = Annotated[int, typer.Option(
    help="Leak guard: no span of more than N consecutive words of the private context may be written "
         "(every written token goes to the cloud).")]
ProtectOpt = Annotated[str, typer.Option(
    help="Comma list of words never completed in the output, any casing or tokenization (also 'protect:' in "
         "the context file's front matter).")]
NoRepeatOpt = Annotated[int, typer.Option(help="Repetition limit: no token n-gram of this size occurs twice.")]

# training benchmarks (bench train, bench memory)
ExpertsOpt = Annotated[str, typer.Option(help="Expert counts, comma separated.")]
PathsOpt = Annotated[str, typer.Option(help=f"Mixture paths, from: {', '.join(BENCH_PATHS)}.")]
BatchOpt = Annotated[int, typer.Option(help="Sequences per step.")]
SeqOpt = Annotated[int, typer.Option(help="Tokens per sequence.")]


def comma_list(text: str | None, option: str, cast: Callable = str, what: str = "names") -> tuple:
    """`a,b,,c` -> a tuple of `cast` values (blanks dropped, items stripped); None stays None. A value `cast`
    refuses is a one-line error naming the option."""
    if text is None:
        return None
    try:
        return tuple(cast(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise PocketLMError(f"{option} must be a comma list of {what}, got {text!r}") from None


def str_list(text: str | None, option: str) -> tuple[str, ...] | None:
    """`--protect verbose,Giulia`."""
    return comma_list(text, option)


def int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    """`--ks 16,64`."""
    return comma_list(text, option, int, "integers")


def float_list(text: str | None, option: str) -> tuple[float, ...] | None:
    """`--kappa 1,1.5`."""
    return comma_list(text, option, float, "numbers")


def choice_list(text: str, option: str, choices: Iterable[str], what: str = "name") -> tuple[str, ...]:
    """A non-empty comma list whose every item is one of `choices`."""
    choices = tuple(choices)
    items = str_list(text, option) or ()
    bad = [x for x in items if x not in choices]
    if bad or not items:
        raise PocketLMError(f"{option}: unknown {what}(s) {', '.join(bad) or '(none)'}; choose from "
                            f"{', '.join(choices)}")
    return items


def key_values(pairs: Iterable[str], option: str) -> dict[str, str]:
    """`--set key=value` (repeatable) -> {key: value}."""
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise PocketLMError(f"{option} takes key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def kv_modes(text: str | None, option: str) -> list[str] | None:
    """`--compare-kv static,compiled` ('none': no mode; None: the command's default)."""
    if text is None:
        return None
    modes = [m for m in str_list(text, option) if m != "none"]
    bad = [m for m in modes if m not in KV_MODES or m == "auto"]
    if bad:
        raise PocketLMError(f"{option}: unknown KV mode(s) {', '.join(bad)}; choose from static, compiled, dynamic")
    return modes
