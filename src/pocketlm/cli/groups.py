"""Option groups: options that always travel together, declared once as a dataclass and handed to the library as
one object (`engine.load()`, `guards.build()`, `decode.sampling(downlink)`).

A command parameter annotated with a group (`engine: EngineOptions`) is expanded by `with_groups` into the
group's options, and the command receives one `EngineOptions`. A field added to a group (say `--speculate K`)
is therefore an option of every command that takes the group. `group(*exclude, **defaults)`, as the parameter's
default, tunes a group for one command: options it has no use for, other defaults, or a whole
`typer.Option(...)` where the help must differ."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.models import ParameterInfo

from ..errors import DataError, PocketLMError
from ..steer import Method, Sampling, SteerEngine, load_engine
from ..steer.fusion.guards import build_guards
from ..steer.fusion.leak_guard import DEFAULT_MAX_COPY, parse_front_matter, private_by_default
from ..steer.speculative import Speculation
from .common import set_threads
from .options import (
    CloudLogprobsOpt,
    CloudOpt,
    CloudPromptOpt,
    CloudTokenOpt,
    CloudVerifyOpt,
    DeviceOpt,
    DeviceQuantizeOpt,
    DraftAheadOpt,
    DraftOpt,
    DtypeOpt,
    KvOpt,
    LocalOpt,
    MaxCopyOpt,
    MaxNewTokensOpt,
    NoRepeatOpt,
    OverlapOpt,
    ProtectOpt,
    SeedOpt,
    SpeculateOpt,
    TemperatureOpt,
    ThreadsOpt,
    TopPOpt,
    VocabOpt,
    str_list,
)


@dataclass(frozen=True)
class EngineOptions:
    """The steering engine: the two models, where they run, how the decode loop runs, how a remote cloud is
    reached. Everything here reaches `load_engine` (or, for engines around loaded models, `decoding()`)."""

    PANEL = "Engine"
    cloud: CloudOpt
    local: LocalOpt
    device: DeviceOpt = None
    device_quantize: DeviceQuantizeOpt = None
    dtype: DtypeOpt = "float32"
    threads: ThreadsOpt = None
    vocab: VocabOpt = "shared"
    kv: KvOpt = "auto"
    overlap: OverlapOpt = None
    cloud_token: CloudTokenOpt = None
    cloud_logprobs: CloudLogprobsOpt = 20
    cloud_prompt: CloudPromptOpt = "auto"
    cloud_verify: CloudVerifyOpt = "parallel"
    speculate: SpeculateOpt = 0
    draft: DraftOpt = "fused"
    draft_ahead: DraftAheadOpt = False

    @property
    def speculation(self) -> Speculation:
        return Speculation(self.speculate, self.draft, self.draft_ahead)

    def decoding(self) -> dict:
        """The `SteerEngine` settings, for a command that wraps models it loaded itself (eval-personal)."""
        return {"vocab": self.vocab, "kv": self.kv, "overlap": bool(self.overlap), "speculate": self.speculation}

    def load(self, *, personal: PersonalOptions | None = None, downlink: DownlinkOptions | None = None,
             **library) -> SteerEngine:
        """Set the threads, then `load_engine`; `library`: what a command adds (the benchmark loader)."""
        set_threads(self.threads)
        return load_engine(self.cloud, self.local, device=self.device, dtype=self.dtype, vocab=self.vocab,
                           kv=self.kv, overlap=self.overlap, cloud_token=self.cloud_token,
                           cloud_logprobs=self.cloud_logprobs, cloud_prompt=self.cloud_prompt,
                           cloud_verify=self.cloud_verify, device_quantize=self.device_quantize,
                           adapters=personal.adapter_dir if personal else None,
                           cloud_format=downlink.cloud_format if downlink else "f32",
                           speculate=self.speculation, **library)


@dataclass(frozen=True)
class PersonalOptions:
    """A CoMiGS user's model on the device, and which difference of its distributions steers."""

    PANEL = "Personal model"
    adapters: Annotated[Path, typer.Option(
        help="A user's adapter folder from a CoMiGS run (runs/.../users/<user>) or a Flower device's state "
             "directory (--state of pocketlm fl supernode): the device becomes that user's personal model.")] = None
    signal: Annotated[str, typer.Option(
        help="What steers: context (log p(.|ctx,x) - log p(.|x)) | weights (log p_personal(.|x) - log p_base(.|x), "
             "needs --adapters, no context) | both | specialist (log p_personal(.|x) - log p_shared(.|x): what the "
             "private experts add; no context).")] = "context"

    @property
    def adapter_dir(self) -> str | None:
        return str(self.adapters) if self.adapters else None

    def apply(self, method: Method) -> Method:
        """`method` steered by this signal; a signal other than the context needs the adapters."""
        method = method.with_signal(self.signal)
        if self.signal != "context" and self.adapters is None:
            raise PocketLMError(f"--signal {self.signal} steers with a personal model's adapters: give --adapters DIR")
        return method


