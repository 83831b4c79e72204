"""LLM backend against a real local HTTP server speaking the chat-completions protocol."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from powerclip.negatives.llm import ChatClient, LLMError, LLMGenerator, ResponseCache, parse_answer
from powerclip.negatives.shards import NegativesJob, list_shards, make_negatives
from powerclip.negatives.validate import KINDS
from tests.test_negatives import _read, _write_shards

SECRET = "sk-test-0123456789-secret"


class FakeChatServer:
    """A tiny OpenAI-compatible endpoint: counts requests, can fail on cue, checks the bearer key.

    Its "model" rewrites each caption deterministically; one kind echoes the caption (the validator
    must reject it) and, when ``drop_last`` is set, the last caption of a batch is left out.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.requests = 0
        self.script: list[int] = []  # HTTP statuses to answer before succeeding
        self.auth: list[str] = []
        self.captions_seen: list[str] = []
        self.drop_last = False
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                    server.auth.append(self.headers.get("Authorization", ""))
                    status = server.script.pop(0) if server.script else 200
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "not found"}})
                if status != 200:
                    return self._send(status, {"error": {"message": f"scripted {status}", "type": "x"}},
                                      {"Retry-After": "0"})
                captions = json.loads(body["messages"][-1]["content"])
                with server.lock:
                    server.captions_seen += [c["caption"] for c in captions]
                if server.drop_last and len(captions) > 1:
                    captions = captions[:-1]
                answer = [{"id": c["id"], **{k: server.rewrite(c["caption"], k) for k in KINDS}} for c in captions]
                content = "```json\n" + json.dumps(answer) + "\n```"
                self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0,
                                 "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def rewrite(caption: str, kind: str) -> str:
        if kind == "reorder":
            return caption  # an echo: must be rejected as same_as_caption
        return f"{caption} but {kind.replace('_', ' ')}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with FakeChatServer() as s:
        yield s


def _client(server: FakeChatServer, monkeypatch, **kw) -> tuple[ChatClient, list[float]]:
    monkeypatch.setenv("PCLIP_TEST_KEY", SECRET)
    sleeps: list[float] = []
    opts = {"max_retries": 3, "backoff_s": 0.01, "sleep": sleeps.append, **kw}
    return ChatClient(server.url, "fake-model", api_key_env="PCLIP_TEST_KEY", **opts), sleeps


def test_retry_after_429_and_500_then_success(server, monkeypatch, caplog):
    client, sleeps = _client(server, monkeypatch)
    server.script = [429, 500]
    with caplog.at_level(logging.DEBUG):
        content = client.complete([{"role": "user", "content": json.dumps([{"id": 0, "caption": "a cat"}])}])
    assert json.loads(content.strip("`json\n"))[0]["swap_nouns"] == "a cat but swap nouns"
    assert server.requests == 3 and client.stats["retries"] == 2
    assert client.stats["http_429"] == 1 and client.stats["http_500"] == 1
    assert len(sleeps) == 2 and sleeps[1] > sleeps[0] > 0  # exponential back-off
    assert all(a == f"Bearer {SECRET}" for a in server.auth)  # the key comes from the env var
    assert SECRET not in caplog.text and SECRET not in repr(client)


def test_gives_up_and_does_not_retry_client_errors(server, monkeypatch):
    client, sleeps = _client(server, monkeypatch, max_retries=2)
    server.script = [503, 503, 503]
    with pytest.raises(LLMError, match="gave up after 3 attempts"):
        client.complete([{"role": "user", "content": "[]"}])
    assert server.requests == 3
    server.script = [400]
    with pytest.raises(LLMError, match="HTTP 400"):
        client.complete([{"role": "user", "content": "[]"}])
    assert server.requests == 4  # a 400 is not retried


def test_parse_answer_tolerates_wrappers_and_garbage():
    kinds = ["reorder", "swap_nouns"]
    wrapped = json.dumps({"results": [{"id": 1, "reorder": "b a", "swap_nouns": None}]})
    assert parse_answer(wrapped, 2, kinds) == [None, {"reorder": "b a", "swap_nouns": None}]
    assert parse_answer("I cannot do that", 2, kinds) == [None, None]
    assert parse_answer('[{"id": 7, "reorder": "x"}, "junk", {"id": "0", "reorder": 3}]', 2, kinds) == [
        {"reorder": None, "swap_nouns": None}, None]


def test_shards_through_llm_with_cache_and_restart(server, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PCLIP_TEST_KEY", SECRET)
    _write_shards(tmp_path / "in")
    shards = list_shards(str(tmp_path / "in"))
    cache = tmp_path / "cache.sqlite"
    llm = {"base_url": server.url, "model": "fake-model", "api_key_env": "PCLIP_TEST_KEY",
           "backoff_s": 0.01, "batch_size": 4, "workers": 2, "cache": str(cache)}
    server.script = [429]  # one retry along the way
    with caplog.at_level(logging.INFO):
        report = make_negatives(shards, tmp_path / "out", NegativesJob(backend="llm", k=4, llm=llm))
    # 6 distinct captions (both shards share them): 2 batches of <= 4, plus the retried request
    assert server.requests == 3 and report["llm"]["client"]["retries"] == 1
    assert report["llm"]["generator"]["batches"] == 2 and report["llm"]["cache_entries"] == 6
    assert report["llm"]["generator"]["cache_hits"] == 6  # the second shard repeats the first's captions
    assert report["rejects"]["same_as_caption"] > 0  # the echoed 'reorder' never gets through
    out = _read(tmp_path / "out")
    for key, s in out.items():
        if "json" not in s:
            continue
        negs = json.loads(s["json"])["negatives"]
        assert len(negs) == 4 and {n["kind"] for n in negs} == set(KINDS) - {"reorder"}, key
    text = json.dumps(report) + caplog.text + (tmp_path / "out" / "negatives_report.json").read_text()
    assert SECRET not in text

    # restart: everything comes from the cache, the server is not asked again, same output
    before = server.requests
    report2 = make_negatives(shards, tmp_path / "out2", NegativesJob(backend="llm", k=4, llm=llm))
    assert server.requests == before and report2["llm"]["generator"]["cache_hits"] == 12
    assert {k: s.get("json") for k, s in _read(tmp_path / "out2").items()} == {
        k: s.get("json") for k, s in out.items()}


def test_missing_answers_are_counted_and_fetched_on_rerun(server, monkeypatch, tmp_path):
    client, _ = _client(server, monkeypatch)
    cache = ResponseCache(tmp_path / "c.sqlite")
    gen = LLMGenerator(client, cache, KINDS, batch_size=3, workers=1)
    caps = [f"a photo of object number {i}" for i in range(6)]
    server.drop_last = True
    first = gen.generate(caps)
    assert [a is None for a in first] == [False, False, True, False, False, True]
    assert gen.stats["missing_in_answer"] == 2 and len(cache) == 4
    server.drop_last = False
    n = server.requests
    second = gen.generate(caps)
    assert server.requests == n + 1 and all(a is not None for a in second)  # only the 2 missing, 1 batch
    assert server.captions_seen[-2:] == [caps[2], caps[5]]
    cache.close()
