"""Token-level routing analysis on a tiny synthetic federation whose user-specific tokens are known: it finds
routing that is there (routers fitted to send each user's own letters to the specialist) and reports none for a
fixed gate, for both routers (linear and the official gate); the CLI writes its table, JSON and PNG."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_workspace
from pocketlm.collab import run_strategy
from pocketlm.eval.routing import BUCKETS, analyze_run, bucket_of, specificity
from pocketlm.moe import mixture_layers, save_parts
from pocketlm.moe.personal import load_personal

# Each user writes words of its own letters; digits, spaces and dots are everyone's.
LETTERS = {"abc": "abcdefgh", "ijk": "ijklmnop", "qrs": "qrstuvwx"}


def _corpus(root):
    rng = random.Random(0)
    for user, letters in LETTERS.items():
        (root / user).mkdir(parents=True)
        for i in range(20):
            words = [rng.choice("0123456789") + "".join(rng.choice(letters) for _ in range(3)) for _ in range(10)]
            (root / user / f"{i}.txt").write_text(" ".join(words) + ".\n")
    return root


@pytest.fixture(scope="module", params=["linear", "official"])
def federation(request, tmp_path_factory):
    """A 1-round 1g1s run of tiny-llama on the three users, with the given router."""
    tmp = tmp_path_factory.mktemp(request.param)
    ws = tiny_workspace(_corpus(tmp / "corpus"), tmp, rounds=1, local_steps=2, router=request.param)
    sim = run_strategy(ws, "1g1s")
    return ws, sim.out


def _rewrite_routers(ws, run, fit: bool):
    """Refit (fit=True: specialist on the user's own tokens) or zero (a fixed 50/50 gate) every user's routers
    and write them back into the run folder."""
    for user in LETTERS:
        model = load_personal(ws.base, run / "users" / user)
        routers = [m.router for _, m in mixture_layers(model)]
        if not fit:
            with torch.no_grad():
                for r in routers:
                    for p in r.parameters():
                        p.zero_()
        else:
            _fit(model, ws.data[user].train, specificity({u: t.train for u, t in ws.data.items()}, user))
        save_parts(model, run / "users" / user, {"generalist", "attn_lora"})


def _fit(model, stream, r):
    """Supervised routers: logistic fit of each layer's specialist weight to 'the input token is this user's'."""
    layers = [m for _, m in mixture_layers(model)]
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
             for m in layers]
    n = stream.numel() // 16
    ids = stream[: n * 16].view(n, 16)
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    target = (r[ids.flatten()] > 3).float()
    params = [p for m in layers for p in m.router.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=0.05)
    for _ in range(150):
        loss = sum(torch.nn.functional.binary_cross_entropy(m.router.route(x)[0][:, 1].clamp(1e-4, 1 - 1e-4),
                                                            target) for m, x in zip(layers, inputs, strict=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)


def test_specificity_buckets_follow_the_known_letters(federation):
    ws, _ = federation
    train = {u: t.train for u, t in ws.data.items()}
    b = bucket_of(specificity(train, "abc"))
    ids = ws.tokenizer.encode("a i 7", add_special_tokens=False)
    assert [BUCKETS[int(b[i])] for i in ids] == ["specific", "shared", "other", "shared", "shared"]
    z = ws.tokenizer.encode("Z", add_special_tokens=False)[0]      # in nobody's data
    assert z >= b.numel() or BUCKETS[int(b[z])] == "unseen"


def test_detects_routing_when_the_router_routes(federation):
    ws, run = federation
    _rewrite_routers(ws, run, fit=True)
    doc = analyze_run(run, workspace=ws)
    assert set(doc["users"]) == set(LETTERS)
    for d in doc["users"].values():
        assert d["tokens"]["specific"] > 40 and d["tokens"]["shared"] > 20 and d["tokens"]["other"] == 0
        assert d["gap"] > 0.3, d["mean"]
        assert all(lay["gap"] > 0.15 for lay in d["layers"])


def test_reports_no_routing_for_a_fixed_gate(federation):
    ws, run = federation
    _rewrite_routers(ws, run, fit=False)
    doc = analyze_run(run, workspace=ws)
    for d in doc["users"].values():
        assert abs(d["gap"]) < 1e-6
        assert all(abs(w - 0.5) < 1e-6 for w in d["mean"].values() if w is not None)


def test_cli_writes_table_json_and_png(federation, tmp_path, monkeypatch):
    from pocketlm.cli import app
    from pocketlm.collab import Workspace

    ws, run = federation
    monkeypatch.setattr(Workspace, "load", classmethod(lambda cls, cfg: ws))   # the run's own workspace
    res = CliRunner().invoke(app, ["routing", str(run), "--out", str(tmp_path), "--no-per-layer"])
    assert res.exit_code == 0, res.output
    assert "specialist weight by token specificity" in res.output
    doc = json.loads((tmp_path / "routing.json").read_text())
    assert doc["router"] == ws.cfg.router and set(doc["users"]) == set(LETTERS)
    assert (tmp_path / "routing_tokens.png").stat().st_size > 1000


def test_a_run_without_router_is_refused(federation, tmp_path):
    from pocketlm.errors import PocketLMError

    ws, _ = federation
    sim = run_strategy(ws, "local", cfg=type(ws.cfg)(**{**ws.cfg.to_dict(), "out_dir": str(tmp_path / "local")}))
    with pytest.raises(PocketLMError, match="no user"):
        analyze_run(sim.out, workspace=ws)
