"""CI smoke check: can this llama-cpp-python build run one completion on the built-in GGUF? (exit 0 = yes).

Runs in a child process so a crash in llama.cpp's kernels (a segfault) is an exit code, not a dead CI script."""
import subprocess
import sys

CHILD = """
from llama_cpp import Llama
from pocketlm.models.builtin import builtin_gguf
llm = Llama(model_path=str(builtin_gguf("smollm2-135m")), n_ctx=256, logits_all=True, verbose=False)
out = llm.create_completion("Hello, my name is", max_tokens=2, temperature=0, logprobs=5)
assert out["choices"][0]["logprobs"]["top_logprobs"], out
"""

try:
    from pocketlm.models.builtin import builtin_gguf
    builtin_gguf("smollm2-135m")
except Exception as e:  # no built-in GGUF: the test skips anyway; nothing to check
    print(f"llama smoke check skipped: {e}")
    sys.exit(0)
rc = subprocess.run([sys.executable, "-c", CHILD]).returncode
print(f"llama smoke check: exit {rc}")
sys.exit(0 if rc == 0 else 1)
