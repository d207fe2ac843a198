"""The leak guard: what the steered text copies from the private context reaches the cloud, so the device
refuses tokens that would copy more than N words of it, or complete a protected word; eval-steer measures it."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from pocketlm.cli import app
from pocketlm.errors import PocketLMError
from pocketlm.models import build_tiny
from pocketlm.steer.cloud.in_process import HFCloudBackend
from pocketlm.steer.engine import SteerEngine, SteerRequest
from pocketlm.steer.fusion.leak_guard import MaxCopy, Protect, parse_front_matter
from pocketlm.steer.fusion.leakage import context_only_words, leak_report, longest_copy, ngram_share
from pocketlm.steer.fusion.methods import get_method, parse_methods

CONTEXT = "I love the sea, boats and seafood, and I end every message with a short proverb about the sea."


def test_leak_metrics_on_known_text():
    out = "Sure! I LOVE the sea, boats and seafood; also mountains."
    assert longest_copy(out, CONTEXT) == 7                       # i love the sea boats and seafood
    assert longest_copy(out, CONTEXT, public="i love the sea boats and seafood") == 0  # the cloud has it anyway
    assert 0 < ngram_share(out, CONTEXT) < 1 and ngram_share("nothing here", CONTEXT) == 0.0
    assert "seafood" in context_only_words(CONTEXT, "Write about a Sunday.")
    assert "sea" not in context_only_words(CONTEXT, "Write about the sea.")
    rep = leak_report(out, CONTEXT, "Write about a Sunday.")
    assert rep["longest_copy_words"] == 7 and "boats" in rep["context_words"] and "the" not in rep["context_words"]


class _Scripted:
    """A cloud that always wants to write the scripted ids, in order (the worst case: it copies verbatim)."""

    def __init__(self, script: list[int], vocab: int):
        self.script, self.vocab_rows, self.eos_token_ids = script, vocab, set()
        self.n = 0
        self.rows = 0

    def _z(self):
        z = torch.zeros(self.rows, self.vocab_rows)
        z[:, self.script[min(self.n, len(self.script) - 1)]] = 30.0
        z[:, 65:91] += torch.linspace(5, 1, 26)  # alternatives: capital letters, in a fixed order
        return z

    def reserve(self, n):
        pass

    def prefill(self, prompts, expand=None):
        self.rows, self.n = len(expand if expand is not None else prompts), 0
        return self._z()

    def step(self, ids):
        self.n += 1
        return self._z()

    def keep(self, rows):
        self.rows = rows.numel()

    def release(self):
        pass

    def cache_modes(self):
        return ("scripted",)

    def set_cache_mode(self, mode):
        pass


@pytest.fixture(scope="module")
def tiny():
    device, tok = build_tiny("tiny-llama", seed=2)
    return device, tok


def _copying_engine(tiny, text):
    device, tok = tiny
    script = tok(text, add_special_tokens=False)["input_ids"]
    return SteerEngine(_Scripted(script, 260), tok, device, tok), len(script)


@pytest.mark.parametrize("n", [2, 4])
def test_max_copy_caps_the_copied_span_whatever_the_rule(tiny, n):
    eng, steps = _copying_engine(tiny, CONTEXT)
    req = SteerRequest.with_context("Write two sentences about a free Sunday.", CONTEXT)
    free = eng.generate([req], [get_method("cloud")], max_new_tokens=steps, ignore_eos=True)[0]
    assert longest_copy(free.text, CONTEXT) >= 10  # unguarded, the cloud copies the context
    for m in parse_methods("cloud,closed_form,plausible"):
        g = eng.generate([req], [m.with_guards(MaxCopy(n))], max_new_tokens=steps, ignore_eos=True)[0]
        assert longest_copy(g.text, CONTEXT, req.query) <= n, g.text
        assert g.guard_rejections > 0


def test_protected_word_never_completed_in_any_casing(tiny):
    eng, steps = _copying_engine(tiny, "Here are several VERBOSE strategies, verbosely explained.")
    req = SteerRequest.with_context("How do I plan a trip?", "I want every answer to be as verbose as possible.")
    g = eng.generate([req], [get_method("cloud").with_guards(Protect(["verbose"]))], max_new_tokens=steps,
                     ignore_eos=True)[0]
    assert "verbose" not in g.text.lower() and g.guard_rejections > 0
    with pytest.raises(PocketLMError, match="at least one word"):
        Protect([" "])
    with pytest.raises(PocketLMError, match="integer >= 1"):
        MaxCopy(0)


def test_front_matter_protect_list():
    ctx, words = parse_front_matter("---\nprotect: verbose, 'Giulia'\n---\nI am Giulia.\n")
    assert ctx == "I am Giulia." and words == ["verbose", "Giulia"]
    assert parse_front_matter("plain text") == ("plain text", [])
    with pytest.raises(PocketLMError, match="never closed"):
        parse_front_matter("---\nprotect: a\n")
    with pytest.raises(PocketLMError, match="unknown front-matter"):
        parse_front_matter("---\ncolour: red\n---\nx")


def test_guarded_rows_on_a_real_model_stay_within_the_cap():
    cloud, tok = build_tiny("tiny-qwen2", seed=1, vocab_size=300)
    eng = SteerEngine(HFCloudBackend(cloud, tok), tok, cloud, tok)
    req = SteerRequest.with_context("Say it.", CONTEXT)
    g = eng.generate([req], [get_method("closed_form@1").with_guards(MaxCopy(3))], max_new_tokens=20)[0]
    assert longest_copy(g.text, CONTEXT, req.query) <= 3


def test_eval_steer_reports_leakage(tmp_path):
    rows = [{"id": str(i), "input": f"Write note {i}.", "personalized_input": f"{CONTEXT}\nWrite note {i}.",
             "output": "A note."} for i in range(2)]
    data = tmp_path / "cg.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "res.json"
    res = CliRunner().invoke(app, ["eval-steer", "--data", str(data), "--cloud", "tiny-qwen2", "--local", "tiny-llama",
                                   "--methods", "cloud,closed_form", "--max-new-tokens", "6", "--max-copy", "3",
                                   "--protect", "seafood", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["settings"]["guards"] == ["max_copy_3", "protect_names", "protect"]
    for r in doc["methods"].values():
        leak = r["leak"]
        assert set(leak) == {"ngram5_share", "longest_copy_words", "context_word_share"}
        assert leak["longest_copy_words"] <= 3
    assert "closed_form" in res.output


def test_demo_steering_part_runs_guarded(capsys):
    from pocketlm.cli.demo import _steer_demo

    _steer_demo("tiny-llama", "cpu", 4)
    out = capsys.readouterr().out
    assert "leak guard: at most 4 words" in out and "longest span copied" in out
    flat = " ".join(out.split())      # rich wraps long lines
    steered = flat.split("none of its names): ", 1)[1].split("what reached the cloud", 1)[0].lower()
    assert "giulia" not in steered and "genoa" not in steered


def test_proper_names_are_the_words_capitalised_mid_sentence_and_the_protect_line():
    from pocketlm.steer.fusion.leak_guard import proper_names

    ctx = "I am Giulia, a retired sailor from Genoa. I love the sea.\nSailing is my life, and Marco and I sail."
    assert proper_names(ctx, "Write about a free Sunday.") == ["Genoa", "Giulia", "Marco"]
    assert proper_names(ctx, "Plan a day in Genoa.", ["sea"]) == ["Giulia", "Marco", "sea"]   # the cloud has Genoa
    # a line's, sentence's or clause's first word, after a colon, bullet or quote, is capitalised anyway
    assert proper_names("- Loves boats\nName: Anna. \"Hi\", she said to Bruno.", "") == ["Bruno"]
    assert proper_names("I met Writing people. I like writing.", "") == []       # written in lower case too
    assert proper_names("", "x") == [] and proper_names("I'm fine. I am.", "") == []


def test_the_default_guard_keeps_names_and_long_copies_from_the_cloud(tiny):
    """What `steer` and `eval-steer` run unless --no-guard, against a cloud that copies the profile verbatim."""
    from pocketlm.cli.groups import GuardOptions

    profile = "I am Giulia, a retired sailor from Genoa. I love the sea, boats and seafood, and I end every message."
    eng, steps = _copying_engine(tiny, profile)
    req = SteerRequest.with_context("Write two sentences about a free Sunday.", profile)
    gs = GuardOptions().build()
    assert [g.name for g in gs] == ["max_copy_8", "protect_names"]
    g = eng.generate([req], [get_method("closed_form").with_guards(*gs)], max_new_tokens=steps, ignore_eos=True)[0]
    assert longest_copy(g.text, profile, req.query) <= 8 and g.guard_rejections > 0
    assert not {"giulia", "genoa"} & set(g.text.lower().replace(",", " ").replace(".", " ").split()), g.text
    assert GuardOptions(no_guard=True).build() == []
    assert [x.name for x in GuardOptions(no_guard=True, max_copy=3).build(["verbose"])] == ["max_copy_3", "protect"]
