# SPDX-License-Identifier: Apache-2.0
# Copyright The starget authors.
"""Reliability tests for starget: faults on the wire, resume, hostile images,
property-based parsing, secrets.

Sections:
  1. fault injection: a small threaded HTTP reverse proxy (FaultProxy, below) in
     front of the REAL registry breaks chosen requests (reset, truncation, a flipped
     byte, 429/503 + Retry-After, 500 bursts, stalls, 200-for-Range, 416, redirects);
  2. resume: an interrupted `get` (kill -9, SIGINT) leaves `.partial` files only, and
     the next run finishes without fetching verified chunks again;
  3. hostile images: the `basic` fixture's TOC rewritten (bad names, links, sizes,
     offsets, footers, digests), served by pytest-httpserver;
  4. properties (hypothesis): parsers raise only StargzError;
  5. secrets: passwords, Basic values and tokens never printed, never forwarded.

Every download test checks the final tree against EXPECTED.json: each file is
byte-exact, or absent with an error naming it.

Run:  python -m pytest -q test_reliability.py
"""
import base64
import email.utils
import gzip
import hashlib
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "testdata"))
sys.path.insert(0, HERE)

from harness import (  # noqa: E402
    IS_ROOT, STARGET, TOC_DIGEST_ANNOTATION, OCIServer, blob_bytes, compare_tree, error_lines,
    estargz_footer, expected_files, expected_ref, hermetic_env, read_toc, run_cli, sha256_digest,
    snapshot_dir, toc_member, walk_tree,
    registry_anon, registry_basic, registry_bearer,  # noqa: F401  (pytest fixtures)
)

import starget  # noqa: E402

try:
    from hypothesis import example, given, settings, HealthCheck, strategies as st
except ImportError:  # pragma: no cover
    given = None


# =============================================================================
# the `basic` fixture, as the tests below use it
# =============================================================================

BASIC = expected_ref("basic", "latest")
BASIC_LAYER = BASIC["layers"][0]
BASIC_BLOB = BASIC_LAYER["digest"]
BASIC_FILES = expected_files("basic", "latest")
BASIC_TOC_OFFSET = BASIC_LAYER["footer"]["toc_offset"]
BASIC_SIZE = BASIC_LAYER["size"]

# the three kinds of target every fault is tried against
TARGET_FILE = "etc/passwd"              # one small file, one gzip member
TARGET_CHUNKED = "data/compressible.txt"  # three chunks (see chunked_files)
TARGET_DIR = "bin"                      # a directory: files, symlinks, a hardlink
TARGETS = [TARGET_FILE, TARGET_CHUNKED, TARGET_DIR]

_basic_cache = {}


def basic_blob():
    if "blob" not in _basic_cache:
        _basic_cache["blob"] = blob_bytes("basic", BASIC_BLOB)
    return _basic_cache["blob"]


def basic_toc():
    """The basic layer's TOC as a dict (a fresh copy each call)."""
    if "toc" not in _basic_cache:
        _basic_cache["toc"] = read_toc(basic_blob())[1]
    return json.loads(_basic_cache["toc"])


def chunk_table(path):
    """[(file_offset, member_offset)] of a regular file of the basic layer, in order."""
    out = []
    for e in basic_toc()["entries"]:
        if e.get("name") == path and e.get("type") in ("reg", "chunk"):
            out.append((e.get("chunkOffset", 0), e["offset"]))
    return out


def file_bytes(path):
    """The content of a regular file of the basic layer, inflated from the fixture blob."""
    blob = basic_blob()
    entries = [e for e in basic_toc()["entries"] if e.get("name") == path and e["type"] in ("reg", "chunk")]
    size = entries[0].get("size", 0)
    out = b""
    for i, e in enumerate(entries):
        start = e.get("chunkOffset", 0)
        end = entries[i + 1]["chunkOffset"] if i + 1 < len(entries) else size
        data = zlib.decompressobj(31).decompress(blob[e["offset"]:BASIC_TOC_OFFSET])
        out += data[:end - start]
    assert hashlib.sha256(out).hexdigest() == BASIC_FILES[path]["sha256"]
    return out


def under(prefix):
    """Expected basic paths a `get PREFIX` selects (a file, or a directory and its subtree)."""
    return sorted(p for p in BASIC_FILES if p and (p == prefix or p.startswith(prefix + "/")))


# =============================================================================
# a fault-injecting reverse proxy
# =============================================================================

def _parse_range(value):
    m = re.match(r"^\s*bytes=(\d+)-(\d*)\s*$", value or "")
    if not m:
        return None
    return int(m.group(1)), (int(m.group(2)) if m.group(2) else None)


def payload_of_basic(rng):
    """A Range request for file payload of the basic blob (not the TOC tail read)."""
    return rng is not None and rng[1] is not None and rng[1] < BASIC_TOC_OFFSET


def covers(offset):
    return lambda rng: rng is not None and rng[0] <= offset <= (rng[1] if rng[1] is not None else 1 << 62)


class Fault(object):
    """Break requests matching method + path substring + a Range predicate.

    The `skip` first matching requests pass, the next `times` (None = all) are broken.
    action: reset | truncate | flip | status | stall | stall_headers | whole200 | 416 | redirect |
    close_after (answer normally, then drop the kept-alive connection)
    params: cut (fraction of the body or, if > 1, bytes sent before the fault), stall
    (seconds), status, headers (dict; a callable value is called per request), location.
    """

    def __init__(self, action, method="GET", path="/blobs/", where=None, skip=0, times=1, **params):
        self.action, self.method, self.path, self.where = action, method, path, where
        self.skip, self.times, self.params = skip, times, params
        self.seen = 0
        self.fired = 0
        self.fired_at = []

    def take(self, method, path, rng):
        if self.method and method != self.method:
            return False
        if self.path and self.path not in path:
            return False
        if self.where is not None and not self.where(rng):
            return False
        n = self.seen
        self.seen += 1
        if n < self.skip or (self.times is not None and n >= self.skip + self.times):
            return False
        self.fired += 1
        self.fired_at.append(time.time())
        return True

    def cut(self, length):
        cut = self.params.get("cut", 0.5)
        n = int(cut) if cut > 1 else int(length * cut)
        return max(0, min(n, max(0, length - 1)))

    def __repr__(self):
        return "Fault(%s %s %s skip=%d times=%s fired=%d)" % (
            self.action, self.method, self.path, self.skip, self.times, self.fired)


_HOP_HEADERS = ("connection", "keep-alive", "transfer-encoding", "content-length", "host",
                "proxy-connection", "te", "upgrade")


class _ProxyServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):   # broken connections are the point
        pass


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._handle()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    # -- plumbing ------------------------------------------------------------
    def _record(self, rng):
        rec = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
               "range": rng, "sent": 0, "status": None, "fault": None, "time": time.time()}
        with self.proxy.lock:
            self.proxy.log.append(rec)
        return rec

    def _upstream(self, path, drop_range=False, auth=None):
        host, _, port = self.proxy.upstream.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        if drop_range:
            headers = {k: v for k, v in headers.items() if k.lower() not in ("range", "if-range")}
        if auth:
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            headers["Authorization"] = auth
        try:
            conn.request(self.command, path, body=self._body, headers=headers)
            resp = conn.getresponse()
            try:
                data = resp.read() if self.command != "HEAD" else b""
            except http.client.IncompleteRead as e:   # distribution's 416 lies about its length
                data = e.partial
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    def _head(self, rec, status, reason, headers, length):
        lines = ["HTTP/1.1 %d %s" % (status, reason or "")]
        for k, v in headers:
            if k.lower() not in _HOP_HEADERS:
                lines.append("%s: %s" % (k, v))
        lines.append("Content-Length: %d" % length)
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        rec["status"] = status

    def _body_out(self, rec, data):
        view = memoryview(data)
        for i in range(0, len(data), 64 << 10):
            piece = view[i:i + (64 << 10)]
            self.wfile.write(piece)
            rec["sent"] += len(piece)

    def _send(self, rec, status, reason, headers, data):
        length = len(data)
        if self.command == "HEAD":
            given = [v for k, v in headers if k.lower() == "content-length"]
            length = int(given[0]) if given else 0
            data = b""
        self._head(rec, status, reason, headers, length)
        self._body_out(rec, data)

    def _reset(self):
        try:
            self.wfile.flush()
            time.sleep(0.05)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass
        self.close_connection = True

    # -- the request -----------------------------------------------------------
    def _handle(self):
        self.proxy = self.server.proxy
        length = int(self.headers.get("Content-Length") or 0)
        self._body = self.rfile.read(length) if length else None
        rng = _parse_range(self.headers.get("Range"))
        rec = self._record(rng)
        path = self.path
        if path.startswith("/storage/"):         # a redirect target: the "other host"
            auth = self.proxy.storage_auth
            auth = auth() if callable(auth) else auth
            status, reason, headers, data = self._upstream(path[len("/storage"):], auth=auth)
            self._send(rec, status, reason, headers, data)
            return
        fault = self.proxy.match(self.command, path, rng)
        if fault is None:
            status, reason, headers, data = self._upstream(path)
            self._send(rec, status, reason, headers, data)
            return
        rec["fault"] = fault.action
        p = fault.params
        action = fault.action
        if action == "status":
            headers = [(k, v() if callable(v) else v) for k, v in (p.get("headers") or {}).items()]
            body = json.dumps({"errors": [{"code": "UNAVAILABLE", "message": "injected %d" % p["status"]}]}).encode()
            headers.append(("Content-Type", "application/json"))
            self._send(rec, p["status"], "Injected", headers, body)
            return
        if action == "redirect":
            self._send(rec, 307, "Temporary Redirect", [("Location", p["location"] + "/storage" + path
                                                           + p.get("query", ""))], b"")
            return
        if action == "stall_headers":
            self.proxy.release.wait(p.get("stall", 3.0))
            self.close_connection = True
            return
        status, reason, headers, data = self._upstream(path, drop_range=(action == "whole200"))
        if action == "whole200":
            headers = [(k, v) for k, v in headers if k.lower() != "content-range"]
            self._send(rec, 200, "OK", headers, data)
            return
        if action == "416":
            total = re.search(r"/(\d+)$", dict((k.lower(), v) for k, v in headers).get("content-range", "")) or None
            self._send(rec, 416, "Requested Range Not Satisfiable",
                       [("Content-Range", "bytes */%s" % (total.group(1) if total else BASIC_SIZE)),
                        ("Content-Type", "text/plain")], b"invalid range")
            return
        if action == "flip":
            data = bytearray(data)
            at = p.get("at", 0.5)
            at = at(rng, len(data)) if callable(at) else at
            pos = int(at) if at > 1 else int(len(data) * at)
            data[pos] ^= 0xFF
            self._send(rec, status, reason, headers, bytes(data))
            return
        if action == "close_after":     # a kept-alive connection the server then drops
            self._send(rec, status, reason, headers, data)
            self.wfile.flush()
            self.close_connection = True
            return
        cut = fault.cut(len(data))
        self._head(rec, status, reason, headers, len(data))
        self._body_out(rec, data[:cut])
        if action == "reset":
            self._reset()
        elif action == "truncate":
            self.wfile.flush()
            self.close_connection = True
        elif action == "stall":
            self.wfile.flush()
            self.proxy.stalled.set()
            self.proxy.release.wait(p.get("stall", 3.0))
            self.close_connection = True
        else:
            raise AssertionError("unknown fault action %r" % action)


