"""Rows decoded in lockstep behind one protocol (protocol): the dynamic and the static KV cache, the Llama/Qwen
one-token forward they and the step server's pool share (llama_step), prompt prefill, and the device's pair."""
