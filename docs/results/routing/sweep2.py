# ruff: noqa  (the experiment driver as it ran; kept as the record, like sweep.py)
"""Router knobs not tried in sweep.py (fifteenth session): a 10x larger official-gate initialisation (w_in and
w_out N(0, 0.2), noise projection unchanged: out of the saddle at 0) and the expert-vs-router update ratio
(`router_every=1`: a router phase after every expert step, 32 router steps instead of 8), on the linear router
and the official gate. fortunes en,de id, 1g1s, clean protocol, seed 42, 1 torch thread. Usage:
python docs/results/routing/sweep2.py OUT_DIR NAME..."""
import json, os, sys, time
os.environ.setdefault("POCKETLM_PROGRESS", "0")
import torch
torch.set_num_threads(1)
from pocketlm.collab import Workspace, load_config, run_strategy
from pocketlm.eval.routing import analyze_run
from pocketlm.moe import router as R

BASE = ["corpus=fortunes:en,de", "eval_round0=false", "eval_every=4"]
SETTINGS = {
    "official_init10": ["router=official"],
    "linear_every1": ["router_every=1"],
    "official_every1": ["router=official", "router_every=1"],
    "official_init10_every1": ["router=official", "router_every=1"],
}
orig_reset = R.OfficialGate.reset

def reset_scaled(scale):
    def reset(self, seed, name):
        orig_reset(self, seed, name)
        with torch.no_grad():
            self.w_in.weight.mul_(scale)
            self.w_out.weight.mul_(scale)
    return reset

def main(out, names):
    os.makedirs(out, exist_ok=True)
    cfg0 = load_config("configs/fortunes-id.toml", BASE)
    ws = Workspace.load(cfg0)
    for name in names:
        R.OfficialGate.reset = reset_scaled(10.0) if "init10" in name else orig_reset
        cfg = load_config("configs/fortunes-id.toml", BASE + SETTINGS[name] + [f"out_dir={out}/runs/{name}"])
        ws.cfg = cfg
        l0, t0 = os.getloadavg(), time.time()
        sim = run_strategy(ws, "1g1s", cfg=cfg)
        t1 = time.time()
        R.OfficialGate.reset = orig_reset
        doc = analyze_run(sim.out, workspace=ws)
        res = {"name": name, "overrides": SETTINGS[name], "init_scale": 10.0 if "init10" in name else 1.0,
               "train_s": t1 - t0, "analysis_s": time.time() - t1, "load_before": l0, "load_after": os.getloadavg(),
               "final": sim.final(),
               "routing": {u: {"gap": d["gap"], "gap_max": d["gap_max"], "gap_min": d["gap_min"], "mean": d["mean"],
                               "all": d["all"], "tokens": d["tokens"]} for u, d in doc["users"].items()}}
        json.dump(doc, open(f"{out}/routing_{name}.json", "w"), indent=1)
        json.dump(res, open(f"{out}/run_{name}.json", "w"), indent=1)
        print(json.dumps({k: res[k] for k in ("name", "train_s", "analysis_s")}), res["final"]["mean_ppl"],
              {u: round(r["gap"], 4) for u, r in res["routing"].items()}, flush=True)

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
