"""``gptlab-serve`` on loopback with real clients: the official ``openai`` package (completions, chat,
streaming, n > 1, every error case), raw HTTP for what a client library would not send (malformed
JSON, an oversized body), concurrency (one batch, short requests return first), a full queue (429),
clients that go away, the API key, SIGTERM, and ``gptlab-judge`` scoring through a served gptlab model."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import pytest
import torch

from conftest import REPO, run_cli
from gptlab.data.instruct import InstructionDataModule, get_prompt_style
from gptlab.inference import load_model
from gptlab.model.config import GPTConfig
from gptlab.model.generation import generate
from gptlab.model.gpt import GPT
from gptlab.serving.app import Server, build_server
from gptlab.serving.protocol import render_chat
from gptlab.tasks.instruct import InstructionTask
from gptlab.streaming import StopStrings
from gptlab.tokenizer import EOT_ID, get_tokenizer

openai = pytest.importorskip("openai", reason="the openai package is a test dependency: pip install -e '.[dev]'")
pytest.importorskip("fastapi", reason='the server needs the serve extra: pip install "gptlab[serve]"')

TINY = {**GPTConfig.from_name("gpt2-tiny").to_dict(), "context_length": 256}
READY_WITHIN_S = 120  # generous upper bound for a readiness poll (never a timing assertion)


# --------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A gptlab checkpoint of a tiny instruction model (phi3 prompt style) after one training step."""
    tmp = tmp_path_factory.mktemp("ckpt")
    L.seed_everything(123)
    dm = InstructionDataModule(max_entries=20, batch_size=4, prompt_style="phi3")
    task = InstructionTask(model=TINY, prompt_style="phi3", optimizer={"lr": 1e-3}, generate_on_test=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(tmp))
    trainer.fit(task, datamodule=dm)
    trainer.save_checkpoint(tmp / "tiny.ckpt")
    return tmp / "tiny.ckpt"


@pytest.fixture(scope="module")
def lm(checkpoint):
    return load_model(ckpt_path=checkpoint)


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + READY_WITHIN_S
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    """``server`` on a thread of this process, until the block ends (then stopped like SIGTERM)."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_ready(server.url)
        yield server
    finally:
        server.stop()
        thread.join(READY_WITHIN_S)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(lm) -> Iterator[Server]:
    with running(build_server(lm, "tiny", port=0, max_batch_size=4, max_queue=16, max_tokens=16)) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None
         ) -> tuple[int, Any, Any]:
    """One request with the standard library: (status, headers (case-insensitive), decoded JSON body)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def greedy_text(lm, prompt_ids: list[int], max_tokens: int, stops=(), strip=False) -> tuple[str, int]:
    """What the server must answer for a greedy request: ``generate`` alone, then the text cut at
    the end of text or a stop string; and how many tokens it generated."""
    out = generate(lm.model, torch.tensor(prompt_ids), max_tokens, eos_id=EOT_ID)[len(prompt_ids):].tolist()
    if EOT_ID in out:
        out = out[: out.index(EOT_ID)]
    tok = get_tokenizer()
    cut = StopStrings(stops, strip_leading=strip)
    text = cut.push(tok.decode(out)) + cut.flush()
    return text, len(out)


def error_of(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# --------------------------------------------------------------------------- the API with the openai client
def test_models_lists_the_served_model_with_its_context(client):
    [model] = client.models.list().data
    assert model.id == "tiny" and model.owned_by == "gptlab"
    assert model.model_extra["context_length"] == 256 and model.model_extra["prompt_style"] == "phi3"


def test_a_greedy_completion_is_generate_alone_with_usage(client, lm):
    prompt = "Every effort moves you"
    ids = get_tokenizer().encode(prompt)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    text, n = greedy_text(lm, ids, 12)
    assert r.object == "text_completion" and r.choices[0].text == text
    assert r.choices[0].finish_reason == ("length" if n == 12 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)


def test_chat_is_written_in_the_checkpoint_prompt_style_with_the_system_message(client, lm):
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "Name a primary color."}]
    prompt = render_chat(messages, get_prompt_style("phi3"))
    assert prompt == "You answer briefly.\n\n<|user|>\nName a primary color.\n<|assistant|>\n"
    ids = get_tokenizer().encode(prompt, allowed_special={"<|endoftext|>"})
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    text, n = greedy_text(lm, ids, 10, stops=get_prompt_style("phi3").stop_markers, strip=True)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens <= n


