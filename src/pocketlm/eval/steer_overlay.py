"""Score a leak-guarded run without regenerating the rows the guard cannot have changed.

Under greedy decoding a guard that refuses nothing changes nothing, and `max_copy_untouched` says (from the text
alone, conservatively) when `MaxCopy(N)` would have refused nothing. So an unguarded greedy run is the guarded
run on every row that passes that check; only the other (row, method) pairs need generating again with
`eval-steer --max-copy N --ids ...`. With `names` the guard priced is the default one (`MaxCopy(N)` plus the
context's proper names protected): a row is reused when it also writes none of its protected names, and the
patches are `eval-steer --max-copy N` runs without `--no-guard`. On the 1.5B CoGenesis pair that is a fraction of the 48 x methods rows, which
is what makes the ROUGE-vs-leakage table affordable on a CPU. Every reused pair is checked, never assumed.
"""

from __future__ import annotations

from ..data.steering import SteerExample
from ..errors import DataError
from ..steer.fusion.leak_guard import max_copy_untouched, names_untouched
from .steer_eval import _kappa_value, _MethodInfo, score

SAME_KEYS = ("max_new_tokens", "temperature", "top_p", "dtype", "vocab")


def _known_methods(base: dict, names: list[str]) -> None:
    missing = [n for n in names if n not in base["methods"]]
    if missing:
        raise DataError(f"the base run has no method {', '.join(map(repr, missing))}")


def untouched(text: str, ex: SteerExample, max_copy: int, names: bool) -> bool:
    """Would the guard (`MaxCopy(max_copy)`, plus `ProtectNames` with `names`) have refused nothing in `text`?"""
    return (max_copy_untouched(text, ex.private, ex.query, max_copy)
            and (not names or names_untouched(text, ex.private, ex.query)))


def guard_names(max_copy: int, names: bool) -> list[str]:
    return [f"max_copy_{max_copy}"] + (["protect_names"] if names else [])


def needs_regeneration(base: dict, examples: list[SteerExample], max_copy: int,
                       methods: list[str] | None = None, names: bool = False) -> dict[str, list[str]]:
    """Per method of an unguarded run (or of `methods`): the ids of the rows the guard might have changed."""
    _known_methods(base, methods or [])
    by_id = {e.id: e for e in examples}
    return {name: [rec["id"] for rec in base["examples"]
                   if not untouched(rec["outputs"][name]["text"], by_id[rec["id"]], max_copy, names)]
            for name in methods or base["methods"]}


def _check_settings(base: dict, patch: dict, max_copy: int, where: str, names: bool = False) -> None:
    b, p = base.get("settings", {}), patch.get("settings", {})
    diff = [k for k in SAME_KEYS if p.get(k) != b.get(k) and None not in (p.get(k), b.get(k))]  # None: not recorded
    if diff:
        raise DataError(f"{where} was generated with different settings than the base run: {', '.join(diff)}")
    guards = p.get("guards", [])
    if guards != guard_names(max_copy, names):  # another guard changes rows too
        how = f"--max-copy {max_copy} (the default guard)" if names else f"--no-guard --max-copy {max_copy}"
        raise DataError(f"{where} was not generated with the guard priced here, {' + '.join(guard_names(max_copy, names))} "
                        f"(its guards: {guards or 'none'}; eval-steer {how})")
    for name in patch["methods"]:
        if name not in base["methods"]:
            raise DataError(f"{where} has method {name!r}, which the base run does not")
        kb, kp = _kappa_value(b.get("kappas", {}).get(name)), _kappa_value(p.get("kappas", {}).get(name))
        if kb != kp and None not in (kb, kp):
            raise DataError(f"method {name!r} ran with kappa {kp} in {where} but {kb} in the base run")


def overlay_runs(base: dict, patches: list[tuple[str, dict]], examples: list[SteerExample], max_copy: int,
                 methods: list[str] | None = None, with_names: bool = False) -> dict:
    """The guarded run's scores: each (row, method) from a patch if one has it, else the base row after checking
    that the guard could not have touched it. `patches` are (name, eval-steer doc) pairs."""
    b = base.get("settings", {})
    if float(b.get("temperature") or 0.0) != 0.0:
        raise DataError("the base run was sampled; reusing its rows as guarded rows holds only for greedy decoding")
    if b.get("guards"):
        raise DataError(f"the base run already ran with guards {b['guards']}; give an unguarded run "
                        "(eval-steer --no-guard)")
    names = methods or list(base["methods"])
    _known_methods(base, names)
    by_id = {e.id: e for e in examples}
    patched: dict[tuple[str, str], dict] = {}
    for where, doc in patches:
        _check_settings(base, doc, max_copy, where, with_names)
        for rec in doc["examples"]:
            for name, out in rec["outputs"].items():
                if (rec["id"], name) in patched:
                    raise DataError(f"row {rec['id']!r} of {name!r} is in more than one patch")
                patched[(rec["id"], name)] = out
    outputs: dict[str, list[str]] = {n: [] for n in names}
    refs, used, records = [], [], []
    reused = regenerated = 0
    for rec in base["examples"]:
        ex = by_id.get(rec["id"])
        if ex is None:
            raise DataError(f"example {rec['id']!r} is not in the data file; pass the file the runs used")
        row = {}
        for n in names:
            out = patched.pop((rec["id"], n), None)
            if out is None:
                out = rec["outputs"][n]
                if not untouched(out["text"], ex, max_copy, with_names):
                    raise DataError(f"row {rec['id']!r} of {n!r} writes what the guard would refuse, and no patch "
                                    f"regenerates it: eval-steer --max-copy {max_copy} --methods {n} --ids {rec['id']}"
                                    + ("" if with_names else " --no-guard"))
                reused += 1
            else:
                regenerated += 1
            outputs[n].append(out["text"])
            row[n] = out
        refs.append(ex.reference)
        used.append(ex)
        records.append({"id": rec["id"], "outputs": row})
    extra = sorted({f"{i}/{n}" for i, n in patched if n in names})
    if extra:
        raise DataError(f"patch rows not in the base run: {', '.join(extra[:5])}")
    doc = score([_MethodInfo(n, base["methods"][n]) for n in names], outputs, refs, used)
    settings = dict(b)
    settings.update(guards=guard_names(max_copy, with_names), kappas={n: b.get("kappas", {}).get(n) for n in names})
    doc.update(settings=settings, examples_done=len(records), overlay={"reused": reused, "regenerated": regenerated,
               "patches": [w for w, _ in patches]}, examples=records)
    return doc
