# ruff: noqa  (the experiment driver as it ran, paths under /tmp/rexp; kept as the record)
"""Router knob sweep: fortunes en,de id, 1g1s, clean protocol, seed 42, 1 torch thread."""
import json, os, sys, time
os.environ.setdefault("POCKETLM_PROGRESS", "0")
import torch
torch.set_num_threads(1)
import torch.nn.functional as F
from pocketlm.collab import Workspace, load_config, run_strategy
from pocketlm.eval.routing import analyze_run
from pocketlm.moe import router as R, mixture_layers
from pocketlm.moe.personal import load_personal

BASE = ["corpus=fortunes:en,de", "eval_round0=false", "eval_every=4"]
SETTINGS = {
    "linear": [], "official": ["router=official"],
    "official_lr10": ["router=official", "router_lr=2e-2"],
    "official_steps8": ["router=official", "router_steps=8"],
    "official_nobal": ["router=official"], "official_nonoise": ["router=official"],
    "linear_lr10": ["router_lr=2e-2"], "official_lr10_nobal_nonoise": ["router=official", "router_lr=2e-2"],
    "linear_steps8": ["router_steps=8"],
}
orig_route = R.OfficialGate.route

def route_scaled_noise(scale):
    def route(self, x, with_aux=False):
        clean = self.w_out(torch.tanh(self.w_in(x)))
        noisy = clean
        std = None
        if self.training and scale > 0:
            std = (F.softplus(F.linear(x, self.noise_weight)) + R.NOISE_EPSILON) * scale
            noisy = clean + torch.randn_like(clean) * std
        top, idx = noisy.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(noisy, dtype=torch.float32).scatter(-1, idx, torch.softmax(top.float(), -1))
        if not (self.training and with_aux):
            return gates, None
        return gates, R.BALANCE_WEIGHT * R.balance_loss(noisy, gates, None)
    return route

def gate_diag(ws, run, user):
    """Official gate: clean logit-difference spread, the tanh bound ||w_out[1]-w_out[0]||_1, and noise std."""
    model = load_personal(ws.base, run / "users" / user)
    xs = []
    layers = [m for _, m in mixture_layers(model)]
    hooks = [m.register_forward_pre_hook(lambda mod, a: xs.append(a[0].reshape(-1, a[0].shape[-1]))) for m in layers]
    with torch.no_grad():
        model(input_ids=ws.data[user].test[:512].view(4, 128))
    for h in hooks: h.remove()
    out = []
    with torch.no_grad():
        for m, x in zip(layers, xs):
            r = m.router
            if isinstance(r, R.OfficialGate):
                clean = r.w_out(torch.tanh(r.w_in(x)))
                std = F.softplus(F.linear(x, r.noise_weight)) + R.NOISE_EPSILON
                w = r.w_out.weight
                out.append({"diff_std": float((clean[:, 1] - clean[:, 0]).std()), "diff_mean": float((clean[:, 1] - clean[:, 0]).mean()),
                            "bound": float((w[1] - w[0]).abs().sum()), "noise_std": float(std.mean()),
                            "x_norm": float(x.norm(dim=-1).mean())})
            else:
                d = x @ (r.weight[1] - r.weight[0])
                out.append({"diff_std": float(d.std()), "diff_mean": float(d.mean()), "x_norm": float(x.norm(dim=-1).mean())})
    return out

def main(names):
    cfg0 = load_config("configs/fortunes-id.toml", BASE)
    ws = Workspace.load(cfg0)
    for name in names:
        R.BALANCE_WEIGHT = 0.0 if "nobal" in name else 0.01
        R.OfficialGate.route = route_scaled_noise(0.0) if "nonoise" in name else orig_route
        cfg = load_config("configs/fortunes-id.toml", BASE + SETTINGS[name] + [f"out_dir=/tmp/rexp/runs/{name}"])
        ws.cfg = cfg
        l0 = os.getloadavg()
        t0 = time.time()
        sim = run_strategy(ws, "1g1s", cfg=cfg)
        t1 = time.time()
        R.OfficialGate.route = orig_route
        doc = analyze_run(sim.out, workspace=ws)
        diag = {u: gate_diag(ws, sim.out, u) for u in doc["users"]}
        res = {"name": name, "overrides": SETTINGS[name], "balance_weight": R.BALANCE_WEIGHT,
               "noise": "off" if "nonoise" in name else "on", "train_s": t1 - t0, "analysis_s": time.time() - t1,
               "load_before": l0, "load_after": os.getloadavg(), "final": sim.final(),
               "routing": {u: {"gap": d["gap"], "gap_max": d["gap_max"], "gap_min": d["gap_min"], "mean": d["mean"],
                               "all": d["all"], "tokens": d["tokens"]} for u, d in doc["users"].items()},
               "diag": diag}
        json.dump(doc, open(f"/tmp/rexp/routing_{name}.json", "w"), indent=1)
        json.dump(res, open(f"/tmp/rexp/res_{name}.json", "w"), indent=1)
        print(json.dumps({k: res[k] for k in ("name", "train_s", "analysis_s")}), res["final"]["mean_ppl"],
              {u: round(r["gap"], 4) for u, r in res["routing"].items()}, flush=True)

main(sys.argv[1:])
