"""A device's private CoMiGS state on its own disk: it survives a SuperNode restart and a new Flower run.

Layout of the node's state directory (one device = one directory):

    device.json                      small JSON: which tensor file is current, identity, counters, schedules
    device-<step>.safetensors        adapters (shared + private), AdamW moments, the batch RNG
    global-<step>.safetensors        the server's last average of the shared parts this device holds, kept when
                                     the run ends (`device.json` names it, its round and the device step it follows)
    adapter_config.json              the mixture layout and the base's fingerprint (moe.state), for steering

The same directory is the device's personal model: `read_device` gives the adapters to steer with, the latest
global shared parts plus the device's private experts and router (moe.personal.load_personal reads it).

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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ...errors import PocketLMError
from ...moe.inject import param_role

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


def read_meta(path: Path) -> dict:
    """A `device.json`, checked; any problem is a `PrivateStateError` naming the file."""
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


def _param_shapes(path: Path, named_by: Path) -> dict[str, tuple]:
    try:
        with safe_open(str(path), "pt") as f:
            return {k[len("params."):]: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("params.")}
    except FileNotFoundError as e:
        raise PrivateStateError(f"{path} (named by {named_by}) is missing") from e
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PrivateStateError(f"{path} is corrupt: {e}") from e


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
        previous = self._meta_or_none()
        if previous and "global" in previous:
            meta["global"] = previous["global"]     # kept; `read_device` decides whether it is still current
        old = previous.get("tensors") if previous else None
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

    def _meta_or_none(self) -> dict | None:
        try:
            meta = json.loads(self.meta_path.read_text())
            return meta if isinstance(meta, dict) else None
        except (OSError, ValueError):
            return None

    def read_meta(self) -> dict:
        return read_meta(self.meta_path)

    def save_global(self, global_state: dict[str, torch.Tensor], server_round: int) -> Path | None:
        """Keep the server's average of the shared tensors this device holds (the final one of a run) beside its
        own state: new file, fsync, atomic `device.json`, older global files removed. None when the device has
        no state yet (nothing to steer with)."""
        if not self.exists():
            return None
        meta = self.read_meta()
        shapes = _param_shapes(self.dir / meta["tensors"], self.meta_path)
        roles = set(meta.get("shared_roles") or ())
        keep = {n: t.detach().cpu().float().contiguous() for n, t in global_state.items()
                if n in shapes and tuple(t.shape) == shapes[n] and (not roles or param_role(n) in roles)}
        name = f"global-{meta['step']:08d}.safetensors"
        tmp = self.dir / (name + ".partial")
        save_file(keep, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(self.dir / name)
        meta["global"] = {"tensors": name, "round": int(server_round), "step": meta["step"]}
        _write_atomic(self.meta_path, json.dumps(meta, indent=1).encode())
        for p in self.dir.glob("global-*.safetensors"):
            if p.name != name:
                p.unlink(missing_ok=True)
        log.info("%s: kept the global average of round %d (%d shared tensors)", self.dir, server_round, len(keep))
        return self.dir / name

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


# -- the device state as a personal model (steering reads it; nothing is written) --------------------------------
@dataclass
class DeviceAdapters:
    """The adapters a device steers with: the latest global shared parts where they follow the device's last
    training (else its own), plus its private experts and router."""

    directory: Path
    meta: dict
    params: dict[str, torch.Tensor]
    shared_names: set[str]
    global_round: int | None        # the server round the shared parts come from; None: the device's own


def is_device_state(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / META).is_file() or any(d.glob("device-*.safetensors"))


def _load(path: Path, named_by: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError as e:
        raise PrivateStateError(f"{path} (named by {named_by}) is missing (half-written state?)") from e
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PrivateStateError(f"{path} is corrupt: {e}") from e


def read_device(directory: str | Path) -> DeviceAdapters:
    """A device state directory as a personal model's adapters. A global file is used only when it was received
    after the device's last local update (same step): a device killed in a later run steers with its own
    newer shared parts. Any missing, corrupt or misfitting file is a `PrivateStateError` naming it."""
    from ..strategies import get_strategy

    d = Path(directory).expanduser()
    meta_path = d / META
    if not meta_path.is_file():
        strays = sorted(d.glob("device-*.safetensors"))
        raise PrivateStateError(f"{strays[0]} has no {META} beside it (interrupted first save?)" if strays
                                else f"{meta_path} not found: {d} is not a device state directory")
    meta = read_meta(meta_path)
    path = d / meta["tensors"]
    params = {k[len("params."):]: t for k, t in _load(path, meta_path).items() if k.startswith("params.")}
    if not params:
        raise PrivateStateError(f"{path} is incomplete: it holds no adapters")
    try:
        roles = set(meta.get("shared_roles") or get_strategy(str(meta.get("strategy"))).shared_roles)
    except Exception as e:
        raise PrivateStateError(f"{meta_path}: cannot tell which tensors are shared ({e})") from e
    shared = {n for n in params if param_role(n) in roles}
    glob, round_ = meta.get("global"), None
    if isinstance(glob, dict) and glob.get("step") == meta.get("step"):
        gpath = d / str(glob.get("tensors"))
        parts = _load(gpath, meta_path)
        bad = [n for n, t in parts.items() if n not in shared or tuple(t.shape) != tuple(params[n].shape)]
        if bad:
            raise PrivateStateError(f"{gpath} does not fit {path}: {bad[:3]}")
        params.update({n: t.to(params[n].dtype) for n, t in parts.items()})
        round_ = int(glob["round"])
    elif glob:
        log.info("%s: the global average of round %s predates the device's last update; its own shared parts "
                 "are used", d, glob.get("round"))
    return DeviceAdapters(d, meta, params, shared, round_)


def describe(directory: str | Path) -> dict:
    """What `pocketlm device status` shows: who, what model, how far trained, where its shared parts come from."""
    dev = read_device(directory)
    m = dev.meta
    files = sorted(p for p in dev.directory.iterdir() if p.is_file())
    return {"directory": str(dev.directory), "user": m.get("user"), "model": m.get("model"),
            "strategy": m.get("strategy"), "experts": m.get("experts"), "rank": m.get("rank"),
            "rounds_done": m.get("rounds_done", 0), "step": m.get("step"), "last_server_round": m.get("server_round"),
            "shared_from_round": dev.global_round,
            "tensors": {"shared": len(dev.shared_names), "private": len(dev.params) - len(dev.shared_names)},
            "bytes": sum(p.stat().st_size for p in files), "files": [p.name for p in files]}
