"""Results over seeds: `pocketlm seeds FILES...` reads `compare --json` files and says which findings survive.

Why paired, not only mean ± std: the seed also re-draws the document-level splits (`data/splits.py`), so each seed
tests on different documents and absolute perplexities move a lot between seeds (fortunes id, 1G1S: 55.5 at seed
42, 47.4 at seed 43). A finding compares strategies *within* a seed, where they saw the same data: an ordering
"a beats b" survives when it holds in every seed, and the paper's claim "1G1S lands within 2% of the better of
2G / 2S" is checked per seed as the ratio ppl(1G1S) / min(ppl(2G), ppl(2S)).

Input: any mix of compare JSON files (one or several strategies each; seed, scenario, corpus and protocol come
from the `config` each file records). Output: per scenario, per strategy the per-seed mean test perplexities with
mean ± std (sample std over seeds), each pairwise ordering with the seeds it holds in, and the 1G1S ratio.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from ..errors import DataError

RATIO_LIMIT = 1.02  # the claim checked: 1G1S within 2% of the better of 2G and 2S


@dataclass(frozen=True)
class SeedResult:
    """One strategy's final mean test perplexity in one run."""

    scenario: str  # e.g. "fortunes:en,de,es,it id clean"
    strategy: str
    seed: int
    ppl: float
    source: str


def _final_ppl(history: list[dict]) -> float | None:
    evaluated = [e for e in history if isinstance(e, dict) and isinstance(e.get("mean_ppl"), (int, float))]
    return float(evaluated[-1]["mean_ppl"]) if evaluated else None


# Training-schedule keys that tell two runs of one scenario apart (e.g. `--set router_steps=8`): where files of one
# corpus / scenario / protocol disagree on one of them, its value joins the scenario's name, so a variant is
# summarised beside the shipped schedule instead of being counted as another seed of it.
SCHEDULE_KEYS = ("rounds", "local_steps", "batch_size", "seq_len", "router_every", "router_steps", "lr", "lr_min",
                 "router_lr", "rank", "alpha", "top_k", "max_chars", "router", "lb_coef", "aggregation")


