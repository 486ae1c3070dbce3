"""A real HTTP server on 127.0.0.1 that serves a tiny generated model zoo.

The download tests need the failures real hosts produce (dropped connections,
damaged bytes, 5xx, servers that ignore ``Range``) on demand and counted, so
every knob below arms a fault for a number of responses and every request is
logged with the bytes actually sent.
"""

from __future__ import annotations

import re
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Mapping, Optional

_RANGE_RE = re.compile(r"bytes=(\d+)-(\d*)")
_WRITE_BYTES = 16 * 1024


@dataclass
class Served:
    """One request as the server saw it."""

    method: str
    path: str
    range: Optional[str]
    status: int = 0
    body_bytes: int = 0


def corrupted(data: bytes) -> bytes:
    """The damaged body the server sends when corruption is armed: one byte in the middle flipped."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


class ZooServer:
    """Serve ``files`` (URL path without leading '/' -> bytes) on a random local port.

    Fault knobs, each a count of responses (or bytes) for one path:

    * ``drop_after[path] = n``: the next GET sends headers for the full body,
      then ``n`` body bytes, then cuts the connection (used once).
    * ``corrupt[path] = k``: the next ``k`` GETs carry a damaged body of the right length.
    * ``fail[path] = k``: the next ``k`` GETs answer 500.
    * ``ignore_range``: answer 200 with the whole file even when asked for a range.
    * ``hold``: when set to an Event, bodies wait for it before being sent, so a
      test can keep a download in flight while it checks something.
    """

    def __init__(self, files: Mapping[str, bytes]):
        self.files: Dict[str, bytes] = dict(files)
        self.drop_after: Dict[str, int] = {}
        self.corrupt: Dict[str, int] = {}
        self.fail: Dict[str, int] = {}
        self.ignore_range = False
        self.hold: Optional[threading.Event] = None
        self.log: List[Served] = []
        self.lock = threading.Lock()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server is not running"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def gets(self, path: str) -> List[Served]:
        with self.lock:
            return [r for r in self.log if r.method == "GET" and r.path == path]

    def start(self) -> "ZooServer":
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.zoo = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            if self.hold is not None:
                self.hold.set()
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> "ZooServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _take(self, knob: Dict[str, int], path: str) -> bool:
        with self.lock:
            left = knob.get(path, 0)
            if left > 0:
                knob[path] = left - 1
            return left > 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        zoo: ZooServer = self.server.zoo  # type: ignore[attr-defined]
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        entry = Served("GET", path, self.headers.get("Range"))
        with zoo.lock:
            zoo.log.append(entry)
            drop = zoo.drop_after.pop(path, None)
        if zoo._take(zoo.fail, path):
            return self._empty(entry, 500)
        data = zoo.files.get(path)
        if data is None:
            return self._empty(entry, 404)
        if zoo._take(zoo.corrupt, path):
            data = corrupted(data)
        status, start, end = 200, 0, len(data)
        match = _RANGE_RE.fullmatch(entry.range or "")
        if match and not zoo.ignore_range:
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1, len(data)) if match.group(2) else len(data)
            if start >= len(data):
                return self._empty(entry, 416, {"Content-Range": f"bytes */{len(data)}"})
            status = 206
        body = data[start:end]
        entry.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if zoo.hold is not None:
            zoo.hold.wait(timeout=60)
        if drop is not None:
            body = body[:drop]
        try:
            for i in range(0, len(body), _WRITE_BYTES):
                self.wfile.write(body[i : i + _WRITE_BYTES])
                entry.body_bytes += len(body[i : i + _WRITE_BYTES])
        except (BrokenPipeError, ConnectionResetError):
            return  # the client gave up (e.g. its read timed out); entry shows what it got
        if drop is not None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _empty(self, entry: Served, status: int, headers: Optional[Mapping[str, str]] = None) -> None:
        entry.status = status
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()
