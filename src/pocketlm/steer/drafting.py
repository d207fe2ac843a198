"""The device's draft, one column at a time and resumable, so the next round's draft can be written while the
cloud verifies this one.

A draft column j is chosen from the device's scores after the first j draft tokens (each method's device-only
stand-in, `FusionRule.draft`, or the device with the context), with every guard judging the token as if it were
written after the row's recorded tokens and everything drafted before it in this draft (`prefix` + columns < j).
A row stops drafting at a refusal, at EOS or at its budget; rows that stopped are stepped on a filler (their last
real token) while the others go on: those positions are rewound, never kept, and send nothing new.

Drafting ahead (`Speculation.ahead`). While a verify is on the wire the device would wait. If the cloud accepts
the whole draft and its choice at the bonus position equals the device's own guess for it, the next round starts
from that guess; so during the verify the device guesses the bonus token (the draft policy's choice after the
last draft token), steps it and drafts after it until the verify returns. On any other outcome what it stepped
ahead is rewound. Exactness is untouched: a draft decides how many positions one verify covers, never which token
is recorded; and a token drafted ahead passes the guards with its whole unsent history in front of it (the draft
in flight and the guessed bonus token), exactly as it would in the next round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cloud_step import CloudStep
from .streams.device import DeviceScores


def rows_of(dev: DeviceScores, pos: torch.Tensor) -> DeviceScores:
    """The device scores of the rows at positions `pos`."""
    def pick(t):
        return None if t is None else t[pos.to(t.device)]
    return DeviceScores(pick(dev.plain), pick(dev.ctx))


class Drafting:
    """One draft in progress. `run()` alternates `choose` (no model call) and `advance` (one device step) until
    no row drafts further, or until `stop()` says to pause before a device step; `run()` again resumes."""

    def __init__(self, rnd, dev0: DeviceScores, budget: torch.Tensor, last_real: torch.Tensor,
                 prefix: list[list[int]] | None = None):
        self.rnd = rnd
        n = budget.numel()
        self.k = int(budget.max()) if n else 0
        self.budget = budget
        self.drafts = torch.zeros(n, self.k, dtype=torch.long)
        self.lengths = torch.zeros(n, dtype=torch.long)
        self.active = budget > 0
        self.dev_seq: list[DeviceScores] = [dev0]  # dev_seq[j]: the device after columns < j
        self.q_seq: list[torch.Tensor | None] = []  # per column: the draft distributions (sampling)
        self.last_real = last_real  # per row, what a filler repeats
        self.prefix = prefix  # per row, device ids drafted before this draft and not yet recorded
        self.j = 0
        self.chosen = False  # column j chosen, its device step not taken yet
        self.done = self.k == 0
        self.stepped = 0  # device steps taken by this draft (for a rewind when it is dropped)

    def run(self, device, stop=None) -> Drafting:
        while not self.done:
            if not self.chosen:
                self.choose()
            elif stop is not None and stop():
                break
            else:
                self.advance(device)
        return self

    def choose(self) -> None:
        """Draft column j for the rows still drafting; `done` once none drafts further."""
        rnd, j = self.rnd, self.j
        e, plan = rnd.e, rnd.plan
        n = self.lengths.numel()
        pos = self.active.nonzero().flatten()
        view = e._view(CloudStep(None), rows_of(self.dev_seq[j], pos), plan.live[pos])
        fused = plan.fuse(view, e.align.size, draft=True)
        if rnd.spec.draft == "ctx" and view.ctx is not None:
            fused.scores = view.ctx.clone()
        hist = [(self.prefix[p] if self.prefix else []) + e.align.to_device(self.drafts[p, :j]).tolist()
                for p in pos.tolist()]
        choice = plan.choose(fused, rnd.sampling, rnd.gen, e.align.to_device, live=plan.live[pos], drafted=hist)
        q_full = None
        if rnd.sampling.temperature > 0:
            q = rnd.sampling.probs(fused.scores)
            q_full = torch.zeros(n, q.shape[-1], device=q.device)
            q_full[pos.to(q.device)] = q
        self.q_seq.append(q_full)
        tok = choice.tokens.cpu()
        self.put(pos, tok, torch.tensor([i not in choice.blocked for i in range(pos.numel())], dtype=torch.bool))

    def put(self, pos: torch.Tensor, tok: torch.Tensor, ok: torch.Tensor) -> None:
        """Record column j: token `tok[i]` for the row at position `pos[i]` where `ok[i]` (else that row stops)."""
        rnd, j, n = self.rnd, self.j, self.lengths.numel()
        if len(self.q_seq) == j:  # a column chosen outside `choose` (greedy: no draft distribution)
            self.q_seq.append(None)
        self.drafts[pos[ok], j] = tok[ok]
        self.lengths[pos[ok]] += 1
        still = ok & ~rnd.is_eos(tok) & (self.lengths[pos] < self.budget[pos])
        self.active = torch.zeros(n, dtype=torch.bool)
        self.active[pos[still]] = True
        self.chosen = True
        if not bool(self.active.any()) or j == self.k - 1:
            self.done = True
            self.drafts = self.drafts[:, : j + 1]

    def advance(self, device) -> None:
        """Step the device on column j (filled for rows that stopped) so that column j + 1 can be drafted."""
        col = self.drafts[:, self.j].clone()
        short = self.lengths <= self.j
        if bool(short.any()):
            col[short] = self.last_real[short]
        self.dev_seq.append(self.rnd.timed_device(device, self.rnd.e.align.to_device(col)))
        self.j += 1
        self.stepped += 1
        self.chosen = False


@dataclass
class Ahead:
    """The next round's draft, written during a verify: kept when every row's verify accepted its whole draft
    and chose `guess` at the bonus position; otherwise its `drafting.stepped` device steps are rewound."""

    guess: torch.Tensor  # per row, the guessed bonus token (fused vocabulary), already stepped by the device
    drafting: Drafting

    def hits(self, z: torch.Tensor, accepted: torch.Tensor, lengths: torch.Tensor, finished: torch.Tensor) -> bool:
        k = lengths.new_full(lengths.shape, int(lengths.max()) if lengths.numel() else 0)
        return bool(torch.equal(accepted, lengths) and torch.equal(lengths, k) and not bool(finished.any())
                    and torch.equal(z.cpu(), self.guess.cpu()))

    def resumed(self) -> Drafting:
        """The drafting as the next round's own: its history is recorded now, so the prefix goes."""
        self.drafting.prefix = None
        return self.drafting

    def behind(self, dev_last: DeviceScores) -> Drafting:
        """The drafting as the next round's own when that round decides the bonus position itself (speculative.py,
        a pending round): the guess becomes draft column 0, scored by the device as `dev_last`, to be verified."""
        d = self.drafting
        d.prefix = None
        d.dev_seq = [dev_last] + d.dev_seq
        d.q_seq = [None] + d.q_seq
        d.drafts = torch.cat([self.guess.view(-1, 1).to(d.drafts.dtype), d.drafts], dim=1)
        d.lengths = d.lengths + 1
        d.budget = d.budget + 1
        d.k += 1
        d.j += 1
        return d


