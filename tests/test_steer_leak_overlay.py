"""Scoring a leak-guarded run from an unguarded one: a greedy row that MaxCopy(N) provably leaves alone is reused,
every other (row, method) must be regenerated with --max-copy N; the check is conservative and never assumed."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from overlay_fixtures import cogenesis_file, eval_steer
from pocketlm.cli import app
from pocketlm.models import build_tiny
from pocketlm.steer.cloud.in_process import HFCloudBackend
from pocketlm.steer.engine import SteerEngine, SteerRequest
from pocketlm.steer.fusion.leak_guard import MaxCopy, max_copy_untouched
from pocketlm.steer.fusion.methods import get_method

CONTEXT = "I love the sea, boats and seafood, and I end every message with a short proverb about the sea."
COPY = "Well, I love the sea, boats and seafood, they said."


def test_untouched_check_on_known_text():
    assert not max_copy_untouched(COPY, CONTEXT, "", 4)          # a 7-word copy
    assert max_copy_untouched(COPY, CONTEXT, "", 7)
    assert max_copy_untouched(COPY, CONTEXT, "I love the sea, boats and seafood", 4)  # public spans are no leak
    # a token may end inside a word: "boatswain" passes through "boats", which the guard would refuse at N=3
    assert not max_copy_untouched("love the sea, boatswain", CONTEXT, "", 3)
    assert max_copy_untouched("love the sea, xboats", CONTEXT, "", 3)
    assert max_copy_untouched(COPY, "", "", 1)


@pytest.mark.parametrize("method", ["closed_form@1", "plausible@1"])
def test_untouched_rows_are_exactly_the_guarded_rows(method):
    cloud, tok = build_tiny("tiny-qwen2", seed=1, vocab_size=300)
    eng = SteerEngine(HFCloudBackend(cloud, tok), tok, cloud, tok)
    m = get_method(method)
    compared = 0
    for ctx in (CONTEXT, "zq xv wk"):
        req = SteerRequest.with_context("Say it.", ctx)
        free = eng.generate([req], [m], max_new_tokens=16)[0]
        for n in (1, 2, 6):
            if max_copy_untouched(free.text, ctx, req.query, n):
                guarded = eng.generate([req], [m.with_guards(MaxCopy(n))], max_new_tokens=16)[0]
                assert guarded.token_ids == free.token_ids and guarded.guard_rejections == 0
                compared += 1
    assert compared >= 3  # the check passed on some rows, so the equality was actually tested


def _data(tmp_path):
    return cogenesis_file(tmp_path, CONTEXT, 3, "A short note about the sea.")


def _eval(tmp_path, data, out, *extra):
    """An eval-steer run without the default guard (the overlay prices --max-copy from an unguarded base)."""
    return eval_steer(data, out, "--no-guard", *extra)


def test_overlay_reuses_checked_rows_and_takes_regenerated_ones(tmp_path):
    data, run = _data(tmp_path), tmp_path / "base.json"
    base = _eval(tmp_path, data, run)
    base["examples"][1]["outputs"]["closed_form@1"]["text"] = COPY  # as if the unguarded row had copied
    run.write_text(json.dumps(base))
    cli = CliRunner()
    res = cli.invoke(app, ["eval-steer-overlay", str(run), "--data", str(data), "--max-copy", "3", "--plan"])
    assert res.exit_code == 0 and "closed_form@1: 1 of 3 rows --ids r1" in res.output, res.output
    res = cli.invoke(app, ["eval-steer-overlay", str(run), "--data", str(data), "--max-copy", "3"])
    assert "writes what the guard would refuse" in str(res.exception) and "--ids r1" in str(res.exception)

    patch = _eval(tmp_path, data, tmp_path / "patch.json", "--ids", "r1", "--max-copy", "3", "--methods",
                  "closed_form@1")
    assert [e["id"] for e in patch["examples"]] == ["r1"] and patch["settings"]["ids"] == ["r1"]
    out = tmp_path / "guarded.json"
    res = cli.invoke(app, ["eval-steer-overlay", str(run), str(tmp_path / "patch.json"), "--data", str(data),
                           "--max-copy", "3", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["overlay"]["regenerated"] == 1 and doc["overlay"]["reused"] == 5
    assert doc["settings"]["guards"] == ["max_copy_3"]
    assert doc["examples"][1]["outputs"]["closed_form@1"]["text"] == patch["examples"][0]["outputs"]["closed_form@1"]["text"]
    assert doc["methods"]["closed_form@1"]["leak"]["longest_copy_words"] <= 3


def test_overlay_refuses_what_it_cannot_vouch_for(tmp_path):
    data, run = _data(tmp_path), tmp_path / "base.json"
    _eval(tmp_path, data, run)
    unguarded_patch = tmp_path / "p.json"
    _eval(tmp_path, data, unguarded_patch, "--ids", "r0")
    cli = CliRunner()
    res = cli.invoke(app, ["eval-steer-overlay", str(run), str(unguarded_patch), "--data", str(data), "--max-copy", "3"])
    assert "not generated with the guard priced here, max_copy_3" in str(res.exception)
    sampled = json.loads(run.read_text())
    sampled["settings"]["temperature"] = 0.7
    (tmp_path / "s.json").write_text(json.dumps(sampled))
    res = cli.invoke(app, ["eval-steer-overlay", str(tmp_path / "s.json"), "--data", str(data), "--max-copy", "3"])
    assert "greedy" in str(res.exception)
    res = cli.invoke(app, ["eval-steer-overlay", str(run), "--data", str(data), "--max-copy", "3", "--methods", "nope"])
    assert "no method 'nope'" in str(res.exception)
    res = cli.invoke(app, ["eval-steer-overlay", str(run), "--data", str(data), "--max-copy", "3", "--methods", "nope",
                           "--plan"])
    assert "no method 'nope'" in str(res.exception)
    res = cli.invoke(app, ["eval-steer", "--data", str(data), "--cloud", "tiny-qwen2", "--local", "tiny-llama",
                           "--ids", "r9"])
    assert "no row with id 'r9'" in str(res.exception)
