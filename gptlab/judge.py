"""LLM-as-judge (book chapter 7.8): a larger model scores each response 0-100 against the reference;
pairwise mode (chapter 8.7, evaluating aligned models): it picks the better of two models' responses
to the same instruction, asked in both orders to cancel position bias.

Two backends, standard library only (``urllib``):

* ``ollama``: ``POST {url}/api/chat`` with ``{"model", "messages", "stream": false, "options":
  {"temperature": 0, "seed", "num_ctx"}}``; the answer is ``message.content``.
* ``openai``: any OpenAI-compatible server (vLLM, llama.cpp ``llama-server``, LM Studio, ...):
  ``POST {url}/v1/chat/completions`` with ``{"model", "messages", "temperature": 0, "seed"}``; the
  answer is ``choices[0].message.content``.

Requests are retried with exponential backoff on 5xx/429, timeouts and connection errors; answers
are cached on disk (JSON lines keyed by sha256 of backend, model and messages), so a re-run costs no
request. An answer without a score in 0..100 is asked again once more explicitly, then recorded as
``None`` together with the raw text.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from gptlab.checks import ConfigRules, Predicate, choice, integer, number, require, text
from gptlab.data.prompt_styles import format_input
from gptlab.errors import InvalidInput

# The book's judge prompt; ``{input}`` is the Alpaca-formatted instruction (+ input).
BOOK_TEMPLATE = ("Given the input `{input}` and correct output `{output}`, score the model response "
                 "`{response}` on a scale from 0 to 100, where 100 is the best score. "
                 "Respond with the integer number only.")
FOLLOW_UP = "Answer with a single integer from 0 to 100 and nothing else."
# Pairwise comparison; ``{input}`` is the Alpaca-formatted instruction (+ input).
PAIRWISE_TEMPLATE = ("Given the input `{input}`, which of these two responses is better: more helpful, correct "
                     "and polite? Response 1: `{response_1}` Response 2: `{response_2}` "
                     "Answer with 1, 2 or tie only.")
PAIRWISE_FOLLOW_UP = "Answer with 1, 2 or tie and nothing else."
OUTCOMES = ("win", "tie", "loss")
DEFAULT_URLS = {"ollama": "http://localhost:11434", "openai": "http://localhost:8000"}
BACKENDS = tuple(DEFAULT_URLS)


class JudgeError(RuntimeError):
    """The judge server failed in a way retrying does not fix (unreachable, model missing, ...)."""


class JudgeModelNotFound(JudgeError):
    """The server does not have the requested judge model."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: urllib would send the ``Authorization`` header (the API key) to
    whatever host the server names, and a redirected POST becomes a GET without the request anyway.
    The 3xx answer surfaces as an ``HTTPError`` that :meth:`Judge._post` reports."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 - urllib's hook
        return None


# ----------------------------------------------------------------------------- parsing
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")


def parse_score(text: str | None) -> int | None:
    """The first number in ``text`` that lies in 0..100, rounded to an int; None when there is none.

    ``"85"`` -> 85, ``"Score: 85/100"`` -> 85, ``"I would give it 92.5."`` -> 92 (round half to
    even), ``"150"`` -> None, ``"-3"`` -> None, ``"great"`` -> None.
    """
    if not text:
        return None
    for match in _NUMBER.finditer(text):
        value = float(match.group())
        if 0 <= value <= 100:
            return int(round(value))
    return None


_PREFERENCE = re.compile(r"(?<!\w)(?<!\d\.)(1|2|tie|equal(?:ly)?)(?!\w)(?!\.\d)", re.IGNORECASE)


def parse_preference(text: str | None) -> str | None:
    """``"1"``, ``"2"`` or ``"tie"``: the first such answer in ``text``; None when there is none.

    ``"2"`` -> 2, ``"Response 1 is better."`` -> 1, ``"Tie."`` -> tie, ``"Both are equally good"`` -> tie,
    ``"10"`` -> None, ``"neither"`` -> None.
    """
    match = _PREFERENCE.search(text or "")
    if match is None:
        return None
    word = match.group(1).lower()
    return word if word in ("1", "2") else "tie"


