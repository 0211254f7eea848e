"""The LLM-as-judge client against a real HTTP server on 127.0.0.1 (Ollama and OpenAI-compatible
request/response JSON), including retries, timeouts, missing models, refused connections and the cache."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest

from conftest import REPO, run_cli
from gptlab.judge import (Judge, JudgeError, JudgeModelNotFound, judge_prompt, load_responses, pair_responses,
                          pairwise_prompt, parse_preference, parse_score, summarize_pairwise)

DATA = Path(__file__).parent / "data" / "instruction-data-with-response.json"


class FakeServer:
    """A JSON server in a thread: answers POSTs with the scripted ``(status, body, delay)`` replies in
    order (the last one repeats), or with ``replies(request_body)`` when it is a function, and
    records every request's path and decoded body."""

    def __init__(self, replies: list[tuple[int, dict, float]] | Callable[[dict], tuple[int, dict, float]]):
        self.replies, self.requests = (replies if callable(replies) else list(replies)), []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, body))
                if callable(server.replies):
                    status, reply, delay = server.replies(body)
                else:
                    status, reply, delay = server.replies.pop(0) if len(server.replies) > 1 else server.replies[0]
                server.release.wait(delay)  # a long delay ends when the test does
                data = json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


NEVER = 3600.0
"""A reply delay no request waits out: the server answers only when the test has ended."""


def ollama(text: str, status: int = 200, delay: float = 0.0) -> tuple[int, dict, float]:
    return status, {"model": "llama3", "message": {"role": "assistant", "content": text}, "done": True}, delay


def openai(text: str) -> tuple[int, dict, float]:
    return 200, {"id": "x", "object": "chat.completion",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}, 0.0


@pytest.fixture
def entries():
    return load_responses(DATA)


def fast_judge(url: str, **kw) -> Judge:
    return Judge(**{"model": "llama3", "url": url, "timeout": 5, "retries": 2, "backoff": 0.01, **kw})


@pytest.mark.parametrize("text,score", [
    ("85", 85), ("Score: 85/100", 85), (" 100\n", 100), ("0", 0), ("I'd rate it 92.5.", 92),
    ("The response deserves a 7 out of 10... so 70", 7), ("150", None), ("-3", None), ("great answer", None),
    ("", None), ("llama3 says 60", 60)])
def test_parse_score_takes_the_first_number_in_0_to_100(text, score):
    assert parse_score(text) == score


def test_judge_prompt_is_the_books(entries):
    e = entries[0]
    assert judge_prompt(e) == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence using a simile.\n\n### Input:\n"
        "The car is very fast.` and correct output `The car is as fast as lightning.`, score the model response "
        "`The car is as fast as a bullet.` on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only.")


def test_ollama_request_body_and_score(entries):
    with FakeServer([ollama("85")]) as srv:
        s = fast_judge(srv.url).score(entries[0])
    assert (s.score, s.raw, s.cached) == (85, "85", False)
    [(path, body)] = srv.requests
    assert path == "/api/chat"
    assert body == {"model": "llama3", "messages": [{"role": "user", "content": judge_prompt(entries[0])}],
                    "stream": False, "options": {"temperature": 0.0, "seed": 123, "num_ctx": 2048}}


def test_openai_compatible_request_body_and_score(entries):
    with FakeServer([openai("Score: 42/100")]) as srv:
        s = fast_judge(srv.url + "/v1", backend="openai", model="qwen").score(entries[1])
    assert s.score == 42
    [(path, body)] = srv.requests
    assert path == "/v1/chat/completions"
    assert body == {"model": "qwen", "messages": [{"role": "user", "content": judge_prompt(entries[1])}],
                    "temperature": 0.0, "seed": 123}


def test_server_error_is_retried_until_success(entries):
    with FakeServer([(500, {"error": "overloaded"}, 0.0), (503, {}, 0.0), ollama("70")]) as srv:
        assert fast_judge(srv.url).score(entries[0]).score == 70
    assert len(srv.requests) == 3


