"""`pocketlm eval-personal`: a run's personal models steer the cloud; judge-free target match, fluency and
degeneration scores per user; the stop-word language identifier and the unigram nearest user are tested."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from pocketlm.cli import app
from pocketlm.eval.personal_metrics import UnigramUsers, cloud_perplexity, distinct2, language_of
from pocketlm.models import build_tiny

runner = CliRunner()


def test_language_identifier():
    assert language_of("The cat sat on the mat and it was happy.") == "en"
    assert language_of("Der Hund und die Katze sind nicht im Haus.") == "de"
    assert language_of("El perro y la casa de los niños, que no está.") == "es"
    assert language_of("Il gatto è sulla sedia e non vuole scendere per la cena.") == "it"
    assert language_of("12345 !!!") is None


def test_unigram_nearest_user_and_distinct2():
    users = UnigramUsers({"sports": "goal match team score win league goal", "world": "president war election talks"})
    assert users.nearest("the team scored a late goal to win") == "sports"
    assert users.nearest("election talks with the president") == "world"
    assert distinct2("a b a b a b") == 0.4 and distinct2("a b c d") == 1.0 and distinct2("one") == 0.0


def test_cloud_perplexity_is_finite_and_none_for_empty():
    model, tok = build_tiny("tiny-llama", seed=1)
    ppl = cloud_perplexity(model, [5, 6, 7], [8, 9])
    assert ppl is not None and ppl > 1 and cloud_perplexity(model, [5], []) is None


def test_eval_personal_on_a_tiny_run(folder_corpus, tmp_path):
    sets = {"model": "tiny-llama", "corpus": str(folder_corpus), "max_chars": "none", "rounds": 1, "local_steps": 1,
            "batch_size": 2, "seq_len": 16, "router_every": 1, "router_steps": 1,
            "out_dir": str(tmp_path / "runs" / "{strategy}")}
    res = runner.invoke(app, ["train", "--strategy", "1g1s", *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")]])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "1g1s"
    assert (run / "users" / "alice" / "adapter_config.json").is_file()
    out = tmp_path / "personal.json"
    res = runner.invoke(app, ["eval-personal", "--run", str(run), "--max-new-tokens", "4", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert set(doc["users"]) == {"alice", "bob", "carol"}
    for rows in [*doc["users"].values(), doc["mean"]]:
        assert set(rows) == {"cloud", "cloud_prompted", "weights", "context", "both", "specialist"}
        for r in rows.values():
            assert 0 <= r["match"] <= 1 and 0 <= r["distinct2"] <= 1 and r["n"] >= 1
            assert (r["cloud_ppl"] is None) == (r["cloud_ppl_told"] is None)
            assert r["cloud_ppl_told"] is None or r["cloud_ppl_told"] > 1
    assert doc["settings"]["match"] == "nearest_unigram_user"
    res = runner.invoke(app, ["eval-personal", "--run", str(run), "--max-new-tokens", "3", "--methods", "both",
                              "--fusion", "plausible", "--kappa", "3", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["settings"]["fusion"] == "plausible"
    res = runner.invoke(app, ["eval-personal", "--run", str(run), "--max-new-tokens", "3", "--methods", "specialist",
                              "--fusion", "ada_costeer", "--kappa", "2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert set(json.loads(out.read_text())["mean"]) == {"specialist"}
    res = runner.invoke(app, ["eval-personal", "--run", str(run), "--fusion", "loud"])
    assert res.exit_code != 0 and "unknown fusion" in str(res.exception)
    res = runner.invoke(app, ["steer", "Say hi.", "--cloud", "tiny-llama", "--local", "tiny-llama", "--adapters",
                              str(run / "users" / "bob"), "--signal", "weights", "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output  # one prompt from the command line, streamed, steered by bob's model
    res = runner.invoke(app, ["steer", "Say hi.", "--cloud", "tiny-llama", "--local", "tiny-llama", "--adapters",
                              str(run / "users" / "bob"), "--signal", "specialist", "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output  # bob's private experts' contribution alone
    res = runner.invoke(app, ["steer", "Say hi.", "--cloud", "tiny-llama", "--local", "tiny-llama", "--signal", "weights"])
    assert res.exit_code != 0 and "--adapters" in str(res.exception)
    res = runner.invoke(app, ["eval-personal", "--run", str(tmp_path), "--max-new-tokens", "4"])
    assert res.exit_code != 0 and "history.json" in str(res.exception)


def test_demo_ends_with_the_personal_models_steering(tmp_path, capsys):
    """The demo's last part: the cloud alone, then steered by the German and Italian users' models of its run."""
    from pocketlm.cli.demo import _personal_demo

    corpus = tmp_path / "corpus"
    for user, text in {"de": "der Hund und die Katze sind im Haus {}", "it": "il gatto e il cane sono in casa {}"}.items():
        (corpus / user).mkdir(parents=True)
        for i in range(8):
            (corpus / user / f"{i}.txt").write_text(text.format(i) + "\n")
    sets = {"model": "tiny-llama", "corpus": str(corpus), "max_chars": "none", "rounds": 1, "local_steps": 1,
            "batch_size": 2, "seq_len": 16, "router_every": 1, "router_steps": 1,
            "out_dir": str(tmp_path / "runs" / "{strategy}")}
    res = runner.invoke(app, ["train", "--strategy", "1g1s", *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")]])
    assert res.exit_code == 0, res.output
    _personal_demo("tiny-llama", tmp_path / "runs" / "1g1s", "cpu", 1.0)
    out = capsys.readouterr().out
    assert "cloud alone" in out and "German user's model" in out and "Italian user's model" in out
