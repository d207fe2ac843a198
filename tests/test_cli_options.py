"""The CLI's shared options: every comma list goes through one parser, so bad input is a one-line error (exit 2, no
traceback) before any model loads; option groups put each shared option on every command that takes the group."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from typing import Annotated

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from pocketlm.cli import app
from pocketlm.cli.groups import EngineOptions, GuardOptions, SamplingOptions, group, with_groups
from pocketlm.cli.options import choice_list, comma_list, float_list, int_list, key_values, kv_modes, str_list
from pocketlm.errors import PocketLMError


def test_comma_lists_parse_and_strip():
    assert int_list("2, 4,,8", "--experts") == (2, 4, 8)
    assert float_list("1,1.5", "--kappa") == (1.0, 1.5)
    assert str_list(" fused , reference,", "--paths") == ("fused", "reference")
    assert comma_list(None, "--models") is None and str_list("", "--x") == ()
    assert choice_list("cloud,both", "--methods", ("cloud", "both", "weights")) == ("cloud", "both")
    assert kv_modes("none", "--compare-kv") == [] and kv_modes("static,dynamic", "--compare-kv") == ["static", "dynamic"]
    assert key_values(["rounds=2", "experts=2,3"], "--set") == {"rounds": "2", "experts": "2,3"}


@pytest.mark.parametrize("call, says", [
    (lambda: int_list("2,x", "--experts"), "--experts must be a comma list of integers, got '2,x'"),
    (lambda: int_list("1.5", "--ks"), "--ks must be a comma list of integers"),
    (lambda: float_list("a,1", "--kappa"), "--kappa must be a comma list of numbers"),
    (lambda: choice_list("cloud,magic", "--methods", ("cloud",), "method"), "unknown method(s) magic"),
    (lambda: choice_list(",", "--methods", ("cloud",), "method"), "unknown method(s) (none)"),
    (lambda: kv_modes("static,paged", "--compare-kv"), "unknown KV mode(s) paged"),
    (lambda: key_values(["rounds"], "--set"), "--set takes key=value, got 'rounds'"),
])
def test_bad_lists_are_pocketlm_errors(call, says):
    with pytest.raises(PocketLMError) as e:
        call()
    assert says in str(e.value)


def _cli(*args):
    return subprocess.run([sys.executable, "-c", "from pocketlm.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, says", [
    (["bench", "train", "--model", "tiny-llama", "--experts", "2,four"], "--experts must be a comma list of integers"),
    (["bench", "memory", "--experts", "x"], "--experts must be a comma list of integers"),
    (["bench", "fl-scale", "--users", "10,many"], "--users must be a comma list of integers"),
    (["bench", "fl-scale", "--set", "rounds"], "--set takes key=value"),
    (["bench", "gpu", "--json", "unused.json", "--experts", "2,x"], "--experts must be a comma list of integers"),
    (["bench", "openai", "--server", "openai+http://127.0.0.1:9", "--ks", "20,lots"], "--ks must be a comma list"),
    (["eval-personal", "--run", ".", "--methods", "cloud,magic"], "unknown method(s) magic"),
    (["bench", "steer", "--cloud", "tiny-llama", "--local", "tiny-llama", "--compare-kv", "paged"], "unknown KV mode"),
])
def test_bad_comma_lists_on_the_command_line_are_one_line(args, says, tmp_path):
    proc = _cli(*args)
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stderr
    assert says in err and "Traceback" not in err and err.startswith("error:") and "\n" not in err, err


def _options(*path: str) -> set[str]:
    cmd = get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return {p.name for p in cmd.params}


def test_each_group_reaches_every_command_that_takes_it():
    engine = {"cloud", "local", "device", "dtype", "threads", "vocab", "kv", "overlap", "cloud_token",
              "cloud_logprobs", "cloud_prompt", "cloud_verify", "device_quantize", "speculate", "draft", "draft_ahead"}
    assert {f for f in EngineOptions.__dataclass_fields__} == engine
    guards, decode = set(GuardOptions.__dataclass_fields__), set(SamplingOptions.__dataclass_fields__)
    assert engine | guards | decode | {"adapters", "signal", "cloud_format", "downlink_sampling"} <= _options("steer")
    assert engine | guards | decode <= _options("eval-steer")
    assert engine <= _options("bench", "steer")  # its own --overlap times the overlapped engine
    assert engine - {"local", "cloud_token", "cloud_logprobs", "cloud_prompt", "cloud_verify",
                     "device_quantize"} <= _options("eval-personal")


@dataclass(frozen=True)
class _Toy:
    size: Annotated[int, typer.Option(help="A size.")]
    speculate: Annotated[int, typer.Option(help="Draft tokens.")] = 0


def test_a_group_field_is_one_option_everywhere_with_per_command_tuning():
    toy = typer.Typer()

    @toy.command("a")
    @with_groups
    def a(name: str = typer.Option("x"), *, opts: _Toy) -> None:
        print(name, opts)

    @toy.command("b")
    @with_groups
    def b(*, opts: _Toy = group("speculate", size=3)) -> None:
        print(opts)

    run = CliRunner()
    res = run.invoke(toy, ["a", "--size", "2", "--speculate", "4"])
    assert res.exit_code == 0 and "x _Toy(size=2, speculate=4)" in res.output, res.output
    assert run.invoke(toy, ["a"]).exit_code != 0  # a field without a default is a required option
    res = run.invoke(toy, ["b"])
    assert res.exit_code == 0 and "_Toy(size=3, speculate=0)" in res.output, res.output
    assert run.invoke(toy, ["b", "--speculate", "1"]).exit_code != 0  # left out for b
    with pytest.raises(TypeError, match="declared twice"):
        @with_groups
        def clash(size: int = 1, *, opts: _Toy) -> None: ...
    with pytest.raises(TypeError, match="no option"):
        @with_groups
        def typo(*, opts: _Toy = group(sise=1)) -> None: ...
