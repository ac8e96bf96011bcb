"""A real HTTP server with Range support for the remote tests: serves a folder, counts requests
and bytes, and can be told to misbehave (latency, no ranges, truncated bodies, wrong
Content-Range, lying Content-Length, redirects to another host, an ETag that changes)."""

from __future__ import annotations

import http.server
import os
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit


class RangeServer:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.requests = 0
        self.bytes = 0
        self.log: list[tuple[str, str]] = []  # (path, Range header)
        self.latency = 0.0
        self.in_flight = 0
        self.max_in_flight = 0  # most requests served at once (concurrent fetches show here)
        self.fault: str | None = (
            None  # no-range | truncate | wrong-range | long-length | redirect-away | etag-change
        )
        self.fault_after = 1  # requests served right before a fault starts
        self.redirect_to = "http://127.0.0.2:9/elsewhere"
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # like real servers: no 40 ms delayed-ACK stalls

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    server._serve(self)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def do_HEAD(self):
                server._serve(self, head=True)

        class Quiet(http.server.ThreadingHTTPServer):
            request_queue_size = 128  # 16 shard requests connect at once (socketserver's 5 drops SYNs)

            def handle_error(self, request, client_address):  # a client hanging up mid-body
                pass

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.bytes = 0
            self.max_in_flight = 0
            self.log.clear()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _serve(self, h: http.server.BaseHTTPRequestHandler, head: bool = False) -> None:
        rel = unquote(urlsplit(h.path).path).lstrip("/")
        rng = h.headers.get("Range", "")
        with self._lock:
            self.requests += 1
            self.log.append((rel, rng))
            count = self.requests
        if self.latency:
            time.sleep(self.latency)
        if self.fault == "redirect-away":
            h.send_response(302)
            h.send_header("Location", self.redirect_to)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        path = (self.root / rel).resolve()
        if not str(path).startswith(str(self.root.resolve())) or not path.is_file():
            body = b"not found"
            h.send_response(404)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        st = os.stat(path)
        size = st.st_size
        etag = f'"{st.st_mtime_ns}-{size}"'
        late = count > self.fault_after
        if self.fault == "etag-change" and late:
            etag = f'"changed-{count}"'
        if not rng or self.fault == "no-range":
            h.send_response(200)
            h.send_header("Content-Length", str(size))
            h.send_header("ETag", etag)
            h.end_headers()
            if not head:
                try:
                    with open(path, "rb") as fh:
                        while block := fh.read(1 << 20):
                            h.wfile.write(block)
                except (BrokenPipeError, ConnectionResetError):
                    pass
            return
        first_s, _, last_s = rng.removeprefix("bytes=").partition("-")
        first = int(first_s)
        last = min(int(last_s) if last_s else size - 1, size - 1)
        if first >= size:
            h.send_response(416)
            h.send_header("Content-Range", f"bytes */{size}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        with open(path, "rb") as fh:  # only the range: benchmark files are gigabytes
            fh.seek(first)
            body = fh.read(last + 1 - first)
        shown_first, shown_last = first, last
        if self.fault == "wrong-range":
            shown_first, shown_last = first + 16, last + 16  # claims another range than asked
        length = len(body)
        if self.fault == "truncate" and late:
            body = body[: len(body) // 2]
        if self.fault == "long-length" and late:
            length += 100
        h.send_response(206)
        h.send_header("Content-Range", f"bytes {shown_first}-{shown_last}/{size}")
        h.send_header("Content-Length", str(length))
        h.send_header("ETag", etag)
        if self.fault == "truncate" and late:
            h.send_header("Connection", "close")
        h.end_headers()
        if not head:
            with self._lock:  # counted before the client can see the body (and reset())
                self.bytes += len(body)
            h.wfile.write(body)
        if self.fault == "truncate" and late:
            h.close_connection = True
