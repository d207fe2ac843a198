"""The truncated cloud downlink: top-k steps (topk) and the exact greedy choice certified from them (certify)."""