class FaultProxy(object):
    """A reverse proxy on 127.0.0.1 in front of `upstream` ("host:port").

    `log` records every request: method, path, headers, range (start, end|None), sent
    (body bytes written), status, fault. `/storage/<path>` forwards <path> upstream with
    `storage_auth` as Authorization (the target of injected redirects)."""

    def __init__(self, upstream, storage_auth=None):
        self.upstream, self.storage_auth = upstream, storage_auth
        self.faults, self.log = [], []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.stalled = threading.Event()
        self.server = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
        self.server.proxy = self
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.daemon = True
        self.thread.start()

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.server.server_address[1]

    @property
    def port(self):
        return self.server.server_address[1]

    def image(self, layout="basic", ref="latest"):
        return "%s/fixtures/%s:%s" % (self.addr, layout, ref)

    def add(self, action, **kw):
        fault = Fault(action, **kw)
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear(self):
        with self.lock:
            self.faults = []

    def match(self, method, path, rng):
        with self.lock:
            for fault in self.faults:
                if fault.take(method, path, rng):
                    return fault
        return None

    def mark(self):
        with self.lock:
            return len(self.log)

    def requests(self, since=0, path=None):
        with self.lock:
            return [r for r in self.log[since:] if path is None or path in r["path"]]

    def payload_requests(self, since=0):
        return [r for r in self.requests(since, BASIC_BLOB) if payload_of_basic(r["range"])]

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def make_proxy():
    made = []

    def make(upstream, storage_auth=None):
        p = FaultProxy(upstream, storage_auth)
        made.append(p)
        return p
    yield make
    for p in made:
        p.close()


@pytest.fixture
def anon_proxy(registry_anon, make_proxy):
    """A FaultProxy in front of the anonymous real registry."""
    return make_proxy(registry_anon.addr)


# =============================================================================
# output directories and final-tree checks
# =============================================================================

class Sandbox(object):
    """base/parent/out (OUTPUT_DIR) next to base/parent/canary/keep.txt, snapshotted."""

    def __init__(self, base):
        self.base = str(base)
        self.parent = os.path.join(self.base, "parent")
        self.out = os.path.join(self.parent, "out")
        self.canary = os.path.join(self.parent, "canary")
        os.makedirs(self.out)
        os.makedirs(self.canary)
        with open(os.path.join(self.canary, "keep.txt"), "w") as f:
            f.write("canary\n")
        self._before = self._outside()
        self._base_listing = sorted(os.listdir(self.base))

    def _outside(self):
        snap = snapshot_dir(self.parent)
        return {k: v for k, v in snap.items() if k != "out" and not k.startswith("out" + os.sep)}

    def assert_untouched(self):
        """Nothing was written next to OUTPUT_DIR, in the canary, or above."""
        assert sorted(os.listdir(self.base)) == self._base_listing, "something written next to parent"
        assert self._outside() == self._before, "something written outside OUTPUT_DIR"
        with open(os.path.join(self.canary, "keep.txt")) as f:
            assert f.read() == "canary\n"
        assert os.lstat(os.path.join(self.canary, "keep.txt")).st_nlink == 1, "a hardlink to the canary"

    def assert_out_empty(self):
        left = os.listdir(self.out) if os.path.isdir(self.out) else []
        assert left == [], "files written although the command was refused: %r" % left


@pytest.fixture
def sandbox(tmp_path):
    return Sandbox(tmp_path)


def _is_leftover(path):
    return path.endswith(starget.PARTIAL_SUFFIX) or path.endswith(starget.STATE_SUFFIX)


def assert_final_tree(out, prefix, errors="", complete=False, files=None):
    """Every expected entry under `prefix` is exact, or absent and named in `errors`.

    Only `NAME.partial` / `NAME.partial.state` may lie next to final names, and only
    for a file that is absent; with complete=True nothing may be missing or left over.
    Returns the list of missing paths."""
    files = BASIC_FILES if files is None else files
    want = {p: e for p, e in files.items() if p and (not prefix or p == prefix or p.startswith(prefix + "/"))}
    tree = walk_tree(out)
    leftovers = sorted(p for p in tree if _is_leftover(p))
    present = {p: a for p, a in tree.items() if p not in leftovers}
    missing = sorted(p for p in want if p not in present)
    diffs = compare_tree({p: e for p, e in want.items() if p in present}, present, prefix)
    assert diffs == [], "wrong entries under final names: %s" % diffs
    if complete:
        assert missing == [], "missing: %s (errors: %s)" % (missing, errors)
        assert leftovers == [], "left over after a complete run: %s" % leftovers
    for p in missing:
        if want[p]["type"] in ("char", "block", "fifo") and not IS_ROOT:
            continue
        assert p in errors, "%s is missing but no error names it: %r" % (p, errors)
    for p in leftovers:
        final = p[:-len(starget.STATE_SUFFIX)] if p.endswith(starget.STATE_SUFFIX) else p[:-len(starget.PARTIAL_SUFFIX)]
        assert final not in present, "%s left next to the finished %s" % (p, final)
    return missing


def fast_client(image, timeout=5.0, retries=3, credential=None, cafile=None, plain_http=None, home=None):
    """A RegistryClient with a fast retry policy and a hermetic environment."""
    retry = starget.RetryPolicy(retries=retries, base=0.01, max_delay=0.05)
    transport = starget.Transport(read_timeout=timeout, connect_timeout=5.0, retry=retry, environ={},
                                  cafile=cafile, certs_dirs=())
    creds = starget.Credentials(credential, environ={}, home=home or "/nonexistent-starget-home")
    return starget.RegistryClient(image, credentials=creds, transport=transport, plain_http=plain_http)


def api_get(image, pattern, out, concurrency=4, **kw):
    """open_image + Downloader through the Python API; returns DownloadStats."""
    client = fast_client(image, **kw)
    try:
        index = starget.open_image(image, client=client, cache=None)
        return starget.Downloader(client, concurrency=concurrency).download(index, pattern, out)
    finally:
        client.transport.close()


def failure_text(stats):
    return "\n".join("%s: %s" % (p, m) for p, m in stats.failures)


# =============================================================================
# 1. fault injection
# =============================================================================

def _http_date(seconds_ahead):
    return lambda: email.utils.formatdate(time.time() + seconds_ahead, usegmt=True)


# name -> (Fault kwargs, the run can recover)
FAULTS = {
    "reset-mid-body": (dict(action="reset", cut=0.5), True),
    "truncated-body": (dict(action="truncate", cut=0.6), True),
    "flipped-byte": (dict(action="flip", at=0.5), True),
    "429-retry-after-seconds": (dict(action="status", status=429, headers={"Retry-After": "1"}), True),
    "503-retry-after-date": (dict(action="status", status=503, headers={"Retry-After": _http_date(2)}), True),
    "500-burst": (dict(action="status", status=500, times=3), True),
    "stall-mid-body": (dict(action="stall", cut=0.5, stall=4.0), True),
    "stall-before-headers": (dict(action="stall_headers", stall=4.0), True),
    "200-instead-of-206": (dict(action="whole200", times=None), True),
    "416": (dict(action="416"), None),      # may recover or fail cleanly: None = either
}
FAULT_IDS = sorted(FAULTS)


def _arm(proxy, name):
    kw, recover = FAULTS[name]
    kw = dict(kw)
    action = kw.pop("action")
    if name == "200-instead-of-206":   # every blob read, the TOC tail read included
        fault = proxy.add(action, path=BASIC_BLOB, **kw)
    else:
        fault = proxy.add(action, path=BASIC_BLOB, where=payload_of_basic, **kw)
    return fault, recover


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("fault_name", FAULT_IDS)
def test_fault_api(anon_proxy, sandbox, fault_name, target):
    """Each fault against a file, a chunked file and a directory (Python API, fast backoff)."""
    fault, recover = _arm(anon_proxy, fault_name)
    timeout = 1.0 if fault_name.startswith("stall") else 5.0
    started = time.time()
    stats = api_get(anon_proxy.image(), target, sandbox.out, retries=3, timeout=timeout)
    elapsed = time.time() - started
    assert fault.fired >= 1, "the fault never hit: %r" % fault
    errors = failure_text(stats)
    if recover:
        assert stats.failures == [], errors
        assert_final_tree(sandbox.out, target, errors, complete=True)
        assert stats.retries >= 1 or fault_name == "200-instead-of-206", "no retry counted"
    else:
        missing = assert_final_tree(sandbox.out, target, errors)
        if stats.failures:
            assert missing, "failures reported but every file is there: %s" % errors
    if fault_name == "429-retry-after-seconds":
        assert elapsed >= 0.9, "Retry-After: 1 was not honoured (%.2fs)" % elapsed
    if fault_name == "503-retry-after-date":
        assert elapsed >= 0.9, "Retry-After as an HTTP date was not honoured (%.2fs)" % elapsed
    sandbox.assert_untouched()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("fault_name", FAULT_IDS)
