"""A fault-injecting HTTP proxy in front of the local S3, for the soak benchmark.

    python benchmarks/faultproxy.py --upstream http://127.0.0.1:PORT [--port 0] [--seed N]

prints `PORT <n>` once it listens on 127.0.0.1 and serves until its standard input closes (so it
never outlives the process that started it). Every request is forwarded to the upstream as it came
(method, path and query, headers including `Host`, body); the response goes back with its status and
headers in order, except that `x-amz-checksum-*` headers are dropped (most objects in the DANDI archive
carry no stored checksum, so the client's own MD5 check, not botocore's, must catch damage) and the
hop-by-hop headers (`Connection`, `Keep-Alive`, `Transfer-Encoding`) are not passed on: bodies are
buffered and sent with a `Content-Length`. The proxy keeps one upstream connection per client
connection.

Faults are switched at run time through a control endpoint that is never forwarded:

    POST /__faults  {"slowdown": 0.3, "reset": 0.1, "truncate": 0.1, "flip": 0.2,
                     "slow": 0.2, "slow_delay": 2.0}      -> the new settings
    POST /__faults  {}                                    -> no faults
    GET  /__faults                                        -> the current settings
    GET  /__stats                                         -> counters (JSON)

Each proxied request draws at most one fault, with the given probabilities (their sum is at most 1):

- `slowdown`: not forwarded; answered `503 SlowDown` with the XML error body S3 sends.
- `reset`: not forwarded; the connection is reset (RST, no response at all).
- `truncate`: forwarded; the status line, the headers with the full `Content-Length` and a random
  part of the body are sent, then the connection is closed.
- `slow`: forwarded; `slow_delay` seconds pass before the response starts, or (half of the time) in
  the middle of its body.
- `flip`: forwarded; one byte of a non-empty 2xx body is XOR-ed with a random non-zero value.

`GET /__stats` returns `requests` (proxied), `bytes_sent` (body bytes written to clients, fault bodies
included), `faults` (by kind: what was really done; a `flip` or `truncate` drawn for an empty body
counts as nothing), `status` (responses by status code), `upstream_errors`, `connections_open` and
`connections_total` (client connections), and the current `config`.

Threads: one per client connection (`ThreadingHTTPServer`); counters and settings are guarded by one
lock. The process runs nothing else, so a client that blocks its own GIL cannot stall it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

#: Fault kinds, in the order a request's draw tests them.
FAULT_KINDS = ("slowdown", "reset", "truncate", "slow", "flip")
#: Response headers never passed on (hop-by-hop; bodies are re-sent with a Content-Length).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})
#: Seconds to wait for the upstream (a moto server on this machine).
UPSTREAM_TIMEOUT = 120.0
SLOWDOWN_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    "<Message>Please reduce your request rate.</Message><RequestId>{rid}</RequestId>"
    "<HostId>faultproxy</HostId></Error>"
)


@dataclass
class Faults:
    """The current fault settings: a probability per kind, and the delay of `slow`."""

    probabilities: dict[str, float] = field(default_factory=dict)
    slow_delay: float = 2.0

    @classmethod
    def parse(cls, doc: object) -> Faults:
        if not isinstance(doc, dict):
            raise ValueError("expected a JSON object")
        probabilities: dict[str, float] = {}
        delay = 2.0
        for name, value in doc.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: expected a non-negative number, got {value!r}")
            if name == "slow_delay":
                delay = float(value)
            elif name in FAULT_KINDS:
                probabilities[name] = float(value)
            else:
                raise ValueError(f"unknown setting {name!r} (kinds: {', '.join(FAULT_KINDS)})")
        if sum(probabilities.values()) > 1.0 + 1e-9:
            raise ValueError("the probabilities add up to more than 1")
        return cls(probabilities, delay)

    def as_json(self) -> dict[str, float]:
        return {**self.probabilities, "slow_delay": self.slow_delay}

    def draw(self, rng: random.Random) -> str | None:
        u = rng.random()
        for kind in FAULT_KINDS:
            p = self.probabilities.get(kind, 0.0)
            if u < p:
                return kind
            u -= p
        return None


class State:
    """Settings and counters shared by all connection threads."""

    def __init__(self, upstream: str, seed: int | None) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self.faults = Faults()
        self.requests = 0
        self.bytes_sent = 0
        self.injected: Counter[str] = Counter()
        self.status: Counter[int] = Counter()
        self.upstream_errors = 0
        self.connections_open = 0
        self.connections_total = 0

    def draw(self) -> tuple[str | None, float, random.Random]:
        """Count a request, draw its fault; also a private RNG for the fault's details."""
        with self.lock:
            self.requests += 1
            return (
                self.faults.draw(self.rng),
                self.faults.slow_delay,
                random.Random(self.rng.getrandbits(64)),
            )

    def count(self, *, sent: int = 0, fault: str | None = None, status: int | None = None) -> None:
        with self.lock:
            self.bytes_sent += sent
            if fault is not None:
                self.injected[fault] += 1
            if status is not None:
                self.status[status] += 1

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "bytes_sent": self.bytes_sent,
                "faults": {kind: self.injected[kind] for kind in FAULT_KINDS},
                "status": {str(k): v for k, v in sorted(self.status.items())},
                "upstream_errors": self.upstream_errors,
                "connections_open": self.connections_open,
                "connections_total": self.connections_total,
                "config": self.faults.as_json(),
            }


