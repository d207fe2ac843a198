"""In-process simulation of CoMiGS rounds: one frozen base, many devices, a server, checkpoints, resume.

Devices with the same number of experts share one model view over the frozen base; a device's adapters are
installed into it only inside `with device.bound(model)` (its local update, its evaluation). After every round
the whole state (adapters, optimizer moments, schedules, batch RNGs, the CPU and CUDA RNGs, the server, the
history) is written atomically, so a killed run resumed with `resume=True` continues bit-for-bit like the
uninterrupted one.

Scoring: on evaluated rounds every device is scored right after its local steps (`before_aggregation`, what
the official code reports) and again after the server average (`after_aggregation`); `eval_at` picks the
headline. Without a server average (local, 2s, centralized) the two are the same model and are scored once.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from ..data import UserTokens
from ..errors import PocketLMError
from ..eval import perplexity
from ..jsonfile import write_json
from ..moe import RoutingRecorder, inject_moe, save_parts, shared_base_view
from ..progress import progress
from .client import Device
from .server import Server, Upload
from .strategies import Strategy, experts_per_user

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
POOLED = "pooled"


def pooled_tokens(data: dict[str, UserTokens]) -> UserTokens:
    """The centralized baseline's one user: every user's splits concatenated."""
    return UserTokens(*(torch.cat([t[k] for t in data.values()]) for k in ("train", "val", "test")))


# The pieces a round is made of, shared with the Flower apps (collab.flower.task), which run the same round
# with one device per node.
def model_view(base: nn.Module, strategy: Strategy, cfg, experts: int) -> nn.Module:
    """A mixture model with `experts` experts over `base`'s tensors (devices bind their adapters into it)."""
    return inject_moe(shared_base_view(base), strategy.moe_config(cfg, experts))


def eval_stream(tokens: UserTokens, cfg) -> torch.Tensor:
    """A user's test split, cut to `max_eval_tokens` when that is set."""
    return tokens.test[: cfg.max_eval_tokens] if cfg.max_eval_tokens else tokens.test


def score_ppl(model: nn.Module, stream: torch.Tensor, cfg, pad_id: int, desc: str | None = None) -> float:
    """Test perplexity as every strategy and the federation report it (blocks of `seq_len`)."""
    return perplexity(model, stream, block_len=cfg.seq_len, batch_size=cfg.eval_batch_size, pad_id=pad_id, desc=desc)


def mean_loss(losses: list[float]) -> float:
    """The mean of the finite losses of a local update (skipped steps are not averaged in); NaN if none."""
    finite = [x for x in losses if math.isfinite(x)]
    return sum(finite) / len(finite) if finite else float("nan")


