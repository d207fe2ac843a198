"""Cloud backends: each a `streams.protocol.CloudBackend` that receives token ids only.

in_process (an HF model here), remote + wire (the step server's client and its message format), openai +
openai_http + openai_pieces (any OpenAI-compatible completions server). The network backends import httpx /
websockets (the `serve` extra), so import them from their modules, not from here.
"""
