# SPDX-License-Identifier: Apache-2.0
# Copyright The starget authors.
"""Tests for starget: the whole suite, in one file.

Layout: sections mirror starget.py's, in the same order and with the same `# ===`
banners; `# ---- section: topic` lines open a subsection. A test is in the section of
the code it is about (a fault on the wire is transport; resume is download).

  test infrastructure  not a section of starget.py: what the fixtures are (from
                       EXPECTED.json), small shared helpers, the `basic` fixture as the
                       reliability tests use it, FaultProxy (a fault-injecting reverse
                       proxy), Workspace output directories and final-tree
                       checks, the shared hypothesis settings
  errors               exit codes, StargzError, main() returning the code
  logging              --debug request lines; secrets (passwords, Basic values, tokens)
                       never printed, never written
  references           ImageRef.parse (examples and properties)
  credentials          --credential, auth files in their documented order, podman keys,
                       credential helpers (unit and end to end)
  config               parse_simple_yaml and Config (config.yaml)
  transport            redirects and Authorization, Range ignored, retries, connection
                       reuse; faults on the wire (reset, truncation, flipped bytes, 429/503
                       + Retry-After, 500s, stalls, 200-for-Range, 416); TLS (https
                       registries, --cacert, certs.d, SSL_CERT_FILE, -k); forward proxies
  registry             Basic and Bearer auth, digests, not found; WWW-Authenticate parsing
  estargz format       parse_footer, parse_toc (fixtures, malformed, fuzzed, properties)
  image index          links, whiteouts, lookups; requests per layer, the TOC cache
  download             the API, `get` and `cat`; the fewest requests; resume after kill -9
                       or SIGINT; hostile images (names, links, sizes, offsets, footers,
                       digests)
  cli                  end to end over every fixture; output and commands;
                       --fallback-stream; the vendoring example; complete_paths and the
                       completion scripts (bash, zsh, fish)

What runs against what:
- the REAL registry (Debian's docker-registry, started once per session by
  testdata/harness.py in three modes: anonymous `registry_anon`, htpasswd Basic
  `registry_basic`, Bearer token `registry_bearer`; and an HTTPS one, `tls_registry`,
  for the TLS tests): the happy paths, every fixture end to end, credentials end to
  end, logging, the faults (FaultProxy sits between starget and the registry), resume,
  the TOC cache, proxies, and bash completion with a real `starget` on PATH;
- pytest-httpserver (harness.OCIServer on the `httpserver` fixture): what a real
  registry will not do on demand: redirects to another host, ignoring Range, 503 on
  the manifest, https-to-http redirects, hostile blobs and TOCs;
- neither: unit tests (parsers, Config, Credentials.lookup, complete_paths, range
  plans, completion scripts with a stand-in starget) and hypothesis properties.
Expected results come from testdata/fixtures/EXPECTED.json only.

Run:  bash .ci/test                      (installs what is missing, then runs this file)
      python -m pytest -q test_starget.py
      STARGET_REQUIRE_REGISTRY=1 python -m pytest -q test_starget.py
                                         (fail instead of skip without a registry)
"""
import argparse
import base64
import email.utils
import errno
import gzip
import hashlib
import http.client
import http.server
import io
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
import uuid
import zlib

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "testdata"))
sys.path.insert(0, HERE)

from harness import (  # noqa: E402
    IS_ROOT, REPO, STARGET, TOC_DIGEST_ANNOTATION, all_layouts, ForwardProxy, OCIServer, assert_one_line_error,
    blob_bytes, compare_tree, error_lines, estargz_footer, expected_files, expected_fixture,
    expected_ls, expected_ref, helper_calls, hermetic_env, legacy_footer, load_expected, project_ls,
    read_toc, rewrite_toc, run_cli, sha256_digest, snapshot_dir, start_tls_registry, toc_member,
    walk_tree, write_credential_helper,
    registry_anon, registry_basic, registry_bearer,  # noqa: F401  (pytest fixtures)
)

import starget  # noqa: E402
from starget import ErrorCode, StargzError  # noqa: E402

try:
    from hypothesis import example, given, settings, HealthCheck, strategies as st
except ImportError:  # pragma: no cover
    given = None


def _hypothesis(fn):
    """Skip a property test when hypothesis is missing."""
    if given is None:
        return pytest.mark.skip(reason="hypothesis not installed")(fn)
    return fn


# =============================================================================
# test infrastructure (shared by several sections; not a section of starget.py)
# =============================================================================

# ---- what the fixtures are (all derived from EXPECTED.json) -----------------

def _image_variants():
    """[(layout, ref, platform|None, expected_manifest)] for every image of every fixture."""
    out = []
    for layout, fx in sorted(load_expected()["fixtures"].items()):
        for ref, r in fx["refs"].items():
            if r.get("kind") == "index":
                for plat in sorted(r["manifests"]):
                    out.append((layout, ref, plat, r["manifests"][plat]))
            else:
                out.append((layout, ref, None, r))
    return out


def _readable(manifest):
    """Every layer lazily readable: eStargz (gzip) or zstd:chunked (with a zstd decoder)."""
    return all(l.get("estargz") and (l.get("compression") == "gzip" or (l.get("compression") == "zstd" and ZSTD))
               for l in manifest["layers"])


try:
    from compression import zstd as ZSTD     # noqa: F401  (Python 3.14+)
except ImportError:
    try:
        from backports import zstd as ZSTD   # noqa: F401  (the test extra installs it on 3.9-3.13)
    except ImportError:
        ZSTD = None
ALL_VARIANTS = _image_variants()
READABLE = [(lay, ref, plat) for lay, ref, plat, m in ALL_VARIANTS if _readable(m)]
READABLE_IDS = ["%s:%s%s" % (lay, ref, "@" + plat if plat else "") for lay, ref, plat in READABLE]


def _layout_of_kind(pred):
    """Layouts whose (single-manifest) layers satisfy pred(layer)."""
    return sorted({lay for lay, ref, plat, m in ALL_VARIANTS
                   if any(pred(l) for l in m["layers"])})


PLAIN_GZIP_LAYOUTS = _layout_of_kind(lambda l: not l.get("estargz") and l.get("compression") == "gzip")
ZSTD_LAYOUTS = _layout_of_kind(lambda l: l.get("compression") == "zstd")


def _plat_args(platform):
    return ["--platform", platform] if platform else []


def _first_ref(layout):
    return next(iter(expected_fixture(layout)["refs"]))


def _reg_files(files):
    return {p: e for p, e in files.items() if e["type"] == "reg"}


class Workspace(object):
    """base/parent/out (the OUTPUT_DIR, created empty) next to base/parent/canary/keep.txt
    (which must stay), snapshotted so that a test can prove nothing was written outside."""

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

    assert_nothing_outside = assert_untouched

    def assert_out_empty(self):
        left = os.listdir(self.out) if os.path.isdir(self.out) else []
        assert left == [], "files written although the command failed: %r" % left

    def tree(self):
        return walk_tree(self.out)


@pytest.fixture
def ws(tmp_path):
    return Workspace(tmp_path)


def _ls_json(*args, **kw):
    rc, out, err = run_cli(*args, **kw)
    assert rc == 0, "ls failed (%d): %s" % (rc, err)
    try:
        data = json.loads(out)
    except ValueError:
        pytest.fail("ls --json printed no JSON: %r" % out[:500])
    assert isinstance(data, list)
    return data


# ---- small shared helpers ---------------------------------------------------

# the config tests call starget as C, the completion tests as P
C = P = starget


def usage_error(call, *args):
    with pytest.raises(StargzError) as info:
        call(*args)
    assert info.value.code == ErrorCode.USAGE
    return info.value.message


BUSYBOX_SHA = expected_files("basic", "latest")["bin/busybox"]["sha256"]


def _b64(user, password):
    return base64.b64encode(("%s:%s" % (user, password)).encode()).decode()


def _client(registry, layout, **transport_options):
    transport = starget.Transport(retry=starget.RetryPolicy(retries=2, base=0.01), **transport_options)
    return starget.RegistryClient(registry.image(layout), transport=transport)


@pytest.fixture
def api_env(tmp_path, monkeypatch):
    """A hermetic process environment for in-process API calls."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STARGET_CACHE_DIR", str(tmp_path / "cache"))
    for k in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME",
              "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY",
              "all_proxy", "ALL_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path


# ---- the `basic` fixture, as the reliability tests use it -------------------

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


# ---- a fault-injecting reverse proxy in front of the real registry ----------

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
        self.stalled.clear()    # a later test must see its own stall, not an earlier one's

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


# ---- output directories and final-tree checks -------------------------------

@pytest.fixture
def sandbox(tmp_path):
    return Workspace(tmp_path)


def _is_leftover(path):
    return path.endswith(starget._PARTIAL_SUFFIX) or path.endswith(starget._STATE_SUFFIX)


def assert_final_tree(out, prefix, errors="", complete=False, files=None):
    """Every expected entry under `prefix` is exact, or absent and named in `errors`.

    Only `NAME.partial` / `NAME.partial.state` may lie next to final names, and only
    for a file that is absent; with complete=True nothing may be missing or left over.
    Returns the list of missing paths."""
    files = BASIC_FILES if files is None else files
    want = {p: e for p, e in files.items() if p and (not prefix or p == prefix or p.startswith(prefix + "/"))
            and e["type"] not in ("char", "block", "fifo")}   # created only with --devices
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
        assert p in errors, "%s is missing but no error names it: %r" % (p, errors)
    for p in leftovers:
        final = p[:-len(starget._STATE_SUFFIX)] if p.endswith(starget._STATE_SUFFIX) else p[:-len(starget._PARTIAL_SUFFIX)]
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


def _one_error_line(rc, err, codes):
    codes = (codes,) if isinstance(codes, int) else codes
    assert rc in codes, "exit %r not in %r: %s" % (rc, codes, err)
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and re.match(r"^starget: error: \S", lines[0]), "not one error line: %r" % err
    return lines[0]


def _refused(rc, err, sandbox, codes):
    line = _one_error_line(rc, err, codes)
    sandbox.assert_out_empty()
    sandbox.assert_untouched()
    return line


# ---- properties (hypothesis): shared settings -------------------------------

def _only_stargz_error(fn, *args):
    """Call fn; a StargzError is fine (returns None), anything else fails the test."""
    try:
        return fn(*args)
    except starget.StargzError as e:
        assert isinstance(e.code, starget.ErrorCode)
        assert isinstance(e.message, str) and e.message
        return None


def test_properties_need_hypothesis():
    """The `test` extra installs hypothesis; without it every property test would
    skip and the suite would still pass, so its absence is a failure here."""
    assert given is not None, "hypothesis is not installed: pip install '.[test]'"


if given is not None:
    PROP = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


# =============================================================================
# errors
# =============================================================================

CONTRACT_EXIT_CODES = {
    "INTERNAL": 1, "USAGE": 2, "NOT_FOUND": 3, "AUTH": 4, "NETWORK": 5, "FORMAT": 6,
    "UNSUPPORTED": 7, "INTEGRITY": 8, "UNSAFE": 9, "IO": 10, "PARTIAL": 11, "INTERRUPTED": 130,
}


@pytest.mark.parametrize("name,code", sorted(CONTRACT_EXIT_CODES.items()))
def test_error_codes_match_contract(name, code):
    assert int(getattr(starget.ErrorCode, name)) == code


@pytest.mark.parametrize("name", sorted(CONTRACT_EXIT_CODES))
def test_stargz_error_carries_code_message_cause(name):
    cause = ValueError("root cause")
    e = starget.StargzError(getattr(starget.ErrorCode, name), "something broke", cause=cause,
                            transient=True)
    assert isinstance(e, Exception)
    assert e.transient is True and e.damaged is False and e.retry_after is None
    assert e.code == getattr(starget.ErrorCode, name)
    assert e.exit_code == CONTRACT_EXIT_CODES[name]
    assert "something broke" in str(e)
    assert e.cause is cause


def test_main_returns_exit_code_of_error(tmp_path, monkeypatch, capsys):
    """main() returns (not raises) the documented code and prints one error line."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("STARGET_CACHE_DIR", str(tmp_path / "cache"))
    rc = starget.main(["ls", "Invalid//Reference::"])
    err = capsys.readouterr().err
    assert rc == 2
    assert_one_line_error(rc, err, 2)


# =============================================================================
# logging
# =============================================================================

def test_debug_logs_requests_and_redacts_basic_password(registry_basic):
    rc, out, err = run_cli("--debug", "--credential", registry_basic.credential,
                           "ls", registry_basic.image("basic"))
    assert rc == 0, err
    assert re.search(r"^starget: debug: > GET https?://%s/v2/" % re.escape(registry_basic.addr), err, re.M), err[:2000]
    assert re.search(r"^starget: debug: < \d{3}\b", err, re.M)
    b64 = base64.b64encode(registry_basic.credential.encode()).decode()
    assert registry_basic.password not in err
    assert b64 not in err


def test_debug_redacts_bearer_token(registry_bearer):
    rc, out, err = run_cli("--debug", "--credential", registry_bearer.credential,
                           "ls", registry_bearer.image("basic"))
    assert rc == 0, err
    assert "> GET" in err
    # token-server tokens are JWTs: base64url of '{"typ":"JWT"...' starts with eyJ
    assert not re.search(r"eyJ[A-Za-z0-9_-]{20,}", err), "a bearer token leaked into the debug log"
    assert registry_bearer.password not in err


def test_errors_do_not_leak_password(registry_basic, ws):
    pw = "wrong-" + uuid.uuid4().hex
    rc, out, err = run_cli("--credential", "%s:%s" % (registry_basic.user, pw),
                           "get", registry_basic.image("basic"), "etc/passwd", ws.out)
    assert_one_line_error(rc, err, 4)
    assert pw not in err and pw not in out


# ---- logging: main() leaves the caller's logging as it found it ------------

def test_main_keeps_the_callers_log_handler(api_env, capsys):
    """A program that vendors starget attached its own handler and level: main()
    adds its stderr handler for the call only, and removes nothing else."""
    import logging
    logger = logging.getLogger("starget")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    mine = Keep()
    before = (list(logger.handlers), logger.level, logger.propagate)
    logger.addHandler(mine)
    logger.setLevel(logging.INFO)
    try:
        assert starget.main(["-d", "--retries", "1", "ls", "127.0.0.1:1/x/y"]) == 5
        assert any(m.startswith("retrying") for m in seen), seen      # it heard the run too
        assert "retrying" in capsys.readouterr().err                  # and so did stderr
        assert logger.handlers == before[0] + [mine]
        assert (logger.level, logger.propagate) == (logging.INFO, before[2])
        del seen[:]
        starget._log.info("after main")
        assert seen == ["after main"]
        assert capsys.readouterr().err == ""                          # main's handler is gone
    finally:
        logger.removeHandler(mine)
        logger.setLevel(before[1])
    assert logger.handlers == before[0]


# ---- logging: secrets are never printed, --debug included -------------------

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


# =============================================================================
# references
# =============================================================================

HEX = "a" * 64


@pytest.mark.parametrize("text,registry,repository,tag,digest", [
    ("127.0.0.1:5000/test/img:latest", "127.0.0.1:5000", "test/img", "latest", None),
    ("127.0.0.1:5000/test/img", "127.0.0.1:5000", "test/img", "latest", None),
    ("localhost/foo", "localhost", "foo", "latest", None),
    ("localhost:5000/a/b/c:v1.2-rc_3", "localhost:5000", "a/b/c", "v1.2-rc_3", None),
    ("ubuntu", "registry-1.docker.io", "library/ubuntu", "latest", None),
    ("ubuntu:22.04", "registry-1.docker.io", "library/ubuntu", "22.04", None),
    ("someuser/tool", "registry-1.docker.io", "someuser/tool", "latest", None),
    ("docker.io/library/busybox:1", "registry-1.docker.io", "library/busybox", "1", None),
    ("index.docker.io/busybox", "registry-1.docker.io", "library/busybox", "latest", None),
    ("ghcr.io/org/img@sha256:" + HEX, "ghcr.io", "org/img", None, "sha256:" + HEX),
    ("ghcr.io/org/img:t@sha256:" + HEX, "ghcr.io", "org/img", "t", "sha256:" + HEX),
    ("[::1]:5000/x/y:z", "[::1]:5000", "x/y", "z", None),
])
def test_imageref_parse(text, registry, repository, tag, digest):
    ref = starget.ImageRef.parse(text)
    assert (ref.registry, ref.repository, ref.digest) == (registry, repository, digest)
    if digest is not None and tag is None:
        assert ref.tag in (None, "latest")   # a pinned digest needs no tag
    else:
        assert ref.tag == tag


@pytest.mark.parametrize("text", [
    "", "UPPER/case", "host:5000/repo:bad tag", "repo@sha256:xyz", "repo@md5:" + HEX,
    "host:5000/", "/leading", "repo:", "a//b", " spaced",
])
def test_imageref_parse_rejects(text):
    with pytest.raises(starget.StargzError) as ei:
        starget.ImageRef.parse(text)
    assert ei.value.code == starget.ErrorCode.USAGE


def test_imageref_docker_transport_prefix():
    """skopeo's `docker://IMAGE` is the same image; other transports are refused by name."""
    for text in ("docker://127.0.0.1:5000/test/img:latest", "docker://ubuntu"):
        assert str(starget.ImageRef.parse(text)) == str(starget.ImageRef.parse(text[len("docker://"):]))
    for text in ("oci:/tmp/layout:tag", "docker-archive:/tmp/img.tar", "containers-storage:img",
                 "oci-archive:x.tar", "docker-daemon:img:latest", "dir:/tmp/x"):
        with pytest.raises(StargzError) as ei:
            starget.ImageRef.parse(text)
        assert ei.value.code == ErrorCode.USAGE and "registries only" in ei.value.message
    assert starget.ImageRef.parse("dir:5000/x/y").registry == "dir:5000"


def test_cli_docker_transport_prefix(registry_anon):
    rc, out, err = run_cli("cat", "docker://" + registry_anon.image("basic"), "bin/busybox", binary=True)
    assert rc == 0, err
    assert hashlib.sha256(out).hexdigest() == BUSYBOX_SHA
    rc, out, err = run_cli("ls", "oci:/tmp/layout")
    assert_one_line_error(rc, err, 2)
    assert "registries only" in err


@pytest.mark.parametrize("text", ["img:t\u00e9", "127.0.0.1:1/img:t\u00e9", "127.0.0.1:1/img:v\u0662",
                                  "127.0.0.1:1/img:\u00e9t\u00e9"])
def test_non_ascii_tag_is_a_usage_error(text):
    """A tag is [A-Za-z0-9_.-]: `\\w` would take `é` or an Arabic digit, which no
    registry knows and http.client cannot put in a request line. Exit 2, one line."""
    with pytest.raises(starget.StargzError) as ei:
        starget.ImageRef.parse(text)
    assert ei.value.code == starget.ErrorCode.USAGE
    rc, out, err = run_cli("--retries", "0", "ls", text, timeout=60)
    assert_one_line_error(rc, err, 2)


if given is not None:
    _component = st.from_regex(r"[a-z0-9]{1,8}([._-][a-z0-9]{1,6})?", fullmatch=True)
    _tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)

    @settings(max_examples=150, deadline=None)
    @given(port=st.integers(1, 65535), parts=st.lists(_component, min_size=1, max_size=4), tag=_tag)
    def test_imageref_parse_roundtrip_property(port, parts, tag):
        text = "127.0.0.1:%d/%s:%s" % (port, "/".join(parts), tag)
        ref = starget.ImageRef.parse(text)
        assert ref.registry == "127.0.0.1:%d" % port
        assert ref.repository == "/".join(parts)
        assert ref.tag == tag
        assert starget.ImageRef.parse(str(ref)).repository == ref.repository

    @settings(max_examples=200, deadline=None)
    @given(text=st.text(max_size=80))
    def test_imageref_parse_never_crashes(text):
        try:
            starget.ImageRef.parse(text)
        except starget.StargzError as e:
            assert e.code == starget.ErrorCode.USAGE


if given is not None:
    @PROP
    @given(st.text(max_size=80)
           | st.from_regex(r"\A[a-z0-9.:\[\]-]{0,12}/[a-z0-9._/-]{0,20}(:[\w.-]{0,10})?(@sha256:[0-9a-f]{0,64})?\Z"))
    def test_prop_image_ref_parse(text):
        ref = _only_stargz_error(starget.ImageRef.parse, text)
        if ref is not None:
            assert ref.repository and ref.registry and (ref.tag or ref.digest)
            again = starget.ImageRef.parse(str(ref))
            assert again == ref and str(again) == str(ref)


# =============================================================================
# credentials
# =============================================================================

def _auth_config(registry_key, user, password):
    return {"auths": {registry_key: {"auth": base64.b64encode(("%s:%s" % (user, password)).encode()).decode()}}}


def _write_json(path, doc):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(str(path), "w") as f:
        json.dump(doc, f)


def test_credentials_from_docker_config_env(registry_basic, tmp_path):
    cfgdir = tmp_path / "dockercfg"
    _write_json(str(cfgdir / "config.json"),
                _auth_config(registry_basic.addr, registry_basic.user, registry_basic.password))
    data = _ls_json("ls", "--json", registry_basic.image("prefetch", "prefetch"),
                    env={"DOCKER_CONFIG": str(cfgdir)})
    assert [e["path"] for e in data] == sorted(expected_files("prefetch", "prefetch"))


def test_credentials_from_home_docker_config(registry_basic, tmp_path):
    home = tmp_path / "home"
    _write_json(str(home / ".docker" / "config.json"),
                _auth_config(registry_basic.addr, registry_basic.user, registry_basic.password))
    data = _ls_json("ls", "--json", registry_basic.image("prefetch", "prefetch"), env={"HOME": str(home)})
    assert [e["path"] for e in data] == sorted(expected_files("prefetch", "prefetch"))


def test_credentials_from_registry_auth_file(registry_basic, tmp_path):
    path = tmp_path / "auth.json"
    _write_json(str(path), _auth_config(registry_basic.addr, registry_basic.user, registry_basic.password))
    data = _ls_json("ls", "--json", registry_basic.image("layers"), env={"REGISTRY_AUTH_FILE": str(path)})
    assert [e["path"] for e in data] == sorted(expected_files("layers", "latest"))


def test_credential_flag_wins_over_config_file(registry_basic, tmp_path):
    cfgdir = tmp_path / "dockercfg"
    _write_json(str(cfgdir / "config.json"), _auth_config(registry_basic.addr, registry_basic.user, "nope"))
    data = _ls_json("--credential", registry_basic.credential, "ls", "--json",
                    registry_basic.image("layers"), env={"DOCKER_CONFIG": str(cfgdir)})
    assert [e["path"] for e in data] == sorted(expected_files("layers", "latest"))


def test_wrong_password_in_config_file_is_auth_error(registry_basic, tmp_path, ws):
    cfgdir = tmp_path / "dockercfg"
    _write_json(str(cfgdir / "config.json"), _auth_config(registry_basic.addr, registry_basic.user, "nope"))
    rc, out, err = run_cli("get", registry_basic.image("layers"), ".", ws.out, env={"DOCKER_CONFIG": str(cfgdir)})
    assert_one_line_error(rc, err, 4)
    ws.assert_out_empty()


# ---- credentials: helpers for the auth-file tests ---------------------------

def _auths(key, user, password):
    return {"auths": {key: {"auth": _b64(user, password)}}}


def _no_creds(tmp_path):
    return starget.Credentials(environ={}, home=str(tmp_path / "nohome"))


# ---- credentials: unit tests on Credentials(environ=..., home=...).lookup ---

HOST = "127.0.0.1:5000"

# Every auth-file location in the documented order: (name, environ entry, path in tmp)
LOCATIONS = ["REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "HOME_CONTAINERS", "DOCKER_CONFIG", "HOME_DOCKER"]


def _place(tmp, name, doc, environ):
    """Write `doc` at location `name`, updating `environ`; returns the file path."""
    tmp = str(tmp)
    home = os.path.join(tmp, "home")
    if name == "REGISTRY_AUTH_FILE":
        path = os.path.join(tmp, "regauth", "auth.json")
        environ["REGISTRY_AUTH_FILE"] = path
    elif name == "XDG_RUNTIME_DIR":
        environ["XDG_RUNTIME_DIR"] = os.path.join(tmp, "run")
        path = os.path.join(tmp, "run", "containers", "auth.json")
    elif name == "HOME_CONTAINERS":
        path = os.path.join(home, ".config", "containers", "auth.json")
    elif name == "DOCKER_CONFIG":
        environ["DOCKER_CONFIG"] = os.path.join(tmp, "dockercfg")
        path = os.path.join(tmp, "dockercfg", "config.json")
    elif name == "HOME_DOCKER":
        path = os.path.join(home, ".docker", "config.json")
    else:
        raise ValueError(name)
    _write_json(path, doc)
    return path


@pytest.mark.parametrize("first", range(len(LOCATIONS)))
def test_credentials_first_file_wins(tmp_path, first):
    """With a credential in every location from `first` on, the earliest one is used."""
    environ = {}
    names = LOCATIONS[first:]
    if "DOCKER_CONFIG" in names and "HOME_DOCKER" in names:
        names = [n for n in names if n != "HOME_DOCKER"]     # DOCKER_CONFIG replaces ~/.docker
    for name in names:
        _place(tmp_path, name, _auths(HOST, "user-" + name, "pw-" + name), environ)
    cred = starget.Credentials(environ=environ, home=str(tmp_path / "home")).lookup(HOST, "fixtures/basic")
    assert cred is not None
    assert (cred.username, cred.password) == ("user-" + names[0], "pw-" + names[0])


def test_credentials_docker_config_replaces_home_docker(tmp_path):
    environ = {}
    _place(tmp_path, "HOME_DOCKER", _auths(HOST, "home", "pw"), environ)
    _place(tmp_path, "DOCKER_CONFIG", {"auths": {}}, environ)
    assert starget.Credentials(environ=environ, home=str(tmp_path / "home")).lookup(HOST) is None
    del environ["DOCKER_CONFIG"]
    cred = starget.Credentials(environ=environ, home=str(tmp_path / "home")).lookup(HOST)
    assert cred.username == "home"


def test_credentials_file_without_the_host_falls_through(tmp_path):
    environ = {}
    _place(tmp_path, "REGISTRY_AUTH_FILE", _auths("other.example:5000", "other", "x"), environ)
    _place(tmp_path, "DOCKER_CONFIG", _auths(HOST, "right", "pw"), environ)
    cred = starget.Credentials(environ=environ, home=str(tmp_path / "home")).lookup(HOST, "a/b")
    assert (cred.username, cred.password) == ("right", "pw")


def test_credentials_explicit_wins_over_files(tmp_path):
    environ = {}
    _place(tmp_path, "REGISTRY_AUTH_FILE", _auths(HOST, "file", "pw"), environ)
    cred = starget.Credentials("flag:pa:ss", environ=environ, home=str(tmp_path / "home")).lookup(HOST)
    assert (cred.username, cred.password) == ("flag", "pa:ss")


@pytest.mark.parametrize("key", [HOST, "https://%s" % HOST, "https://%s/" % HOST, "https://%s/v1/" % HOST,
                                 "http://%s" % HOST, "https://%s/v2/" % HOST])
def test_credentials_auth_key_normalised(tmp_path, key):
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", _auths(key, "u", "p"), environ)
    cred = starget.Credentials(environ=environ, home=str(tmp_path / "home")).lookup(HOST, "fixtures/basic")
    assert cred is not None and cred.username == "u"


@pytest.mark.parametrize("key", ["https://index.docker.io/v1/", "index.docker.io", "docker.io",
                                 "https://index.docker.io/v1", "registry-1.docker.io"])
def test_credentials_docker_hub_keys(tmp_path, key):
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", _auths(key, "hubuser", "p"), environ)
    ref = starget.ImageRef.parse("alpine:3")
    cred = starget.Credentials(environ=environ, home=str(tmp_path / "home")).lookup(ref.registry, ref.repository)
    assert cred is not None and cred.username == "hubuser"


def test_credentials_other_port_is_another_registry(tmp_path):
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", _auths("127.0.0.1:5001", "u", "p"), environ)
    assert starget.Credentials(environ=environ, home=str(tmp_path / "home")).lookup(HOST, "x") is None


def test_credentials_most_specific_key(tmp_path):
    environ = {}
    _place(tmp_path, "REGISTRY_AUTH_FILE", {"auths": {
        HOST: {"auth": _b64("host", "1")},
        HOST + "/fixtures": {"auth": _b64("ns", "2")},
        HOST + "/fixtures/basic": {"auth": _b64("repo", "3")},
        HOST + "/fix": {"auth": _b64("prefix-only", "4")},
    }}, environ)
    creds = starget.Credentials(environ=environ, home=str(tmp_path / "home"))
    assert creds.lookup(HOST, "fixtures/basic").username == "repo"
    assert creds.lookup(HOST, "fixtures/layers").username == "ns"
    assert creds.lookup(HOST, "fixtures/basic/deeper").username == "repo"
    assert creds.lookup(HOST, "fixturesx/basic").username == "host"
    assert creds.lookup(HOST, "other/img").username == "host"


def test_credentials_identitytoken_entry(tmp_path):
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", {"auths": {HOST: {"identitytoken": "refresh-123"}}}, environ)
    cred = starget.Credentials(environ=environ, home=str(tmp_path / "home")).lookup(HOST)
    assert isinstance(cred, starget._Credential)
    assert cred.identity_token == "refresh-123"
    assert cred.username == "<token>"


def test_credentials_username_password_fields(tmp_path):
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", {"auths": {HOST: {"username": "u", "password": "p"}}}, environ)
    cred = starget.Credentials(environ=environ, home=str(tmp_path / "home")).lookup(HOST)
    assert (cred.username, cred.password) == ("u", "p")


def test_credentials_auth_password_with_colons(tmp_path):
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", _auths(HOST, "u", "a:b:c"), environ)
    cred = starget.Credentials(environ=environ, home=str(tmp_path / "home")).lookup(HOST)
    assert (cred.username, cred.password) == ("u", "a:b:c")


@pytest.mark.parametrize("value", ["!!!not base64!!!", base64.b64encode(b"no-colon").decode(),
                                   base64.b64encode(b"\xff\xfe:\xfd").decode()])
def test_credentials_malformed_auth_is_usage_error(tmp_path, value):
    environ = {}
    path = _place(tmp_path, "DOCKER_CONFIG", {"auths": {HOST: {"auth": value}}}, environ)
    with pytest.raises(starget.StargzError) as ei:
        starget.Credentials(environ=environ, home=str(tmp_path / "home")).lookup(HOST)
    assert ei.value.code == starget.ErrorCode.USAGE
    assert path in ei.value.message and "auth" in ei.value.message


def test_credentials_unparsable_file_is_usage_error(tmp_path):
    environ = {}
    path = _place(tmp_path, "REGISTRY_AUTH_FILE", {}, environ)
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(starget.StargzError) as ei:
        starget.Credentials(environ=environ, home=str(tmp_path / "home")).lookup(HOST)
    assert ei.value.code == starget.ErrorCode.USAGE and path in ei.value.message


# ---- credentials: credential helpers (unit) ---------------------------------

@pytest.fixture
def helper_dir(tmp_path, monkeypatch):
    """A directory first on PATH for fake docker-credential-* programs."""
    d = str(tmp_path / "helpers")
    os.makedirs(d)
    monkeypatch.setenv("PATH", d + os.pathsep + os.environ.get("PATH", ""))
    return d


def _helper_json(user, secret):
    return json.dumps({"ServerURL": "ignored", "Username": user, "Secret": secret})


def test_helper_docker_hub_server_url(tmp_path, helper_dir):
    calls = write_credential_helper(helper_dir, "fake", stdout=_helper_json("hubuser", "hubsecret"))
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", {"credHelpers": {"docker.io": "fake"}}, environ)
    ref = starget.ImageRef.parse("library/alpine:3")
    cred = starget.Credentials(environ=environ, home=str(tmp_path / "home")).lookup(ref.registry, ref.repository)
    assert (cred.username, cred.password) == ("hubuser", "hubsecret")
    assert helper_calls(calls) == [{"argv": ["get"], "stdin": "https://index.docker.io/v1/"}]


def test_helper_cred_helpers_key_for_registry(tmp_path, helper_dir):
    calls = write_credential_helper(helper_dir, "fake", stdout=_helper_json("u", "s"))
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", {"credHelpers": {HOST: "fake", "other.example": "nothere"}}, environ)
    creds = starget.Credentials(environ=environ, home=str(tmp_path / "home"))
    cred = creds.lookup(HOST, "a/b")
    assert (cred.username, cred.password) == ("u", "s")
    assert helper_calls(calls) == [{"argv": ["get"], "stdin": HOST}]
    creds.lookup(HOST, "a/b")
    assert len(helper_calls(calls)) == 1, "the helper answer is cached for the run"


def test_helper_creds_store(tmp_path, helper_dir):
    calls = write_credential_helper(helper_dir, "store", stdout=_helper_json("su", "ss"))
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", {"credsStore": "store"}, environ)
    cred = starget.Credentials(environ=environ, home=str(tmp_path / "home")).lookup(HOST)
    assert (cred.username, cred.password) == ("su", "ss")
    assert [c["stdin"] for c in helper_calls(calls)] == [HOST]


def test_helper_token_username_is_identity_token(tmp_path, helper_dir):
    write_credential_helper(helper_dir, "fake", stdout=_helper_json("<token>", "refresh-xyz"))
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", {"credsStore": "fake"}, environ)
    cred = starget.Credentials(environ=environ, home=str(tmp_path / "home")).lookup(HOST)
    assert cred.identity_token == "refresh-xyz"


def test_helper_precedence_within_a_file(tmp_path, helper_dir):
    """docker's order: credHelpers[host], then credsStore, then auths."""
    helper = write_credential_helper(helper_dir, "helper", stdout=_helper_json("from-helper", "h"))
    store = write_credential_helper(helper_dir, "store", stdout=_helper_json("from-store", "s"))
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", {"credHelpers": {HOST: "helper"}, "credsStore": "store",
                                       "auths": {HOST: {"auth": _b64("from-auths", "a")},
                                                 "other.example": {"auth": _b64("o", "o")}}}, environ)
    creds = starget.Credentials(environ=environ, home=str(tmp_path / "home"))
    assert creds.lookup(HOST).username == "from-helper"
    assert creds.lookup("other.example").username == "from-store"
    assert creds.lookup("third.example").username == "from-store"
    assert len(helper_calls(helper)) == 1
    assert [c["stdin"] for c in helper_calls(store)] == ["other.example", "third.example"]


def test_a_store_without_the_host_falls_through_to_auths(tmp_path, helper_dir):
    """`docker login` with a store leaves `auths: {host: {}}`; a store that knows nothing
    of a host lets the file's own `auths` entry answer."""
    write_credential_helper(helper_dir, "store", stdout="credentials not found in native keychain\n", code=1)
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", {"credsStore": "store",
                                       "auths": {HOST: {}, "other.example": {"auth": _b64("o", "o")}}}, environ)
    creds = starget.Credentials(environ=environ, home=str(tmp_path / "home"))
    assert creds.lookup("other.example").username == "o"
    assert creds.lookup(HOST) is None


def test_helper_not_found_message_is_no_credential(tmp_path, helper_dir):
    write_credential_helper(helper_dir, "fake", stdout="credentials not found in native keychain\n", code=1)
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", {"credsStore": "fake"}, environ)
    assert starget.Credentials(environ=environ, home=str(tmp_path / "home")).lookup(HOST) is None


def test_helper_missing_cred_helper_is_auth_error(tmp_path, helper_dir):
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", {"credHelpers": {HOST: "nothere"}}, environ)
    with pytest.raises(starget.StargzError) as ei:
        starget.Credentials(environ=environ, home=str(tmp_path / "home")).lookup(HOST)
    assert ei.value.code == starget.ErrorCode.AUTH
    assert "docker-credential-nothere" in ei.value.message


def test_helper_missing_creds_store_is_anonymous(tmp_path, helper_dir):
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", {"credsStore": "nothere"}, environ)
    assert starget.Credentials(environ=environ, home=str(tmp_path / "home")).lookup(HOST) is None


@pytest.mark.parametrize("stdout", ["garbage", "{}", "[1, 2]", '{"Username": "u"}', ""])
def test_helper_garbage_is_auth_error(tmp_path, helper_dir, stdout):
    write_credential_helper(helper_dir, "fake", stdout=stdout)
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", {"credHelpers": {HOST: "fake"}}, environ)
    with pytest.raises(starget.StargzError) as ei:
        starget.Credentials(environ=environ, home=str(tmp_path / "home")).lookup(HOST)
    assert ei.value.code == starget.ErrorCode.AUTH
    assert "docker-credential-fake" in ei.value.message


# ---- credentials: end to end against the real Basic registry ----------------

def _run_env(tmp_path, environ):
    """run_cli env with HOME pointing at tmp/home (where _place writes ~ files)."""
    env = dict(environ)
    env["HOME"] = str(tmp_path / "home")
    os.makedirs(env["HOME"], exist_ok=True)
    return env


def _helper_env(tmp_path, environ, helper_dir):
    env = _run_env(tmp_path, environ)
    env["PATH"] = helper_dir + os.pathsep + os.environ.get("PATH", "")
    return env


def _ls_ok(reg, env, layout="layers", ref="latest", extra=()):
    rc, out, err = run_cli(*(list(extra) + ["ls", reg.image(layout, ref)]), env=env)
    assert rc == 0, "ls failed (%d): %s" % (rc, err)
    assert sorted(out.split("\n")[:-1]) == sorted(expected_files(layout, ref)), out
    return out, err


PAIRS = [(LOCATIONS[i], LOCATIONS[j]) for i in range(len(LOCATIONS)) for j in range(i + 1, len(LOCATIONS))
         if (LOCATIONS[i], LOCATIONS[j]) != ("DOCKER_CONFIG", "HOME_DOCKER")]


@pytest.mark.parametrize("early,late", PAIRS, ids=["%s>%s" % p for p in PAIRS])
def test_e2e_earlier_right_file_wins_over_later_wrong(registry_basic, tmp_path, early, late):
    environ = {}
    _place(tmp_path, early, _auths(registry_basic.addr, registry_basic.user, registry_basic.password), environ)
    _place(tmp_path, late, _auths(registry_basic.addr, registry_basic.user, "wrong-password"), environ)
    _ls_ok(registry_basic, _run_env(tmp_path, environ))


def test_e2e_earlier_wrong_file_wins_over_later_right(registry_basic, tmp_path):
    """First hit wins: a wrong password earlier is not retried with a later file."""
    environ = {}
    bad = _place(tmp_path, "REGISTRY_AUTH_FILE", _auths(registry_basic.addr, registry_basic.user, "nope"), environ)
    _place(tmp_path, "DOCKER_CONFIG", _auths(registry_basic.addr, registry_basic.user, registry_basic.password),
           environ)
    rc, out, err = run_cli("ls", registry_basic.image("layers"), env=_run_env(tmp_path, environ))
    line = assert_one_line_error(rc, err, 4)
    assert bad in line, "the error should name where the credential came from: %s" % line


def test_e2e_podman_namespace_key(registry_basic, tmp_path):
    environ = {}
    _place(tmp_path, "REGISTRY_AUTH_FILE", {"auths": {
        registry_basic.addr: {"auth": _b64(registry_basic.user, "wrong-for-host")},
        registry_basic.addr + "/fixtures": {"auth": _b64(registry_basic.user, registry_basic.password)},
        registry_basic.addr + "/other": {"auth": _b64(registry_basic.user, "wrong-for-other")},
    }}, environ)
    _ls_ok(registry_basic, _run_env(tmp_path, environ))


def test_e2e_podman_repo_key_beats_namespace_key(registry_basic, tmp_path):
    environ = {}
    _place(tmp_path, "XDG_RUNTIME_DIR", {"auths": {
        registry_basic.addr + "/fixtures": {"auth": _b64(registry_basic.user, "wrong-for-ns")},
        registry_basic.addr + "/fixtures/layers": {"auth": _b64(registry_basic.user, registry_basic.password)},
    }}, environ)
    env = _run_env(tmp_path, environ)
    _ls_ok(registry_basic, env)
    rc, out, err = run_cli("ls", registry_basic.image("basic"), env=env)
    assert_one_line_error(rc, err, 4)


def test_e2e_namespace_key_of_other_namespace_not_used(registry_basic, tmp_path):
    environ = {}
    _place(tmp_path, "REGISTRY_AUTH_FILE", {"auths": {
        registry_basic.addr + "/other": {"auth": _b64(registry_basic.user, registry_basic.password)},
    }}, environ)
    rc, out, err = run_cli("ls", registry_basic.image("layers"), env=_run_env(tmp_path, environ))
    assert_one_line_error(rc, err, 4)


@pytest.mark.parametrize("fmt", ["https://%s/v1/", "http://%s", "%s", "https://%s"])
def test_e2e_normalised_keys(registry_basic, tmp_path, fmt):
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", _auths(fmt % registry_basic.addr, registry_basic.user,
                                            registry_basic.password), environ)
    _ls_ok(registry_basic, _run_env(tmp_path, environ))


def test_e2e_malformed_auth_exit_2(registry_basic, tmp_path):
    environ = {}
    path = _place(tmp_path, "DOCKER_CONFIG", {"auths": {registry_basic.addr: {"auth": "%%%garbage%%%"}}}, environ)
    rc, out, err = run_cli("ls", registry_basic.image("layers"), env=_run_env(tmp_path, environ))
    line = assert_one_line_error(rc, err, 2)
    assert path in line and "auth" in line


def test_e2e_identitytoken_on_basic_registry_is_auth_error(registry_basic, tmp_path):
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", {"auths": {registry_basic.addr: {"identitytoken": "refresh-abc"}}}, environ)
    rc, out, err = run_cli("ls", registry_basic.image("layers"), env=_run_env(tmp_path, environ))
    line = assert_one_line_error(rc, err, 4)
    assert registry_basic.addr in line
    assert "refresh-abc" not in err


class _RecordingOCIServer(OCIServer):
    """OCIServer that also keeps the bodies sent to /token."""

    def __init__(self, *a, **kw):
        self.token_bodies = []
        super(_RecordingOCIServer, self).__init__(*a, **kw)

    def _handle(self, request):
        if request.path == "/token":
            self.token_bodies.append((request.method, request.get_data().decode("utf-8", "replace")))
        return super(_RecordingOCIServer, self)._handle(request)


@pytest.mark.parametrize("source", ["auths", "helper"])
def test_e2e_identitytoken_is_sent_as_refresh_token(httpserver, tmp_path, source):
    """An identity token (auths' identitytoken, or a helper's `<token>` user) is an
    OAuth2 refresh token: POSTed to the realm as grant_type=refresh_token."""
    from urllib.parse import parse_qs
    reg = _RecordingOCIServer(httpserver, auth=("bearer", "u", "p"))
    reg.add_layout("fixtures/layers", "layers")
    environ = {}
    hd = str(tmp_path / "helpers")
    if source == "auths":
        _place(tmp_path, "DOCKER_CONFIG", {"auths": {reg.addr: {"identitytoken": "refresh-abc"}}}, environ)
    else:
        write_credential_helper(hd, "fake", stdout=_helper_json("<token>", "refresh-abc"))
        _place(tmp_path, "DOCKER_CONFIG", {"credHelpers": {reg.addr: "fake"}}, environ)
    rc, out, err = run_cli("--debug", "ls", reg.image("fixtures/layers"), env=_helper_env(tmp_path, environ, hd))
    assert rc == 0, err
    assert sorted(out.split("\n")[:-1]) == sorted(expected_files("layers", "latest"))
    assert reg.token_bodies, "no token request"
    method, body = reg.token_bodies[0]
    assert method == "POST"
    form = parse_qs(body)
    assert form.get("grant_type") == ["refresh_token"] and form.get("refresh_token") == ["refresh-abc"]
    assert "refresh-abc" not in err, "identity token leaked into the debug log"


# ---- credentials: credential helpers end to end -----------------------------

def test_e2e_cred_helper_for_host(registry_basic, tmp_path):
    hd = str(tmp_path / "helpers")
    calls = write_credential_helper(hd, "fake", stdout=_helper_json(registry_basic.user, registry_basic.password))
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", {"credHelpers": {registry_basic.addr: "fake"}}, environ)
    out, err = _ls_ok(registry_basic, _helper_env(tmp_path, environ, hd), extra=["--debug"])
    assert registry_basic.password not in err, "helper secret leaked into the debug log"
    got = helper_calls(calls)
    assert got and got[0] == {"argv": ["get"], "stdin": registry_basic.addr}


def test_e2e_creds_store(registry_basic, tmp_path):
    hd = str(tmp_path / "helpers")
    calls = write_credential_helper(hd, "store", stdout=_helper_json(registry_basic.user, registry_basic.password))
    environ = {}
    _place(tmp_path, "HOME_DOCKER", {"credsStore": "store"}, environ)
    _ls_ok(registry_basic, _helper_env(tmp_path, environ, hd))
    assert [c["stdin"] for c in helper_calls(calls)][:1] == [registry_basic.addr]


def test_e2e_creds_store_with_docker_login_placeholder(registry_basic, tmp_path):
    """What `docker login` writes with a store: `credsStore` plus an empty placeholder
    `auths: {HOST: {}}`. The store is asked (the placeholder is not a credential) and
    the Basic registry accepts what it answers."""
    hd = str(tmp_path / "helpers")
    calls = write_credential_helper(hd, "store", stdout=_helper_json(registry_basic.user, registry_basic.password))
    environ = {}
    _place(tmp_path, "HOME_DOCKER", {"auths": {registry_basic.addr: {}}, "credsStore": "store"}, environ)
    _ls_ok(registry_basic, _helper_env(tmp_path, environ, hd))
    assert [c["stdin"] for c in helper_calls(calls)][:1] == [registry_basic.addr]


def test_e2e_missing_cred_helper_exit_4(registry_basic, tmp_path):
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", {"credHelpers": {registry_basic.addr: "nothere"}}, environ)
    rc, out, err = run_cli("ls", registry_basic.image("layers"),
                           env=_helper_env(tmp_path, environ, str(tmp_path / "empty")))
    line = assert_one_line_error(rc, err, 4)
    assert "docker-credential-nothere" in line


def test_e2e_missing_creds_store_warns_and_goes_anonymous(registry_anon, registry_basic, registry_bearer, tmp_path):
    """Credentials are looked up on a 401 only: an anonymous registry never runs the
    helper; the Bearer registry (anonymous pull allowed) warns and pulls anonymously;
    the Basic one warns, then fails with AUTH."""
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", {"credsStore": "nothere"}, environ)
    env = _helper_env(tmp_path, environ, str(tmp_path / "empty"))
    out, err = _ls_ok(registry_anon, env)
    assert error_lines(err) == []
    out, err = _ls_ok(registry_bearer, env)
    assert re.search(r"^starget: warning: .*docker-credential-nothere", err, re.M), err
    assert error_lines(err) == []
    rc, out, err = run_cli("ls", registry_basic.image("layers"), env=env)
    line = assert_one_line_error(rc, err, 4)
    assert registry_basic.addr in line
    assert re.search(r"^starget: warning: .*docker-credential-nothere", err, re.M), err


def test_e2e_helper_not_found_is_no_credential(registry_anon, registry_basic, tmp_path):
    hd = str(tmp_path / "helpers")
    write_credential_helper(hd, "fake", stdout="credentials not found in native keychain\n", code=1)
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", {"credsStore": "fake"}, environ)
    env = _helper_env(tmp_path, environ, hd)
    out, err = _ls_ok(registry_anon, env)
    assert error_lines(err) == []
    rc, out, err = run_cli("ls", registry_basic.image("layers"), env=env)
    line = assert_one_line_error(rc, err, 4)
    assert "requires authentication" in line


def test_e2e_helper_not_found_falls_through_to_next_file(registry_basic, tmp_path):
    hd = str(tmp_path / "helpers")
    write_credential_helper(hd, "fake", stderr="credentials not found in native keychain\n", code=1)
    environ = {}
    _place(tmp_path, "REGISTRY_AUTH_FILE", {"credHelpers": {registry_basic.addr: "fake"}}, environ)
    _place(tmp_path, "DOCKER_CONFIG", _auths(registry_basic.addr, registry_basic.user, registry_basic.password),
           environ)
    _ls_ok(registry_basic, _helper_env(tmp_path, environ, hd))


@pytest.mark.parametrize("stdout", ["garbage\nmore garbage\n", '{"Username": 1}'])
def test_e2e_helper_garbage_exit_4(registry_basic, tmp_path, stdout):
    hd = str(tmp_path / "helpers")
    write_credential_helper(hd, "fake", stdout=stdout)
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", {"credHelpers": {registry_basic.addr: "fake"}}, environ)
    rc, out, err = run_cli("ls", registry_basic.image("layers"), env=_helper_env(tmp_path, environ, hd))
    line = assert_one_line_error(rc, err, 4)
    assert "docker-credential-fake" in line


def test_e2e_helper_failure_exit_4_with_its_message(registry_basic, tmp_path):
    hd = str(tmp_path / "helpers")
    write_credential_helper(hd, "fake", stderr="keychain is locked\nsecond line\n", code=1)
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", {"credHelpers": {registry_basic.addr: "fake"}}, environ)
    rc, out, err = run_cli("ls", registry_basic.image("layers"), env=_helper_env(tmp_path, environ, hd))
    line = assert_one_line_error(rc, err, 4)
    assert "docker-credential-fake" in line and "keychain is locked" in line


def _file_state(paths):
    out = {}
    for p in paths:
        st = os.stat(p)
        with open(p, "rb") as f:
            out[p] = (f.read(), st.st_mtime_ns, st.st_mode)
    return out


def _dir_listing(root):
    return sorted(os.path.join(d, n) for d, ds, fs in os.walk(root) for n in ds + fs)


def test_e2e_auth_files_never_written(registry_basic, tmp_path):
    hd = str(tmp_path / "helpers")
    write_credential_helper(hd, "store", stdout=_helper_json(registry_basic.user, registry_basic.password))
    environ = {}
    files = [
        _place(tmp_path, "REGISTRY_AUTH_FILE", {"auths": {"other.example": {"auth": _b64("a", "b")}}}, environ),
        _place(tmp_path, "XDG_RUNTIME_DIR", {"auths": {}}, environ),
        _place(tmp_path, "HOME_CONTAINERS", {"credHelpers": {"other.example": "x"}}, environ),
        _place(tmp_path, "DOCKER_CONFIG", {"credsStore": "store"}, environ),
    ]
    old = time.time() - 3600
    for p in files:
        os.utime(p, (old, old))
    roots = [str(tmp_path / d) for d in ("regauth", "run", "home", "dockercfg")]
    before, listing = _file_state(files), [_dir_listing(r) for r in roots]
    env = _helper_env(tmp_path, environ, hd)
    _ls_ok(registry_basic, env)
    rc, out, err = run_cli("get", registry_basic.image("layers"), "no/such/path", str(tmp_path / "out"), env=env)
    assert rc == 3, err
    assert _file_state(files) == before, "an auth file was modified"
    assert [_dir_listing(r) for r in roots] == listing, "a file appeared next to the auth files"


# ---- credentials: login and logout against the real registries ----------------

LAYERS_FILE = "etc/config.txt"


def _login(reg, env, password=None, *extra):
    """`starget login REG -u USER --password-stdin` (password on stdin): (rc, out, err)."""
    password = reg.password if password is None else password
    return run_cli("login", reg.addr, "-u", reg.user, "--password-stdin", *extra, env=env,
                   input=(password + "\n").encode())


def _cat_layers(reg, env):
    rc, out, err = run_cli("cat", reg.image("layers"), LAYERS_FILE, env=env, binary=True)
    assert rc == 0, err
    assert hashlib.sha256(out).hexdigest() == expected_files("layers", "latest")[LAYERS_FILE]["sha256"]


def _read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("where", ["DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "HOME_DOCKER"])
def test_login_to_the_auth_file_then_logout(registry_basic, tmp_path, where):
    """No helper: `auths[REGISTRY]` is base64 user:password, in a file of mode 0600
    written whole; the other keys stay; logout removes only the registry's key."""
    reg, environ = registry_basic, {}
    others = {"auths": {"other.example": {"auth": _b64("a", "b")}}, "credHelpers": {"gcr.io": "gcloud"},
              "experimental": "enabled"}
    path = _place(tmp_path, where, others, environ)
    env = _run_env(tmp_path, environ)
    rc, out, err = _login(reg, env)
    assert rc == 0, err
    assert out == "Login Succeeded\n"
    assert re.search(r"^starget: warning: .*unencrypted in %s" % re.escape(path), err, re.M), err
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    doc = _read_json(path)
    assert doc["auths"].pop(reg.addr) == {"auth": _b64(reg.user, reg.password)}
    assert doc == others
    assert [n for n in os.listdir(os.path.dirname(path)) if n != os.path.basename(path)] == []  # no temp file
    _cat_layers(reg, env)                                        # no --credential
    rc, out, err = run_cli("logout", reg.addr, env=env)
    assert rc == 0, err
    assert _read_json(path) == others
    rc, out, err = run_cli("ls", reg.image("layers"), env=env)
    assert_one_line_error(rc, err, 4)
    rc, out, err = run_cli("logout", reg.addr, env=env)
    assert rc == 0 and re.search(r"^starget: warning: not logged in to ", err, re.M), err


def test_login_creates_the_docker_config_and_replaces_a_stale_key(registry_basic, tmp_path):
    reg = registry_basic
    env = _run_env(tmp_path, {})
    path = os.path.join(env["HOME"], ".docker", "config.json")
    assert _login(reg, env)[0] == 0
    assert _read_json(path) == {"auths": {reg.addr: {"auth": _b64(reg.user, reg.password)}}}
    # a key that names the same registry another way is the one replaced, not shadowed
    _write_json(path, {"auths": {"https://%s/v1/" % reg.addr: {"auth": _b64(reg.user, "old")},
                                 reg.addr + "/fixtures": {"auth": _b64("ns", "kept")}}})
    assert _login(reg, env)[0] == 0
    assert _read_json(path) == {"auths": {"https://%s/v1/" % reg.addr: {"auth": _b64(reg.user, reg.password)},
                                          reg.addr + "/fixtures": {"auth": _b64("ns", "kept")}}}


@pytest.mark.parametrize("config", ["credsStore", "credHelpers"])
def test_login_through_a_credential_helper(registry_basic, tmp_path, config):
    """With a helper, the secret goes to `docker-credential-NAME store`; the file gets
    docker's empty placeholder only; `cat` then asks the helper; logout erases."""
    reg, environ = registry_basic, {}
    hd = str(tmp_path / "helpers")
    calls = write_credential_helper(hd, "fake", stdout=_helper_json(reg.user, reg.password))
    doc = {"credsStore": "fake"} if config == "credsStore" else {"credHelpers": {reg.addr: "fake"}}
    doc["auths"] = {reg.addr: {"auth": _b64(reg.user, "stale")}, "other.example": {}}
    path = _place(tmp_path, "DOCKER_CONFIG", doc, environ)
    env = _helper_env(tmp_path, environ, hd)
    rc, out, err = _login(reg, env)
    assert rc == 0, err
    assert "unencrypted" not in err
    got = helper_calls(calls)
    assert [c["argv"] for c in got] == [["store"]]
    assert json.loads(got[0]["stdin"]) == {"ServerURL": reg.addr, "Username": reg.user, "Secret": reg.password}
    with open(path) as f:
        text = f.read()
    assert reg.password not in text and _b64(reg.user, reg.password) not in text
    assert json.loads(text)["auths"] == {reg.addr: {}, "other.example": {}}
    _cat_layers(reg, env)
    assert helper_calls(calls)[-1] == {"argv": ["get"], "stdin": reg.addr}
    rc, out, err = run_cli("logout", reg.addr, env=env)
    assert rc == 0, err
    assert helper_calls(calls)[-1] == {"argv": ["erase"], "stdin": reg.addr}
    assert _read_json(path)["auths"] == {"other.example": {}}


@pytest.mark.parametrize("helper", [False, True])
def test_login_wrong_password_exit_4_stores_nothing(registry_basic, tmp_path, helper):
    reg, environ = registry_basic, {}
    hd = str(tmp_path / "helpers")
    calls = write_credential_helper(hd, "fake")
    path = _place(tmp_path, "DOCKER_CONFIG", dict({"auths": {"other.example": {}}},
                                                   **({"credsStore": "fake"} if helper else {})), environ)
    os.utime(path, (1, 1))
    before = _file_state([path])
    rc, out, err = _login(reg, _helper_env(tmp_path, environ, hd), "wrong-password")
    line = assert_one_line_error(rc, err, 4)
    assert reg.addr in line and "wrong-password" not in err
    assert _file_state([path]) == before and helper_calls(calls) == []
    assert os.listdir(os.path.dirname(path)) == ["config.json"]


def test_login_bearer_registry(registry_bearer, tmp_path):
    """The token flow: GET /v2/, its Bearer challenge answered at the realm with the credentials."""
    reg, env = registry_bearer, _run_env(tmp_path, {})
    rc, out, err = _login(reg, env, "wrong-password")
    assert_one_line_error(rc, err, 4)
    assert not os.path.exists(os.path.join(env["HOME"], ".docker", "config.json"))
    rc, out, err = _login(reg, env)
    assert rc == 0, err
    auths = _read_json(os.path.join(env["HOME"], ".docker", "config.json"))["auths"]
    assert auths == {reg.addr: {"auth": _b64(reg.user, reg.password)}}


def test_login_password_flag_warns(registry_basic, tmp_path):
    reg, env = registry_basic, _run_env(tmp_path, {})
    rc, out, err = run_cli("login", "-u", reg.user, "-p", reg.password, reg.addr, env=env, input=b"")
    assert rc == 0, err
    assert re.search(r"^starget: warning: a password given with -p is visible to other users", err, re.M), err
    assert reg.password not in err


@pytest.mark.parametrize("args, why", [
    (["-u", "u"], "needs a password"),                        # stdin is no terminal: no prompt
    ([], "needs -u USER"),
    (["--password-stdin"], "--password-stdin needs -u USER"),
    (["-u", "a:b", "-p", "x"], "invalid user name"),
    (["-u", "u", "-p", "x", "--password-stdin"], "not allowed with"),
])
def test_login_usage_errors(registry_basic, tmp_path, args, why):
    env = _run_env(tmp_path, {})
    rc, out, err = run_cli("login", registry_basic.addr, *args, env=env, input=b"")
    line = assert_one_line_error(rc, err, 2)
    assert why in line
    assert not os.path.exists(os.path.join(env["HOME"], ".docker"))


@pytest.mark.parametrize("registry", ["fixtures/x", "nodots", "host/ns", "ftp://host"])
def test_login_refuses_what_is_no_registry(registry):
    rc, out, err = run_cli("logout", registry)
    assert "is not a registry" in assert_one_line_error(rc, err, 2)


def test_login_store_failure_exit_10_file_unchanged(registry_basic, tmp_path):
    reg, environ = registry_basic, {}
    hd = str(tmp_path / "helpers")
    write_credential_helper(hd, "fake", stderr="keychain is locked\n", code=1)
    path = _place(tmp_path, "DOCKER_CONFIG", {"credsStore": "fake"}, environ)
    before = _file_state([path])
    rc, out, err = _login(reg, _helper_env(tmp_path, environ, hd))
    line = assert_one_line_error(rc, err, 10)
    assert "docker-credential-fake" in line and "keychain is locked" in line
    assert _file_state([path]) == before


def test_login_store_hub_key(tmp_path, helper_dir):
    """Docker Hub is `https://index.docker.io/v1/`, for the file and for the helpers."""
    calls = write_credential_helper(helper_dir, "fake")
    environ = {"DOCKER_CONFIG": str(tmp_path / "d"), "PATH": os.environ["PATH"]}
    store = starget._LoginStore(environ=environ, home=str(tmp_path))
    assert store.store(starget._DOCKER_HUB, "u", "pw") == str(tmp_path / "d" / "config.json")
    assert _read_json(str(tmp_path / "d" / "config.json")) == {"auths": {"https://index.docker.io/v1/":
                                                                         {"auth": _b64("u", "pw")}}}
    _write_json(str(tmp_path / "d" / "config.json"), {"credsStore": "fake"})
    store = starget._LoginStore(environ=environ, home=str(tmp_path))
    assert store.erase(starget._DOCKER_HUB) is True
    assert helper_calls(calls) == [{"argv": ["erase"], "stdin": "https://index.docker.io/v1/"}]


# =============================================================================
# config
# =============================================================================

# ---- config: parse_simple_yaml accepted -------------------------------------

SEED = "defaults:\n  concurrency: 8\nregistries:\n  mirror.internal:5000:\n    plain_http: true\n"


def test_seed_format():
    assert C._parse_simple_yaml(SEED) == {
        "defaults": {"concurrency": 8},
        "registries": {"mirror.internal:5000": {"plain_http": True}},
    }


def test_empty_documents():
    for text in ("", "\n\n", "# only a comment\n", "---\n", "--- # c\n\n", "   \n\t\n"):
        assert C._parse_simple_yaml(text) == {}


@pytest.mark.parametrize("text, value", [
    ("hello", "hello"), ("hello world", "hello world"), ("8", 8), ("-3", -3), ("+4", 4), ("0", 0),
    ("0755", "0755"), ("1.5", "1.5"), ("true", True), ("True", True), ("TRUE", True), ("yes", True),
    ("on", True), ("false", False), ("No", False), ("off", False), ("null", None), ("~", None),
    ("Null", None), ("'single'", "single"), ("'it''s'", "it's"), ("''", ""), ('""', ""),
    ('"a\\"b\\\\c\\nd\\te"', 'a"b\\c\nd\te'), ("'no \\n escapes'", "no \\n escapes"),
    ('"true"', "true"), ("'8'", "8"), ("'a: b'", "a: b"), ('"# not a comment"', "# not a comment"),
    ("a#b", "a#b"), ("value # comment", "value"), ("value\t# comment", "value"), ("'q' # c", "q"),
    ("http://host:5000/x", "http://host:5000/x"), ("linux/arm64/v8", "linux/arm64/v8"), ("-5x", "-5x"),
    ("C:\\certs\\ca.pem", "C:\\certs\\ca.pem"), ("  spaced  ", "spaced"), ("a'b\"c", "a'b\"c"),
])
def test_scalars(text, value):
    assert C._parse_simple_yaml("key: %s\n" % text) == {"key": value}


def test_empty_value_is_null():
    assert C._parse_simple_yaml("a:\nb:   # comment\nc: 1\nd:") == {"a": None, "b": None, "c": 1, "d": None}


def test_keys():
    text = ("mirror.internal:5000: 1\n"
            "\"[::1]:5000\": 2\n"
            "'quoted key': 3\n"
            "spaced   : 4\n"
            "tab:\tafter\n"
            "a#b: 5\n"
            "url:with:colons: 6\n"
            "true: 7\n"
            "8: eight\n")
    assert C._parse_simple_yaml(text) == {
        "mirror.internal:5000": 1, "[::1]:5000": 2, "quoted key": 3, "spaced": 4, "tab": "after",
        "a#b": 5, "url:with:colons": 6, "true": 7, "8": "eight"}


def test_nesting_comments_blank_lines_crlf_bom():
    text = ("\ufeff--- # the document\r\n"
            "# a comment\r\n"
            "top:\r\n"
            "\r\n"
            "    # an indented comment\r\n"
            "    middle:\r\n"
            "      inner: 1   # trailing\r\n"
            "      other: 'x'\r\n"
            "    back: 2\r\n"
            "  \t \r\n"
            "last: 3\r\n")
    assert C._parse_simple_yaml(text) == {"top": {"middle": {"inner": 1, "other": "x"}, "back": 2}, "last": 3}


def test_dedent_several_levels_and_indented_root():
    assert C._parse_simple_yaml("a:\n b:\n   c:\n      d: 1\ne: 2\n") == {"a": {"b": {"c": {"d": 1}}}, "e": 2}
    assert C._parse_simple_yaml("  a: 1\n  b:\n    c: 2\n") == {"a": 1, "b": {"c": 2}}


def test_line_numbers_are_kept():
    doc = C._parse_simple_yaml("---\n\ndefaults:\n  # c\n  concurrency: 8\nregistries:\n  h:5000:\n    insecure: on\n")
    assert doc.lines == {"defaults": 3, "registries": 6}
    assert doc["defaults"].lines == {"concurrency": 5}
    assert doc["registries"]["h:5000"].lines == {"insecure": 8}


# ---- config: parse_simple_yaml rejected, with the right line ----------------

@pytest.mark.parametrize("text, line, fragment", [
    ("a: 1\n\tb: 2\n", 2, "tab"),
    ("a:\n  b: 1\n \tc: 2\n", 3, "tab"),
    ("a:\n- x\n", 2, "lists"),
    ("- x\n", 1, "lists"),
    ("a:\n  -\n", 2, "lists"),
    ("a: - x\n", 1, "lists"),
    ("a: [1, 2]\n", 1, "flow"),
    ("a: {b: 1}\n", 1, "flow"),
    ("[::1]:5000: 1\n", 1, "quote keys"),
    ("{a: 1}\n", 1, "flow"),
    ("a: &x 1\n", 1, "anchors"),
    ("b: *x\n", 1, "aliases"),
    ("&x a: 1\n", 1, "anchors"),
    ("a: !!str 1\n", 1, "tags"),
    ("a: |\n  text\n", 1, "multi-line"),
    ("a: >-\n  text\n", 1, "multi-line"),
    ("x: 1\na: 1\nb: 2\na: 3\n", 4, "duplicate key 'a' (first on line 2)"),
    ("a:\n  b: 1\n  b: 2\n", 3, "duplicate key 'b'"),
    ("a: 1\n  b: 2\n", 2, "unexpected indentation"),
    ("a:\n  b: 1\n    c: 2\n", 3, "unexpected indentation"),
    ("a:\n    b: 1\n  c: 2\n", 3, "does not match"),
    ("  a: 1\nb: 2\n", 2, "does not match"),
    ("a: 'open\n", 1, "unterminated single"),
    ("a: \"open\n  more\"\n", 1, "unterminated double"),
    ("a: \"bad \\q\"\n", 1, "unsupported escape"),
    ("a: \"x\" y\n", 1, "unexpected text after the quoted value"),
    ("a: 'x'# c\n", 1, "unexpected text after the quoted value"),
    ("\"k\" : 1\n'k'x: 2\n", 2, "after the quoted key"),
    ("a: 1\njust text\n", 2, "expected 'key: value'"),
    ("a:b\n", 1, "expected 'key: value'"),
    ("text # with: colon in comment\n", 1, "expected 'key: value'"),
    ("a: b: c\n", 1, "cannot contain ': '"),
    ("a: b:\n", 1, "cannot contain ': '"),
    (": v\n", 1, "key is missing"),
    ("? k\n", 1, "complex keys"),
    ("%YAML 1.2\n---\na: 1\n", 1, "directives"),
    ("a: 1\n---\nb: 2\n", 2, "second document"),
    ("---\n---\n", 2, "second document"),
    ("--- a: 1\n", 1, "document markers"),
    ("a: 1\n...\n", 2, "document markers"),
    ("a: @x\n", 1, "reserved"),
    ("a: `x`\n", 1, "reserved"),
])
def test_rejected(text, line, fragment):
    message = usage_error(C._parse_simple_yaml, text)
    assert message.startswith("config.yaml line %d: " % line), message
    assert fragment in message


def test_source_names_the_file():
    message = usage_error(C._parse_simple_yaml, "a: [1]\n", "/etc/x/config.yaml")
    assert message.startswith("/etc/x/config.yaml line 1: ")


# ---- config: Config ---------------------------------------------------------

FULL = """\
defaults:
  concurrency: 8
  retries: 0
  no_progress: yes
  platform: linux/arm64/v8
  cache: false
registries:
  mirror.internal:5000:
    plain_http: true
  Registry.Example.COM:
    ca_file: certs/ca.pem
    insecure: false
    auth_type: bearer
  docker.io:
    mirror: Mirror.Internal:5000
  "[::1]:5001":
    auth_type: none
  plain.example:
"""


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return str(path)


def test_config_full(tmp_path):
    path = write(tmp_path, FULL)
    config = C.Config.load(path)
    assert config.path == path
    assert config.default("concurrency", 4) == 8
    assert config.default("retries", 3) == 0          # a falsy value still wins over the fallback
    assert config.default("no_progress", False) is True
    assert config.default("platform") == "linux/arm64/v8"
    assert config.default("cache", True) is False
    assert config.default("timeout", 30.0) == 30.0    # not set here: the fallback
    assert config.registry("mirror.internal:5000") == {"plain_http": True}
    assert config.registry("MIRROR.internal:5000") == {"plain_http": True}
    assert config.registry("mirror.internal") == {}   # host:port is matched exactly
    assert config.registry("registry.example.com") == {
        "ca_file": str(tmp_path / "certs" / "ca.pem"), "insecure": False, "auth_type": "bearer"}
    assert config.registry("docker.io") == {"mirror": "mirror.internal:5000"}
    assert config.registry(starget._DOCKER_HUB) == {"mirror": "mirror.internal:5000"}
    assert config.registry("[::1]:5001") == {"auth_type": "none"}
    assert config.registry("plain.example") == {}
    assert config.registry("unknown.example") == {}
    assert config.flag_defaults() == {"concurrency": 8, "retries": 0, "no_progress": True,
                                      "platform": "linux/arm64/v8", "no_cache": True}


def test_config_registry_returns_a_copy():
    config = C.Config.from_text("registries:\n  h:\n    insecure: true\n")
    config.registry("h")["insecure"] = False
    assert config.registry("h") == {"insecure": True}


def test_config_ca_file_home_and_absolute(tmp_path):
    config = C.Config.from_text("registries:\n  a:\n    ca_file: ~/ca.pem\n  b:\n    ca_file: /abs/ca.pem\n",
                                source=str(tmp_path / "config.yaml"))
    assert config.registry("a")["ca_file"] == os.path.expanduser("~/ca.pem")
    assert config.registry("b")["ca_file"] == "/abs/ca.pem"


def test_config_null_sections_and_values():
    config = C.Config.from_text("defaults:\nregistries:\n")
    assert config.flag_defaults() == {}
    config = C.Config.from_text("defaults:\n  concurrency: ~\n  platform:\n")
    assert config.default("concurrency", 4) == 4
    assert config.flag_defaults() == {}


def test_missing_default_file_is_empty(tmp_path):
    config = C.Config.load(environ={"HOME": str(tmp_path)})
    assert config.path is None and config.flag_defaults() == {} and config.registry("x") == {}
    (tmp_path / ".stargz-get").write_text("not a directory")      # ~/.stargz-get is a file: still no config
    assert C.Config.load(environ={"HOME": str(tmp_path)}).path is None


def test_default_file_under_home(tmp_path):
    os.mkdir(str(tmp_path / ".stargz-get"))
    path = write(tmp_path / ".stargz-get", SEED)
    config = C.Config.load(environ={"HOME": str(tmp_path)})
    assert config.path == path and config.default("concurrency") == 8


def test_starget_config_env(tmp_path):
    path = write(tmp_path, SEED, "other.yaml")
    config = C.Config.load(environ={"HOME": str(tmp_path), "STARGET_CONFIG": path})
    assert config.path == path and config.default("concurrency") == 8
    message = usage_error(C.Config.load, None, {"HOME": str(tmp_path), "STARGET_CONFIG": path + ".missing"})
    assert "does not exist" in message and "STARGET_CONFIG" in message
    # an empty STARGET_CONFIG is unset
    assert C.Config.load(environ={"HOME": str(tmp_path), "STARGET_CONFIG": ""}).path is None


def test_explicit_path_must_exist(tmp_path):
    assert "does not exist" in usage_error(C.Config.load, str(tmp_path / "nope.yaml"), {})


def test_unreadable_files(tmp_path):
    assert "cannot read" in usage_error(C.Config.load, str(tmp_path), {})       # a directory
    assert "not UTF-8" in usage_error(C.Config.load, write(tmp_path, b"a: \xff\n"), {})
    big = write(tmp_path, b"# " + b"x" * (C._MAX_CONFIG_SIZE + 1))
    assert "larger than" in usage_error(C.Config.load, big, {})


def test_syntax_errors_name_the_file(tmp_path):
    path = write(tmp_path, "defaults:\n  concurrency: [8]\n")
    assert usage_error(C.Config.load, path, {}).startswith(path + " line 2: flow")


@pytest.mark.parametrize("text, line, fragment", [
    ("default:\n  concurrency: 8\n", 1, "unknown key 'default' (known: defaults, registries)"),
    ("defaults:\n  concurency: 8\n", 2, "unknown key 'concurency' in defaults (known: cache, concurrency,"),
    ("registries:\n  h:\n    plain-http: true\n", 3, "unknown key 'plain-http' in registries.h"),
    ("defaults: 8\n", 1, "defaults must be a mapping"),
    ("registries: none\n", 1, "registries must be a mapping"),
    ("registries:\n  h: true\n", 2, "registries.h must be a mapping"),
    ("defaults:\n  concurrency: 0\n", 2, "defaults.concurrency must be a whole number from 1 to 256, got 0"),
    ("defaults:\n  concurrency: 257\n", 2, "from 1 to 256"),
    ("defaults:\n  concurrency: many\n", 2, "got 'many'"),
    ("defaults:\n  concurrency: true\n", 2, "got True"),
    ("defaults:\n  concurrency: '8x'\n", 2, "got '8x'"),
    ("defaults:\n  concurrency: 8.0\n", 2, "got '8.0'"),
    ("defaults:\n  retries: 21\n", 2, "defaults.retries must be a whole number from 0 to 20"),
    ("defaults:\n  retries: -1\n", 2, "from 0 to 20"),
    ("defaults:\n  no_progress: 1\n", 2, "defaults.no_progress must be true or false, got 1"),
    ("defaults:\n  cache: 'true'\n", 2, "defaults.cache must be true or false"),
    ("defaults:\n  platform: linux\n", 2, "defaults.platform must be os/arch[/variant] (e.g. linux/arm64), got"),
    ("defaults:\n  timeout: 0\n", 2, "defaults.timeout must be a number of seconds above 0 and at most 86400, got 0"),
    ("defaults:\n  connect_timeout: soon\n", 2, "defaults.connect_timeout must be a number of seconds"),
    ("defaults:\n  timeout: true\n", 2, "got True"),
    ("defaults:\n  platform: 64\n", 2, "defaults.platform must be a string"),
    ("registries:\n  https://h:\n    insecure: true\n", 2, "not a registry host[:port]"),
    ("registries:\n  h/path:\n", 2, "not a registry host[:port]"),
    ("registries:\n  h:\n    insecure: maybe\n", 3, "registries.h.insecure must be true or false"),
    ("registries:\n  h:\n    ca_file: ''\n", 3, "registries.h.ca_file must be a string"),
    ("registries:\n  h:\n    mirror: http://m\n", 3, "registries.h.mirror must be a registry host[:port]"),
    ("registries:\n  h:\n    auth_type: digest\n", 3, "auth_type must be one of basic, bearer, none, got 'digest'"),
    ("registries:\n  docker.io:\n\n  registry-1.docker.io:\n", 4, "same registry as line 2"),
    ("registries:\n  H:\n  h:\n", 3, "same registry as line 2"),
])
def test_config_validation(text, line, fragment):
    message = usage_error(C.Config.from_text, text)
    assert message.startswith("config.yaml line %d: " % line), message
    assert fragment in message, message


def test_flags_win_over_the_file(tmp_path):
    """The real main(): `defaults:` fills in a flag the user left out, and a flag
    given (before or after the command) wins. Seen through retries: each retry of
    the refused connection is one `retrying` line with -v."""
    env = {"STARGET_CONFIG": write(tmp_path, "defaults:\n  retries: 2\n  cache: false\n")}

    def retries(*args):
        rc, out, err = run_cli(*args, env=env, timeout=60)
        assert rc == 5, err
        return len(re.findall(r"^starget: info: retrying ", err, re.M))

    assert retries("-v", "ls", "127.0.0.1:1/x/y") == 2
    assert retries("-v", "--retries", "0", "ls", "127.0.0.1:1/x/y") == 0
    assert retries("ls", "-v", "127.0.0.1:1/x/y", "--retries", "1") == 1


# ---- config: a flag and its `defaults:` key accept the same values ---------

# flag, config key, values out of range (as typed), values at the edges (and what they mean)
OPTION_RANGES = [
    ("--concurrency", "concurrency", ["0", "257", "-1", "many"], [("1", 1), ("256", 256)]),
    ("--retries", "retries", ["100", "-7", "21", "-1", "2.5"], [("0", 0), ("20", 20)]),
    ("--timeout", "timeout", ["0", "-1", "86401", "nan", "inf"], [("0.001", 0.001), ("86400", 86400.0)]),
    ("--connect-timeout", "connect_timeout", ["0", "86400.5"], [("0.5", 0.5), ("86400", 86400.0)]),
]
BAD_OPTION_VALUES = [(flag, key, value) for flag, key, bad, _ in OPTION_RANGES for value in bad]
EDGE_OPTION_VALUES = [(flag, key, text, value) for flag, key, _, edges in OPTION_RANGES for text, value in edges]


@pytest.mark.parametrize("flag, key, value", BAD_OPTION_VALUES)
@pytest.mark.parametrize("after", [False, True])
def test_a_bad_flag_value_is_a_usage_error_naming_the_flag(api_env, capsys, flag, key, value, after):
    args = ["ls", "127.0.0.1:1/x/y", flag, value] if after else [flag, value, "ls", "127.0.0.1:1/x/y"]
    assert starget.main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "argument %s: " % flag in errors[0], errors


@pytest.mark.parametrize("flag, key, value", BAD_OPTION_VALUES)
def test_a_bad_config_value_is_a_usage_error_naming_the_line(api_env, monkeypatch, capsys, flag, key, value):
    path = write(api_env, "# the defaults\ndefaults:\n  %s: %s\n" % (key, value))
    monkeypatch.setenv("STARGET_CONFIG", path)
    assert starget.main(["ls", "127.0.0.1:1/x/y"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("starget: error: %s line 3: defaults.%s must be " % (path, key)), err
    assert len(err.splitlines()) == 1, err


@pytest.mark.parametrize("flag, key, text, value", EDGE_OPTION_VALUES)
def test_range_edges_are_accepted_by_the_flag_and_the_file(flag, key, text, value):
    args = starget._build_parser().parse_args([flag, text, "ls", "img"])
    assert getattr(args, key) == value             # these keys are spelled as their destinations
    assert C.Config.from_text("defaults:\n  %s: %s\n" % (key, text)).flag_defaults() == {key: value}


def test_the_file_takes_what_the_flag_takes():
    """A flag's value is text, so the file accepts the quoted form too; the
    negated key (cache) sets the flag's destination the other way round."""
    config = C.Config.from_text("defaults:\n  concurrency: '8'\n  timeout: \"2.5\"\n  cache: true\n")
    assert config.flag_defaults() == {"concurrency": 8, "timeout": 2.5, "no_cache": False}
    keys = {o.config: o.dest for o in starget._GLOBAL_OPTIONS if o.config}
    assert keys == {"concurrency": "concurrency", "retries": "retries", "no_progress": "no_progress",
                    "platform": "platform", "cache": "no_cache", "timeout": "timeout",
                    "connect_timeout": "connect_timeout"}


# =============================================================================
# transport
# =============================================================================

@pytest.fixture
def other_server():
    """A second pytest-httpserver (another port): the redirect target."""
    from pytest_httpserver import HTTPServer
    srv = HTTPServer(host="127.0.0.1", port=0)
    srv.start()
    try:
        yield srv
    finally:
        srv.clear()
        if srv.is_running():
            srv.stop()


def _auth_headers(requests):
    return [(m, p) for m, p, h in requests if any(k.lower() in ("authorization", "proxy-authorization")
                                                   for k in h)]


@pytest.mark.parametrize("auth", ["basic", "bearer"])
@pytest.mark.parametrize("target", ["same-hostname-other-port", "other-hostname"])
def test_blob_redirect_does_not_leak_authorization(httpserver, other_server, ws, auth, target):
    """Blob GETs answer 307 to another host; the credential must not travel there.

    The redirect target is another server (another port), named by the registry's own
    hostname or by the other loopback name (localhost <-> 127.0.0.1)."""
    storage = OCIServer(other_server, storage=True)
    host = httpserver.host
    if target == "other-hostname":
        host = "127.0.0.1" if httpserver.host == "localhost" else "localhost"
    store_url = "http://%s:%d" % (host, other_server.port)
    reg = OCIServer(httpserver, auth=(auth, "alice", "pw-" + uuid.uuid4().hex[:8]), redirect_to=store_url)
    reg.add_layout("fixtures/layers", "layers")
    storage.blobs.update(reg.blobs)
    rc, out, err = run_cli("--credential", "%s:%s" % reg.auth[1:], "get", reg.image("fixtures/layers"),
                           ".", ws.out)
    assert rc == 0, err
    assert compare_tree(expected_files("layers", "latest"), ws.tree()) == []
    assert storage.requests_to(r"^/storage/sha256:"), "the blobs were not fetched from the redirect target"
    assert _auth_headers(storage.requests) == [], "Authorization reached the other host"
    # the registry itself did get the credential (so the check above means something)
    assert _auth_headers(reg.requests_to(r"/v2/fixtures/layers/")), "no authenticated request to the registry"


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "skip-verify"])
@pytest.mark.parametrize("layout", ["minchunk", "layers"])
def test_server_ignoring_range_gives_exact_bytes_or_clear_error(httpserver, ws, layout, verify):
    """A 200 (whole blob) to a Range request: exact bytes, or a clean failure, never wrong bytes.

    With --skip-verify digests cannot rescue a misread 200: the offsets must be right."""
    reg = OCIServer(httpserver, ignore_range=True)
    reg.add_layout("fixtures/" + layout, layout)
    ref = _first_ref(layout)
    flags = [] if verify else ["--skip-verify"]
    rc, out, err = run_cli(*(flags + ["get", reg.image("fixtures/" + layout, ref), ".", ws.out]))
    files = expected_files(layout, ref)
    tree = ws.tree()
    if rc == 0:
        assert compare_tree(files, tree) == []
    else:
        assert rc != 1, "internal error on a 200-to-Range server: %s" % err
        assert_one_line_error(rc, err, tuple(range(2, 12)))
        for path, a in tree.items():
            if a["type"] == "reg" and path in files and files[path]["type"] == "reg":
                assert a["sha256"] == files[path]["sha256"], "wrong bytes written for %s" % path
    assert any(h.get("Range") for m, p, h in reg.requests if "/blobs/" in p), "no Range request was made"
    ws.assert_nothing_outside()


def test_transient_503_is_retried(httpserver, ws):
    """A 503 with Retry-After on the manifest is retried; the pull then succeeds."""
    reg = OCIServer(httpserver)
    reg.add_layout("fixtures/prefetch", "prefetch")
    state = {"n": 0}
    inner = reg._handle

    def flaky(request):
        if "/manifests/" in request.path and state["n"] < 1:
            state["n"] += 1
            return reg._error(503, "UNAVAILABLE", "try again", {"Retry-After": "0"})
        return inner(request)

    httpserver.clear()
    httpserver.expect_request(re.compile(r"^/.*")).respond_with_handler(flaky)
    rc, out, err = run_cli("--retries", "3", "get", reg.image("fixtures/prefetch", "no-landmark"), ".", ws.out)
    assert rc == 0, err
    assert state["n"] == 1
    assert compare_tree(expected_files("prefetch", "no-landmark"), ws.tree()) == []


def test_one_connection_serves_every_request_of_a_sequential_get(registry_anon, tmp_path):
    client = _client(registry_anon, "layers")
    index = starget.open_image(client.ref, client=client, concurrency=1)
    stats = starget.Downloader(client, concurrency=1).download(index, ".", str(tmp_path))
    assert not stats.failures
    assert client.transport.stats.requests >= 4          # manifest + 3 TOCs + data
    assert client.transport.stats.connections == 1


class _IdleClosingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """A keep-alive HTTP/1.1 server on 127.0.0.1 that closes a connection once it has
    been idle for `idle` seconds (as registries and their load balancers do); GET /wait
    answers only when `parties` requests are in flight at once (N connections)."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, parties, idle=0.3):
        self.barrier = threading.Barrier(parties, timeout=10)
        self.closed = 0
        self.connections = 0
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = idle

            def setup(self):
                super().setup()
                with server.lock:
                    server.connections += 1

            def do_GET(self):
                if self.path == "/wait":
                    server.barrier.wait()
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

            def log_error(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def shutdown_request(self, request):
        super().shutdown_request(request)
        with self.lock:
            self.closed += 1

    def stop(self):
        self.shutdown()
        self.server_close()


def test_a_stale_keep_alive_pool_costs_no_retry():
    """The pool holds several idle connections, the server has closed them all: the next
    request is answered on a new connection, with retries=0 and no retry counted (a
    stale pool is dropped, not tried connection by connection)."""
    n = 4
    server = _IdleClosingServer(parties=n)
    base = "http://127.0.0.1:%d" % server.server_address[1]
    transport = starget.Transport(retry=starget.RetryPolicy(retries=0, base=0.01), environ={},
                                  connect_timeout=5.0, read_timeout=5.0)
    try:
        def fetch(_):
            return transport.request("GET", base + "/wait").read_all(16)
        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert server.connections == n
        assert transport.pool.idle_count() == n, "the pool was not filled"
        deadline = time.time() + 10
        while server.closed < n and time.time() < deadline:
            time.sleep(0.05)
        assert server.closed == n, "the server did not close its idle connections"
        before = transport.stats.as_dict()
        response = transport.request("GET", base + "/again")
        assert response.status == 200
        assert response.read_all(16) == b"ok"
        after = transport.stats.as_dict()
        assert after["retries"] == before["retries"]
    finally:
        transport.close()
        server.stop()


def test_no_proxy_and_loopback_are_never_proxied():
    transport = starget.Transport(environ={"HTTPS_PROXY": "http://proxy.invalid:3128",
                                           "NO_PROXY": ".corp.example,mirror.local:5000"})
    url = starget._URL
    assert transport._proxy_for(url("https://registry.corp.example/v2/")) is None
    assert transport._proxy_for(url("https://mirror.local:5000/v2/")) is None
    assert transport._proxy_for(url("https://mirror.local/v2/")) == "http://proxy.invalid:3128"
    assert transport._proxy_for(url("https://127.0.0.1:5000/v2/")) is None
    assert transport._proxy_for(url("http://other.example/v2/")) is None   # no HTTP_PROXY set


# ---- transport: the retry policy (one decision, one loop) --------------------

def _error(**attributes):
    return starget.StargzError(ErrorCode.NETWORK, "boom", **attributes)


def test_retry_decide_reads_only_typed_attributes():
    policy = starget.RetryPolicy(retries=2, base=0.0, max_delay=0.0)
    assert policy.decide(_error(), 0, 0) is None                       # neither transient nor damaged
    assert policy.decide(_error(transient=True), 0, 0) == 0.0
    assert policy.decide(_error(transient=True), 2, 0) is None          # --retries 2: a third retry is refused
    assert policy.decide(_error(transient=True, retry_after=7.0), 0, 0) == 7.0
    assert policy.decide(_error(transient=True, retry_after=9999.0), 0, 0) == 60.0   # the documented cap
    damaged = starget.StargzError(ErrorCode.INTEGRITY, "bad chunk", damaged=True)
    assert policy.decide(damaged, 0, 0) == 0.0                          # fetched once more at once
    assert policy.decide(damaged, 0, 1) is None
    assert starget.RetryPolicy(retries=0).decide(damaged, 0, 0) == 0.0  # whatever --retries says
    assert policy.decide(ValueError("not ours"), 0, 0) is None


def test_retry_run_attempts_are_bounded_and_counted():
    slept = []
    policy = starget.RetryPolicy(retries=3, base=0.01, max_delay=0.01, sleep=slept.append)
    stats = starget._TransportStats()
    calls = []

    def always_failing():
        calls.append(1)
        raise _error(transient=True)
    with pytest.raises(StargzError):
        policy.run(always_failing, "a test", stats)
    assert len(calls) == 4 and stats.retries == 3 and len(slept) == 3   # --retries N: N+1 attempts

    outcomes = [_error(transient=True), starget.StargzError(ErrorCode.INTEGRITY, "x", damaged=True), "ok"]

    def flaky():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome
    assert policy.run(flaky, "a test", stats) == "ok"
    assert stats.retries == 5

    permanent = []

    def refused():
        permanent.append(1)
        raise _error()
    with pytest.raises(StargzError):
        policy.run(refused, "a test")
    assert permanent == [1]


# ---- transport: faults on the wire (a FaultProxy before the real registry) ---

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


if given is not None:
    @PROP
    @example("\xb2")                                # "²".isdigit() is True, float("²") is not
    @example("Mon, 01 Jan 99999 00:00:00 GMT")     # parsedate_tz accepts, the year overflows
    @given(st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=40)
           | st.text(alphabet="0123456789\xb2\xb3\xb9 .-", max_size=12)
           | st.from_regex(r"\A[A-Za-z]{3}, \d{1,2} [A-Za-z]{3} \d{1,6} \d\d:\d\d:\d\d( GMT| [+-]\d{4})?\Z"))
    def test_prop_parse_retry_after(value):
        """A server's Retry-After header (latin-1): seconds >= 0 or None, never a crash."""
        result = _only_stargz_error(starget._parse_retry_after, value)
        assert result is None or result >= 0


# ---- transport: TLS, an https registry redirecting to plain http ------------

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
def plain_server(other_server):
    """A plain-http server for the https -> http redirect tests (the second server)."""
    return other_server


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


# ---- transport: TLS against a real HTTPS registry ---------------------------

FAST = ["--retries", "0"]


@pytest.fixture(scope="module")
def tls_registry():
    """An anonymous HTTPS registry on 127.0.0.1 with fixtures/basic:latest; its certificate
    names IP 127.0.0.1, localhost and registry.test (reached through the proxy)."""
    from harness import _registry_binary, _unavailable, session_tmp
    if not _registry_binary():
        _unavailable("docker-registry binary not found")
    if not shutil.which("openssl"):
        _unavailable("openssl not found")
    workdir = tempfile.mkdtemp(prefix="registry-tls-", dir=session_tmp())
    try:
        reg, stop = start_tls_registry(workdir, images=(("basic", "latest"), ("plain-gzip", "latest")),
                                       dns_names=("localhost", "registry.test"))
    except Exception as e:  # noqa: BLE001
        pytest.fail("could not start the TLS registry: %s" % e, pytrace=False)
    reg.cacert = reg.extra["REGISTRY_CACERT"]
    reg.port = int(reg.addr.rsplit(":", 1)[1])
    try:
        yield reg
    finally:
        stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def proxy():
    p = ForwardProxy(hosts={"registry.test": "127.0.0.1"})
    try:
        yield p
    finally:
        p.stop()


def _tls_client(reg, **transport_options):
    transport_options.setdefault("certs_dirs", [])
    transport_options.setdefault("retry", starget.RetryPolicy(retries=0))
    transport = starget.Transport(**transport_options)
    return starget.RegistryClient("%s/fixtures/basic:latest" % reg.addr, plain_http=False,
                                  transport=transport, credentials=starget.Credentials(environ={}, home="/nonexistent"))


def _api_get(client, pattern, out):
    index = starget.open_image(client.ref, client=client)
    stats = starget.Downloader(client).download(index, pattern, out)
    return index, stats


def test_tls_api_cafile_byte_exact(tls_registry, api_env):
    client = _tls_client(tls_registry, cafile=tls_registry.cacert)
    assert client.endpoint.base_url.startswith("https://")
    out = str(api_env / "out")
    _api_get(client, ".", out)
    assert compare_tree(expected_files("basic", "latest"), walk_tree(out)) == []


def test_tls_api_without_ca_is_network_error(tls_registry, api_env):
    client = _tls_client(tls_registry)
    with pytest.raises(starget.StargzError) as ei:
        starget._resolve_manifest(client)
    e = ei.value
    assert e.code == starget.ErrorCode.NETWORK
    assert tls_registry.addr in e.message
    assert "--cacert" in e.message and "-k" in e.message
    assert "\n" not in e.message


def test_tls_api_insecure(tls_registry, api_env):
    client = _tls_client(tls_registry, insecure=True)
    out = str(api_env / "out")
    _api_get(client, "etc/", out)
    assert compare_tree(expected_files("basic", "latest"), walk_tree(out), prefix="etc") == []


@pytest.mark.parametrize("folder", ["netloc", "host"])
def test_tls_api_certs_dir(tls_registry, api_env, folder):
    certs = api_env / "certs.d"
    name = tls_registry.addr if folder == "netloc" else "127.0.0.1"
    os.makedirs(str(certs / name))
    shutil.copy(tls_registry.cacert, str(certs / name / "ca.crt"))
    client = _tls_client(tls_registry, certs_dirs=[str(api_env / "empty"), str(certs)])
    out = str(api_env / "out")
    _api_get(client, "bin/busybox", out)
    assert compare_tree(expected_files("basic", "latest"), walk_tree(out), prefix="bin/busybox") == []


def test_tls_api_certs_dir_of_other_registry_not_used(tls_registry, api_env):
    certs = api_env / "certs.d"
    os.makedirs(str(certs / "127.0.0.1:1"))
    shutil.copy(tls_registry.cacert, str(certs / "127.0.0.1:1" / "ca.crt"))
    client = _tls_client(tls_registry, certs_dirs=[str(certs)])
    with pytest.raises(starget.StargzError) as ei:
        starget._resolve_manifest(client)
    assert ei.value.code == starget.ErrorCode.NETWORK


def test_tls_api_ssl_cert_file(tls_registry, api_env, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", tls_registry.cacert)
    client = _tls_client(tls_registry)
    out = str(api_env / "out")
    _api_get(client, "etc/os-release", out)
    assert compare_tree(expected_files("basic", "latest"), walk_tree(out), prefix="etc/os-release") == []


# ---- transport: TLS through the command line --------------------------------

# These tests reach the HTTPS registry as registry.test:PORT through the proxy
# (registry.test is in the certificate); loopback names are tested at the end.

def _tls_cli_env(proxy, **extra):
    env = {"HTTPS_PROXY": proxy.url}
    env.update(extra)
    return env


def _tls_image(reg, layout="basic"):
    return "registry.test:%d/fixtures/%s:latest" % (reg.port, layout)


def test_tls_cli_without_ca_exit_5(tls_registry, proxy):
    rc, out, err = run_cli(*(FAST + ["ls", _tls_image(tls_registry)]), env=_tls_cli_env(proxy))
    line = assert_one_line_error(rc, err, 5)
    assert "registry.test:%d" % tls_registry.port in line
    assert "--cacert" in line and "-k" in line
    assert proxy.seen("CONNECT"), "the request did not go through the proxy"


def test_tls_cli_verify_failure_not_retried(tls_registry, proxy):
    """A certificate that does not verify will not verify on the next try either."""
    rc, out, err = run_cli("-v", "ls", _tls_image(tls_registry), env=_tls_cli_env(proxy))
    assert_one_line_error(rc, err, 5)
    assert "retrying" not in err, "TLS verification failure was retried: %s" % err
    assert len(proxy.seen("CONNECT")) == 1


def test_tls_cli_cacert_byte_exact(tls_registry, proxy, tmp_path):
    out = str(tmp_path / "out")
    rc, _, err = run_cli("--cacert", tls_registry.cacert, "get", _tls_image(tls_registry), ".", out,
                         env=_tls_cli_env(proxy))
    assert rc == 0, err
    assert compare_tree(expected_files("basic", "latest"), walk_tree(out)) == []
    targets = {t for m, t, h in proxy.seen("CONNECT")}
    assert targets == {"registry.test:%d" % tls_registry.port}


def test_tls_cli_insecure(tls_registry, proxy, tmp_path):
    out = str(tmp_path / "out")
    rc, _, err = run_cli("-k", "get", _tls_image(tls_registry), "etc", out, env=_tls_cli_env(proxy))
    assert rc == 0, err
    assert compare_tree(expected_files("basic", "latest"), walk_tree(out), prefix="etc") == []


def test_tls_cli_ssl_cert_file(tls_registry, proxy):
    rc, out, err = run_cli("cat", _tls_image(tls_registry), "bin/busybox", binary=True,
                           env=_tls_cli_env(proxy, SSL_CERT_FILE=tls_registry.cacert))
    assert rc == 0, err
    assert hashlib.sha256(out).hexdigest() == BUSYBOX_SHA


def test_tls_cli_missing_cacert_file_exit_2(tls_registry, proxy, tmp_path):
    """A --cacert file that cannot be read is a usage error naming the file, not a
    network failure to retry."""
    missing = str(tmp_path / "missing.pem")
    rc, out, err = run_cli("-v", "--cacert", missing, "ls", _tls_image(tls_registry), env=_tls_cli_env(proxy))
    line = assert_one_line_error(rc, err, 2)
    assert "CA" in line
    assert missing in line, "the message should name the file: %s" % line
    assert "retrying" not in err, "a usage error was retried as a network failure: %s" % err


def test_tls_cli_loopback_https_via_config(tls_registry, tmp_path):
    """config.yaml `registries: HOST: plain_http: false` + `ca_file` (STARGET_CONFIG)
    reaches a loopback registry over https from the command line; without the CA
    the same command fails verification."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text("# test config\nregistries:\n  \"%s\":\n    plain_http: false\n    ca_file: %s\n"
                   % (tls_registry.addr, tls_registry.cacert))
    rc, out, err = run_cli("cat", "%s/fixtures/basic:latest" % tls_registry.addr, "bin/busybox", binary=True,
                           env={"STARGET_CONFIG": str(cfg)})
    assert rc == 0, err
    assert hashlib.sha256(out).hexdigest() == BUSYBOX_SHA
    cfg.write_text("registries:\n  \"%s\":\n    plain_http: false\n" % tls_registry.addr)
    rc, out, err = run_cli("ls", "%s/fixtures/basic:latest" % tls_registry.addr, env={"STARGET_CONFIG": str(cfg)})
    assert rc == 5 and "TLS verification failed" in err


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_tls_cli_loopback_with_cacert_no_config(tls_registry, host):
    """A TLS registry on loopback is reached with --cacert alone: TLS is tried first
    (it used to be plain HTTP, answered by HTTP 400 and exit 5)."""
    image = "%s:%d/fixtures/basic:latest" % (host, tls_registry.port)
    rc, out, err = run_cli("--cacert", tls_registry.cacert, "cat", image, "bin/busybox", binary=True)
    assert rc == 0, err
    assert hashlib.sha256(out).hexdigest() == BUSYBOX_SHA
    assert err.strip() == ""


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_tls_cli_loopback_verify_failure_never_falls_back(tls_registry, host):
    """Without the CA the certificate does not verify: a clear TLS error, exit 5, and no
    retry over plain HTTP (that would hide an attack); with -k it works."""
    image = "%s:%d/fixtures/basic:latest" % (host, tls_registry.port)
    rc, out, err = run_cli("--retries", "0", "ls", image)
    assert_one_line_error(rc, err, 5)
    assert "TLS verification failed" in err
    rc, out, err = run_cli("-k", "ls", image)
    assert rc == 0, err
    assert set(out.splitlines()) == set(p for p in BASIC_FILES if p)


# ---- transport: forward proxies ---------------------------------------------

def _proxied_client(reg_addr, environ, plain_http=True, layout="basic", **transport_options):
    port = reg_addr.rsplit(":", 1)[1]
    transport_options.setdefault("certs_dirs", [])
    transport_options.setdefault("retry", starget.RetryPolicy(retries=0))
    transport = starget.Transport(environ=environ, **transport_options)
    return starget.RegistryClient("registry.test:%s/fixtures/%s:latest" % (port, layout), plain_http=plain_http,
                                  transport=transport, credentials=starget.Credentials(environ={}, home="/nonexistent"))


@pytest.mark.parametrize("var", ["HTTP_PROXY", "http_proxy"])
def test_proxy_http_absolute_form(registry_anon, proxy, api_env, var):
    client = _proxied_client(registry_anon.addr, {var: proxy.url})
    out = str(api_env / "out")
    _api_get(client, "etc/", out)
    files = expected_files("basic", "latest")
    assert compare_tree(files, walk_tree(out), prefix="etc") == []
    seen = proxy.seen()
    assert seen, "the proxy saw no request"
    base = "http://registry.test:%s/v2/fixtures/basic/" % registry_anon.addr.rsplit(":", 1)[1]
    assert all(t.startswith(base) for m, t, h in seen), seen
    assert any("/manifests/latest" in t for m, t, h in seen)
    assert any("/blobs/sha256:" in t and "range" in h for m, t, h in seen), "no ranged blob read via the proxy"


def test_proxy_credentials_in_proxy_url(registry_anon, proxy, api_env):
    url = proxy.url.replace("http://", "http://pu:p%40ss@")
    client = _proxied_client(registry_anon.addr, {"HTTP_PROXY": url})
    starget._resolve_manifest(client)
    seen = proxy.seen()
    assert seen and all(h.get("proxy-authorization") == "Basic " + _b64("pu", "p@ss") for m, t, h in seen)


@pytest.mark.parametrize("no_proxy", ["registry.test", ".test", "*", "other.example, registry.test",
                                      "REGISTRY.TEST"])
def test_proxy_no_proxy_bypasses(registry_anon, proxy, api_env, no_proxy):
    client = _proxied_client(registry_anon.addr, {"HTTP_PROXY": proxy.url, "NO_PROXY": no_proxy})
    with pytest.raises(starget.StargzError) as ei:
        starget._resolve_manifest(client)
    assert ei.value.code == starget.ErrorCode.NETWORK
    assert "cannot resolve host registry.test" in ei.value.message
    assert proxy.seen() == []


def test_proxy_no_proxy_with_port(registry_anon, proxy, api_env):
    port = registry_anon.addr.rsplit(":", 1)[1]
    client = _proxied_client(registry_anon.addr, {"HTTP_PROXY": proxy.url, "NO_PROXY": "registry.test:%s" % port})
    with pytest.raises(starget.StargzError):
        starget._resolve_manifest(client)
    assert proxy.seen() == []
    other = _proxied_client(registry_anon.addr, {"HTTP_PROXY": proxy.url, "NO_PROXY": "registry.test:1"})
    starget._resolve_manifest(other)
    assert proxy.seen()


def test_proxy_loopback_never_proxied(registry_anon, api_env):
    transport = starget.Transport(environ={"HTTP_PROXY": "http://127.0.0.1:1", "HTTPS_PROXY": "http://127.0.0.1:1"},
                                  retry=starget.RetryPolicy(retries=0))
    client = starget.RegistryClient(registry_anon.image("basic"), transport=transport,
                                    credentials=starget.Credentials(environ={}, home="/nonexistent"))
    assert starget._resolve_manifest(client).layers


@pytest.mark.parametrize("verify", ["insecure", "cafile"])
def test_proxy_https_connect(tls_registry, proxy, api_env, verify):
    opts = {"insecure": True} if verify == "insecure" else {"cafile": tls_registry.cacert}
    client = _proxied_client(tls_registry.addr, {"HTTPS_PROXY": proxy.url, "HTTP_PROXY": "http://127.0.0.1:1"},
                             plain_http=False, **opts)
    out = str(api_env / "out")
    _api_get(client, "bin/", out)
    assert compare_tree(expected_files("basic", "latest"), walk_tree(out), prefix="bin") == []
    seen = proxy.seen()
    assert seen and {m for m, t, h in seen} == {"CONNECT"}
    assert {t for m, t, h in seen} == {"registry.test:%d" % tls_registry.port}


def test_proxy_connect_credentials(tls_registry, proxy, api_env):
    url = proxy.url.replace("http://", "http://pu:secret@")
    client = _proxied_client(tls_registry.addr, {"HTTPS_PROXY": url}, plain_http=False, insecure=True)
    starget._resolve_manifest(client)
    seen = proxy.seen("CONNECT")
    assert seen and all(h.get("proxy-authorization") == "Basic " + _b64("pu", "secret") for m, t, h in seen)


def test_proxy_refused_api(api_env):
    transport = starget.Transport(environ={"HTTPS_PROXY": "http://127.0.0.1:1"}, retry=starget.RetryPolicy(retries=0))
    client = starget.RegistryClient("registry.test:5000/x/y:1", transport=transport,
                                    credentials=starget.Credentials(environ={}, home="/nonexistent"))
    with pytest.raises(starget.StargzError) as ei:
        starget._resolve_manifest(client)
    assert ei.value.code == starget.ErrorCode.NETWORK
    assert "proxy" in ei.value.message and "127.0.0.1:1" in ei.value.message


def test_proxy_refused_cli():
    rc, out, err = run_cli(*(FAST + ["ls", "registry.test:5000/x/y:1"]), env={"HTTPS_PROXY": "http://127.0.0.1:1"})
    line = assert_one_line_error(rc, err, 5)
    assert "proxy 127.0.0.1:1" in line


def test_proxy_tunnel_refused(proxy):
    """The proxy answers CONNECT with 502 (it cannot resolve the name)."""
    rc, out, err = run_cli(*(FAST + ["ls", "unknown.invalid:5000/x/y:1"]), env={"HTTPS_PROXY": proxy.url})
    line = assert_one_line_error(rc, err, 5)
    assert "proxy" in line and "127.0.0.1:%d" % proxy.port in line and "unknown.invalid:5000" in line
    assert [t for m, t, h in proxy.seen()] == ["unknown.invalid:5000"]


def test_cli_insecure_falls_back_to_http_through_proxies(registry_anon, proxy, tmp_path):
    """-k with a non-loopback name of a plain-HTTP registry: the TLS handshake through
    the CONNECT tunnel fails, starget falls back to plain HTTP via HTTP_PROXY."""
    port = registry_anon.addr.rsplit(":", 1)[1]
    out = str(tmp_path / "out")
    rc, _, err = run_cli("-k", "get", "registry.test:%s/fixtures/basic:latest" % port, "etc/os-release", out,
                         env={"HTTPS_PROXY": proxy.url, "HTTP_PROXY": proxy.url})
    assert rc == 0, err
    assert compare_tree(expected_files("basic", "latest"), walk_tree(out), prefix="etc/os-release") == []
    methods = [m for m, t, h in proxy.seen()]
    assert "CONNECT" in methods and "GET" in methods


def test_cli_cannot_resolve_host():
    rc, out, err = run_cli(*(FAST + ["ls", "nonexistent.invalid/x:1"]))
    line = assert_one_line_error(rc, err, 5)
    assert "cannot resolve host nonexistent.invalid" in line


def test_cli_cannot_resolve_host_not_retried():
    """A name that does not exist (EAI_NONAME) will not exist a second later either."""
    t0 = time.time()
    rc, out, err = run_cli("-v", "ls", "nonexistent.invalid/x:1")
    assert_one_line_error(rc, err, 5)
    assert "retrying" not in err, "an unknown host name was retried: %s" % err
    assert time.time() - t0 < 3


# =============================================================================
# registry
# =============================================================================

def test_basic_auth_right_credential(registry_basic, ws):
    rc, out, err = run_cli("--credential", registry_basic.credential, "get",
                           registry_basic.image("basic"), "etc/", ws.out)
    assert rc == 0, err
    assert compare_tree(expected_files("basic", "latest"), ws.tree(), prefix="etc") == []


def test_basic_auth_wrong_password(registry_basic, ws):
    rc, out, err = run_cli("--credential", "%s:wrong" % registry_basic.user, "get",
                           registry_basic.image("basic"), ".", ws.out)
    assert_one_line_error(rc, err, 4)
    ws.assert_out_empty()
    ws.assert_nothing_outside()


def test_basic_auth_no_credential(registry_basic, ws):
    rc, out, err = run_cli("get", registry_basic.image("basic"), ".", ws.out)
    assert_one_line_error(rc, err, 4)
    ws.assert_out_empty()


def test_bearer_anonymous_pull(registry_bearer, ws):
    rc, out, err = run_cli("get", registry_bearer.image("layers"), ".", ws.out)
    assert rc == 0, err
    assert compare_tree(expected_files("layers", "latest"), ws.tree()) == []


def test_bearer_with_credentials(registry_bearer):
    data = _ls_json("--credential", registry_bearer.credential, "ls", "--json",
                    registry_bearer.image("minchunk"))
    assert project_ls(data) == expected_ls(expected_files("minchunk", "latest"))


def test_bearer_wrong_password(registry_bearer, ws):
    rc, out, err = run_cli("--credential", "%s:wrong" % registry_bearer.user, "get",
                           registry_bearer.image("layers"), ".", ws.out)
    assert_one_line_error(rc, err, 4)
    ws.assert_out_empty()


def test_pull_by_manifest_digest(registry_anon):
    digest = expected_ref("layers", "latest")["digest"]
    data = _ls_json("ls", "--json", registry_anon.image_by_digest("layers", digest))
    assert project_ls(data) == expected_ls(expected_files("layers", "latest"))


def test_wrong_pinned_digest_is_not_found(registry_anon, ws):
    rc, out, err = run_cli("get", registry_anon.image_by_digest("layers", "sha256:" + "0" * 64), ".", ws.out)
    assert_one_line_error(rc, err, 3)
    ws.assert_out_empty()


def test_unknown_repository(registry_anon, ws):
    rc, out, err = run_cli("get", "%s/fixtures/no-such-image:latest" % registry_anon.addr, ".", ws.out)
    assert_one_line_error(rc, err, 3)
    ws.assert_out_empty()
    ws.assert_nothing_outside()


def test_unknown_tag(registry_anon, ws):
    rc, out, err = run_cli("get", registry_anon.image("basic", "no-such-tag"), ".", ws.out)
    line = assert_one_line_error(rc, err, 3)
    assert "MANIFEST_UNKNOWN" in line or "no-such-tag" in line or "not found" in line.lower()
    ws.assert_out_empty()
    ws.assert_nothing_outside()


def test_unknown_platform(registry_anon, ws):
    rc, out, err = run_cli("--platform", "linux/s390x", "get", registry_anon.image("multiarch"), ".", ws.out)
    assert_one_line_error(rc, err, 3)
    ws.assert_out_empty()


def test_unreachable_registry_is_network_error(ws):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()   # nothing listens there now
    rc, out, err = run_cli("--retries", "0", "get", "127.0.0.1:%d/x/y:z" % port, ".", ws.out, timeout=60)
    assert_one_line_error(rc, err, 5)
    ws.assert_out_empty()


# ---- registry: endpoints, walked in order ------------------------------------

def test_endpoints_are_values_in_resolution_order(tmp_path):
    creds = starget.Credentials(environ={}, home="/nonexistent")
    client = starget.RegistryClient("registry.test:5000/x/y:1", insecure=True, credentials=creds,
                                    mirrors=[("mirror.test", None), ("127.0.0.1:5001", True)])
    got = [(e.host, e.scheme, e.role) for e in client.endpoints]
    assert got == [("mirror.test", "https", "mirror"), ("mirror.test", "http", "plain-http"),
                   ("127.0.0.1:5001", "http", "mirror"),
                   ("registry.test:5000", "https", "registry"), ("registry.test:5000", "http", "plain-http")]
    assert client.endpoint is client.endpoints[0]
    assert client.endpoints[0].auth is not client.endpoints[3].auth   # each host answers to its own token

    def schemes(ref="127.0.0.1:5000/x/y:1", **options):
        transport = starget.Transport(environ={}, certs_dirs=options.pop("certs_dirs", ()),
                                      cafile=options.pop("cafile", None))
        client = starget.RegistryClient(ref, credentials=creds, transport=transport, **options)
        return [(e.scheme, e.role) for e in client.endpoints]
    # loopback: TLS first, plain HTTP only if the server does not speak TLS ...
    assert schemes() == [("https", "registry"), ("http", "plain-http")]
    assert schemes("localhost:5000/x/y:1") == [("https", "registry"), ("http", "plain-http")]
    assert schemes(plain_http=True) == [("http", "registry")]       # config plain_http: true forces HTTP
    assert schemes(plain_http=False) == [("https", "registry")]
    # ... and never when a CA is named for that host: then it means TLS
    assert schemes(cafile="/some/ca.pem") == [("https", "registry")]
    certs = tmp_path / "certs.d" / "127.0.0.1:5000"
    certs.mkdir(parents=True)
    (certs / "ca.crt").write_text("x")
    assert schemes(certs_dirs=(str(tmp_path / "certs.d"),)) == [("https", "registry")]
    assert schemes("registry.test:5000/x/y:1") == [("https", "registry")]


def test_endpoint_fallback_decisions():
    fallback = starget._endpoint_fallback
    E = starget._Endpoint
    plain = [E("m", "https", "mirror"), E("m", "http", "plain-http"), E("r", "https", "registry"),
             E("r", "http", "plain-http")]
    tls = starget._TLSHandshakeError(ErrorCode.NETWORK, "no TLS")
    verify = starget.StargzError(ErrorCode.NETWORK, "certificate verify failed")
    missing = starget.StargzError(ErrorCode.NOT_FOUND, "no such image")
    bad = starget.StargzError(ErrorCode.FORMAT, "hostile manifest")
    assert fallback(plain, 0, tls) == 1            # the mirror does not speak TLS: its http endpoint
    assert fallback(plain, 0, verify) == 2         # a mirror that fails: the registry
    assert fallback(plain, 1, missing) == 2
    assert fallback(plain, 0, bad) is None          # a hostile answer is not a reason to look elsewhere
    assert fallback(plain, 2, tls) == 3
    assert fallback(plain, 2, verify) is None       # never plain HTTP after a failed verification
    assert fallback(plain, 2, missing) is None
    assert fallback(plain, 3, tls) is None


# ---- registry: hostile manifests, indexes and tokens (pytest-httpserver) -----

def _basic_layer_descriptor(**extra):
    desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": BASIC_BLOB,
            "size": BASIC_SIZE, "annotations": {TOC_DIGEST_ANNOTATION: BASIC_LAYER["toc_digest"]}}
    desc.update(extra)
    return desc


def _entry_platform(**platform):
    """An index edit: the (only) entry's `platform` becomes `platform` (or its value)."""
    value = platform.pop("value", platform)
    return lambda index: index["manifests"][0].update(platform=value)


HOSTILE_MANIFESTS = [
    # (id, manifest fields or raw bytes, index edit (None: no index, the manifest is
    #  tagged), --platform, exit codes; 0: an oddity that is ignored, the image is read)
    ("layers-int", {"layers": 5}, None, None, (6,)),
    ("layers-string", {"layers": "sha256:" + "0" * 64}, None, None, (6,)),
    ("layer-annotations-empty-list", {"layers": [_basic_layer_descriptor(annotations=[])]}, None, None, (0,)),
    ("layer-annotations-list", {"layers": [_basic_layer_descriptor(annotations=["x", 1])]}, None, None, (0,)),
    ("deep-json", b"[" * 100000 + b"]" * 100000, None, None, (6,)),
    ("deep-json-unclosed", b"[" * 100000, None, None, (6,)),
    ("deep-json-object", b'{"a":' * 100000 + b"1" + b"}" * 100000, None, None, (6,)),
    ("index-platform-string", {}, _entry_platform(value="linux/amd64"), None, (3,)),
    ("index-platform-list", {}, _entry_platform(value=["linux", "amd64"]), None, (3,)),
    ("index-variant-int", {}, _entry_platform(os="linux", architecture="arm", variant=7), "linux/s390x", (3,)),
    ("index-variant-int-matches", {}, _entry_platform(os="linux", architecture="arm", variant=7), "linux/arm/7",
     (0,)),
    ("index-annotations-list", {},
     lambda index: index["manifests"][0].update(platform={"os": "linux", "architecture": "amd64"}, annotations=[1]),
     "linux/amd64", (0,)),
    ("index-manifests-int", {}, lambda index: index.update(manifests=5), None, (3,)),
]


@pytest.mark.parametrize("case,manifest,index_edit,platform,codes", HOSTILE_MANIFESTS,
                         ids=[c[0] for c in HOSTILE_MANIFESTS])
def test_hostile_manifest_is_one_line_error(httpserver, case, manifest, index_edit, platform, codes):
    """Manifests and indexes of the wrong JSON types or nesting: a one-line error with
    the right code (or, for an ignorable oddity, the image read), never an internal error."""
    reg = OCIServer(httpserver)
    repo = "fixtures/hostile"
    reg.add_blob(repo, basic_blob())
    if isinstance(manifest, bytes):
        raw = manifest
    else:
        config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
        doc = {"schemaVersion": 2, "mediaType": starget._MEDIA_OCI_MANIFEST,
               "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                          "digest": reg.add_blob(repo, config), "size": len(config)},
               "layers": [_basic_layer_descriptor()]}
        doc.update(manifest)
        raw = json.dumps(doc).encode()
    if index_edit is None:
        reg.add_manifest(repo, raw, starget._MEDIA_OCI_MANIFEST, "latest")
    else:
        digest = reg.add_manifest(repo, raw, starget._MEDIA_OCI_MANIFEST)
        index = {"schemaVersion": 2, "mediaType": starget._MEDIA_OCI_INDEX,
                 "manifests": [{"mediaType": starget._MEDIA_OCI_MANIFEST, "digest": digest, "size": len(raw)}]}
        index_edit(index)
        reg.add_manifest(repo, json.dumps(index).encode(), starget._MEDIA_OCI_INDEX, "latest")
    rc, out, err = run_cli("--retries", "0", "ls", reg.image(repo), *_plat_args(platform))
    assert rc != 1 and "internal error" not in err, err
    if codes == (0,):
        assert rc == 0, err
        assert sorted(out.splitlines()) == sorted(p for p in BASIC_FILES if p)
    else:
        assert_one_line_error(rc, err, codes)


@pytest.mark.parametrize("token", ["tok-abc\r\nX-Injected: 1", "tok-abc\nX", "tok-\u2603", "tok-caf\u00e9"])
def test_token_with_unsendable_characters_is_auth_error(httpserver, token):
    """A token server answering a token with CR/LF or a non-ASCII character: exit 4 in
    one line; no header is injected, nothing crashes."""
    reg = OCIServer(httpserver, auth=("bearer", "alice", "pw"))
    reg.add_image("fixtures/hostile", [basic_blob()],
                  annotations=[{TOC_DIGEST_ANNOTATION: BASIC_LAYER["toc_digest"]}])
    reg.token = token    # what /token hands out (and what the registry then expects)
    rc, out, err = run_cli("--retries", "0", "ls", reg.image("fixtures/hostile"))
    assert_one_line_error(rc, err, 4)
    assert not any("X-Injected" in h for _, _, headers in reg.requests for h in headers)


# ---- registry: WWW-Authenticate parsing (properties) ------------------------

def _quote(v):
    return '"%s"' % v.replace("\\", "\\\\").replace('"', '\\"')


if given is not None:
    @PROP
    @given(st.text(max_size=120))
    def test_prop_parse_www_authenticate_any(text):
        result = _only_stargz_error(starget._parse_www_authenticate, text)
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
        got_scheme, got = starget._parse_www_authenticate(header)
        assert got_scheme == scheme.lower()
        assert got == params


# ---- registry: mirrors from the configuration file (two real registries) ------

@pytest.fixture(scope="module")
def empty_registry(tmp_path_factory):
    """A second real registry with nothing pushed to it."""
    from harness import start_registry
    try:
        registry, stop = start_registry("anon", str(tmp_path_factory.mktemp("empty")), push=False)
    except RuntimeError as e:
        pytest.skip(str(e)) if os.environ.get("STARGET_REQUIRE_REGISTRY") != "1" else pytest.fail(str(e))
    yield registry
    stop()


def _mirror_config(tmp_path, upstream, mirror):
    path = tmp_path / "config.yaml"
    path.write_text('registries:\n  "%s":\n    mirror: "%s"\n' % (upstream, mirror))
    return {"STARGET_CONFIG": str(path)}


def test_a_mirror_serves_the_image_of_another_registry(registry_anon, empty_registry, tmp_path):
    env = _mirror_config(tmp_path, empty_registry.addr, registry_anon.addr)
    image = "%s/fixtures/layers:latest" % empty_registry.addr     # only the mirror has it
    rc, out, err = run_cli("-d", "get", image, ".", str(tmp_path / "out"), env=env)
    assert rc == 0, err
    assert compare_tree(expected_files("layers", "latest"), walk_tree(str(tmp_path / "out"))) == []
    requests = [line for line in err.splitlines() if "> GET" in line]
    assert requests and all(registry_anon.addr in line for line in requests)


def test_a_mirror_without_the_image_falls_back_to_the_registry(registry_anon, empty_registry, tmp_path):
    env = _mirror_config(tmp_path, registry_anon.addr, empty_registry.addr)
    rc, out, err = run_cli("ls", registry_anon.image("basic"), env=env)
    assert rc == 0, err
    assert "mirror %s" % empty_registry.addr in err and "using %s" % registry_anon.addr in err
    assert sorted(out.splitlines()) == sorted(p for p in expected_files("basic", "latest") if p)


def test_an_unreachable_mirror_falls_back_to_the_registry(registry_anon, tmp_path):
    env = _mirror_config(tmp_path, registry_anon.addr, "127.0.0.1:1")
    rc, out, err = run_cli("--retries", "0", "ls", registry_anon.image("basic"), env=env)
    assert rc == 0, err
    assert "mirror 127.0.0.1:1" in err


def test_tags_come_from_the_registry_not_its_mirror(registry_anon, empty_registry, tmp_path):
    """A mirror holds some of a registry's tags: `tags` asks the registry itself."""
    env = _mirror_config(tmp_path, empty_registry.addr, registry_anon.addr)
    rc, out, err = run_cli("tags", "%s/fixtures/prefetch" % empty_registry.addr, env=env)
    assert_one_line_error(rc, err, 3)


# ---- registry: tags lists -------------------------------------------------------

def _layout_tags(layout):
    from harness import layout_refs
    return sorted(layout_refs(layout))


@pytest.mark.parametrize("layout", ["prefetch", "docker-v2", "basic"])
def test_tags_lists_the_pushed_tags(registry_anon, layout):
    repository = "%s/fixtures/%s" % (registry_anon.addr, layout)
    rc, out, err = run_cli("tags", repository)
    assert rc == 0, err
    assert sorted(out.splitlines()) == _layout_tags(layout)
    rc, out, err = run_cli("tags", "--json", repository)
    assert rc == 0, err
    assert sorted(json.loads(out)) == _layout_tags(layout)


def test_tags_with_basic_and_bearer_auth(registry_basic, registry_bearer):
    for reg in (registry_basic, registry_bearer):
        rc, out, err = run_cli("--credential", reg.credential, "tags", "%s/fixtures/prefetch" % reg.addr)
        assert rc == 0, err
        assert sorted(out.splitlines()) == _layout_tags("prefetch")
    rc, out, err = run_cli("tags", "%s/fixtures/prefetch" % registry_basic.addr)
    assert_one_line_error(rc, err, 4)


@pytest.mark.parametrize("repository, code", [
    ("{addr}/fixtures/prefetch:prefetch", 2), ("{addr}/fixtures/prefetch@sha256:" + "0" * 64, 2),
    ("{addr}/fixtures/Upper", 2), ("{addr}/fixtures/no-such-repository", 3)])
def test_tags_errors(registry_anon, repository, code):
    rc, out, err = run_cli("tags", repository.format(addr=registry_anon.addr))
    assert_one_line_error(rc, err, code)
    assert out == ""


def _tags_pages(httpserver, pages, name="test/repo"):
    """Serve `pages` [(tags, Link header or None)] of /v2/NAME/tags/list: page i at ?page=i."""
    for i, (tags, link) in enumerate(pages):
        headers = {"Link": link} if link else {}
        httpserver.expect_request("/v2/%s/tags/list" % name, query_string="page=%d" % i if i else "") \
            .respond_with_json({"name": name, "tags": tags}, headers=headers)
    return "%s:%d/%s" % (httpserver.host, httpserver.port, name)


def test_tags_follow_the_link_header(httpserver):
    repository = _tags_pages(httpserver, [
        (["a", "b"], '</v2/test/repo/tags/list?page=1>; rel="next"'),
        (["c"], '<http://%s:%d/v2/test/repo/tags/list?page=2>; rel="next"' % (httpserver.host, httpserver.port)),
        (None, None),                                # an empty last page: "tags": null
    ])
    rc, out, err = run_cli("tags", repository)
    assert rc == 0, err
    assert out == "a\nb\nc\n"
    rc, out, err = run_cli("tags", "--json", repository)
    assert json.loads(out) == ["a", "b", "c"]


def test_tags_refuse_a_link_to_another_host_and_bad_names(httpserver):
    repository = _tags_pages(httpserver, [(["a"], '<http://elsewhere.example/v2/x/tags/list>; rel="next"')])
    rc, out, err = run_cli("tags", repository)
    assert "another host" in assert_one_line_error(rc, err, 6)
    httpserver.clear()
    repository = _tags_pages(httpserver, [(["ok", "bad\x1b[2J", "new\nline"], None)])
    rc, out, err = run_cli("tags", repository)
    assert rc == 0 and out == "ok\n", err
    assert "2 invalid names left out" in err


def test_tags_stop_at_a_page_seen_before(httpserver):
    repository = _tags_pages(httpserver, [(["a"], '</v2/test/repo/tags/list>; rel="next"')])
    rc, out, err = run_cli("tags", repository)
    assert rc == 0 and out == "a\n", err
    assert "stopped after 1 page(s)" in err


# =============================================================================
# estargz format
# =============================================================================
# ---- formats: manifests and indexes (pure) ------------------------------------

def _descriptor(digest_char, os_name, arch, variant=None, **extra):
    plat = {"os": os_name, "architecture": arch}
    if variant:
        plat["variant"] = variant
    desc = {"mediaType": starget._MEDIA_OCI_MANIFEST, "digest": "sha256:" + digest_char * 64, "size": 1,
            "platform": plat}
    desc.update(extra)
    return desc


def test_choose_platform_and_index_entries():
    doc = {"mediaType": starget._MEDIA_OCI_INDEX, "manifests": [
        _descriptor("a", "linux", "amd64"), _descriptor("b", "linux", "arm64", "v8"),
        _descriptor("c", "unknown", "unknown"),
        _descriptor("d", "linux", "amd64", annotations={"vnd.docker.reference.type": "attestation-manifest"}),
        {"digest": "not-a-digest"}]}
    assert starget._is_image_index(doc, "")
    index = starget._ImageIndexManifest.from_json(doc, "sha256:" + "f" * 64, "")
    assert [str(p) for p in index.platforms] == ["linux/amd64", "linux/arm64/v8"]
    assert index.media_type == starget._MEDIA_OCI_INDEX
    pick = starget._choose_platform
    assert pick(index, starget.Platform.parse("linux/arm64"), "img")["digest"] == "sha256:" + "b" * 64
    assert pick(index, starget.Platform("linux", "amd64"), "img")["digest"] == "sha256:" + "a" * 64
    with pytest.raises(StargzError) as ei:
        pick(index, starget.Platform.parse("linux/s390x"), "img")
    assert ei.value.code == ErrorCode.NOT_FOUND
    assert "available: linux/amd64, linux/arm64/v8" in ei.value.message


def test_image_manifest_from_json():
    ref = starget.ImageRef.parse("127.0.0.1:5000/x/y:1")
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + "1" * 64,
             "size": 10, "annotations": {starget._ANNOTATION_TOC_DIGEST: "sha256:" + "2" * 64}}
    doc = {"mediaType": starget._MEDIA_OCI_MANIFEST, "config": {"digest": "sha256:" + "3" * 64},
           "layers": [layer, dict(layer, mediaType="application/vnd.oci.image.layer.v1.tar+zstd")]}
    assert not starget._is_image_index(doc, "")
    m = starget._ImageManifest.from_json(doc, ref, "sha256:" + "9" * 64, "", b"raw")
    assert [(d.position, d.compression) for d in m.layers] == [(0, "gzip"), (1, "zstd")]
    assert m.layers[0].toc_digest == "sha256:" + "2" * 64 and m.config_digest == "sha256:" + "3" * 64
    for broken in ({"layers": "nope"}, {"layers": [{"digest": "sha256:" + "1" * 64, "size": -1}]},
                   {"layers": [{"digest": "sha256:1", "size": 1}]}):
        with pytest.raises(StargzError) as ei:
            starget._ImageManifest.from_json(broken, ref, "sha256:" + "9" * 64, "", b"")
        assert ei.value.code == ErrorCode.FORMAT
    with pytest.raises(StargzError) as ei:
        starget._ImageManifest.from_json({"schemaVersion": 2}, ref, "sha256:" + "9" * 64, "x", b"")
    assert ei.value.code == ErrorCode.UNSUPPORTED
    for raw in (b"\xff", b"[1]", b"{"):
        with pytest.raises(StargzError) as ei:
            starget._parse_manifest_json(raw, ref)
        assert ei.value.code == ErrorCode.FORMAT
    assert str(starget._platform_of_config(b'{"os": "linux", "architecture": "arm", "variant": "v7"}')) \
        == "linux/arm/v7"
    assert starget._platform_of_config(b"{}") is None


def test_inflate_members_joins_members_and_bounds_output():
    payloads = [os.urandom(3000), b"z" * 300000, b""]
    blob = b"".join(gzip.compress(p) for p in payloads)
    pieces = [blob[i:i + 7] for i in range(0, len(blob), 7)]     # members split anywhere
    out = list(starget._inflate_members(pieces, max_out=4096))
    assert b"".join(out) == b"".join(payloads)
    assert max(len(o) for o in out) <= 4096
    with pytest.raises(StargzError) as ei:
        list(starget._inflate_members([gzip.compress(b"abc")[:10] + b"\x00garbage" * 4]))
    assert ei.value.code == ErrorCode.FORMAT and ei.value.damaged


def _all_layers():
    """[(layout, layer_expected)] unique by digest."""
    seen, out = set(), []
    for layout, ref, plat, m in ALL_VARIANTS:
        for l in m["layers"]:
            if l["digest"] not in seen:
                seen.add(l["digest"])
                out.append((layout, l))
    return out


FOOTER_LAYERS = [(lay, l) for lay, l in _all_layers()
                 if l.get("footer", {}).get("kind") in ("estargz", "legacy-stargz")]


@pytest.mark.parametrize("layout,layer", FOOTER_LAYERS, ids=[l["digest"][7:19] + "-" + lay for lay, l in FOOTER_LAYERS])
def test_parse_footer_fixtures(layout, layer):
    blob = blob_bytes(layout, layer["digest"])
    want = (layer["footer"]["toc_offset"], layer["footer"]["size"])
    assert tuple(starget.parse_footer(blob[-51:])) == want
    assert tuple(starget.parse_footer(blob[-4096:])) == want
    assert blob[-layer["footer"]["size"]:].hex() == layer["footer"]["hex"]


@pytest.mark.parametrize("layout", PLAIN_GZIP_LAYOUTS)
def test_parse_footer_plain_gzip_is_format_error(layout):
    m = expected_ref(layout, _first_ref(layout))
    blob = blob_bytes(layout, m["layers"][0]["digest"])
    with pytest.raises(starget.StargzError) as ei:
        starget.parse_footer(blob[-51:])
    assert ei.value.code == starget.ErrorCode.FORMAT


@pytest.mark.parametrize("layout", ZSTD_LAYOUTS)
def test_zstd_chunked_footer_and_position(layout):
    """The 48-byte footer and the manifest-position annotation say the same thing, and
    the eStargz footer parser refuses the blob (it is not gzip)."""
    m = expected_ref(layout, _first_ref(layout))
    for layer in m["layers"]:
        if layer.get("compression") != "zstd":
            continue
        blob = blob_bytes(layout, layer["digest"])
        footer = layer["footer"]
        got = starget._parse_zstd_chunked_footer(blob[-48:])
        assert got == (footer["toc_offset"], footer["toc_compressed_size"], footer["toc_uncompressed_size"], 1)
        position = starget._zstd_annotation(layer["annotations"], "manifest-position")
        assert starget._parse_zstd_chunked_position(position) == got
        with pytest.raises(starget.StargzError) as ei:
            starget.parse_footer(blob[-51:])
        assert ei.value.code == starget.ErrorCode.FORMAT
    for bad in (b"\x00" * 48, b"GnUlInUx" * 6):
        with pytest.raises(starget.StargzError):
            starget._parse_zstd_chunked_footer(bad)
    for text in ("1:2:3", "a:b:c:d", "1:2:3:4:5", None):
        with pytest.raises(starget.StargzError):
            starget._parse_zstd_chunked_position(text)


@pytest.mark.parametrize("pos", [0, 1, 2, 3, 10, 11, 12, 13, 14, 15, 16, 20, 31, 32, 37])
def test_parse_footer_corrupted_header_or_payload(pos):
    """Magic, FLG, XLEN, 'SG', LEN, the hex offset and 'STARGZ' are all checked."""
    footer = bytearray(estargz_footer(0x12345))
    footer[pos] ^= 0x5A
    with pytest.raises(starget.StargzError) as ei:
        starget.parse_footer(bytes(footer))
    assert ei.value.code == starget.ErrorCode.FORMAT


@pytest.mark.parametrize("pos", [4, 8, 9, 38, 40, 42, 43, 50])
def test_parse_footer_corrupted_trailer_never_misreads(pos):
    """Bytes a lenient reader may ignore: refused, or read as the encoded offset."""
    footer = bytearray(estargz_footer(0x12345))
    footer[pos] ^= 0x5A
    try:
        got = starget.parse_footer(bytes(footer))
    except starget.StargzError as e:
        assert e.code == starget.ErrorCode.FORMAT
    else:
        assert tuple(got) == (0x12345, 51)


def test_parse_footer_too_short():
    with pytest.raises(starget.StargzError) as ei:
        starget.parse_footer(b"\x1f\x8b")
    assert ei.value.code == starget.ErrorCode.FORMAT


if given is not None:
    @settings(max_examples=300, deadline=None)
    @given(offset=st.integers(0, (1 << 64) - 1))
    def test_parse_footer_roundtrip_property(offset):
        assert tuple(starget.parse_footer(b"junk" + estargz_footer(offset))) == (offset, 51)
        assert tuple(starget.parse_footer(legacy_footer(offset))) == (offset, 47)

    @settings(max_examples=300, deadline=None)
    @given(data=st.binary(min_size=0, max_size=120))
    def test_parse_footer_random_bytes_never_crash(data):
        try:
            off, size = starget.parse_footer(data)
        except starget.StargzError as e:
            assert e.code in (starget.ErrorCode.FORMAT, starget.ErrorCode.UNSUPPORTED)
        else:
            assert size in (47, 51) and off >= 0


TOC_LAYERS = [(lay, l) for lay, l in _all_layers()
              if l.get("footer", {}).get("kind") in ("estargz", "legacy-stargz")]


def _toc_json_of(layout, layer):
    blob = blob_bytes(layout, layer["digest"])
    size = layer["footer"]["size"]
    off = layer["footer"]["toc_offset"]
    import zlib
    import tarfile
    import io
    raw = zlib.decompressobj(31).decompress(blob[off:len(blob) - size])
    tf = tarfile.open(fileobj=io.BytesIO(raw))
    return off, tf.extractfile(tf.next()).read()


@pytest.mark.parametrize("layout,layer", TOC_LAYERS, ids=[l["digest"][7:19] + "-" + lay for lay, l in TOC_LAYERS])
def test_parse_toc_fixtures(layout, layer):
    off, data = _toc_json_of(layout, layer)
    assert sha256_digest(data) == layer["toc_digest"]
    toc = starget.parse_toc(data)
    got = {(e.path, e.type) for e in toc.entries if e.path}
    want = {(e["path"], e["type"]) for e in layer["entries"] if e["path"]}
    assert got == want
    by_path = {e.path: e for e in toc.entries}
    for e in layer["entries"]:
        if e["type"] == "reg":
            t = by_path[e["path"]]
            assert t.size == e["size"]
            assert t.digest == "sha256:" + e["sha256"]
            assert t.mode == e["mode"]
        if e["type"] == "symlink":
            assert by_path[e["path"]].link == e["link"]
    assert all(os.path.basename(e.path) not in (".prefetch.landmark", ".no.prefetch.landmark")
               for e in toc.entries)


def _toc(entries):
    return json.dumps({"version": 1, "entries": entries}).encode()


@pytest.mark.parametrize("doc", [
    b"", b"not json", b"[]", b'{"version": 2, "entries": []}', b'{"version": 1}',
    b'{"version": 1, "entries": {}}', b'{"version": 1, "entries": [1]}',
    _toc([{"name": "x", "type": "weird"}]),
    _toc([{"name": "x", "type": "reg", "size": 5, "offset": -1}]),
    _toc([{"name": "x", "type": "reg", "size": "5", "offset": 10}]),
    _toc([{"name": "x", "type": "reg", "size": 5, "offset": 10, "digest": "md5:00"}]),
    _toc([{"name": "x", "type": "reg", "size": 10, "offset": 10, "chunkSize": 4},
          {"name": "x", "type": "chunk", "offset": 20, "chunkOffset": 6, "chunkSize": 4}]),
    _toc([{"name": "y", "type": "chunk", "offset": 20, "chunkOffset": 6}]),
])
def test_parse_toc_rejects_malformed(doc):
    with pytest.raises(starget.StargzError) as ei:
        starget.parse_toc(doc)
    assert ei.value.code == starget.ErrorCode.FORMAT


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/../escape", "./../escape", "a/\x00b"])
def test_parse_toc_never_yields_escaping_names(name):
    doc = _toc([{"name": "a/", "type": "dir", "mode": 493},
                {"name": name, "type": "reg", "size": 3, "offset": 100, "mode": 420},
                {"name": "a/ok", "type": "reg", "size": 3, "offset": 200, "mode": 420}])
    try:
        toc = starget.parse_toc(doc, toc_offset=1000)
    except starget.StargzError as e:
        assert e.code in (starget.ErrorCode.FORMAT, starget.ErrorCode.UNSAFE)
        return
    for e in toc.entries:
        assert ".." not in e.path.split("/") and not e.path.startswith("/") and "\x00" not in e.path


if given is not None:
    _json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2, 1 << 70), st.text(max_size=12))
    _toc_entry_strategy = st.fixed_dictionaries({}, optional={
        "name": st.one_of(st.text(max_size=20), st.sampled_from(["a", "a/b", "../x", "./", "/x", "a/.wh.b"])),
        "type": st.sampled_from(["dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk", "x"]),
        "size": _json_leaf, "offset": _json_leaf, "chunkOffset": _json_leaf, "chunkSize": _json_leaf,
        "innerOffset": _json_leaf, "linkName": _json_leaf, "mode": _json_leaf, "digest": _json_leaf,
        "chunkDigest": _json_leaf, "modtime": _json_leaf, "uid": _json_leaf, "xattrs": _json_leaf,
    })

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(entries=st.lists(_toc_entry_strategy, max_size=8), version=st.sampled_from([1, 1, 1, 2, "1", None]))
    def test_parse_toc_fuzz_only_stargz_errors(entries, version):
        doc = json.dumps({"version": version, "entries": entries}).encode()
        try:
            toc = starget.parse_toc(doc, toc_offset=1 << 20)
        except starget.StargzError as e:
            assert e.code in (starget.ErrorCode.FORMAT, starget.ErrorCode.UNSAFE)
        else:
            for e in toc.entries:
                assert ".." not in e.path.split("/") and not e.path.startswith("/")


# ---- estargz format: properties (the parsers raise only StargzError) --------

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
                assert c.file_offset == pos and c.size > 0 and c.member_offset > 0, (e.path, c)
                if toc_offset is not None:
                    assert c.member_offset < c.member_end <= toc_offset, (e.path, c)
                pos += c.size
            assert pos == e.size
        if e.type == "hardlink":
            assert e.link_target is not None and e.link_target.type == "reg"


if given is not None:
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
            assert size in (starget._FOOTER_SIZE, starget._LEGACY_FOOTER_SIZE)

    @PROP
    @given(st.integers(0, (1 << 64) - 1), st.binary(max_size=64))
    def test_prop_parse_footer_round_trip(offset, prefix):
        assert starget.parse_footer(prefix + estargz_footer(offset)) == (offset, starget._FOOTER_SIZE)

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
    @given(st.text(max_size=60)
           | st.lists(st.sampled_from(["..", ".", "", "a", "b", "\x00", " ", "..."]), max_size=6).map("/".join))
    def test_prop_normalize_path(name):
        path = _only_stargz_error(starget._normalize_path, name)
        if path is not None:
            parts = path.split("/")
            assert "\x00" not in path and not path.startswith("/") and ".." not in parts and "." not in parts
            assert path == "" or "" not in parts
            assert starget._normalize_path(path) == path

    @PROP
    @given(st.binary(max_size=600) | st.binary(max_size=600).map(gzip.compress))
    def test_prop_extract_toc_json(member):
        _only_stargz_error(starget._extract_toc_json, member)


# =============================================================================
# image index
# =============================================================================

def _paths(entries):
    return sorted(getattr(e, "path", e) for e in entries)


MERGED_USR_TOC = [
    {"name": "usr/", "type": "dir", "mode": 493},
    {"name": "usr/bin/", "type": "dir", "mode": 493},
    {"name": "usr/bin/echo", "type": "reg", "size": 5, "offset": 100, "mode": 493,
     "digest": "sha256:" + "1" * 64},
    {"name": "bin", "type": "symlink", "linkName": "usr/bin", "mode": 511},
    {"name": "abs", "type": "symlink", "linkName": "/usr/bin", "mode": 511},
    {"name": "esc", "type": "symlink", "linkName": "../../usr/bin", "mode": 511},
    {"name": "deep/", "type": "dir", "mode": 493},
    {"name": "deep/up", "type": "symlink", "linkName": "../../../../../usr", "mode": 511},
    {"name": "loop", "type": "symlink", "linkName": "loop", "mode": 511},
]


@pytest.fixture
def merged_usr_index():
    toc = starget.parse_toc(_toc(MERGED_USR_TOC), toc_offset=1000)
    return starget.ImageIndex([toc])


@pytest.mark.parametrize("pattern,link", [("bin/", "bin"), ("abs/", "abs"), ("esc/", "esc")])
def test_filter_files_follows_symlinked_dir_inside_root(merged_usr_index, pattern, link):
    got = _paths(merged_usr_index.filter_files(pattern))
    assert got == sorted([link, "usr/bin/echo"]) or got == sorted([link, "usr/bin", "usr/bin/echo"]), got


def test_filter_files_link_chain_never_leaves_root(merged_usr_index):
    got = _paths(merged_usr_index.filter_files("deep/up/bin/"))
    assert "usr/bin/echo" in got
    assert all(".." not in p.split("/") for p in got)


def test_find_file_through_symlinked_dir(merged_usr_index):
    e = merged_usr_index.find_file("bin/echo")
    assert e is not None and e.path == "usr/bin/echo" and e.size == 5
    e = merged_usr_index.find_file("esc/echo")
    assert e is not None and e.path == "usr/bin/echo"


def test_filter_files_unknown_path_is_not_found(merged_usr_index):
    with pytest.raises(starget.StargzError) as ei:
        merged_usr_index.filter_files("nope/")
    assert ei.value.code == starget.ErrorCode.NOT_FOUND


def test_filter_files_symlink_loop_terminates(merged_usr_index):
    with pytest.raises(starget.StargzError) as ei:
        merged_usr_index.filter_files("loop/")
    assert ei.value.code in (starget.ErrorCode.NOT_FOUND, starget.ErrorCode.FORMAT)


def test_whiteouts_and_opaque_dirs_merge():
    lower = starget.parse_toc(_toc([
        {"name": "a/", "type": "dir", "mode": 493},
        {"name": "a/x", "type": "reg", "size": 1, "offset": 10, "mode": 420},
        {"name": "a/y", "type": "reg", "size": 1, "offset": 20, "mode": 420},
        {"name": "d/", "type": "dir", "mode": 493},
        {"name": "d/z", "type": "reg", "size": 1, "offset": 30, "mode": 420},
        {"name": "d/sub/", "type": "dir", "mode": 493},
        {"name": "f/", "type": "dir", "mode": 493},
        {"name": "f/in", "type": "reg", "size": 1, "offset": 40, "mode": 420},
    ]), toc_offset=100)
    upper = starget.parse_toc(_toc([
        {"name": "a/", "type": "dir", "mode": 493},
        {"name": "a/.wh.x", "type": "reg", "mode": 420},
        {"name": "d/", "type": "dir", "mode": 448},
        {"name": "d/.wh..wh..opq", "type": "reg", "mode": 420},
        {"name": "d/new", "type": "reg", "size": 1, "offset": 10, "mode": 420},
        {"name": "f", "type": "reg", "size": 1, "offset": 20, "mode": 384},
    ]), toc_offset=100)
    for i, toc in enumerate((lower, upper)):
        if hasattr(toc, "set_origin"):      # (not contract: tags entries with their layer)
            toc.set_origin("sha256:" + "ab"[i] * 64, i)
    idx = starget.ImageIndex([lower, upper])
    got = _paths(idx.filter_files("."))
    assert got == ["a", "a/y", "d", "d/new", "f"]
    assert idx.find_file("d").mode == 448
    assert idx.find_file("f").type == "reg"
    assert idx.find_file("a/x") is None
    assert not any(".wh." in p for p in got)


def test_a_bare_whiteout_prefix_deletes_nothing():
    """An upper layer's entry named exactly `.wh.` (at the root or in a directory) names
    no file: the lower layer's files all stay in the merged view."""
    lower = starget.parse_toc(_toc([
        {"name": "a/", "type": "dir", "mode": 493},
        {"name": "a/x", "type": "reg", "size": 1, "offset": 10, "mode": 420},
        {"name": "b", "type": "reg", "size": 1, "offset": 20, "mode": 420},
    ]), toc_offset=100)
    upper = starget.parse_toc(_toc([
        {"name": ".wh.", "type": "reg", "mode": 420},
        {"name": "a/", "type": "dir", "mode": 493},
        {"name": "a/.wh.", "type": "reg", "mode": 420},
    ]), toc_offset=100)
    for i, toc in enumerate((lower, upper)):
        if hasattr(toc, "set_origin"):
            toc.set_origin("sha256:" + "ab"[i] * 64, i)
    idx = starget.ImageIndex([lower, upper])
    assert _paths(idx.filter_files(".")) == ["a", "a/x", "b"]
    assert idx.find_file("a/x") is not None and idx.find_file("b") is not None


@pytest.mark.parametrize("pattern", ["...", "/...", "./..."])
def test_a_file_named_three_dots_is_a_file_not_everything(pattern):
    """`...` is a legal file name; as a pattern it selects that file, not the whole image
    (only `.`, `/` and the like mean everything)."""
    toc = starget.parse_toc(_toc([
        {"name": "...", "type": "reg", "size": 1, "offset": 10, "mode": 420},
        {"name": "other", "type": "reg", "size": 1, "offset": 20, "mode": 420},
        {"name": "d/", "type": "dir", "mode": 493},
        {"name": "d/...", "type": "reg", "size": 1, "offset": 30, "mode": 420},
    ]), toc_offset=100)
    idx = starget.ImageIndex([toc])
    assert _paths(idx.filter_files(pattern)) == ["..."]
    assert _paths(idx.filter_files("d/...")) == ["d/..."]
    assert _paths(idx.filter_files(".")) == ["...", "d", "d/...", "other"]


def _reference_merge(layers):
    """The obvious merge, every removal a scan of the whole view: what ImageIndex._merge
    must equal, entry for entry and in the same order."""
    import posixpath
    merged = {}
    for toc in layers:
        own = []
        for entry in toc.entries:
            name, parent = entry.name, posixpath.dirname(entry.path)
            if name == starget._OPAQUE_WHITEOUT:
                for key in [k for k in merged if parent == "" or k.startswith(parent + "/")]:
                    if key != parent:
                        del merged[key]
            elif name.startswith(starget._WHITEOUT_PREFIX) and name != starget._WHITEOUT_PREFIX:
                gone = posixpath.join(parent, name[len(starget._WHITEOUT_PREFIX):])
                for key in [k for k in merged if k == gone or k.startswith(gone + "/")]:
                    del merged[key]
            elif not name.startswith(starget._WHITEOUT_PREFIX):
                own.append(entry)
        for entry in own:
            old = merged.get(entry.path)
            if old is not None and old.type == "dir" and entry.type != "dir":
                prefix = entry.path + "/" if entry.path else ""
                for key in [k for k in merged if k == entry.path or k.startswith(prefix)]:
                    del merged[key]
            merged[entry.path] = entry
    return dict(sorted(merged.items()))


def _layer(*specs):
    """A LayerTOC from (path, type) pairs, built directly (no TOC JSON)."""
    return starget.LayerTOC([starget.TOCEntry(path, kind) for path, kind in specs])


def _merged(layers):
    return list(starget.ImageIndex(layers).view().items())


def test_merge_edge_cases_match_overlayfs():
    lower = _layer(("", "dir"), ("a/b", "dir"), ("a/b/c", "reg"), ("a/b-c", "reg"), ("a/bc", "reg"),
                   ("o/in", "reg"), ("o/sub/deep", "reg"), ("f", "dir"), ("f/x", "reg"),
                   ("r", "reg"), ("keep/x", "reg"))
    upper = _layer(("a/.wh.b", "reg"),              # a/b and a/b/c go; a/b-c, a/bc stay
                   ("o/.wh..wh..opq", "reg"), ("o/mine", "reg"),   # the layer's own o/mine stays
                   ("f", "reg"),                     # a file over a dir: f/x goes
                   ("r", "dir"), ("r/y", "reg"),     # a dir over a file
                   ("keep/.wh.", "reg"))             # names nothing
    got = starget.ImageIndex([lower, upper]).view()
    assert list(got) == ["", "a/b-c", "a/bc", "f", "keep/x", "o/mine", "r", "r/y"]
    assert got["f"].type == "reg" and got["r"].type == "dir"
    root_opaque = _layer((".wh..wh..opq", "reg"), ("n", "reg"))
    assert [p for p, _ in _merged([lower, upper, root_opaque])] == ["", "n"]   # the root itself stays


def test_a_whiteout_then_the_same_path_again_in_a_later_layer():
    layers = [_layer(("d/x/y", "reg"), ("d/z", "reg")), _layer(("d/.wh.x", "reg")),
              _layer(("d/x/new", "reg")), _layer(("d/.wh..wh..opq", "reg")), _layer(("d/x/last", "reg"))]
    assert _merged(layers) == list(_reference_merge(layers).items())
    assert [p for p, _ in _merged(layers)] == ["d/x/last"]


class _CountedPath(str):
    """A path that counts every operation done on it: the work of a merge, whatever
    the algorithm (plain strings derived from it, like slices, are not counted)."""
    calls = [0]


def _counting(method):
    original = getattr(str, method)

    def counted(self, *args):
        _CountedPath.calls[0] += 1
        return original(self, *args)
    return counted


for _method in ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__contains__",
                "__getitem__", "__add__", "__len__", "__iter__", "startswith", "endswith", "find",
                "rfind", "index", "rindex", "split", "rsplit", "partition", "rpartition"):
    setattr(_CountedPath, _method, _counting(_method))


def test_merge_work_is_proportional_to_what_the_whiteouts_remove():
    """N entries below, W whiteouts and opaque dirs above, each removing a few entries:
    the merge does O(N log N + W * removed) path operations, not O(N * W)."""
    dirs, files = 400, 5
    base = [("d%d" % d, "dir") for d in range(dirs)]
    base += [("d%d/f%d" % (d, f), "reg") for d in range(dirs) for f in range(files)]
    upper = [("d%d/.wh.f0" % d, "reg") for d in range(0, dirs, 2)]            # one file each
    upper += [(".wh.d%d" % d, "reg") for d in range(1, dirs, 4)]               # a whole dir each
    upper += [("d%d/.wh..wh..opq" % d, "reg") for d in range(3, dirs, 4)]      # a dir's contents
    layers = [starget.LayerTOC([starget.TOCEntry(_CountedPath(p), kind) for p, kind in specs])
              for specs in (base, upper)]
    _CountedPath.calls[0] = 0
    merged = starget.ImageIndex(layers).view()
    work = _CountedPath.calls[0]
    n, w = len(base), len(upper)
    removed = n - len(merged)
    assert removed == dirs // 2 + (dirs // 4) * (1 + files) + (dirs // 4) * files   # odd dirs lose no f0
    budget = 20 * (n + w + removed) + 2 * n * n.bit_length()   # the final sort included
    assert work <= budget, (work, budget, n * w)
    assert list(merged) == list(_reference_merge(layers))


if given is not None:
    _merge_part = st.sampled_from(["a", "b", "a-b", "b.c", ""])    # "" makes "a//b", "/a" and the root
    _merge_dir = st.lists(_merge_part, max_size=3).map("/".join)
    _merge_name = st.one_of(_merge_part.map(lambda p: starget._WHITEOUT_PREFIX + p),
                            st.just(starget._OPAQUE_WHITEOUT), _merge_part)
    _merge_entry = st.tuples(_merge_dir, _merge_name, st.sampled_from(["dir", "reg", "symlink"])).map(
        lambda t: (t[0] + "/" + t[1] if t[0] else t[1], t[2]))
    _merge_layers = st.lists(st.lists(_merge_entry, max_size=10), min_size=1, max_size=4)

    @PROP
    @given(_merge_layers)
    @example([[("a/", "dir"), ("a//b", "reg"), ("a/b", "reg")], [("a/", "reg")]])   # "a//b" is below "a/"
    @example([[("/a", "dir"), ("/a/b", "reg"), ("a", "reg")], [("/.wh.a", "reg")]])
    def test_prop_merge_equals_the_obvious_merge(stack):
        layers = [_layer(*specs) for specs in stack]
        assert _merged(layers) == list(_reference_merge(layers).items())


# ---- image index: footer, TOC and the cache (requests counted) --------------

def _blob_requests(stderr):
    return [line for line in stderr.splitlines() if "> GET" in line and "/blobs/" in line]


@pytest.mark.parametrize("layout", ["basic", "layers", "legacy", "minchunk"])
def test_footer_and_small_toc_come_in_one_request_per_layer(registry_anon, layout):
    client = _client(registry_anon, layout)
    index = starget.open_image(client.ref, client=client, cache=None)
    layers = len(index.layers)
    assert client.transport.stats.requests == 1 + layers   # the manifest, then one tail read each


def test_a_toc_bigger_than_the_tail_read_costs_one_more_request(registry_anon, monkeypatch):
    monkeypatch.setattr(starget, "_TAIL_READ_SIZE", 512)
    client = _client(registry_anon, "basic")
    index = starget.open_image(client.ref, client=client, cache=None)
    assert client.transport.stats.requests == 1 + 2
    expected = expected_files("basic", "latest")
    assert sorted(e.path for e in index.entries()) == sorted(p for p in expected if p)


def test_warm_cache_fetches_no_toc(registry_anon, tmp_path):
    cache = starget.TOCCache(str(tmp_path / "cache"))
    cold = _client(registry_anon, "layers")
    starget.open_image(cold.ref, client=cold, cache=cache)
    cache.flush()
    warm = _client(registry_anon, "layers")
    index = starget.open_image(warm.ref, client=warm, cache=cache)
    cache.flush()
    assert warm.transport.stats.requests == 1              # the manifest only
    assert len(index.entries()) == len([p for p in expected_files("layers", "latest") if p])


def test_warm_ls_from_the_command_line_makes_no_blob_request(registry_anon, tmp_path):
    env = {"STARGET_CACHE_DIR": str(tmp_path / "cache")}
    image = registry_anon.image("layers")
    rc, first, err1 = run_cli("-d", "ls", image, env=env)
    assert rc == 0 and len(_blob_requests(err1)) == 3
    rc, second, err2 = run_cli("-d", "ls", image, env=env)
    assert rc == 0 and second == first
    assert _blob_requests(err2) == []
    rc, _, err3 = run_cli("-d", "--no-cache", "ls", image, env=env)
    assert rc == 0 and len(_blob_requests(err3)) == 3


def _damage(path):
    data = path.read_bytes()
    path.write_bytes(data[:-10] + b"x" * 10)


def test_a_corrupt_cache_entry_is_ignored_and_refetched(registry_anon, tmp_path):
    """The cache keeps the TOC and its parsed form: a damaged parsed form falls back to
    the TOC (parsed again, nothing fetched); both damaged, the TOC is fetched again."""
    cache = starget.TOCCache(str(tmp_path / "cache"))
    client = _client(registry_anon, "basic")
    starget.open_image(client.ref, client=client, cache=cache)
    cache.flush()
    toc_dir = tmp_path / "cache" / "toc"
    [raw] = [toc_dir / n for n in os.listdir(str(toc_dir)) if not n.endswith(".parsed.json")]
    [parsed] = [toc_dir / n for n in os.listdir(str(toc_dir)) if n.endswith(".parsed.json")]
    _damage(parsed)
    again = _client(registry_anon, "basic")
    index = starget.open_image(again.ref, client=again, cache=cache)
    cache.flush()
    assert again.transport.stats.requests == 1             # the manifest only
    assert index.find_file("bin/busybox") is not None
    _damage(parsed)
    _damage(raw)
    third = _client(registry_anon, "basic")
    index = starget.open_image(third.ref, client=third, cache=cache)
    cache.flush()
    assert third.transport.stats.requests == 2             # manifest + the TOC again
    assert index.find_file("bin/busybox") is not None


def test_a_warm_run_parses_no_toc(registry_anon, tmp_path, monkeypatch):
    """A warm run loads the parsed, checked form: parse_toc is not called, and the view
    is the same as a cold run's, entry for entry."""
    cache = starget.TOCCache(str(tmp_path / "cache"))
    client = _client(registry_anon, "layers")
    cold = starget.open_image(client.ref, client=client, cache=cache)
    cache.flush()
    want = [e.to_json() for e in cold.entries()]
    want_chunks = [(e.path, [(c.file_offset, c.size, c.member_offset, c.member_end, c.digest)
                             for c in e.chunks]) for e in cold.entries()]

    def no_parsing(*args, **kwargs):
        raise AssertionError("a warm run parsed a TOC")
    monkeypatch.setattr(starget, "parse_toc", no_parsing)
    again = _client(registry_anon, "layers")
    warm = starget.open_image(again.ref, client=again, cache=cache)
    cache.flush()
    assert [e.to_json() for e in warm.entries()] == want
    assert [(e.path, [(c.file_offset, c.size, c.member_offset, c.member_end, c.digest) for c in e.chunks])
            for e in warm.entries()] == want_chunks


def _forge_parsed_column(path, column, row, value):
    """Change one value of a parsed-TOC cache file and re-sign it (its own digest
    right), as someone with write access to the cache could."""
    header, body = path.read_bytes().split(b"\n", 1)
    doc = json.loads(body)
    doc[column][row] = value
    body = json.dumps(doc).encode()
    meta = json.loads(header)
    meta["sha256"] = "sha256:" + hashlib.sha256(body).hexdigest()
    path.write_bytes(json.dumps(meta).encode() + b"\n" + body)


def test_a_foreign_or_unsafe_parsed_cache_entry_is_ignored(registry_anon, tmp_path, monkeypatch):
    """Another starget version's parsed form, or one naming a path with '..', is not
    trusted: the TOC is parsed again from the cached TOC."""
    cache = starget.TOCCache(str(tmp_path / "cache"))
    client = _client(registry_anon, "basic")
    starget.open_image(client.ref, client=client, cache=cache)
    cache.flush()
    toc_dir = tmp_path / "cache" / "toc"
    [parsed] = [toc_dir / n for n in os.listdir(str(toc_dir)) if n.endswith(".parsed.json")]
    _forge_parsed_column(parsed, "path", 1, "../../etc/evil")
    calls = []
    real = starget.parse_toc
    monkeypatch.setattr(starget, "parse_toc", lambda *a, **k: calls.append(1) or real(*a, **k))
    index = starget.open_image(client.ref, client=_client(registry_anon, "basic"), cache=cache)
    cache.flush()
    assert calls == [1] and all(".." not in e.path for e in index.entries())
    monkeypatch.setattr(starget, "__version__", "0.0.0-other")
    starget.open_image(client.ref, client=_client(registry_anon, "basic"), cache=cache)
    cache.flush()
    assert calls == [1, 1]


# ---- image index: globs (PATH and --exclude) ----------------------------------

GLOB_CASES = [
    # pattern, path, matches the path itself
    ("etc/*.conf", "etc/a.conf", True),
    ("etc/*.conf", "etc/sub/a.conf", False),       # * never crosses /
    ("etc/*", "etc", False),
    ("*", "etc", True),
    ("*", "etc/passwd", False),
    ("e?c", "etc", True),
    ("e?c", "e/c", False),                         # nor does ?
    ("e?c", "ec", False),
    ("[a-c]x", "bx", True),
    ("[a-c]x", "dx", False),
    ("[!a-c]x", "dx", True),
    ("[!a-c]x", "ax", False),
    ("a[+-0]b", "a/b", False),                     # a range that holds / still stays in one name
    ("a[+-0]b", "a.b", True),
    ("[]]", "]", True),
    ("x[", "x[", True),                            # an unclosed [ is itself
    ("**/LICENSE", "LICENSE", True),               # ** at the start: zero or more components
    ("**/LICENSE", "a/b/LICENSE", True),
    ("**/LICENSE", "a/LICENSE.txt", False),
    ("usr/**/*.so", "usr/a.so", True),             # ** in the middle
    ("usr/**/*.so", "usr/lib/x/a.so", True),
    ("usr/**/*.so", "usrx/a.so", False),
    ("usr/**", "usr/lib/a", True),                 # ** at the end: what is below
    ("usr/**", "usr", False),
    ("usr/**/**/a", "usr/a", True),
    ("a**b", "axxb", True),                        # ** inside a name is *
    ("a**b", "ax/b", False),
    ("/etc/./*.conf", "etc/a.conf", True),         # normalised like a path
    ("d.t", "dxt", False),                         # regex characters are literal
    ("(x)+", "(x)+", True),
]


@pytest.mark.parametrize("pattern,path,expected", GLOB_CASES)
def test_glob_regex(pattern, path, expected):
    regex, dir_only = starget._glob_regex(pattern)
    assert bool(re.match("(?:%s)\\Z" % regex, path)) is expected
    assert dir_only is False


def test_glob_trailing_slash_matches_directories_only():
    assert starget._glob_regex("usr/*/") == ("usr/[^/]*", True)
    matches = starget._glob_matcher(["usr/*/"])
    assert matches("usr/lib", starget.TOCEntry("usr/lib", "dir"))
    assert not matches("usr/lib", starget.TOCEntry("usr/lib", "reg"))
    assert matches("usr/lib/a", starget.TOCEntry("usr/lib/a", "reg"))     # below a matching directory


def test_glob_matcher_brings_the_subtree_and_is_compiled_once(monkeypatch):
    compiled = []
    real = re.compile
    monkeypatch.setattr(starget.re, "compile", lambda *a: compiled.append(a) or real(*a))
    matches = starget._glob_matcher(["etc/*", "**/x/"])
    count = len(compiled)
    entry = starget.TOCEntry("p", "reg")
    assert [p for p in ("etc", "etc/a", "etc/a/b", "etcx/a", "x", "q/x/y", "q/xy/z") if matches(p, entry)] == \
        ["etc/a", "etc/a/b", "q/x/y"]
    assert len(compiled) == count <= 3


GLOB_TOC = [
    {"name": "usr/", "type": "dir", "mode": 493},
    {"name": "usr/lib/", "type": "dir", "mode": 493},
    {"name": "usr/lib/a.so", "type": "reg", "size": 1, "offset": 10, "digest": "sha256:" + "1" * 64},
    {"name": "usr/lib/x/", "type": "dir", "mode": 493},
    {"name": "usr/lib/x/b.so", "type": "reg", "size": 1, "offset": 20, "digest": "sha256:" + "2" * 64},
    {"name": "usr/lib-c.so", "type": "reg", "size": 1, "offset": 30, "digest": "sha256:" + "3" * 64},
    {"name": "lib", "type": "symlink", "linkName": "usr/lib", "mode": 511},
    {"name": "loop", "type": "symlink", "linkName": ".", "mode": 511},
    {"name": "docs/", "type": "dir", "mode": 493},
    {"name": "docs/w [x].txt", "type": "reg", "size": 1, "offset": 40, "digest": "sha256:" + "4" * 64},
]


@pytest.fixture
def glob_index():
    return starget.ImageIndex([starget.parse_toc(_toc(GLOB_TOC), toc_offset=1000)])


@pytest.mark.parametrize("pattern,exclude,expected", [
    ("usr/**/*.so", (), ["usr/lib-c.so", "usr/lib/a.so", "usr/lib/x/b.so"]),
    ("usr/*", (), ["usr/lib", "usr/lib-c.so", "usr/lib/a.so", "usr/lib/x", "usr/lib/x/b.so"]),
    ("usr/*/", (), ["usr/lib", "usr/lib/a.so", "usr/lib/x", "usr/lib/x/b.so"]),
    ("l*", (), ["lib", "loop"]),                    # links are not followed by globs
    ("**/b.so", (), ["usr/lib/x/b.so"]),            # nor by ** (loop -> . does not loop)
    ("usr/", ("usr/lib/x",), ["usr", "usr/lib", "usr/lib-c.so", "usr/lib/a.so"]),
    ("**", ("**/*.so", "docs"), ["lib", "loop", "usr", "usr/lib", "usr/lib/x"]),
    ("usr/*", ("usr/*/",), ["usr/lib-c.so"]),
    ("docs/w [x].txt", (), ["docs/w [x].txt"]),     # matches nothing as a glob: the plain path
])
def test_filter_files_globs_and_excludes(glob_index, pattern, exclude, expected):
    assert [e.path for e in glob_index.filter_files(pattern, exclude=exclude)] == expected


def test_filter_files_glob_without_a_match_is_not_found(glob_index):
    for pattern in ("nothing*", "usr/lib/a.s?/", "usr/*.so/"):    # a file does not match a/
        with pytest.raises(StargzError) as ei:
            glob_index.filter_files(pattern)
        assert ei.value.code == ErrorCode.NOT_FOUND and "no match" in ei.value.message


def test_filter_files_glob_in_one_layer():
    lower = starget.parse_toc(_toc(GLOB_TOC[:3]), toc_offset=1000, blob="sha256:" + "a" * 64, layer=0)
    upper = starget.parse_toc(_toc([{"name": "usr/lib/b.so", "type": "reg", "size": 1, "offset": 10,
                                     "digest": "sha256:" + "5" * 64}]), toc_offset=1000, blob="sha256:" + "b" * 64, layer=1)
    index = starget.ImageIndex([lower, upper])
    assert [e.path for e in index.filter_files("usr/*/*.so")] == ["usr/lib/a.so", "usr/lib/b.so"]
    assert [e.path for e in index.filter_files("usr/*/*.so", "sha256:b")] == ["usr/lib/b.so"]


# ---- image index: comparing two views (diff) ----------------------------------

def _view(*entries):
    return {e.path: e for e in entries}


def _reg(path, digest="1", size=1, **kw):
    return starget.TOCEntry(path, "reg", size=size, digest="sha256:" + digest * 64, mode=kw.pop("mode", 0o644), **kw)


def test_diff_views_kinds_of_change():
    a = _view(starget.TOCEntry("", "dir"), starget.TOCEntry("d", "dir", mode=0o755), _reg("d/same"),
              _reg("d/gone"), _reg("d/content"), _reg("d/size"), _reg("d/mode"), _reg("d/owner"),
              _reg("d/xattr"), _reg("d/times", mtime=1), _reg("d/layer", layer=0, blob="sha256:" + "a" * 64),
              starget.TOCEntry("d/link", "symlink", link="x"), _reg("d/kind"))
    b = _view(starget.TOCEntry("", "dir", mode=0o700), starget.TOCEntry("d", "dir", mode=0o755), _reg("d/same"),
              _reg("d/new"), _reg("d/content", "2"), _reg("d/size", size=2), _reg("d/mode", mode=0o600),
              _reg("d/owner", uid=1, gid=2), _reg("d/xattr", xattrs={"user.a": "eA=="}), _reg("d/times", mtime=2),
              _reg("d/layer", layer=3, blob="sha256:" + "b" * 64), starget.TOCEntry("d/link", "symlink", link="y"),
              starget.TOCEntry("d/kind", "dir", mode=0o644))
    assert starget._diff_views(a, b) == [
        ("d/content", "modified", ["digest"]),
        ("d/gone", "deleted", []),
        ("d/kind", "modified", ["type", "size", "digest"]),
        ("d/link", "modified", ["link"]),
        ("d/mode", "metadata", ["mode"]),
        ("d/new", "added", []),
        ("d/owner", "metadata", ["uid", "gid"]),
        ("d/size", "modified", ["size"]),
        ("d/xattr", "metadata", ["xattrs"]),
    ]      # mtime, layer and blob are not compared; the root is no path
    assert starget._diff_views(b, b) == [] and starget._diff_views({}, {}) == []


def test_diff_views_content_and_metadata_together_is_modified():
    a, b = _view(_reg("f")), _view(_reg("f", "2", mode=0o755))
    assert starget._diff_views(a, b) == [("f", "modified", ["digest", "mode"])]


def test_diff_views_hardlink_compares_its_target():
    target = _reg("t")
    link = starget.TOCEntry("h", "hardlink", link="t", link_target=target, mode=0o644)
    other = _reg("t", "2")
    relinked = starget.TOCEntry("h", "hardlink", link="t", link_target=other, mode=0o644)
    assert starget._diff_views(_view(target, link), _view(other, relinked)) == [
        ("h", "modified", ["digest"]), ("t", "modified", ["digest"])]
    assert starget._diff_views(_view(target, link), _view(target, _reg("h"))) == [("h", "modified", ["type", "link"])]


# =============================================================================
# download
# =============================================================================

@pytest.fixture
def download_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STARGET_CACHE_DIR", str(tmp_path / "cache"))
    for k in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path


def test_api_open_image_find_and_download(registry_anon, download_env):
    files = expected_files("basic", "latest")
    idx = starget.open_image(registry_anon.image("basic"))
    e = idx.find_file("etc/os-release")
    assert e is not None
    assert e.size == files["etc/os-release"]["size"]
    assert e.digest == "sha256:" + files["etc/os-release"]["sha256"]
    assert idx.find_file("no/such/file") is None
    out = str(download_env / "out")
    stats = starget.Downloader(idx.client).download(idx, "etc/", out)
    assert stats is not None
    assert compare_tree(files, walk_tree(out), prefix="etc") == []


def test_api_blob_restriction(registry_anon, download_env):
    m = expected_ref("layers", "latest")
    first = m["layers"][0]
    idx = starget.open_image(registry_anon.image("layers"))
    got = _paths(idx.filter_files(".", blob=first["digest"]))
    want = sorted(e["path"] for e in first["entries"] if e["path"])
    assert got == want


def test_get_single_chunked_file(registry_anon, ws):
    files = _reg_files(expected_files("basic", "latest"))
    big = max(files, key=lambda p: files[p]["size"])          # the multi-chunk file
    rc, out, err = run_cli("get", registry_anon.image("basic"), big, ws.out)
    assert rc == 0, err
    assert compare_tree(expected_files("basic", "latest"), ws.tree(), prefix=big) == []


def test_get_unicode_and_space_names(registry_anon, ws):
    files = _reg_files(expected_files("basic", "latest"))
    odd = [p for p in files if " " in p or any(ord(c) > 127 for c in p)]
    assert odd, "fixture lost its odd names"
    for p in odd:
        rc, out, err = run_cli("get", registry_anon.image("basic"), p, ws.out)
        assert rc == 0, err
    tree = ws.tree()
    for p in odd:
        assert tree[p]["sha256"] == files[p]["sha256"]


def test_get_inner_offset_files(registry_anon, ws):
    """minchunk: files packed in a shared member (innerOffset > 0)."""
    layer = expected_ref("minchunk", "latest")["layers"][0]
    paths = sorted({e["path"] for e in layer["inner_offset_entries"]})
    files = expected_files("minchunk", "latest")
    for p in paths[:3] + paths[-2:]:
        rc, out, err = run_cli("get", registry_anon.image("minchunk"), p, ws.out)
        assert rc == 0, err
    tree = ws.tree()
    for p in paths[:3] + paths[-2:]:
        assert tree[p]["sha256"] == files[p]["sha256"], p


@pytest.mark.parametrize("pattern", ["etc/", "etc", "/etc/", "./etc"])
def test_get_directory_with_and_without_slash(registry_anon, ws, pattern):
    rc, out, err = run_cli("get", registry_anon.image("basic"), pattern, ws.out)
    assert rc == 0, err
    diffs = compare_tree(expected_files("basic", "latest"), ws.tree(), prefix="etc")
    assert diffs == []


def test_get_nested_directory_creates_parents(registry_anon, ws):
    files = expected_files("basic", "latest")
    deepest = max((p for p, e in files.items() if e["type"] == "dir"), key=lambda p: p.count("/"))
    rc, out, err = run_cli("get", registry_anon.image("basic"), deepest + "/", ws.out)
    assert rc == 0, err
    assert compare_tree(files, ws.tree(), prefix=deepest) == []


def test_get_symlinked_directory_follows_inside_image(registry_anon, ws):
    """A pattern through a directory symlink yields the link and the target's files."""
    files = expected_files("basic", "latest")
    dir_links = [p for p, e in files.items() if e["type"] == "symlink"
                 and files.get(os.path.normpath(os.path.join(os.path.dirname(p), e["link"])).lstrip("/"),
                               {}).get("type") == "dir"]
    assert dir_links, "basic has no symlink to a directory"
    link = dir_links[0]
    target = os.path.normpath(os.path.join(os.path.dirname(link), files[link]["link"]))
    rc, out, err = run_cli("get", registry_anon.image("basic"), link + "/", ws.out)
    assert rc == 0, err
    tree = ws.tree()
    assert tree[link]["type"] == "symlink" and tree[link]["link"] == files[link]["link"]
    want = {p: e for p, e in files.items() if p.startswith(target + "/")}
    assert want
    for p, e in want.items():
        assert p in tree, "missing %s (through %s)" % (p, link)
        if e["type"] == "reg":
            assert tree[p]["sha256"] == e["sha256"]
    # nothing else than the link, the target tree and its parents
    for p in tree:
        assert p == link or p == target or p.startswith(target + "/") or target.startswith(p + "/"), p


def test_get_into_default_output_dir(registry_anon, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    rc, out, err = run_cli("get", registry_anon.image("basic"), "etc/passwd", cwd=str(cwd))
    assert rc == 0, err
    assert compare_tree(expected_files("basic", "latest"), walk_tree(str(cwd)), prefix="etc/passwd") == []


def test_get_creates_missing_output_dir(registry_anon, tmp_path):
    out = tmp_path / "new" / "deeper"
    rc, out_, err = run_cli("get", registry_anon.image("layers"), "usr/", str(out))
    assert rc == 0, err
    assert compare_tree(expected_files("layers", "latest"), walk_tree(str(out)), prefix="usr") == []


def test_get_twice_is_idempotent(registry_anon, ws):
    for _ in range(2):
        rc, out, err = run_cli("get", registry_anon.image("prefetch", "prefetch"), ".", ws.out)
        assert rc == 0, err
    assert compare_tree(expected_files("prefetch", "prefetch"), ws.tree()) == []


@pytest.mark.parametrize("short", [False, True])
def test_get_with_blob_restriction(registry_anon, ws, short):
    layers = expected_ref("layers", "latest")["layers"]
    layer = layers[0]
    blob = layer["digest"][:7 + 12] if short else layer["digest"]
    own = {e["path"]: e for e in layer["entries"] if e["path"]}
    rc, out, err = run_cli("get", registry_anon.image("layers"), blob, ".", ws.out)
    assert rc == 0, err
    assert compare_tree(own, ws.tree()) == []


def test_blob_unknown_digest(registry_anon, ws):
    rc, out, err = run_cli("get", registry_anon.image("layers"), "sha256:" + "0" * 64, ".", ws.out)
    assert_one_line_error(rc, err, 3)
    ws.assert_out_empty()


def test_cat_prints_file_bytes(registry_anon):
    files = _reg_files(expected_files("minchunk", "latest"))
    path = max(files, key=lambda p: files[p]["size"])
    rc, out, err = run_cli("cat", registry_anon.image("minchunk"), path, binary=True)
    assert rc == 0, err
    assert hashlib.sha256(out).hexdigest() == files[path]["sha256"]


def test_cat_directory_is_an_error(registry_anon):
    rc, out, err = run_cli("cat", registry_anon.image("basic"), "etc", binary=True)
    assert rc != 0 and out == b""
    assert len(error_lines(err)) == 1


# ---- download: the fewest requests ------------------------------------------

@pytest.mark.parametrize("layout,pattern", [("basic", "."), ("basic", "etc/"), ("minchunk", "."),
                                            ("layers", ".")])
def test_requests_do_not_grow_with_the_number_of_files(registry_anon, tmp_path, layout, pattern):
    client = _client(registry_anon, layout)
    index = starget.open_image(client.ref, client=client, cache=None)
    job = starget.DownloadJob(index, pattern, str(tmp_path))
    before = client.transport.stats.requests
    stats = starget.Downloader(client, concurrency=4).download(index, pattern, str(tmp_path))
    data_requests = client.transport.stats.requests - before
    files = len([e for e in job.regular])
    layers_touched = len(set(e.content.blob for e in job.regular))
    payload = sum(c.member_end - c.member_offset for e in job.regular for c in e.content.chunks)
    assert not stats.failures
    assert files > layers_touched
    assert data_requests <= layers_touched + payload // starget._PART_SIZE + 1
    prefix = "" if pattern == "." else pattern.rstrip("/")
    assert compare_tree(expected_files(layout, "latest"), walk_tree(str(tmp_path)), prefix=prefix) == []


def test_plan_coalesces_small_gaps_and_splits_long_runs():
    blob = "sha256:" + "a" * 64
    mib = 1 << 20
    near = [(blob, 100, 200, "near0"), (blob, 300, 400, "near1"), (blob, 300, 400, "near1-again")]
    far = [(blob, 10 * mib, 10 * mib + 50, "far")]
    ranges = starget.DownloadJob.plan_ranges(near + far, concurrency=4, gap=starget._COALESCE_GAP)
    assert [(m[0].offset, m[-1].end) for _, m in ranges] == [(100, 400), (10 * mib, 10 * mib + 50)]
    assert [m.keys for m in ranges[0][1]] == [["near0"], ["near1", "near1-again"]]   # one member, two chunks

    big = [(blob, 1 + i * 4 * mib, 1 + (i + 1) * 4 * mib, i) for i in range(8)]
    ranges = starget.DownloadJob.plan_ranges(big, concurrency=4)
    assert len(ranges) == 4                                # 32 MiB cut for 4 workers
    assert ranges[0][1][0].offset == 1 and ranges[-1][1][-1].end == 1 + 32 * mib
    starts = [m[0].offset for _, m in ranges]
    assert starts == sorted(starts)
    ranges = starget.DownloadJob.plan_ranges(big, concurrency=1)
    assert len(ranges) == 1                                # one worker: one request


def test_a_remembered_redirect_skips_the_registry(httpserver, tmp_path):
    """After one blob redirect, the next ranges of that blob go straight to storage."""
    from harness import OCIServer
    from pytest_httpserver import HTTPServer
    storage_server = HTTPServer(host="127.0.0.1")
    storage_server.start()
    try:
        storage = OCIServer(storage_server, storage=True)
        registry = OCIServer(httpserver, redirect_to=storage.base_url)
        registry.add_layout("fixtures/basic", "basic")
        storage.add_layout("fixtures/basic", "basic")
        client = starget.RegistryClient(registry.image("fixtures/basic"))
        index = starget.open_image(client.ref, client=client, cache=None)
        stats = starget.Downloader(client, concurrency=1).download(index, "bin/", str(tmp_path))
        assert not stats.failures
        registry_blob_gets = [r for r in registry.requests if "/blobs/" in r[1]]
        storage_gets = [r for r in storage.requests if r[0] == "GET"]
        assert len(registry_blob_gets) == 1
        assert len(storage_gets) >= 2
    finally:
        storage_server.stop()


# ---- download: resume after an interruption (kill -9, SIGINT) ---------------

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
    proxy.stalled.clear()   # only this run's stall counts (the proxy is shared by the session)
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
            final = p[:-len(starget._STATE_SUFFIX)] if p.endswith(starget._STATE_SUFFIX) else p[:-len(starget._PARTIAL_SUFFIX)]
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
    rc, err, _ = _interrupt(anon_proxy, sandbox.out, BIG, 1300000, BIG + starget._STATE_SUFFIX)
    assert rc == -signal.SIGKILL
    big = os.path.join(sandbox.out, "data", "big.bin")
    assert not os.path.lexists(big), "a killed run left data/big.bin under its final name"
    assert os.path.isfile(big + starget._PARTIAL_SUFFIX)
    done = _state_done(big + starget._STATE_SUFFIX)
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
    rc, err, _ = _interrupt(anon_proxy, sandbox.out, "data", cut, "data/exact-2chunks.bin" + starget._STATE_SUFFIX)
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
    rc, err, took = _interrupt(anon_proxy, sandbox.out, BIG, 1300000, BIG + starget._STATE_SUFFIX,
                               sig=signal.SIGINT)
    assert rc == 130, (rc, err)
    assert "resume" in err.lower() or "again" in err.lower(), err
    assert "Traceback" not in err
    assert took < 10, "exit took %.1fs after SIGINT" % took
    _assert_interrupted_tree(sandbox.out, BIG)
    assert os.path.isfile(os.path.join(sandbox.out, "data", "big.bin" + starget._PARTIAL_SUFFIX))
    rc, out, err = run_cli("--no-progress", "get", anon_proxy.image(), BIG, sandbox.out)
    assert rc == 0, err
    assert_final_tree(sandbox.out, BIG, complete=True)


def test_resume_refetches_a_corrupted_verified_chunk(anon_proxy, sandbox):
    """A byte of a chunk the state calls verified is changed on disk before the
    re-run: that chunk is checked again and fetched again, the others are not."""
    rc, err, _ = _interrupt(anon_proxy, sandbox.out, BIG, 1300000, BIG + starget._STATE_SUFFIX)
    partial = os.path.join(sandbox.out, "data", "big.bin" + starget._PARTIAL_SUFFIX)
    done = _state_done(os.path.join(sandbox.out, "data", "big.bin" + starget._STATE_SUFFIX))
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
    rc, err, _ = _interrupt(front, sandbox.out, BIG, 1300000, BIG + starget._STATE_SUFFIX, blob=other_digest,
                            image="%s/fixtures/basic:latest" % front.addr)
    assert rc == -signal.SIGKILL
    done = _state_done(os.path.join(sandbox.out, "data", "big.bin" + starget._STATE_SUFFIX))
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
    with open(os.path.join(d, "big.bin" + starget._PARTIAL_SUFFIX), "wb") as f:
        f.write(b"\0" * BASIC_FILES[BIG]["size"])
    with open(os.path.join(d, "big.bin" + starget._STATE_SUFFIX), "wb") as f:
        f.write(junk)
    rc, out, err = run_cli("--no-progress", "get", anon_proxy.image(), BIG, sandbox.out)
    assert rc == 0, err
    assert_final_tree(sandbox.out, BIG, complete=True)


def test_partial_that_is_a_symlink_is_not_written_through(anon_proxy, sandbox):
    """`etc/passwd.partial` is a symlink to a file outside OUTPUT_DIR: never written through."""
    d = os.path.join(sandbox.out, "etc")
    os.makedirs(d)
    os.symlink(os.path.join(sandbox.canary, "keep.txt"), os.path.join(d, "passwd" + starget._PARTIAL_SUFFIX))
    rc, out, err = run_cli("--no-progress", "get", anon_proxy.image(), TARGET_FILE, sandbox.out)
    assert rc in (0, 9, 10), err
    sandbox.assert_untouched()
    if rc == 0:
        assert_final_tree(sandbox.out, TARGET_FILE, err)
    else:
        assert TARGET_FILE in err or "passwd" in err


def test_state_tmp_that_is_a_symlink_is_not_written_through(registry_anon, sandbox):
    """`NAME.partial.state.tmp` planted as a symlink to a file outside OUTPUT_DIR: the
    resume state of a multi-chunk file (saved after each chunk) never goes through it."""
    d = os.path.join(sandbox.out, "data")
    os.makedirs(d)
    name = os.path.basename(TARGET_CHUNKED)
    assert len(chunk_table(TARGET_CHUNKED)) > 1
    os.symlink(os.path.join(sandbox.canary, "keep.txt"), os.path.join(d, name + starget._STATE_SUFFIX + ".tmp"))
    rc, out, err = run_cli("--no-progress", "get", registry_anon.image("basic"), TARGET_CHUNKED, sandbox.out)
    sandbox.assert_untouched()
    assert rc == 0, err
    assert_final_tree(sandbox.out, TARGET_CHUNKED, complete=True)



# ---- download: device nodes and FIFOs only with --devices -------------------

_SPECIALS = sorted(p for p, e in BASIC_FILES.items() if e["type"] in ("char", "block", "fifo"))


@pytest.mark.skipif(not IS_ROOT, reason="creating device nodes needs root")
def test_get_as_root_creates_no_device_nodes_unless_asked(registry_anon, tmp_path):
    """As root (the usual case in a build container) an untrusted image's /dev/mem-like
    nodes are skipped, with one warning that counts them; --devices creates them."""
    assert len(_SPECIALS) >= 3
    out = tmp_path / "out"
    rc, _, err = run_cli("--no-progress", "get", registry_anon.image("basic"), ".", str(out))
    assert rc == 0, err
    tree = walk_tree(str(out))
    assert [p for p in _SPECIALS if p in tree] == []
    warnings = [line for line in err.splitlines() if "device node" in line]
    assert len(warnings) == 1 and ("skipped %d device nodes" % len(_SPECIALS)) in warnings[0], err
    assert compare_tree(BASIC_FILES, tree, "") == []
    out2 = tmp_path / "out2"
    rc, _, err = run_cli("--no-progress", "--devices", "get", registry_anon.image("basic"), ".", str(out2))
    assert rc == 0, err
    tree = walk_tree(str(out2))
    assert compare_tree(BASIC_FILES, tree, "", devices=True) == []
    assert all(p in tree for p in _SPECIALS)


def test_devices_flag_is_refused_without_root(registry_anon, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(starget, "_is_root", lambda: False)
    monkeypatch.setenv("STARGET_CACHE_DIR", str(tmp_path / "cache"))
    rc = starget.main(["--no-progress", "--devices", "get", registry_anon.image("basic"), "dev/", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--devices needs root" in err
    assert not (tmp_path / "o").exists()

# ---- download: hostile images (forged, served by pytest-httpserver) ---------

def _hostile_image(reg, edit, annotate=True):
    """multiarch's linux/amd64 layer with its TOC rewritten by `edit`; served as fixtures/hostile."""
    m = expected_ref("multiarch", "latest", "linux/amd64")
    layer = m["layers"][0]
    blob, toc_json = rewrite_toc(blob_bytes("multiarch", layer["digest"]), edit)
    ann = [{TOC_DIGEST_ANNOTATION: sha256_digest(toc_json)}] if annotate else [None]
    reg.add_image("fixtures/hostile", [blob], annotations=ann)
    return reg.image("fixtures/hostile")


def _rename(old, new):
    def edit(toc):
        for e in toc["entries"]:
            if e["name"] == old:
                e["name"] = new
    return edit


def _escape_name():
    return "starget-escape-%s.txt" % uuid.uuid4().hex[:10]


def _nothing_named(name, roots):
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            assert name not in filenames + dirnames, "%s written at %s" % (name, dirpath)
    assert not os.path.lexists("/" + name)


@pytest.mark.parametrize("template", ["../{n}", "./etc/../../{n}", "/../../{n}", "etc/../../../{n}"])
@pytest.mark.parametrize("annotate", [True, False])
def test_hostile_toc_dotdot_name(httpserver, ws, template, annotate):
    reg = OCIServer(httpserver)
    name = _escape_name()
    image = _hostile_image(reg, _rename("./etc/common.txt", template.format(n=name)), annotate)
    rc, out, err = run_cli("get", image, ".", ws.out)
    assert_one_line_error(rc, err, (6, 9))
    ws.assert_out_empty()
    ws.assert_nothing_outside()
    _nothing_named(name, [ws.base, os.path.dirname(ws.base)])


def test_hostile_toc_dotdot_name_ls_is_refused_too(httpserver):
    reg = OCIServer(httpserver)
    image = _hostile_image(reg, _rename("./etc/common.txt", "../" + _escape_name()))
    rc, out, err = run_cli("ls", "--json", image)
    if rc == 0:   # listing may be allowed, but never with an escaping path
        assert all(".." not in e["path"].split("/") for e in json.loads(out))
    else:
        assert_one_line_error(rc, err, (6, 9))


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_hostile_symlinked_parent_cannot_redirect_writes(httpserver, ws, kind):
    """'etc' becomes a symlink out of OUTPUT_DIR, then etc/arch is written: never through it."""
    target = "../canary" if kind == "relative" else ws.canary

    def edit(toc):
        for e in toc["entries"]:
            if e["name"] == "./etc/":
                e.clear()
                e.update({"name": "./etc", "type": "symlink", "linkName": target, "mode": 511})
    reg = OCIServer(httpserver)
    image = _hostile_image(reg, edit)
    rc, out, err = run_cli("get", image, ".", ws.out)
    assert rc in (0, 6, 9, 11), (rc, err)
    if rc != 0:
        assert len(error_lines(err)) == 1
    ws.assert_nothing_outside()
    assert sorted(os.listdir(ws.canary)) == ["keep.txt"]


def test_hostile_hardlink_outside_output(httpserver, ws):
    """A hardlink whose target leaves the image must not link to a file outside OUTPUT_DIR."""
    def edit(toc):
        toc["entries"].append({"name": "./etc/hl", "type": "hardlink", "linkName": "../canary/keep.txt",
                               "mode": 420})
    reg = OCIServer(httpserver)
    image = _hostile_image(reg, edit)
    rc, out, err = run_cli("get", image, ".", ws.out)
    assert rc in (0, 6, 9, 11), (rc, err)
    ws.assert_nothing_outside()
    keep = os.lstat(os.path.join(ws.canary, "keep.txt"))
    assert keep.st_nlink == 1, "a hardlink to the canary was made"


def test_toc_digest_mismatch_is_integrity_error(httpserver, ws):
    """The manifest pins the TOC digest: a TOC that does not match is refused."""
    reg = OCIServer(httpserver)
    m = expected_ref("multiarch", "latest", "linux/amd64")
    layer = m["layers"][0]

    def edit(toc):
        for e in toc["entries"]:
            if e["name"] == "./etc/arch":
                e["mode"] = 0o4755
    blob, _ = rewrite_toc(blob_bytes("multiarch", layer["digest"]), edit)
    reg.add_image("fixtures/tampered", [blob], annotations=[{TOC_DIGEST_ANNOTATION: layer["toc_digest"]}])
    rc, out, err = run_cli("get", reg.image("fixtures/tampered"), ".", ws.out)
    assert_one_line_error(rc, err, 8)
    ws.assert_out_empty()


def test_tampered_payload_is_integrity_error(httpserver, ws):
    """A payload whose bytes do not match the TOC digest is never written as good."""
    reg = OCIServer(httpserver)
    m = expected_ref("multiarch", "latest", "linux/amd64")
    layer = m["layers"][0]
    original = blob_bytes("multiarch", layer["digest"])
    _, toc_json = read_toc(original)
    toc = json.loads(toc_json)
    ent = next(e for e in toc["entries"] if e["name"] == "./etc/arch")
    # swap etc/arch's member for etc/common.txt's: valid gzip, wrong bytes
    other = next(e for e in toc["entries"] if e["name"] == "./etc/common.txt")

    def edit(t):
        for e in t["entries"]:
            if e["name"] == "./etc/arch":
                e["offset"] = other["offset"]
                e["size"] = other["size"]
    blob, new_json = rewrite_toc(original, edit)
    assert ent["digest"] != other["digest"]
    reg.add_image("fixtures/tampered", [blob], annotations=[{TOC_DIGEST_ANNOTATION: sha256_digest(new_json)}])
    rc, out, err = run_cli("get", reg.image("fixtures/tampered"), "etc/arch", ws.out)
    assert_one_line_error(rc, err, 8)
    assert not os.path.exists(os.path.join(ws.out, "etc", "arch"))


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
        normal = starget._normalize_path(name)
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


def _host_dir(tmp_path_factory):
    """A directory outside the workspace (the host's), with `sub/` (0755, an old mtime)
    and `f` (a file): OUTPUT_DIR/v will point here."""
    hostdir = os.path.join(str(tmp_path_factory.mktemp("host")), "hostdir")
    os.makedirs(os.path.join(hostdir, "sub"))
    with open(os.path.join(hostdir, "f"), "w") as f:
        f.write("the host's file\n")
    for path, mode in ((os.path.join(hostdir, "sub"), 0o755), (os.path.join(hostdir, "f"), 0o644), (hostdir, 0o755)):
        os.chmod(path, mode)
        os.utime(path, (1000000000, 1000000000))
    return hostdir


def _attributes(path):
    st = os.lstat(path)
    return stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_uid, st.st_gid, st.st_nlink


def test_directory_attributes_never_set_through_a_symlink_in_output(httpserver, ws, tmp_path_factory):
    """OUTPUT_DIR/v is already a symlink to a host directory; the image has directories
    `v/` and `v/sub/` (mode 0777, the image's mtime): the host's directories keep their
    modes and times, and the run reports the refusal (non-zero exit)."""
    hostdir = _host_dir(tmp_path_factory)
    sub = os.path.join(hostdir, "sub")
    before = {p: _attributes(p) for p in (hostdir, sub)}
    os.symlink(hostdir, os.path.join(ws.out, "v"))

    def edit(toc):
        d = _toc_entry(toc, "bin/", "dir")
        toc["entries"] += [dict(d, name="v/", mode=0o777), dict(d, name="v/sub/", mode=0o777)]
    blob, toc_json = forge_basic(edit)
    reg, image = _serve(httpserver, blob, toc_json)
    rc, out, err = run_cli("--no-progress", "get", image, ".", ws.out)
    assert {p: _attributes(p) for p in (hostdir, sub)} == before, "attributes set through OUTPUT_DIR/v"
    assert sorted(os.listdir(hostdir)) == ["f", "sub"] and os.listdir(sub) == []
    assert rc not in (0, 1) and "Traceback" not in err, (rc, err)
    assert error_lines(err) and re.search(r"\bv\b", err), err
    assert os.readlink(os.path.join(ws.out, "v")) == hostdir
    ws.assert_untouched()


def test_hardlink_never_links_through_a_symlink_in_output(httpserver, ws, tmp_path_factory):
    """OUTPUT_DIR/v is already a symlink to a host directory holding `f`; the image has
    `v/f` (a regular file) and a hardlink `h` -> `v/f`: `h` never becomes the host's file
    (absent or another inode) and the host's `f` is unchanged."""
    hostdir = _host_dir(tmp_path_factory)
    host_f = os.path.join(hostdir, "f")
    before = _attributes(host_f)
    os.symlink(hostdir, os.path.join(ws.out, "v"))

    def edit(toc):
        toc["entries"].append(dict(_toc_entry(toc, TARGET_FILE), name="v/f"))
        toc["entries"].append({"name": "h", "type": "hardlink", "linkName": "v/f", "mode": 0o644})
    blob, toc_json = forge_basic(edit)
    reg, image = _serve(httpserver, blob, toc_json)
    rc, out, err = run_cli("--no-progress", "get", image, ".", ws.out)
    assert rc not in (0, 1) and "Traceback" not in err, (rc, err)
    h = os.path.join(ws.out, "h")
    if os.path.lexists(h):
        assert not os.path.samestat(os.lstat(h), os.lstat(host_f)), "OUTPUT_DIR/h is the host's file"
    assert _attributes(host_f) == before
    with open(host_f) as f:
        assert f.read() == "the host's file\n"
    assert "v/f" in err
    ws.assert_untouched()


@pytest.mark.parametrize("suffix", [starget._PARTIAL_SUFFIX, starget._STATE_SUFFIX, starget._STATE_SUFFIX + ".tmp"])
def test_entry_named_like_a_working_file_is_refused(httpserver, sandbox, suffix):
    """The image has `etc/passwd` and `etc/passwd<suffix>` (a regular file with other
    content), starget's working names for etc/passwd: the second is refused with one
    error line naming it (exit 9 or 11), etc/passwd is byte-exact, nothing else is lost."""
    name = TARGET_FILE + suffix

    def edit(toc):
        toc["entries"].append(dict(_toc_entry(toc, "etc/group"), name=name))
    blob, toc_json = forge_basic(edit)
    reg, image = _serve(httpserver, blob, toc_json)
    rc, out, err = run_cli("--no-progress", "get", image, "etc", sandbox.out)
    assert rc in (9, 11), (rc, err)
    assert "Traceback" not in err
    errors = error_lines(err)
    assert len(errors) == 1, err
    assert name in err
    with open(os.path.join(sandbox.out, *TARGET_FILE.split("/")), "rb") as f:
        assert f.read() == file_bytes(TARGET_FILE)
    assert not os.path.lexists(os.path.join(sandbox.out, *name.split("/")))
    missing = assert_final_tree(sandbox.out, "etc", err, files=dict(BASIC_FILES, **{name: BASIC_FILES["etc/group"]}))
    assert missing == [name]
    sandbox.assert_untouched()


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


def _forge_big_digest(case):
    """A TOC edit that makes BIG's digests lie: "chunk-digest" one chunk's, "whole-file-
    digest" the file's while every chunk is right, "no-chunk-digests" the file's with
    the chunk digests gone (so only the whole file can be checked)."""
    def edit(toc):
        entries = [e for e in toc["entries"] if e.get("name") == BIG]
        if case == "chunk-digest":
            entries[5]["chunkDigest"] = sha256_digest(b"x")
            return
        if case == "no-chunk-digests":
            for e in entries:
                e.pop("chunkDigest", None)
        entries[0]["digest"] = sha256_digest(b"x")
    return edit


@pytest.mark.parametrize("case", ["file-digest", "chunk-digest", "whole-file-digest"])
def test_content_digest_mismatch(httpserver, sandbox, case):
    """A file (or one chunk) whose bytes do not match the TOC: alone -> exit 8, with
    others -> exit 11, the others exact; the bad file never under its final name."""
    bad = TARGET_FILE if case == "file-digest" else BIG

    def edit(toc):
        if case == "file-digest":
            e = _toc_entry(toc, TARGET_FILE)
            e["digest"] = e["chunkDigest"] = sha256_digest(b"something else")
        else:
            _forge_big_digest(case)(toc)
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


# ---- download: systemic failures end the run with one line -------------------

_SUMMARY_LINE = re.compile(r"^starget: (\d+ of \d+ files? written|nothing written) before the error; "
                           r"re-run the same command to resume$")


def _assert_stopped_with(rc, err, code):
    """Exit `code`, one error line for the cause, one summary line, nothing else."""
    assert rc == code, (rc, err)
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(error_lines(err)) == 1, "expected ONE error line: %r" % err
    others = [l for l in lines if l not in error_lines(err) and not re.match(r"starget: (warning|info|debug): ", l)]
    assert len(others) == 1 and _SUMMARY_LINE.match(others[0]), "not one summary line: %r" % err
    return error_lines(err)[0], others[0]


def _refuse_writes_under(monkeypatch, root, number, calls):
    """os.mkdir, and os.open for writing, raise OSError(number) under `root`, as a
    read-only file system does: as root a chmod 0555 stops nothing. `calls` counts them."""
    def refusing(real, writes):
        def call(path, *args, **kw):
            if os.path.abspath(str(path)).startswith(root + os.sep) and writes(args):
                calls.append(path)
                raise OSError(number, os.strerror(number), path)
            return real(path, *args, **kw)
        return call
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT
    monkeypatch.setattr(os, "mkdir", refusing(os.mkdir, lambda args: True))
    monkeypatch.setattr(os, "open", refusing(os.open, lambda args: bool(args and args[0] & write_flags)))


def _refuse_pwrite(monkeypatch, number, calls):
    """Every os.pwrite fails with `number` (ENOSPC: the file system is full)."""
    def pwrite(fd, data, offset):
        calls.append(fd)
        raise OSError(number, os.strerror(number))
    monkeypatch.setattr(os, "pwrite", pwrite)


@pytest.mark.parametrize("number", ["EROFS", "EACCES", "ENOSPC"])
def test_unwritable_destination_stops_with_one_line(registry_anon, download_env, monkeypatch, capsys, number):
    """A destination nothing can be written to (read-only, not permitted, full): one
    error line for the cause, one summary line, exit 10; the run stops at the first
    failure instead of trying (and reporting) every entry."""
    sandbox = Workspace(download_env / "ws")     # next to download_env's cache, which is written
    calls = []
    number = getattr(errno, number)
    if number == errno.ENOSPC:
        _refuse_pwrite(monkeypatch, number, calls)
    else:
        _refuse_writes_under(monkeypatch, sandbox.out, number, calls)
    rc = starget.main(["--no-progress", "get", registry_anon.image("basic"), ".", sandbox.out])
    err = capsys.readouterr().err
    line, summary = _assert_stopped_with(rc, err, 10)
    assert os.strerror(number) in line, line
    regular = [p for p, e in BASIC_FILES.items() if e["type"] in ("reg", "hardlink")]
    assert 1 <= len(calls) <= 4 < len(regular), "%d writes tried after the first failed" % len(calls)
    monkeypatch.undo()
    assert_final_tree(sandbox.out, "", err + "".join(BASIC_FILES))   # what is there is exact
    sandbox.assert_untouched()


def test_registry_gone_mid_run_stops_with_one_line(anon_proxy, sandbox):
    """Every payload read dropped once the TOCs were read (the registry gone), no
    retries: one error line for the cause and one summary line, exit 5 (a network
    error), not one line per file and exit 11."""
    fault = anon_proxy.add("reset", path=BASIC_BLOB, where=payload_of_basic, times=None, cut=0)
    rc, out, err = run_cli("--retries", "0", "--no-progress", "get", anon_proxy.image(), ".", sandbox.out)
    assert fault.fired >= 1, fault
    line, summary = _assert_stopped_with(rc, err, 5)
    assert "reset" in line.lower(), line
    missing = assert_final_tree(sandbox.out, "", err + "".join(BASIC_FILES))
    assert missing, "every file is there although every payload read failed"
    sandbox.assert_untouched()


def test_credentials_rejected_mid_run_stops_with_one_line(anon_proxy, sandbox):
    """Every payload read answered 403 once the TOCs were read: one error line, exit 4."""
    fault = anon_proxy.add("status", path=BASIC_BLOB, where=payload_of_basic, status=403, times=None)
    rc, out, err = run_cli("--retries", "0", "--no-progress", "get", anon_proxy.image(), ".", sandbox.out)
    assert fault.fired >= 1, fault
    line, summary = _assert_stopped_with(rc, err, 4)
    assert "403" in line, line
    sandbox.assert_untouched()


def _os_error(number):
    return OSError(number, os.strerror(number))


@pytest.mark.parametrize("error, systemic", [
    (StargzError(ErrorCode.IO, "m", _os_error(errno.EROFS)), True),
    (StargzError(ErrorCode.IO, "m", _os_error(errno.ENOSPC)), True),
    (StargzError(ErrorCode.IO, "m", _os_error(errno.EDQUOT)), True),
    (StargzError(ErrorCode.IO, "m", _os_error(errno.EACCES)), True),
    (StargzError(ErrorCode.IO, "m", _os_error(errno.EPERM)), True),
    (StargzError(ErrorCode.IO, "m", _os_error(errno.EISDIR)), False),
    (StargzError(ErrorCode.IO, "Read-only file system"), False),     # the text is not read
    (StargzError(ErrorCode.NETWORK, "m", ConnectionRefusedError(errno.ECONNREFUSED, "x"), transient=True), True),
    (StargzError(ErrorCode.NETWORK, "m", socket.timeout("timed out"), transient=True), True),
    (StargzError(ErrorCode.NETWORK, "HTTP 500", transient=True), False),     # one range's server error
    (StargzError(ErrorCode.NETWORK, "bad Content-Range"), False),
    (StargzError(ErrorCode.AUTH, "denied"), True),
    (StargzError(ErrorCode.INTEGRITY, "m", _os_error(errno.EROFS)), False),
    (StargzError(ErrorCode.UNSAFE, "m"), False),
    (StargzError(ErrorCode.FORMAT, "m"), False),
])
def test_is_systemic(error, systemic):
    assert starget._is_systemic(error) is systemic


# ---- download: the progress line ----------------------------------------------

@pytest.mark.parametrize("width", [40, 120])
def test_progress_line_fits_the_width(width):
    for args in [(0, 0, 0, 0, 0.0), (5 << 20, 20 << 20, 3, 27, 2.0), (1023 << 30, 1024 << 30, 99999, 100000, 7.5),
                 (20 << 20, 20 << 20, 27, 27, 4.0)]:
        line = starget._progress_line(*args, width=width)
        assert 0 < len(line) <= width - 1, (width, line)
        assert "%" in line and "files" in line, line


def test_progress_line_says_what_and_how_fast():
    line = starget._progress_line(5 << 20, 20 << 20, 3, 27, 2.0, 120)
    assert line.startswith(" 25%"), line
    assert "5.0 MiB / 20.0 MiB" in line and "2.5 MiB/s" in line and "3/27 files" in line, line
    assert "ETA 0:06" in line, line      # 15 MiB to go at 2.5 MiB/s
    narrow = starget._progress_line(5 << 20, 20 << 20, 3, 27, 2.0, 40)
    assert " 25%" in narrow and "3/27 files" in narrow, narrow     # the parts that stay
    final = starget._progress_line(20 << 20, 20 << 20, 27, 27, 4.0, 120, final=True)
    assert "ETA" not in final and "100%" in final and "27/27 files" in final, final


def test_progress_line_zero_total_and_one_file():
    line = starget._progress_line(0, 0, 0, 1, 0.0, 80)
    assert "100%" in line and "0/1 file" in line and "files" not in line, line
    assert "ETA" not in line
    assert "1/1 file" in starget._progress_line(0, 0, 1, 1, 0.0, 80, final=True)
    assert "0/2 files" in starget._progress_line(0, 10, 0, 2, 1.0, 80)


class _FakeClock(object):
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _drawn_lines(text):
    """What the terminal shows, line by line: each \\r redraw and each \\n-ended line."""
    return [piece for line in text.split("\n") for piece in line.split("\r") if piece]


def test_progress_redraw_clears_and_fits():
    stream, clock = io.StringIO(), _FakeClock()
    width = [120]
    progress = starget._Progress(20 << 30, 1000, True, stream=stream, clock=clock, width=lambda s: width[0])
    clock.now += 1
    progress.add(10 << 30)                   # a long line: big numbers, an ETA
    for _ in range(50):                      # within the interval: not drawn again
        progress.add(1)
    assert stream.getvalue().count("\r") == 1, repr(stream.getvalue())
    long_line = stream.getvalue()
    clock.now += 10
    progress.add(10 << 30, files=1000)       # done: no ETA, a shorter line
    second = stream.getvalue()[len(long_line):]
    assert second.startswith("\r") and len(second) == len(long_line), (long_line, second)   # spaces over the rest
    assert "\x1b" not in stream.getvalue()   # NO_COLOR allows no escapes: spaces, not ESC [K
    width[0] = 40
    clock.now += 1
    progress.add(0)
    progress.finish(files_done=1000)
    text = stream.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1, repr(text)
    assert all(len(line) <= 119 for line in _drawn_lines(text)), _drawn_lines(text)
    assert all(len(line.rstrip()) <= 39 for line in _drawn_lines(text)[-2:]), _drawn_lines(text)
    assert "1000/1000 files" in _drawn_lines(text)[-1]


def test_progress_is_silent_when_disabled():
    stream = io.StringIO()
    progress = starget._Progress(100, 1, False, stream=stream, clock=_FakeClock(), width=lambda s: 80)
    progress.add(100, files=1)
    progress.finish()
    assert stream.getvalue() == ""


def test_progress_and_summary_count_the_same_files(registry_anon, download_env, monkeypatch, capsys):
    """On a terminal the last progress line and the -v summary give one file count:
    files written plus files already present, links included; "1 file", not "1 files"."""
    out = str(download_env / "out")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    for run in range(2):        # written, then all of them already present
        assert starget.main(["-v", "get", registry_anon.image("basic"), "bin", out]) == 0
        err = capsys.readouterr().err
        shown = re.findall(r"(\d+)/(\d+) files?\b", err.split("\r")[-1])
        summary = re.search(r"info: (\d+) files?(?: \((\d+) already present\))?, ", err)
        assert shown and summary, repr(err)
        assert shown[-1][0] == shown[-1][1] == summary.group(1), (run, shown, summary.group(0))
        assert (summary.group(2) is not None) == (run == 1), summary.group(0)
    assert starget.main(["-v", "get", registry_anon.image("basic"), TARGET_FILE, str(download_env / "one")]) == 0
    err = capsys.readouterr().err
    assert "1/1 file" in err and "1/1 files" not in err and "info: 1 file, " in err, repr(err)


def test_warnings_go_below_the_progress_line(registry_anon, download_env, monkeypatch, capsys):
    """The device-node warning is written after the progress line's end, not into it."""
    monkeypatch.setattr(starget._Progress, "INTERVAL", 0.0)     # every update drawn
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert starget.main(["get", registry_anon.image("basic"), ".", str(download_env / "out")]) == 0
    err = capsys.readouterr().err
    assert "\r" in err and "skipped 3 device nodes" in err, repr(err)
    assert all(line.startswith("starget: ") for line in err.split("\n")[1:] if line), repr(err)
    assert not re.search(r"[^\n]starget: warning", err), repr(err)


# ---- download: file objects -------------------------------------------------

def _extents(chunks):
    """The compressed bytes that fetching `chunks` costs (shared members count once)."""
    return sum(end - offset for offset, end in {(c.member_offset, c.member_end) for c in chunks})


def test_open_random_seeks_and_reads_match_the_content(registry_anon, download_env):
    import random
    want = file_bytes(BIG)
    rng = random.Random(20240611)
    with starget.open_image(registry_anon.image("basic")).open(BIG) as f:
        assert f.readable() and f.seekable() and not f.writable()
        for _ in range(80):
            offset, n = rng.randrange(len(want) + 100), rng.choice([0, 1, 4, 1000, 70000, 300000, 900000])
            assert f.seek(offset) == offset
            assert f.read(n) == want[offset:offset + n]
            assert f.tell() == max(offset, min(offset + n, len(want)))
        assert f.seek(-4, io.SEEK_END) == len(want) - 4 and f.read() == want[-4:]
        f.seek(10)
        assert f.seek(5, io.SEEK_CUR) == 15
        with pytest.raises(ValueError):
            f.seek(-1)
    assert f.closed
    with pytest.raises(ValueError):
        f.read(1)


@pytest.mark.parametrize("layout", ["basic", "minchunk"])
def test_open_buffered_reads_match_expected(registry_anon, download_env, layout):
    """Every file (hardlinks and files sharing gzip members included), read whole
    through io.BufferedReader, by lines and by shutil.copyfileobj."""
    index = starget.open_image(registry_anon.image(layout))
    for path, e in sorted(expected_files(layout, "latest").items()):
        if e["type"] not in ("reg", "hardlink"):
            continue
        with io.BufferedReader(index.open(path)) as f:
            assert hashlib.sha256(f.read()).hexdigest() == e["sha256"], path
            f.seek(0)
            assert hashlib.sha256(b"".join(f.readlines())).hexdigest() == e["sha256"], path
            f.seek(0)
            copy = io.BytesIO()
            shutil.copyfileobj(f, copy)
            assert hashlib.sha256(copy.getvalue()).hexdigest() == e["sha256"], path


@pytest.mark.parametrize("layout,path", [("basic", BIG), ("minchunk", "usr/share/doc/big.txt")])
def test_open_fetches_only_the_chunks_it_reads(registry_anon, download_env, layout, path):
    """1 KiB in the middle of a multi-chunk file: one request, at most two chunks'
    members (the read-ahead); the same read again fetches nothing."""
    index = starget.open_image(registry_anon.image(layout))
    chunks = index.find_file(path).chunks
    middle = chunks[len(chunks) // 2]
    offset = middle.file_offset + middle.size // 2 - 512
    stats = index.client.transport.stats
    with index.open(path) as f:
        before = stats.as_dict()
        f.seek(offset)
        data = f.read(1024)
        after = stats.as_dict()
        assert after["requests"] - before["requests"] == 1
        i = chunks.index(middle)
        assert after["bytes"] - before["bytes"] <= _extents(chunks[i:i + 2])
        f.seek(offset)
        assert f.read(1024) == data
        assert stats.as_dict() == after
    whole = _whole(index, path)
    assert hashlib.sha256(whole).hexdigest() == expected_files(layout, "latest")[path]["sha256"]
    assert data == whole[offset:offset + 1024]


def _whole(index, path):
    with index.open(path) as f:
        return f.read()


@pytest.mark.parametrize("path", ["no/such/file", "etc", "bin/dangling", "dev/null"])
def test_open_not_a_file_is_not_found(registry_anon, download_env, path):
    with pytest.raises(StargzError) as info:
        starget.open(registry_anon.image("basic"), path)
    assert info.value.code == ErrorCode.NOT_FOUND


@pytest.mark.parametrize("link,target", [("bin/sh", "bin/busybox"), ("bin/ls", "bin/busybox"),
                                         ("usr/lib/libfoo.so", "usr/lib/libfoo.so.1"),
                                         ("lib/libfoo.so", "usr/lib/libfoo.so.1")])
def test_open_follows_symlinks_inside_the_image(registry_anon, download_env, monkeypatch, link, target):
    closed = []
    monkeypatch.setattr(starget.Transport, "close", lambda self: closed.append(self))
    with starget.open(registry_anon.image("basic"), link) as f:
        assert hashlib.sha256(f.read()).hexdigest() == BASIC_FILES[target]["sha256"]
        assert not closed
    assert len(closed) == 1, "the file of starget.open closes the transport made for it"


def test_open_fallback_stream_file(registry_anon, download_env):
    """A --fallback-stream layer: the file is read from the spooled tar."""
    layout = PLAIN_GZIP_LAYOUTS[0]
    index = starget.open_image(registry_anon.image(layout), fallback_dir=str(download_env))
    for path, e in _reg_files(expected_files(layout, "latest")).items():
        whole = _whole(index, path)
        assert hashlib.sha256(whole).hexdigest() == e["sha256"], path
        with index.open(path) as f:
            f.seek(len(whole) // 2)
            assert f.read(10) == whole[len(whole) // 2:len(whole) // 2 + 10]


@pytest.mark.parametrize("case", ["chunk-digest", "no-chunk-digests"])
def test_open_digest_mismatch_is_integrity_error(httpserver, download_env, case):
    """A wrong chunk digest: that chunk is refetched once, then INTEGRITY, and not a
    byte of it is returned; the other chunks read fine. Without chunk digests the
    file digest is checked over the whole file before the first byte."""
    want = file_bytes(BIG)
    blob, toc_json = forge_basic(_forge_big_digest(case))
    reg, image = _serve(httpserver, blob, toc_json)
    index = starget.open_image(image)
    chunks = index.find_file(BIG).chunks
    stats = index.client.transport.stats
    with index.open(BIG) as f:
        if case == "chunk-digest":
            assert f.read(10) == want[:10]
            f.seek(chunks[5].file_offset + 1)
        before = stats.requests
        with pytest.raises(StargzError) as info:
            f.read(10)
        assert info.value.code == ErrorCode.INTEGRITY
        assert stats.requests - before == 2, "fetched once more, then refused"


def test_open_a_wrong_read_ahead_chunk_fails_only_its_own_read(httpserver, download_env):
    """minchunk's big.txt: chunk 1 shares chunk 0's member, so it comes along with it;
    its wrong digest fails a read of chunk 1, never the read of chunk 0."""
    path, layer = "usr/share/doc/big.txt", expected_ref("minchunk", "latest")["layers"][0]

    def edit(toc):
        entries = [e for e in toc["entries"] if e.get("name", "").lstrip("./") == path]
        entries[1]["chunkDigest"] = sha256_digest(b"x")
    blob, toc_json = rewrite_toc(blob_bytes("minchunk", layer["digest"]), edit)
    reg, image = _serve(httpserver, blob, toc_json)
    index = starget.open_image(image)
    chunks = index.find_file(path).chunks
    assert chunks[0].member_offset == chunks[1].member_offset
    with index.open(path) as f:
        assert len(f.read(100)) == 100
        f.seek(chunks[1].file_offset)
        with pytest.raises(StargzError) as info:
            f.read(1)
        assert info.value.code == ErrorCode.INTEGRITY


def test_open_fetches_the_whole_file_when_chunks_have_no_digest(httpserver, download_env):
    def edit(toc):
        for e in toc["entries"]:
            if e.get("name") == BIG:
                e.pop("chunkDigest", None)
    blob, toc_json = forge_basic(edit)
    reg, image = _serve(httpserver, blob, toc_json)
    index = starget.open_image(image)
    stats = index.client.transport.stats
    with index.open(BIG) as f:
        before = stats.as_dict()
        f.seek(1000000)
        assert f.read(4) == file_bytes(BIG)[1000000:1000004]
        after = stats.as_dict()
        assert after["requests"] - before["requests"] == 1
        assert after["bytes"] - before["bytes"] >= _extents(index.find_file(BIG).chunks)


def test_open_one_object_per_thread(registry_anon, download_env):
    want = file_bytes(BIG)
    index = starget.open_image(registry_anon.image("basic"))
    results = {}

    def read(n):
        with index.open(BIG) as f:
            offset = n * len(want) // 4
            f.seek(offset)
            results[n] = f.read(len(want) // 4 + 1000) == want[offset:offset + len(want) // 4 + 1000]
    threads = [threading.Thread(target=read, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {0: True, 1: True, 2: True, 3: True}



@pytest.mark.skipif(ZSTD is None, reason="no zstd decoder (backports.zstd is in the test extra)")
def test_open_reads_zstd_chunked_files(registry_anon, api_env):
    """The file object reads a zstd:chunked layer's files too: every regular file of
    zstd-layers, whole and from the middle, equals EXPECTED's sha256."""
    files = expected_files("zstd-layers", "latest")
    with starget.open(registry_anon.image("zstd-layers"), "etc/hostname" if "etc/hostname" in files
                      else sorted(p for p, e in files.items() if e["type"] == "reg")[0]) as f:
        assert f.read(1) is not None
    index = starget.open_image(registry_anon.image("zstd-layers"), cache=None)
    try:
        for path, e in sorted(files.items()):
            if e["type"] != "reg":
                continue
            with index.open(path) as f:
                data = f.read()
                assert hashlib.sha256(data).hexdigest() == e["sha256"], path
                if len(data) > 10:
                    f.seek(len(data) // 2)
                    assert f.read(5) == data[len(data) // 2:len(data) // 2 + 5]
    finally:
        index.client.transport.close()


def test_no_call_of_the_builtin_open_is_left():
    """starget.open shadows the builtin inside starget.py: a plain `open(` there would
    take a file name for an image reference (it happened in a merge)."""
    import ast
    tree = ast.parse(open(STARGET, encoding="utf-8").read())
    calls = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id == "open"]
    assert calls == []


# ---- download: --tar streams ------------------------------------------------

_TAR_KINDS = {"dir": b"5", "reg": b"0", "symlink": b"2", "hardlink": b"1", "char": b"3", "block": b"4", "fifo": b"6"}


def _tar_read(data):
    """[TarInfo] of an archive in order, and {name: sha256} of its regular members."""
    import tarfile
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        members = tf.getmembers()
        digests = {m.name: hashlib.sha256(tf.extractfile(m).read()).hexdigest() for m in members if m.isreg()}
    return members, digests


def _assert_tar_matches(members, digests, files):
    """The archive holds `files` (EXPECTED's): path order, a hardlink after its target;
    types, modes, uid/gid, times, link targets, devices and every regular file's sha256."""
    names = [m.name for m in members]
    assert sorted(names) == sorted(files)
    plain = [n for n in names if files[n]["type"] != "hardlink"]
    assert plain == sorted(plain), "not in path order"
    for m in members:
        e = files[m.name]
        assert m.type == _TAR_KINDS[e["type"]], m.name
        assert (m.mode, m.uid, m.gid, m.mtime) == (e["mode"], e["uid"], e["gid"], e["mtime"]), m.name
        if e["type"] in ("symlink", "hardlink"):
            assert m.linkname == e["link"], m.name
        if e["type"] == "hardlink":
            assert names.index(e["link"]) < names.index(m.name), "a hardlink before its target"
        if e["type"] == "reg":
            assert digests[m.name] == e["sha256"], m.name
        if e["type"] in ("char", "block"):
            assert (m.devmajor, m.devminor) == (e["dev_major"], e["dev_minor"]), m.name


def test_get_tar_to_stdout_is_read_by_tar(registry_anon):
    """`get IMG usr/ --tar - | tar -tv`: the real tar lists exactly the paths under usr/."""
    if not shutil.which("tar"):
        pytest.skip("no tar binary")
    env = hermetic_env()
    get = subprocess.Popen([sys.executable, STARGET, "get", registry_anon.image("basic"), "usr/", "--tar", "-"],
                           env=env, cwd=env["HOME"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tar = subprocess.run(["tar", "-tvf", "-"], stdin=get.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         timeout=120, universal_newlines=True)
    get.stdout.close()
    assert get.wait(timeout=120) == 0, get.stderr.read()
    get.stderr.close()
    assert tar.returncode == 0, tar.stderr
    listed = {}
    for line in tar.stdout.splitlines():
        mode, name = line.split()[0], line.split(None, 5)[5]
        listed[name.split(" -> ")[0].rstrip("/")] = mode
    assert sorted(listed) == under("usr")
    assert all(listed[p][0] == {"dir": "d", "reg": "-", "symlink": "l"}[BASIC_FILES[p]["type"]] for p in listed)


def test_get_tar_file_round_trip_matches_expected(registry_anon, tmp_path):
    """`get IMG . --tar OUT.tar` for basic, read back with tarfile: names, types, modes,
    owners, link targets, devices and FIFOs, contents; xattrs in the pax headers."""
    target = tmp_path / "OUT.tar"
    rc, out, err = run_cli("get", registry_anon.image("basic"), ".", "--tar", str(target))
    assert rc == 0, err
    assert out == "" and sorted(os.listdir(str(tmp_path))) == ["OUT.tar"]
    members, digests = _tar_read(target.read_bytes())
    _assert_tar_matches(members, digests, BASIC_FILES)
    # user and group names as the TOC gives them (EXPECTED has the layer tar's)
    names = {e["name"].strip("/"): (e.get("userName", ""), e.get("groupName", ""))
             for e in basic_toc()["entries"] if e["type"] != "chunk"}
    assert {m.name: (m.uname, m.gname) for m in members} == {p: names[p] for p in BASIC_FILES}
    with_xattrs = {p: e["xattrs"] for p, e in BASIC_FILES.items() if e.get("xattrs")}
    assert with_xattrs, "basic has entries with xattrs"
    for m in members:
        got = {k[len("SCHILY.xattr."):]: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
        assert got == with_xattrs.get(m.name, {}), m.name


@pytest.mark.parametrize("layout", ["minchunk", "layers"])
def test_tar_stream_in_small_windows_matches_expected(registry_anon, download_env, layout):
    """Windows smaller than a chunk: each unit fetched, checked and written in turn;
    chunks sharing a gzip member, several layers and whiteouts come out as EXPECTED."""
    index = starget.open_image(registry_anon.image(layout))
    job = starget.DownloadJob(index, ".", str(download_env))
    buffer = io.BytesIO()
    starget._TarStream(job, index.client, window=1).write(buffer)
    _assert_tar_matches(*(_tar_read(buffer.getvalue()) + (expected_files(layout, "latest"),)))


@pytest.mark.parametrize("args,layout", [(["--fallback-stream"], PLAIN_GZIP_LAYOUTS[0]), ([], "zstd-layers")])
def test_get_tar_of_spooled_and_zstd_layers(registry_anon, args, layout):
    """A --fallback-stream layer's files come from its spooled tar, a zstd:chunked
    layer's through its decoder: the same archive as EXPECTED either way."""
    if layout in ZSTD_LAYOUTS and ZSTD is None:
        pytest.skip("no zstd decoder (backports.zstd is in the test extra)")
    rc, out, err = run_cli(*(args + ["get", registry_anon.image(layout), ".", "--tar", "-"]), binary=True)
    assert rc == 0, err
    _assert_tar_matches(*(_tar_read(out) + (expected_files(layout, "latest"),)))


def test_tar_stream_coalesces_small_files(registry_anon, download_env):
    """Many small files cost a few ranges, not one request each (as get plans them)."""
    index = starget.open_image(registry_anon.image("basic"))
    stats = index.client.transport.stats
    before = stats.requests
    starget._TarStream(starget.DownloadJob(index, ".", str(download_env)), index.client).write(io.BytesIO())
    regular = [p for p, e in BASIC_FILES.items() if e["type"] == "reg"]
    assert stats.requests - before < len(regular) // 2


def test_get_tar_with_blob_and_usage(registry_anon, tmp_path):
    """--tar takes get's selection (BLOB: that layer's own entries); OUTPUT_DIR with it is a usage error."""
    first = expected_ref("layers", "latest")["layers"][0]
    rc, out, err = run_cli("get", registry_anon.image("layers"), first["digest"], ".", "--tar", "-", binary=True)
    assert rc == 0, err
    members, _ = _tar_read(out)
    assert sorted(m.name for m in members) == sorted(e["path"] for e in first["entries"] if e["path"])
    rc, out, err = run_cli("get", registry_anon.image("basic"), "etc/", str(tmp_path / "o"), "--tar", "-")
    assert_one_line_error(rc, err, 2)
    assert out == "" and not os.path.exists(str(tmp_path / "o"))


@pytest.mark.parametrize("case", ["chunk-digest", "whole-file-digest", "no-chunk-digests"])
def test_get_tar_digest_mismatch_leaves_no_complete_archive(httpserver, tmp_path, case):
    """A forged digest: exit 8 with one error line; on stdout the archive stops (no
    end-of-archive: tarfile fails reading it, tar reports it truncated); a FILE target
    leaves neither FILE nor FILE.partial."""
    blob, toc_json = forge_basic(_forge_big_digest(case))
    reg, image = _serve(httpserver, blob, toc_json)
    rc, out, err = run_cli("get", image, ".", "--tar", "-", binary=True)
    assert_one_line_error(rc, err, 8)
    assert BIG in err
    assert not out.endswith(b"\0" * 1024)
    import tarfile
    with pytest.raises(tarfile.ReadError):
        _tar_read(out)
    if shutil.which("tar"):
        listing = subprocess.run(["tar", "-tf", "-"], input=out, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert listing.returncode != 0
    target = tmp_path / "OUT.tar"
    rc, _, err = run_cli("get", image, ".", "--tar", str(target))
    assert_one_line_error(rc, err, 8)
    assert os.listdir(str(tmp_path)) == []


def test_get_tar_creates_no_device_nodes(registry_anon, tmp_path):
    """Devices and FIFOs are archive members only: nothing but the archive is written,
    whoever runs it (no --devices, no root needed)."""
    target = tmp_path / "dev.tar"
    rc, _, err = run_cli("get", registry_anon.image("basic"), "dev/", "--tar", str(target), cwd=str(tmp_path))
    assert rc == 0, err
    assert os.listdir(str(tmp_path)) == ["dev.tar"]
    members, _ = _tar_read(target.read_bytes())
    assert sorted(m.name for m in members) == under("dev")
    assert {m.name: m.type for m in members if not m.isdir()} == {
        "dev/initctl": b"6", "dev/loop0": b"4", "dev/null": b"3"}

# =============================================================================
# cli
# =============================================================================

# ---- cli: end to end --------------------------------------------------------

@pytest.mark.parametrize("layout,ref,platform", READABLE, ids=READABLE_IDS)
def test_e2e_ls_json_matches_expected(registry_anon, layout, ref, platform):
    files = expected_files(layout, ref, platform)
    manifest = expected_ref(layout, ref, platform)
    data = _ls_json(*(_plat_args(platform) + ["ls", "--json", registry_anon.image(layout, ref)]))
    assert project_ls(data) == expected_ls(files)
    for e in data:
        want = files[e["path"]]
        assert e["blob"] == manifest["layers"][want["layer"]]["digest"], e["path"]
        assert (e["uid"], e["gid"], e["mtime"]) == (want["uid"], want["gid"], want["mtime"]), e["path"]
        base = e["path"].rsplit("/", 1)[-1]
        assert not base.startswith(".wh.") and base not in (".prefetch.landmark", ".no.prefetch.landmark")


@pytest.mark.parametrize("layout,ref,platform", READABLE, ids=READABLE_IDS)
def test_e2e_get_everything_byte_for_byte(registry_anon, ws, layout, ref, platform):
    files = expected_files(layout, ref, platform)
    rc, out, err = run_cli(*(_plat_args(platform) + ["get", registry_anon.image(layout, ref), ".", ws.out]))
    assert rc == 0, err
    diffs = compare_tree(files, ws.tree())
    assert diffs == [], "\n".join(diffs)
    ws.assert_nothing_outside()


def test_e2e_multiarch_platforms_differ(registry_anon, ws):
    r = expected_fixture("multiarch")["refs"]["latest"]["manifests"]
    got = {}
    for plat in sorted(r):
        rc, out, err = run_cli("--platform", plat, "cat", registry_anon.image("multiarch"), "etc/arch", binary=True)
        assert rc == 0, err
        got[plat] = hashlib.sha256(out).hexdigest()
        assert got[plat] == r[plat]["files"]["etc/arch"]["sha256"]
    assert len(set(got.values())) == len(got)


def test_e2e_multiarch_default_platform_is_host(registry_anon):
    import platform as _platform
    host = {"x86_64": "linux/amd64", "amd64": "linux/amd64",
            "aarch64": "linux/arm64/v8", "arm64": "linux/arm64/v8"}.get(_platform.machine().lower())
    r = expected_fixture("multiarch")["refs"]["latest"]["manifests"]
    if host not in r or not sys.platform.startswith("linux"):
        pytest.skip("no multiarch fixture entry for this host (%s)" % _platform.machine())
    rc, out, err = run_cli("cat", registry_anon.image("multiarch"), "etc/arch", binary=True)
    assert rc == 0, err
    assert hashlib.sha256(out).hexdigest() == r[host]["files"]["etc/arch"]["sha256"]


def test_e2e_concurrency_one(registry_anon, ws):
    rc, out, err = run_cli("--concurrency", "1", "--no-progress", "get", registry_anon.image("minchunk"), ".", ws.out)
    assert rc == 0, err
    assert compare_tree(expected_files("minchunk", "latest"), ws.tree()) == []


@pytest.mark.parametrize("layout", PLAIN_GZIP_LAYOUTS)
def test_e2e_plain_gzip_is_not_estargz(registry_anon, ws, layout):
    rc, out, err = run_cli("get", registry_anon.image(layout, _first_ref(layout)), ".", ws.out)
    line = assert_one_line_error(rc, err, 6)
    assert "estargz" in line.lower().replace("-", "")
    ws.assert_out_empty()


@pytest.mark.skipif(ZSTD is None, reason="no zstd decoder (backports.zstd is in the test extra)")
def test_e2e_mixed_layers_with_fallback(registry_anon, ws):
    """Plain tar+gzip base (read whole with --fallback-stream), an eStargz layer and a
    zstd:chunked layer in one image: the merged tree comes out byte for byte."""
    rc, out, err = run_cli("--fallback-stream", "--no-progress", "get", registry_anon.image("mixed"), ".", ws.out)
    assert rc == 0, err
    assert compare_tree(expected_files("mixed", "latest"), ws.tree()) == []


@pytest.mark.parametrize("layout", ZSTD_LAYOUTS)
def test_e2e_zstd_without_a_decoder_says_what_to_install(registry_anon, ws, layout):
    """No compression.zstd, no backports.zstd: exit 7 with one line naming the fix."""
    block = ("import sys, runpy; sys.modules['compression'] = None; sys.modules['compression.zstd'] = None; "
             "sys.modules['backports'] = None; sys.modules['backports.zstd'] = None; "
             "sys.argv = ['starget'] + sys.argv[1:]; runpy.run_path(%r, run_name='__main__')" % STARGET)
    image = registry_anon.image(layout, _first_ref(layout))
    args = ["get", image, "."] if layout != "mixed" else ["--fallback-stream", "get", image, "."]
    p = subprocess.run([sys.executable, "-c", block] + args + [ws.out], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, env=hermetic_env(), timeout=120)
    line = assert_one_line_error(p.returncode, p.stderr, 7)
    assert "backports.zstd" in line and "3.14" in line
    if layout != "mixed":
        ws.assert_out_empty()


def _format_of(layer):
    kind = (layer.get("footer") or {}).get("kind")
    if layer.get("compression") == "zstd":
        return "zstd:chunked"
    if not layer.get("estargz"):
        return "gzip"
    return {"estargz": "estargz", "legacy-stargz": "legacy-stargz"}[kind]


INFO_VARIANTS = [(lay, ref, plat) for lay, ref, plat, m in ALL_VARIANTS]


@pytest.mark.parametrize("layout,ref,platform", INFO_VARIANTS,
                         ids=["%s:%s%s" % (l, r, "@" + p if p else "") for l, r, p in INFO_VARIANTS])
def test_e2e_info_json(registry_anon, layout, ref, platform):
    m = expected_ref(layout, ref, platform)
    rc, out, err = run_cli(*(_plat_args(platform) + ["info", "--json", registry_anon.image(layout, ref)]))
    assert rc == 0, err
    info = json.loads(out)
    assert info["digest"] == m["digest"]
    assert info["media_type"] == m["media_type"]
    assert "fixtures/" + layout in info["reference"]
    plat = info["platform"]
    want_plat = platform or "%s/%s" % (m["platform"]["os"], m["platform"]["architecture"])
    if platform is None and plat is None:
        pass      # a single manifest: the platform lives in the config; reporting none is allowed
    elif isinstance(plat, dict):
        assert (plat.get("os"), plat.get("architecture")) == (m["platform"]["os"], m["platform"]["architecture"])
    else:
        assert plat == want_plat
    assert len(info["layers"]) == len(m["layers"])
    # EXPECTED's layer media_type is the blob's OCI type even under a Docker schema2
    # manifest (docker-v2): the manifest in the layout is the truth for that field.
    raw = json.loads(blob_bytes(layout, m["digest"]))
    for i, (got, want) in enumerate(zip(info["layers"], m["layers"])):
        assert got["index"] == i
        assert got["digest"] == want["digest"]
        assert got["size"] == want["size"]
        assert got["media_type"] == raw["layers"][i]["mediaType"]
        assert got["format"] == _format_of(want)
        if got["format"] in ("estargz", "legacy-stargz"):
            if want.get("annotations", {}).get(TOC_DIGEST_ANNOTATION) or got["toc_digest"] is not None:
                assert got["toc_digest"] == want["toc_digest"]
            assert got["toc_entries"] == want["toc_entries"]


def test_e2e_info_plain(registry_anon):
    m = expected_ref("layers", "latest")
    rc, out, err = run_cli("info", registry_anon.image("layers"))
    assert rc == 0, err
    assert m["digest"] in out
    for l in m["layers"]:
        assert l["digest"][:19] in out      # (digests may be shortened to 12 hex digits)


MULTIARCH = expected_fixture("multiarch")["refs"]["latest"]


def _index_platforms(layout, digest):
    """`os/arch[/variant]` of each manifest of an index blob, in its order."""
    plats = [m["platform"] for m in json.loads(blob_bytes(layout, digest))["manifests"]]
    return ["/".join([p["os"], p["architecture"]] + ([p["variant"]] if p.get("variant") else [])) for p in plats]


@pytest.mark.parametrize("platform", sorted(MULTIARCH["manifests"]))
def test_e2e_info_of_an_index_shows_it(registry_anon, platform):
    """A multi-platform image: the index, the platforms it offers, then the chosen
    manifest as for a single one."""
    chosen = MULTIARCH["manifests"][platform]
    platforms = _index_platforms("multiarch", MULTIARCH["digest"])
    assert sorted(platforms) == sorted(MULTIARCH["manifests"])
    info = json.loads(run_cli("--platform", platform, "info", "--json", registry_anon.image("multiarch"))[1])
    assert info["index"] == {"digest": MULTIARCH["digest"], "media_type": MULTIARCH["media_type"],
                             "platforms": platforms}
    assert (info["digest"], info["platform"]) == (chosen["digest"], platform)
    rc, out, err = run_cli("--platform", platform, "info", registry_anon.image("multiarch"))
    assert (rc, err) == (0, ""), err
    head = [line.split(None, 1) for line in out.splitlines()[:7]]
    assert head == [["image:", info["reference"]], ["index:", MULTIARCH["digest"]],
                    ["index", "type:  " + MULTIARCH["media_type"]], ["platforms:", ", ".join(platforms)],
                    ["digest:", chosen["digest"]], ["type:", chosen["media_type"]], ["platform:", platform]], out


def test_e2e_info_of_a_single_manifest_has_no_index(registry_anon):
    m = expected_ref("basic", "latest")
    info = json.loads(run_cli("info", "--json", registry_anon.image("basic"))[1])
    assert info["index"] is None and info["digest"] == m["digest"]
    rc, out, err = run_cli("info", registry_anon.image("basic"))
    assert rc == 0, err
    assert out.startswith("image:     %s\ndigest:    %s\n" % (info["reference"], m["digest"])), out
    assert "index" not in out and "platforms:" not in out


def test_e2e_ls_plain_and_long(registry_anon):
    files = expected_files("basic", "latest")
    rc, out, err = run_cli("ls", registry_anon.image("basic"))
    assert rc == 0, err
    assert out.splitlines() == sorted(files)
    rc, out, err = run_cli("ls", "-l", registry_anon.image("basic"))
    assert rc == 0, err
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == len(files)
    for path, line in zip(sorted(files), lines):
        assert path in line


@pytest.mark.parametrize("short", [False, True])
def test_e2e_ls_blob_restriction(registry_anon, short):
    layers = expected_ref("layers", "latest")["layers"]
    for i, layer in enumerate(layers):
        blob = layer["digest"][:19] if short else layer["digest"]
        data = _ls_json("ls", "--json", registry_anon.image("layers"), blob)
        paths = {e["path"] for e in data}
        want = {e["path"] for e in layer["entries"] if e["path"]
                and not e["path"].rsplit("/", 1)[-1].startswith(".wh.")}
        assert {p for p in paths if not p.rsplit("/", 1)[-1].startswith(".wh.")} == want
        assert all(e["layer"] == i and e["blob"] == layer["digest"] for e in data)


def _below(files, *tops):
    """The paths of `files` that are one of `tops` or under one of them, sorted."""
    return sorted(p for p in files if any(p == t or p.startswith(t + "/") for t in tops))


# PATH -> what it selects in `basic`, as `get` would: (directories, other entries)
LS_PATHS = [("etc/", ["etc"], []), ("etc", ["etc"], []), ("etc/os-release", [], ["etc/os-release"]),
            ("/bin/sh", [], ["bin/sh"]), ("lib", [], ["lib"]), ("lib/", ["usr/lib"], ["lib"]),
            ("lib/libfoo.so", [], ["lib", "usr/lib/libfoo.so"])]


@pytest.mark.parametrize("pattern,dirs,others", LS_PATHS, ids=[p for p, _, _ in LS_PATHS])
def test_e2e_ls_path_selects_like_get(registry_anon, pattern, dirs, others):
    """`ls IMAGE PATH` lists what `get IMAGE PATH` would write, in path order, in
    every form; `etc/` used to be taken for a layer digest."""
    files = expected_files("basic", "latest")
    want = sorted(set(_below(files, *dirs)) | set(others))
    image = registry_anon.image("basic")
    rc, out, err = run_cli("ls", image, pattern)
    assert (rc, err) == (0, "") and out.splitlines() == want, (rc, err, out)
    rc, out, err = run_cli("ls", image, "-l", pattern)          # a flag between IMAGE and PATH
    assert rc == 0, err
    assert [re.match(r".* \d\d:\d\d (.+?)(?: -> .*)?$", line).group(1) for line in out.splitlines()] == want
    data = _ls_json("ls", "--json", image, pattern)
    assert project_ls(data) == expected_ls({p: files[p] for p in want})
    sizes = {d["path"]: (d["bytes"], d["files"]) for d in _ls_json("ls", "--sizes", "--json", image, pattern)}
    regs = [p for p in want if files[p]["type"] == "reg"]
    assert sizes[""] == (sum(files[p]["size"] for p in regs), len(regs))
    assert set(sizes) - {""} == {p for p in want if files[p]["type"] == "dir"} | {
        "/".join(p.split("/")[:n]) for p in regs for n in range(1, p.count("/") + 1)}


def test_e2e_ls_blob_and_path(registry_anon):
    layer = expected_ref("basic", "latest")["layers"][0]
    files = expected_files("basic", "latest")
    for blob in (layer["digest"], layer["digest"][:15]):
        rc, out, err = run_cli("ls", registry_anon.image("basic"), blob, "bin/")
        assert (rc, err) == (0, ""), err
        assert out.splitlines() == _below(files, "bin")
    data = _ls_json("ls", "--json", registry_anon.image("basic"), layer["digest"][:15])   # BLOB alone
    assert [e["path"] for e in data] == sorted(files)


@pytest.mark.parametrize("args", [["IMG", "no/such"], ["IMG", "etc/os-release/"], ["IMG", "sha256:9a", "nope"]])
def test_e2e_ls_path_not_found(registry_anon, args):
    rc, out, err = run_cli("ls", *[registry_anon.image("basic") if a == "IMG" else a for a in args])
    assert_one_line_error(rc, err, 3)
    assert out == ""


def test_e2e_ls_too_many_words(registry_anon):
    rc, out, err = run_cli("ls", registry_anon.image("basic"), "etc/", "bin/")
    assert "ls --help" in assert_one_line_error(rc, err, 2)


def test_e2e_global_flags_after_command(registry_anon):
    plat = "linux/arm64/v8"
    files = expected_files("multiarch", "latest", plat)
    data = _ls_json("ls", "--json", registry_anon.image("multiarch"), "--platform", plat, "--no-progress")
    assert project_ls(data) == expected_ls(files)


def test_e2e_version():
    rc, out, err = run_cli("--version")
    assert rc == 0
    assert starget.__version__ in out + err


def test_broken_pipe_keeps_sys_stdout(capsys):
    """The reader of the output went away: exit 0 quietly; sys.stdout is not rebound."""
    class Gone(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    stdout = sys.stdout
    assert starget.main(["completion", "bash"], out=Gone()) == 0
    assert sys.stdout is stdout
    assert starget.main(["completion", "bash"]) == 0 and sys.stdout is stdout
    assert "complete -F _starget starget" in capsys.readouterr().out


def test_broken_pipe_on_the_process_stdout_exits_0():
    """`starget ... | head`: no traceback, no 'Exception ignored' at exit, exit 0."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, STARGET, "completion", "bash"], stdout=write_end,
                              stderr=subprocess.PIPE, env=hermetic_env(None), timeout=60)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (0, b"")


def _run_with_stdout(args, stdout, preexec_fn=None):
    proc = subprocess.run([sys.executable, STARGET] + args, stdout=stdout, stderr=subprocess.PIPE,
                          env=hermetic_env(None), timeout=120, preexec_fn=preexec_fn)
    return proc.returncode, proc.stderr.decode("utf-8", "replace")


@pytest.mark.parametrize("command", ["completion", "ls"])
def test_stdout_full_is_a_local_io_error(registry_anon, command):
    """`starget ls IMAGE > /dev/full`: exit 10, one line naming standard output."""
    args = ["completion", "bash"] if command == "completion" else ["ls", registry_anon.image("basic")]
    with open("/dev/full", "w") as full:
        rc, err = _run_with_stdout(args, full)
    line = assert_one_line_error(rc, err, 10)
    assert "cannot write to standard output" in line


@pytest.mark.parametrize("command", ["completion", "ls"])
def test_stdout_closed_is_a_local_io_error(registry_anon, command):
    """`starget ls IMAGE >&-` (sys.stdout is None): exit 10, not an AttributeError."""
    args = ["completion", "bash"] if command == "completion" else ["ls", registry_anon.image("basic")]
    rc, err = _run_with_stdout(args, None, preexec_fn=lambda: os.close(1))
    line = assert_one_line_error(rc, err, 10)
    assert "cannot write to standard output" in line


@pytest.mark.parametrize("args", [[], ["frobnicate", "x"], ["get"], ["ls", "--concurrency", "abc", "x/y"],
                                  ["--credential", "nocolon", "ls", "127.0.0.1:1/x/y"],
                                  ["--platform", "linux", "ls", "127.0.0.1:1/x/y"]])
def test_e2e_usage_errors(args):
    rc, out, err = run_cli(*args)
    assert rc == 2, (rc, err)
    assert "Traceback" not in err


@pytest.mark.parametrize("args,named,suggested", [
    (["--platfrom", "linux/arm64", "ls", "127.0.0.1:1/x/y"], "--platfrom", "--platform"),
    (["ls", "--jsn", "127.0.0.1:1/x/y"], "--jsn", "--json"),
    (["ls", "--js", "127.0.0.1:1/x/y"], "--js", "--json"),          # no abbreviations
    (["--no-cach", "ls", "127.0.0.1:1/x/y"], "--no-cach", "--no-cache"),
    (["lss", "127.0.0.1:1/x/y"], "'lss'", "ls"),
    (["help", "gett"], "'gett'", "get"),
])
def test_typos_are_named_with_a_suggestion(args, named, suggested):
    """The misspelt word is named, with what was probably meant, in one line; no
    usage block, and the hidden command is never listed."""
    rc, out, err = run_cli(*args)
    line = assert_one_line_error(rc, err, 2)
    assert named in line and "did you mean %s" % suggested in line, line
    assert "__complete" not in err + out and "usage:" not in err


def test_unknown_command_lists_the_public_ones():
    rc, out, err = run_cli("frobnicate", "x")
    line = assert_one_line_error(rc, err, 2)
    assert "'frobnicate'" in line and "info, ls, get, cat" in line and "__complete" not in line


def test_help_never_lists_the_hidden_command():
    rc, out, err = run_cli("--help")
    assert rc == 0 and "__complete" not in out


@pytest.mark.parametrize("command,grammar", [("get", "IMAGE [BLOB] PATH [OUTPUT_DIR]"),
                                             ("cat", "IMAGE [BLOB] PATH"), ("ls", "IMAGE [BLOB] [PATH]")])
def test_command_help_tells_the_grammar(command, grammar):
    """argparse's nargs usage (`[[BLOB] PATH ...]`) is not what the commands accept."""
    rc, out, err = run_cli(command, "--help")
    assert rc == 0, err
    assert out.startswith("usage: starget %s [flags] %s\n" % (command, grammar)), out
    assert "[[BLOB]" not in out and "..." not in out.split("\n\n")[0]
    assert "dir/ or dir" in out and "sha256:" in out and out.count("  starget %s " % command) == 2
    if command == "get":
        assert "default: ." in out


@pytest.mark.parametrize("args", [["get", "IMG", "", "OUT"], ["get", "IMG", ""], ["cat", "IMG", ""],
                                  ["cat", "IMG", "sha256:abc", ""], ["ls", "IMG", ""],
                                  ["ls", "IMG", "sha256:abc", ""]])
def test_empty_path_is_a_usage_error(registry_anon, ws, args):
    """`get IMAGE "$UNSET" OUT` must not download the whole image."""
    args = [registry_anon.image("basic") if a == "IMG" else ws.out if a == "OUT" else a for a in args]
    rc, out, err = run_cli(*args, cwd=ws.out)
    line = assert_one_line_error(rc, err, 2)
    assert "empty PATH: use . or / for the whole image" in line
    ws.assert_out_empty()


def test_get_into_an_existing_file_says_use_cat(registry_anon, tmp_path):
    """`get IMAGE FILE afile` used to fail late with `cannot create afile: File exists`."""
    afile = tmp_path / "afile"
    afile.write_bytes(b"keep")
    rc, out, err = run_cli("-d", "get", registry_anon.image("basic"), "etc/os-release", "afile", cwd=str(tmp_path))
    line = assert_one_line_error(rc, err, 2)
    assert line == ("starget: error: OUTPUT_DIR afile is not a directory "
                    "(to write one file elsewhere: starget cat IMAGE PATH > FILE)"), line
    assert "> GET" not in err            # refused before anything is fetched
    assert afile.read_bytes() == b"keep" and sorted(os.listdir(str(tmp_path))) == ["afile"]


def test_verbose_summary_says_1_file(registry_anon, ws):
    rc, out, err = run_cli("-v", "--no-progress", "get", registry_anon.image("basic"), "etc/os-release", ws.out)
    assert rc == 0, err
    assert "info: 1 file, " in err and "1 files" not in err, err


def test_help_and_version_commands():
    rc, out, err = run_cli("help", "get")
    assert (rc, err) == (0, "") and out.startswith("usage: starget get")
    rc, top, err = run_cli("help")
    assert rc == 0 and top == run_cli("--help")[1]
    rc, out, err = run_cli("version")
    assert (rc, out, err) == (0, "starget %s\n" % starget.__version__, "")


@pytest.mark.parametrize("flag", ["--timeout", "--connect-timeout"])
@pytest.mark.parametrize("value", ["-1", "0", "nan"])
def test_e2e_timeouts_must_be_positive(flag, value):
    """A timeout of 0 (a non-blocking socket), a negative one or NaN is a usage error:
    exit 2, one error line naming the flag, before any connection is tried."""
    rc, out, err = run_cli(flag, value, "--retries", "0", "ls", "127.0.0.1:1/x/y", timeout=60)
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and flag in errors[0], err
    assert len([line for line in err.splitlines() if line.startswith("usage:")]) <= 1, err


def test_e2e_unknown_path(registry_anon, ws):
    rc, out, err = run_cli("get", registry_anon.image("basic"), "no/such/path-" + uuid.uuid4().hex[:6], ws.out)
    assert_one_line_error(rc, err, 3)
    ws.assert_out_empty()
    ws.assert_nothing_outside()


def test_e2e_cache_is_used_and_harmless(registry_anon, tmp_path):
    cache = str(tmp_path / "cache")
    env = {"STARGET_CACHE_DIR": cache}
    d1 = _ls_json("ls", "--json", registry_anon.image("prefetch", "prefetch"), env=env)
    assert os.path.isdir(cache) and any(files for _, _, files in os.walk(cache)), "no TOC cached"
    d2 = _ls_json("ls", "--json", registry_anon.image("prefetch", "prefetch"), env=env)
    assert d1 == d2
    d3 = _ls_json("--no-cache", "ls", "--json", registry_anon.image("prefetch", "prefetch"), env=env)
    assert d3 == d1


# ---- cli: output and commands -----------------------------------------------

@pytest.mark.parametrize("kind, mode, shown", [
    ("reg", 0o644, "-rw-r--r--"), ("dir", 0o755, "drwxr-xr-x"), ("symlink", 0o777, "lrwxrwxrwx"),
    ("hardlink", 0o600, "hrw-------"), ("char", 0o666, "crw-rw-rw-"), ("block", 0o660, "brw-rw----"),
    ("fifo", 0o644, "prw-r--r--"), ("reg", 0o4755, "-rwsr-xr-x"), ("reg", 0o2644, "-rw-r-Sr--"),
    ("dir", 0o1777, "drwxrwxrwt"), ("dir", 0o1776, "drwxrwxrwT"), ("reg", 0, "----------"),
])
def test_ls_long_mode_column(kind, mode, shown):
    assert starget._mode_string(starget.TOCEntry("x", kind, link="y", size=0, mode=mode)) == shown


@pytest.mark.parametrize("path,target", [
    ("bin/busybox", "bin/busybox"),
    ("bin/ash", "bin/busybox"),              # hardlink
    ("bin/sh", "bin/busybox"),               # relative symlink
    ("/bin/ls", "bin/busybox"),              # absolute symlink, leading /
    ("lib/libfoo.so", "usr/lib/libfoo.so.1"),  # symlinked directory + symlink
    ("data/big.bin", "data/big.bin"),
])
def test_cat_binary_and_symlinks(registry_anon, path, target):
    files = expected_files("basic", "latest")
    rc, out, err = run_cli("cat", registry_anon.image("basic"), path, binary=True)
    assert rc == 0, err
    assert len(out) == files[target]["size"]
    assert hashlib.sha256(out).hexdigest() == files[target]["sha256"]


def test_cat_dangling_symlink_not_found(registry_anon):
    rc, out, err = run_cli("cat", registry_anon.image("basic"), "bin/dangling", binary=True)
    line = assert_one_line_error(rc, err, 3)
    assert line == "starget: error: dangling symlink: bin/dangling -> ../nonexistent/target", line
    assert out == b""
    rc, out, err = run_cli("cat", registry_anon.image("basic"), "lib/nosuchfile", binary=True)
    line = assert_one_line_error(rc, err, 3)        # lib is a good link: the file is what is missing
    assert line == "starget: error: no such file in the image: lib/nosuchfile", line


@pytest.mark.parametrize("path,dangling", [
    ("a", "b"), ("b", "b"), ("abs", "b"), ("dir/up", "b"), ("good", None), ("gone", None),
    ("dir/none", None), ("viadir", "b"), ("toroot", None), ("ldir", None), ("viald", "viald")])
def test_dangling_link_names_the_link_whose_target_is_missing(path, dangling):
    """a -> b -> missing: b dangles, not a; a missing file behind good links dangles nothing."""
    links = {"a": "b", "b": "missing/x", "abs": "/b", "dir/up": "../b", "good": "dir/file",
             "viadir": "dir/up", "toroot": "/", "ldir": "dir", "viald": "ldir/x"}
    entries = [starget.TOCEntry("dir", "dir"), starget.TOCEntry("dir/file", "reg", size=0)]
    entries += [starget.TOCEntry(name, "symlink", link=target) for name, target in sorted(links.items())]
    view = starget.ImageIndex([starget.LayerTOC(entries, blob="sha256:" + "0" * 64, layer=0)]).view()
    link = starget._dangling_link(view, path)
    assert (link.path if link else None) == dangling


@pytest.mark.parametrize("command,args,hint", [("cat", ["etc/os-release"], False), ("ls", [], False),
                                               ("info", [], False), ("get", ["etc/", "out"], True)])
def test_ctrl_c_offers_to_resume_only_a_get(api_env, monkeypatch, capsys, command, args, hint):
    """Ctrl-C exits 130; only get has partial files for a re-run to resume."""
    def interrupted(session, out):
        raise KeyboardInterrupt
    monkeypatch.setitem(starget._COMMANDS, command, interrupted)
    assert starget.main([command, "127.0.0.1:1/x/y"] + args) == 130
    err = capsys.readouterr().err
    assert "starget: interrupted" in err and ("resume" in err) == hint, err


def test_cat_with_blob(registry_anon):
    m = expected_ref("basic", "latest")
    rc, out, err = run_cli("cat", registry_anon.image("basic"), m["layers"][0]["digest"][:15], "bin/busybox",
                           binary=True)
    assert rc == 0, err
    assert hashlib.sha256(out).hexdigest() == BUSYBOX_SHA


def _run_cli_unprivileged(*args):
    """run_cli, but as an ordinary user: as root, under `nobody` through setpriv or
    runuser (skips when neither can run Python there). Returns (rc, stdout bytes, stderr)."""
    if not IS_ROOT:
        return run_cli(*args, binary=True)
    import pwd
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("running as root and there is no user `nobody` to run the CLI as")
    if shutil.which("setpriv"):
        prefix = [shutil.which("setpriv"), "--reuid=%d" % nobody.pw_uid, "--regid=%d" % nobody.pw_gid,
                  "--clear-groups"]
    elif shutil.which("runuser"):
        prefix = [shutil.which("runuser"), "-u", "nobody", "--"]
    else:
        pytest.skip("running as root, and neither setpriv nor runuser is there to drop privileges")
    base = tempfile.mkdtemp(prefix="starget-nobody-")
    try:
        os.chmod(base, 0o755)
        home = os.path.join(base, "home")
        os.makedirs(home)
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        env = hermetic_env({"HOME": home, "STARGET_CACHE_DIR": os.path.join(home, "cache"), "TMPDIR": home})
        probe = subprocess.run(prefix + [sys.executable, "-c", "open(%r).close()" % STARGET], env=env, cwd=home,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        if probe.returncode != 0:
            pytest.skip("running as root, and `nobody` cannot run %s on %s: %s"
                        % (sys.executable, STARGET, probe.stderr.decode("utf-8", "replace").strip()))
        proc = subprocess.run(prefix + [sys.executable, STARGET] + [str(a) for a in args], env=env, cwd=home,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        return proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_cat_of_a_file_of_mode_0000(httpserver):
    """`cat` of a file whose mode in the image is 0000 streams its bytes: starget's own
    scratch copy must stay readable to it (meaningful as a non-root user only, so as
    root the command runs as `nobody`)."""
    blob, toc_json = forge_basic(lambda toc: _toc_entry(toc, TARGET_FILE).update(mode=0))
    reg, image = _serve(httpserver, blob, toc_json)
    rc, out, err = _run_cli_unprivileged("--no-progress", "cat", image, TARGET_FILE)
    assert rc == 0, err
    assert out == file_bytes(TARGET_FILE)


def _expected_sizes(files):
    """{dir: (bytes, files)} as du would count them (a hardlink counts once)."""
    totals = {"": [0, 0]}
    for p, e in files.items():
        if e["type"] == "dir":
            totals.setdefault(p, [0, 0])
    seen = set()
    for p in sorted(files):
        e = files[p]
        if e["type"] not in ("reg", "hardlink"):
            continue
        ident = e["link"] if e["type"] == "hardlink" else p
        if ident in seen:
            continue
        seen.add(ident)
        parts = p.split("/")[:-1]
        for n in range(len(parts) + 1):
            t = totals.setdefault("/".join(parts[:n]), [0, 0])
            t[0] += e["size"]
            t[1] += 1
    return {k: tuple(v) for k, v in totals.items()}


SIZE_IMAGES = [("basic", "latest"), ("minchunk", "latest"), ("layers", "latest")]


@pytest.mark.parametrize("layout,ref", SIZE_IMAGES)
def test_ls_sizes_json(registry_anon, layout, ref):
    rc, out, err = run_cli("ls", "--sizes", "--json", registry_anon.image(layout, ref))
    assert rc == 0, err
    data = json.loads(out)
    assert [d["path"] for d in data] == sorted(d["path"] for d in data)
    got = {d["path"]: (d["bytes"], d["files"]) for d in data}
    assert got == _expected_sizes(expected_files(layout, ref))


def test_ls_sizes_hardlink_counts_once(registry_anon):
    files = expected_files("basic", "latest")
    rc, out, err = run_cli("ls", "--sizes", "--json", registry_anon.image("basic"))
    got = {d["path"]: (d["bytes"], d["files"]) for d in json.loads(out)}
    bin_regs = [p for p in files if p.startswith("bin/") and files[p]["type"] == "reg"]
    assert got["bin"] == (sum(files[p]["size"] for p in bin_regs), len(bin_regs))


@pytest.mark.parametrize("layout,ref", SIZE_IMAGES[:2])
def test_ls_sizes_plain(registry_anon, layout, ref):
    rc, out, err = run_cli("ls", "--sizes", registry_anon.image(layout, ref))
    assert rc == 0, err
    got = {}
    for line in out.splitlines():
        m = re.match(r"^\s*(\d+)\s+(\d+)  (.+)$", line)
        assert m, "bad --sizes line %r" % line
        got["" if m.group(3) == "." else m.group(3)] = (int(m.group(1)), int(m.group(2)))
    assert got == _expected_sizes(expected_files(layout, ref))


def test_version_flag():
    rc, out, err = run_cli("--version")
    assert rc == 0, err
    assert out.strip() == "starget " + starget.__version__


@pytest.mark.parametrize("how", ["cwd", "pythonpath"])
def test_python_m_starget_version(tmp_path, how):
    env = hermetic_env({"PYTHONPATH": REPO} if how == "pythonpath" else {"PYTHONPATH": None})
    cwd = REPO if how == "cwd" else str(tmp_path)
    p = subprocess.run([sys.executable, "-m", "starget", "--version"], env=env, cwd=cwd,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "starget " + starget.__version__


ANSI = re.compile(r"\x1b[\[\]()#;?]*[0-9;]*[A-Za-z@-~]?")


@pytest.mark.parametrize("no_color", [True, False])
def test_no_ansi_escapes_without_tty(registry_anon, tmp_path, no_color):
    env = {"NO_COLOR": "1"} if no_color else {"NO_COLOR": None, "TERM": "xterm-256color"}
    image = registry_anon.image("basic")
    runs = [
        run_cli("ls", "-l", image, env=env),
        run_cli("info", image, env=env),
        run_cli("-v", "get", image, "etc", str(tmp_path / "out"), env=env),
        run_cli("ls", image, "no/such", env=env),
        run_cli("get", image, "no/such", str(tmp_path / "out2"), env=env),
    ]
    for rc, out, err in runs:
        assert "\x1b" not in out and "\x1b" not in err, (out, err)
    assert runs[0][0] == 0 and runs[2][0] == 0


def test_no_ansi_escapes_on_tty_with_no_color(registry_anon, tmp_path):
    """NO_COLOR=1 with stderr on a terminal: the progress bar may use \\r, never ESC."""
    import pty
    master, slave = pty.openpty()
    env = hermetic_env({"NO_COLOR": "1", "TERM": "xterm-256color"})
    chunks = []

    def reader():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        p = subprocess.run([sys.executable, STARGET, "get", registry_anon.image("basic"), "data",
                            str(tmp_path / "out")], env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                           stderr=slave, timeout=120)
    finally:
        os.close(slave)
        t.join(10)
        os.close(master)
    text = b"".join(chunks)
    assert p.returncode == 0, text
    assert b"\x1b" not in text and b"\x1b" not in p.stdout, text[:500]


# ---- cli: globs and --exclude -------------------------------------------------

def _ref_glob_matches(pattern, path):
    """Reference matcher, independent of starget's regexes: fnmatch on each component,
    `**` tried over every split."""
    import fnmatch
    want = [c for c in pattern.split("/") if c not in ("", ".")]
    have = path.split("/")

    def match(i, j):
        if i == len(want):
            return j == len(have)
        if want[i] == "**":
            if i == len(want) - 1:
                return j < len(have)
            return any(match(i + 1, k) for k in range(j, len(have) + 1))
        return j < len(have) and fnmatch.fnmatchcase(have[j], want[i]) and match(i + 1, j + 1)
    return match(0, 0)


def _ref_glob_select(files, pattern, exclude=()):
    """EXPECTED paths a glob selects: a match or a path below one, less the excluded."""
    def hit(glob, path):
        parts = path.split("/")
        for n in range(1, len(parts) + 1):
            above = "/".join(parts[:n])
            if _ref_glob_matches(glob, above) and (n < len(parts) or not glob.endswith("/")
                                                   or files[path]["type"] == "dir"):
                return True
        return False
    return sorted(p for p in files if p and hit(pattern, p) and not any(hit(x, p) for x in exclude))


@pytest.mark.parametrize("pattern,exclude", [
    ("etc/*", ()), ("etc/*.conf", ()), ("**/*.txt", ()), ("usr/**/*.so*", ()), ("[a-c]*/", ()),
    ("bin/?s*", ()), ("**/e", ()), ("*", ("dev", "**/*.txt", "bin/*")), ("data/exact-?chunk*", ()),
])
def test_e2e_ls_glob_matches_a_reference_matcher(registry_anon, pattern, exclude):
    files = expected_files("basic", "latest")
    want = _ref_glob_select(files, pattern, exclude)
    assert want, "the case selects nothing in basic: %s" % pattern
    args = [a for x in exclude for a in ("--exclude", x)]
    rc, out, err = run_cli("ls", registry_anon.image("basic"), pattern, *args)
    assert rc == 0, err
    assert out.splitlines() == want


def test_e2e_get_glob_byte_for_byte(registry_anon, ws, tmp_path):
    files = expected_files("basic", "latest")
    want = _ref_glob_select(files, "**/*.txt")
    rc, out, err = run_cli("-d", "--no-progress", "get", registry_anon.image("basic"), "**/*.txt", ws.out)
    assert rc == 0, err
    tree = ws.tree()
    assert {p: t["sha256"] for p, t in tree.items() if t["type"] != "dir"} == {p: files[p]["sha256"] for p in want}
    assert all(any(w.startswith(p + "/") for w in want) for p, t in tree.items() if t["type"] == "dir")
    ws.assert_nothing_outside()
    # the same files as a get of each matched path
    one_by_one = str(tmp_path / "each")
    for path in want:
        rc, _, err = run_cli("--no-progress", "get", registry_anon.image("basic"), path, one_by_one)
        assert rc == 0, err
    strip = lambda t: {p: (i["type"], i["mode"], i["sha256"]) for p, i in t.items()}
    assert strip(tree) == strip(walk_tree(one_by_one))


def test_e2e_get_exclude_drops_a_subtree(registry_anon, ws):
    files = expected_files("basic", "latest")
    rc, out, err = run_cli("--no-progress", "get", registry_anon.image("basic"), ".", ws.out,
                           "--exclude", "a/b", "--exclude", "**/*.bin", "--exclude", "dev/")
    assert rc == 0, err
    kept = {p: e for p, e in files.items() if p not in _ref_glob_select(files, "a/b") and
            not p.endswith(".bin") and not (p == "dev" or p.startswith("dev/"))}
    assert "a" in kept and "a/b" not in kept and "data/compressible.txt" in kept
    assert compare_tree(kept, ws.tree()) == []


def test_e2e_glob_without_a_match_is_not_found(registry_anon, ws):
    for command in (["ls"], ["get"], ["cat"]):
        extra = [ws.out] if command == ["get"] else []
        rc, out, err = run_cli(*(command + [registry_anon.image("basic"), "etc/*.nothing"] + extra))
        line = assert_one_line_error(rc, err, 3)
        assert "no match" in line and "etc/*.nothing" in line
    ws.assert_out_empty()


def test_e2e_cat_glob_needs_exactly_one_file(registry_anon):
    files = expected_files("basic", "latest")
    rc, out, err = run_cli("cat", registry_anon.image("basic"), "etc/os-rel*", binary=True)
    assert rc == 0, err
    assert hashlib.sha256(out).hexdigest() == files["etc/os-release"]["sha256"]
    rc, out, err = run_cli("cat", registry_anon.image("basic"), "etc/*.conf", binary=True)
    line = assert_one_line_error(rc, err, 2)
    assert "matches 2 entries" in line and out == b""
    rc, out, err = run_cli("cat", registry_anon.image("basic"), "etc/*.conf", "--exclude", "etc/x*", binary=True)
    assert rc == 0 and hashlib.sha256(out).hexdigest() == files["etc/empty.conf"]["sha256"], err


def test_e2e_a_name_with_brackets_is_still_a_plain_path(registry_anon):
    name = "docs/weird (1) [x] & co #%+=@!.txt"
    rc, out, err = run_cli("cat", registry_anon.image("basic"), name, binary=True)
    assert rc == 0, err
    assert hashlib.sha256(out).hexdigest() == expected_files("basic", "latest")[name]["sha256"]
    rc, out, err = run_cli("ls", registry_anon.image("basic"), name)
    assert (rc, out) == (0, name + "\n"), err


def test_empty_exclude_is_a_usage_error(registry_anon):
    rc, out, err = run_cli("ls", registry_anon.image("basic"), "--exclude", "")
    line = assert_one_line_error(rc, err, 2)
    assert "empty --exclude" in line


# ---- cli: diff ----------------------------------------------------------------

_DIFF_CONTENT = ("type", "size", "digest", "link")
_DIFF_FIELDS = _DIFF_CONTENT + ("mode", "uid", "gid", "xattrs")


def _expected_diff(a, b, prefix=None):
    """`diff` lines computed from two EXPECTED `files` maps (optionally only `prefix` and below)."""
    def fields(e):
        content = e["type"] in ("reg", "hardlink")
        return {"type": e["type"], "size": e.get("size", 0) if content else 0,
                "digest": "sha256:" + e["sha256"] if content else None,
                "link": e.get("link") if e["type"] in ("symlink", "hardlink") else None,
                "mode": e["mode"], "uid": e["uid"], "gid": e["gid"], "xattrs": e.get("xattrs") or {}}
    lines = []
    for path in sorted(set(a) | set(b)):
        if not path or prefix and not (path == prefix or path.startswith(prefix + "/")):
            continue
        if path not in a or path not in b:
            lines.append(("A " if path not in a else "D ") + path)
            continue
        fa, fb = fields(a[path]), fields(b[path])
        changed = [f for f in _DIFF_FIELDS if fa[f] != fb[f]]
        if changed:
            lines.append(("M " if set(changed) & set(_DIFF_CONTENT) else "m ") + path)
    return lines


def test_e2e_diff_two_platforms(registry_anon):
    image = registry_anon.image("multiarch")
    a, b = expected_files("multiarch", "latest", "linux/amd64"), expected_files("multiarch", "latest", "linux/arm64/v8")
    want = _expected_diff(a, b)
    assert want == ["M bin/hello", "M etc/arch"]
    rc, out, err = run_cli("diff", "--platform-a", "linux/amd64", "--platform-b", "linux/arm64/v8", image, image)
    assert (rc, out.splitlines()) == (0, want), err
    # --platform for both sides, one side overridden; --json carries both entries
    rc, out, err = run_cli("--platform", "linux/arm64/v8", "diff", image, image, "--json", "--platform-a", "linux/amd64")
    assert rc == 0, err
    doc = json.loads(out)
    assert [d["path"] for d in doc] == ["bin/hello", "etc/arch"]
    for d in doc:
        assert d["change"] == "modified" and d["fields"] == ["digest"]
        assert d["a"]["digest"] == "sha256:" + a[d["path"]]["sha256"]
        assert d["b"]["digest"] == "sha256:" + b[d["path"]]["sha256"]
        assert set(d["a"]) == {"path", "type", "mode", "size", "digest", "link", "layer", "blob", "uid", "gid", "mtime"}
    rc, out, err = run_cli("diff", "--platform", "linux/amd64", image, image, "--exit-code")
    assert (rc, out) == (0, ""), err


@pytest.mark.parametrize("prefix", [None, "etc", "usr/lib"])
def test_e2e_diff_two_layouts(registry_anon, prefix):
    a, b = expected_files("layers", "latest"), expected_files("basic", "latest")
    want = _expected_diff(a, b, prefix)
    assert any(w.startswith("A ") for w in want) and any(w.startswith("D ") for w in want)
    path = [prefix + "/"] if prefix else []
    rc, out, err = run_cli("diff", registry_anon.image("layers"), registry_anon.image("basic"), *path)
    assert (rc, out.splitlines()) == (0, want), err
    rc, out, err = run_cli("diff", "--exit-code", registry_anon.image("layers"), registry_anon.image("basic"), *path)
    assert rc == 1 and out.splitlines() == want, err


def test_e2e_diff_json_added_and_deleted(registry_anon):
    a, b = expected_files("layers", "latest"), expected_files("basic", "latest")
    rc, out, err = run_cli("diff", "--json", registry_anon.image("layers"), registry_anon.image("basic"), "**/*.txt")
    assert rc == 0, err
    doc = {d["path"]: d for d in json.loads(out)}
    gone = doc["keep.txt"]
    assert (gone["change"], gone["fields"], gone["b"]) == ("deleted", [], None) and gone["a"]["path"] == "keep.txt"
    new = doc["docs/file with spaces.txt"]
    assert (new["change"], new["a"]) == ("added", None) and new["b"]["size"] == b["docs/file with spaces.txt"]["size"]
    assert sorted(doc) == sorted(p for p in set(a) | set(b) if p.endswith(".txt"))


def test_e2e_diff_identical_images_print_nothing(registry_anon):
    """docker-v2 holds basic's files under Docker media types: the same tree."""
    assert _expected_diff(expected_files("basic", "latest"), expected_files("docker-v2", "latest")) == []
    rc, out, err = run_cli("diff", "--exit-code", registry_anon.image("basic"), registry_anon.image("docker-v2"))
    assert (rc, out) == (0, ""), err


def test_e2e_diff_reads_no_file_content(registry_anon, tmp_path):
    """Manifests and TOC tails only (each fixture TOC fits in one tail read); warm: no blob at all."""
    env = {"STARGET_CACHE_DIR": str(tmp_path / "cache")}
    layers = {l["digest"] for ref in (("layers", "latest"), ("basic", "latest")) for l in expected_ref(*ref)["layers"]}
    args = ["-d", "diff", registry_anon.image("layers"), registry_anon.image("basic")]
    rc, first, err = run_cli(*args, env=env)
    assert rc == 0, err
    blobs = [line.split("/blobs/")[1] for line in _blob_requests(err)]
    assert sorted(blobs) == sorted(layers)
    rc, second, err = run_cli(*args, env=env)
    assert (rc, second) == (0, first) and _blob_requests(err) == [], err


def test_e2e_diff_path_missing_on_both_sides_is_not_found(registry_anon):
    rc, out, err = run_cli("diff", registry_anon.image("layers"), registry_anon.image("basic"), "nothing/")
    assert_one_line_error(rc, err, 3)
    rc, out, err = run_cli("diff", registry_anon.image("layers"), registry_anon.image("basic"), "opt/")
    assert rc == 0 and out.splitlines() == ["D opt", "D opt/app", "D opt/app/new.txt"], err


def test_diff_usage_errors():
    rc, out, err = run_cli("diff", "127.0.0.1:1/a", "127.0.0.1:1/b", "x", "y")
    assert "wrong number of arguments" in assert_one_line_error(rc, err, 2)
    rc, out, err = run_cli("diff", "127.0.0.1:1/a", "--platform-b", "nope", "127.0.0.1:1/b")
    assert "--platform-b" in assert_one_line_error(rc, err, 2)


# ---- cli: --fallback-stream -------------------------------------------------

def test_plain_gzip_without_fallback_exit_6(registry_anon):
    layer = expected_ref("plain-gzip", "latest")["layers"][0]
    rc, out, err = run_cli("ls", registry_anon.image("plain-gzip"))
    line = assert_one_line_error(rc, err, 6)
    assert layer["digest"] in line
    assert layer["media_type"] in line
    assert "--fallback-stream" in line


def test_fallback_stream_ls(registry_anon, tmp_path):
    rc, out, err = run_cli("--fallback-stream", "ls", registry_anon.image("plain-gzip"),
                           env={"TMPDIR": str(tmp_path)})
    assert rc == 0, err
    assert out.split("\n")[:-1] == sorted(expected_files("plain-gzip", "latest"))
    assert os.listdir(str(tmp_path)) == [], "the spool directory was left behind"


def test_fallback_stream_get_byte_exact(registry_anon, tmp_path):
    out = str(tmp_path / "out")
    spool = tmp_path / "spool"
    spool.mkdir()
    rc, _, err = run_cli("get", "--fallback-stream", registry_anon.image("plain-gzip"), ".", out,
                         env={"TMPDIR": str(spool)})
    assert rc == 0, err
    assert compare_tree(expected_files("plain-gzip", "latest"), walk_tree(out)) == []
    assert os.listdir(str(spool)) == []


def test_fallback_stream_ls_json(registry_anon):
    rc, out, err = run_cli("ls", "--json", "--fallback-stream", registry_anon.image("plain-gzip"))
    assert rc == 0, err
    files = expected_files("plain-gzip", "latest")
    got = {e["path"]: e for e in json.loads(out)}
    assert sorted(got) == sorted(files)
    for p, e in files.items():
        assert got[p]["type"] == e["type"] and got[p]["mode"] == e["mode"]
        if e["type"] == "reg":
            assert got[p]["size"] == e["size"]


def test_fallback_stream_cat(registry_anon):
    files = expected_files("plain-gzip", "latest")
    rc, out, err = run_cli("--fallback-stream", "cat", registry_anon.image("plain-gzip"), "bin/tool", binary=True)
    assert rc == 0, err
    assert hashlib.sha256(out).hexdigest() == files["bin/tool"]["sha256"]


def test_fallback_stream_estargz_untouched(registry_anon, tmp_path):
    """--fallback-stream on an eStargz image changes nothing (ranged reads, no warning)."""
    out = str(tmp_path / "out")
    rc, _, err = run_cli("--fallback-stream", "get", registry_anon.image("basic"), "etc", out)
    assert rc == 0, err
    assert "fallback" not in err and "not eStargz" not in err
    assert compare_tree(expected_files("basic", "latest"), walk_tree(out), prefix="etc") == []


# Plain layers made here, each an ordinary tarfile + gzip product: members are
# (name, bytes) a file, (name, None) a directory, (name, "->T") a symlink to T and
# (name, "=>T") a hardlink to the earlier member T.
def _plain_layer(members, compress=None):
    import tarfile
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, spec in members:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = 1700000000, 0o644
            if spec is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif isinstance(spec, str):
                info.type = tarfile.SYMTYPE if spec.startswith("->") else tarfile.LNKTYPE
                info.linkname = spec[2:]
            else:
                info.size = len(spec)
            tar.addfile(info, io.BytesIO(spec) if info.isreg() else None)
    if compress is not None:
        return compress(raw.getvalue())
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


# Each layer is bigger than the tail read that probes it for a footer, so that a
# read of the whole layer tells apart from the probe every layer gets.
PLAIN_BASE = [("usr", None), ("usr/bin", None), ("usr/bin/tool", os.urandom(300000)), ("etc", None),
              ("etc/base.conf", b"base\n"), ("etc/gone.conf", b"whited out above\n"), ("etc/app", None),
              ("etc/app/old", b"hidden by an opaque dir\n"), ("srv", None), ("srv/x", b"under a dir\n")]
PLAIN_MID = [("etc", None), ("etc/.wh.gone.conf", b""), ("etc/app", None), ("etc/app/.wh..wh..opq", b""),
             ("etc/app/new", b"the opaque layer's own\n"), ("srv", b"a file over the dir\n"), ("usr", None),
             ("usr/pad-mid", os.urandom(40000))]
PLAIN_TOP = [("etc", None), ("etc/top.conf", b"top\n"), ("etc/base.conf", b"overridden\n"), ("usr", None),
             ("usr/pad-top", os.urandom(40000))]
# what `get etc` gives for the three, base at the bottom
PLAIN_ETC = {"etc/top.conf": b"top\n", "etc/base.conf": b"overridden\n", "etc/app/new": b"the opaque layer's own\n"}


def _plain_image(httpserver, layers, repo="t/plain", media_type=None):
    reg = OCIServer(httpserver)
    blobs = [_plain_layer(members) if isinstance(members, list) else members for members in layers]
    kw = {"layer_media_type": media_type} if media_type else {}
    reg.add_image(repo, blobs, **kw)
    return reg, [sha256_digest(b) for b in blobs]


def _blob_gets(reg, digest, since=0):
    """The reads of the whole blob `digest` (not the footer probe of its tail)."""
    size = len(reg.blobs[digest])
    return [p for m, p, h in reg.requests[since:] if m == "GET" and p.endswith("/blobs/" + digest)
            and h.get("Range") in (None, "bytes=0-%d" % (size - 1))]


def _regular_files(root):
    return {p: a["sha256"] for p, a in walk_tree(root).items() if a["type"] == "reg"}



def test_fallback_stream_visibility_top_down_matches_the_merge():
    """What _LayerStream keeps from each layer, walking down with _UpperLayers, is
    exactly the merged view; and it stops where ImageIndex would change nothing."""
    lower = _layer(("", "dir"), ("a/b", "dir"), ("a/b/c", "reg"), ("a/b-c", "reg"), ("o/in", "reg"),
                   ("o/sub/deep", "reg"), ("f", "dir"), ("f/x", "reg"), ("r", "reg"), ("d/x/y", "reg"))
    upper = _layer(("a/.wh.b", "reg"), ("o/.wh..wh..opq", "reg"), ("o/mine", "reg"), ("f", "reg"),
                   ("r", "dir"), ("r/y", "reg"), ("d/.wh.x", "reg"))
    top = _layer(("d/x/new", "reg"), ("o", "dir"), ("a", "dir"))
    for stack in ([lower, upper], [lower, upper, top], [lower, top], [lower, upper, _layer((".wh..wh..opq", "reg"))]):
        seen, known = {}, starget._UpperLayers()
        for toc in reversed(stack):
            for e in toc.entries:
                if not e.name.startswith(".wh.") and known.visible(e.path):
                    seen[e.path] = e
            known.learn(toc.entries)
        assert seen == dict(starget.ImageIndex(stack).view())
    known = starget._UpperLayers()
    known.learn(upper.entries + top.entries)
    assert known.settles(["o"]) and known.settles(["f", "a/b"]) and known.settles(["o/mine"])
    assert not known.settles(["d"]) and not known.settles(["r"]) and not known.settles([""])
    assert not known.settles(["d/x/new/deeper"])

def test_fallback_stream_cat_of_a_top_layer_file_reads_only_the_top_layer(httpserver):
    reg, (base, mid, top) = _plain_image(httpserver, [PLAIN_BASE, PLAIN_MID, PLAIN_TOP])
    rc, out, err = run_cli("--fallback-stream", "cat", reg.image("t/plain"), "etc/top.conf", binary=True)
    assert rc == 0, err
    assert out == b"top\n"
    assert len(_blob_gets(reg, top)) == 1
    assert _blob_gets(reg, mid) == [] and _blob_gets(reg, base) == [], "a lower layer was read"


def test_fallback_stream_get_reads_down_to_the_layer_that_settles_it(httpserver, tmp_path):
    """A file of the middle layer: top and middle are read, not the base; the base's
    file comes out when asked for, through the layers above it."""
    reg, (base, mid, top) = _plain_image(httpserver, [PLAIN_BASE, PLAIN_MID, PLAIN_TOP])
    out = str(tmp_path / "out")
    rc, _, err = run_cli("--fallback-stream", "get", reg.image("t/plain"), "etc/app", out)
    assert rc == 0, err
    assert sorted(_regular_files(out)) == ["etc/app/new"]   # the opaque dir settles it: no base read
    assert _blob_gets(reg, base) == [] and len(_blob_gets(reg, mid)) == 1
    rc, _, err = run_cli("--fallback-stream", "get", reg.image("t/plain"), "usr/bin/tool", out)
    assert rc == 0, err
    with open(os.path.join(out, "usr", "bin", "tool"), "rb") as f:
        assert f.read() == PLAIN_BASE[2][1]
    assert [n for n in os.listdir(os.path.join(out, "usr", "bin"))] == ["tool"]


def test_fallback_stream_directory_across_layers_is_exact(httpserver, tmp_path):
    """Whiteouts, an opaque dir and a file over a dir applied as the merged view does."""
    reg, _ = _plain_image(httpserver, [PLAIN_BASE, PLAIN_MID, PLAIN_TOP])
    out = str(tmp_path / "out")
    rc, _, err = run_cli("--fallback-stream", "get", reg.image("t/plain"), "etc", out)
    assert rc == 0, err
    want = {p: hashlib.sha256(data).hexdigest() for p, data in PLAIN_ETC.items()}
    assert _regular_files(out) == want
    whole = str(tmp_path / "whole")
    rc, _, err = run_cli("--fallback-stream", "get", reg.image("t/plain"), ".", whole)
    assert rc == 0, err
    tree = walk_tree(whole)
    assert tree["srv"]["type"] == "reg" and "srv/x" not in tree
    assert sorted(p for p in tree if not p.startswith("usr")) == [
        "etc", "etc/app", "etc/app/new", "etc/base.conf", "etc/top.conf", "srv"]
    assert not [p for p in tree if p.endswith(".partial")]
    rc, listing, err = run_cli("--fallback-stream", "ls", reg.image("t/plain"))
    assert rc == 0, err
    assert listing.split() == sorted(tree)


@pytest.mark.parametrize("pattern", ["etc", "opt", "opt/app", "srv", "var", "etc/motd/", "lib/", "."])
def test_fallback_stream_plain_layers_fixture_get_is_exact(registry_anon, tmp_path, pattern):
    out = str(tmp_path / "out")
    rc, _, err = run_cli("--fallback-stream", "--no-progress", "get", registry_anon.image("plain-layers"),
                         pattern, out)
    assert rc == 0, err
    files = expected_files("plain-layers", "latest")
    tree = walk_tree(out)
    if pattern == "lib/":   # the top layer's symlink lib -> usr/lib, followed: both come out
        assert tree["lib"]["type"] == "symlink"
        tree.pop("lib")
    prefix = {".": "", "lib/": "usr/lib"}.get(pattern, pattern.rstrip("/"))
    assert compare_tree(files, tree, prefix=prefix) == []


def test_fallback_stream_hardlink_to_a_file_outside_the_selection(httpserver, tmp_path):
    """Its target passed before it in the stream: the layer is read once more for its bytes."""
    data = os.urandom(5000)
    reg, (layer,) = _plain_image(httpserver, [[("data", None), ("data/f", data), ("links", None),
                                               ("links/h", "=>data/f")]])
    out = str(tmp_path / "out")
    rc, _, err = run_cli("--fallback-stream", "get", reg.image("t/plain"), "links", out)
    assert rc == 0, err
    assert _regular_files(out) == {"links/h": hashlib.sha256(data).hexdigest()}
    whole = str(tmp_path / "whole")
    rc, _, err = run_cli("--fallback-stream", "get", reg.image("t/plain"), ".", whole)
    assert rc == 0, err
    assert os.stat(os.path.join(whole, "links", "h")).st_ino == os.stat(os.path.join(whole, "data", "f")).st_ino


def test_fallback_stream_layer_not_matching_its_digest_renames_nothing(httpserver, tmp_path):
    reg, (base, top) = _plain_image(httpserver, [PLAIN_BASE, PLAIN_TOP])
    good = reg.repos["t/plain"]["blobs"][top]
    forged = bytearray(good)
    forged[-20] ^= 1     # in the gzip trailer: the tar still reads, the digest does not match
    reg.repos["t/plain"]["blobs"][top] = reg.blobs[top] = bytes(forged)
    out = str(tmp_path / "out")
    rc, _, err = run_cli("--fallback-stream", "get", reg.image("t/plain"), "etc", out)
    assert rc != 0
    assert_one_line_error(rc, err, (ErrorCode.INTEGRITY, ErrorCode.FORMAT))
    assert not [p for p in walk_tree(out) if walk_tree(out)[p]["type"] == "reg"] if os.path.isdir(out) else True


@pytest.mark.skipif(ZSTD is None, reason="no zstd decoder (backports.zstd is in the test extra)")
def test_fallback_stream_plain_zstd_layers(httpserver, tmp_path):
    zstd_layers = [_plain_layer(members, compress=ZSTD.compress) for members in (PLAIN_BASE, PLAIN_MID, PLAIN_TOP)]
    reg, (base, mid, top) = _plain_image(httpserver, zstd_layers,
                                         media_type="application/vnd.oci.image.layer.v1.tar+zstd")
    out = str(tmp_path / "out")
    rc, _, err = run_cli("--fallback-stream", "get", reg.image("t/plain"), "etc", out)
    assert rc == 0, err
    assert _regular_files(out) == {p: hashlib.sha256(d).hexdigest() for p, d in PLAIN_ETC.items()}
    mark = len(reg.requests)
    rc, data, err = run_cli("--fallback-stream", "cat", reg.image("t/plain"), "etc/top.conf", binary=True)
    assert rc == 0 and data == b"top\n", err
    assert _blob_gets(reg, base, mark) == [] and _blob_gets(reg, mid, mark) == [], "a lower layer was read"


@pytest.mark.skipif(ZSTD is None, reason="no zstd decoder (backports.zstd is in the test extra)")
def test_fallback_stream_mixed_reads_the_plain_base_only_when_needed(httpserver):
    reg = OCIServer(httpserver)
    reg.add_layout("fixtures/mixed", "mixed")
    ref = expected_ref("mixed", "latest")
    base = ref["layers"][0]["digest"]
    files = expected_files("mixed", "latest")
    on_top = [p for p in _reg_paths(files) if p.startswith("etc/motd/")][0]
    rc, out, err = run_cli("--fallback-stream", "cat", reg.image("fixtures/mixed"), on_top, binary=True)
    assert rc == 0, err
    assert hashlib.sha256(out).hexdigest() == files[on_top]["sha256"]
    # The base is smaller than the tail read that probes it for a footer, so that probe
    # asks for all of it: one read; reading it for its files would be a second.
    assert len(_blob_gets(reg, base)) == 1, "the plain base was read for a file of a lazy layer"
    rc, out, err = run_cli("--fallback-stream", "cat", reg.image("fixtures/mixed"), "keep.txt", binary=True)
    assert rc == 0, err
    assert hashlib.sha256(out).hexdigest() == files["keep.txt"]["sha256"]
    assert len(_blob_gets(reg, base)) == 3


def test_fallback_stream_temp_dir_smaller_than_the_layer(httpserver, tmp_path):
    """TMPDIR on a 1 MiB tmpfs, a layer of 8 MiB uncompressed: get and cat succeed."""
    small = tmp_path / "tmp"
    small.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    if mount.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): %s" % mount.stderr.strip())
    try:
        reg, _ = _plain_image(httpserver, [[("big", None), ("big/zeros", b"\0" * (8 << 20)),
                                            ("etc", None), ("etc/small", b"small\n")]])
        env = {"TMPDIR": str(small)}
        out = str(tmp_path / "out")
        rc, _, err = run_cli("--fallback-stream", "get", reg.image("t/plain"), ".", out, env=env)
        assert rc == 0, err
        assert os.path.getsize(os.path.join(out, "big", "zeros")) == 8 << 20
        rc, data, err = run_cli("--fallback-stream", "cat", reg.image("t/plain"), "etc/small", env=env, binary=True)
        assert rc == 0 and data == b"small\n", err
        assert os.listdir(str(small)) == []
    finally:
        subprocess.run(["umount", str(small)])


# ---- cli: vendoring, the example in starget.__doc__ -------------------------

def _reg_paths(files, prefix=""):
    return sorted(p for p, e in files.items()
                  if e["type"] in ("reg", "hardlink") and (not prefix or p.startswith(prefix + "/")))


def _doc_example(image):
    doc = starget.__doc__
    assert "Example:" in doc
    block = textwrap.dedent(doc.split("Example:", 1)[1]).strip("\n")
    refs = re.findall(r'open_image\("([^"]+)"\)', block)
    assert len(refs) == 1, "the example should open one image: %r" % block
    return block.replace(refs[0], image), refs[0]


def test_doc_example_runs(registry_anon, api_env, monkeypatch, capsys):
    code, placeholder = _doc_example(registry_anon.image("basic"))
    cwd = api_env / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(str(cwd))
    exec(compile(code, "<starget example>", "exec"), {"__name__": "__example__"})
    printed = capsys.readouterr().out.split("\n")
    files = expected_files("basic", "latest")
    assert printed[0] == str(files["etc/os-release"]["size"])
    assert compare_tree(files, walk_tree(str(cwd / "out")), prefix="etc") == []
    want = _reg_paths(files, "etc")
    assert printed[1].split()[0] == str(len(want))
    assert printed[1].split()[1] == str(sum(files[p]["size"] for p in want))


def test_doc_example_runs_from_a_vendored_copy(registry_anon, tmp_path):
    """Copy starget.py next to a script (vendoring) and run the doc example there."""
    code, _ = _doc_example(registry_anon.image("basic"))
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    shutil.copy(STARGET, str(vendor / "starget.py"))
    (vendor / "example.py").write_text(code + "\n")
    env = hermetic_env({"PYTHONPATH": None})
    p = subprocess.run([sys.executable, "example.py"], cwd=str(vendor), env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert compare_tree(expected_files("basic", "latest"), walk_tree(str(vendor / "out")), prefix="etc") == []


# ---- cli: complete_paths and __complete -------------------------------------

def _entry(path, kind="reg", link=None):
    return starget.TOCEntry(path, kind, link=link, size=0, mode=0o644)


class FakeIndex(object):
    def __init__(self, entries, layer=None):
        self._view = {e.path: e for e in entries}
        self._layer = {e.path: e for e in (layer or [])}
        self.blobs = []

    def view(self, blob=None):
        self.blobs.append(blob)
        return self._layer if blob else self._view


INDEX = FakeIndex([
    _entry("", "dir"), _entry("etc", "dir"), _entry("etc/hosts"), _entry("etc/hostname"),
    _entry("etc/ssl", "dir"), _entry("etc/ssl/certs", "dir"), _entry("etc/ssl/certs/ca.pem"),
    _entry("etc.d"), _entry("usr", "dir"), _entry("usr/lib", "dir"), _entry("usr/lib/libc.so"),
    _entry("usr/lib/libm.so"), _entry("lib", "symlink", link="usr/lib"),
    _entry("abslib", "symlink", link="/usr/lib/"), _entry("hostlink", "symlink", link="etc/hosts"),
    _entry("loop", "symlink", link="loop"), _entry("dangling", "symlink", link="nowhere"),
    _entry("bin", "hardlink", link="usr/lib/libc.so"), _entry(".hidden"),
])


@pytest.mark.parametrize("prefix, expected", [
    ("", [".hidden", "abslib/", "bin", "dangling", "etc.d", "etc/", "hostlink", "lib/", "loop", "usr/"]),
    ("e", ["etc.d", "etc/"]),
    ("etc", ["etc.d", "etc/"]),
    ("etc/", ["etc/hostname", "etc/hosts", "etc/ssl/"]),
    ("etc/host", ["etc/hostname", "etc/hosts"]),
    ("etc/hosts", ["etc/hosts"]),
    ("etc/ssl/c", ["etc/ssl/certs/"]),
    ("etc/x", []),
    ("/etc/h", ["/etc/hostname", "/etc/hosts"]),
    ("./etc/s", ["./etc/ssl/"]),
    ("/", ["/.hidden", "/abslib/", "/bin", "/dangling", "/etc.d", "/etc/", "/hostlink", "/lib/", "/loop", "/usr/"]),
    ("lib/", ["lib/libc.so", "lib/libm.so"]),          # through a link to a directory
    ("abslib/libm", ["abslib/libm.so"]),
    ("etc/hosts/", []),                                  # a file is no directory
    ("nope/", []),
    ("loop/", []),
    ("usr/../etc/ho", ["usr/../etc/hostname", "usr/../etc/hosts"]),
])
def test_complete_paths(prefix, expected):
    assert P._complete_paths(INDEX, prefix) == expected


def test_complete_paths_of_one_layer():
    index = FakeIndex([_entry("", "dir")], layer=[_entry("only", "dir"), _entry("only/f")])
    assert P._complete_paths(index, "o", "sha256:ab") == ["only/"]
    assert index.blobs == ["sha256:ab"]


def test_cmd_complete():
    index = INDEX
    asked = []

    class Session(object):
        args = argparse.Namespace(args=["sha256:ab", "etc/h"])

        def load_image(self, blob=None):
            asked.append(blob)
            return FakeIndex([], layer=list(index._view.values()))

    out = io.StringIO()
    assert P._cmd_complete(Session(), out) == 0
    assert out.getvalue() == "etc/hostname\netc/hosts\n" and asked == ["sha256:ab"]
    Session.args = argparse.Namespace(args=[""])
    out = io.StringIO()
    Session.load_image = lambda self, blob=None: INDEX
    P._cmd_complete(Session(), out)
    assert out.getvalue().split("\n")[:2] == [".hidden", "abslib/"]


def _complete_image(word, *flags, **kw):
    rc, out, err = run_cli(*(flags + ("__complete", "--image=" + word)), **kw)
    assert rc == 0 and err == "", err
    return out.splitlines()


def test_complete_image_tags_and_repositories(registry_anon):
    """`__complete --image=WORD`: the tags after a ':' past the last '/', else the
    repositories of the catalog; the whole word each time, sorted."""
    repo = "%s/fixtures/prefetch" % registry_anon.addr
    assert _complete_image(repo + ":") == [repo + ":" + t for t in ["no-landmark", "no-prefetch", "prefetch"]]
    assert _complete_image(repo + ":no-l") == [repo + ":no-landmark"]
    assert _complete_image(repo + ":zz") == []
    assert _complete_image("%s/fixtures/m" % registry_anon.addr) == \
        ["%s/fixtures/%s" % (registry_anon.addr, lay) for lay in sorted(all_layouts()) if lay.startswith("m")]
    assert len(_complete_image(registry_anon.addr + "/")) == len(load_expected()["fixtures"])
    for word in ("%s/fixtures/nothere:" % registry_anon.addr, repo + "@sha256:", "fixtures/prefetch:",
                 registry_anon.addr, "nodots/x", ""):
        assert _complete_image(word) == [], word


def test_complete_image_quietly_nothing_on_refusal_and_slowness(registry_basic):
    repo = "%s/fixtures/prefetch" % registry_basic.addr
    assert _complete_image(repo + ":") == []                                    # 401
    assert len(_complete_image(repo + ":", "--credential", registry_basic.credential)) == 3
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)                # accepts connections, never answers
    try:
        started = time.time()
        assert _complete_image("127.0.0.1:%d/x:" % listener.getsockname()[1], "--timeout", "60") == []
        assert time.time() - started < 20     # two tries (https, then http) of at most 3 s each
    finally:
        listener.close()


# ---- cli: completion scripts ------------------------------------------------

def test_unknown_shell():
    assert "unknown shell 'tcsh'" in usage_error(P._completion_script, "tcsh")


def _split(text, sep=None):
    return set(text.split(sep))


def _shell_lists(shell, script):
    """What a completion script offers, read back from the script as the shell
    would use it: {"flags", "value_flags", "forwarded", "commands", "platforms",
    "files"} (forwarded: the flags passed on to __complete; files: the flags whose
    value is completed as a file name)."""
    def one(pattern, flags=re.M):
        found = re.findall(pattern, script, flags)
        assert found, pattern
        return found

    if shell == "fish":
        switches = re.findall(r"^complete -c starget (?:-s|-l) (\S+) -d ", script, re.M)
        valued = re.findall(r"^complete -c starget (?:-s|-l) (\S+) (?:-x|-r -F)[ -]", script, re.M)
        dash = lambda names: {("-" if len(n) == 1 else "--") + n for n in names}
        quoted = lambda text: {w.strip("'") for w in text.split()}
        return {
            "flags": dash(switches + valued),
            "value_flags": quoted(one(r"^\s+if contains -- \$word ((?:'[^']+' ?)+)$")[0]),
            "forwarded": quoted(one(r"^\s+else if contains -- \$word ((?:'[^']+' ?)+); or ")[0]),
            "commands": set(one(r"^complete -c starget -n __starget_needs_command -a (\S+) -d ")),
            "platforms": _split(one(r"^complete -c starget -l platform -x -a '([^']*)'")[0]),
            "files": dash(re.findall(r"^complete -c starget (?:-s|-l) (\S+) -r -F ", script, re.M)),
        }
    cases = one(r"^\s+(\S+)\) flag=\$prev ;;$")
    skipped = one(r"^\s+(\S+)\) forward\+=\(\"\$word\"\); skip=1 ;;$")
    assert cases == skipped, "the flags taking a value differ between two case statements"
    if shell == "bash":
        flags = one(r'^\s+local flags="([^"]*)"$')[0]
        commands = _split(one(r'-z \$command \]\]; then\s+COMPREPLY=\(\$\(compgen -W "([^"]*)"', 0)[0])
        platforms = one(r'--platform\) COMPREPLY=\(\$\(compgen -P "\$before" -W "([^"]*)"')[0]
        files = one(r"^\s+(\S+)\)\s+compopt -o filenames 2>/dev/null\s+COMPREPLY=\(\$\(compgen -P \"\$before\" -f ")
    else:
        flags = one(r"^\s+flags=\(([^)]*)\)$")[0]
        commands = set(re.findall(r"'([a-z]+):", one(r"^\s+commands=\((.*)\)$")[0]))
        platforms = one(r"^\s+platforms=\(([^)]*)\)$")[0]
        files = one(r"^\s+(\S+)\) _files ;;$")
    return {
        "flags": _split(flags), "value_flags": _split(cases[0], "|"),
        "forwarded": _split(one(r'^\s+(\S+)\) forward\+=\("\$word"\) ;;$')[0], "|"),
        "commands": commands, "platforms": _split(platforms), "files": set(files),
    }


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_scripts_mention_everything(shell):
    """Every global option (from the one table) and every command is in the script,
    where that shell looks for it: the flag list, the flags that take a value (and
    whose value is skipped), the flags passed on to __complete (a value flag as
    --flag=* too in bash and zsh), --platform's values, file-valued flags."""
    options = starget._GLOBAL_OPTIONS
    value_flags = {f for o in options if o.takes_value for f in o.flags}
    forwarded = {f for o in options if o.forwarded and not o.takes_value for f in o.flags}
    if shell != "fish":
        forwarded |= {f + "=*" for f in value_flags}
    parser = starget._build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    got = _shell_lists(shell, P._completion_script(shell))
    assert got["flags"] == {f for o in options for f in o.flags} | {"-h", "--help"}
    assert got["value_flags"] == value_flags
    assert got["forwarded"] == forwarded
    assert got["commands"] == {c for c in subparsers.choices
                               if not c.startswith("_") and c not in ("help", "version")}
    assert got["platforms"] == set(next(o for o in options if o.kind == "platform").suggestions)
    assert got["files"] == {f for o in options if o.kind == "file" for f in o.flags}
    assert not re.search(r"@[A-Z_]+@", P._completion_script(shell))      # every placeholder filled


def test_value_flags_are_forwarded():
    """The scripts pass every flag that takes a value on to __complete (they skip
    its value with it), so the table must not say otherwise."""
    assert all(o.forwarded for o in starget._GLOBAL_OPTIONS if o.takes_value)


def _option_strings(parser):
    return {o for a in parser._actions for o in a.option_strings}


def test_flags_match_the_parser():
    """Every flag starget accepts is completed (a new flag must be added to the tables)."""
    parser = starget._build_parser()
    completed = {f for o in P._GLOBAL_OPTIONS for f in o.flags} | {f for f, _ in P._COMPLETION_HELP_FLAGS}
    assert _option_strings(parser) - {"--version"} == completed
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        if name.startswith("_") or name in ("help", "version"):    # no flags, no arguments to complete
            continue
        assert name in [c for c, _ in P._COMPLETION_COMMANDS]
        own = _option_strings(sub) - completed
        assert own == {f for f, _ in P._COMPLETION_COMMAND_FLAGS.get(name, ())}, name


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_script_syntax(shell, tmp_path):
    if not shutil.which(shell):
        pytest.skip("%s is not installed" % shell)
    path = tmp_path / ("completion." + shell)
    path.write_text(P._completion_script(shell))
    proc = subprocess.run([shell, "-n", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 0, proc.stderr.decode()


FAKE_STARGET = r"""#!/bin/sh
# A stand-in starget: logs its arguments (<one> a line, then END) and
# answers __complete with the fixed candidates that start with the last argument.
{ for arg; do printf '<%s>\n' "$arg"; done; echo END; } >> "$STARGET_LOG"
for last; do :; done
case " $* " in
  *" __complete "*)
    for c in etc/ etc.d usr/ usr/a:bc 'with space' 'doc/pkg with spaces/'; do
      case "$c" in "$last"*) printf '%s\n' "$c" ;; esac
    done ;;
esac
"""

def read_calls(log):
    """The fake's calls: one list of arguments per run."""
    calls, current = [], []
    for line in log.read_text().split("\n") if log.exists() else []:
        if line == "END":
            calls.append(current)
            current = []
        elif line:
            current.append(line[1:-1])
    return calls


BASH_WORDBREAKS = " \t\n\"'><=;|&(:@"


@pytest.fixture
def fake_starget(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "starget").write_text(FAKE_STARGET)
    os.chmod(str(bindir / "starget"), 0o755)
    (tmp_path / "work" / "outdir").mkdir(parents=True)
    (tmp_path / "work" / "other").mkdir()
    (tmp_path / "work" / "etc").mkdir()       # a local etc/, as the image has one
    (tmp_path / "work" / "file").write_text("")
    env = dict(os.environ, PATH="%s:%s" % (bindir, os.environ["PATH"]), STARGET_LOG=str(tmp_path / "log"))
    return types.SimpleNamespace(env=env, log=tmp_path / "log", cwd=str(tmp_path / "work"), tmp=tmp_path)


def bash_words(line, wordbreaks=BASH_WORDBREAKS):
    """COMP_WORDS as bash makes them: blanks separate words, and runs of the
    COMP_WORDBREAKS characters ':', '=', '@' are words of their own."""
    import re
    breaks = "".join(c for c in ":=@" if c in wordbreaks)
    words = []
    for token in re.findall(r"(?:\\.|\S)+", line):    # a blank after a backslash is no break
        pieces = re.split("([%s]+)" % breaks, token) if breaks else [token]
        words.extend(w for w in pieces if w)
    if line.endswith(" "):
        words.append("")
    return words


def quote(word):
    return "'" + word.replace("'", "'\\''") + "'"


def run_bash(fake, line, wordbreaks=BASH_WORDBREAKS):
    """Complete `line` (cursor at its end) with _starget; returns (COMPREPLY, calls).
    The compopt calls (options readline would apply to the candidates) go to fake.compopt."""
    words = bash_words(line, wordbreaks)
    script = fake.tmp / "completion.bash"
    script.write_text(P._completion_script("bash"))
    fake.compopt = fake.tmp / "compopt"
    program = ("compopt() { local IFS=' '; printf '%%s\\n' \"$*\" >> %s; }\n" % quote(str(fake.compopt))
               + "source %s\nCOMP_WORDBREAKS=%s\nCOMP_WORDS=(%s)\nCOMP_CWORD=%d\nCOMP_LINE=%s\nCOMP_POINT=%d\n"
               "_starget\nprintf '%%s\\n' \"${COMPREPLY[@]}\"\n"
               % (quote(str(script)), quote(wordbreaks), " ".join(quote(w) for w in words), len(words) - 1,
                  quote(line), len(line)))
    for log in (fake.log, fake.compopt):
        if log.exists():
            log.unlink()
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], env=fake.env, cwd=fake.cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr.decode()
    replies = [r for r in proc.stdout.decode().split("\n") if r]
    calls = read_calls(fake.log)
    return replies, calls


needs_bash = pytest.mark.skipif(not shutil.which("bash"), reason="bash is not installed")


@needs_bash
@pytest.mark.parametrize("line, expected", [
    ("starget ", ["info", "ls", "get", "cat", "diff", "completion", "tags", "login", "logout"]),
    ("starget g", ["get"]),
    ("starget c", ["cat", "completion"]),
    ("starget -k --platform linux/amd64 i", ["info"]),
    ("starget --pl", ["--platform"]),
    ("starget --vers", ["--version"]),
    ("starget get --vers", []),                     # --version only before the command
    ("starget ls img -", None),                       # checked below
    ("starget --platform ", ["linux/amd64", "linux/arm64", "linux/arm64/v8", "linux/arm/v7", "linux/ppc64le",
                             "linux/s390x", "linux/riscv64"]),
    ("starget ls --platform linux/arm", ["linux/arm64", "linux/arm64/v8", "linux/arm/v7"]),
    ("starget --platform=linux/arm6", ["linux/arm64", "linux/arm64/v8"]),   # only the part after '='
    ("starget --concurrency ", []),
    ("starget --credential u:", []),
    ("starget completion ", ["bash", "zsh", "fish"]),
    ("starget completion z", ["zsh"]),
    ("starget completion bash ", []),
    ("starget info ", []),
    ("starget get ", []),                             # IMAGE: nothing to offer
    ("starget get img etc/ ou", ["outdir"]),           # OUTPUT_DIR: local directories
    ("starget get img sha256:ab etc/ ", ["etc", "outdir", "other"]),
    ("starget cat img etc/ ", []),                    # cat takes one PATH
    ("starget get img sha256:ab", []),                # a layer digest, not a path
])
def test_bash_completion(fake_starget, line, expected):
    replies, calls = run_bash(fake_starget, line)
    if expected is None:
        assert {"--json", "-l", "--long", "--sizes", "--platform"} <= set(replies)
        return
    assert sorted(replies) == sorted(expected)
    assert calls == []


@needs_bash
@pytest.mark.parametrize("line, expected, call", [
    ("starget get 127.0.0.1:5000/test/img:latest e", ["etc/", "etc.d"],
     ["__complete", "127.0.0.1:5000/test/img:latest", "e"]),
    ("starget cat img ", ["doc/pkg\\ with\\ spaces/", "etc/", "etc.d", "usr/", "usr/a:bc", "with\\ space"],
     ["__complete", "img", ""]),

    ("starget -k --platform=linux/arm64 -v --credential u:p get --no-cache [::1]:5000/a/b@sha256:0123 et",
     ["etc/", "etc.d"],
     ["-k", "--platform=linux/arm64", "--credential", "u:p", "--no-cache", "__complete",
      "[::1]:5000/a/b@sha256:0123", "et"]),
    ("starget get --json img --retries 2 sha256:abcd us", ["usr/", "usr/a:bc"],
     ["--retries", "2", "__complete", "img", "sha256:abcd", "us"]),
    ("starget get img usr/a:", ["bc"], ["__complete", "img", "usr/a:"]),   # only the part after ':'
])
def test_bash_path_completion(fake_starget, line, expected, call):
    replies, calls = run_bash(fake_starget, line)
    assert sorted(replies) == sorted(expected)
    assert calls == [call]


@needs_bash
@pytest.mark.parametrize("line, expected, call", [
    # what readline inserts, quoted as the shell will read it back
    ("starget get img doc/pkg\\ w", ["doc/pkg\\ with\\ spaces/"], "doc/pkg w"),
    ("starget get img doc/pkg\\ with\\ spaces/", ["doc/pkg\\ with\\ spaces/"], "doc/pkg with spaces/"),
    ("starget get img doc/pkg\\ with\\ sp", ["doc/pkg\\ with\\ spaces/"], "doc/pkg with sp"),
    ("starget get img wi", ["with\\ space"], "wi"),
    ("starget get img etc/", ["etc/"], "etc/"),          # ./etc is a local directory too
])
def test_bash_completion_of_spaces_and_local_dirs(fake_starget, line, expected, call):
    """The word is unquoted for __complete and the candidates quoted back; they are
    not file names (no -o filenames, which would add a '/' after the local etc/ and
    quote them once more), and a directory gets no space after it."""
    replies, calls = run_bash(fake_starget, line)
    assert replies == expected
    assert calls == [["__complete", "img", call]]
    options = fake_starget.compopt.read_text().split("\n") if fake_starget.compopt.exists() else []
    assert not any("filenames" in o or "dirnames" in o for o in options), options
    assert ("-o nospace" in options) == expected[0].endswith("/")


@needs_bash
@pytest.mark.parametrize("line, call", [
    ("starget -k get h:5000/fixtures/i:", ["-k", "__complete", "--image=h:5000/fixtures/i:"]),
    ("starget tags --retries 1 h:5000/fi", ["--retries", "1", "__complete", "--image=h:5000/fi"]),
    ("starget info h", None), ("starget cat h:5000/i:t etc/", ["__complete", "h:5000/i:t", "etc/"]),
    ("starget login h:5000/", None), ("starget completion a/", None),
])
def test_bash_image_completion_asks_complete_image(fake_starget, line, call):
    """The IMAGE word with a '/' (of a command taking IMAGE) is __complete --image=WORD."""
    replies, calls = run_bash(fake_starget, line)
    assert calls == ([call] if call else [])


@pytest.mark.skipif(not (shutil.which("zsh") and shutil.which("fish")), reason="zsh or fish is not installed")
def test_zsh_and_fish_image_completion_ask_complete_image(fake_starget):
    out, calls = run_zsh(fake_starget, ["starget", "-k", "ls", "h:5000/fixtures/i:"])
    assert calls == [["-k", "__complete", "--image=h:5000/fixtures/i:"]]
    replies, calls = run_fish(fake_starget, "starget -k ls h:5000/fixtures/i:")
    assert calls == [["-k", "__complete", "--image=h:5000/fixtures/i:"]]
    assert run_zsh(fake_starget, ["starget", "ls", "h"])[1] == run_fish(fake_starget, "starget ls h")[1] == []


@needs_bash
def test_bash_ls_takes_no_image_path(fake_starget):
    # `ls IMAGE [BLOB]` has no PATH: nothing asks the image for paths there.
    replies, calls = run_bash(fake_starget, "starget ls img u")
    assert calls == [] and not any(r.startswith("usr") for r in replies)


@needs_bash
def test_bash_without_colon_in_wordbreaks(fake_starget):
    # Some setups take ':' (or '=') out of COMP_WORDBREAKS; then bash does not split there
    # and readline replaces the whole word: candidates keep their beginning.
    replies, calls = run_bash(fake_starget, "starget get img usr/a:", wordbreaks=" \t\n\"'><=;|&(")
    assert calls == [["__complete", "img", "usr/a:"]]
    assert replies == ["usr/a:bc"]
    replies, calls = run_bash(fake_starget, "starget --platform=linux/arm6", wordbreaks=" \t\n\"'><;|&(")
    assert replies == ["--platform=linux/arm64", "--platform=linux/arm64/v8"]


ZSH_STUBS = r"""
compadd() { print -r -- "compadd $*"; }
_describe() { print -r -- "describe ${(@P)4}"; }
_files() { print -r -- "files $*"; }
compset() { :; }
compdef() { print -r -- "compdef $*"; }
"""


def run_zsh(fake, words):
    script = fake.tmp / "_starget"
    script.write_text(P._completion_script("zsh"))
    program = ZSH_STUBS + "source %s\nwords=(%s)\nCURRENT=%d\n_starget\n" % (
        quote(str(script)), " ".join(quote(w) for w in words), len(words))
    if fake.log.exists():
        fake.log.unlink()
    proc = subprocess.run(["zsh", "-f", "-c", program], env=fake.env, cwd=fake.cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr.decode()
    calls = read_calls(fake.log)
    return proc.stdout.decode().split("\n"), calls


@pytest.mark.skipif(not shutil.which("zsh"), reason="zsh is not installed")
def test_zsh_completion(fake_starget):
    out, _ = run_zsh(fake_starget, ["starget", ""])
    assert out[0] == "compdef _starget starget"
    assert out[1].startswith("describe info:show the layers of the image ls:")
    out, _ = run_zsh(fake_starget, ["starget", "--platform", ""])
    assert out[1] == "compadd -- linux/amd64 linux/arm64 linux/arm64/v8 linux/arm/v7 linux/ppc64le " \
                     "linux/s390x linux/riscv64"
    out, _ = run_zsh(fake_starget, ["starget", "ls", "img", "--"])
    assert "--sizes" in out[1] and "--json" in out[1] and "--version" not in out[1]
    out, calls = run_zsh(fake_starget, ["starget", "-k", "--platform", "linux/arm64", "get", "h:5000/i:t", "e"])
    assert calls == [["-k", "--platform", "linux/arm64", "__complete", "h:5000/i:t", "e"]]
    assert out[1:3] == ["compadd -S  -- etc/", "compadd -- etc.d"]
    out, calls = run_zsh(fake_starget, ["starget", "cat", "img", "sha256:ab", ""])
    assert calls == [["__complete", "img", "sha256:ab", ""]]
    out, calls = run_zsh(fake_starget, ["starget", "get", "img", "etc/", ""])
    assert out[1] == "files -/" and calls == []
    out, _ = run_zsh(fake_starget, ["starget", "completion", ""])
    assert out[1] == "compadd -- bash zsh fish"


class _PtyShell(object):
    """A real interactive shell on a pty, for the completion tests: `write` types,
    `read_until` waits (10 s at most) for a marker in what the shell printed."""

    def __init__(self, argv, cwd, env):
        import pty
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # pragma: no cover - the child
            os.chdir(cwd)
            os.execvpe(argv[0], argv, env)
        self.out = b""

    def write(self, data):
        os.write(self.fd, data)

    def read_until(self, marker):
        import select
        deadline = time.time() + 10
        while marker not in self.out and time.time() < deadline:
            if select.select([self.fd], [], [], 0.1)[0]:
                try:
                    self.out += os.read(self.fd, 4096)
                except OSError:
                    break

    def close(self):
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        os.close(self.fd)


def zsh_line_run(fake, line):
    """Type `line` and TAB into a real interactive zsh (compinit, then the script) on
    a pty, then Enter: the arguments the fake starget got from the completed line."""
    script = fake.tmp / "_starget"
    script.write_text(P._completion_script("zsh"))
    env = dict(fake.env, HOME=str(fake.tmp), TERM="dumb", PS1="$ ")
    shell = _PtyShell(["zsh", "-f", "-i"], fake.cwd, env)
    try:
        shell.write(b"autoload -U compinit; compinit -u -D; source %s; echo RE''ADY\n" % quote(str(script)).encode())
        shell.read_until(b"READY\r\n")
        time.sleep(0.3)
        if fake.log.exists():
            fake.log.unlink()
        shell.write(line.encode() + b"\t")
        time.sleep(0.5)
        shell.write(b"\necho DO''NE\n")
        shell.read_until(b"DONE\r\n")
    finally:
        shell.close()
    return read_calls(fake.log)


@pytest.mark.skipif(not shutil.which("zsh"), reason="zsh is not installed")
@pytest.mark.parametrize("line, call, path", [
    ("starget get img doc/pkg\\ w", "doc/pkg w", "doc/pkg with spaces/"),
    ("starget get img doc/pkg\\ with\\ sp", "doc/pkg with sp", "doc/pkg with spaces/"),
    ("starget get img etc/", "etc/", "etc/"),                  # ./etc is a local directory too
])
def test_zsh_completion_of_spaces_and_local_dirs(fake_starget, line, call, path):
    calls = zsh_line_run(fake_starget, line)
    assert calls[0] == ["__complete", "img", call], calls
    assert calls[-1] == ["get", "img", path], calls      # what zsh inserted, as the command got it


def run_fish(fake, line):
    script = fake.tmp / "starget.fish"
    script.write_text(P._completion_script("fish"))
    if fake.log.exists():
        fake.log.unlink()
    proc = subprocess.run(["fish", "--no-config", "-c", "source %s; complete -C%s" % (quote(str(script)), quote(line))],
                          env=fake.env, cwd=fake.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr.decode()
    calls = read_calls(fake.log)
    return [r.split("\t")[0] for r in proc.stdout.decode().split("\n") if r], calls


@pytest.mark.skipif(not shutil.which("fish"), reason="fish is not installed")
def test_fish_completion(fake_starget):
    replies, _ = run_fish(fake_starget, "starget ")
    assert sorted(replies) == ["cat", "completion", "diff", "get", "info", "login", "logout", "ls", "tags"]
    replies, _ = run_fish(fake_starget, "starget --platform linux/arm")
    assert sorted(replies) == ["linux/arm/v7", "linux/arm64", "linux/arm64/v8"]
    replies, _ = run_fish(fake_starget, "starget ls img --")
    assert {"--json", "--long", "--sizes", "--platform"} <= set(replies) and "--version" not in replies
    replies, calls = run_fish(fake_starget, "starget -k --platform linux/arm64 -v get 127.0.0.1:5000/i:t e")
    assert sorted(replies) == ["etc.d", "etc/"]
    assert calls == [["-k", "--platform", "linux/arm64", "__complete", "127.0.0.1:5000/i:t", "e"]]
    replies, calls = run_fish(fake_starget, "starget cat img sha256:ab ")
    assert calls == [["__complete", "img", "sha256:ab", ""]]
    replies, calls = run_fish(fake_starget, "starget get img etc/ ou")
    assert replies == ["outdir/"] and calls == []
    replies, calls = run_fish(fake_starget, "starget completion ")
    assert sorted(replies) == ["bash", "fish", "zsh"]


@pytest.mark.skipif(not shutil.which("fish"), reason="fish is not installed")
@pytest.mark.parametrize("line, call, expected", [
    ("starget get img doc/pkg\\ ", "doc/pkg ", ["doc/pkg with spaces/"]),
    ("starget get img 'doc/pkg w", "doc/pkg w", ["doc/pkg with spaces/"]),
    ("starget get img etc", "etc", ["etc.d", "etc/"]),      # ./etc is a local directory too
])
def test_fish_completion_of_spaces_and_local_dirs(fake_starget, line, call, expected):
    replies, calls = run_fish(fake_starget, line)
    assert sorted(replies) == expected and not any("//" in r for r in replies)
    assert calls == [["__complete", "img", call]]


def test_bash_readline_end_to_end(fake_starget):
    """A real interactive bash on a pty: readline's own word splitting and insertion."""
    pytest.importorskip("pty")
    if not shutil.which("bash"):
        pytest.skip("bash is not installed")
    script = fake_starget.tmp / "completion.bash"
    script.write_text(P._completion_script("bash"))
    env = dict(fake_starget.env, INPUTRC="/dev/null", PS1="$ ", TERM="dumb")

    def complete(line):
        shell = _PtyShell(["bash", "--norc", "--noprofile", "-i"], fake_starget.cwd, env)
        try:
            shell.write(b"source %s; echo RE''ADY\n" % str(script).encode())
            shell.read_until(b"READY\r\n$ ")       # readline is waiting: type as a user would
            shell.write(line.encode() + b"\t")
            time.sleep(0.3)
            shell.write(b"\x05 #DONE\n")     # end of line, then a mark
            shell.read_until(b"#DONE\r\n")
        finally:
            shell.close()
        out = [shell.out]
        text = out[0].decode("utf-8", "replace")
        return text[text.index("READY\r\n"):].replace("\x07", "")

    assert "starget get 127.0.0.1:5000/img:latest usr/ #DONE" in \
        complete("starget get 127.0.0.1:5000/img:latest us")
    assert "starget get img@sha256:0123 etc.d  #DONE" in complete("starget get img@sha256:0123 etc.")
    assert "starget --platform=linux/riscv64  #DONE" in complete("starget --platform=linux/r")
    assert "starget get img usr/a:bc  #DONE" in complete("starget get img usr/a:")
    assert "starget cat img with\\ space  #DONE" in complete("starget cat img wi")
    assert "starget get img doc/pkg\\ with\\ spaces/ #DONE" in complete("starget get img doc/pkg\\ w")
    assert "starget get img etc/ #DONE" in complete("starget get img etc/")   # ./etc exists too


@needs_bash
def test_bash_completion_against_the_real_registry(registry_anon, tmp_path):
    """`source <(starget completion bash)` with the real starget first on PATH (a
    wrapper), then the function the script registers completes `starget get IMAGE bin/b`
    from the real registry: the entries of bin/ starting with 'b' (directories and links
    to directories with a trailing '/'). IMAGE has ':'s, which bash splits words at."""
    line = "starget get %s bin/b" % registry_anon.image("basic")
    assert len(bash_words(line)) > 4, bash_words(line)        # IMAGE split at its ':'s, as bash does
    replies = _bash_with_the_real_starget(tmp_path, line)

    files = expected_files("basic", "latest")

    def leads_to_dir(path):
        seen = set()
        while path in files and files[path]["type"] == "symlink" and path not in seen:
            seen.add(path)
            link = files[path]["link"]
            path = os.path.normpath(link if link.startswith("/") else
                                    os.path.join(os.path.dirname(path), link)).lstrip("/")
        return path in files and files[path]["type"] == "dir"

    expected = sorted(p + ("/" if leads_to_dir(p) else "") for p in files
                      if p.startswith("bin/") and "/" not in p[4:] and p[4:].startswith("b"))
    assert expected, "basic has nothing under bin/ starting with 'b'"
    assert replies == expected


@needs_bash
def test_bash_completes_tags_and_repositories_from_the_real_registry(registry_anon, tmp_path):
    """IMAGE: `host:port/repo:` TAB gives its tags (readline replaces only what follows
    the last ':'), `host:port/fixtures/m` the repositories of the catalog."""
    replies = _bash_with_the_real_starget(tmp_path, "starget get %s/fixtures/prefetch:no-" % registry_anon.addr)
    assert replies == ["no-landmark", "no-prefetch"]
    replies = _bash_with_the_real_starget(tmp_path, "starget ls %s/fixtures/m" % registry_anon.addr)
    port = registry_anon.addr.rsplit(":", 1)[1]
    assert replies == [port + "/fixtures/" + lay for lay in sorted(all_layouts()) if lay.startswith("m")]


def _bash_with_the_real_starget(tmp_path, line):
    """COMPREPLY for `line` from the function `source <(starget completion bash)`
    registers, with the real starget first on PATH (a wrapper)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / "starget"
    wrapper.write_text("#!/bin/sh\nSTARGET_CACHE_DIR=%s\nexport STARGET_CACHE_DIR\nexec %s %s \"$@\"\n"
                       % (quote(str(tmp_path / "cache")), quote(sys.executable), quote(STARGET)))
    os.chmod(str(wrapper), 0o755)
    words = bash_words(line)
    program = ("source <(starget completion bash)\n"
               "spec=$(complete -p starget) || exit 3\n"
               "fn=${spec#*-F }\nfn=${fn%%%% *}\n"
               "COMP_WORDBREAKS=%s\nCOMP_WORDS=(%s)\nCOMP_CWORD=%d\nCOMP_LINE=%s\nCOMP_POINT=%d\n"
               "\"$fn\"\nprintf '%%s\\n' \"$spec\" \"${COMPREPLY[@]}\"\n"
               % (quote(BASH_WORDBREAKS), " ".join(quote(w) for w in words), len(words) - 1,
                  quote(line), len(line)))
    env = hermetic_env({"PATH": str(bindir) + os.pathsep + os.environ.get("PATH", "")})
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], env=env, cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr.decode()
    out = [r for r in proc.stdout.decode().split("\n") if r]
    assert re.match(r"^complete -F \S+ starget$", out[0]), out[0]
    return out[1:]


# ---- review fixes: hostile inputs that used to crash or be trusted ------------

def test_a_pax_header_bomb_in_a_streamed_layer_is_refused(httpserver):
    """tarfile reads a pax header whole: one declaring 64 MiB (8 GiB would do the same)
    is refused as a format error before it is read, not loaded into memory."""
    import tarfile
    raw = bytearray()
    bomb = tarfile.TarInfo("././@PaxHeader")
    bomb.type, bomb.size = tarfile.XHDTYPE, 64 << 20
    raw += bomb.tobuf(format=tarfile.USTAR_FORMAT)
    raw += b"\0" * (64 << 20)
    layer = gzip.compress(bytes(raw), 1)
    reg = OCIServer(httpserver)
    reg.add_image("t/bomb", [layer])
    rc, out, err = run_cli("--fallback-stream", "ls", reg.image("t/bomb"))
    line = assert_one_line_error(rc, err, 6)
    assert "pax header" in line


def test_streamed_layer_with_an_absurd_mtime_is_no_internal_error(httpserver, tmp_path):
    import tarfile
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.size, info.pax_headers = 2, {"mtime": "1e30"}
        tar.addfile(info, io.BytesIO(b"ok"))
    reg = OCIServer(httpserver)
    reg.add_image("t/mtime", [gzip.compress(raw.getvalue())])
    rc, out, err = \
        run_cli("--fallback-stream", "ls", "-l", reg.image("t/mtime"))
    assert rc == 0, err
    rc, out, err = run_cli("--fallback-stream", "get", reg.image("t/mtime"), ".", str(tmp_path / "o"))
    assert rc == 0, err
    assert (tmp_path / "o" / "f").read_bytes() == b"ok"


def test_tar_partial_is_never_written_through_a_planted_link(registry_anon, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "out.tar"
    os.symlink(str(victim), str(target) + starget._PARTIAL_SUFFIX)
    rc, out, err = run_cli("get", registry_anon.image("basic"), "etc/", "--tar", str(target))
    assert rc == 0, err
    assert victim.read_text() == "precious"
    assert target.is_file() and not target.is_symlink()


def test_a_redirect_never_carries_a_body_to_another_origin():
    """A token realm answering 302 to another host must not get the refresh token."""
    url = starget._URL("https://auth.example/token")
    for status in (301, 302, 307, 308):
        with pytest.raises(StargzError) as ei:
            starget.Transport._redirect(url, url.origin, "https://other.example/", status, "POST", b"secret")
        assert "request body" in ei.value.message
    assert starget.Transport._redirect(url, url.origin, "https://other.example/", 303, "POST", b"secret")[1:] \
        == ("GET", None)
    same = starget.Transport._redirect(url, url.origin, "/again", 302, "POST", b"secret")
    assert same[2] == b"secret"


def test_toc_xattrs_that_are_not_base64_are_dropped():
    entry = {"name": "f", "type": "reg", "size": 0, "xattrs": {"user.a": "!"}}
    toc = starget.parse_toc(json.dumps({"version": 1, "entries": [entry]}).encode())
    assert toc.entries[0].xattrs is None
    entry["xattrs"] = {"user.a": base64.b64encode(b"v").decode()}
    toc = starget.parse_toc(json.dumps({"version": 1, "entries": [entry]}).encode())
    assert toc.entries[0].xattrs == {"user.a": "dg=="}


def test_a_parsed_cache_entry_with_bad_numbers_is_ignored(tmp_path):
    cache = starget.TOCCache(str(tmp_path))
    entry = {"name": "f", "type": "reg", "size": 3, "offset": 100, "digest": "sha256:" + "a" * 64}
    toc = starget.parse_toc(json.dumps({"version": 1, "entries": [entry]}).encode(), 200)
    blob = "sha256:" + "b" * 64
    cache.put_parsed(blob, toc)
    cache.flush()
    assert cache.get_parsed(blob) is not None
    path = tmp_path / "toc" / (blob.replace(":", "-") + ".parsed.json")
    _forge_parsed_column(path, "size", 0, "3")
    assert cache.get_parsed(blob) is None
    assert [n for n in os.listdir(str(tmp_path / "toc")) if n.endswith(".tmp")] == []
