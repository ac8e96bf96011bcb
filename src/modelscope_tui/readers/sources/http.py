"""https:// and http:// byte ranges with the standard library.

fsspec's HTTP filesystem hides what must be checked on every response here: it follows
redirects to any host, does not compare Content-Range with the range asked for, and does not
watch the ETag between requests. A range reader needs all three, and http.client gives them
with no extra dependency (https works without the `remote` extra).
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urljoin, urlsplit

from ...errors import CorruptCheckpointError, MscopeError, NotFoundError
from .base import READ_AHEAD, CachedRemote, changed
from .location import redact

MAX_REDIRECTS = 5
CONCURRENCY = 8
_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED = re.compile(r"^bytes \*/(\d+)$")


DOWNLOAD = False  # `--download` (cli): a server without range support sends the file whole (set while its command runs)
DEFAULT_MAX_DOWNLOAD = 2 << 30


def max_download() -> int:
    """MSCOPE_MAX_DOWNLOAD in bytes (a plain number, or with K/M/G/T), default 2 GiB."""
    raw = os.environ.get("MSCOPE_MAX_DOWNLOAD", "").strip().upper().removesuffix("B").removesuffix("I")
    if not raw:
        return DEFAULT_MAX_DOWNLOAD
    scale = 1
    if raw[-1:] in "KMGT":
        scale = 1 << (10 * ("KMGT".index(raw[-1]) + 1))
        raw = raw[:-1]
    try:
        return max(0, int(float(raw) * scale))
    except ValueError:
        return DEFAULT_MAX_DOWNLOAD


def timeout_s() -> float:
    try:
        return max(0.1, float(os.environ.get("MSCOPE_TIMEOUT", "30")))
    except ValueError:
        return 30.0


class RemoteError(MscopeError):
    """The server or the network failed a read (status, timeout, a response that does not add up).
    `unreachable`: no answer at all (DNS, refused, timeout): the metadata cache may stand in."""

    unreachable = False


class HttpSource(CachedRemote):
    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.name = redact(url)
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self.size = -1
        self.etag = None
        self.downloaded: str | None = None  # --download: the whole file, in the cache folder
        self._download_lock = threading.Lock()
        from . import cache

        entry = cache.load(url)
        if entry is not None:
            try:
                self._get(0, 0, head=True)  # the identity check: HEAD, no body
            except RemoteError as exc:
                if not exc.unreachable:
                    raise
                self.size, self.etag, self.offline = entry.size, entry.etag, True
            if (self.size, self.etag) == (entry.size, entry.etag):
                self.preload(entry)
                return
        first = self._get(0, READ_AHEAD - 1, probe=True)
        if self.size > 0:
            self._keep(0, first)

    # -- one request -----------------------------------------------------------------------------
    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get((scheme, netloc))
        if conn is None:
            if scheme == "https":
                conn = http.client.HTTPSConnection(
                    netloc, timeout=timeout_s(), context=ssl.create_default_context()
                )
            else:
                conn = http.client.HTTPConnection(netloc, timeout=timeout_s())
            conns[(scheme, netloc)] = conn
        return conn

    def _drop(self, scheme: str, netloc: str) -> None:
        conn = getattr(self._local, "conns", {}).pop((scheme, netloc), None)
        if conn is not None:
            conn.close()

    def _fail(self, message: str, hint: str | None = None, unreachable: bool = False) -> RemoteError:
        exc = RemoteError(message, self.name, hint)
        exc.unreachable = unreachable
        return exc

    def _head(self, resp: http.client.HTTPResponse) -> bytes:
        resp.read()
        if resp.status in (401, 403):
            raise self._fail(f"access denied (HTTP {resp.status})", "check the URL's token or credentials")
        if resp.status == 404:
            raise NotFoundError("no such file on the server (HTTP 404)", self.name)
        length = resp.getheader("Content-Length")
        if resp.status != 200 or length is None or not length.isdigit():
            self.size, self.etag = -1, None  # no usable identity: the cache is not used
            return b""
        self.size, self.etag = int(length), resp.getheader("ETag")
        self.count(0)
        return b""

    def _get(self, first: int, last: int, probe: bool = False, head: bool = False) -> bytes:
        """Bytes first..last (inclusive) of the file, every response header checked. `head`:
        a HEAD request that only learns the size and ETag (the cache's identity check)."""
        url = self.url
        origin = urlsplit(url)
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            target = parts.path or "/"
            if parts.query:
                target += "?" + parts.query
            try:
                conn = self._connection(parts.scheme, parts.netloc)
                if head:
                    conn.request("HEAD", target, headers={"Accept-Encoding": "identity"})
                else:
                    conn.request(
                        "GET",
                        target,
                        headers={"Range": f"bytes={first}-{last}", "Accept-Encoding": "identity"},
                    )
                resp = conn.getresponse()
                status = resp.status
                if status in (301, 302, 303, 307, 308):
                    location = resp.getheader("Location") or ""
                    resp.read()
                    nxt = urljoin(url, location)
                    if urlsplit(nxt).netloc != origin.netloc or urlsplit(nxt).scheme not in (
                        "http",
                        "https",
                    ):
                        self._drop(parts.scheme, parts.netloc)
                        raise self._fail(
                            f"the server redirects to another host ({redact(nxt)[:120]}); mscope does not follow it",
                            "open the final URL directly if you trust it",
                        )
                    url = nxt
                    continue
                if head:
                    return self._head(resp)
                return self._body(resp, first, last, probe)
            except MscopeError:
                self._drop(parts.scheme, parts.netloc)
                raise
            except TimeoutError as exc:
                self._drop(parts.scheme, parts.netloc)
                raise self._fail(
                    f"no answer within {timeout_s():g} s",
                    "check the network, or set MSCOPE_TIMEOUT",
                    unreachable=True,
                ) from exc
            except socket.gaierror as exc:
                self._drop(parts.scheme, parts.netloc)
                raise self._fail(
                    f"cannot resolve host {parts.hostname!r}", "check the URL and the network", True
                ) from exc
            except ConnectionRefusedError as exc:
                self._drop(parts.scheme, parts.netloc)
                raise self._fail("the connection was refused", "check the URL and the network", True) from exc
            except http.client.IncompleteRead as exc:
                self._drop(parts.scheme, parts.netloc)
                raise self._fail(
                    f"the response was cut short ({len(exc.partial):,} of {last - first + 1:,} bytes)",
                    "try again",
                ) from exc
            except (OSError, http.client.HTTPException) as exc:
                self._drop(parts.scheme, parts.netloc)
                raise self._fail(f"cannot read: {type(exc).__name__}: {str(exc)[:120]}") from exc
        raise self._fail(f"more than {MAX_REDIRECTS} redirects")

    def _body(self, resp: http.client.HTTPResponse, first: int, last: int, probe: bool) -> bytes:
        status = resp.status
        if status in (401, 403):
            resp.read()
            raise self._fail(
                f"access denied (HTTP {status})", "check the URL's token or credentials"
            )
        if status == 404:
            resp.read()
            raise NotFoundError("no such file on the server (HTTP 404)", self.name)
        if status == 416 and probe:
            m = _UNSATISFIED.match(resp.getheader("Content-Range") or "")
            resp.read()
            if m and int(m.group(1)) == 0:
                self.size = 0
                return b""
            raise self._fail("the server refused the first range request (HTTP 416)")
        if status == 200:
            if DOWNLOAD:
                return self._download(resp, first, last, probe)
            # The whole file is coming: stop it (a 100 GB body must not be read to learn this).
            resp.close()
            raise self._fail(
                "the server does not support range requests (it answered 200 to a Range request)",
                "pass --download to fetch it whole (up to MSCOPE_MAX_DOWNLOAD, default 2 GiB), "
                "or download it and open the local copy",
            )
        if status != 206:
            resp.read()
            raise self._fail(f"the server answered HTTP {status} {resp.reason}")
        content_range = resp.getheader("Content-Range") or ""
        m = _RANGE.match(content_range.strip())
        if not m:
            resp.close()
            raise self._fail(
                f"the server's Content-Range {content_range[:60]!r} is not a byte range"
            )
        got_first, got_last = int(m.group(1)), int(m.group(2))
        total = int(m.group(3)) if m.group(3) != "*" else None
        etag = resp.getheader("ETag")
        if probe:
            if total is None:
                resp.close()
                raise self._fail("the server does not say the file's size (Content-Range */*)")
            self.size, self.etag = total, etag
            last = min(last, total - 1)
        elif total is not None and total != self.size:
            resp.close()
            raise self._changed(f"its size went from {self.size:,} to {total:,} bytes")
        elif etag != self.etag:
            resp.close()
            raise self._changed("its ETag changed")
        if (got_first, got_last) != (first, last):
            resp.close()
            raise self._fail(
                f"the server sent bytes {got_first:,}-{got_last:,} for a request of {first:,}-{last:,} (wrong Content-Range)"
            )
        want = last - first + 1
        data = resp.read(want)
        if len(data) != want:
            resp.close()
            raise self._fail(
                f"the response was cut short ({len(data):,} of {want:,} bytes)", "try again"
            )
        if resp.read(1):  # more than Content-Range says: the length lies
            resp.close()
            raise self._fail(
                "the response is longer than its Content-Range (a lying Content-Length)"
            )
        self.count(len(data))
        return data

    def _changed(self, what: str) -> CorruptCheckpointError:
        return changed(self.name, what)

    # -- --download: a server without range support ----------------------------------------------
    def _download(self, resp: http.client.HTTPResponse, first: int, last: int, probe: bool) -> bytes:
        """The 200 response's whole body into the cache folder (refused past max_download(),
        written to a temp file and renamed, so a cut transfer leaves nothing), then the range
        asked for from that file; later ranges read the file, not the network."""
        with self._download_lock:
            if self.downloaded is None:
                self._save_body(resp)
            else:
                resp.close()
        if probe:
            last = min(last, self.size - 1)
        return self._read_downloaded(first, last - first + 1) if last >= first else b""

    def _save_body(self, resp: http.client.HTTPResponse) -> None:
        import tempfile

        from . import cache

        limit = max_download()
        length = resp.getheader("Content-Length")
        size = int(length) if length and length.isdigit() else None
        etag = resp.getheader("ETag")
        if size is not None and size > limit:
            resp.close()
            raise self._fail(
                f"the server does not support range requests and the file is {size:,} bytes, "
                f"more than the {limit:,} bytes --download fetches (MSCOPE_MAX_DOWNLOAD)",
                "raise it, or download the file yourself",
            )
        if self.size >= 0 and size is not None and size != self.size:
            resp.close()
            raise self._changed(f"its size went from {self.size:,} to {size:,} bytes")
        folder = cache.cache_dir().parent / "downloads"
        folder.mkdir(parents=True, exist_ok=True)
        import hashlib

        final = folder / hashlib.sha256(self.url.encode()).hexdigest()[:40]
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-")
        got = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                while block := resp.read(1 << 20):
                    got += len(block)
                    if got > limit:
                        resp.close()
                        raise self._fail(
                            f"the server does not support range requests and sent more than the "
                            f"{limit:,} bytes --download fetches (MSCOPE_MAX_DOWNLOAD)",
                            "raise it, or download the file yourself",
                        )
                    fh.write(block)
            if size is not None and got != size:
                raise self._fail(f"the response was cut short ({got:,} of {size:,} bytes)", "try again")
            os.replace(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self.size, self.etag, self.downloaded = got, etag, str(final)
        self.count(got)

    def _read_downloaded(self, offset: int, length: int) -> bytes:
        assert self.downloaded is not None
        with open(self.downloaded, "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        if len(data) != length:
            raise self._fail(f"the downloaded copy at {self.downloaded} is shorter than the file", "open it again")
        return data

    # -- several -------------------------------------------------------------------------------
    def _fetch(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        if self.downloaded is not None:
            return [self._read_downloaded(o, n) for o, n in ranges]
        if len(ranges) == 1:
            o, n = ranges[0]
            return [self._get(o, o + n - 1)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="mscope-http")
        return list(self._pool.map(lambda r: self._get(r[0], r[0] + r[1] - 1), ranges))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
