"""LLM backend: any OpenAI-compatible chat-completions endpoint (vLLM, TGI, llama.cpp, OpenAI).

What makes it usable on millions of captions:
* batching: ``batch_size`` captions per request (the JSON answer maps ids to negatives), and
  ``workers`` requests in flight at once;
* retries with exponential back-off on 429 / 5xx / connection errors (``Retry-After`` honoured,
  capped), other 4xx fail at once because retrying cannot fix them;
* an on-disk sqlite cache keyed by (prompt version, model, kinds, temperature, caption): a restarted
  run asks only for the captions it has not got yet, so it never pays twice;
* the API key is read from an environment variable and never logged, printed or stored: everything
  the endpoint sends back (error bodies, answers) and every log line of this module passes through
  ``redact.Redactor`` first (servers and proxies do echo request headers), and so does every log
  record of the process once a client was made (the HTTP client logs request URLs).

The DeGLA paper generates its negatives with in-context learning; the rules and examples below
follow its five kinds (docs/losses.md §4).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from powerclip.errors import UserError
from powerclip.negatives.redact import Redactor, redact_all_logging
from powerclip.negatives.validate import KINDS

log = logging.getLogger(__name__)

PROMPT_VERSION = 1

RULES = {
    "reorder": "exchange the positions of two phrases so that their roles change (e.g. subject and "
               "object), keeping every word",
    "swap_nouns": "exchange two objects (nouns) of the caption, leaving every attribute where it was",
    "swap_adjectives": "exchange two attributes (colour, size, material, ...) between two objects, or "
                       "move the only attribute to another object",
    "replace_adjectives": "replace one attribute by a different, plausible attribute",
    "replace_nouns": "replace one object by a different, plausible object",
}

EXAMPLES = [
    {"caption": "A man riding a brown horse on the beach.",
     "reorder": "A brown horse riding a man on the beach.",
     "swap_nouns": "A horse riding a brown man on the beach.",
     "swap_adjectives": "A brown man riding a horse on the beach.",
     "replace_adjectives": "A man riding a white horse on the beach.",
     "replace_nouns": "A man riding a brown bicycle on the beach."},
    {"caption": "a small dog sleeping next to a red sofa",
     "reorder": "a red sofa sleeping next to a small dog",
     "swap_nouns": "a small sofa sleeping next to a red dog",
     "swap_adjectives": "a red dog sleeping next to a small sofa",
     "replace_adjectives": "a large dog sleeping next to a red sofa",
     "replace_nouns": "a small cat sleeping next to a red sofa"},
]

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class LLMError(UserError, RuntimeError):
    """The endpoint failed in a way retries did not (or cannot) fix."""


# ------------------------------------------------------------------------------------- prompt
def system_prompt(kinds: Sequence[str]) -> str:
    rules = "\n".join(f"- {k}: {RULES[k]}" for k in kinds)
    return ("You write hard negative captions for training image-text models. A hard negative keeps "
            "the original caption's words and style as far as possible, is fluent, and is FALSE for "
            "the image the original caption describes. One negative per kind:\n" + rules + "\n"
            "Answer with JSON only: an array with one object per input caption, "
            '{"id": <the caption id>, ' + ", ".join(f'"{k}": "..."' for k in kinds) + "}. "
            "Use null for a kind that cannot apply to a caption.")


def build_messages(captions: Sequence[str], kinds: Sequence[str]) -> list[dict]:
    """System rules, one in-context example exchange per example caption, then the batch."""
    msgs = [{"role": "system", "content": system_prompt(kinds)}]
    for i, ex in enumerate(EXAMPLES):
        msgs.append({"role": "user", "content": json.dumps([{"id": i, "caption": ex["caption"]}])})
        msgs.append({"role": "assistant", "content": json.dumps([{"id": i, **{k: ex[k] for k in kinds}}])})
    msgs.append({"role": "user", "content": json.dumps([{"id": i, "caption": c} for i, c in enumerate(captions)])})
    return msgs


_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.MULTILINE)


def parse_answer(content: str, n: int, kinds: Sequence[str]) -> list[dict[str, str | None] | None]:
    """Per caption id, the negatives by kind (None: that caption is missing from the answer)."""
    text = _FENCE.sub("", content or "").strip()
    start, end = text.find("["), text.rfind("]")
    try:
        data = json.loads(text[start:end + 1]) if start >= 0 and end > start else json.loads(text)
    except json.JSONDecodeError:
        return [None] * n
    if isinstance(data, dict):  # some models wrap the array: {"results": [...]}
        data = next((v for v in data.values() if isinstance(v, list)), [])
    out: list[dict[str, str | None] | None] = [None] * n
    for item in data if isinstance(data, list) else []:
        if not isinstance(item, dict):
            continue
        try:
            idx = int(item.get("id"))
        except (TypeError, ValueError):
            continue
        if 0 <= idx < n:
            out[idx] = {k: (item.get(k) if isinstance(item.get(k), str) else None) for k in kinds}
    return out


# -------------------------------------------------------------------------------------- cache
class ResponseCache:
    """sqlite key -> JSON value; safe to share between threads, survives crashes (commit per put)."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.commit()
        self._lock = threading.Lock()

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM cache WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_many(self, items: dict[str, dict]) -> None:
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO cache VALUES (?, ?)",
                                 [(k, json.dumps(v)) for k, v in items.items()])
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM cache").fetchone()[0])

    def close(self) -> None:
        self._db.close()


