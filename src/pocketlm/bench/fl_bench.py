"""Benchmarks of CoMiGS over Flower (BENCHMARKS.md "CoMiGS across devices").

`overhead`: wall time per training round of the same work (same users, model, steps, seed), first in the
in-process simulation, then over a real Flower deployment on loopback (SuperLink + one SuperNode per user); the
ratio is the engine's overhead. `scale`: Flower's simulation engine with N virtual users of a tiny model whose
private state lives on disk; time per round and peak memory of the whole process tree, for each N.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path

import psutil

from ..collab import Workspace, load_config, run_strategy
from ..collab.flower.loopback import BIN, SRC, LoopbackFederation, free_port, wait_for

log = logging.getLogger(__name__)
REPO = SRC.parent


def _mean(xs):
    return statistics.fmean(xs) if xs else None


def overhead(train: dict, users: int, root: Path, timeout: float = 1800) -> dict:
    """Seconds per round: in-process simulation vs Flower deployment on loopback, same work."""
    root.mkdir(parents=True, exist_ok=True)
    over = {**train, "eval_round0": False, "max_eval_tokens": 64, "out_dir": str(root / "sim")}
    cfg = load_config(None, over)
    ws = Workspace.load(cfg)
    if len(ws.data) != users:
        raise ValueError(f"the corpus has {len(ws.data)} users, not {users}")
    sim = run_strategy(ws, cfg.strategy, cfg=cfg)
    sim_rounds = [h["seconds"] for h in sim.history if "seconds" in h]
    rc = {k: (",".join(map(str, v)) if isinstance(v, list) else ("none" if v is None else v))
          for k, v in cfg.to_dict().items()}
    rc.update({"out_dir": str(root / "fl" / "{strategy}"), "min-available-nodes": users, "min-train-nodes": users,
               "fraction-evaluate": 0.0, "state-root": str(root / "fl-state")})
    with LoopbackFederation(root / "fed", REPO) as fed:
        fed.start_superlink()
        for i in range(users):
            fed.start_node(f"node{i}", {"partition-id": i, "state-dir": str(root / "fl-state" / str(i))})
        t0 = time.time()
        fed.run(rc, "bench", timeout, expect=root / "fl" / cfg.strategy / "history.json")
        total = time.time() - t0
    hist = json.loads((root / "fl" / cfg.strategy / "history.json").read_text())
    fl_rounds = [hist["rounds"][str(r)]["train_seconds"] for r in range(1, cfg.rounds + 1)]
    return {"users": users, "model": cfg.model, "rounds": cfg.rounds, "local_steps": cfg.local_steps,
            "batch": cfg.batch_size, "seq": cfg.seq_len,
            "simulation_s_per_round": sim_rounds, "flower_s_per_round": fl_rounds, "flower_run_wall_s": total,
            "ratio_all_rounds": _mean(fl_rounds) / _mean(sim_rounds),
            "ratio_after_round_1": (_mean(fl_rounds[1:]) / _mean(sim_rounds[1:])) if cfg.rounds > 1 else None}


class _PeakRSS(threading.Thread):
    """Samples the summed RSS of a set of process trees (found by `roots()`), keeps the maximum."""

    def __init__(self, roots, every: float = 0.5):
        super().__init__(daemon=True)
        self.roots, self.every, self.peak, self.stop = roots, every, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            total = 0
            for r in self.roots():
                try:
                    procs = [r, *r.children(recursive=True)]
                except psutil.Error:
                    continue
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            self.peak = max(self.peak, total)
            self.stop.wait(self.every)


def scale(train: dict, users: int, root: Path, *, cpus: int = 2, timeout: float = 3600) -> dict:
    """Flower's simulation engine (`flwr run . local`), `users` virtual users with state on disk."""
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus"
    if not corpus.exists():
        for u in range(users):
            d = corpus / f"u{u:05d}"
            d.mkdir(parents=True)
            for j in range(3):
                (d / f"{j}.txt").write_text(f"user {u} writes note {j}: " + "lorem ipsum dolor sit amet " * 4)
    home = root / "flwr-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        f"options.num-supernodes = {users}\noptions.backend.client-resources.num-cpus = 1\n"
        f"options.backend.init-args.num-cpus = {cpus}\n")
    rc = {**train, "corpus": str(corpus), "max_chars": "none", "out_dir": str(root / "out" / "{strategy}"),
          "state-root": str(root / "state"), "min-available-nodes": users, "min-train-nodes": users,
          "fraction-evaluate": 0.0, "eval_round0": False}
    cfgfile = root / "run.toml"
    cfgfile.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in rc.items()))
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}

    def superlinks():
        out = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "flower-superlink" in cmd and str(home) in cmd:
                out.append(p)
        return out

    sampler = _PeakRSS(superlinks)
    sampler.start()
    t0 = time.time()
    try:
        res = subprocess.run([str(BIN / "flwr"), "run", str(REPO), "--run-config", str(cfgfile), "--stream"],
                             env=env, cwd=root, capture_output=True, text=True, timeout=timeout,
                             start_new_session=True)
        (root / "run.out").write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            raise RuntimeError(f"flwr run failed:\n{(res.stdout + res.stderr)[-3000:]}")
    finally:
        sampler.stop.set()
        sampler.join(timeout=5)
        for p in superlinks():           # `flwr run` leaves its local SuperLink running: stop its whole group
            try:
                os.killpg(p.pid, 15)
            except (ProcessLookupError, PermissionError):
                pass
        wait_for(lambda: not superlinks(), 30, "the local SuperLink to stop")
    hist = json.loads((root / "out" / rc.get("strategy", "1g1s") / "history.json").read_text())
    rounds = [hist["rounds"][str(r)]["train_seconds"] for r in range(1, int(train.get("rounds", 1)) + 1)]
    return {"users": users, "s_per_round": rounds, "mean_s_per_round": _mean(rounds),
            "run_wall_s": time.time() - t0, "peak_rss_mib": sampler.peak / 2**20,
            "state_on_disk_mib": sum(f.stat().st_size for f in (root / "state").rglob("*") if f.is_file()) / 2**20}
