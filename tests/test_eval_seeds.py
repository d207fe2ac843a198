"""`pocketlm seeds`: results over seeds (pocketlm.eval.seeds).

Why these checks: the seed re-draws the splits, so absolute perplexities shift between seeds; a finding must be
judged within each seed. The summary must say an ordering survives only when it holds in every seed, compute
1G1S / min(2G, 2S) per seed, refuse a run counted twice, and name a file that is not a compare JSON.
"""

from __future__ import annotations

import json
import statistics

import pytest
from typer.testing import CliRunner

from pocketlm.cli import app
from pocketlm.errors import DataError
from pocketlm.eval.seeds import read_results, summarize


def _compare(path, seed: int, ppl: dict[str, float], scenario: str = "id", protocol: str = "clean", **schedule):
    """A compare JSON as `pocketlm compare --json` writes it (an unevaluated round first, then the final one)."""
    doc = {"scenario": scenario, "model": "m", "corpus": "fortunes:en,de",
           "config": {"corpus": "fortunes:en,de", "scenario": scenario, "protocol": protocol, "seed": seed,
                      "router_steps": 2, "rounds": 4, **schedule},
           "strategies": {s: {"mean_ppl": v} for s, v in ppl.items()},
           "histories": {s: [{"round": 1, "train_loss": {}}, {"round": 4, "mean_ppl": v}] for s, v in ppl.items()}}
    path.write_text(json.dumps(doc))
    return path


def test_orderings_survive_only_when_they_hold_in_every_seed(tmp_path):
    # seed 44 shifts everything (new splits) and flips 2g vs fedavg; 2s < 2g and 1g1s < 2g hold in all seeds
    files = [_compare(tmp_path / "a.json", 42, {"1g1s": 50.0, "2g": 55.0, "2s": 49.5, "fedavg": 56.0}),
             _compare(tmp_path / "b.json", 43, {"1g1s": 44.0, "2g": 47.0, "2s": 44.5}),
             _compare(tmp_path / "c.json", 44, {"1g1s": 61.0, "2g": 66.0, "2s": 60.0, "fedavg": 65.0}),
             _compare(tmp_path / "d.json", 42, {"1g1s": 70.0, "2g": 60.0, "2s": 80.0}, scenario="ood")]
    doc = summarize(read_results(files))
    assert set(doc) == {"fortunes:en,de id clean", "fortunes:en,de ood clean"}
    s = doc["fortunes:en,de id clean"]
    assert s["strategies"]["1g1s"]["ppl"] == {"42": 50.0, "43": 44.0, "44": 61.0}
    assert s["strategies"]["1g1s"]["mean"] == pytest.approx(155 / 3)
    assert s["strategies"]["1g1s"]["std"] == pytest.approx(statistics.stdev([50.0, 44.0, 61.0]))
    order = {(o["better"], o["worse"]): o for o in s["orderings"]}
    assert order[("2s", "2g")]["survives"] and order[("2s", "2g")]["holds_in"] == [42, 43, 44]
    assert not order[("2s", "1g1s")]["survives"] and order[("2s", "1g1s")]["holds_in"] == [42, 44]
    assert order[("2g", "fedavg")]["holds_in"] == [42] and order[("2g", "fedavg")]["seeds"] == [42, 44]
    ratio = s["ratio_1g1s_to_best_of_2g_2s"]
    assert ratio["per_seed"] == pytest.approx({"42": 50 / 49.5, "43": 44 / 44.5, "44": 61 / 60})
    assert ratio["holds_in"] == ["42", "43", "44"]
    ood = doc["fortunes:en,de ood clean"]["ratio_1g1s_to_best_of_2g_2s"]
    assert ood["per_seed"] == pytest.approx({"42": 70 / 60}) and ood["holds_in"] == [] and ood["std"] is None


def test_a_schedule_variant_is_its_own_scenario_not_another_seed(tmp_path):
    # `--set router_steps=8` at seed 42 beside the shipped schedule: two scenarios, neither counted twice
    files = [_compare(tmp_path / "a.json", 42, {"1g1s": 50.0, "2g": 55.0}),
             _compare(tmp_path / "b.json", 43, {"1g1s": 44.0, "2g": 47.0}),
             _compare(tmp_path / "c.json", 42, {"1g1s": 49.0, "2g": 55.5}, router_steps=8)]
    doc = summarize(read_results(files))
    assert set(doc) == {"fortunes:en,de id clean router_steps=2", "fortunes:en,de id clean router_steps=8"}
    assert doc["fortunes:en,de id clean router_steps=8"]["strategies"]["1g1s"]["ppl"] == {"42": 49.0}
    assert doc["fortunes:en,de id clean router_steps=2"]["strategies"]["1g1s"]["ppl"] == {"42": 50.0, "43": 44.0}


def test_a_run_counted_twice_and_foreign_files_are_refused(tmp_path):
    a = _compare(tmp_path / "a.json", 42, {"1g1s": 50.0})
    b = _compare(tmp_path / "b.json", 42, {"1g1s": 51.0, "2g": 55.0})
    with pytest.raises(DataError, match="1g1s seed 42 appears twice"):
        summarize(read_results([a, b]))
    (tmp_path / "x.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match="not a `pocketlm compare --json` file"):
        read_results([tmp_path / "x.json"])
    (tmp_path / "y.json").write_text("{oops")
    with pytest.raises(DataError, match="not a JSON file"):
        read_results([tmp_path / "y.json"])
    with pytest.raises(DataError, match="no such file"):
        read_results([tmp_path / "missing.json"])


def test_the_command_prints_tables_and_writes_json_and_a_plot(tmp_path):
    files = [_compare(tmp_path / f"{s}.json", s, {"1g1s": 50.0 + s, "2g": 54.0 + s, "2s": 50.5 + s})
             for s in (42, 43, 44)]
    out, png = tmp_path / "seeds.json", tmp_path / "seeds.png"
    res = CliRunner().invoke(app, ["seeds", *map(str, files), "--json", str(out), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert "3/3" in res.output  # (the terminal is narrow here: the tables wrap)
    doc = json.loads(out.read_text())
    assert doc["fortunes:en,de id clean"]["strategies"]["2g"]["seeds"] == 3
    assert png.stat().st_size > 1000
