"""Pricing the default guard (`--max-copy N` plus the context's proper names) from an unguarded run: a greedy row
that writes none of its protected names and copies nothing the cap refuses is the guarded row; the rest must come
from an `eval-steer` run with the default guard, and a patch made with another guard is refused."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from overlay_fixtures import cogenesis_file, eval_steer
from pocketlm.cli import app
from pocketlm.models import build_tiny
from pocketlm.steer.cloud.in_process import HFCloudBackend
from pocketlm.steer.engine import SteerEngine, SteerRequest
from pocketlm.steer.fusion.leak_guard import max_copy_untouched, names_untouched, private_by_default
from pocketlm.steer.fusion.methods import get_method

CONTEXT = "Every spring I sail with Marta on Lake Orta, and I write short notes about the water."


def test_names_check_on_known_text():
    assert not names_untouched("We met Marta by the lake.", CONTEXT, "")
    assert not names_untouched("the martas of orta", CONTEXT, "")          # any case, at a word start
    assert names_untouched("A smartass sailor wrote this.", CONTEXT, "")  # not at a word start
    assert names_untouched("We met Marta by the lake.", CONTEXT, "Who is Marta? Where is Lake Orta?")  # public
    assert names_untouched("Anything at all.", "no names here at all", "")


def test_untouched_rows_are_exactly_the_default_guarded_rows():
    cloud, tok = build_tiny("tiny-qwen2", seed=1, vocab_size=300)
    eng = SteerEngine(HFCloudBackend(cloud, tok), tok, cloud, tok)
    compared = 0
    for method in ("closed_form@1", "plausible@1", "closed_form@3"):
        m = get_method(method)
        for ctx in (CONTEXT, "Marta Orta Marta Orta"):
            req = SteerRequest.with_context("Say it.", ctx)
            free = eng.generate([req], [m], max_new_tokens=16)[0]
            if names_untouched(free.text, ctx, req.query) and max_copy_untouched(free.text, ctx, req.query, 2):
                guarded = eng.generate([req], [m.with_guards(*private_by_default(2))], max_new_tokens=16)[0]
                assert guarded.token_ids == free.token_ids and guarded.guard_rejections == 0
                compared += 1
    assert compared >= 2


def _data(tmp_path):
    return cogenesis_file(tmp_path, CONTEXT, 2, "A short note about the water.")


def test_overlay_prices_the_default_guard(tmp_path):
    data, run = _data(tmp_path), tmp_path / "base.json"
    base = eval_steer(data, run, "--no-guard")
    base["examples"][1]["outputs"]["closed_form@1"]["text"] = "Say hi to Marta."  # as if it had written a name
    run.write_text(json.dumps(base))
    cli = CliRunner()
    args = ["eval-steer-overlay", str(run), "--data", str(data), "--max-copy", "3"]
    res = cli.invoke(app, [*args, "--plan"])
    assert "closed_form@1: 0 of 2 rows" in res.output  # the cap alone would not touch it
    res = cli.invoke(app, [*args, "--names", "--plan"])
    assert res.exit_code == 0 and "closed_form@1: 1 of 2 rows --ids r1" in res.output, res.output
    res = cli.invoke(app, [*args, "--names"])
    assert "writes what the guard would refuse" in str(res.exception)

    capped = tmp_path / "capped.json"
    eval_steer(data, capped, "--ids", "r1", "--methods", "closed_form@1", "--max-copy", "3", "--no-guard")
    res = cli.invoke(app, [*args, "--names", str(capped)])
    assert "not generated with the guard priced here" in str(res.exception)  # the cap alone changes less

    default = tmp_path / "default.json"
    patch = eval_steer(data, default, "--ids", "r1", "--methods", "closed_form@1", "--max-copy", "3")
    assert patch["settings"]["guards"] == ["max_copy_3", "protect_names"]
    out = tmp_path / "guarded.json"
    res = cli.invoke(app, [*args, "--names", str(default), "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["settings"]["guards"] == ["max_copy_3", "protect_names"]
    assert doc["overlay"] == {"reused": 3, "regenerated": 1, "patches": [str(default)]}
    assert "marta" not in doc["examples"][1]["outputs"]["closed_form@1"]["text"].lower()
