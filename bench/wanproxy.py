"""WAN emulator: a loopback HTTP/1.1 reverse proxy in front of a registry (stdlib only).

Clients talk to 127.0.0.1:PORT as if it were the registry (plain HTTP, keep-alive).
Per request: RTT/2 before it is forwarded and RTT/2 before the response is returned;
per new client connection: one more RTT (the TCP handshake). Response bodies go through
a token bucket shared by all connections (bandwidth cap). One upstream connection per
client connection. Counts requests, new connections and response body bytes, and logs
every request (method, path, Range, status, bytes, connection).

In-process:  p = WanProxy("127.0.0.1:5000", rtt=0.025, mbit=100); p.start(); p.port
             p.stats.snapshot(); p.stats.reset(); p.configure(rtt, mbit); p.stop()
Over HTTP:   GET /__stats (JSON), GET /__reset, GET /__config?rtt_ms=25&mbit=100
Standalone:  python3 wanproxy.py UPSTREAM_HOST:PORT [--port N] [--rtt-ms 25] [--mbit 100]
"""
import argparse
import http.client
import json
import socket
import socketserver
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
              "upgrade", "proxy-authenticate", "proxy-authorization"}
BUF = 64 * 1024


class Stats(object):
    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        with self.lock:
            self.requests, self.connections, self.bytes, self.log = 0, 0, 0, []

    def new_connection(self):
        with self.lock:
            self.connections += 1
            return self.connections

    def request(self, record):
        with self.lock:
            self.requests += 1
            self.log.append(record)

    def add_bytes(self, record, n):
        with self.lock:
            self.bytes += n
            record["bytes"] += n

    def snapshot(self):
        with self.lock:
            return {"requests": self.requests, "connections": self.connections, "bytes": self.bytes,
                    "log": [dict(r) for r in self.log]}


class Shaper(object):
    """Shared token bucket as a virtual clock: n bytes may leave at max(now, t) + n/rate."""

    def __init__(self):
        self.lock = threading.Lock()
        self.configure(0.0, None)

    def configure(self, rtt, mbit):
        with self.lock:
            self.rtt, self.rate, self.t = rtt, (mbit * 1e6 / 8 if mbit else None), 0.0

    def delay(self, seconds):
        if seconds > 0:
            time.sleep(seconds)

    def take(self, n):
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            self.t = max(now, self.t) + n / self.rate
            wake = self.t
        self.delay(wake - time.monotonic())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "wanproxy"

    def setup(self):
        BaseHTTPRequestHandler.setup(self)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn_id = self.server.stats.new_connection()
        self.upstream = None
        self.server.shaper.delay(self.server.shaper.rtt)   # TCP handshake

    def finish(self):
        if self.upstream is not None:
            self.upstream.close()
        BaseHTTPRequestHandler.finish(self)

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.forward()
    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _control(self):
        u = urllib.parse.urlsplit(self.path)
        if u.path == "/__reset":
            self.server.stats.reset()
            body = b"{}"
        elif u.path == "/__config":
            q = urllib.parse.parse_qs(u.query)
            self.server.shaper.configure(float(q.get("rtt_ms", ["0"])[0]) / 1000.0,
                                         float(q.get("mbit", ["0"])[0]) or None)
            body = b"{}"
        else:
            body = json.dumps(self.server.stats.snapshot()).encode()
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                         % len(body) + body)

    def _send_upstream(self, method, body, headers):
        for attempt in (0, 1):
            if self.upstream is None:
                self.upstream = http.client.HTTPConnection(self.server.upstream, timeout=120)
            try:
                self.upstream.request(method, self.path, body=body, headers=headers)
                return self.upstream.getresponse()
            except (http.client.HTTPException, OSError):
                self.upstream.close()
                self.upstream = None
                if attempt:
                    raise

    def forward(self):
        if self.path.startswith("/__"):
            return self._control()
        shaper, stats = self.server.shaper, self.server.stats
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        record = {"conn": self.conn_id, "method": self.command, "path": self.path,
                  "range": self.headers.get("Range"), "status": None, "bytes": 0, "t": time.time()}
        stats.request(record)
        headers = {}
        for k, v in self.headers.items():        # repeated fields (Go sends one Accept per type): joined
            if k.lower() not in HOP_BY_HOP:
                headers[k] = headers[k] + ", " + v if k in headers else v
        shaper.delay(shaper.rtt / 2)
        try:
            resp = self._send_upstream(self.command, body, headers)
        except (http.client.HTTPException, OSError) as e:
            record["status"] = 502
            msg = ("upstream: %s" % e).encode()
            self.wfile.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                             % len(msg) + msg)
            self.close_connection = True
            return
        record["status"] = resp.status
        out = [k + ": " + v for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
        no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        chunked = resp.chunked or (resp.length is None and not no_body)
        data = resp.read() if chunked else None      # small non-Content-Length bodies: buffer
        if chunked:
            out = [h for h in out if not h.lower().startswith("content-length:")]
            out.append("Content-Length: %d" % len(data))
        if resp.will_close:
            self.close_connection = True
        shaper.delay(shaper.rtt / 2)
        head = ("HTTP/1.1 %d %s\r\n" % (resp.status, resp.reason) + "".join(h + "\r\n" for h in out)
                + ("Connection: close\r\n" if self.close_connection else "") + "\r\n").encode("latin-1")
        self.wfile.write(head)
        if no_body:
            resp.read()
        elif data is not None:
            self._send(data, record)
        else:
            while True:
                try:
                    piece = resp.read1(BUF) if hasattr(resp, "read1") else resp.read(BUF)
                except http.client.IncompleteRead as e:   # distribution's 416: wrong Content-Length
                    piece = e.partial
                    self.close_connection = True
                if not piece:
                    break
                self._send(piece, record)
            if resp.length:                               # upstream sent less than announced
                self.close_connection = True
        if self.close_connection and self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    def _send(self, data, record):
        view = memoryview(data)
        for i in range(0, len(view), BUF):
            piece = view[i:i + BUF]
            self.server.shaper.take(len(piece))
            # counted before the write: a fast client (curl) can read the last piece and exit,
            # and the bench read the stats, before this thread gets to count it
            self.server.stats.add_bytes(record, len(piece))
            self.wfile.write(piece)


class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class WanProxy(object):
    def __init__(self, upstream, rtt=0.0, mbit=None, port=0):
        self.server = Server(("127.0.0.1", port), Handler)
        self.server.upstream = upstream
        self.server.stats = self.stats = Stats()
        self.server.shaper = self.shaper = Shaper()
        self.shaper.configure(rtt, mbit)
        self.port = self.server.server_address[1]
        self.thread = None

    def configure(self, rtt, mbit):
        self.shaper.configure(rtt, mbit)

    def start(self):
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def main():
    ap = argparse.ArgumentParser(description="WAN-emulating reverse proxy for a registry")
    ap.add_argument("upstream", help="HOST:PORT of the registry")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--rtt-ms", type=float, default=0.0)
    ap.add_argument("--mbit", type=float, default=0.0, help="bandwidth cap, 0 = none")
    a = ap.parse_args()
    p = WanProxy(a.upstream, a.rtt_ms / 1000.0, a.mbit or None, a.port)
    print("PROXY_ADDR=127.0.0.1:%d" % p.port, flush=True)
    try:
        p.server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