class Handler(BaseHTTPRequestHandler):
    """One client connection: forwards its requests one after another, injecting faults."""

    protocol_version = "HTTP/1.1"
    server: ProxyServer

    def setup(self) -> None:
        super().setup()
        self.upstream: http.client.HTTPConnection | None = None
        with self.server.state.lock:
            self.server.state.connections_open += 1
            self.server.state.connections_total += 1

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self.upstream is not None:
                self.upstream.close()
            with self.server.state.lock:
                self.server.state.connections_open -= 1

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        self.route("GET")

    def do_HEAD(self) -> None:
        self.route("HEAD")

    def do_PUT(self) -> None:
        self.route("PUT")

    def do_POST(self) -> None:
        self.route("POST")

    def do_DELETE(self) -> None:
        self.route("DELETE")

    # --- control endpoint ---------------------------------------------------------------------

    def route(self, method: str) -> None:
        path = urlsplit(self.path).path
        if path == "/__stats" and method == "GET":
            self.reply_json(200, self.server.state.stats())
        elif path == "/__faults" and method == "GET":
            with self.server.state.lock:
                self.reply_json(200, self.server.state.faults.as_json())
        elif path == "/__faults" and method == "POST":
            try:
                faults = Faults.parse(json.loads(self.read_body() or b"{}"))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                self.reply_json(400, {"error": str(e)})
                return
            with self.server.state.lock:
                self.server.state.faults = faults
            self.reply_json(200, faults.as_json())
        else:
            self.forward(method)

    def reply_json(self, status: int, doc: object) -> None:
        body = json.dumps(doc).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    # --- forwarding ---------------------------------------------------------------------------

    def forward(self, method: str) -> None:
        state = self.server.state
        body = self.read_body()
        fault, delay, rng = state.draw()
        if fault == "reset":
            state.count(fault="reset")
            self.reset()
            return
        if fault == "slowdown":
            self.slowdown()
            state.count(fault="slowdown", status=503)
            return
        try:
            response, data = self.ask_upstream(method, body)
        except OSError as e:
            with state.lock:
                state.upstream_errors += 1
            self.reply_json(502, {"error": f"upstream: {e}"})
            return
        headers = [
            (k, v)
            for k, v in response.getheaders()
            if k.lower() not in HOP_BY_HOP and not k.lower().startswith("x-amz-checksum")
        ]
        length = response.getheader("Content-Length")
        if method == "HEAD" and length is not None:
            headers.append(("Content-Length", length))
        elif method != "HEAD":
            headers.append(("Content-Length", str(len(data))))
        if fault == "flip" and data and 200 <= response.status < 300:
            at = rng.randrange(len(data))
            data = data[:at] + bytes([data[at] ^ rng.randrange(1, 256)]) + data[at + 1 :]
            state.count(fault="flip")
        stall_at: int | None = None
        if fault == "slow":
            state.count(fault="slow")
            if data and rng.random() < 0.5:
                stall_at = rng.randrange(1, len(data)) if len(data) > 1 else 0
            else:
                time.sleep(delay)
        cut: int | None = None
        if fault == "truncate" and data:
            cut = rng.randrange(len(data))  # 0 .. len-1 bytes of the body are sent
            state.count(fault="truncate")
        self.send_response_only(response.status, response.reason)
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        if cut is not None:
            self.wfile.write(data[:cut])
            self.wfile.flush()
            state.count(sent=cut, status=response.status)
            self.close_connection = True
            return
        if stall_at is not None:
            self.wfile.write(data[:stall_at])
            self.wfile.flush()
            time.sleep(delay)
            data = data[stall_at:]
            state.count(sent=stall_at)
        self.wfile.write(data)
        state.count(sent=len(data), status=response.status)

    def ask_upstream(self, method: str, body: bytes) -> tuple[http.client.HTTPResponse, bytes]:
        """The upstream's response and its whole body; one fresh connection is tried when the kept
        one turns out to be closed."""
        state = self.server.state
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body:
            headers["Content-Length"] = str(len(body))
        for fresh in (False, True):
            if self.upstream is None or fresh:
                if self.upstream is not None:
                    self.upstream.close()
                self.upstream = http.client.HTTPConnection(
                    state.host, state.port, timeout=UPSTREAM_TIMEOUT
                )
            try:
                self.upstream.request(method, self.path, body=body or None, headers=headers)
                response = self.upstream.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if fresh:
                    raise
                continue
            if response.will_close:
                self.upstream.close()
                self.upstream = None
            return response, data
        raise AssertionError("unreachable")

    def reset(self) -> None:
        """Close the client connection with a RST, without a response."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def slowdown(self) -> None:
        body = SLOWDOWN_BODY.format(rid=uuid.uuid4().hex[:16].upper()).encode()
        self.send_response_only(503, "Slow Down")
        self.send_header("x-amz-request-id", uuid.uuid4().hex[:16].upper())
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Date", formatdate(usegmt=True))
        self.end_headers()
        self.wfile.write(body)
        self.server.state.count(sent=len(body))


class ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, port: int, state: State) -> None:
        self.state = state
        super().__init__(("127.0.0.1", port), Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that went away mid-response (it timed out, or we reset it) is not news
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT of the S3")
    parser.add_argument("--port", type=int, default=0, help="listen port on 127.0.0.1 (0: free)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the fault draws")
    args = parser.parse_args(argv)
    server = ProxyServer(args.port, State(args.upstream, args.seed))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print(f"PORT {server.server_address[1]}", flush=True)
    sys.stdin.read()  # returns when the parent closes our stdin or dies
    server.shutdown()


if __name__ == "__main__":
    main()
