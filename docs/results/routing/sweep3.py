# ruff: noqa  (the experiment driver as it ran; the runs are sweep2.py's driver with these settings)
"""Hard routing (seventeenth session): the linear router with top_k=1 (each token through one expert, gated by its
softmax probability, Switch-style), so that the experts' updates are no longer shared by every token; with the
shipped schedule and with `router_every=1`. fortunes en,de id, 1g1s, clean protocol, seed 42, 1 torch thread.
Usage: python docs/results/routing/sweep3.py OUT_DIR NAME..."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep2

sweep2.SETTINGS = {
    "linear_top1": ["top_k=1"],
    "linear_top1_every1": ["top_k=1", "router_every=1"],
}

if __name__ == "__main__":
    sweep2.main(sys.argv[1], sys.argv[2:])