def test_persistent_server_error_gives_up_with_the_status(entries):
    with FakeServer([(500, {"error": "boom"}, 0.0)]) as srv:
        with pytest.raises(JudgeError, match="HTTP 500"):
            fast_judge(srv.url, retries=1).score(entries[0])
    assert len(srv.requests) == 2


def test_timeout_is_retried_then_a_clear_error(entries):
    with FakeServer([ollama("50", delay=NEVER)]) as srv:
        with pytest.raises(JudgeError, match=r"timed out after 0.2 s \(2 attempts; judge.timeout bounds each whole "
                                             r"request.*raise judge.timeout"):
            fast_judge(srv.url, timeout=0.2, retries=1).score(entries[0])
    assert len(srv.requests) == 2


def test_slow_first_answer_then_success(entries):
    with FakeServer([ollama("50", delay=NEVER), ollama("60")]) as srv:
        assert fast_judge(srv.url, timeout=3).score(entries[0]).score == 60


def test_unparseable_answer_is_asked_again_then_recorded_as_none(entries):
    with FakeServer([ollama("A fine response."), ollama("Very good indeed.")]) as srv:
        s = fast_judge(srv.url).score(entries[0])
    assert s.score is None and "A fine response." in s.raw and "Very good indeed." in s.raw
    assert len(srv.requests) == 2
    follow_up = srv.requests[1][1]["messages"]
    assert [m["role"] for m in follow_up] == ["user", "assistant", "user"]
    assert follow_up[1]["content"] == "A fine response."


def test_unparseable_then_parseable_answer_counts(entries):
    with FakeServer([ollama("Excellent!"), ollama("90")]) as srv:
        assert fast_judge(srv.url).score(entries[0]).score == 90


def test_missing_model_names_it_and_ollama_pull(entries):
    with FakeServer([(404, {"error": "model 'llama9' not found"}, 0.0)]) as srv:
        with pytest.raises(JudgeModelNotFound, match=r"'llama9'.*not found.*`ollama pull llama9`"):
            fast_judge(srv.url, model="llama9").score(entries[0])
    assert len(srv.requests) == 1  # not retried


def test_connection_refused_says_how_to_start_ollama(entries):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(JudgeError, match=rf"cannot reach Ollama at {url} .*`ollama serve` and `ollama pull llama3`"):
        fast_judge(url, retries=1).score(entries[0])


def test_cached_answers_cost_no_request_on_a_rerun(entries, tmp_path):
    cache = tmp_path / "cache.jsonl"
    with FakeServer([ollama("80")]) as srv:
        first = [s.score for s in fast_judge(srv.url, cache=cache).score_all(entries[:4], progress=False)]
        assert len(srv.requests) == 4
        again = fast_judge(srv.url, cache=cache).score_all(entries[:4], progress=False)
        assert len(srv.requests) == 4  # nothing new sent
        other = fast_judge(srv.url, cache=cache, model="other").score(entries[0])
        assert len(srv.requests) == 5  # another judge model is another key
    assert first == [s.score for s in again] == [80] * 4 and all(s.cached for s in again)
    assert not other.cached and len(cache.read_text().splitlines()) == 5


