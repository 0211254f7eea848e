"""The downloader: cache, checksum, atomic writes, offline errors. Files come from an HTTP server on
127.0.0.1 in a thread (real sockets); no test reaches the internet."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from functools import partial
from pathlib import Path

import pytest
import torch

import gptlab.weights.download as dl
from gptlab.weights.download import DownloadError, download, fetch_hf_model


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``/cut/<file>`` promises more bytes than it sends, then hangs up."""

    requests: list[str]

    def do_GET(self):  # noqa: N802
        self.requests.append(self.path)
        if self.path.startswith("/cut/"):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"only a little")
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """(base URL, served folder, list of requested paths)."""
    root = tmp_path / "served"
    root.mkdir()
    requests: list[str] = []
    handler = type("H", (_Handler,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("GPTLAB_CACHE", str(root))
    return root


@pytest.fixture
def closed_port_url():
    """A URL on a local port nothing listens on: connecting is refused at once."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_cache_root_is_the_env_var_or_home(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    assert dl.cache_dir() == tmp_path
    monkeypatch.delenv("GPTLAB_CACHE")
    assert dl.cache_dir() == Path.home() / ".cache" / "gptlab"


def test_download_verifies_and_lands_in_the_cache(server, cache):
    url, root, _ = server
    data = b"hello weights\n" * 1000
    (root / "w.bin").write_bytes(data)
    path = download(f"{url}/w.bin", "sub/w.bin", sha256=sha(data))
    assert path == cache / "sub" / "w.bin" and path.read_bytes() == data
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_a_cached_file_never_touches_the_network(server, cache, closed_port_url):
    url, root, requests = server
    data = b"abc" * 100
    (root / "w.bin").write_bytes(data)
    first = download(f"{url}/w.bin", "w.bin", sha256=sha(data))
    assert len(requests) == 1
    # same file again, even from a URL that cannot be reached: served from the cache
    assert download(f"{closed_port_url}/w.bin", "w.bin", sha256=sha(data)) == first
    assert download(f"{url}/w.bin", "w.bin") == first
    assert len(requests) == 1


def test_a_cached_file_with_the_wrong_checksum_is_fetched_again(server, cache):
    url, root, requests = server
    data = b"the right bytes"
    (root / "w.bin").write_bytes(data)
    (cache).mkdir()
    (cache / "w.bin").write_bytes(b"corrupt")
    assert download(f"{url}/w.bin", "w.bin", sha256=sha(data)).read_bytes() == data
    assert len(requests) == 1


def test_a_checksum_mismatch_names_both_hashes_and_writes_nothing(server, cache):
    url, root, _ = server
    (root / "w.bin").write_bytes(b"unexpected")
    wrong = "0" * 64
    with pytest.raises(DownloadError) as e:
        download(f"{url}/w.bin", "w.bin", sha256=wrong)
    assert wrong in str(e.value) and sha(b"unexpected") in str(e.value)
    assert not (cache / "w.bin").exists()
    assert list(cache.iterdir()) == []  # the temporary file is gone too


def test_offline_error_names_the_url_and_the_full_destination(cache, closed_port_url):
    url = f"{closed_port_url}/models/w.bin"
    with pytest.raises(DownloadError) as e:
        download(url, "models/w.bin", timeout=5)
    msg = str(e.value)
    assert url in msg and str(cache / "models" / "w.bin") in msg and "GPTLAB_CACHE" in msg
    assert isinstance(e.value, RuntimeError)
    assert not (cache / "models" / "w.bin").exists()


def test_http_errors_are_download_errors(server, cache):
    url, _, _ = server
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{url}/missing.bin", "missing.bin")


def test_a_cut_off_transfer_leaves_no_file(server, cache):
    url, _, _ = server
    with pytest.raises(DownloadError):
        download(f"{url}/cut/w.bin", "w.bin", timeout=5)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_an_absolute_destination_is_used_as_is(server, cache, tmp_path):
    url, root, _ = server
    (root / "a.txt").write_text("x")
    assert download(f"{url}/a.txt", tmp_path / "elsewhere" / "a.txt") == tmp_path / "elsewhere" / "a.txt"


# --------------------------------------------------------------------------- Hugging Face models
def serve_tiny_gpt2(root: Path, repo: str) -> None:
    """A tiny random GPT-2 laid out as the Hub serves it: /<repo>/resolve/main/<file>."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300, n_positions=16,
                                  bos_token_id=None, eos_token_id=None)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(root / repo / "resolve" / "main")


def test_fetch_hf_model_without_the_hub_library_uses_urllib(server, cache, monkeypatch):
    url, root, requests = server
    serve_tiny_gpt2(root, "openai-community/gpt2")
    monkeypatch.setattr(dl, "HF_ENDPOINT", url)
    folder = fetch_hf_model("openai-community/gpt2", use_hub=False)
    assert folder == cache / "hf" / "openai-community--gpt2"
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors"}
    assert fetch_hf_model("openai-community/gpt2", use_hub=False) == folder
    assert len(requests) == 2  # one per file, once


def test_load_pretrained_by_name_downloads_once_then_uses_the_cache(server, cache, monkeypatch):
    from gptlab.weights import load_pretrained

    url, root, requests = server
    serve_tiny_gpt2(root, "openai-community/gpt2-medium")
    monkeypatch.setattr(dl, "HF_ENDPOINT", url)
    monkeypatch.setattr(dl, "_hub_download", lambda: None)  # as if huggingface_hub were not installed
    model = load_pretrained("355M", drop_rate=0.0)
    assert model.config.name == "gpt2-medium" and model.config.emb_dim == 32
    again = load_pretrained("gpt2-medium")
    assert torch.equal(again.tok_emb.weight, model.tok_emb.weight)
    assert len(requests) == 2


def test_fetch_hf_model_uses_huggingface_hub_when_installed(cache, monkeypatch):
    calls = []

    def fake_hub(repo_id, filename, revision, local_dir):
        calls.append((repo_id, filename, revision))
        Path(local_dir, filename).write_text("{}")
        return str(Path(local_dir, filename))

    monkeypatch.setattr(dl, "_hub_download", lambda: fake_hub)
    monkeypatch.setattr(dl, "reachable", lambda url, timeout=3.0: True)  # as if online: the fake hub answers
    folder = fetch_hf_model("openai-community/gpt2-xl")
    assert calls == [("openai-community/gpt2-xl", "config.json", "main"),
                     ("openai-community/gpt2-xl", "model.safetensors", "main")]
    assert (folder / "model.safetensors").is_file()


def test_hub_failures_say_where_to_put_the_file(cache, monkeypatch):
    def offline_hub(**kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(dl, "_hub_download", lambda: offline_hub)
    monkeypatch.setattr(dl, "reachable", lambda url, timeout=3.0: True)  # the host answers, the download fails
    with pytest.raises(DownloadError) as e:
        fetch_hf_model("openai-community/gpt2-large")
    msg = str(e.value)
    assert "https://huggingface.co/openai-community/gpt2-large/resolve/main/config.json" in msg
    assert str(cache / "hf" / "openai-community--gpt2-large" / "config.json") in msg


def test_load_pretrained_offline_names_the_missing_weights(cache, monkeypatch, closed_port_url):
    from gptlab.weights import load_pretrained

    monkeypatch.setattr(dl, "HF_ENDPOINT", closed_port_url)
    monkeypatch.setattr(dl, "_hub_download", lambda: None)
    with pytest.raises(DownloadError) as e:
        load_pretrained("gpt2-xl")
    assert str(cache / "hf" / "openai-community--gpt2-xl" / "config.json") in str(e.value)
