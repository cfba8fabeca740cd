"""Resolves a requirement set with pip's own resolver in dry-run mode, without downloading it.

Why a tool: a plain ``pip install --dry-run`` over the GPU set (vllm, CUDA torch, cuDNN, ...)
downloads about 6 GB of wheels here and takes 2-3 minutes, because the package index this
machine reaches serves no separate wheel metadata (PEP 658) and no cache headers. This tool
puts a small index on loopback in front of the real one. It serves the real index pages with
PEP 658 metadata added; each wheel's METADATA is read from the remote wheel with two or three
HTTP range requests (the zip's central directory, then the one member) and kept on disk by
the wheel's sha256 (wheels never change). pip then resolves exactly as it would against the
real index, and fetches nothing else. Index pages and metadata of the last resolution
(``--lock``) are fetched in parallel before pip starts, so a cold run takes seconds of
network, not minutes.

The machine's own pip configuration (local file indexes with CPU builds of torch, a cap on
torch versions) is ignored: the question is what a GPU host, which has none of it, resolves.

    python tools/resolve_requirements.py -r requirements/gpu.txt -r requirements/project.txt
"""
from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import re
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_JSON = "application/vnd.pypi.simple.v1+json"
PIP_VERSION = "26.3"
"""The pip that resolves (any pip's resolver would do; this one stops at the metadata)."""
_TAIL = 256 * 1024
"""Bytes read from a wheel's end first: the central directory of all but the largest wheels."""


class RegistryUnreachable(RuntimeError):
    """The package index did not answer (network, DNS, TLS or timeout)."""


class ResolutionError(RuntimeError):
    """pip's resolver found no set of versions that satisfies every requirement."""


def default_index_url() -> str:
    """The index pip uses with no configuration (or $PIP_INDEX_URL when set)."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"].split()[0]
    from pip._internal.models.index import PyPI  # pip's own default, not restated here

    return PyPI.simple_url


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "catcascade"


def _parse_wheel_filename(filename: str):
    from pip._vendor.packaging.utils import parse_wheel_filename  # pip's packaging: always present

    return parse_wheel_filename(filename)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class RemoteZip(io.RawIOBase):
    """A read-only, seekable view of a remote file of known size, fetched in ranges.

    ``fetch(start, end)`` returns bytes [start, end). The last ``_TAIL`` bytes are fetched
    first; every later miss fetches at least ``min_fetch`` bytes.
    """

    def __init__(self, size: int, fetch, min_fetch: int = 128 * 1024):
        self._size, self._fetch, self._min = size, fetch, min_fetch
        self._pos = 0
        self._chunks: list[tuple[int, bytes]] = []
        self.requests = 0
        start = max(0, size - _TAIL)
        self._store(start, size)

    def _store(self, start: int, end: int) -> None:
        data = self._fetch(start, end)
        self.requests += 1
        if len(data) != end - start:
            raise OSError(f"range {start}-{end} returned {len(data)} bytes")
        self._chunks.append((start, data))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        end = min(self._size, self._pos + len(buffer))
        if end <= self._pos:
            return 0
        for start, data in self._chunks:
            if start <= self._pos and end <= start + len(data):
                break
        else:
            self._store(self._pos, min(self._size, max(end, self._pos + self._min)))
            start, data = self._chunks[-1]
        n = end - self._pos
        buffer[:n] = data[self._pos - start:end - start]
        self._pos = end
        return n


def wheel_metadata(zf: zipfile.ZipFile) -> bytes:
    """The wheel's ``<name>-<version>.dist-info/METADATA``."""
    names = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
    if len(names) != 1:
        raise OSError(f"expected one .dist-info/METADATA, found {names}")
    return zf.read(names[0])


@dataclass
class _File:
    url: str
    size: int
    filename: str


