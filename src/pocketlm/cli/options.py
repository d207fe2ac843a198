"""Command-line options several commands share, declared once (type, flag and help) and used as annotations:
`device: DeviceOpt = None`. Each command keeps its own default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..bench.train_bench import BENCH_PATHS
from ..errors import PocketLMError

DeviceOpt = Annotated[str, typer.Option(help="cpu | cuda (default: cuda when present)")]
DtypeOpt = Annotated[str, typer.Option(help="float32 | bfloat16 | float16")]
ThreadsOpt = Annotated[int, typer.Option(help="torch CPU threads (1 is fastest when another job shares the cores).")]
JsonOutOpt = Annotated[Path, typer.Option("--json", help="Write the results here.")]

# decoding (steer, eval-steer)
MaxNewTokensOpt = Annotated[int, typer.Option(help="Stop after this many new tokens.")]
TemperatureOpt = Annotated[float, typer.Option(help="0 = greedy.")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")]
SeedOpt = Annotated[int, typer.Option(help="Sampling seed.")]
VocabOpt = Annotated[str, typer.Option(help="shared (same tokenizer) | intersection (cross-family).")]
OverlapOpt = Annotated[bool, typer.Option(
    help="Run the cloud step in a worker thread while the device streams step (same tokens).")]
KvOpt = Annotated[str, typer.Option(
    help="KV cache: static (fixed-shape steps, CUDA graphs on a GPU) | compiled (static, step compiled by "
         "torch.compile first) | dynamic (HF) | auto (static where supported).")]

# an OpenAI-compatible cloud (steer, eval-steer: --cloud openai+http://HOST:PORT)
CloudLogprobsOpt = Annotated[int, typer.Option(
    help="OpenAI-compatible cloud: top log-probs asked per step (lowered to the server's cap; vLLM "
         "--max-logprobs, llama.cpp answered up to 50).")]
CloudPromptOpt = Annotated[str, typer.Option(
    help="OpenAI-compatible cloud prompts: ids (vLLM; exact) | text (llama.cpp; the server re-tokenizes) | auto "
         "(ids, else text).")]

def _comma_list(text: str, option: str, cast, what: str) -> tuple:
    """A comma list from the command line, or a one-line error naming the option."""
    try:
        return tuple(cast(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise PocketLMError(f"{option} must be a comma list of {what}, got {text!r}") from None


def int_list(text: str, option: str) -> tuple[int, ...]:
    """`--ks 16,64`."""
    return _comma_list(text, option, int, "integers")


def float_list(text: str, option: str) -> tuple[float, ...]:
    """`--kappa 1,1.5`."""
    return _comma_list(text, option, float, "numbers")


# guards after any fusion rule (steer, eval-steer, demo)
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