# ------------------------------------------------------------------------------------- client
class ChatClient:
    """Chat completions with our own retry loop (the SDK's is disabled so that every attempt is
    counted and the back-off is the documented one)."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 max_retries: int = 5, backoff_s: float = 1.0, backoff_max_s: float = 60.0,
                 timeout_s: float = 120.0, temperature: float = 0.0, max_tokens: int = 2048,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        import openai

        self._openai = openai
        # vLLM and most local servers accept any key; the SDK insists on a non-empty one
        key = os.environ.get(api_key_env) or "EMPTY"
        self.redact = Redactor(key)
        redact_all_logging(self.redact)
        self._client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=timeout_s)
        self.base_url, self.model = self.redact(base_url), model
        self.max_retries, self.backoff_s, self.backoff_max_s = max_retries, backoff_s, backoff_max_s
        self.temperature, self.max_tokens = temperature, max_tokens
        self._sleep = sleep
        self.stats: Counter = Counter()
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never the key
        return f"ChatClient(base_url={self.base_url!r}, model={self.model!r})"

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _delay(self, attempt: int, err: Exception) -> float:
        delay = self.backoff_s * (2 ** attempt) * (1.0 + 0.1 * random.random())
        response = getattr(err, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        return min(delay, self.backoff_max_s)

    def complete(self, messages: list[dict]) -> str:
        """The assistant's text for ``messages``; raises LLMError once retries are exhausted."""
        oa = self._openai
        for attempt in range(self.max_retries + 1):
            self._count("requests")
            try:
                resp = self._client.chat.completions.create(
                    model=self.model, messages=messages, temperature=self.temperature,
                    max_tokens=self.max_tokens)
                return self.redact(resp.choices[0].message.content or "")
            except oa.APIStatusError as e:
                if e.status_code not in RETRY_STATUS:
                    self._count("errors")
                    raise LLMError(f"{self.base_url}: HTTP {e.status_code} (not retryable): "
                                   f"{self.redact(str(e))[:200]}") from None
                err: Exception = e
                self._count(f"http_{e.status_code}")
            except (oa.APIConnectionError, oa.APITimeoutError) as e:
                err = e
                self._count("connection_errors")
            if attempt == self.max_retries:
                self._count("errors")
                raise LLMError(f"{self.base_url}: gave up after {attempt + 1} attempts: "
                               f"{type(err).__name__}") from None
            delay = self._delay(attempt, err)
            self._count("retries")
            log.warning("LLM request failed (%s), retry %d/%d in %.2fs", type(err).__name__,
                        attempt + 1, self.max_retries, delay)
            self._sleep(delay)
        raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------- generator
class LLMGenerator:
    """Negatives of every requested kind for many captions, through the cache and the client."""

    def __init__(self, client: ChatClient, cache: ResponseCache, kinds: Sequence[str] = KINDS,
                 batch_size: int = 8, workers: int = 4) -> None:
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown negative kinds {unknown}; known: {KINDS}")
        self.client, self.cache, self.kinds = client, cache, list(kinds)
        self.batch_size, self.workers = max(1, batch_size), max(1, workers)
        self.stats: Counter = Counter()

    def cache_key(self, caption: str) -> str:
        ident = [PROMPT_VERSION, self.client.model, self.kinds, self.client.temperature, caption]
        return hashlib.sha256(json.dumps(ident).encode()).hexdigest()

    def _ask(self, captions: list[str]) -> dict[str, dict]:
        try:
            content = self.client.complete(build_messages(captions, self.kinds))
        except LLMError as e:
            log.error("%s", e)
            self.stats["failed_batches"] += 1
            return {}
        answers = parse_answer(content, len(captions), self.kinds)
        got = {self.cache_key(c): a for c, a in zip(captions, answers) if a is not None}
        self.stats["missing_in_answer"] += len(captions) - len(got)
        self.cache.put_many(got)
        return got

    def generate(self, captions: Sequence[str]) -> list[dict[str, str | None] | None]:
        """Per caption, negatives by kind; None where the endpoint gave nothing (rerun to fill)."""
        keys = [self.cache_key(c) for c in captions]
        found: dict[str, dict] = {}
        todo: dict[str, str] = {}  # key -> caption, first occurrence order, deduplicated
        for c, k in zip(captions, keys):
            if k in found or k in todo:
                continue
            hit = self.cache.get(k)
            if hit is not None:
                found[k] = hit
                self.stats["cache_hits"] += 1
            else:
                todo[k] = c
        pending = list(todo.values())
        batches = [pending[i:i + self.batch_size] for i in range(0, len(pending), self.batch_size)]
        self.stats["batches"] += len(batches)
        with ThreadPoolExecutor(self.workers) as pool:
            for got in pool.map(self._ask, batches):
                found.update(got)
        return [found.get(k) for k in keys]
