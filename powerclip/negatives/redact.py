"""Remove API keys from any text before it is logged, cached, raised or reported.

A chat server may echo request headers in an error body or even in its answer; a proxy may put
the key in a URL. Whatever the endpoint sends back is therefore treated as tainted: the exact key,
any long piece of its start or end (echoes get truncated or masked), and the usual shapes of
credentials (``Bearer ...``, ``sk-...``, ``api_key=...``) are replaced by ``[REDACTED]``.
"""

from __future__ import annotations

import logging
import re
import urllib.parse

MASK = "[REDACTED]"
MIN_PIECE = 8  # a prefix/suffix of the key this long is treated as the key

_SHAPES = [
    re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"(?i)(\b(?:api[_-]?key|x-api-key|authorization|access[_-]?token)[\"']?\s*[:=]\s*[\"']?)"
               r"[^\s\"',;&}]{6,}"),
    re.compile(r"()\bsk-[A-Za-z0-9_-]{8,}"),
]


class Redactor:
    """Callable: ``redact(text) -> text`` without ``key`` (or anything shaped like a credential)."""

    def __init__(self, key: str | None) -> None:
        self.key = key if key and key != "EMPTY" else None
        self.forms = []
        if self.key:
            self.forms = sorted({self.key, urllib.parse.quote(self.key, safe=""),
                                 urllib.parse.quote_plus(self.key)}, key=len, reverse=True)

    def _pieces(self, text: str) -> str:
        key = self.key
        assert key is not None
        if len(key) < 2 * MIN_PIECE:
            return text
        start = text.find(key[:MIN_PIECE])
        while start >= 0:  # a truncated echo: the longest prefix of the key found there
            n = MIN_PIECE
            while n < len(key) and text[start:start + n + 1] == key[:n + 1]:
                n += 1
            text = text[:start] + MASK + text[start + n:]
            start = text.find(key[:MIN_PIECE], start + len(MASK))
        end = text.find(key[-MIN_PIECE:])
        while end >= 0:  # a masked echo ("sk-****abcd1234"): the longest suffix ending there
            stop = end + MIN_PIECE
            n = MIN_PIECE
            while n < len(key) and stop - n - 1 >= 0 and text[stop - n - 1:stop] == key[-(n + 1):]:
                n += 1
            text = text[:stop - n] + MASK + text[stop:]
            end = text.find(key[-MIN_PIECE:], stop - n + len(MASK))
        return text

    def __call__(self, text: str) -> str:
        if not isinstance(text, str) or not text:
            return text
        for form in self.forms:
            text = text.replace(form, MASK)
        if self.key:
            text = self._pieces(text)
        for pat in _SHAPES:
            text = pat.sub(lambda m: m.group(1) + MASK, text)
        return text


_ACTIVE: dict[str, Redactor] = {}
_BASE_FACTORY = None


def _redacting_factory(*args, **kwargs) -> logging.LogRecord:
    record = _BASE_FACTORY(*args, **kwargs)
    try:
        msg = record.getMessage()
    except Exception:  # noqa: BLE001 - a malformed record is the logging module's business
        return record
    clean = msg
    for redact in list(_ACTIVE.values()):
        clean = redact(clean)
    if clean != msg:
        record.msg, record.args = clean, None
    return record


def redact_all_logging(redact: Redactor) -> None:
    """Redact ``redact.key`` from every log record of the process, whichever library logs it (the
    HTTP client logs request URLs, which may carry the key). Installed once per key; a record
    factory rather than a filter, because logger filters miss records of child loggers."""
    global _BASE_FACTORY
    if not redact.key or redact.key in _ACTIVE:
        return
    if _BASE_FACTORY is None:
        _BASE_FACTORY = logging.getLogRecordFactory()
        logging.setLogRecordFactory(_redacting_factory)
    _ACTIVE[redact.key] = redact