@dataclass
class MetadataIndex:
    """The loopback index: the upstream pages with PEP 658 metadata, as a context manager."""

    upstream: str = field(default_factory=default_index_url)
    cache_dir: Path = field(default_factory=lambda: _cache_root() / "wheel-metadata")
    timeout_s: float = 20.0
    workers: int = 8

    def __post_init__(self) -> None:
        self.upstream = self.upstream.rstrip("/") + "/"
        self.cache_dir = Path(self.cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._ssl = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE"))
        self._pages: dict[str, tuple[int, bytes]] = {}
        self._files: dict[str, _File] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        from pip._vendor.packaging.tags import sys_tags

        self._tags = set(sys_tags())
        self.errors: list[str] = []
        """Upstream failures met while serving pip (they explain a failed resolution)."""
        self.stats = {"pages": 0, "metadata_fetched": 0, "metadata_cached": 0, "range_requests": 0}

    # -- upstream ---------------------------------------------------------------------------
    def _get(self, url: str, headers: dict | None = None, attempts: int = 3,
             timeout_s: float | None = None) -> tuple[int, bytes]:
        """One GET; transient network errors (DNS, reset, timeout) are retried."""
        req = urllib.request.Request(url, headers=headers or {})
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s, context=self._ssl) as resp:
                    return resp.status, resp.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()
            except (urllib.error.URLError, OSError) as e:
                if attempt == attempts - 1:
                    raise RegistryUnreachable(f"package index unreachable: GET {url}: {getattr(e, 'reason', e)}") from e
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    def _installable(self, filename: str) -> bool:
        if not filename.endswith(".whl"):
            return True
        try:
            return bool(_parse_wheel_filename(filename)[3] & self._tags)
        except ValueError:
            return False

    def check_reachable(self) -> None:
        """One quick request, so an offline machine fails in seconds with a clear message."""
        status, _ = self._get(self.upstream + "pip/", {"Accept": _JSON}, attempts=2, timeout_s=10.0)
        if status != 200:
            raise RegistryUnreachable(f"package index {self.upstream} answered HTTP {status} for the page of pip")

    def page(self, project: str) -> tuple[int, bytes]:
        """The project's index page as JSON, wheels pointing at this index with metadata."""
        project = _normalize(project)
        with self._lock:
            if project in self._pages:
                return self._pages[project]
        status, body = self._get(f"{self.upstream}{project}/", {"Accept": _JSON})
        if status == 200:
            doc = json.loads(body)
            # Wheels this interpreter cannot install are dropped (pip would skip them anyway,
            # after parsing every tag: most of its time on pages such as numpy's).
            doc["files"] = [f for f in doc.get("files", []) if self._installable(f["filename"])]
            for f in doc["files"]:
                sha = (f.get("hashes") or {}).get("sha256")
                if not (sha and f["filename"].endswith(".whl") and f.get("size")):
                    continue  # sdists and unhashed files keep their upstream URL
                with self._lock:
                    self._files[sha] = _File(urllib.parse.urljoin(f"{self.upstream}{project}/", f["url"]), f["size"],
                                             f["filename"])
                f["url"] = f"{self.url}/files/{sha}/{f['filename']}"
                f["core-metadata"] = f["dist-info-metadata"] = True
            body = json.dumps(doc).encode()
        with self._lock:
            self._pages[project] = (status, body)
            self.stats["pages"] += 1
        return status, body

    def metadata(self, sha: str) -> bytes:
        cached = self.cache_dir / f"{sha}.metadata"
        if cached.is_file():
            self.stats["metadata_cached"] += 1
            return cached.read_bytes()
        f = self._files[sha]

        def fetch(start: int, end: int) -> bytes:
            status, body = self._get(f.url, {"Range": f"bytes={start}-{end - 1}"})
            if status == 200 and len(body) == f.size:  # a server that ignores Range
                return body[start:end]
            if status != 206:
                raise OSError(f"HTTP {status} for a range of {f.url}")
            return body

        remote = RemoteZip(f.size, fetch)
        data = wheel_metadata(zipfile.ZipFile(remote))
        tmp = cached.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(cached)
        self.stats["metadata_fetched"] += 1
        self.stats["range_requests"] += remote.requests
        return data

    def prefetch(self, pins: dict[str, str]) -> None:
        """Fetches, in parallel, the pages of ``pins`` (name -> version) and the metadata of
        their wheels for this interpreter: what pip will ask for if the resolution is unchanged."""
        def one(name: str, version: str) -> None:
            status, body = self.page(name)
            if status != 200:
                return
            for f in json.loads(body).get("files", []):
                if not f["filename"].endswith(".whl") or "/files/" not in f["url"]:
                    continue
                if str(_parse_wheel_filename(f["filename"])[1]) == version:
                    self.metadata(f["url"].split("/files/", 1)[1].split("/", 1)[0])

        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            for fut in [pool.submit(one, n, v) for n, v in pins.items()]:
                try:
                    fut.result()
                except (OSError, KeyError, ValueError, zipfile.BadZipFile, RegistryUnreachable):
                    pass  # a hint only: pip asks again and reports what it cannot get

    # -- the loopback server ----------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "MetadataIndex":
        index = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                parts = urllib.parse.urlparse(self.path).path.strip("/").split("/")
                try:
                    if parts[0] == "simple" and len(parts) == 2:
                        status, body = index.page(parts[1])
                        self._send(status, body, _JSON if status == 200 else "text/plain")
                    elif parts[0] == "files" and len(parts) == 3 and parts[2].endswith(".metadata"):
                        self._send(200, index.metadata(parts[1]), "application/octet-stream")
                    elif parts[0] == "files" and len(parts) == 3 and parts[1] in index._files:
                        self.send_response(302)  # the wheel itself: from upstream (never in a dry run)
                        self.send_header("Location", index._files[parts[1]].url)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                    else:
                        self._send(404, b"not found")
                except RegistryUnreachable as e:
                    index.errors.append(str(e))
                    self._send(502, str(e).encode())
                except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
                    self._send(502, f"{type(e).__name__}: {e}".encode())

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="metadata-index", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass(frozen=True)
class Resolution:
    """What pip would install: name -> version, each one's report entry, and the seconds the
    whole resolution took (prefetch included)."""

    versions: dict[str, str]
    entries: dict[str, dict]
    seconds: float

    def requires(self, name: str) -> list[str]:
        return list(self.entries[_normalize(name)]["metadata"].get("requires_dist") or [])


