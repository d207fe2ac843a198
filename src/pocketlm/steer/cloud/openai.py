"""`OpenAICloud`: any OpenAI-compatible server (vLLM, llama.cpp, ...) as the steering cloud, a `PartialCloud`.

Each live row's step is one `POST /v1/completions` with `max_tokens=1, logprobs=K, echo=false,
temperature=0`: the server answers its top-K log-probs, which become a `TopKLogits` (ids, log-probs, and a
bound no other id exceeds; see `openai_pieces.py` for how token strings are read back soundly). The engine
certifies the fused greedy token from that; to rule out more ids it deepens the row (`more`: the same step
asked with a wider `logprobs`) and asks `exact()` for the few ids left: a wider answer where the server allows
one (llama.cpp), else per id the prompt plus the candidate with `echo=true` (vLLM caps `logprobs`).

Prompts: `ids` sends token ids (vLLM; exact). `text` sends the ids decoded to text (llama.cpp accepts only
text): the server re-tokenizes it, so the cloud may condition on a slightly different id sequence than the
device's; `stats["retokenized"]` counts prompts whose text does not tokenize back to the same ids.
`auto` tries ids first and falls back to text when the server refuses them.

The server cannot prove which tokenizer it uses: pass the device model of the *same* model family (its
tokenizer maps the server's token strings back to ids); `/v1/models` names the served model, logged at start.

Requests for several rows run concurrently on a small thread pool; rows with one id sequence share a
request. Every wait is bounded (`timeout`, `connect_timeout`). Speculative steering verifies a draft in one
round trip (`extend`, `rewind`, certification asks at any verified position: openai_verify.py).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ..downlink.topk import TopKLogits, Truncating
from .in_process import eos_ids
from .openai_http import LogprobsCapped, NotCertifiable, OpenAICloudError, Transport
from .openai_pieces import PieceMap, RowTop, parse_top
from .openai_verify import VERIFY_MODES, Verifying

log = logging.getLogger(__name__)

__all__ = ["NotCertifiable", "OpenAICloud", "OpenAICloudError", "PROMPT_MODES", "VERIFY_MODES", "is_openai"]

PROMPT_MODES = ("auto", "ids", "text")
SCHEME = "openai+"
WIDE = 1024  # the first wider answer `exact` asks for (then the whole vocabulary)
EXCLUDED = math.nan  # what `exact`/`full` give ids they cannot name: the engine leaves them out, uncertified
END_LIKELY = math.log(0.01)  # an ambiguous key this likely that may be an end token is resolved by echo
ALIGN_TOL = 2e-3  # nats: an echoed position must reproduce the step's best log-prob this closely


def is_openai(spec: str) -> bool:
    """A cloud spec naming an OpenAI-compatible server: `openai+http://HOST:PORT` (or `openai+https://`)."""
    return spec.startswith((SCHEME + "http://", SCHEME + "https://"))


class OpenAICloud(Verifying, Truncating):
    """`PartialCloud` over `/v1/completions`. `tokenizer`: the device's (the same model's tokenizer as the
    server's). `logprobs`: K per step (lowered once to the server's cap when it names one). `prompt`:
    auto | ids | text. `api_key`: sent as a bearer token (default: env POCKETLM_OPENAI_KEY). `max_exact`: a row
    needing more echo requests than this in one step is left uncertified (one request per id). `verify`: how a
    speculative draft is scored in one round trip, `parallel` | `echo` (openai_verify.py)."""

    def __init__(self, url: str, tokenizer, *, api_key: str | None = None, logprobs: int = 20,
                 prompt: str = "auto", model: str | None = None, timeout: float = 60.0,
                 connect_timeout: float = 10.0, concurrency: int = 4, max_exact: int = 32,
                 verify: str = "parallel"):
        if prompt not in PROMPT_MODES:
            raise OpenAICloudError(f"unknown prompt mode {prompt!r}; choose from {', '.join(PROMPT_MODES)}")
        if logprobs < 1:
            raise OpenAICloudError(f"logprobs must be >= 1, got {logprobs}")
        self.url = url.removeprefix(SCHEME)
        self.http = Transport(self.url, api_key or os.environ.get("POCKETLM_OPENAI_KEY"),
                              timeout=timeout, connect_timeout=connect_timeout)
        self.tokenizer, self.k, self.prompt_mode, self.max_exact = tokenizer, logprobs, prompt, max_exact
        self.vocab_rows = self.columns = len(tokenizer)
        self.eos_token_ids = eos_ids(None, tokenizer)
        served = [m.get("id") for m in self.http.call("GET", "/v1/models").get("data", []) if isinstance(m, dict)]
        self.model_name = model or (served[0] if served else None)
        log.info("OpenAI-compatible cloud at %s serves %s; using %s (its tokenizer must be the device's)",
                 self.url, served, self.model_name)
        self.pieces = PieceMap(tokenizer, self.vocab_rows)
        self._pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="pocketlm-openai")
        self._wide = True  # False once the server refuses a wider logprobs (vLLM --max-logprobs)
        self._bias_eos = False  # set when the server drops log-probs on an end token (llama-cpp-python)
        self._seqs: list[list[int]] = []
        self._tops: list[RowTop] = []
        self._excluded: list[bool] = []  # per row: this step left some unnamed ids out
        self.stats = dict.fromkeys(("step_requests", "exact_requests", "text_prompts", "retokenized",
                                    "ambiguous_steps", "eos_resolved", "wide_requests",
                                    "excluded_ids", "excluded_steps", "misaligned"), 0)
        self._lock = threading.Lock()
        self.step_seconds = 0.0  # summed round trips of the step requests alone
        self._init_verify(verify)

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    @property
    def sequences(self) -> list[list[int]]:
        """Each live row's ids so far (prompt + chosen tokens), the prefix its next request sends."""
        return [list(s) for s in self._seqs]

    @property
    def bytes_up(self) -> int:
        return self.http.bytes_up

    @property
    def bytes_down(self) -> int:
        return self.http.bytes_down

    @property
    def requests(self) -> int:
        return self.http.requests

    # -- requests -----------------------------------------------------------------------------------
    def _text(self, seq: list[int]) -> str:
        return self.tokenizer.decode(seq, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _prompt(self, seq: list[int]):
        return self._text(seq) if self.prompt_mode == "text" else list(seq)

    @staticmethod
    def _generated(choice: dict, doc: dict) -> int:
        """How many echoed tokens the completion added (0 or 1 with max_tokens=1)."""
        usage = doc.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            return usage["completion_tokens"]
        return 1 if choice.get("finish_reason") == "length" else 0

    def _complete(self, seq: list[int], **extra) -> tuple[dict, dict]:
        """One completion for `seq` (mode, logprobs cap and end-token bias handled): (choices[0], answer)."""
        body = {"prompt": self._prompt(seq), "max_tokens": 1, "temperature": 0, "logprobs": self.k,
                "echo": False, **extra}
        if self.model_name:
            body["model"] = self.model_name
        if self.prompt_mode == "ids" or (self.prompt_mode == "auto" and isinstance(body["prompt"], list)):
            body["return_tokens_as_token_ids"] = True  # vLLM: keys "token_id:N", no string ambiguity
        if self._bias_eos and self.eos_token_ids:
            body["logit_bias"] = {str(e): -100.0 for e in sorted(self.eos_token_ids)}
        try:
            doc = self.http.call("POST", "/v1/completions", body)
        except LogprobsCapped as e:
            if "logprobs" in extra:  # a wider or echo request: the caller decides
                raise
            if e.limit is None or not 1 <= e.limit < body["logprobs"]:
                raise OpenAICloudError(f"{e} (lower --cloud-logprobs)") from None
            log.warning("%s caps logprobs at %d (asked %d); using %d", self.url, e.limit, self.k, e.limit)
            self.k = e.limit
            return self._complete(seq, **extra)
        except OpenAICloudError as e:
            refused = any(f"HTTP {c}" in str(e) for c in (400, 422)) or "answered HTTP" in str(e) and "prompt" in str(e)
            if self.prompt_mode != "auto" or not refused:  # llama-cpp-python: HTTP 500, 'prompt' 'valid string'
                raise
            log.info("%s refused a token-id prompt (%.160s); sending text prompts from now on", self.url, e)
            self.prompt_mode = "text"
            return self._complete(seq, **extra)
        if self.prompt_mode == "auto":
            self.prompt_mode = "ids"
        choices = doc.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise OpenAICloudError(f"{self.url} answered without choices: {str(doc)[:120]}")
        return choices[0], doc

    def _top(self, seq: list[int]) -> RowTop:
        """The step's top-K for one id sequence (one request, plus one per end token to resolve "" keys)."""
        t0 = time.perf_counter()
        choice, _ = self._complete(seq)
        self._count("step_requests")
        with self._lock:
            self.step_seconds += time.perf_counter() - t0
        if self.prompt_mode == "text":
            self._count("text_prompts")
            if self.tokenizer(self._text(seq), add_special_tokens=False)["input_ids"] != list(seq):
                self._count("retokenized")
        tops = self._tops_of(choice)
        if tops is None:
            if choice.get("finish_reason") == "stop" and not self._bias_eos and self.eos_token_ids:
                # llama-cpp-python returns no log-probs when its greedy token ends the text; a logit bias
                # steers its *sampler* off the end tokens while its log-probs stay the raw ones
                log.info("%s returns no log-probs on an end token; biasing its sampler off end tokens", self.url)
                self._bias_eos = True
                return self._top(seq)
            raise OpenAICloudError(f"{self.url} answered without top_logprobs (llama.cpp needs --logits_all true; "
                                   f"vLLM --max-logprobs >= {self.k})")
        return self._settled(seq, self._parse(tops, self.k))

    def _settled(self, seq: list[int], row: RowTop) -> RowTop:
        if row.bound > row.floor:
            self._count("ambiguous_steps")
            self._resolve_eos(seq, row)
        return row

    @staticmethod
    def _tops_of(choice: dict) -> dict | None:
        tops = (choice.get("logprobs") or {}).get("top_logprobs")
        return tops[0] if tops and isinstance(tops[0], dict) and tops[0] else None

    def _parse(self, top: dict, asked: int) -> RowTop:
        try:
            return parse_top(top, asked, self.pieces)
        except (ValueError, TypeError, AttributeError) as e:
            raise OpenAICloudError(f"{self.url} answered malformed top_logprobs: {e}") from None

    def _resolve_eos(self, seq: list[int], row: RowTop) -> None:
        """An ambiguous key that may be a likely end token (llama.cpp renders every special token "") would
        keep the bound high exactly when the text ends: ask the end tokens' exact log-probs. A key whose value is an
        end token's is then accounted for; an end token hidden by a collision leaves less mass for the rest."""
        shown = [*row.known.values(), *(v for v, _ in row.ambiguous)]
        hidden = math.log(row.rest) if row.collided and row.rest > 0 else -math.inf  # a collapsed key may hide it
        likely = [ids or set() for v, ids in row.ambiguous if max(v, hidden) >= END_LIKELY]
        for e in sorted(set().union(*likely) & self.eos_token_ids):
            try:
                value = self._echo(seq, row, e)
            except NotCertifiable as err:
                log.debug("end token %d not resolved: %s", e, err)
                continue
            self._count("eos_resolved")
            row.known[e] = value
            match = [(v, ids) for v, ids in row.ambiguous if e in (ids or ()) and abs(v - value) <= ALIGN_TOL]
            if match:
                row.ambiguous.remove(match[0])
            elif all(abs(v - value) > ALIGN_TOL for v in shown):
                row.rest -= math.exp(value)
        row.rebound()

    def _echo(self, seq: list[int], row: RowTop, cand: int) -> float:
        """The exact log-prob of `cand` after `seq`, from an echo request on `seq + [cand]`, checked: the
        echoed position's best log-prob must equal the step's (else the server's echo does not line up)."""
        if self.prompt_mode == "text":
            prefix = self._text(seq)
            base = self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
            full = self.tokenizer(prefix + self.pieces.piece[cand], add_special_tokens=False)["input_ids"]
            if full != base + [cand]:
                raise NotCertifiable(f"id {cand} ({self.pieces.piece[cand]!r}) does not survive re-tokenization "
                                     "after this prefix (text prompts)")
        choice, doc = self._complete(list(seq) + [cand], echo=True, logprobs=1)
        self._count("exact_requests")
        lp = choice.get("logprobs") or {}
        tokens, values, tops = lp.get("tokens"), lp.get("token_logprobs"), lp.get("top_logprobs")
        if not (isinstance(tokens, list) and isinstance(values, list) and isinstance(tops, list)):
            raise OpenAICloudError(f"{self.url} answered an echo request without token log-probs")
        j = len(tokens) - self._generated(choice, doc) - 1  # the prompt's last token: the candidate
        if j < 1 or values[j] is None or not isinstance(tops[j], dict) or not tops[j]:
            raise NotCertifiable(f"{self.url} echoed no log-prob for the candidate position")
        if cand not in (self.pieces.ids(str(tokens[j])) or {cand}):
            raise NotCertifiable(f"{self.url} echoed {tokens[j]!r} where id {cand} was sent")
        if not self._lines_up(tops[j], row):
            self._count("misaligned")
            raise NotCertifiable(f"{self.url}'s echoed log-probs do not line up with its step log-probs")
        return float(values[j])

    def _lines_up(self, echoed: dict, row: RowTop) -> bool:
        """Is `echoed` (an echo answer's top log-probs at the candidate's position) the step's distribution?
        Each echoed id the step showed must have its value, any other must stay under the step's bound, and
        the echoed best must be at least the step's best (a server whose echo is shifted by a position fails)."""
        top = max(row.known.values(), default=-math.inf)
        for key, v in echoed.items():
            ids = self.pieces.ids(str(key))
            if ids is not None and len(ids) == 1 and next(iter(ids)) in row.known:
                if abs(float(v) - row.known[next(iter(ids))]) > ALIGN_TOL:
                    return False
            elif float(v) > max(row.bound, top) + ALIGN_TOL:
                return False
        return max(float(v) for v in echoed.values()) >= top - ALIGN_TOL

    # -- PartialCloud -------------------------------------------------------------------------------
    def _run(self, seqs: list[list[int]]) -> TopKLogits:
        """One request per distinct sequence (concurrently), rows of a sequence share the answer."""
        distinct = {tuple(s): None for s in seqs}
        answers = dict(zip(distinct, self._pool.map(self._top, [list(s) for s in distinct]), strict=True))
        self._tops = [answers[tuple(s)] for s in seqs]
        self._excluded = [False] * len(seqs)
        return self._topk(self._tops)

    def _topk(self, rows: list[RowTop]) -> TopKLogits:
        width = max(1, max(len(r.known) for r in rows))
        ids = torch.empty(len(rows), width, dtype=torch.long)
        scores = torch.empty(len(rows), width, dtype=torch.float32)
        for i, r in enumerate(rows):
            pairs = sorted(r.known.items(), key=lambda kv: -kv[1])
            pad = [(self.vocab_rows + j, r.bound) for j in range(width - len(pairs))]  # past `columns`: dropped
            ids[i] = torch.tensor([p[0] for p in pairs + pad], dtype=torch.long)
            scores[i] = torch.tensor([p[1] for p in pairs + pad], dtype=torch.float32)
        bound = torch.tensor([r.bound for r in rows], dtype=torch.float32)
        return TopKLogits(ids, scores, bound, torch.zeros(len(rows)))

    def cache_modes(self) -> tuple[str, ...]:
        """The server keeps its own caches: one mode, nothing for the device to choose."""
        return ("server",)

    def set_cache_mode(self, mode: str) -> None:
        if mode not in ("auto", "server"):
            raise OpenAICloudError(f"an OpenAI-compatible server decodes with its own cache; kv={mode!r} "
                                   "applies to the device only")

    def reserve(self, new_tokens: int) -> None:
        """Nothing to size: each step is a stateless request."""

    def prefill(self, prompts: list[list[int]], expand: list[int] | None = None) -> TopKLogits:
        expand = list(range(len(prompts))) if expand is None else expand
        self._forget_verify()
        self._seqs = [list(map(int, prompts[e])) for e in expand]
        return self._run(self._seqs)

    def step(self, token_ids: torch.Tensor) -> TopKLogits:
        ids = token_ids.view(-1).tolist()
        if len(ids) != len(self._seqs):
            raise OpenAICloudError(f"{len(ids)} token ids for {len(self._seqs)} live rows")
        self.stats["excluded_steps"] += sum(self._excluded)
        self._forget_verify()
        for seq, t in zip(self._seqs, ids, strict=True):
            seq.append(int(t))
        return self._run(self._seqs)

    def keep(self, rows: torch.Tensor) -> None:
        idx = rows.view(-1).tolist()
        self._seqs = [self._seqs[i] for i in idx]
        self._tops = [self._tops[i] for i in idx]
        self.stats["excluded_steps"] += sum(self._excluded[i] for i in range(len(self._excluded)) if i not in idx)
        self._excluded = [self._excluded[i] for i in idx]
        self._keep_verified(idx)

    def release(self) -> None:
        self.stats["excluded_steps"] += sum(self._excluded)
        self._seqs, self._tops, self._excluded = [], [], []
        self._forget_verify()

    def _widened(self, r: int, missing: list[int], widths: tuple[int, ...] | None = None,
                 position: int | None = None):
        """Log-probs of `missing` ids for live row `r` from the same step asked wider (top 1024, then the whole
        vocabulary): on llama.cpp a wider answer costs about what the step did, while an echo request scores
        every prompt position. Returns (found, the whole-vocabulary answer's `RowTop` if one was asked);
        ambiguous ids stay missing; a server that caps logprobs is not asked again."""
        found: dict[int, float] = {}
        whole = None
        seq, row = self._state(r, position)
        for width in widths or (max(WIDE, 4 * self.k), self.vocab_rows):
            width = min(width, self.vocab_rows)
            if not self._wide or width <= self.k or len(found) == len(missing):
                break
            try:
                choice, _ = self._complete(seq, logprobs=width)
            except LogprobsCapped as e:
                log.info("%s caps logprobs (%s): exact log-probs come from echo requests", self.url, e)
                self._wide = False
                break
            self._count("wide_requests")
            top = self._tops_of(choice)
            if top is None or not self._lines_up(top, row):
                self._count("misaligned")
                break
            wide = self._parse(top, width)
            found.update({c: wide.known[c] for c in missing if c in wide.known})
            whole = wide if width == self.vocab_rows else None
        return found, whole

    def _unnamed(self, r: int, c: int, whole: RowTop, position: int | None = None) -> float:
        """Id `c` has no exact value even in the whole-vocabulary answer (its string names several ids): by echo
        when it is a likely end token, else it is left out (`EXCLUDED`), counted: the choice is then the best
        among the ids the server names exactly, not certified over these few (specials, partial UTF-8 bytes,
        whose only sound upper bound is the leftover mass; a device delta on such tokens would let that win)."""
        if c in self.eos_token_ids and whole.bound >= END_LIKELY:
            try:
                return self._echo(*self._state(r, position), c)
            except NotCertifiable as e:
                log.debug("end token %d not resolved: %s", c, e)
        self._excluded[r] = True
        self._count("excluded_ids")
        return EXCLUDED

    def more(self, rows: list[int], depth: int, position: int | None = None) -> TopKLogits:
        """The `depth` best ids of these live rows and a new bound, from the same step (or verified `position`)
        asked with `logprobs=depth` (concurrently); `NotCertifiable` where the server caps logprobs below it."""
        if not self._wide:
            raise NotCertifiable(f"{self.url} caps logprobs; it cannot rank deeper than {self.k}")

        def deeper(r: int) -> RowTop:
            width = min(depth, self.vocab_rows)
            seq, before = self._state(r, position)
            try:
                choice, _ = self._complete(seq, logprobs=width)
            except LogprobsCapped as e:
                self._wide = False
                raise NotCertifiable(f"{self.url} caps logprobs ({e})") from None
            self._count("wide_requests")
            top = self._tops_of(choice)
            if top is None or not self._lines_up(top, before):
                self._count("misaligned")
                raise NotCertifiable(f"{self.url}'s deeper answer does not line up with its step answer")
            row = self._settled(seq, self._parse(top, width))
            row.known = {**before.known, **row.known}
            self._put(r, position, row)
            return row

        return self._topk(list(self._pool.map(deeper, rows)))

    def exact(self, rows: list[int], ids: list[list[int]], position: int | None = None) -> list[torch.Tensor]:
        """Log-probs of `ids[i]` for live row `rows[i]` at the current step (or verified `position`): known ones
        from the step's answer,
        the others from a wider answer (`_widened`); ids ambiguous even there are `_unnamed`; with a
        server that caps logprobs, echo requests (concurrently, at most `max_exact` per row, else
        `NotCertifiable`)."""
        tops = {r: self._state(r, position)[1] for r in rows}
        need = {r: [c for c in cs if c not in tops[r].known] for r, cs in zip(rows, ids, strict=True)}
        asked = [r for r, cs in need.items() if cs]
        wide = dict(zip(asked, self._pool.map(lambda r: self._widened(r, need[r], position=position), asked),
                        strict=True))
        got = {r: wide[r][0] for r in asked}
        jobs = []
        for r in asked:
            for c in [c for c in need[r] if c not in got[r]]:
                if wide[r][1] is not None:
                    got[r][c] = self._unnamed(r, c, wide[r][1], position)
                else:
                    jobs.append((r, c))
        if len(jobs) > self.max_exact * len(rows):
            raise NotCertifiable(f"{len(jobs)} ids to ask for {len(rows)} row(s), more than max_exact={self.max_exact} "
                                 "echo requests per row")
        echoed = self._pool.map(lambda rc: self._echo(*self._state(rc[0], position), rc[1]), jobs)
        for (r, c), v in zip(jobs, echoed, strict=True):
            got[r][c] = v
        return [torch.tensor([tops[r].known.get(c, got.get(r, {}).get(c, math.nan)) for c in cs],
                             dtype=torch.float32) for r, cs in zip(rows, ids, strict=True)]

    def full(self, rows: list[int], position: int | None = None) -> torch.Tensor:
        """Whole rows from whole-vocabulary answers, where the server allows `logprobs` that wide (llama.cpp;
        unnamed ids as in `exact`); else `NotCertifiable` (vLLM's --max-logprobs caps it)."""
        out = torch.empty(len(rows), self.columns)
        for i, r in enumerate(rows):
            found, whole = self._widened(r, list(range(self.columns)), (self.vocab_rows,), position)
            if whole is None:
                raise NotCertifiable(f"{self.url} returns only its top-{self.k} log-probs: exact sampling needs the "
                                     "full distribution; decode greedily (certified) or sample in the truncated mode")
            known = {**self._state(r, position)[1].known, **found}
            out[i] = torch.tensor([known[c] if c in known else self._unnamed(r, c, whole, position)
                                   for c in range(self.columns)])
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._close_verify()
        self.http.close()

    def __enter__(self) -> OpenAICloud:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
