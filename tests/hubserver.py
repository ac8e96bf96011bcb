"""The few Hugging Face Hub routes HfFileSystem calls, served from a local folder (one model repo
per folder, one revision): repo info, tree listing, paths-info, and resolve with Range. Enough
for huggingface_hub's own client to read files through HF_ENDPOINT; not a Hub."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubServer:
    def __init__(self, repos: dict[str, Path]):
        self.repos = repos  # "org/name" -> folder
        self.log: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_GET(self):
                hub._route(self, "GET")

            def do_HEAD(self):
                hub._route(self, "HEAD")

            def do_POST(self):
                hub._route(self, "POST")

        class Quiet(http.server.ThreadingHTTPServer):
            request_queue_size = 128  # 16 shard requests connect at once (socketserver's 5 drops SYNs)

            def handle_error(self, request, client_address):
                pass

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- routes ----------------------------------------------------------------------------------
    def _entry(self, folder: Path, p: Path) -> dict:
        rel = p.relative_to(folder).as_posix()
        if p.is_dir():
            return {"type": "directory", "oid": hashlib.sha1(rel.encode()).hexdigest(), "size": 0, "path": rel}
        data = p.read_bytes()
        return {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": rel}

    def _json(self, h, doc, status: int = 200, head: bool = False) -> None:
        body = json.dumps(doc).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.send_header("X-Repo-Commit", COMMIT)
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _missing(self, h, what: str = "RepoNotFound") -> None:
        h.send_response(404)
        body = json.dumps({"error": "not found"}).encode()
        h.send_header("X-Error-Code", what)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _route(self, h, method: str) -> None:
        parts = urlsplit(h.path)
        path = unquote(parts.path)
        self.log.append(f"{method} {path}")
        if method == "POST":
            n = int(h.headers.get("Content-Length") or 0)
            h.rfile.read(n)
        segs = path.strip("/").split("/")
        if segs[:2] == ["api", "models"] and len(segs) >= 4:
            repo = "/".join(segs[2:4])
            folder = self.repos.get(repo)
            if folder is None:
                return self._missing(h)
            rest = segs[4:]
            if not rest or rest[0] == "revision":
                files = [self._entry(folder, p) for p in sorted(folder.rglob("*")) if p.is_file()]
                doc = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                       "siblings": [{"rfilename": f["path"]} for f in files]}  # fmt: skip
                return self._json(h, doc, head=method == "HEAD")
            if rest[0] == "tree" and len(rest) >= 2:
                sub = "/".join(rest[2:])
                target = folder / sub if sub else folder
                if not target.is_dir():
                    return self._missing(h, "EntryNotFound")
                return self._json(h, [self._entry(folder, p) for p in sorted(target.iterdir())])
            if rest[0] == "paths-info":
                # the form body names paths; answer for every file (the client filters)
                return self._json(h, [self._entry(folder, p) for p in sorted(folder.rglob("*"))])
            return self._missing(h)
        if len(segs) >= 5 and segs[2] == "resolve":
            repo = "/".join(segs[:2])
            folder = self.repos.get(repo)
            target = folder / "/".join(segs[4:]) if folder else None
            if target is None or not target.is_file():
                return self._missing(h, "EntryNotFound")
            data = target.read_bytes()
            etag = '"' + hashlib.sha1(data).hexdigest() + '"'
            rng = h.headers.get("Range") or h.headers.get("range")
            first, last = 0, len(data) - 1
            status = 200
            if rng:
                a, _, b = rng.removeprefix("bytes=").partition("-")
                first, last = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
                status = 206
            body = data[first : last + 1]
            h.send_response(status)
            h.send_header("Content-Length", str(len(body)))
            h.send_header("ETag", etag)
            h.send_header("X-Repo-Commit", COMMIT)
            if status == 206:
                h.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
            h.end_headers()
            if method != "HEAD":
                h.wfile.write(body)
            return None
        return self._missing(h)
