"""`pocketlm eval-personal`: a run's personal models steer the cloud; judge-free target match, fluency and
degeneration scores per user; the stop-word language identifier and the unigram nearest user are tested."""

from __future__ import annotations

import json

import pytest
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


def train_tiny(corpus, tmp_path):
    """A one-step 1g1s run of the tiny model on `corpus`: runs/1g1s with users/<user>/ adapters."""
    sets = {"model": "tiny-llama", "corpus": str(corpus), "max_chars": "none", "rounds": 1, "local_steps": 1,
            "batch_size": 2, "seq_len": 16, "router_every": 1, "router_steps": 1,
            "out_dir": str(tmp_path / "runs" / "{strategy}")}
    res = runner.invoke(app, ["train", "--strategy", "1g1s", *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")]])
    assert res.exit_code == 0, res.output
    return tmp_path / "runs" / "1g1s"


def test_eval_personal_on_a_tiny_run(folder_corpus, tmp_path):
    run = train_tiny(folder_corpus, tmp_path)
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
    _personal_demo("tiny-llama", train_tiny(corpus, tmp_path), "cpu", 1.0)
    out = capsys.readouterr().out
    assert "cloud alone" in out and "German user's model" in out and "Italian user's model" in out


def test_a_kappa_sweep_is_the_single_kappa_runs_side_by_side_and_plots(folder_corpus, tmp_path):
    """`--kappa 1,3` runs every steered method at both kappas, columns named method@kappa; the unsteered `cloud`
    stays one column; `--plot` draws match vs fluency from the JSON; bad kappas are refused by name."""
    run = train_tiny(folder_corpus, tmp_path)
    base = ["eval-personal", "--run", str(run), "--max-new-tokens", "5"]
    res = runner.invoke(app, [*base, "--methods", "cloud,weights,specialist", "--kappa", "1,3", "--json",
                              str(tmp_path / "sweep.json"), "--plot", str(tmp_path / "sweep.png")])
    assert res.exit_code == 0, res.output
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert list(sweep["columns"]) == ["cloud", "weights@1", "weights@3", "specialist@1", "specialist@3"]
    assert sweep["columns"]["weights@3"] == {"method": "weights", "kappa": 3.0}
    assert sweep["columns"]["cloud"]["kappa"] is None and sweep["settings"]["kappa"] == [1.0, 3.0]
    assert set(sweep["mean"]) == set(sweep["columns"])
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = runner.invoke(app, [*base, "--methods", "weights", "--kappa", "3", "--json", str(tmp_path / "one.json")])
    assert res.exit_code == 0, res.output
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["settings"]["kappa"] == 3.0 and list(one["columns"]) == ["weights"]  # a single kappa: plain names
    for bad, says in [("a,1", "comma list of numbers"), ("0", "positive finite"), ("1,nan", "positive finite"),
                      ("inf", "positive finite"), ("", "positive finite")]:
        res = runner.invoke(app, [*base, "--kappa", bad])
        assert res.exit_code != 0 and says in str(res.exception), (bad, res.output)


def test_the_tradeoff_plot_reads_results_from_before_sweeps(tmp_path):
    """JSON written before sweeps has no "columns": its steered methods plot as one-point lines at the file's kappa,
    the unsteered ones as references; nothing to plot is an error."""
    from pocketlm.eval.report import plot_personal_tradeoff

    doc = {"mean": {"cloud": {"match": 0.25, "cloud_ppl": 2.2}, "weights": {"match": 0.5, "cloud_ppl": 12.3},
                    "both": {"match": 0.75, "cloud_ppl": None}}}
    assert plot_personal_tradeoff(doc, tmp_path / "old.png").read_bytes()[:4] == b"\x89PNG"
    doc["mean"] = {"both": {"match": 0.75, "cloud_ppl": None}}
    with pytest.raises(ValueError, match="no column has a cloud perplexity"):
        plot_personal_tradeoff(doc, tmp_path / "none.png")


def test_a_sweep_column_decodes_what_its_single_kappa_run_decodes(tmp_path):
    """In a sweep every kappa's rows share one batched generation with the other kappas' rows; each column must still
    decode token for token what a run with that kappa alone decodes (on a model lively enough to write varied text,
    with non-zero adapters), and different kappas must reach their rows."""
    from personal_fixtures import trained_user
    from pocketlm.eval.personal_eval import evaluate_personal, language_target
    from pocketlm.moe.personal import load_personal
    from pocketlm.steer.cloud.in_process import HFCloudBackend
    from pocketlm.steer.engine import SteerEngine
    from serve_fixtures import lively

    base, tok = build_tiny("tiny-llama", seed=3)
    lively(base, 5)
    personal = load_personal(base, trained_user(base, tmp_path)[1])
    engine = SteerEngine(HFCloudBackend(base, tok), tok, personal, tok)
    prompts = ["Say hi.", "Tell me about boats and the sea."]

    def run(kappas):
        doc = evaluate_personal(lambda user: engine, [language_target("de", "German")], prompts, lambda text, user: True,
                                base, methods=("cloud", "weights", "both", "specialist"), kappas=kappas,
                                max_new_tokens=8)
        return {c: [e["text"] for e in doc["examples"] if e["method"] == c] for c in doc["columns"]}

    sweep, alone = run((0.5, 3.0)), run((3.0,))
    assert sweep["cloud"] == alone["cloud"]
    for m in ("weights", "both", "specialist"):
        assert sweep[f"{m}@3"] == alone[m], m
    assert any(sweep[f"{m}@0.5"] != sweep[f"{m}@3"] for m in ("weights", "both", "specialist"))
    assert len(set(sweep["cloud"] + sweep["weights@3"])) > 2  # varied text, not one repeated token
