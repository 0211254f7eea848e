"""One cached, checksummed downloader for everything gptlab fetches (pretrained weights, datasets).

    path = download("https://example.org/data.txt", "datasets/data.txt", sha256="ab12...")
    folder = fetch_hf_model("openai-community/gpt2")   # config.json + model.safetensors

* Files land under the cache root: ``$GPTLAB_CACHE`` or ``~/.cache/gptlab``.
* A file that is already there (with the right checksum) is returned without touching the network.
* Writes are atomic: bytes go to a temporary file beside the destination, which is renamed into
  place only once complete and verified, so an interrupted download never leaves a half file.
* Offline, the error says which URL to fetch by other means and the exact path to put it at.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "GPTLAB_CACHE"
HF_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
"""Base URL of the Hugging Face Hub for the plain-urllib fallback (``HF_ENDPOINT`` overrides)."""
HF_MODEL_FILES = ("config.json", "model.safetensors")
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be fetched; the message names the URL and where to put the file by hand."""


def cache_dir() -> Path:
    """The cache root: ``$GPTLAB_CACHE`` if set, else ``~/.cache/gptlab`` (not created here)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gptlab"


def resolve_dest(dest: str | os.PathLike[str]) -> Path:
    """An absolute ``dest`` as given; a relative one below :func:`cache_dir`."""
    dest = Path(dest).expanduser()
    return dest if dest.is_absolute() else cache_dir() / dest


def sha256sum(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _verified(path: Path, sha256: str) -> bool:
    """Whether ``path`` has checksum ``sha256``. A stamp file (hash, size, mtime) written after a
    verified download spares re-hashing multi-GB files on every call."""
    st = path.stat()
    stamp = _stamp_path(path)
    if stamp.is_file() and stamp.read_text().split() == [sha256.lower(), str(st.st_size), str(st.st_mtime_ns)]:
        return True
    ok = sha256sum(path) == sha256.lower()
    if ok:
        _write_stamp(path, sha256)
    return ok


def _write_stamp(path: Path, sha256: str) -> None:
    st = path.stat()
    try:
        _stamp_path(path).write_text(f"{sha256.lower()} {st.st_size} {st.st_mtime_ns}\n")
    except OSError:  # a read-only cache still works, it just re-hashes next time
        pass


def offline_message(url: str, dest: Path, reason: object) -> str:
    """What to tell a user whose download failed: the reason, the URL, and where the file goes."""
    return (f"could not download {url}: {reason}.\n"
            f"If this machine is offline, fetch that URL elsewhere and put the file at:\n"
            f"    {dest}\n"
            f"(the cache root is ${CACHE_ENV} or ~/.cache/gptlab; set {CACHE_ENV} to use another folder).")


def download(url: str, dest: str | os.PathLike[str], sha256: str | None = None, *, timeout: float = 30.0,
             progress: bool | None = None) -> Path:
    """Fetch ``url`` to ``dest`` (absolute, or relative to the cache root) once; return its path.

    If ``dest`` exists (and matches ``sha256`` when given) the network is never touched. A cached
    file with the wrong checksum is fetched again. ``sha256`` (hex) is verified before the file is
    moved into place; on a mismatch the temporary file is deleted and :class:`DownloadError` names
    the expected and the actual hash. Network failures (offline, refused, timeout, a cut-off transfer,
    HTTP errors) raise :class:`DownloadError` naming the URL and the full destination path.
    ``progress``: print a progress line to stderr (default: when stderr is a terminal).
    """
    dest = resolve_dest(dest)
    if dest.is_file():
        if sha256 is None or _verified(dest, sha256):
            return dest
        log.warning("%s does not match sha256 %s; downloading it again", dest, sha256)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    progress = sys.stderr.isatty() if progress is None else progress
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "gptlab"}),
                                    timeout=timeout) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                out.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if progress:
                    pct = f" {100 * done / total:5.1f}%" if total else ""
                    print(f"\r{dest.name}: {done / 2**20:,.1f} MiB{pct}", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        if total and done != total:
            raise http.client.IncompleteRead(b"", total - done)
    except urllib.error.HTTPError as e:
        tmp.unlink(missing_ok=True)
        raise DownloadError(offline_message(url, dest, f"HTTP {e.code} {e.reason}")) from e
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError, ConnectionError) as e:
        tmp.unlink(missing_ok=True)
        raise DownloadError(offline_message(url, dest, getattr(e, "reason", e))) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    actual = h.hexdigest()
    if sha256 is not None and actual != sha256.lower():
        tmp.unlink(missing_ok=True)
        raise DownloadError(f"checksum mismatch for {url}: expected sha256 {sha256.lower()}, got {actual}; "
                            f"nothing was written to {dest}")
    os.replace(tmp, dest)
    if sha256 is not None:
        _write_stamp(dest, sha256)
    log.info("downloaded %s -> %s (%.1f MiB)", url, dest, dest.stat().st_size / 2**20)
    return dest


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of ``url`` accepts a TCP connection within ``timeout`` seconds (no request
    is sent): a quick answer before a download client spends its retries on a machine without network."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def offline_files_message(files: list[tuple[str, Path]], reason: str) -> str:
    """Every file still missing, with its URL and where to put it by hand."""
    lines = [f"cannot download ({reason}). Put these files in place by hand, fetched on a machine with network:"]
    lines += [f"    {url}\n      -> {dest}" for url, dest in files]
    lines.append(f"(the cache root is ${CACHE_ENV} or ~/.cache/gptlab; or pass the folder holding them as init_from=)")
    return "\n".join(lines)


def hf_url(repo_id: str, filename: str, revision: str = "main") -> str:
    """The direct-download URL of one file of a Hugging Face Hub repository."""
    return f"{HF_ENDPOINT.rstrip('/')}/{repo_id}/resolve/{revision}/{filename}"


def hf_model_dir(repo_id: str) -> Path:
    """Where :func:`fetch_hf_model` keeps a repository: ``<cache>/hf/<owner>--<name>``."""
    return cache_dir() / "hf" / repo_id.replace("/", "--")


def _hub_download():
    """``huggingface_hub.hf_hub_download`` if that package is installed, else None."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    return hf_hub_download


