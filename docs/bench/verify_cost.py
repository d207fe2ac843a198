"""How much more does a T-token forward cost than a 1-token one, float32 vs int8 weights, one thread (Qwen 1.5B)?
The question for the speculative verify on a CPU cloud: a GPU verifies a short draft in about one step."""
import json, sys, time
import torch
torch.set_num_threads(1)
from pocketlm.bench.geometries import load_bench_model
from pocketlm.models.quantize import quantize_device_model
spec = sys.argv[1]
out = {}
for mode in (None, "int8"):
    model, tok = load_bench_model(spec, device="cpu", dtype="float32", seed=1)
    model = quantize_device_model(model, mode)
    ids = torch.randint(100, 1000, (1, 160))
    with torch.inference_mode():
        res = {}
        for T in (1, 3, 5):
            times = []
            for rep in range(4):
                o = model(ids, use_cache=True)
                pkv = o.past_key_values
                nxt = torch.randint(100, 1000, (1, T))
                t0 = time.perf_counter()
                model(nxt, past_key_values=pkv, use_cache=True)
                times.append(time.perf_counter() - t0)
            res[T] = min(times[1:])
        out[mode or "float32"] = res
        print(mode or "float32", {t: f"{v*1000:.0f} ms" for t, v in res.items()}, flush=True)
    del model
json.dump(out, open(sys.argv[2] if len(sys.argv) > 2 else "verify_cost.json", "w"), indent=1)