def read_pins(path: str | Path) -> dict[str, str]:
    """``name==version`` lines of a lock file (comments and blanks ignored)."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_normalize(name.split("[")[0])] = version.strip()
    return pins


def _pip_env() -> dict[str, str]:
    """This process's environment without pip configuration (files or variables), except the
    CA bundle, which the network here may need."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CERT"}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def resolver_pip(timeout_s: float = 60.0) -> list[str]:
    """The command that runs pip ``PIP_VERSION``, from its wheel (fetched once into the cache).

    Older pips (23.2, which a Python 3.11 venv starts with) download every resolved wheel
    even in a dry run; newer ones stop at the metadata. Running pip from its wheel leaves the
    environment's own pip alone.
    """
    wheel = _cache_root() / "pip" / f"pip-{PIP_VERSION}-py3-none-any.whl"
    if not wheel.is_file():
        try:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                   "--dest", str(wheel.parent), f"pip=={PIP_VERSION}"],
                                  capture_output=True, text=True, timeout=timeout_s, env=_pip_env())
        except subprocess.TimeoutExpired:
            raise RegistryUnreachable(f"pip {PIP_VERSION} not fetched within {timeout_s:.0f} s") from None
        if proc.returncode != 0 or not wheel.is_file():
            raise RegistryUnreachable(f"cannot fetch pip {PIP_VERSION}: {proc.stderr.strip()[-500:]}")
    return [sys.executable, str(wheel / "pip")]