def test_fault_cli(anon_proxy, sandbox, fault_name, target):
    """The same faults through the command line (`--retries 3 --timeout 1`)."""
    fault, recover = _arm(anon_proxy, fault_name)
    rc, out, err = run_cli("--retries", "3", "--timeout", "1", "--no-progress", "get",
                           anon_proxy.image(), target, sandbox.out)
    assert fault.fired >= 1, "the fault never hit: %r" % fault
    assert rc != 1 and "Traceback" not in err, err
    if recover:
        assert rc == 0, err
        assert_final_tree(sandbox.out, target, err, complete=True)
    else:
        assert rc in (0, 5, 6, 8, 11), err
        missing = assert_final_tree(sandbox.out, target, err)
        assert bool(missing) == (rc != 0), (rc, missing, err)
        if rc:
            assert error_lines(err) and all(l.startswith("starget: error: ") for l in error_lines(err))
    sandbox.assert_untouched()


@pytest.mark.parametrize("target", TARGETS)
def test_permanent_500_fails_cleanly(anon_proxy, sandbox, target):
    """A blob range that always answers 500: exit 5, one error naming the file(s),
    no final file, nothing partial under a final name."""
    fault = anon_proxy.add("status", path=BASIC_BLOB, where=payload_of_basic, status=500, times=None)
    rc, out, err = run_cli("--retries", "1", "--timeout", "2", "--no-progress", "get",
                           anon_proxy.image(), target, sandbox.out)
    assert fault.fired >= 2, "not retried: %r" % fault
    # a directory also holds symlinks, which are written: "some files failed" is fair
    assert rc == 5 or (target == TARGET_DIR and rc == 11), (rc, err)
    lines = [l for l in err.splitlines() if l.strip()]
    assert lines and all(l.startswith("starget: error: ") for l in lines), err
    wanted_files = [p for p in under(target) if BASIC_FILES[p]["type"] in ("reg", "hardlink")]
    if len(wanted_files) == 1:
        assert len(lines) == 1, "one failed file, more than one error line: %r" % err
    missing = assert_final_tree(sandbox.out, target, err)
    assert set(wanted_files) <= set(missing)
    assert "500" in err
    sandbox.assert_untouched()


def test_permanent_500_attempts_are_bounded(anon_proxy, sandbox):
    """`--retries N` means N retries of a request: at most N+1 attempts of the one
    failing range, not (N+1) x (N+1) from nested retry loops."""
    fault = anon_proxy.add("status", path=BASIC_BLOB, where=payload_of_basic, status=500, times=None)
    stats = api_get(anon_proxy.image(), TARGET_FILE, sandbox.out, retries=2)
    assert stats.failures and stats.failures[0][0] == TARGET_FILE
    assert fault.fired <= 3, "one range was requested %d times with retries=2" % fault.fired


def test_permanent_500_on_toc_read(anon_proxy, sandbox):
    fault = anon_proxy.add("status", path=BASIC_BLOB, where=lambda r: not payload_of_basic(r), status=500,
                           times=None)
    rc, out, err = run_cli("--retries", "1", "get", anon_proxy.image(), ".", sandbox.out)
    assert fault.fired >= 2
    line = _one_error_line(rc, err, 5)
    assert "500" in line
    sandbox.assert_out_empty()
    sandbox.assert_untouched()


def _one_error_line(rc, err, codes):
    codes = (codes,) if isinstance(codes, int) else codes
    assert rc in codes, "exit %r not in %r: %s" % (rc, codes, err)
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and re.match(r"^starget: error: \S", lines[0]), "not one error line: %r" % err
    return lines[0]


def _toc_flip_at(rng, length):
    """A byte inside the TOC's gzip member of the tail read."""
    return max(1, BASIC_TOC_OFFSET - rng[0] + 200) if rng and rng[0] <= BASIC_TOC_OFFSET else length // 2


METADATA_READS = {
    "manifest": dict(path="/manifests/"),
    "toc": dict(path=BASIC_BLOB, where=lambda r: not payload_of_basic(r)),
}
METADATA_FAULTS = {
    "reset-mid-body": dict(action="reset", cut=0.5),
    "truncated-body": dict(action="truncate", cut=0.5),
    "flipped-byte": dict(action="flip", at=0.5),
    "500-burst": dict(action="status", status=500, times=2),
    "429-retry-after-seconds": dict(action="status", status=429, headers={"Retry-After": "1"}),
    "stall-mid-body": dict(action="stall", cut=0.5, stall=4.0),
    "stall-before-headers": dict(action="stall_headers", stall=4.0),
    "keepalive-dropped": dict(action="close_after"),
}


@pytest.mark.parametrize("read", sorted(METADATA_READS))
@pytest.mark.parametrize("fault_name", sorted(METADATA_FAULTS))
def test_fault_on_metadata_reads(anon_proxy, sandbox, read, fault_name):
    """One transient fault on the manifest or the TOC (tail) read: `--retries 3` covers
    it like a payload read. A flipped manifest byte (nothing to check it against
    without a pinned digest) may instead fail cleanly, never with wrong files."""
    kw = dict(METADATA_FAULTS[fault_name], **METADATA_READS[read])
    if fault_name == "flipped-byte" and read == "toc":
        kw["at"] = _toc_flip_at
    fault = anon_proxy.add(kw.pop("action"), **kw)
    rc, out, err = run_cli("--retries", "3", "--timeout", "1", "--no-progress", "get",
                           anon_proxy.image(), "etc", sandbox.out)
    assert fault.fired == kw.get("times", 1), fault
    assert rc != 1 and "Traceback" not in err, err
    if fault_name == "flipped-byte" and read == "manifest" and rc != 0:
        _refused(rc, err, sandbox, (3, 5, 6, 7, 8))
        return
    assert rc == 0, "one %s on the %s read: exit %d: %s" % (fault_name, read, rc, err)
    assert_final_tree(sandbox.out, "etc", err, complete=True)
    sandbox.assert_untouched()


def test_reset_refetches_only_missing_chunks(anon_proxy, sandbox):
    """A reset after the first chunk of a 3-chunk file: the retry starts at the
    first chunk not yet verified."""
    chunks = chunk_table(TARGET_CHUNKED)
    assert len(chunks) == 3
    first_len = chunks[1][1] - chunks[0][1]
    fault = anon_proxy.add("reset", path=BASIC_BLOB, where=payload_of_basic, cut=first_len + 2000)
    stats = api_get(anon_proxy.image(), TARGET_CHUNKED, sandbox.out, concurrency=1)
    assert stats.failures == [], failure_text(stats)
    assert fault.fired == 1
    assert_final_tree(sandbox.out, TARGET_CHUNKED, complete=True)
    reqs = anon_proxy.payload_requests()
    assert len(reqs) == 2, [r["range"] for r in reqs]
    assert reqs[0]["range"][0] == chunks[0][1]
    assert reqs[1]["range"][0] == chunks[1][1], "verified chunk 0 was fetched again: %r" % (reqs[1]["range"],)


def test_retry_after_http_date_is_honoured(anon_proxy, sandbox):
    """503 + Retry-After as an HTTP date about 2 s ahead: the retry waits for it."""
    fault = anon_proxy.add("status", path=BASIC_BLOB, where=payload_of_basic, status=503,
                           headers={"Retry-After": _http_date(2)})
    api_get(anon_proxy.image(), TARGET_FILE, sandbox.out)
    reqs = anon_proxy.payload_requests()
    assert fault.fired == 1 and len(reqs) == 2
    gap = reqs[1]["time"] - reqs[0]["time"]
    assert 0.9 <= gap <= 5, "retry %.2fs after a Retry-After date ~2 s ahead" % gap
    assert_final_tree(sandbox.out, TARGET_FILE, complete=True)


@pytest.mark.parametrize("value", ["\xb2", "Mon, 99 Jan 99999 00:00:00 GMT", "-5", "1e9", "soon"])
def test_garbage_retry_after_is_not_a_crash(anon_proxy, sandbox, value):
    """A Retry-After header starget cannot read is ignored (plain backoff), never a crash."""
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        pytest.skip("not sendable as an HTTP header")
    fault = anon_proxy.add("status", path=BASIC_BLOB, where=payload_of_basic, status=503,
                           headers={"Retry-After": value})
    rc, out, err = run_cli("--retries", "2", "get", anon_proxy.image(), TARGET_FILE, sandbox.out, timeout=60)
    assert fault.fired == 1
    assert rc == 0, "Retry-After %r: exit %d: %s" % (value, rc, err)
    assert_final_tree(sandbox.out, TARGET_FILE, complete=True)


def test_huge_retry_after_is_capped(anon_proxy, sandbox):
    """Retry-After: 86400 must not stall a run for a day (the cap is documented as 60 s;
    here the wait is observed through RetryPolicy.sleep)."""
    fault = anon_proxy.add("status", path=BASIC_BLOB, where=payload_of_basic, status=429,
                           headers={"Retry-After": "86400"})
    slept = []
    retry = starget.RetryPolicy(retries=2, base=0.01, max_delay=0.05, sleep=slept.append)
    transport = starget.Transport(retry=retry, environ={}, certs_dirs=())
    client = starget.RegistryClient(anon_proxy.image(), credentials=starget.Credentials(environ={}, home="/x"),
                                    transport=transport)
    index = starget.open_image(anon_proxy.image(), client=client, cache=None)
    stats = starget.Downloader(client).download(index, TARGET_FILE, sandbox.out)
    transport.close()
    assert fault.fired == 1 and stats.failures == []
    assert slept and max(slept) <= 60, slept
    assert_final_tree(sandbox.out, TARGET_FILE, complete=True)