def test_streaming_gives_the_same_text_piece_by_piece_and_usage_at_the_end(client):
    kw = dict(model="tiny", prompt="The quick brown fox", max_tokens=12, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    assert len(chunks) > 1 and "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    chat = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=6, temperature=0, stream=True,
                                               stream_options={"include_usage": True}))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].choices == [] and chat[-1].usage.completion_tokens >= 1  # OpenAI's include_usage form


def test_n_choices_are_reproducible_with_a_seed_and_differ_from_each_other(client):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=1.0, n=3, seed=7)
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and texts == [c.text for c in again.choices]
    assert len(set(texts)) > 1
    if all(c.finish_reason == "length" for c in first.choices):
        assert first.usage.completion_tokens == 3 * 8  # usage counts every choice's tokens


def test_per_request_settings_top_k_and_stop_strings(client, lm):
    prompt = "I HAD always thought Jack Gisburn"
    greedy = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    top1 = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=1.5,
                                     extra_body={"top_k": 1}).choices[0].text
    assert top1 == greedy  # top_k=1 is greedy at any temperature
    stop = greedy[len(greedy) // 2:][:3]
    cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == greedy[: greedy.index(stop)] and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kwargs, status, param, code", [
    (dict(prompt="hello", max_tokens=300), 400, "max_tokens", "context_length_exceeded"),
    (dict(prompt="hello " * 300, max_tokens=1), 400, "prompt", "context_length_exceeded"),
    (dict(prompt="hello", temperature="hot"), 400, "temperature", "invalid_value"),
    (dict(prompt="hello", temperature=3), 400, "temperature", "invalid_value"),
    (dict(prompt="hello", n=0), 400, "n", "invalid_value"),
    (dict(prompt="hello", n=5), 400, "n", "invalid_value"),  # more than max_batch_size=4
    (dict(prompt="hello", top_p=0), 400, "top_p", "invalid_value"),
    (dict(prompt="hello", max_tokens=0), 400, "max_tokens", "invalid_value"),
    (dict(prompt="hello", stop=["a", "b", "c", "d", "e"]), 400, "stop", "invalid_value"),
    (dict(prompt="hello", logprobs=2), 400, "logprobs", "unsupported_parameter"),
    (dict(prompt=""), 400, "prompt", "invalid_value"),
    (dict(prompt=[1, 2, 99999999]), 400, "prompt", "invalid_value"),
    (dict(prompt="hello", extra_body={"top_k": -1}), 400, "top_k", "invalid_value"),
    (dict(prompt="hello", seed=1.5), 400, "seed", "invalid_value"),
])
def test_completion_errors_are_openai_shaped_400s_naming_the_field(client, kwargs, status, param, code):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", **kwargs)
    assert e.value.status_code == status
    err = error_of(e.value)
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code)
    assert param in err["message"] or "prompt" in err["message"]


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "assistant", "content": "Hi"}], "messages[0]"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "messages"),
    ([{"role": "wizard", "content": "Hi"}], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}],
     "messages[0].content"),
])
def test_chat_errors_name_the_message(client, messages, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=messages)
    assert error_of(e.value)["param"] == param


def test_an_unknown_model_is_a_404_naming_the_served_one(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])
    err = error_of(e.value)
    assert err["code"] == "model_not_found" and "'tiny'" in err["message"]