def _conflict(stderr: str) -> str:
    """pip's own explanation: the ERROR lines and the 'conflict is caused by' block."""
    lines = stderr.splitlines()
    keep = [ln for ln in lines if ln.startswith("ERROR") or "conflict is caused by" in ln
            or re.match(r"\s+(The user requested|\S+ [\w.+!-]+ depends on)", ln)]
    return "\n".join(keep) or "\n".join(lines[-20:])


def resolve(requirement_files: list[str | Path], extra: list[str] = (), lock: str | Path | None = None,
            timeout_s: float = 150.0, index: MetadataIndex | None = None) -> Resolution:
    """Runs ``pip install --dry-run --ignore-installed --report`` over the files and ``extra``
    requirement strings against the loopback index; raises ResolutionError with pip's
    explanation, or RegistryUnreachable."""
    own = index is None
    index = index or MetadataIndex()
    if own:
        index.__enter__()
    t0 = time.perf_counter()
    try:
        index.check_reachable()
        if lock and Path(lock).is_file():
            index.prefetch(read_pins(lock))
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            cmd = resolver_pip() + ["install", "--dry-run", "--ignore-installed", "--progress-bar", "off",
                   "--report", str(report), "--index-url", f"{index.url}/simple/", "--timeout", str(index.timeout_s)]
            for f in requirement_files:
                cmd += ["-r", str(Path(f).resolve())]
            try:
                proc = subprocess.run(cmd + list(extra), capture_output=True, text=True, timeout=timeout_s,
                                      env=_pip_env(), cwd=tmp)
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"pip's resolver did not finish within {timeout_s:.0f} s") from None
            seconds = time.perf_counter() - t0
            if proc.returncode != 0:
                if index.errors:
                    raise RegistryUnreachable(index.errors[0])
                raise ResolutionError(_conflict(proc.stdout + "\n" + proc.stderr))
            entries = {_normalize(e["metadata"]["name"]): e for e in json.loads(report.read_text())["install"]}
    finally:
        if own:
            index.__exit__(None, None, None)
    for e in entries.values():  # report upstream URLs, not the loopback ones
        sha = e["download_info"]["url"].rsplit("/files/", 1)[-1].split("/", 1)[0]
        if sha in index._files:
            e["download_info"]["url"] = index._files[sha].url
    return Resolution({n: e["metadata"]["version"] for n, e in entries.items()}, entries, seconds)


def write_lock(resolution: Resolution, path: str | Path, header: str) -> None:
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [f"{name}=={version}" for name, version in sorted(resolution.versions.items())]
    Path(path).write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-r", dest="files", action="append", required=True, help="requirements file (repeatable)")
    p.add_argument("--lock", help="lock file: prefetch hint; rewritten with the resolution by --write-lock")
    p.add_argument("--write-lock", action="store_true")
    p.add_argument("--timeout", type=float, default=150.0)
    p.add_argument("extra", nargs="*", help="further requirement strings")
    args = p.parse_args(argv)
    try:
        res = resolve(args.files, args.extra, args.lock, args.timeout)
    except (ResolutionError, RegistryUnreachable, TimeoutError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    key = ("torch", "torchvision", "vllm", "onnxruntime-gpu", "transformers", "peft", "trl", "bitsandbytes", "timm")
    print(f"resolved {len(res.versions)} packages in {res.seconds:.1f} s: "
          + ", ".join(f"{k} {res.versions[k]}" for k in key if k in res.versions))
    if args.write_lock and args.lock:
        write_lock(res, args.lock, "What pip's resolver chose for the GPU requirement set (tools/resolve_requirements.py\n"
                   f"{' '.join('-r ' + f for f in args.files)} --lock {args.lock} --write-lock). A record and a\n"
                   "prefetch hint for the resolution test; the installs use requirements/gpu.txt.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