@pytest.mark.parametrize("target", TARGETS)
def test_redirect_to_other_host_drops_authorization(registry_basic, make_proxy, sandbox, target):
    """Basic-auth registry; blob GETs answer 307 to another host (another port, named
    `localhost`): the blobs arrive, and Authorization never reaches that host."""
    basic = "Basic " + base64.b64encode(registry_basic.credential.encode()).decode()
    storage = make_proxy(registry_basic.addr, storage_auth=basic)
    front = make_proxy(registry_basic.addr)
    fault = front.add("redirect", path="/blobs/", times=None, location="http://localhost:%d" % storage.port)
    rc, out, err = run_cli("--credential", registry_basic.credential, "--no-progress", "get",
                           front.image(), target, sandbox.out)
    assert rc == 0, err
    assert fault.fired >= 1
    assert_final_tree(sandbox.out, target, err, complete=True)
    got = storage.requests()
    assert got, "nothing was fetched from the redirect target"
    leaked = [r["path"] for r in got if any(k.lower() == "authorization" for k in r["headers"])]
    assert leaked == [], "Authorization sent to the other host: %s" % leaked
    assert any("authorization" in (k.lower() for k in r["headers"]) for r in front.requests()), \
        "the registry itself never got the credential (the check above proves nothing)"
    sandbox.assert_untouched()


# =============================================================================
# 2. resume
# =============================================================================

BIG = "data/big.bin"


