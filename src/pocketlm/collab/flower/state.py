"""A device's private CoMiGS state on its own disk: it survives a SuperNode restart and a new Flower run.

Layout of the node's state directory (one device = one directory):

    device.json                      small JSON: which tensor file is current, identity, counters, schedules
    device-<step>.safetensors        adapters (shared + private), AdamW moments, the batch RNG

A save writes a new tensor file, then replaces `device.json` atomically (temp file, fsync, rename), then removes
older tensor files. A crash at any point leaves `device.json` naming a complete file: the node resumes from the
last finished round. Nothing is ever started fresh silently: a missing, corrupt or mismatched file is a
`PrivateStateError` that names the file.

Nothing here imports Flower; the state belongs to the device, not to the engine.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ...errors import PocketLMError

log = logging.getLogger(__name__)

META = "device.json"
FORMAT = 1
# what must match between a saved state and the device that loads it (else the tensors mean something else)
IDENTITY = ("user", "model", "strategy", "experts", "rank", "alpha", "top_k")


class PrivateStateError(PocketLMError):
    """A device's private state file is corrupt, incomplete or belongs to another device or setup."""


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _flatten_opt(prefix: str, sd: dict | None, tensors: dict[str, torch.Tensor]) -> dict | None:
    """Optimizer state dict -> tensors under `prefix.<param index>.<key>` + the JSON-able param groups."""
    if sd is None:
        return None
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{prefix}.{idx}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) \
                else torch.tensor(v)
    return {"param_groups": sd["param_groups"]}


def _unflatten_opt(prefix: str, groups: dict | None, tensors: dict[str, torch.Tensor]) -> dict | None:
    if groups is None:
        return None
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        if key.startswith(prefix + "."):
            idx, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(idx), {})[name] = t
    return {"state": state, "param_groups": groups["param_groups"]}


class PrivateState:
    """Save / load one device's state (`Device.state_dict()` layout) in `directory`."""

    def __init__(self, directory: str | Path, identity: dict):
        self.dir = Path(directory).expanduser()
        self.identity = {k: identity[k] for k in IDENTITY}

    @property
    def meta_path(self) -> Path:
        return self.dir / META

    def exists(self) -> bool:
        return self.meta_path.is_file()

    def save(self, state: dict, extra: dict | None = None) -> Path:
        """Write `state` (from `Device.state_dict()`); `extra` (JSON-able) is kept in device.json."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"params.{n}": t.detach().cpu().contiguous() for n, t in state["params"].items()}
        tensors["gen"] = state["gen"].clone()
        meta = {
            "format": FORMAT, **self.identity,
            "step": state["step"], "skipped": state["skipped"], "sched": state["sched"],
            "expert_opt": _flatten_opt("expert_opt", state["expert_opt"], tensors),
            "router_opt": _flatten_opt("router_opt", state["router_opt"], tensors),
            **(extra or {}),
        }
        name = f"device-{state['step']:08d}.safetensors"
        meta["tensors"] = name
        old = self._current_file()
        tmp = self.dir / (name + ".partial")
        save_file(tensors, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(self.dir / name)
        _write_atomic(self.meta_path, json.dumps(meta, indent=1).encode())
        for p in self.dir.glob("device-*.safetensors"):
            if p.name != name:
                p.unlink(missing_ok=True)
        if old and old != name:
            log.debug("private state %s replaced %s", name, old)
        return self.dir / name

    def _current_file(self) -> str | None:
        try:
            return json.loads(self.meta_path.read_text())["tensors"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def read_meta(self) -> dict:
        path = self.meta_path
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise PrivateStateError(f"cannot read {path}: {e.strerror or e}") from e
        except (ValueError, UnicodeDecodeError) as e:
            raise PrivateStateError(f"{path} is corrupt (not JSON: {e}); restore it or remove the directory "
                                    "to start this device from scratch") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("tensors"), str):
            raise PrivateStateError(f"{path} is not a pocketlm device state (format {FORMAT})")
        return meta

    def load(self) -> tuple[dict, dict] | None:
        """`(state for Device.load_state_dict, device.json)`, or None when the directory holds no state.

        A directory with tensor files but no device.json is an interrupted first save: that is an error too,
        so a device never silently forgets what it learned."""
        if not self.exists():
            strays = sorted(self.dir.glob("device-*.safetensors")) if self.dir.is_dir() else []
            if strays:
                raise PrivateStateError(f"{strays[0]} has no {META} beside it (interrupted first save?); "
                                        "remove it to start this device from scratch")
            return None
        meta = self.read_meta()
        wrong = {k: (meta.get(k), v) for k, v in self.identity.items() if meta.get(k) != v}
        if wrong:
            what = ", ".join(f"{k}: saved {a!r} != now {b!r}" for k, (a, b) in wrong.items())
            raise PrivateStateError(f"{self.meta_path} belongs to another device or setup ({what}); point this "
                                    "node at its own state directory")
        path = self.dir / meta["tensors"]
        try:
            tensors = load_file(str(path))
        except FileNotFoundError as e:
            raise PrivateStateError(f"{path} (named by {self.meta_path}) is missing") from e
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise PrivateStateError(f"{path} is corrupt: {e}") from e
        if "gen" not in tensors:
            raise PrivateStateError(f"{path} is incomplete: no batch RNG state")
        state = {
            "params": {k[len("params."):]: t for k, t in tensors.items() if k.startswith("params.")},
            "expert_opt": _unflatten_opt("expert_opt", meta["expert_opt"], tensors),
            "router_opt": _unflatten_opt("router_opt", meta["router_opt"], tensors),
            "sched": meta["sched"], "step": meta["step"], "skipped": meta["skipped"], "gen": tensors["gen"],
        }
        return state, meta

    def check_params(self, state: dict, expected: dict[str, torch.Tensor], path: Path | None = None) -> None:
        """The saved adapters must be exactly the device's tensors (names and shapes)."""
        path = path or self.meta_path
        saved = {n: tuple(t.shape) for n, t in state["params"].items()}
        want = {n: tuple(t.shape) for n, t in expected.items()}
        if saved != want:
            missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
            shapes = sorted(n for n in set(want) & set(saved) if want[n] != saved[n])
            raise PrivateStateError(f"{path} does not fit this device: missing {missing[:3]}, unexpected "
                                    f"{extra[:3]}, other shapes {shapes[:3]}")