@pytest.mark.parametrize("body, code", [
    (b'{"prompt": "hi", "max_tokens": 3,', "invalid_json"),
    (b'\xff\xfe not utf-8', "invalid_json"),
    (b'["prompt", "hi"]', "invalid_json"),
])
def test_malformed_bodies_are_400s(server, body, code):
    status, _, answer = http("POST", server.url + "/v1/completions", body)
    assert status == 400 and answer["error"]["code"] == code and answer["error"]["type"] == "invalid_request_error"


def test_an_oversized_body_and_an_unknown_route_are_refused_in_openai_shape(server):
    # refused from the declared length, before the body is read (a client sending it would meet a closed socket)
    with socket.create_connection((server.host, server.port)) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
                  f"Content-Length: 5000000\r\n\r\n".encode())
        answer = s.makefile("rb").read().decode()
    assert answer.startswith("HTTP/1.1 413") and '"code":"too_large"' in answer
    status, _, answer = http("GET", server.url + "/v1/nothing")
    assert status == 404 and set(answer["error"]) == {"message", "type", "param", "code"}


def test_the_health_endpoint_and_the_chat_page(server):
    status, _, health = http("GET", server.url + "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == "tiny" and health["max_batch_size"] == 4
    with urllib.request.urlopen(server.url + "/", timeout=60) as r:
        page = r.read().decode()
    assert r.headers["content-type"].startswith("text/html") and "/v1/chat/completions" in page


# --------------------------------------------------------------------------- batching
def test_concurrent_requests_share_one_batch_and_a_short_one_does_not_wait(lm):
    """Four requests sent together start in one batch (the window waits until four rows are asked
    for); the 4-token one is answered while the 200-token one is still generating."""
    srv = build_server(lm, "tiny", port=0, max_batch_size=4, batch_window=60.0)
    ids = [get_tokenizer().encode(p) for p in ("Hello", "The quick brown fox jumps", "A", "In the beginning")]
    lengths = [4, 200, 20, 30]
    results: dict[int, Any] = {}
    steps_when_done: dict[int, int] = {}
    with running(srv):
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        steps0 = srv.engine.steps

        def ask(i: int) -> None:
            results[i] = client.completions.create(model="tiny", prompt=ids[i], max_tokens=lengths[i],
                                                   temperature=0)
            steps_when_done[i] = srv.engine.steps - steps0

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(READY_WITHIN_S)
    for i in range(4):  # batched rows give exactly what each prompt gives alone
        assert results[i].choices[0].text == greedy_text(lm, ids[i], lengths[i])[0]
    total = srv.engine.steps - steps0
    assert total <= max(lengths)  # one batch: max(lengths) - 1 steps (the prefill gives the first token), not their sum
    assert steps_when_done[0] < lengths[1] - 10  # the short request did not wait for the long one


def test_a_full_queue_is_a_429_with_retry_after_and_a_client_that_leaves_frees_its_place(lm):
    # a window of a minute that waits for 3 rows: the two requests below stay queued
    srv = build_server(lm, "tiny", port=0, max_batch_size=3, max_queue=2, batch_window=60.0)
    with running(srv):
        host, port = srv.host, srv.port
        body = json.dumps({"prompt": "Hello", "max_tokens": 2}).encode()
        raw = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        waiting = [socket.create_connection((host, port)) for _ in range(2)]
        for s in waiting:
            s.sendall(raw)
        poll_health(srv.url, lambda h: h["waiting"] == 2)
        status, headers, answer = http("POST", srv.url + "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 429 and headers.get("Retry-After") == "1"
        assert answer["error"]["code"] == "queue_full" and answer["error"]["type"] == "rate_limit_error"
        for s in waiting:  # both clients go away: their places are freed
            s.close()
        poll_health(srv.url, lambda h: h["waiting"] == 0 and h["running"] == 0)
        assert srv.engine.steps == 0  # they never ran


def test_a_streaming_client_that_disconnects_frees_its_row(lm):
    srv = build_server(lm, "tiny", port=0, max_batch_size=2)
    with running(srv):
        req = urllib.request.Request(srv.url + "/v1/completions", method="POST",
                                     data=json.dumps({"prompt": "Hello", "max_tokens": 250, "stream": True,
                                                      "temperature": 0}).encode(),
                                     headers={"Content-Type": "application/json"})
        resp = urllib.request.urlopen(req, timeout=120)
        assert resp.readline().startswith(b"data: ")
        resp.close()  # gone after the first token
        poll_health(srv.url, lambda h: h["running"] == 0)
        assert srv.engine.steps < 250  # it left before its tokens were done
        steps = srv.engine.steps
        status, _, answer = http("POST", srv.url + "/v1/completions", {"prompt": "Hi", "max_tokens": 3})
        assert status == 200 and answer["usage"]["completion_tokens"] >= 1 and srv.engine.steps > steps


def poll_health(url: str, ok) -> dict:
    deadline = time.monotonic() + READY_WITHIN_S
    while True:
        _, _, health = http("GET", url + "/health")
        if ok(health):
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.05)


# --------------------------------------------------------------------------- API key
def test_the_api_key_is_required_when_set(lm):
    with running(build_server(lm, "tiny", port=0, api_key="s3cret")) as srv:
        def client(key: str):
            return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=120)
        with pytest.raises(openai.AuthenticationError) as e:
            client("wrong").models.list()
        assert error_of(e.value)["code"] == "invalid_api_key"
        status, _, _ = http("POST", srv.url + "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 401
        assert client("s3cret").completions.create(model="tiny", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
        assert http("GET", srv.url + "/health")[0] == 200  # health needs no key


# --------------------------------------------------------------------------- the command line
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_gptlab_serve_drains_on_sigterm_and_stops(checkpoint, tmp_path):
    """The console tool through the inference loader: a stream running when SIGTERM comes is
    finished, then the process exits 0 and the port is closed."""
    proc = subprocess.Popen([sys.executable, "-m", "gptlab.cli.serve", f"ckpt_path={checkpoint}", "port=0",
                             "model_name=tiny", "device=cpu"], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = None
        for line in proc.stderr:
            if m := re.search(r"listening on (http://\S+) ", line):
                url = m.group(1)
                break
        assert url, "no 'listening on' line"
        wait_ready(url)
        req = urllib.request.Request(url + "/v1/completions", method="POST",
                                     data=json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 200,
                                                      "stream": True, "temperature": 0}).encode(),
                                     headers={"Content-Type": "application/json"})
        resp = urllib.request.urlopen(req, timeout=120)
        first = resp.readline()
        proc.send_signal(signal.SIGTERM)
        rest = resp.read().decode()
        events = [json.loads(line[6:]) for line in (first.decode() + rest).splitlines()
                  if line.startswith("data: {")]
        assert rest.rstrip().endswith("data: [DONE]")
        assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert events[-1]["usage"]["completion_tokens"] >= 1
        assert proc.wait(timeout=READY_WITHIN_S) == 0
        assert "gptlab-serve: stopped" in proc.stderr.read()
        with pytest.raises(OSError):
            urllib.request.urlopen(url + "/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_port_in_use_is_one_clear_error(checkpoint, run_entry, tmp_path, monkeypatch):
    from gptlab.cli.serve import main

    monkeypatch.chdir(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, err = run_entry(main, "gptlab-serve", f"ckpt_path={checkpoint}", f"port={taken.getsockname()[1]}",
                                 "device=cpu")
    assert code == 2 and "gptlab-serve: error: cannot listen on host=127.0.0.1" in err and "Traceback" not in err


def test_without_the_serve_extra_it_says_how_to_install_it(checkpoint, run_entry, tmp_path, monkeypatch):
    import importlib.util

    import gptlab.serving.app as app
    from gptlab.cli.serve import main

    real = importlib.util.find_spec
    monkeypatch.setattr(app.importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_entry(main, "gptlab-serve", f"ckpt_path={checkpoint}")
    assert code == 2 and 'the server needs fastapi, which is not installed: pip install "gptlab[serve]"' in err


# --------------------------------------------------------------------------- the judge, end to end
@pytest.fixture(scope="module")
def judge_model(tmp_path_factory) -> Path:
    """A tiny GPT whose every next token is "85": its final norm outputs a constant vector that the
    head maps onto that one token. Served with max_tokens=1, it answers any judge prompt with 85."""
    tok = get_tokenizer()
    [eighty_five] = tok.encode("85")
    model = GPT(GPTConfig.from_name("gpt2-tiny", context_length=1024))
    with torch.no_grad():
        model.final_norm.weight.zero_()
        model.final_norm.bias.zero_()
        model.final_norm.bias[0] = 1.0
        model.out_head.weight[:, 0] = 0.0
        model.out_head.weight[eighty_five, 0] = 50.0
    path = tmp_path_factory.mktemp("judge") / "judge85.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.slow
def test_gptlab_judge_scores_responses_through_a_served_gptlab_model(judge_model, tmp_path):
    responses = tmp_path / "responses.json"
    entries = json.loads((REPO / "tests" / "data" / "instruction-data-with-response.json").read_text())[:3]
    responses.write_text(json.dumps(entries))
    lm = load_model(init_from=judge_model)
    with running(build_server(lm, "judge85", port=0, max_tokens=1)) as srv:
        res = run_cli(["gptlab.cli.judge", f"responses={responses}", "judge.backend=openai", f"judge.url={srv.url}",
                       "judge.model=judge85", "progress=false"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "scores.json").read_text())
    assert [s["score"] for s in report["scores"]] == [85, 85, 85] and report["average"] == 85
    assert report["requests_sent"] == 3 and report["judge"]["backend"] == "openai"
    assert "Average score: 85.00" in res.stdout


# --------------------------------------------------------------------------- engine and protocol, without HTTP
def test_a_failed_model_step_fails_only_the_requests_in_it_and_the_engine_goes_on(lm):
    import queue

    from gptlab.model.continuous import Sampling
    from gptlab.serving.engine import Engine
    from gptlab.serving.protocol import GenerationRequest

    engine = Engine(lm.model, lm.tokenizer, EOT_ID, max_batch_size=2, batch_window=0.0)
    real_step, calls = engine.batch.step, []

    def step_that_fails_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_step()

    engine.batch.step = step_that_fails_once
    engine.start()
    try:
        def request() -> GenerationRequest:
            return GenerationRequest("completion", [[464, 2068, 7586]], n=1, max_tokens=5, sampling=Sampling(),
                                     stops=(), stream=False, include_usage=False, strip_leading=False)
        first, second = queue.Queue(), queue.Queue()
        engine.submit(request(), first.put)
        failed = first.get(timeout=READY_WITHIN_S)
        assert failed.error.status == 500 and "CUDA out of memory (simulated)" in failed.error.message
        assert engine.batch.rows == 0
        engine.submit(request(), second.put)
        updates = [second.get(timeout=READY_WITHIN_S)]
        while updates[-1].finish_reason is None:
            updates.append(second.get(timeout=READY_WITHIN_S))
        assert updates[-1].finish_reason == "length" and updates[-1].tokens == 5
    finally:
        engine.stop(timeout=READY_WITHIN_S)


def test_a_conversation_is_one_example_per_exchange_in_the_prompt_style():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a color."},
                {"role": "user", "content": [{"type": "text", "text": "One word."}]}]
    alpaca = get_prompt_style("alpaca")
    assert render_chat(messages, alpaca) == (
        "Be brief.\n\n"
        + alpaca.full_text({"instruction": "Hi", "input": "", "output": "Hello!"}) + "\n\n"
        + alpaca.prompt({"instruction": "Name a color.\nOne word.", "input": ""}))
    assert render_chat(messages[1:2], get_prompt_style("raw")) == "Hi"
