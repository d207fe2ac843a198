"""A CoMiGS training run as personal steering reads it: its config, its users' adapter folders, how a user's
output is recognised, and one steering engine per user around a base model loaded once (eval-personal and the
demo's last part)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..data import load_corpus
from ..data.splits import split_corpus
from ..errors import PocketLMError
from ..models import load_model
from ..moe.personal import load_personal
from ..steer import SteerEngine
from ..steer.cloud.in_process import HFCloudBackend
from .personal_eval import UserTarget, language_target
from .personal_metrics import LANGUAGE_NAMES, UnigramUsers, language_of

DEFAULT_PROMPTS = ("Write two sentences about how to spend a free Sunday.",
                   "Give me one piece of advice for a difficult day.",
                   "Describe a good meal in two sentences.")


def run_config(run: Path) -> dict:
    """The training config a run recorded in its history.json."""
    path = run / "history.json"
    if not path.is_file():
        raise PocketLMError(f"{run} is not a training run (no history.json)")
    try:
        return json.loads(path.read_text())["config"]
    except (json.JSONDecodeError, KeyError) as e:
        raise PocketLMError(f"{path} is not a pocketlm history file ({e})") from None


def run_users(run: Path) -> list[str]:
    """The users with an adapter folder (users/<user>/), sorted."""
    users_dir = run / "users"
    users = sorted(p.name for p in users_dir.iterdir() if p.is_dir()) if users_dir.is_dir() else []
    if not users:
        raise PocketLMError(f"{run} has no users/<user>/ adapter folders (a 'pretrained' run has none: its "
                            "weights signal is zero by construction)")
    return users


def read_prompts(path: Path | None) -> list[str]:
    """One neutral prompt per line of `path`; the built-in three without one."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    texts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not texts:
        raise PocketLMError(f"{path} has no prompts")
    return texts


def user_targets(cfg: dict, users: list[str]):
    """(targets, match(text, user), match kind). Language users (fortunes) are matched by a stop-word language
    identifier; any other users (AG News topics) by the nearest per-user unigram model of their training splits."""
    if all(u in LANGUAGE_NAMES for u in users):
        targets = [language_target(u, LANGUAGE_NAMES[u]) for u in users]
        return targets, (lambda text, user: language_of(text) == user), "language"
    splits = split_corpus(load_corpus(cfg["corpus"], fmt=cfg.get("corpus_format")), seed=cfg.get("seed", 0),
                          max_chars=cfg.get("max_chars"))
    unigrams = UnigramUsers({u: "\n".join(splits[u].train) for u in users if u in splits})
    targets = [UserTarget(u, f"I care most about {u} news and write about {u}.", f"Write it as a {u} news item.")
               for u in users]
    return targets, (lambda text, user: unigrams.nearest(text) == user), "nearest_unigram_user"


@dataclass
class PersonalEngines:
    """`engines(user)`: a steering engine whose device is that user's personal model. The base model is loaded
    once and shared by every user (and by the cloud when the cloud is the same model)."""

    base: object
    tok: object
    cloud_model: object
    cloud_tok: object
    users_dir: Path
    decoding: dict

    @classmethod
    def load(cls, model: str, users_dir: Path, cloud: str | None = None, *, device: str | None = None,
             dtype: str | None = None, **decoding) -> PersonalEngines:
        """`decoding`: SteerEngine settings (vocab, kv, overlap)."""
        base, tok = load_model(model, device=device, dtype=dtype)
        cloud_model, cloud_tok = (base, tok) if cloud in (None, model) else load_model(cloud, device=device,
                                                                                       dtype=dtype)
        return cls(base, tok, cloud_model, cloud_tok, users_dir, decoding)

    def __post_init__(self):
        self.backend = HFCloudBackend(self.cloud_model, self.cloud_tok)

    def __call__(self, user: str) -> SteerEngine:
        personal = load_personal(self.base, self.users_dir / user)
        return SteerEngine(self.backend, self.cloud_tok, personal, self.tok, **self.decoding)