def pairwise_prompt(entry: Mapping[str, Any], response_1: str, response_2: str,
                    template: str = PAIRWISE_TEMPLATE) -> str:
    """The comparison prompt for one instruction and two responses (shown as 1 and 2)."""
    return template.format(input=format_input(entry, "alpaca"), output=entry.get("output", ""),
                           response_1=response_1, response_2=response_2)


def judge_prompt(entry: Mapping[str, Any], template: str = BOOK_TEMPLATE, response_key: str = "model_response") -> str:
    """The scoring prompt for one entry (``instruction``, ``input``, ``output`` and the response)."""
    return template.format(input=format_input(entry, "alpaca"), output=entry["output"],
                           response=entry[response_key])


# ----------------------------------------------------------------------------- cache
class AnswerCache:
    """Judge answers on disk, one JSON object per line: ``{"key", "backend", "model", "answer"}``.

    ``key`` is the sha256 of the backend, the judge model and the messages, so a different judge or
    prompt never reuses an answer. ``path=None`` keeps the cache in memory only.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.answers: dict[str, str] = {}
        if self.path and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.answers[row["key"]] = row["answer"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by an interrupted run

    @staticmethod
    def key(backend: str, model: str, messages: Sequence[Mapping[str, str]]) -> str:
        blob = json.dumps([backend, model, list(messages)], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get(self, key: str) -> str | None:
        return self.answers.get(key)

    def put(self, key: str, backend: str, model: str, answer: str) -> None:
        self.answers[key] = answer
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "backend": backend, "model": model, "answer": answer},
                                   ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- client
@dataclass
class Score:
    """One judged entry: ``score`` (0..100, or None when no score could be read) and the raw answer."""

    score: int | None
    raw: str
    cached: bool


@dataclass
class PairwiseVerdict:
    """One instruction judged twice: ``first`` is the judge's pick ("1", "2", "tie" or None) with
    the baseline shown as response 1, ``second`` with the candidate shown as response 1.
    ``outcome`` is the candidate's result: each order gives +1 (candidate picked), -1 (baseline
    picked) or 0 (tie); a positive sum is a ``win``, a negative one a ``loss``, 0 a ``tie``
    (so two opposite picks, i.e. pure position bias, count as a tie); None when an order has no pick.
    """

    outcome: str | None
    first: str | None
    second: str | None
    raw: list[str]
    cached: bool

    @property
    def consistent(self) -> bool:
        """Both orders named the same response (or both said tie)."""
        return self.first is not None and self.second is not None and \
            _candidate_points(self.first, 1) == _candidate_points(self.second, 2)


def _candidate_points(pick: str, candidate_position: int) -> int:
    """+1 when ``pick`` names the candidate's position, -1 for the other position, 0 for a tie."""
    return 0 if pick == "tie" else (1 if pick == str(candidate_position) else -1)


def _url_ok(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.startswith(("http://", "https://")) and len(v) > 8)