class Simulation:
    def __init__(self, cfg, strategy: Strategy, base: nn.Module, data: dict[str, UserTokens], out_dir: str | Path,
                 *, pad_id: int = 0):
        strategy = strategy.for_config(cfg)
        self.cfg, self.strategy, self.base, self.data = cfg, strategy, base, data
        self.out = Path(out_dir)
        self.pad_id = pad_id
        self.users = list(data)
        self.eval_data = {u: eval_stream(t, cfg) for u, t in data.items()}
        self.train_data = {POOLED: pooled_tokens(data)} if strategy.pooled else dict(data)
        self.history: list[dict] = []
        self.round = 0
        self.models: dict[int, nn.Module] = {}
        self.devices: dict[str, Device] = {}
        self.server = Server(strategy.shared_roles, cfg.aggregation)
        if strategy.trains:
            self._build_devices()

    # -- setup -------------------------------------------------------------------------------------
    def _model_for(self, experts: int) -> nn.Module:
        if experts not in self.models:
            self.models[experts] = model_view(self.base, self.strategy, self.cfg, experts)
        return self.models[experts]

    def _build_devices(self) -> None:
        counts = experts_per_user(self.strategy, list(self.train_data), self.cfg.experts)
        batch = self.cfg.batch_size * (len(self.users) if self.strategy.pooled else 1)
        for user, e in counts.items():
            model = self._model_for(e)
            self.devices[user] = Device(user, model, self.cfg, bilevel=self.strategy.router, batch_size=batch,
                                        train_tokens=int(self.train_data[user].train.numel()))
        self.server.init_from([d.params for d in self.devices.values()])
        per_user = max(d.adapter_bytes() for d in self.devices.values())
        log.info("%s: %d device(s), up to %.1f MiB of adapters + optimizer state each; %.2f MiB uploaded per round",
                 self.strategy.name, len(self.devices), per_user / 2**20, self.server.upload_bytes() / 2**20)

    def model_of(self, user: str) -> nn.Module:
        """The shared model view with `user`'s expert count (compute with it inside `device.bound`)."""
        return self._model_for(self.devices[user].num_experts)

    # -- one round ---------------------------------------------------------------------------------
    def train_round(self, *, score: bool = False) -> dict:
        """One round. `score`: also score each device right after its local steps (before the average)."""
        losses, skipped, before = {}, {}, {}
        uploads = []
        for user, d in progress(self.devices.items(), desc=f"round {self.round + 1}/{self.cfg.rounds}",
                                total=len(self.devices)):
            d.download(self.server.global_state, self.server.shares)
            tokens = self.train_data[user]
            ls = d.local_update(self.model_of(user), tokens.train, tokens.val, self.cfg.local_steps)
            losses[user] = mean_loss(ls)
            skipped[user] = d.skipped
            if score and self.strategy.collaborative:
                before.update(self._score(user))
            if self.strategy.collaborative:
                uploads.append(Upload(user, {n: p.detach() for n, p in d.params.items() if self.server.shares(n)},
                                      d.train_tokens))
        report = self.server.aggregate(uploads) if uploads else None
        for d in self.devices.values():
            d.download(self.server.global_state, self.server.shares)
        info = {"train_loss": losses, "rejected": report.rejected if report else {}}
        if before:
            info["before_aggregation"] = _summary({u: before[u] for u in self.users})
        return info

    # -- evaluation --------------------------------------------------------------------------------
    def _score(self, device_user: str, routing: dict | None = None) -> dict[str, float]:
        """Test perplexity, with `device_user`'s adapters, of every user it serves (all users for the pooled
        device, else itself); routing shares go into `routing` when given."""
        if not self.strategy.trains:
            model, ctx = self.base, nullcontext()
        else:
            model = self.model_of(device_user)
            ctx = self.devices[device_user].bound(model)
        users = self.users if device_user == POOLED else [device_user]
        out = {}
        with ctx:
            for user in users:
                with RoutingRecorder(model) as rec:
                    out[user] = score_ppl(model, self.eval_data[user], self.cfg, self.pad_id, desc=f"eval {user}")
                if routing is not None and rec.stats and any(m.router is not None for m in rec.layers):
                    routing[user] = {str(k): v for k, v in rec.stats.items()}
        return out

    def evaluate(self, before: dict | None = None) -> dict:
        """Score every user after the server average. `before`: the scores right after the local steps (the
        same model when nothing is averaged); `eval_at` decides which pair is the headline."""
        ppl, routing = {}, {}
        owners = [POOLED] if self.strategy.pooled else self.users
        for owner in owners:
            ppl.update(self._score(owner, routing))
        after = _summary({u: ppl[u] for u in self.users})
        before = before or after
        head = before if self.cfg.eval_at == "before_aggregation" else after
        return {**head, "eval_at": self.cfg.eval_at, "after_aggregation": after, "before_aggregation": before,
                "routing": routing}

    # -- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        state = {"round": self.round, "config": self.cfg.to_dict(), "strategy": self.strategy.name,
                 "devices": {u: d.state_dict() for u, d in self.devices.items()},   # each with its batch RNG
                 "server": self.server.global_state, "history": self.history, "rng": torch.get_rng_state(),
                 # the official gate's training noise and GPT-2 dropout draw from the device's global RNG
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}
        tmp = self.out / (CHECKPOINT + ".partial")
        torch.save(state, tmp)
        tmp.replace(self.out / CHECKPOINT)

    def load_checkpoint(self) -> bool:
        path = self.out / CHECKPOINT
        if not path.is_file():
            return False
        try:
            state = torch.load(path, weights_only=False)
        except Exception as e:
            raise PocketLMError(f"cannot resume from {path} (corrupt?): {e}") from e
        if state.get("strategy") != self.strategy.name or _core(state["config"]) != _core(self.cfg.to_dict()):
            raise PocketLMError(f"{path} was written by a different strategy or config; use another out_dir "
                                "or drop --resume")
        for u, s in state["devices"].items():
            self.devices[u].load_state_dict(s)
        self.server.global_state = state["server"]
        self.history, self.round = state["history"], state["round"]
        torch.set_rng_state(state["rng"])
        cuda_rng = state.get("cuda_rng")
        if cuda_rng is not None:
            if not torch.cuda.is_available() or torch.cuda.device_count() < len(cuda_rng):
                raise PocketLMError(f"{path} holds the RNG state of {len(cuda_rng)} CUDA device(s), which this "
                                    "machine lacks; resume it where it ran (or start again)")
            torch.cuda.set_rng_state_all(cuda_rng)
        log.info("resumed %s at round %d from %s", self.strategy.name, self.round, path)
        return True

    # -- the run -----------------------------------------------------------------------------------
    def run(self, *, resume: bool = False, stop_after: int | None = None) -> list[dict]:
        """Run (or resume) all rounds; `stop_after` ends early after that round (tests use it as a kill)."""
        if not (resume and self.load_checkpoint()):
            self.round, self.history = 0, []
            if self.cfg.eval_round0 or not self.strategy.trains:
                self.history.append({"round": 0, **self.evaluate()})
            if not self.strategy.trains:
                self._finish()
                return self.history
            self.save_checkpoint()
        while self.round < self.cfg.rounds:
            t0 = time.time()
            scored = (self.round + 1) % self.cfg.eval_every == 0 or self.round + 1 == self.cfg.rounds
            info = self.train_round(score=scored)
            self.round += 1
            entry = {"round": self.round, **info, "seconds": time.time() - t0}
            if scored:
                entry.update(self.evaluate(before=entry.pop("before_aggregation", None)))
                log.info("%s round %d: mean ppl %.3f", self.strategy.name, self.round, entry["mean_ppl"])
            self.history.append(entry)
            self.save_checkpoint()
            if stop_after is not None and self.round >= stop_after and self.round < self.cfg.rounds:
                return self.history
        self._finish()
        return self.history

    def _finish(self) -> None:
        """Write the history and each device's shared/private adapters (safetensors)."""
        self.out.mkdir(parents=True, exist_ok=True)
        write_json({"strategy": self.strategy.name, "scenario": self.cfg.scenario, "config": self.cfg.to_dict(),
                    "history": self.history}, self.out / "history.json")
        for user, d in self.devices.items():
            with d.bound(self.model_of(user)) as model:
                save_parts(model, self.out / "users" / user, set(self.strategy.shared_roles))
        log.info("%s: results in %s", self.strategy.name, self.out)

    def final(self) -> dict:
        """The last evaluated round: the headline pair (at `eval_at`) and both pairs by name."""
        last = next(h for h in reversed(self.history) if "per_user_ppl" in h)
        out = {"per_user_ppl": last["per_user_ppl"], "mean_ppl": last["mean_ppl"]}
        for key in ("before_aggregation", "after_aggregation"):
            out[key] = last.get(key) or {"per_user_ppl": last["per_user_ppl"], "mean_ppl": last["mean_ppl"]}
        out["eval_at"] = last.get("eval_at", "after_aggregation")
        return out


def _summary(ppl: dict[str, float]) -> dict:
    return {"per_user_ppl": ppl, "mean_ppl": sum(ppl.values()) / len(ppl)}


def _core(cfg: dict) -> dict:
    """Config keys that change results (bookkeeping such as out_dir or device may differ on resume)."""
    return {k: v for k, v in cfg.items() if k not in ("out_dir", "device", "eval_batch_size", "eval_every",
                                                "eval_round0")}