def _popen_get(image, pattern, out, *flags):
    env = hermetic_env()
    return subprocess.Popen([sys.executable, STARGET, "--no-progress"] + list(flags) + ["get", image, pattern, out],
                            env=env, cwd=env["HOME"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail("timed out waiting for %s" % what)


def _state_done(state_path):
    """The chunk indexes a state file says are done ([] when unreadable)."""
    try:
        with open(state_path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return []
    done = doc.get("done") if isinstance(doc, dict) else None
    return sorted(done) if isinstance(done, list) else []


def _interrupt(proxy, out, pattern, cut, state_rel, sig=signal.SIGKILL, flags=(), blob=BASIC_BLOB, image=None):
    """Start `get` through a proxy that stalls after `cut` payload bytes, wait until
    `state_rel` records a verified chunk, then send `sig`. Returns (rc, stderr, seconds
    from the signal to the exit)."""
    fault = proxy.add("stall", path=blob, where=payload_of_basic, cut=cut, stall=60.0)
    proc = _popen_get(image or proxy.image(), pattern, out, *flags)
    state = os.path.join(out, *state_rel.split("/"))
    try:
        _wait_for(lambda: proc.poll() is not None or (proxy.stalled.is_set() and _state_done(state)),
                  what="a verified chunk in %s" % state_rel)
        assert proc.poll() is None, "get ended before the interruption: %r" % (proc.communicate(),)
        time.sleep(0.2)
        sent_at = time.time()
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail("get did not stop within 40 s of signal %d" % sig)
        took = time.time() - sent_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proxy.clear()
    assert fault.fired == 1
    return proc.returncode, err.decode("utf-8", "replace"), took


def _assert_interrupted_tree(out, prefix):
    """After an interruption: final names hold exact files only; the rest is .partial
    (directory modes are set last, so they are not compared here)."""
    tree = walk_tree(out)
    want = set(under(prefix))
    for p, a in tree.items():
        if _is_leftover(p):
            final = p[:-len(starget.STATE_SUFFIX)] if p.endswith(starget.STATE_SUFFIX) else p[:-len(starget.PARTIAL_SUFFIX)]
            assert final in want and BASIC_FILES[final]["type"] == "reg", "stray %s" % p
            assert final not in tree, "%s left next to the finished %s" % (p, final)
            continue
        assert p in want or any(w.startswith(p + "/") for w in want), "unexpected %s" % p
        if a["type"] == "reg":
            assert a["sha256"] == BASIC_FILES[p]["sha256"], "%s is under its final name but not complete" % p


def _chunks_fetched(requests, path):
    """Indexes of `path`'s chunks whose member start lies in one of the requests' ranges."""
    out = set()
    for i, (_, offset) in enumerate(chunk_table(path)):
        if any(covers(offset)(r["range"]) for r in requests):
            out.add(i)
    return out


def test_resume_after_kill_9_skips_verified_chunks(anon_proxy, sandbox):
    chunks = chunk_table(BIG)
    rc, err, _ = _interrupt(anon_proxy, sandbox.out, BIG, 1300000, BIG + starget.STATE_SUFFIX)
    assert rc == -signal.SIGKILL
    big = os.path.join(sandbox.out, "data", "big.bin")
    assert not os.path.lexists(big), "a killed run left data/big.bin under its final name"
    assert os.path.isfile(big + starget.PARTIAL_SUFFIX)
    done = _state_done(big + starget.STATE_SUFFIX)
    assert done and set(done) <= set(range(len(chunks))) and len(done) < len(chunks), done
    _assert_interrupted_tree(sandbox.out, BIG)

    mark = anon_proxy.mark()
    rc, out, err = run_cli("--no-progress", "get", anon_proxy.image(), BIG, sandbox.out)
    assert rc == 0, err
    assert_final_tree(sandbox.out, BIG, complete=True)
    again = anon_proxy.payload_requests(mark)
    refetched = _chunks_fetched(again, BIG)
    assert not refetched & set(done), "verified chunks %s fetched again" % sorted(refetched & set(done))
    assert refetched == set(range(len(chunks))) - set(done)
    sent = sum(r["sent"] for r in again)
    assert sent < BASIC_TOC_OFFSET - chunks[max(done)][1], "resume fetched %d bytes" % sent
    sandbox.assert_untouched()


def test_resume_directory_after_kill_9(anon_proxy, sandbox):
    """`get data/` killed after big.bin is done and exact-2chunks.bin has one chunk:
    the re-run fetches neither again."""
    two = chunk_table("data/exact-2chunks.bin")
    cut = two[1][1] - chunk_table(BIG)[0][1] + 3000    # into exact-2chunks.bin's 2nd member
    rc, err, _ = _interrupt(anon_proxy, sandbox.out, "data", cut, "data/exact-2chunks.bin" + starget.STATE_SUFFIX)
    assert rc == -signal.SIGKILL
    _assert_interrupted_tree(sandbox.out, "data")
    assert os.path.isfile(os.path.join(sandbox.out, "data", "big.bin")), "big.bin was complete before the kill"
    mark = anon_proxy.mark()
    rc, out, err = run_cli("--no-progress", "get", anon_proxy.image(), "data", sandbox.out)
    assert rc == 0, err
    assert_final_tree(sandbox.out, "data", complete=True)
    again = anon_proxy.payload_requests(mark)
    assert _chunks_fetched(again, BIG) == set(), "the finished big.bin was fetched again"
    assert _chunks_fetched(again, "data/exact-2chunks.bin") == {1}
    sandbox.assert_untouched()


def test_sigint_exits_130_and_resumes(anon_proxy, sandbox):
    """Ctrl-C during a stalled read: exit 130 promptly, a message about resuming, .partial
    files only; the same command then finishes."""
    rc, err, took = _interrupt(anon_proxy, sandbox.out, BIG, 1300000, BIG + starget.STATE_SUFFIX,
                               sig=signal.SIGINT)
    assert rc == 130, (rc, err)
    assert "resume" in err.lower() or "again" in err.lower(), err
    assert "Traceback" not in err
    assert took < 10, "exit took %.1fs after SIGINT" % took
    _assert_interrupted_tree(sandbox.out, BIG)
    assert os.path.isfile(os.path.join(sandbox.out, "data", "big.bin" + starget.PARTIAL_SUFFIX))
    rc, out, err = run_cli("--no-progress", "get", anon_proxy.image(), BIG, sandbox.out)
    assert rc == 0, err
    assert_final_tree(sandbox.out, BIG, complete=True)


def test_resume_refetches_a_corrupted_verified_chunk(anon_proxy, sandbox):
    """A byte of a chunk the state calls verified is changed on disk before the
    re-run: that chunk is checked again and fetched again, the others are not."""
    rc, err, _ = _interrupt(anon_proxy, sandbox.out, BIG, 1300000, BIG + starget.STATE_SUFFIX)
    partial = os.path.join(sandbox.out, "data", "big.bin" + starget.PARTIAL_SUFFIX)
    done = _state_done(os.path.join(sandbox.out, "data", "big.bin" + starget.STATE_SUFFIX))
    assert 0 in done and len(done) >= 2, done
    with open(partial, "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0x55]))
    mark = anon_proxy.mark()
    rc, out, err = run_cli("--no-progress", "get", anon_proxy.image(), BIG, sandbox.out)
    assert rc == 0, err
    assert_final_tree(sandbox.out, BIG, complete=True)
    refetched = _chunks_fetched(anon_proxy.payload_requests(mark), BIG)
    assert 0 in refetched, "the corrupted chunk 0 was trusted"
    assert not refetched & (set(done) - {0}), "good verified chunks fetched again: %s" % sorted(refetched)


def _serve_forged_basic(httpserver, edit, repo="fixtures/basic"):
    """An OCIServer serving basic's blob with its TOC rewritten by edit(toc) (annotated)."""
    reg = OCIServer(httpserver)
    blob, toc_json = forge_basic(edit)
    reg.add_image(repo, [blob], annotations=[{TOC_DIGEST_ANNOTATION: sha256_digest(toc_json)}])
    return reg, blob


def test_stale_state_of_another_blob_is_discarded(httpserver, make_proxy, anon_proxy, sandbox):
    """`big.bin.partial` + state left by an interrupted get of ANOTHER image (another
    blob digest, same file): the real image's run discards them and fetches every
    chunk; the result is byte-exact."""
    other, other_blob = _serve_forged_basic(httpserver, lambda t: _toc_entry(t, TARGET_FILE).update(mode=0o600))
    other_digest = sha256_digest(other_blob)
    assert other_digest != BASIC_BLOB
    front = make_proxy("127.0.0.1:%d" % httpserver.port)
    rc, err, _ = _interrupt(front, sandbox.out, BIG, 1300000, BIG + starget.STATE_SUFFIX, blob=other_digest,
                            image="%s/fixtures/basic:latest" % front.addr)
    assert rc == -signal.SIGKILL
    done = _state_done(os.path.join(sandbox.out, "data", "big.bin" + starget.STATE_SUFFIX))
    assert done
    mark = anon_proxy.mark()
    rc, out, err = run_cli("--no-progress", "get", anon_proxy.image(), BIG, sandbox.out)
    assert rc == 0, err
    assert_final_tree(sandbox.out, BIG, complete=True)
    refetched = _chunks_fetched(anon_proxy.payload_requests(mark), BIG)
    assert refetched == set(range(len(chunk_table(BIG)))), \
        "chunks %s of another blob's state were trusted" % sorted(set(done) - refetched)


@pytest.mark.parametrize("junk", [b"", b"{", b"[1,2,3]", b'{"done": "all"}', b'{"done": [0, 1, 99, -1, "x", null]}'])
def test_garbage_state_file_is_ignored(anon_proxy, sandbox, junk):
    """A state file that is not starget's (empty, not JSON, wrong types) next to a
    zero-filled `.partial`: ignored; the result is byte-exact."""
    d = os.path.join(sandbox.out, "data")
    os.makedirs(d)
    with open(os.path.join(d, "big.bin" + starget.PARTIAL_SUFFIX), "wb") as f:
        f.write(b"\0" * BASIC_FILES[BIG]["size"])
    with open(os.path.join(d, "big.bin" + starget.STATE_SUFFIX), "wb") as f:
        f.write(junk)
    rc, out, err = run_cli("--no-progress", "get", anon_proxy.image(), BIG, sandbox.out)
    assert rc == 0, err
    assert_final_tree(sandbox.out, BIG, complete=True)


def test_partial_that_is_a_symlink_is_not_written_through(anon_proxy, sandbox):
    """`etc/passwd.partial` is a symlink to a file outside OUTPUT_DIR: never written through."""
    d = os.path.join(sandbox.out, "etc")
    os.makedirs(d)
    os.symlink(os.path.join(sandbox.canary, "keep.txt"), os.path.join(d, "passwd" + starget.PARTIAL_SUFFIX))
    rc, out, err = run_cli("--no-progress", "get", anon_proxy.image(), TARGET_FILE, sandbox.out)
    assert rc in (0, 9, 10), err
    sandbox.assert_untouched()
    if rc == 0:
        assert_final_tree(sandbox.out, TARGET_FILE, err)
    else:
        assert TARGET_FILE in err or "passwd" in err


# =============================================================================
# 3. hostile images
# =============================================================================

def forge_basic(edit=None, raw_toc=None, footer_offset=None, blob=None):
    """basic's blob with a new TOC member: edit(toc_dict) or raw_toc bytes; the footer
    points at the new member (or at footer_offset). Returns (blob, toc_json_bytes)."""
    original = basic_blob() if blob is None else blob
    off = BASIC_TOC_OFFSET
    if raw_toc is None:
        toc = basic_toc()
        toc = edit(toc) or toc if edit else toc
        raw_toc = json.dumps(toc, separators=(",", ":")).encode()
    new = original[:off] + toc_member(raw_toc) + estargz_footer(off if footer_offset is None else footer_offset)
    return new, raw_toc


def _toc_entry(toc, name, kind=None):
    for e in toc["entries"]:
        if e.get("name") == name and (kind is None or e.get("type") == kind):
            return e
    raise KeyError(name)


def _serve(httpserver, blob, toc_json=None, annotate=True, layers=None, repo="fixtures/hostile"):
    reg = OCIServer(httpserver)
    blobs = layers or [blob]
    ann = None
    if annotate and toc_json is not None:
        ann = [{TOC_DIGEST_ANNOTATION: sha256_digest(toc_json)}] + [None] * (len(blobs) - 1)
    reg.add_image(repo, blobs, annotations=ann)
    return reg, reg.image(repo)


def _minus(files, *paths):
    return {p: e for p, e in files.items() if p not in paths}


def _nowhere(name, roots):
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            assert name not in dirnames + filenames, "%s written in %s" % (name, dirpath)


def _refused(rc, err, sandbox, codes):
    line = _one_error_line(rc, err, codes)
    sandbox.assert_out_empty()
    sandbox.assert_untouched()
    return line


HOSTILE_NAMES = [
    ("dotdot", "../{n}"),
    ("dotdot-deep", "etc/../../{n}"),
    ("dotdot-abs", "/../../{n}"),
    ("dotdot-trailing", "etc/{n}/.."),
    ("absolute", "/tmp/{n}"),
    ("nul", "etc/{n}\x00.txt"),
    ("empty", ""),
    ("dot", "."),
    ("slash", "/"),
    ("backslash", "..\\{n}"),
    ("long-component", "etc/" + "x" * 300),
]


@pytest.mark.parametrize("case,template", HOSTILE_NAMES, ids=[c for c, _ in HOSTILE_NAMES])
def test_hostile_entry_names(httpserver, sandbox, case, template):
    """etc/passwd renamed: refused (exit 6/9, nothing written) or skipped with a
    warning (the rest exact); never written outside OUTPUT_DIR."""
    n = "starget-escape-%s" % os.urandom(4).hex()
    name = template.format(n=n)
    blob, toc_json = forge_basic(lambda toc: _toc_entry(toc, TARGET_FILE).update(name=name))
    reg, image = _serve(httpserver, blob, toc_json)
    rc, out, err = run_cli("--no-progress", "get", image, ".", sandbox.out)
    assert rc != 1 and "Traceback" not in err, err
    sandbox.assert_untouched()
    _nowhere(n, [sandbox.base, os.path.dirname(sandbox.base)])
    assert not os.path.lexists("/tmp/" + n) and not os.path.lexists("/" + n)
    if rc in (6, 9):
        _refused(rc, err, sandbox, (6, 9))
        return
    files = _minus(BASIC_FILES, TARGET_FILE)
    try:
        normal = starget.normalize_path(name)
    except starget.StargzError:
        normal = None
    if normal and os.path.lexists(os.path.join(sandbox.out, *normal.split("/"))):
        # accepted as a name relative to the image root: inside OUTPUT_DIR, exact
        files = dict(files, **{normal: BASIC_FILES[TARGET_FILE]})
        for i in range(1, normal.count("/") + 1):
            parent = "/".join(normal.split("/")[:i])
            files.setdefault(parent, dict(BASIC_FILES["etc"], path=parent))
    if rc == 0:
        assert_final_tree(sandbox.out, "", files=files, complete=True)
        if normal != TARGET_FILE and not (normal and normal in files):
            assert re.search(r"(?im)^starget: warn", err), \
                "entry %r dropped without a warning or an error" % name
    else:
        assert rc in (10, 11), (rc, err)      # e.g. a name the file system refuses
        assert_final_tree(sandbox.out, "", err, files=files)


@pytest.mark.parametrize("link", ["abs-canary", "rel-canary"])
def test_hostile_symlink_then_file_under_it(httpserver, sandbox, link):
    """`evil -> <canary>` then `evil/pwn.txt` in the same layer: never written through."""
    target = sandbox.canary if link == "abs-canary" else "../canary"

    def edit(toc):
        src = _toc_entry(toc, TARGET_FILE)
        toc["entries"].append({"name": "evil", "type": "symlink", "linkName": target, "mode": 0o777})
        toc["entries"].append(dict(src, name="evil/pwn.txt"))
        toc["entries"].append({"name": "etc/evil2", "type": "symlink", "linkName": target, "mode": 0o777})
        toc["entries"].append(dict(src, name="etc/evil2/pwn.txt"))
    blob, toc_json = forge_basic(edit)
    reg, image = _serve(httpserver, blob, toc_json)
    for pattern in (".", "evil/pwn.txt", "etc", "etc/evil2/"):
        rc, out, err = run_cli("--no-progress", "get", image, pattern, sandbox.out)
        assert rc in (0, 3, 6, 9, 11), (pattern, rc, err)
        assert "Traceback" not in err
        sandbox.assert_untouched()
        assert sorted(os.listdir(sandbox.canary)) == ["keep.txt"]


@pytest.mark.parametrize("case,link", [
    ("outside", "../canary/keep.txt"), ("absolute-outside", "/etc/hostname"), ("missing", "etc/nothere"),
    ("directory", "etc"), ("symlink", "bin/sh"), ("self", "etc/hl"), ("later", "zzz/later"),
])
def test_hostile_hardlinks(httpserver, sandbox, case, link):
    """Hardlinks to outside, missing, non-regular or later targets: skipped with a
    warning or refused; no link to anything outside OUTPUT_DIR."""
    def edit(toc):
        toc["entries"].append({"name": "etc/hl", "type": "hardlink", "linkName": link, "mode": 0o644})
        if case == "later":
            toc["entries"].append(dict(_toc_entry(toc, TARGET_FILE), name="zzz/later"))
    blob, toc_json = forge_basic(edit)
    reg, image = _serve(httpserver, blob, toc_json)
    rc, out, err = run_cli("--no-progress", "get", image, "etc", sandbox.out)
    sandbox.assert_untouched()
    if rc in (6, 9):
        _refused(rc, err, sandbox, (6, 9))
        return
    assert rc == 0, err
    assert "etc/hl" in err, "skipped without a warning: %r" % err
    assert_final_tree(sandbox.out, "etc", complete=True)
    hl = os.path.join(sandbox.out, "etc", "hl")
    assert not os.path.lexists(hl)


def _whiteout_layer(entries):
    """A tiny eStargz blob with only a TOC (no payload): for whiteout / dir-only layers."""
    raw = json.dumps({"version": 1, "entries": entries}).encode()
    return toc_member(raw) + estargz_footer(0), raw


def test_hostile_whiteouts_in_upper_layer(httpserver, sandbox):
    """Layer 1 whites out `etc` (legit) and tries `../.wh.canary`, `/../.wh.keep.txt`,
    `../canary/.wh.keep.txt`: the legit one hides etc, the others hide nothing and
    delete nothing on disk."""
    upper, upper_json = _whiteout_layer([
        {"name": ".wh.etc", "type": "reg", "mode": 0o644},
        {"name": "../.wh.canary", "type": "reg", "mode": 0o644},
        {"name": "/../.wh.keep.txt", "type": "reg", "mode": 0o644},
        {"name": "../canary/.wh.keep.txt", "type": "reg", "mode": 0o644},
        {"name": "bin/.wh..wh..opq/../..", "type": "reg", "mode": 0o644},
    ])
    reg = OCIServer(httpserver)
    reg.add_image("fixtures/hostile", [basic_blob(), upper],
                  annotations=[{TOC_DIGEST_ANNOTATION: BASIC_LAYER["toc_digest"]},
                               {TOC_DIGEST_ANNOTATION: sha256_digest(upper_json)}])
    rc, out, err = run_cli("--no-progress", "get", reg.image("fixtures/hostile"), ".", sandbox.out)
    sandbox.assert_untouched()
    if rc in (6, 9):
        _refused(rc, err, sandbox, (6, 9))
        return
    assert rc == 0, err
    files = {p: e for p, e in BASIC_FILES.items() if p != "etc" and not p.startswith("etc/")}
    assert_final_tree(sandbox.out, "", files=files, complete=True)


@pytest.mark.parametrize("honest_digest", [False, True])
def test_member_inflating_past_declared_size(httpserver, sandbox, honest_digest):
    """etc/passwd declares 10 bytes (its member inflates to far more): only 10 bytes
    may be written; with the real digest the check fails (exit 8), with the digest of
    the first 10 bytes it passes."""
    head = file_bytes(TARGET_FILE)[:10]

    def edit(toc):
        e = _toc_entry(toc, TARGET_FILE)
        e["size"] = 10
        if honest_digest:
            e["digest"] = e["chunkDigest"] = sha256_digest(head)
    blob, toc_json = forge_basic(edit)
    reg, image = _serve(httpserver, blob, toc_json)
    rc, out, err = run_cli("--no-progress", "get", image, TARGET_FILE, sandbox.out)
    sandbox.assert_untouched()
    final = os.path.join(sandbox.out, "etc", "passwd")
    if honest_digest:
        assert rc == 0, err
        with open(final, "rb") as f:
            assert f.read() == head
    else:
        line = _one_error_line(rc, err, 8)
        assert TARGET_FILE in line
        assert not os.path.exists(final)
        assert_final_tree(sandbox.out, TARGET_FILE, err)


def test_decompression_bomb_member_writes_only_declared_bytes(httpserver, sandbox):
    """A new entry whose member inflates to 64 MiB of zeros but declares 16 bytes:
    16 bytes written, quickly, and nothing else."""
    original = basic_blob()
    off = BASIC_TOC_OFFSET
    bomb = gzip.compress(b"\0" * (64 << 20), 9)
    toc = basic_toc()
    toc["entries"].append({"name": "bomb.bin", "type": "reg", "size": 16, "mode": 0o644, "offset": off,
                           "digest": sha256_digest(b"\0" * 16), "chunkDigest": sha256_digest(b"\0" * 16)})
    raw = json.dumps(toc).encode()
    blob = original[:off] + bomb + toc_member(raw) + estargz_footer(off + len(bomb))
    reg, image = _serve(httpserver, blob, raw)
    started = time.time()
    rc, out, err = run_cli("--no-progress", "get", image, "bomb.bin", sandbox.out)
    assert rc == 0, err
    assert time.time() - started < 20
    with open(os.path.join(sandbox.out, "bomb.bin"), "rb") as f:
        assert f.read() == b"\0" * 16
    sandbox.assert_untouched()


REFUSED_TOCS = [
    # (id, edit(toc) or raw bytes, exit codes)
    ("size-1e15", lambda t: _toc_entry(t, TARGET_FILE).update(size=10 ** 15), (6,)),
    ("size-negative", lambda t: _toc_entry(t, TARGET_FILE).update(size=-1), (6,)),
    ("size-float", lambda t: _toc_entry(t, TARGET_FILE).update(size=71.5), (6,)),
    ("size-string", lambda t: _toc_entry(t, TARGET_FILE).update(size="71"), (6,)),
    ("offset-negative", lambda t: _toc_entry(t, TARGET_FILE).update(offset=-5), (6,)),
    ("offset-at-toc", lambda t: _toc_entry(t, TARGET_FILE).update(offset=BASIC_TOC_OFFSET), (6,)),
    ("offset-past-toc", lambda t: _toc_entry(t, TARGET_FILE).update(offset=BASIC_TOC_OFFSET + 100), (6,)),
    ("offset-past-blob", lambda t: _toc_entry(t, TARGET_FILE).update(offset=10 ** 12), (6,)),
    ("chunk-offset-negative", lambda t: [e for e in t["entries"] if e.get("name") == BIG][1].update(chunkOffset=-1),
     (6,)),
    ("chunk-gap", lambda t: [e for e in t["entries"] if e.get("name") == BIG][2].update(chunkOffset=600000), (6,)),
    ("chunk-orphan", lambda t: t["entries"].insert(0, {"name": "x", "type": "chunk", "offset": 210,
                                                      "chunkOffset": 0, "chunkSize": 5}), (6,)),
    ("version-2", lambda t: t.update(version=2), (6,)),
    ("version-string", lambda t: t.update(version="1"), (6,)),
    ("version-missing", lambda t: t.pop("version"), (6,)),
    ("entries-not-list", lambda t: t.update(entries={"a": 1}), (6,)),
    ("entry-not-object", lambda t: t["entries"].append([1, 2]), (6,)),
    ("unknown-type", lambda t: _toc_entry(t, TARGET_FILE).update(type="socket"), (6,)),
    ("bad-digest", lambda t: _toc_entry(t, TARGET_FILE).update(digest="md5:abc"), (6,)),
    ("json-truncated", b'{"version":1,"entries":[{"name":"a","type":"dir"', (6,)),
    ("json-not-utf8", b'{"version":1,"entries":[{"name":"\xff\xfe","type":"dir"}]}', (6,)),
    ("json-array", b"[]", (6,)),
    ("json-deep", b"[" * 100000 + b"]" * 100000, (6,)),
    ("json-empty", b"", (6,)),
]


@pytest.mark.parametrize("case,edit,codes", REFUSED_TOCS, ids=[c for c, _, _ in REFUSED_TOCS])
@pytest.mark.parametrize("annotate", [True, False], ids=["annotated", "unannotated"])
def test_hostile_toc_is_refused(httpserver, sandbox, case, edit, codes, annotate):
    """Structural nonsense in the TOC refuses the layer: one line, exit 6, nothing written."""
    if isinstance(edit, bytes):
        blob, toc_json = forge_basic(raw_toc=edit)
    else:
        blob, toc_json = forge_basic(edit)
    reg, image = _serve(httpserver, blob, toc_json, annotate=annotate)
    rc, out, err = run_cli("--no-progress", "get", image, ".", sandbox.out)
    _refused(rc, err, sandbox, codes)


def test_absurd_but_bounded_size_is_not_preallocated(httpserver, sandbox):
    """etc/passwd claims 1 TiB (under the parser's hard limit) from a 148-byte member:
    the command is refused whole (one line, nothing written) or etc/passwd fails and is
    named; no terabyte-sized (sparse) file is left behind either way."""
    blob, toc_json = forge_basic(lambda t: _toc_entry(t, TARGET_FILE).update(size=1 << 40))
    reg, image = _serve(httpserver, blob, toc_json)
    rc, out, err = run_cli("--no-progress", "get", image, "etc", sandbox.out)
    sandbox.assert_untouched()
    for dirpath, dirnames, filenames in os.walk(sandbox.out):
        for name in filenames:
            size = os.lstat(os.path.join(dirpath, name)).st_size
            assert size < (1 << 30), "%s is %d bytes (apparent) after a refused 1 TiB entry" % (name, size)
    if rc == 11:
        assert assert_final_tree(sandbox.out, "etc", err) == [TARGET_FILE]
    else:
        _refused(rc, err, sandbox, (6, 8, 10))


FOOTERS = [
    ("into-toc-member", lambda blob: BASIC_TOC_OFFSET + 1),
    ("past-end", lambda blob: len(blob) + 100),
    ("at-footer", lambda blob: len(blob) - 51),
    ("zero", lambda blob: 0),
    ("into-payload", lambda blob: 109777 + 7),
    ("huge", lambda blob: (1 << 64) - 1),
]


@pytest.mark.parametrize("case,where", FOOTERS, ids=[c for c, _ in FOOTERS])
def test_hostile_footer_offset(httpserver, sandbox, case, where):
    """A footer whose TOC offset points anywhere but at the TOC: exit 6, one line."""
    blob, toc_json = forge_basic()
    blob = blob[:-51] + estargz_footer(where(blob))
    reg, image = _serve(httpserver, blob, toc_json, annotate=False)
    rc, out, err = run_cli("--no-progress", "get", image, ".", sandbox.out)
    _refused(rc, err, sandbox, (6,))


def test_garbage_footer_is_not_estargz(httpserver, sandbox):
    blob = basic_blob()[:-51] + os.urandom(51)
    reg, image = _serve(httpserver, blob)
    rc, out, err = run_cli("--no-progress", "get", image, ".", sandbox.out)
    _refused(rc, err, sandbox, (6,))


@pytest.mark.parametrize("served", ["truncated", "longer"])
def test_blob_size_differs_from_manifest(httpserver, sandbox, served):
    """The registry serves fewer bytes than the manifest's layer size: refused; more
    bytes: starget only ever reads the declared size, so it works (exact)."""
    reg = OCIServer(httpserver)
    full = basic_blob()
    reg.add_image("fixtures/hostile", [full],
                  annotations=[{TOC_DIGEST_ANNOTATION: BASIC_LAYER["toc_digest"]}])
    data = full[:len(full) * 4 // 5] if served == "truncated" else full + b"\0" * 4096
    for store in [reg.blobs] + [r["blobs"] for r in reg.repos.values()]:
        if BASIC_BLOB in store:
            store[BASIC_BLOB] = data
    rc, out, err = run_cli("--retries", "1", "--no-progress", "get", reg.image("fixtures/hostile"), "etc",
                           sandbox.out)
    if served == "longer":
        assert rc == 0, err
        assert_final_tree(sandbox.out, "etc", complete=True)
        sandbox.assert_untouched()
        return
    _refused(rc, err, sandbox, (5, 6, 8))


def test_toc_digest_mismatch_exit_8(httpserver, sandbox):
    blob, toc_json = forge_basic(lambda t: _toc_entry(t, TARGET_FILE).update(mode=0o4755))
    reg = OCIServer(httpserver)
    reg.add_image("fixtures/hostile", [blob], annotations=[{TOC_DIGEST_ANNOTATION: BASIC_LAYER["toc_digest"]}])
    rc, out, err = run_cli("--no-progress", "get", reg.image("fixtures/hostile"), ".", sandbox.out)
    line = _refused(rc, err, sandbox, (8,))
    assert "TOC" in line or "toc" in line


@pytest.mark.parametrize("case", ["file-digest", "chunk-digest", "whole-file-digest"])
def test_content_digest_mismatch(httpserver, sandbox, case):
    """A file (or one chunk) whose bytes do not match the TOC: alone -> exit 8, with
    others -> exit 11, the others exact; the bad file never under its final name."""
    bad = TARGET_FILE if case == "file-digest" else BIG

    def edit(toc):
        if case == "file-digest":
            e = _toc_entry(toc, TARGET_FILE)
            e["digest"] = e["chunkDigest"] = sha256_digest(b"something else")
        elif case == "chunk-digest":
            [e for e in toc["entries"] if e.get("name") == BIG][5]["chunkDigest"] = sha256_digest(b"x")
        else:   # every chunk right, the whole-file digest wrong
            _toc_entry(toc, BIG, "reg")["digest"] = sha256_digest(b"x")
    blob, toc_json = forge_basic(edit)
    reg, image = _serve(httpserver, blob, toc_json)
    rc, out, err = run_cli("--retries", "1", "--no-progress", "get", image, bad, sandbox.out)
    line = _one_error_line(rc, err, 8)
    assert bad in line
    assert_final_tree(sandbox.out, bad, err)
    assert not os.path.exists(os.path.join(sandbox.out, *bad.split("/")))
    parent = bad.split("/")[0]
    rc, out, err = run_cli("--retries", "1", "--no-progress", "get", image, parent, sandbox.out)
    assert rc == 11, (rc, err)
    assert bad in err
    missing = assert_final_tree(sandbox.out, parent, err)
    assert missing == [bad]
    sandbox.assert_untouched()


# =============================================================================
# 4. properties (hypothesis)
# =============================================================================

def _only_stargz_error(fn, *args):
    """Call fn; a StargzError is fine (returns None), anything else fails the test."""
    try:
        return fn(*args)
    except starget.StargzError as e:
        assert isinstance(e.code, starget.ErrorCode)
        assert isinstance(e.message, str) and e.message
        return None


def _flip(data, flips):
    data = bytearray(data)
    for pos, mask in flips:
        data[-1 - pos] ^= mask
    return bytes(data)


def _toc_doc(entries, version=1):
    return json.dumps({"version": version, "entries": entries}, allow_nan=True).encode()


def _check_toc(toc, toc_offset=None):
    """Invariants of a LayerTOC that parse_toc accepted."""
    for e in toc.entries:
        assert isinstance(e.path, str) and "\x00" not in e.path
        parts = e.path.split("/")
        assert not e.path.startswith("/") and ".." not in parts and (e.path == "" or "" not in parts), e.path
        if e.type == "reg" and e.size:
            pos = 0
            for c in e.chunks:
                assert c.file_offset == pos and c.size > 0 and c.offset > 0, (e.path, c)
                if toc_offset is not None:
                    assert c.offset < c.end <= toc_offset, (e.path, c)
                pos += c.size
            assert pos == e.size
        if e.type == "hardlink":
            assert e.link_target is not None and e.link_target.type == "reg"


def _quote(v):
    return '"%s"' % v.replace("\\", "\\\\").replace('"', '\\"')


if given is None:  # pragma: no cover
    @pytest.mark.skip(reason="hypothesis not installed")
    def test_properties_need_hypothesis():
        pass
else:
    PROP = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])
    json_scalars = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
                    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
    json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                               | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
    toc_keys = st.sampled_from(["name", "type", "size", "offset", "chunkOffset", "chunkSize", "chunkDigest",
                                "digest", "linkName", "mode", "uid", "gid", "modtime", "innerOffset",
                                "devMajor", "devMinor", "xattrs", "userName"]) | st.text(max_size=6)
    toc_types = st.sampled_from(["dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"])
    toc_names = st.sampled_from(["etc/passwd", "data/big.bin", "../x", "/abs", "", ".", "a/../../b", "x\x00y",
                                 ".wh.etc", "bin/sh", "a", "a/b"]) | st.text(max_size=12)
    footers = st.builds(lambda off, flips, pre: _flip(pre + estargz_footer(off), flips),
                        st.integers(0, (1 << 64) - 1),
                        st.lists(st.tuples(st.integers(0, 50), st.integers(1, 255)), max_size=3),
                        st.binary(max_size=20))

    @PROP
    @given(st.binary(max_size=200) | footers)
    def test_prop_parse_footer(tail):
        result = _only_stargz_error(starget.parse_footer, tail)
        if result is not None:
            off, size = result
            assert isinstance(off, int) and off >= 0
            assert size in (starget.FOOTER_SIZE, starget.LEGACY_FOOTER_SIZE)

    @PROP
    @given(st.integers(0, (1 << 64) - 1), st.binary(max_size=64))
    def test_prop_parse_footer_round_trip(offset, prefix):
        assert starget.parse_footer(prefix + estargz_footer(offset)) == (offset, starget.FOOTER_SIZE)

    @PROP
    @given(st.binary(max_size=300))
    def test_prop_parse_toc_bytes(data):
        toc = _only_stargz_error(starget.parse_toc, data)
        if toc is not None:
            _check_toc(toc)

    @PROP
    @given(st.lists(st.dictionaries(toc_keys, json_values, max_size=6) | json_values, max_size=6), json_values)
    def test_prop_parse_toc_json(entries, version):
        for doc in (_toc_doc(entries), _toc_doc(entries, version),
                    json.dumps({"version": 1, "entries": version}, allow_nan=True).encode()):
            toc = _only_stargz_error(starget.parse_toc, doc, 1 << 20)
            if toc is not None:
                _check_toc(toc, 1 << 20)

    @PROP
    @given(st.lists(st.fixed_dictionaries(
        {"name": toc_names, "type": toc_types},
        optional={"size": st.integers(-2, 1 << 20), "offset": st.integers(-2, 5000),
                  "chunkOffset": st.integers(-2, 1 << 20), "chunkSize": st.integers(-2, 1 << 20),
                  "innerOffset": st.integers(-2, 5000), "linkName": toc_names,
                  "digest": st.just("sha256:" + "a" * 64)}), max_size=10))
    def test_prop_parse_toc_structured(entries):
        toc = _only_stargz_error(starget.parse_toc, _toc_doc(entries), 4096)
        if toc is not None:
            _check_toc(toc, 4096)

    @PROP
    @given(st.integers(0, 200), toc_keys, json_values, st.booleans())
    def test_prop_parse_toc_mutated_real(index, key, value, delete):
        """basic's real TOC with one field of one entry replaced (or removed)."""
        toc = basic_toc()
        entry = toc["entries"][index % len(toc["entries"])]
        if delete:
            entry.pop(key, None)
        else:
            entry[key] = value
        data = json.dumps(toc, allow_nan=True).encode()
        parsed = _only_stargz_error(starget.parse_toc, data, BASIC_TOC_OFFSET)
        if parsed is not None:
            _check_toc(parsed, BASIC_TOC_OFFSET)

    @PROP
    @given(st.text(max_size=80)
           | st.from_regex(r"\A[a-z0-9.:\[\]-]{0,12}/[a-z0-9._/-]{0,20}(:[\w.-]{0,10})?(@sha256:[0-9a-f]{0,64})?\Z"))
    def test_prop_image_ref_parse(text):
        ref = _only_stargz_error(starget.ImageRef.parse, text)
        if ref is not None:
            assert ref.repository and ref.registry and (ref.tag or ref.digest)
            again = starget.ImageRef.parse(str(ref))
            assert again == ref and str(again) == str(ref)

    @PROP
    @given(st.text(max_size=120))
    def test_prop_parse_www_authenticate_any(text):
        result = _only_stargz_error(starget.parse_www_authenticate, text)
        if result is not None:
            scheme, params = result
            assert isinstance(scheme, str) and isinstance(params, dict)
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items())

    @PROP
    @given(st.sampled_from(["Bearer", "Basic", "bearer"]),
           st.dictionaries(st.from_regex(r"\A[a-z][a-z0-9_]{0,8}\Z"),
                           st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
                           min_size=1, max_size=4))
    def test_prop_parse_www_authenticate_round_trip(scheme, params):
        header = scheme + " " + ",".join("%s=%s" % (k, _quote(v)) for k, v in params.items())
        got_scheme, got = starget.parse_www_authenticate(header)
        assert got_scheme == scheme.lower()
        assert got == params

    @PROP
    @given(st.text(max_size=60)
           | st.lists(st.sampled_from(["..", ".", "", "a", "b", "\x00", " ", "..."]), max_size=6).map("/".join))
    def test_prop_normalize_path(name):
        path = _only_stargz_error(starget.normalize_path, name)
        if path is not None:
            parts = path.split("/")
            assert "\x00" not in path and not path.startswith("/") and ".." not in parts and "." not in parts
            assert path == "" or "" not in parts
            assert starget.normalize_path(path) == path

    @PROP
    @example("\xb2")                                # "²".isdigit() is True, float("²") is not
    @example("Mon, 01 Jan 99999 00:00:00 GMT")     # parsedate_tz accepts, the year overflows
    @given(st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=40)
           | st.text(alphabet="0123456789\xb2\xb3\xb9 .-", max_size=12)
           | st.from_regex(r"\A[A-Za-z]{3}, \d{1,2} [A-Za-z]{3} \d{1,6} \d\d:\d\d:\d\d( GMT| [+-]\d{4})?\Z"))
    def test_prop_parse_retry_after(value):
        """A server's Retry-After header (latin-1): seconds >= 0 or None, never a crash."""
        result = _only_stargz_error(starget.parse_retry_after, value)
        assert result is None or result >= 0

    @PROP
    @given(st.binary(max_size=600) | st.binary(max_size=600).map(gzip.compress))
    def test_prop_extract_toc_json(member):
        _only_stargz_error(starget.extract_toc_json, member)


# =============================================================================
# 5. secrets
# =============================================================================

def _assert_no_secret(secrets, *texts):
    for secret in secrets:
        for text in texts:
            assert secret not in text, "a secret (%s...) was printed" % secret[:4]


def _files_containing(root, secrets):
    hits = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            try:
                with open(os.path.join(dirpath, name), "rb") as f:
                    data = f.read()
            except OSError:
                continue
            hits += [os.path.join(dirpath, name) for s in secrets if s.encode() in data]
    return hits


def _basic_secrets(reg):
    b64 = base64.b64encode(reg.credential.encode()).decode()
    return [reg.password, b64, "Basic " + b64]


def test_debug_never_prints_basic_secrets(registry_basic, make_proxy, tmp_path):
    """--debug on a Basic registry (a redirect included): the password and the Basic
    value appear nowhere in stdout, stderr, the cache or the output."""
    secrets = _basic_secrets(registry_basic)
    storage = make_proxy(registry_basic.addr, storage_auth=secrets[2])
    front = make_proxy(registry_basic.addr)
    front.add("redirect", path="/blobs/", where=payload_of_basic, location="http://localhost:%d" % storage.port)
    cache = str(tmp_path / "cache")
    out = str(tmp_path / "out")
    rc, stdout, stderr = run_cli("--debug", "--credential", registry_basic.credential, "get", front.image(), "etc",
                                 out, env={"STARGET_CACHE_DIR": cache})
    assert rc == 0, stderr
    assert "> GET" in stderr, "--debug logged no request lines"
    _assert_no_secret(secrets, stdout, stderr)
    assert _files_containing(cache, secrets) == [] and _files_containing(out, secrets) == []
    rc, stdout, stderr = run_cli("--debug", "--credential", registry_basic.credential, "cat", front.image(),
                                 TARGET_FILE, env={"STARGET_CACHE_DIR": cache})
    assert rc == 0, stderr
    _assert_no_secret(secrets, stderr)


def test_debug_wrong_password_never_printed(registry_basic):
    wrong = "Wr0ng-pass-%s" % os.urandom(4).hex()
    cred = "%s:%s" % (registry_basic.user, wrong)
    b64 = base64.b64encode(cred.encode()).decode()
    rc, stdout, stderr = run_cli("--debug", "--credential", cred, "ls", registry_basic.image("basic"))
    assert rc == 4, stderr
    _assert_no_secret([wrong, b64], stdout, stderr)
    assert len(error_lines(stderr)) == 1


def test_debug_never_prints_bearer_token(registry_bearer, make_proxy, tmp_path):
    """--debug on a Bearer registry (with credentials): the password and every token
    the registry saw appear nowhere in the output."""
    proxy = make_proxy(registry_bearer.addr)
    cache = str(tmp_path / "cache")
    rc, stdout, stderr = run_cli("--debug", "--credential", registry_bearer.credential, "get", proxy.image(),
                                 "etc", str(tmp_path / "out"), env={"STARGET_CACHE_DIR": cache})
    assert rc == 0, stderr
    tokens = set()
    for r in proxy.requests():
        for k, v in r["headers"].items():
            if k.lower() == "authorization" and v.lower().startswith("bearer "):
                tokens.add(v.split(" ", 1)[1])
    assert tokens, "no Bearer token reached the registry"
    secrets = sorted(tokens) + [t.split(".")[-1] for t in tokens if t.count(".") == 2] + _basic_secrets(registry_bearer)
    _assert_no_secret(secrets, stdout, stderr)
    assert _files_containing(cache, secrets) == []


def test_redirect_drops_bearer_authorization(registry_bearer, make_proxy, sandbox):
    """Bearer registry, blobs redirected to another host: the token does not go there."""
    front = make_proxy(registry_bearer.addr)

    def borrowed():
        # the storage side reads the real registry with the token the client sent to
        # the registry (the proxy may copy it; the client must not send it there)
        for r in reversed(front.requests()):
            for k, v in r["headers"].items():
                if k.lower() == "authorization":
                    return v
        return None
    storage = make_proxy(registry_bearer.addr, storage_auth=borrowed)
    fault = front.add("redirect", path="/blobs/", where=payload_of_basic, times=None,
                      location="http://localhost:%d" % storage.port)
    rc, out, err = run_cli("--credential", registry_bearer.credential, "get", front.image(), TARGET_FILE,
                           sandbox.out)
    assert fault.fired >= 1
    assert storage.requests(), "nothing fetched from the redirect target"
    leaked = [r["path"] for r in storage.requests() if any(k.lower() == "authorization" for k in r["headers"])]
    assert leaked == [], "the Bearer token was sent to the other host"
    assert rc == 0, err
    assert_final_tree(sandbox.out, TARGET_FILE, complete=True)


# ---- TLS: an https registry that redirects to plain http ---------------------

@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl not found")
    d = tmp_path_factory.mktemp("tls")
    key, cert = str(d / "key.pem"), str(d / "cert.pem")
    p = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    if p.returncode != 0:
        pytest.skip("openssl could not make a certificate: %s" % p.stderr.decode()[-300:])
    return cert, key


@pytest.fixture
def https_server(tls_cert):
    import ssl
    from pytest_httpserver import HTTPServer
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*tls_cert)
    srv = HTTPServer(host="127.0.0.1", port=0, ssl_context=ctx)
    srv.start()
    try:
        yield srv
    finally:
        srv.clear()
        if srv.is_running():
            srv.stop()