def test_cli_writes_scores_prints_the_average_and_reuses_the_cache(tmp_path):
    responses = tmp_path / "responses.json"
    responses.write_text(DATA.read_text())
    n = len(json.loads(DATA.read_text()))
    replies = [ollama(str(10 * i)) for i in range(n - 1)] + [ollama("no idea"), ollama("still no idea")]
    with FakeServer(replies) as srv:
        args = ["gptlab.cli.judge", f"responses={responses}", "judge.model=llama3", f"judge.url={srv.url}",
                "judge.backend=ollama", "judge.backoff=0.01", "progress=false"]
        res = run_cli(args, cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        sent = len(srv.requests)
        again = run_cli(args, cwd=tmp_path)
        assert again.returncode == 0 and len(srv.requests) == sent == n + 1
    expected = sum(10 * i for i in range(n - 1)) / (n - 1)
    assert f"Average score: {expected:.2f}" in res.stdout and "(1 failed)" in res.stdout
    assert f"Average score: {expected:.2f}" in again.stdout and "0 requests sent" in again.stderr
    report = json.loads((tmp_path / "scores.json").read_text())
    assert report["n_failed"] == 1 and len(report["scores"]) == n
    assert report["scores"][-1]["score"] is None and "no idea" in report["scores"][-1]["judge_answer"]
    assert (tmp_path / "judge_cache.jsonl").is_file()
    assert not (tmp_path / "outputs").exists()  # no Hydra run folder


def test_cli_unreachable_server_is_one_clear_line(tmp_path):
    responses = tmp_path / "responses.json"
    responses.write_text(DATA.read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = run_cli(["gptlab.cli.judge", f"responses={responses}", f"judge.url=http://127.0.0.1:{port}",
                   "judge.retries=0", "progress=false"], cwd=tmp_path)
    assert res.returncode == 1
    assert "cannot reach Ollama" in res.stderr and "Traceback" not in res.stderr


class RawServer(FakeServer):
    """Answers every POST with ``status``, extra ``headers`` and raw ``body`` bytes; records the
    request headers it got."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None):
        self.seen_headers: list[dict[str, str]] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                server.seen_headers.append(dict(self.headers))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET = _answer  # noqa: N815 - http.server's naming

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)


def test_a_redirect_to_another_host_is_not_followed_and_the_key_stays_home(entries):
    with RawServer(200, b'{"message": {"content": "90"}}') as elsewhere, \
            RawServer(302, b"", {"Location": f"{elsewhere.url}/api/chat"}) as judge_host:
        judge = fast_judge(judge_host.url, api_key="secret-key", backend="ollama")
        with pytest.raises(JudgeError, match=f"redirected to '{elsewhere.url}/api/chat'.*not follow redirects"):
            judge.score(entries[0])
    assert judge_host.seen_headers and judge_host.seen_headers[0]["Authorization"] == "Bearer secret-key"
    assert elsewhere.seen_headers == []  # nothing, and no key, reached the other port


def test_an_answer_that_is_not_utf8_is_reported_with_the_url(entries):
    with RawServer(200, b'{"message": {"content": "\xff\xfe 90"}}') as srv:
        with pytest.raises(JudgeError, match=rf"{srv.url}/api/chat sent an answer that is not UTF-8"):
            fast_judge(srv.url).score(entries[0])


class DripServer:
    """A raw TCP server on 127.0.0.1: reads one request, then sends ``head`` at once and ``drip`` one
    byte every ``interval`` seconds (``endless``: ``drip`` over and over, never finishing). Records
    how many dripped bytes went out and whether it sent everything (``finished``)."""

    def __init__(self, head: bytes, drip: bytes, interval: float = 0.0, endless: bool = False):
        self.head, self.drip, self.interval, self.endless = head, drip, interval, endless
        self.sent, self.finished, self.stop = 0, False, threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(body) < length:
                body += conn.recv(65536)
            try:
                conn.sendall(self.head)
                while not self.stop.is_set():
                    for i in range(len(self.drip)) if self.interval else (None,):
                        chunk = self.drip if i is None else self.drip[i:i + 1]
                        conn.sendall(chunk)
                        self.sent += len(chunk)
                        if self.stop.wait(self.interval):
                            return
                    if not self.endless:
                        self.finished = True
                        return
            except OSError:
                return  # the client closed the connection

    def __enter__(self) -> "DripServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


ANSWER = json.dumps({"message": {"role": "assistant", "content": "85"}}).encode()
OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize("where", ["headers", "body"])
def test_the_timeout_bounds_the_whole_request_not_each_read(entries, where):
    """A server sending its answer one byte every 10 ms never lets a single read wait the 1 s of
    judge.timeout, and needs over 20 s to finish; the request still ends at judge.timeout, with
    the timeout error, while the server is sending."""
    pad = b"X-Pad: " + b"p" * 2000 + b"\r\n"
    if where == "headers":
        head, drip = b"", OK_HEAD + pad + f"Content-Length: {len(ANSWER)}\r\n\r\n".encode() + ANSWER
    else:  # the declared length covers the padding: the answer is complete only at its end
        drip = ANSWER + b" " * 2000
        head = OK_HEAD + f"Content-Length: {len(drip)}\r\n\r\n".encode()
    with DripServer(head, drip, interval=0.01) as srv:
        with pytest.raises(JudgeError, match=r"timed out after 1 s \(1 attempt; judge.timeout bounds each whole request"):
            fast_judge(srv.url, timeout=1, retries=0).score(entries[0])
        assert not srv.finished and 0 < srv.sent < len(drip)  # it was still sending when the call returned


def test_an_answer_larger_than_the_cap_is_refused_while_the_server_still_sends(entries):
    with DripServer(OK_HEAD + b"\r\n", b'{"message": {"content": "' + b"9" * 4096, endless=True) as srv:
        with pytest.raises(JudgeError, match=r"larger than judge.max_answer_bytes=10,000 bytes"):
            fast_judge(srv.url, max_answer_bytes=10_000, retries=0).score(entries[0])
        assert not srv.finished


def test_a_declared_length_above_the_cap_is_refused_without_reading_it(entries):
    with RawServer(200, b"x" * 5000) as srv:
        with pytest.raises(JudgeError, match=r"larger than judge.max_answer_bytes=1,000 bytes"):
            fast_judge(srv.url, max_answer_bytes=1000).score(entries[0])


def test_an_answer_of_the_cap_s_size_is_read(entries):
    body = json.dumps({"message": {"content": "85"}, "pad": "x" * 900}).encode()
    with RawServer(200, body) as srv:
        assert fast_judge(srv.url, max_answer_bytes=len(body)).score(entries[0]).score == 85


def test_a_deeply_nested_json_answer_is_one_clear_error(entries):
    with RawServer(200, b"[" * 200_000 + b"]" * 200_000) as srv:
        with pytest.raises(JudgeError, match="sent JSON nested too deeply to read") as e:
            fast_judge(srv.url).score(entries[0])
    assert "\n" not in str(e.value)


def test_cli_nested_json_answer_is_one_line_and_no_traceback(tmp_path, monkeypatch, run_entry):
    from gptlab.cli import judge as judge_cli

    monkeypatch.chdir(tmp_path)
    responses = tmp_path / "responses.json"
    responses.write_text(DATA.read_text())
    with RawServer(200, b'{"message": {"content": ' + b"[" * 200_000 + b"]" * 200_000 + b"}}") as srv:
        code, _, err = run_entry(judge_cli.main, "gptlab-judge", f"responses={responses}", f"judge.url={srv.url}",
                                 "judge.retries=0", "progress=false")
    assert code == 1 and "Traceback" not in err and "RecursionError" not in err
    [line] = [ln for ln in err.splitlines() if "error:" in ln]
    assert line.startswith("gptlab-judge: error: ") and "nested too deeply" in line


# ----------------------------------------------------------------------------- pairwise (chapter 8.7)
@pytest.mark.parametrize("text,pick", [
    ("2", "2"), ("Response 1 is better.", "1"), ("Tie.", "tie"), ("Both are equally good.", "tie"), ("**2**", "2"),
    ("10", None), ("1.5", None), ("neither", None), ("", None)])
def test_parse_preference_takes_the_first_pick(text, pick):
    assert parse_preference(text) == pick


def polite_judge(body: dict) -> tuple[int, dict, float]:
    """A deterministic judge: prefers the response that says "please"; a tie when both or neither do."""
    prompt = body["messages"][0]["content"]
    one = prompt.split("Response 1: `", 1)[1].split("` Response 2: `", 1)[0]
    two = prompt.split("` Response 2: `", 1)[1].split("` Answer with", 1)[0]
    polite = ["please" in one, "please" in two]
    return ollama("tie" if polite[0] == polite[1] else ("1" if polite[0] else "2"))


def candidates(entries: list[dict]) -> list[dict]:
    """6 polite answers (wins), 2 copies of the baseline (ties), 2 where only the baseline is polite (losses)."""
    out = []
    for i, e in enumerate(entries):
        if i < 6:
            out.append({**e, "model_response": "Yes, please: " + e["model_response"]})
        elif i < 8:
            out.append(dict(e))
        else:
            out.append(dict(e))
            e["model_response"] = "please: " + e["model_response"]
    return out


def test_pairwise_judges_both_orders_and_counts_wins_ties_losses(entries, tmp_path):
    cand = candidates(entries)
    triples = pair_responses(entries, list(reversed(cand)))  # matched by instruction, not by position
    cache = tmp_path / "cache.jsonl"
    with FakeServer(polite_judge) as srv:
        verdicts = fast_judge(srv.url, cache=cache).compare_all(triples, progress=False)
        assert len(srv.requests) == 18  # 2 x 10, but a pair of equal responses reads the same both ways
        again = fast_judge(srv.url, cache=cache).compare_all(triples, progress=False)
        assert len(srv.requests) == 18 and all(v.cached for v in again)
    first = srv.requests[0][1]["messages"][0]["content"]
    e, base, cand0 = triples[0]
    assert first == pairwise_prompt(e, base, cand0) and srv.requests[1][1]["messages"][0]["content"] == \
        pairwise_prompt(e, cand0, base)
    s = summarize_pairwise(verdicts)
    assert (s["win"], s["tie"], s["loss"], s["n_failed"]) == (6, 2, 2, 0)
    assert (s["win_rate"], s["tie_rate"], s["loss_rate"], s["consistency"]) == (0.6, 0.2, 0.2, 1.0)
    assert [v.outcome for v in verdicts[-6:]] == ["win"] * 6 and verdicts[-1].first == "2" and verdicts[-1].second == "1"


def test_a_judge_that_always_picks_position_1_gives_only_ties(entries):
    with FakeServer([ollama("1")]) as srv:
        verdicts = fast_judge(srv.url).compare_all(pair_responses(entries, candidates(entries)), progress=False)
    s = summarize_pairwise(verdicts)
    assert (s["tie"], s["consistency"], s["position_1_rate"]) == (10, 0.0, 1.0)


def test_pairwise_answer_without_a_pick_is_asked_again_then_counted_as_failed(entries):
    with FakeServer([ollama("Hmm, hard to say."), ollama("2"), ollama("no opinion")]) as srv:
        v = fast_judge(srv.url).compare(entries[0], "a", "b")
    assert (v.first, v.second, v.outcome) == ("2", None, None)
    assert len(srv.requests) == 4 and srv.requests[1][1]["messages"][-1]["content"].startswith("Answer with 1, 2")
    assert summarize_pairwise([v])["n_failed"] == 1


def test_pairing_needs_the_same_instructions(entries):
    with pytest.raises(ValueError, match=r"candidate entry 0 .* has no counterpart in the baseline"):
        pair_responses(entries[1:], entries[:1])
    with pytest.raises(ValueError, match=r"1 baseline entries have no counterpart"):
        pair_responses(entries, entries[1:])


def test_cli_pairwise_writes_the_report_and_prints_win_tie_loss(entries, tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "dpo").mkdir()
    cand = candidates(entries)
    (tmp_path / "sft" / "responses.json").write_text(json.dumps(entries))
    (tmp_path / "dpo" / "responses.json").write_text(json.dumps(cand))
    with FakeServer(polite_judge) as srv:
        res = run_cli(["gptlab.cli.judge", f"responses={tmp_path / 'dpo' / 'responses.json'}",
                       f"baseline={tmp_path / 'sft' / 'responses.json'}", f"judge.url={srv.url}", "progress=false"],
                      cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "win 6 (60.0%), tie 2 (20.0%), loss 2 (20.0%) of 10 judged (0 failed); both orders agreed on 100.0%" \
        in res.stdout
    report = json.loads((tmp_path / "dpo" / "pairwise.json").read_text())
    assert (report["win"], report["n_judged"], len(report["comparisons"])) == (6, 10, 10)
    assert report["comparisons"][0]["outcome"] == "win" and (tmp_path / "dpo" / "judge_cache.jsonl").is_file()