class Judge(ConfigRules):
    """Scores responses with a model served by Ollama or an OpenAI-compatible server.

    Args:
        model: the judge model's name on the server (``llama3``, ``llama3.1:70b``, ...).
        url: server base URL; None = ``http://localhost:11434`` (ollama) / ``http://localhost:8000``
            (openai).
        backend: ``ollama`` or ``openai``.
        timeout: seconds per request.
        retries: extra attempts after a 5xx/429, a timeout or a connection error.
        backoff: seconds before the first retry, doubled for each further one.
        seed, temperature, num_ctx: sampling settings sent to the server (``num_ctx``: Ollama only).
        cache: JSON-lines file of earlier answers (None = no disk cache).
        template: the scoring prompt with ``{input}``, ``{output}`` and ``{response}`` fields.
        pairwise_template: the comparison prompt with ``{input}``, ``{response_1}``, ``{response_2}``
            (and optionally ``{output}``, the reference answer) fields.
        parse_retries: how often to ask again when an answer holds no score (or no pick).
        api_key: sent as ``Authorization: Bearer ...`` (OpenAI-compatible servers that need one).
    """

    RULES = {"backend": choice(*BACKENDS, name="judge backend"), "model": text(),
             "url": Predicate(_url_ok, "an http:// or https:// URL or null"), "timeout": number(gt=0),
             "retries": integer(ge=0), "backoff": number(ge=0), "seed": integer(), "temperature": number(ge=0),
             "num_ctx": integer(ge=1), "parse_retries": integer(ge=0), "api_key": text(optional=True),
             "cache": Predicate(lambda v: v is None or v is False or (isinstance(v, str) and bool(v)),
                                "a file path, null (beside the responses) or false (off)")}
    """The rule of every setting (the ``judge`` node of ``gptlab-judge``)."""

    def __init__(self, model: str = "llama3", url: str | None = None, backend: str = "ollama",
                 timeout: float = 120.0, retries: int = 3, backoff: float = 1.0, seed: int = 123,
                 temperature: float = 0.0, num_ctx: int = 2048, cache: str | Path | None = None,
                 template: str = BOOK_TEMPLATE, parse_retries: int = 1, api_key: str | None = None,
                 pairwise_template: str = PAIRWISE_TEMPLATE):
        require("backend", backend, self.RULES["backend"])
        self.model, self.backend = model, backend
        self.url = (url or DEFAULT_URLS[backend]).rstrip("/")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.seed, self.temperature, self.num_ctx = seed, temperature, num_ctx
        self.template, self.parse_retries, self.api_key = template, parse_retries, api_key
        self.pairwise_template = pairwise_template
        self.cache = AnswerCache(cache)
        self.requests_sent = 0
        self._opener = urllib.request.build_opener(_NoRedirects)

    # ------------------------------------------------------------- HTTP
    @property
    def endpoint(self) -> str:
        if self.backend == "ollama":
            return f"{self.url}/api/chat"
        base = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url
        return f"{base}/v1/chat/completions"

    def request_body(self, messages: Sequence[Mapping[str, str]]) -> dict[str, Any]:
        if self.backend == "ollama":
            return {"model": self.model, "messages": list(messages), "stream": False,
                    "options": {"temperature": self.temperature, "seed": self.seed, "num_ctx": self.num_ctx}}
        return {"model": self.model, "messages": list(messages), "temperature": self.temperature, "seed": self.seed}

    def _server_name(self) -> str:
        return "Ollama" if self.backend == "ollama" else "the OpenAI-compatible server"

    def _unreachable(self, why: str) -> JudgeError:
        if self.backend == "ollama":
            hint = f"start it with `ollama serve` and `ollama pull {self.model}`"
        else:
            hint = f"start one serving {self.model!r}, e.g. `vllm serve {self.model}` or llama.cpp's `llama-server`"
        return JudgeError(f"cannot reach {self._server_name()} at {self.url} ({why}); {hint}")

    def _http_error(self, err: urllib.error.HTTPError) -> JudgeError:
        try:
            body = err.read().decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - the body is only for the message
            body = ""
        detail = body
        try:
            parsed = json.loads(body)
            e = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
            detail = e.get("message", str(e)) if isinstance(e, dict) else str(e)
        except (json.JSONDecodeError, AttributeError):
            pass
        if err.code == 404 and ("model" in detail.lower() or self.backend == "ollama"):
            hint = (f"pull it with `ollama pull {self.model}`" if self.backend == "ollama"
                    else "check the name the server was started with (GET /v1/models lists them)")
            return JudgeModelNotFound(f"judge model {self.model!r} is not available on {self._server_name()} at "
                                      f"{self.url} ({detail.strip() or 'HTTP 404'}); {hint}")
        return JudgeError(f"{self._server_name()} at {self.endpoint} answered HTTP {err.code}: {detail.strip()[:500]}")

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` as JSON, retrying transient failures; the decoded JSON answer."""
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: str = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            self.requests_sent += 1
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    payload = resp.read()
            except urllib.error.HTTPError as e:
                if 300 <= e.code < 400:
                    raise JudgeError(
                        f"{self._server_name()} at {self.endpoint} redirected to {e.headers.get('Location')!r} "
                        f"(HTTP {e.code}); gptlab does not follow redirects, so the request and judge.api_key go "
                        f"only to judge.url: set judge.url to the address that answers") from None
                if e.code >= 500 or e.code == 429:
                    last = f"HTTP {e.code}"
                    continue
                raise self._http_error(e) from None
            except urllib.error.URLError as e:
                if isinstance(e.reason, (TimeoutError, socket.timeout)):
                    last = f"timed out after {self.timeout:g} s"
                else:
                    last = f"connection error: {e.reason}"
                continue
            except (TimeoutError, socket.timeout):
                last = f"timed out after {self.timeout:g} s"
                continue
            except (ConnectionError, OSError, http.client.HTTPException) as e:  # reset / cut mid-answer
                last = f"connection error: {e}"
                continue
            try:
                raw = payload.decode("utf-8")
            except UnicodeDecodeError as e:
                raise JudgeError(f"{self._server_name()} at {self.endpoint} sent an answer that is not UTF-8 "
                                 f"({e.reason} at byte {e.start}): {payload[:80]!r}") from None
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                raise JudgeError(f"{self._server_name()} at {self.endpoint} sent no JSON: {raw[:200]!r}") from None
        tries = f"{self.retries + 1} attempt{'s' if self.retries else ''}"
        if last.startswith("connection error"):
            raise self._unreachable(f"{last}; {tries}")
        if last.startswith("timed out"):
            raise JudgeError(f"{self._server_name()} at {self.endpoint} {last} ({tries}); a large judge model may "
                             f"need longer to load: raise judge.timeout")
        raise JudgeError(f"{self._server_name()} at {self.endpoint} kept failing ({last}; {tries})")

    def _content(self, answer: dict[str, Any]) -> str:
        try:
            if self.backend == "ollama":
                return str(answer["message"]["content"])
            return str(answer["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"unexpected answer from {self._server_name()} at {self.endpoint}: "
                             f"{json.dumps(answer)[:300]}") from None

    # ------------------------------------------------------------- public API
    def chat(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, bool]:
        """The judge's reply to ``messages`` and whether it came from the cache."""
        key = self.cache.key(self.backend, self.model, messages)
        cached = self.cache.get(key)
        if cached is not None:
            return cached, True
        text = self._content(self._post(self.request_body(messages)))
        self.cache.put(key, self.backend, self.model, text)
        return text, False

    def ask(self, prompt: str) -> str:
        """The judge's reply to one user message."""
        return self.chat([{"role": "user", "content": prompt}])[0]

    def score(self, entry: Mapping[str, Any], response_key: str = "model_response") -> Score:
        """Score ``entry[response_key]`` against ``entry["output"]``."""
        value, raws, cached = self._ask_until_parsed(judge_prompt(entry, self.template, response_key), parse_score,
                                                     FOLLOW_UP)
        return Score(value, "\n---\n".join(raws) if value is None else raws[-1], cached)

    def score_all(self, entries: Iterable[Mapping[str, Any]], response_key: str = "model_response",
                  progress: bool = True) -> list[Score]:
        """:meth:`score` for every entry, with a tqdm progress bar."""
        entries = list(entries)
        if progress:
            from tqdm import tqdm

            entries = tqdm(entries, desc=f"judging with {self.model}", unit="entry")
        return [self.score(e, response_key) for e in entries]

    def _ask_until_parsed(self, prompt: str, parse: Any, follow_up: str) -> tuple[Any, list[str], bool]:
        """(parsed value or None, raw answers, all cached): asks again up to ``parse_retries`` times,
        showing the judge its own answer (a deterministic server would repeat it otherwise)."""
        messages = [{"role": "user", "content": prompt}]
        text, cached = self.chat(messages)
        raws, value = [text], parse(text)
        for _ in range(self.parse_retries):
            if value is not None:
                break
            messages = [*messages, {"role": "assistant", "content": text}, {"role": "user", "content": follow_up}]
            text, hit = self.chat(messages)
            cached = cached and hit
            raws.append(text)
            value = parse(text)
        return value, raws, cached

    def compare(self, entry: Mapping[str, Any], baseline: str, candidate: str) -> PairwiseVerdict:
        """Judge ``candidate`` against ``baseline`` as answers to ``entry``'s instruction, in both
        orders (see :class:`PairwiseVerdict`)."""
        first, raw_1, cached_1 = self._ask_until_parsed(
            pairwise_prompt(entry, baseline, candidate, self.pairwise_template), parse_preference, PAIRWISE_FOLLOW_UP)
        second, raw_2, cached_2 = self._ask_until_parsed(
            pairwise_prompt(entry, candidate, baseline, self.pairwise_template), parse_preference, PAIRWISE_FOLLOW_UP)
        outcome = None
        if first is not None and second is not None:
            total = _candidate_points(first, 2) + _candidate_points(second, 1)
            outcome = "win" if total > 0 else "loss" if total < 0 else "tie"
        return PairwiseVerdict(outcome, first, second, raw_1 + raw_2, cached_1 and cached_2)

    def compare_all(self, triples: Iterable[tuple[Mapping[str, Any], str, str]],
                    progress: bool = True) -> list[PairwiseVerdict]:
        """:meth:`compare` for every ``(entry, baseline, candidate)``, with a tqdm progress bar."""
        triples = list(triples)
        if progress:
            from tqdm import tqdm

            triples = tqdm(triples, desc=f"comparing with {self.model}", unit="entry")
        return [self.compare(e, b, c) for e, b, c in triples]


# ----------------------------------------------------------------------------- files
def load_responses(path: str | Path, response_key: str = "model_response",
                   require_output: bool = True) -> list[dict[str, Any]]:
    """Entries of a responses file (``instruction``, ``input``, ``output``, ``model_response``),
    with a clear error naming the file and the entry when one is malformed. ``require_output``:
    the reference ``output`` must be there (scoring against it needs it; comparisons do not)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"responses file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(data, list):
        raise InvalidInput(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise InvalidInput(f"{path}: entry {i} must be an object, got {type(entry).__name__}")
        for key in ("instruction", *(("output",) if require_output else ()), response_key):
            if not isinstance(entry.get(key), str):
                raise InvalidInput(f"{path}: entry {i} needs a string {key!r}")
    return data


def summarize(scores: Sequence[Score]) -> dict[str, Any]:
    """Average over the scored entries, and counts of scored and failed ones."""
    ok = [s.score for s in scores if s.score is not None]
    return {"average": sum(ok) / len(ok) if ok else None, "n_scored": len(ok),
            "n_failed": len(scores) - len(ok), "n_entries": len(scores)}


def pair_responses(baseline: Sequence[Mapping[str, Any]], candidate: Sequence[Mapping[str, Any]],
                   response_key: str = "model_response", names: tuple[str, str] = ("baseline", "candidate")
                   ) -> list[tuple[dict[str, Any], str, str]]:
    """``(entry, baseline response, candidate response)`` for every instruction of ``candidate``,
    matched to ``baseline`` by ``(instruction, input)`` (repeats in file order). Raises ValueError
    naming the first instruction one file lacks."""
    pool: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for entry in baseline:
        pool.setdefault((entry["instruction"], entry.get("input", "")), []).append(entry)
    triples = []
    for i, entry in enumerate(candidate):
        key = (entry["instruction"], entry.get("input", ""))
        if not pool.get(key):
            raise ValueError(f"{names[1]} entry {i} ({entry['instruction'][:60]!r}) has no counterpart in the "
                             f"{names[0]} responses: compare responses to the same test set")
        triples.append((dict(entry), pool[key].pop(0)[response_key], entry[response_key]))
    left = sum(len(v) for v in pool.values())
    if left:
        raise ValueError(f"{left} {names[0]} entries have no counterpart in the {names[1]} responses")
    return triples


def summarize_pairwise(verdicts: Sequence[PairwiseVerdict]) -> dict[str, Any]:
    """Counts and rates (over the judged entries) of the candidate's wins, ties and losses, the
    share of entries where both orders agreed, and how often the judge picked position 1."""
    judged = [v for v in verdicts if v.outcome is not None]
    counts = {o: sum(v.outcome == o for v in judged) for o in OUTCOMES}
    n = len(judged)
    picks = [p for v in judged for p in (v.first, v.second) if p in ("1", "2")]
    return {"n_entries": len(verdicts), "n_judged": n, "n_failed": len(verdicts) - n, **counts,
            **{f"{o}_rate": (counts[o] / n if n else None) for o in OUTCOMES},
            "consistency": (sum(v.consistent for v in judged) / n if n else None),
            "position_1_rate": (picks.count("1") / len(picks) if picks else None)}