@pytest.fixture
def plain_server():
    from pytest_httpserver import HTTPServer
    srv = HTTPServer(host="127.0.0.1", port=0)
    srv.start()
    try:
        yield srv
    finally:
        srv.clear()
        if srv.is_running():
            srv.stop()


def test_https_to_http_redirect_refused_by_transport(https_server, plain_server, tls_cert):
    https_server.expect_request("/x").respond_with_data(
        "", status=307, headers={"Location": "http://127.0.0.1:%d/y" % plain_server.port})
    plain_server.expect_request("/y").respond_with_data("plain")
    t = starget.Transport(cafile=tls_cert[0], environ={}, certs_dirs=(),
                          retry=starget.RetryPolicy(retries=0, base=0.01))
    with pytest.raises(starget.StargzError) as info:
        t.request("GET", "https://127.0.0.1:%d/x" % https_server.port,
                  headers={"Authorization": "Bearer s3cr3t-token-value"})
    t.close()
    assert info.value.code == starget.ErrorCode.NETWORK
    assert "http" in info.value.message and "s3cr3t" not in info.value.message
    assert len(plain_server.log) == 0, "the plain-http target was contacted"


def test_https_registry_redirecting_blobs_to_http_is_refused(https_server, plain_server, tls_cert, sandbox):
    """An https registry (Basic auth) answers blob GETs with 307 to plain http: the
    download fails (network), the plain host sees no request and no credential."""
    storage = OCIServer(plain_server, storage=True)
    reg = OCIServer(https_server, auth=("basic", "alice", "pw-s3cr3t-xyz"),
                    redirect_to="http://127.0.0.1:%d" % plain_server.port)
    reg.add_image("fixtures/basic", [basic_blob()], annotations=[{TOC_DIGEST_ANNOTATION: BASIC_LAYER["toc_digest"]}])
    storage.blobs.update(reg.blobs)
    image = reg.image("fixtures/basic")
    client = fast_client(image, retries=1, credential="alice:pw-s3cr3t-xyz", cafile=tls_cert[0], plain_http=False)
    with pytest.raises(starget.StargzError) as info:
        index = starget.open_image(image, client=client, cache=None)
        starget.Downloader(client).download(index, TARGET_FILE, sandbox.out)
    client.transport.close()
    assert info.value.code == starget.ErrorCode.NETWORK, info.value.message
    assert "pw-s3cr3t" not in info.value.message
    assert storage.requests == [], "the plain-http host was contacted"
    assert any("authorization" in (k.lower() for k in h) for m, p, h in reg.requests), "no authenticated request"
    sandbox.assert_out_empty()


def test_https_registry_with_cacert_works(https_server, tls_cert, sandbox):
    """Sanity for the two tests above: the same https registry without the redirect works."""
    reg = OCIServer(https_server)
    reg.add_image("fixtures/basic", [basic_blob()], annotations=[{TOC_DIGEST_ANNOTATION: BASIC_LAYER["toc_digest"]}])
    image = reg.image("fixtures/basic")
    stats = api_get(image, TARGET_FILE, sandbox.out, cafile=tls_cert[0], plain_http=False)
    assert stats.failures == []
    assert_final_tree(sandbox.out, TARGET_FILE, complete=True)