@dataclass(frozen=True)
class DownlinkOptions:
    """What the cloud sends down per step, and how sampling treats a truncated step."""

    PANEL = "Downlink"
    cloud_format: Annotated[str, typer.Option(
        help="Step-server score format: f32 (exact) | f16 | bf16 | topk[:K] (certified top-k downlink: greedy "
             "tokens equal f32's, ~8K bytes per token).")] = "f32"
    downlink_sampling: Annotated[str, typer.Option(
        help="With --cloud-format topk and --temperature > 0: exact (fetch full rows) | truncated (sample among "
             "the top-k ids only).")] = "exact"


@dataclass(frozen=True)
class SamplingOptions:
    """How many tokens and how each is drawn."""

    PANEL = "Decoding"
    max_new_tokens: MaxNewTokensOpt = 128
    temperature: TemperatureOpt = 0.0
    top_p: TopPOpt = 1.0
    seed: SeedOpt = 0

    def sampling(self, downlink: DownlinkOptions | None = None) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                        downlink=downlink.downlink_sampling if downlink else "exact")


@dataclass(frozen=True)
class GuardOptions:
    """Guards after any fusion rule: what may be copied from the private context, what never written. Private by
    default: every written token reaches the cloud, so unless told `--no-guard` at most `--max-copy` (8) words of
    the context are copied and its proper names are never written (leak_guard.private_by_default)."""

    PANEL = "Guards"
    max_copy: MaxCopyOpt = None
    protect: ProtectOpt = None
    no_repeat_ngram: NoRepeatOpt = None
    no_guard: Annotated[bool, typer.Option(
        "--no-guard", help=f"Turn off the default leak guard (--max-copy {DEFAULT_MAX_COPY} + the context's proper "
                           "names protected); an explicit --max-copy / --protect still applies.")] = False

    def build(self, protect: Iterable[str] = ()) -> list:
        """The guards; `protect`: more protected words (a context file's front matter: under the default guard
        protected where the public prompt lacks them, like the context's names; with `--no-guard` always)."""
        words = list(str_list(self.protect, "--protect") or ())
        if self.no_guard:
            return build_guards(self.max_copy, [*words, *protect], self.no_repeat_ngram)
        return [*private_by_default(self.max_copy, protect), *build_guards(None, words, self.no_repeat_ngram)]


def read_context(path: Path | None) -> tuple[str, list[str]]:
    """(private context, protected words of its front matter) from `--context FILE`; ("", []) without one."""
    if path is None:
        return "", []
    if not path.is_file():
        raise DataError(f"context file {path} not found")
    return parse_front_matter(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class _Tuning:
    exclude: tuple[str, ...]
    defaults: dict


def group(*exclude: str, **defaults: Any) -> Any:
    """A group parameter's default: leave out the options named in `exclude`; give others another default (a value,
    or a whole `typer.Option(...)`)."""
    return _Tuning(exclude, defaults)


def _is_group(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _in_panel(info: ParameterInfo, panel: str | None) -> ParameterInfo:
    """A copy of a typer option listed under the group's heading in --help (the shared declaration is untouched)."""
    info = copy.copy(info)
    info.rich_help_panel = info.rich_help_panel or panel
    return info


def _expand(cls: type, tuning: _Tuning) -> list[inspect.Parameter]:
    """The group's fields as keyword parameters that typer reads (annotation and default, as if written out), each
    listed under the group's `PANEL` in --help."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = (set(tuning.exclude) | set(tuning.defaults)) - set(fields)
    if unknown:
        raise TypeError(f"{cls.__name__} has no option(s) {', '.join(sorted(unknown))}")
    hints = typing.get_type_hints(cls, include_extras=True)
    panel = getattr(cls, "PANEL", None)
    out = []
    for name, f in fields.items():
        if name in tuning.exclude:
            continue
        default = tuning.defaults.get(name, ... if f.default is dataclasses.MISSING else f.default)
        base, info = typing.get_args(hints[name])  # Annotated[type, typer.Option(...)]
        if isinstance(default, ParameterInfo):  # the command's own typer.Option replaces the shared one
            annotation, default = base, _in_panel(default, panel)
        else:
            annotation = Annotated[base, _in_panel(info, panel)]
        out.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return out


def with_groups(fn: Callable) -> Callable:
    """Register under `@app.command(...)`: every parameter annotated with a group becomes the group's options on
    the command line and one group object in the call. Names must not collide (checked at import)."""
    hints = typing.get_type_hints(fn, include_extras=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, tuple[type, list[str], dict]] = {}
    for p in inspect.signature(fn).parameters.values():
        tp = hints.get(p.name, p.annotation)
        if not _is_group(tp):
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=tp))
            continue
        tuning = p.default if isinstance(p.default, _Tuning) else _Tuning((), {})
        expanded = _expand(tp, tuning)
        left_out = {f.name: None for f in dataclasses.fields(tp)
                    if f.name in tuning.exclude and f.default is dataclasses.MISSING}
        groups[p.name] = (tp, [q.name for q in expanded], left_out)
        params += expanded
    names = [q.name for q in params]
    if len(set(names)) != len(names):
        raise TypeError(f"{fn.__name__}: options declared twice: {sorted({n for n in names if names.count(n) > 1})}")

    @functools.wraps(fn)
    def command(**kwargs):
        for name, (cls, fields, left_out) in groups.items():
            kwargs[name] = cls(**{f: kwargs.pop(f) for f in fields}, **left_out)
        return fn(**kwargs)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {q.name: q.annotation for q in params}
    return command
