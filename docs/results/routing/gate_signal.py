"""What the validation loss asks of each gate, token by token, for several finished runs (issue 25 item 2).

The driver behind RESULTS.md "What the loss asks of the router": `pocketlm routing RUN --signal` for each run
(eval/routing_signal.py), sharing one workspace per corpus and seed, one torch thread, at most 4,096 tokens per
user and split. Usage: gate_signal.py OUT.json NAME=RUN_DIR...
"""
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("POCKETLM_PROGRESS", "0")
import torch  # noqa: E402

from pocketlm.collab import Workspace  # noqa: E402
from pocketlm.eval.routing import _run_config, analyze_run  # noqa: E402

torch.set_num_threads(1)
t0, res, spaces = time.time(), {}, {}
for arg in sys.argv[2:]:
    name, run = arg.split("=", 1)
    cfg, _ = _run_config(Path(run))
    key = (cfg.corpus, cfg.scenario, cfg.seed, cfg.max_chars)
    ws = spaces.get(key) or spaces.setdefault(key, Workspace.load(cfg))
    doc = analyze_run(run, workspace=ws, max_tokens=4096, signal=True)
    res[name] = doc
    for u, d in doc["users"].items():
        s = d["signal"]
        print(f"{name} {u}: want {({k: round(v, 2) for k, v in s['want'].items() if v is not None})} "
              f"gap {s['want_gap']:+.2f} layers asking/against {s['layers_asking']}/{s['layers_against']} of "
              f"{len(s['layers'])}; weight gap {s['weight_gap']:+.3f} corr {s['corr']:+.3f}", flush=True)
res["seconds"] = time.time() - t0
Path(sys.argv[1]).write_text(json.dumps(res, separators=(",", ":")))
print("seconds", round(res["seconds"]))