def _load(path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"no such file: {path}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a JSON file: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("histories"), dict) or \
            not isinstance(doc.get("config"), dict):
        raise DataError(f"{path} is not a `pocketlm compare --json` file (no config / histories)")
    if "seed" not in doc["config"]:
        raise DataError(f"{path} records no seed in its config")
    return doc


def _base(cfg: dict) -> str:
    return f"{cfg.get('corpus')} {cfg.get('scenario')} {cfg.get('protocol', 'clean')}"


def read_results(paths: list[Path]) -> list[SeedResult]:
    """Every strategy's final perplexity from each compare JSON (clear errors for unreadable or foreign files)."""
    docs = [(path, _load(path)) for path in paths]
    bases: dict[str, list[dict]] = {}
    for _, doc in docs:
        bases.setdefault(_base(doc["config"]), []).append(doc["config"])
    varies = {base: [k for k in SCHEDULE_KEYS if all(k in c for c in cfgs) and len({repr(c[k]) for c in cfgs}) > 1]
              for base, cfgs in bases.items()}
    out: list[SeedResult] = []
    for path, doc in docs:
        cfg = doc["config"]
        base = _base(cfg)
        scenario = " ".join([base] + [f"{k}={cfg[k]}" for k in varies[base]])
        for strategy, history in doc["histories"].items():
            ppl = _final_ppl(history) if isinstance(history, list) else None
            if ppl is not None and math.isfinite(ppl):
                out.append(SeedResult(scenario, strategy, int(cfg["seed"]), ppl, str(path)))
    return out


def _spread(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(results: list[SeedResult]) -> dict:
    """Per scenario: strategies (per-seed ppl, mean, std), orderings (which seeds each holds in) and the 1G1S ratio.
    Two results for one (scenario, strategy, seed) are an error: the same run counted twice would fake agreement."""
    scenarios: dict[str, dict[str, dict[int, SeedResult]]] = {}
    for r in results:
        seen = scenarios.setdefault(r.scenario, {}).setdefault(r.strategy, {})
        if r.seed in seen:
            raise DataError(f"{r.scenario}: {r.strategy} seed {r.seed} appears twice ({seen[r.seed].source}, {r.source})")
        seen[r.seed] = r
    doc: dict = {}
    for scenario, strategies in sorted(scenarios.items()):
        table = {}
        for name, by_seed in strategies.items():
            mean, std = _spread([r.ppl for r in by_seed.values()])
            table[name] = {"ppl": {str(s): r.ppl for s, r in sorted(by_seed.items())}, "mean": mean, "std": std,
                           "seeds": len(by_seed)}
        orderings = []
        for a, b in combinations(sorted(strategies), 2):
            common = sorted(set(strategies[a]) & set(strategies[b]))
            if not common:
                continue
            a_wins = [s for s in common if strategies[a][s].ppl < strategies[b][s].ppl]
            better, worse = (a, b) if len(a_wins) * 2 >= len(common) else (b, a)
            holds = [s for s in common if strategies[better][s].ppl < strategies[worse][s].ppl]
            diffs = [strategies[worse][s].ppl - strategies[better][s].ppl for s in common]
            mean, std = _spread(diffs)
            orderings.append({"better": better, "worse": worse, "seeds": common, "holds_in": holds,
                              "survives": len(holds) == len(common), "gap_mean": mean, "gap_std": std})
        ratio = None
        if all(k in strategies for k in ("1g1s", "2g", "2s")):
            seeds = sorted(set(strategies["1g1s"]) & set(strategies["2g"]) & set(strategies["2s"]))
            per_seed = {str(s): strategies["1g1s"][s].ppl / min(strategies["2g"][s].ppl, strategies["2s"][s].ppl)
                        for s in seeds}
            if per_seed:
                mean, std = _spread(list(per_seed.values()))
                ratio = {"per_seed": per_seed, "mean": mean, "std": std, "limit": RATIO_LIMIT,
                         "holds_in": [s for s, v in per_seed.items() if v <= RATIO_LIMIT]}
        doc[scenario] = {"strategies": table, "orderings": orderings, "ratio_1g1s_to_best_of_2g_2s": ratio}
    return doc


def seeds_tables(doc: dict):
    """Rich tables: one per scenario (strategies x seeds, mean ± std), plus the orderings and the ratio."""
    from rich.table import Table

    out = []
    for scenario, s in doc.items():
        seeds = sorted({int(k) for row in s["strategies"].values() for k in row["ppl"]})
        t = Table(title=f"{scenario}: mean test perplexity per seed")
        for col in ["strategy", *map(str, seeds), "mean ± std"]:
            t.add_column(col, justify="right")
        for name, row in sorted(s["strategies"].items(), key=lambda kv: kv[1]["mean"]):
            cells = [f"{row['ppl'][str(k)]:.2f}" if str(k) in row["ppl"] else "-" for k in seeds]
            spread = "" if row["std"] is None else f" ± {row['std']:.2f}"
            t.add_row(name, *cells, f"{row['mean']:.2f}{spread}")
        out.append(t)
        o = Table(title=f"{scenario}: orderings (within each seed)")
        for col in ("better", "worse", "holds in", "gap mean ± std"):
            o.add_column(col, justify="right")
        for r in sorted([r for r in s["orderings"] if len(r["seeds"]) > 1],  # one seed says nothing of survival
                        key=lambda r: (not r["survives"], -r["gap_mean"])):
            spread = "" if r["gap_std"] is None else f" ± {r['gap_std']:.2f}"
            o.add_row(r["better"], r["worse"], f"{len(r['holds_in'])}/{len(r['seeds'])}", f"{r['gap_mean']:.2f}{spread}")
        out.append(o)
        ratio = s["ratio_1g1s_to_best_of_2g_2s"]
        if ratio:
            per = ", ".join(f"seed {k}: {v:.3f}" for k, v in ratio["per_seed"].items())
            out.append(f"1g1s / min(2g, 2s): {per}; <= {ratio['limit']} in {len(ratio['holds_in'])}/"
                       f"{len(ratio['per_seed'])} seeds")
    return out


def plot_seeds(doc: dict, path: str | Path) -> Path:
    """One panel per scenario: each strategy's per-seed perplexities (dots) relative to the seed's best strategy,
    so the split-to-split shift between seeds drops out and what remains is the within-seed spread."""
    from .report import _plt

    plt = _plt()
    names = list(doc)
    cols = min(4, len(names))  # a grid of at most four panels per row stays readable
    n_rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 3.4 * n_rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, scenario in zip(axes.flat, names, strict=False):  # trailing panels are hidden
        rows = doc[scenario]["strategies"]
        order = sorted((n for n in rows if n != "pretrained"), key=lambda n: rows[n]["mean"])  # trained only
        seeds = sorted({k for n in order for k in rows[n]["ppl"]})
        best = {k: min(rows[n]["ppl"][k] for n in order if k in rows[n]["ppl"]) for k in seeds}
        for x, name in enumerate(order):
            vals = [100 * (rows[name]["ppl"][k] / best[k] - 1) for k in seeds if k in rows[name]["ppl"]]
            ax.scatter([x] * len(vals), vals, s=18)
            if vals:
                ax.hlines(sum(vals) / len(vals), x - 0.3, x + 0.3, color="black", lw=1)
        ax.set_xticks(range(len(order)), order, rotation=45, ha="right")
        ax.set_ylabel("% above the seed's best")
        ax.set_title(scenario, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["RATIO_LIMIT", "SeedResult", "plot_seeds", "read_results", "seeds_tables", "summarize"]