def fetch_hf_model(repo_id: str, files: tuple[str, ...] = HF_MODEL_FILES, revision: str = "main",
                   use_hub: bool | None = None) -> Path:
    """Make ``files`` of the Hub repository ``repo_id`` available locally; return their folder.

    Files already in :func:`hf_model_dir` are used as they are (no network). Missing ones come
    through ``huggingface_hub.hf_hub_download`` when it is installed (``use_hub=None``/True), else
    through :func:`download` from ``{HF_ENDPOINT}/{repo}/resolve/{revision}/{file}``. Either way a
    failure raises :class:`DownloadError` saying which URL to fetch and where to put it.
    """
    folder = hf_model_dir(repo_id)
    missing = [f for f in files if not (folder / f).is_file()]
    if not missing:
        return folder
    wanted = [(hf_url(repo_id, name, revision), folder / name) for name in missing]
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not reachable(HF_ENDPOINT):
        # fail at once, naming every file, instead of after a download client's retries
        why = "HF_HUB_OFFLINE=1" if os.environ.get("HF_HUB_OFFLINE") == "1" else f"{HF_ENDPOINT} is not reachable"
        raise DownloadError(offline_files_message(wanted, why))
    hub = _hub_download() if use_hub in (None, True) else None
    if use_hub and hub is None:
        raise ImportError("use_hub=True needs huggingface_hub: pip install huggingface_hub")
    for name in missing:
        if hub is None:
            download(hf_url(repo_id, name, revision), folder / name)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        try:
            path = Path(hub(repo_id=repo_id, filename=name, revision=revision, local_dir=str(folder)))
        except Exception as e:  # the hub raises its own offline/HTTP error types (httpx, requests, ...)
            raise DownloadError(offline_message(hf_url(repo_id, name, revision), folder / name,
                                                f"{type(e).__name__}: {e}")) from e
        if path.resolve() != (folder / name).resolve():  # older hubs may return a snapshot path
            shutil.copyfile(path, folder / name)
    return folder


__all__ = ["DownloadError", "cache_dir", "download", "fetch_hf_model", "hf_model_dir", "hf_url",
           "offline_message", "offline_files_message", "reachable", "resolve_dest", "sha256sum"]
