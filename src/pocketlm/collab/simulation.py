"""In-process simulation of CoMiGS rounds: one frozen base, many devices, a server, checkpoints, resume.

Devices with the same number of experts share one model view over the frozen base; a device's adapters are
bound into it by pointer before its local update or evaluation. After every round the whole state (adapters,
optimizer moments, schedules, batch RNGs, the global RNG, the server, the history) is written atomically, so a
killed run resumed with `resume=True` continues bit-for-bit like the uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from ..data import UserTokens
from ..errors import PocketLMError
from ..eval import perplexity
from ..moe import RoutingRecorder, inject_moe, save_parts, shared_base_view
from ..progress import progress
from .client import Device, bind
from .server import Server, Upload
from .strategies import Strategy, experts_per_user

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
POOLED = "pooled"


def pooled_tokens(data: dict[str, UserTokens]) -> UserTokens:
    """The centralized baseline's one user: every user's splits concatenated."""
    return UserTokens(*(torch.cat([t[k] for t in data.values()]) for k in ("train", "val", "test")))


class Simulation:
    def __init__(self, cfg, strategy: Strategy, base: nn.Module, data: dict[str, UserTokens], out_dir: str | Path,
                 *, pad_id: int = 0):
        self.cfg, self.strategy, self.base, self.data = cfg, strategy, base, data
        self.out = Path(out_dir)
        self.pad_id = pad_id
        self.users = list(data)
        self.eval_data = {u: t.test[: cfg.max_eval_tokens] if cfg.max_eval_tokens else t.test for u, t in data.items()}
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
            self.models[experts] = inject_moe(shared_base_view(self.base), self.strategy.moe_config(self.cfg, experts))
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

    def _bind(self, user: str) -> nn.Module:
        d = self.devices[user]
        model = self._model_for(len(self._experts_of(d)))
        bind(model, d.params)
        return model

    @staticmethod
    def _experts_of(d: Device) -> set[str]:
        return {n.split(".experts.", 1)[1].split(".", 1)[0] for n in d.params if ".experts." in n}

    # -- one round ---------------------------------------------------------------------------------
    def _download(self, d: Device) -> None:
        with torch.no_grad():
            for n, t in self.server.download(d.params).items():
                d.params[n].copy_(t)

    def train_round(self) -> dict:
        losses, skipped = {}, {}
        uploads = []
        for user, d in progress(self.devices.items(), desc=f"round {self.round + 1}/{self.cfg.rounds}",
                                total=len(self.devices)):
            self._download(d)
            model = self._bind(user)
            tokens = self.train_data[user]
            ls = d.local_update(model, tokens.train, tokens.val, self.cfg.local_steps)
            finite = [x for x in ls if math.isfinite(x)]
            losses[user] = sum(finite) / len(finite) if finite else float("nan")
            skipped[user] = d.skipped
            if self.strategy.collaborative:
                uploads.append(Upload(user, {n: p.detach() for n, p in d.params.items() if self.server.shares(n)},
                                      d.train_tokens))
        report = self.server.aggregate(uploads) if uploads else None
        for d in self.devices.values():
            self._download(d)
        return {"train_loss": losses, "rejected": report.rejected if report else {}}

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        ppl, routing = {}, {}
        for user in self.users:
            if not self.strategy.trains:
                model = self.base
            else:
                model = self._bind(POOLED if self.strategy.pooled else user)
            with RoutingRecorder(model) as rec:
                ppl[user] = perplexity(model, self.eval_data[user], block_len=self.cfg.seq_len,
                                       batch_size=self.cfg.eval_batch_size, pad_id=self.pad_id,
                                       desc=f"eval {user}")
            if rec.stats and any(m.router is not None for m in rec.layers):
                routing[user] = {str(k): v for k, v in rec.stats.items()}
        return {"per_user_ppl": ppl, "mean_ppl": sum(ppl.values()) / len(ppl), "routing": routing}

    # -- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        state = {"round": self.round, "config": self.cfg.to_dict(), "strategy": self.strategy.name,
                 "devices": {u: d.state_dict() for u, d in self.devices.items()},
                 "server": self.server.global_state, "history": self.history, "rng": torch.get_rng_state()}
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
            info = self.train_round()
            self.round += 1
            entry = {"round": self.round, **info, "seconds": time.time() - t0}
            if self.round % self.cfg.eval_every == 0 or self.round == self.cfg.rounds:
                entry.update(self.evaluate())
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
        (self.out / "history.json").write_text(json.dumps(
            {"strategy": self.strategy.name, "scenario": self.cfg.scenario, "config": self.cfg.to_dict(),
             "history": self.history}, indent=2))
        for user in self.devices:
            model = self._bind(user)
            save_parts(model, self.out / "users" / user, set(self.strategy.shared_roles))
        log.info("%s: results in %s", self.strategy.name, self.out)

    def final(self) -> dict:
        last = next(h for h in reversed(self.history) if "per_user_ppl" in h)
        return {"per_user_ppl": last["per_user_ppl"], "mean_ppl": last["mean_ppl"]}


def _core(cfg: dict) -> dict:
    """Config keys that change results (bookkeeping such as out_dir or device may differ on resume)."""
    return {k: v for k, v in cfg.items() if k not in ("out_dir", "device", "eval_batch_size", "eval_every",
                                                "eval_round0")}