def draft_ahead(rnd, device, last: torch.Tensor, drafts: torch.Tensor, budget: torch.Tensor, stop, then=None):
    """During a verify: the device's scores after the last draft token (passed to `then` at once, e.g. to send
    their certification asks), and (unless `stop()` first, a refusal or EOS) an `Ahead` draft behind the guessed
    bonus token. Returns (scores, Ahead or None)."""
    e = rnd.e
    dev_last = rnd.timed_device(device, last)
    if then is not None:
        then(dev_last)
    if stop():
        return dev_last, None
    prefix = [e.align.to_device(drafts[p]).tolist() for p in range(drafts.shape[0])]
    guess = Drafting(rnd, dev_last, torch.ones_like(budget), torch.zeros_like(budget), prefix=prefix)
    guess.choose()
    zhat = guess.drafts[:, 0]
    if bool((guess.lengths == 0).any()) or bool(rnd.is_eos(zhat).any()) or stop():
        return dev_last, None
    zhat_dev = e.align.to_device(zhat)
    dev0 = rnd.timed_device(device, zhat_dev)
    ahead = Drafting(rnd, dev0, budget, zhat.clone(), prefix=[h + [t] for h, t in zip(prefix, zhat_dev.tolist(),
                                                                                        strict=True)])
    ahead.stepped = 1
    ahead.run(device, stop=stop)
    return dev_last, Ahead(zhat, ahead)


__all__ = ["Ahead", "Drafting", "draft_ahead", "rows_of"]
