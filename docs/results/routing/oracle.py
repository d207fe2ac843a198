# ruff: noqa  (the experiment driver as it ran, paths under /tmp/rexp; kept as the record)
"""Per-token NLL with the gate forced to generalist-only / specialist-only, by specificity bucket (the signal a
router could learn from). Usage: oracle.py RUN_NAME..."""
import json, os, sys, time
os.environ.setdefault("POCKETLM_PROGRESS", "0")
import torch
torch.set_num_threads(1)
import torch.nn.functional as F
from pocketlm.collab import Workspace, load_config
from pocketlm.data.packing import pack_blocks
from pocketlm.eval.routing import BUCKETS, bucket_of, specificity, _run_config
from pocketlm.moe import mixture_layers
from pocketlm.moe.personal import load_personal

def nll(model, stream, gate):
    layers = [m for _, m in mixture_layers(model)]
    for m in layers:
        if gate is not None:
            m.router.route = (lambda g: (lambda x, with_aux=False: (g.expand(x.shape[0], -1).clone(), None)))(torch.tensor(gate))
        else:
            m.router.__dict__.pop("route", None)
    b = pack_blocks(stream, 128)
    out = []
    with torch.no_grad():
        for s in range(0, len(b), 8):
            ids, mask = b.input_ids[s:s+8], b.attention_mask[s:s+8]
            lg = model(input_ids=ids, attention_mask=mask).logits.float()
            l = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="none").view(ids.shape[0], -1)
            l = torch.cat([l, torch.zeros(ids.shape[0], 1)], 1)  # position i predicts i+1; last has none
            valid = mask.clone(); valid[:, -1] = 0; valid[:, :-1] &= mask[:, 1:]
            out.append((ids[valid.bool()], l[valid.bool()]))
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])

t0 = time.time()
res = {}
ws = None
for name in sys.argv[1:]:
    run = __import__("pathlib").Path(f"/tmp/rexp/runs/{name}")
    cfg, _ = _run_config(run)
    if ws is None:
        ws = Workspace.load(cfg)
    res[name] = {}
    for u in ws.data:
        r = specificity({k: t.train for k, t in ws.data.items()}, u)
        model = load_personal(ws.base, run / "users" / u)
        stream = ws.data[u].test
        ids, gen = nll(model, stream, [1.0, 0.0])
        _, spec = nll(model, stream, [0.0, 1.0])
        _, half = nll(model, stream, [0.5, 0.5])
        _, learned = nll(model, stream, None)
        bk = bucket_of(torch.cat([r, torch.full((max(0, int(ids.max()) + 1 - r.numel()),), float("nan"))]))[ids]
        d = {}
        for j, bn in enumerate(BUCKETS):
            s = bk == j
            if s.any():
                d[bn] = {"tokens": int(s.sum()), "gen": float(gen[s].mean()), "spec": float(spec[s].mean()),
                         "half": float(half[s].mean()), "learned": float(learned[s].mean()),
                         "spec_minus_gen": float((spec[s] - gen[s]).mean()), "spec_better": float((spec[s] < gen[s]).float().mean())}
        d["all"] = {"gen_ppl": float(gen.mean().exp()), "spec_ppl": float(spec.mean().exp()), "half_ppl": float(half.mean().exp()),
                    "learned_ppl": float(learned.mean().exp()), "oracle_ppl": float(torch.minimum(gen, spec).mean().exp())}
        res[name][u] = d
        print(name, u, json.dumps(d["all"]), {k: round(v["spec_minus_gen"], 4) for k, v in d.items() if k != "all"}, flush=True)
json.dump(res, open("/tmp/rexp/oracle.json", "w"), indent=1)
print("seconds", time.time() - t0)
