"""Experiment configs: TOML (flat or grouped), --set overrides with types, env paths, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pocketlm.collab import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_official_schedule():
    cfg = load_config()
    assert (cfg.rounds, cfg.local_steps, cfg.batch_size, cfg.seq_len) == (20, 10, 64, 128)
    assert (cfg.router_every, cfg.router_steps, cfg.lr, cfg.lr_min) == (30, 10, 2e-3, 2e-4)
    assert (cfg.rank, cfg.alpha, cfg.top_k, cfg.aggregation) == (8, 16.0, 2, "uniform")
    assert cfg.official_compat is False


def test_toml_groups_and_overrides(tmp_path):
    p = tmp_path / "exp.toml"
    p.write_text('[data]\nmodel = "tiny-llama"\nmax_chars = 100\n[schedule]\nrounds = 3\n')
    cfg = load_config(p, ["rounds=5", "lr=1e-3", "official_compat=true", "experts=2,3,1", "max_chars=none"])
    assert cfg.model == "tiny-llama" and cfg.rounds == 5 and cfg.lr == 1e-3 and cfg.official_compat is True
    assert cfg.experts == [2, 3, 1] and cfg.max_chars is None
    assert cfg.out_dir == "runs/exp/{strategy}"


@pytest.mark.parametrize("override, message", [
    (["nope=1"], "unknown config key"),
    (["rounds=two"], "rounds expects int"),
    (["rounds"], "key=value"),
    (["scenario=sideways"], "scenario"),
    (["experts=2,0"], "expert"),
    (["rounds=0"], "rounds must be >= 1"),
])
def test_bad_overrides_are_clear(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_shipped_configs_load(monkeypatch):
    monkeypatch.setenv("POCKETLM_AGNEWS", "/data/agnews")
    for name in ("fortunes-id", "fortunes-ood", "agnews-id", "agnews-ood"):
        cfg = load_config(REPO / "configs" / f"{name}.toml")
        assert cfg.model == "smollm2-135m" and cfg.scenario == name.split("-")[1]
    assert load_config(REPO / "configs" / "agnews-id.toml").corpus == "/data/agnews"
    monkeypatch.delenv("POCKETLM_AGNEWS")
    assert load_config(REPO / "configs" / "agnews-ood.toml").corpus == "../shared/data/agnews"
