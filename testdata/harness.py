# SPDX-License-Identifier: Apache-2.0
# Copyright The starget authors.
"""Test infrastructure for starget (imported by test_starget.py).

What lives here:
- paths (REPO, TESTDATA, FIXTURES, REGISTRY_SCRIPTS) and the EXPECTED.json loader;
- real-registry pytest fixtures (session scope): ``registry_anon``, ``registry_basic``,
  ``registry_bearer``. Each starts Debian's ``docker-registry`` on 127.0.0.1 through
  ``testdata/registry/run-registry.sh --background`` and pushes every ref of every layout of
  ``testdata/fixtures/`` into repository ``fixtures/<layout>`` with ``push-oci-layout.py``.
  They skip with a reason when a tool is missing, and fail instead when
  ``STARGET_REQUIRE_REGISTRY=1``;
- ``run_cli(*args, env=None, cwd=None)``: run ``starget.py`` in a subprocess with a hermetic
  environment (own HOME, STARGET_CACHE_DIR, no proxies or auth files of the machine);
- ``walk_tree(root)`` / ``compare_tree(expected_files, actual)``: compare an extracted
  directory with EXPECTED.json's merged view;
- ``OCIServer``: a Distribution-API-v2 look-alike on top of pytest-httpserver, for what a
  real registry will not do on demand (redirect blobs to another host, ignore Range, serve
  hostile blobs), plus ``build_stargz_blob``/``rewrite_toc`` to forge eStargz blobs.

The test module must import the fixture functions by name so pytest sees them:
``from harness import registry_anon, registry_basic, registry_bearer``.
"""
import base64
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest

TESTDATA = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTDATA)
FIXTURES = os.path.join(TESTDATA, "fixtures")
REGISTRY_SCRIPTS = os.path.join(TESTDATA, "registry")
STARGET = os.path.join(REPO, "starget.py")
EXPECTED_PATH = os.path.join(FIXTURES, "EXPECTED.json")

REF_NAME = "org.opencontainers.image.ref.name"
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
LANDMARKS = (".prefetch.landmark", ".no.prefetch.landmark")

# Credentials used by the Basic and Bearer registries.
REGISTRY_USER = "tester"
REGISTRY_PASSWORD = "s3cret-Pa55:word"   # contains ':' on purpose (USER:PASSWORD split)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# =============================================================================
# EXPECTED.json
# =============================================================================

_expected_cache = None


def load_expected():
    """The parsed EXPECTED.json (cached; treat as read-only)."""
    global _expected_cache
    if _expected_cache is None:
        with open(EXPECTED_PATH, encoding="utf-8") as f:
            _expected_cache = json.load(f)
    return _expected_cache


def expected_fixture(layout):
    return load_expected()["fixtures"][layout]


def expected_ref(layout, ref, platform=None):
    """EXPECTED entry of one ref (a manifest); for an index, pick `platform` ("os/arch[/v]")."""
    r = expected_fixture(layout)["refs"][ref]
    if r.get("kind") == "index":
        if platform is None:
            raise KeyError("%s:%s is an index; give a platform (one of %s)"
                           % (layout, ref, sorted(r["manifests"])))
        return r["manifests"][platform]
    return r


def expected_files(layout, ref, platform=None):
    """The merged view {path: entry} of one image (root "" excluded)."""
    return expected_ref(layout, ref, platform)["files"]


def layout_refs(layout):
    """Tags of one OCI layout, from index.json's ref.name annotations (index order)."""
    with open(os.path.join(FIXTURES, layout, "index.json"), encoding="utf-8") as f:
        idx = json.load(f)
    return [m["annotations"][REF_NAME] for m in idx.get("manifests", [])
            if m.get("annotations", {}).get(REF_NAME)]


def all_layouts():
    return sorted(d for d in os.listdir(FIXTURES)
                  if os.path.isfile(os.path.join(FIXTURES, d, "index.json")))


def all_images():
    """[(layout, ref)] for every ref of every layout."""
    return [(lay, ref) for lay in all_layouts() for ref in layout_refs(lay)]


def expected_ls(files):
    """EXPECTED 'files' -> the list `starget ls --json` must print (contract keys subset).

    Compared keys: path, type, mode, size, digest, link, layer.
    """
    out = []
    for path in sorted(files):
        e = files[path]
        if path == "":
            continue
        t = e["type"]
        out.append({
            "path": path,
            "type": t,
            "mode": e["mode"],
            "size": e.get("size", 0) if t in ("reg", "hardlink") else 0,
            "digest": ("sha256:" + e["sha256"]) if t in ("reg", "hardlink") and e.get("sha256") else None,
            "link": e.get("link") if t in ("symlink", "hardlink") else None,
            "layer": e["layer"],
        })
    return out


LS_COMPARED_KEYS = ("path", "type", "mode", "size", "digest", "link", "layer")


def project_ls(entries, keys=LS_COMPARED_KEYS):
    """Keep only the compared keys of `ls --json` objects (missing keys show as '<missing>')."""
    return [{k: e.get(k, "<missing>") for k in keys} for e in entries]


def blob_bytes(layout, digest):
    algo, _, hexd = digest.partition(":")
    with open(os.path.join(FIXTURES, layout, "blobs", algo, hexd), "rb") as f:
        return f.read()


# =============================================================================
# running the CLI
# =============================================================================

_session_tmp = None
_session_tmp_lock = threading.Lock()


def session_tmp():
    """A private temp dir for this test process (removed at exit)."""
    global _session_tmp
    with _session_tmp_lock:
        if _session_tmp is None:
            _session_tmp = tempfile.mkdtemp(prefix="starget-tests-")
            import atexit
            atexit.register(shutil.rmtree, _session_tmp, True)
    return _session_tmp


# Variables that would make a run depend on the machine rather than the test.
_SCRUBBED_ENV = (
    "REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME",
    "XDG_CACHE_HOME", "STARGET_CACHE_DIR", "http_proxy", "https_proxy", "HTTP_PROXY",
    "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY", "SSL_CERT_FILE",
    "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
)


def hermetic_env(extra=None):
    """os.environ without auth files / proxies / caches, with a fresh HOME and cache dir.

    `extra` is merged on top; a value of None removes the variable.
    """
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV and not k.startswith("STARGET_")}
    base = tempfile.mkdtemp(prefix="run-", dir=session_tmp())
    home = os.path.join(base, "home")
    os.makedirs(home)
    env["HOME"] = home
    env["STARGET_CACHE_DIR"] = os.path.join(base, "cache")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["LC_ALL"] = env.get("LC_ALL") or "C.UTF-8"
    env["PYTHONIOENCODING"] = "utf-8"
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_cli(*args, env=None, cwd=None, timeout=120, binary=False, input=None):
    """Run `python starget.py ARGS...`; returns (returncode, stdout, stderr).

    env: extra variables merged onto a hermetic environment (None value removes one);
    STARGET_CACHE_DIR points at a fresh temp dir unless `env` sets it.
    binary=True returns stdout as bytes (stderr is always text).
    """
    full_env = hermetic_env(env)
    proc = subprocess.run(
        [sys.executable, STARGET] + [str(a) for a in args],
        env=full_env, cwd=cwd or full_env["HOME"], input=input,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    out = proc.stdout if binary else proc.stdout.decode("utf-8", "replace")
    return proc.returncode, out, proc.stderr.decode("utf-8", "replace")


ERROR_LINE = re.compile(r"^starget: error: \S.*$")
LOG_LINE = re.compile(r"^starget: (warning|info|debug): ")


def error_lines(stderr):
    """Lines of stderr that are the contract's error line."""
    return [ln for ln in stderr.splitlines() if ln.startswith("starget: error:")]


def assert_one_line_error(rc, stderr, codes):
    """rc is one of `codes` and stderr holds exactly one `starget: error: MESSAGE` line.

    Other stderr lines may only be starget's own log lines (`starget: warning: ...`,
    `starget: info: ...`, `starget: debug: ...`): no traceback, no stray text.
    """
    if isinstance(codes, int):
        codes = (codes,)
    assert rc in codes, "exit code %r not in %r; stderr=%r" % (rc, codes, stderr)
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("starget: error:")]
    assert len(errors) == 1, "expected ONE error line, got %d: %r" % (len(errors), stderr)
    assert ERROR_LINE.match(errors[0]), "not a 'starget: error: MESSAGE' line: %r" % errors[0]
    others = [ln for ln in lines if ln not in errors and not LOG_LINE.match(ln)]
    assert others == [], "stray stderr lines besides the error: %r" % others
    return errors[0]


# =============================================================================
# comparing extracted trees
# =============================================================================

def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def walk_tree(root):
    """{relpath: {type, mode, size, sha256, link, ino, nlink, rdev}} of everything under root.

    Uses lstat (symlinks are not followed). relpath uses '/' and excludes the root itself.
    type: reg dir symlink char block fifo socket; hardlinks show as reg (compare by inode).
    """
    out = {}
    root = os.path.abspath(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            st = os.lstat(full)
            m = st.st_mode
            info = {"mode": stat.S_IMODE(m), "size": None, "sha256": None, "link": None,
                    "ino": (st.st_dev, st.st_ino), "nlink": st.st_nlink, "rdev": None}
            if stat.S_ISREG(m):
                info.update(type="reg", size=st.st_size, sha256=_sha256_file(full))
            elif stat.S_ISDIR(m):
                info["type"] = "dir"
            elif stat.S_ISLNK(m):
                info.update(type="symlink", link=os.readlink(full))
            elif stat.S_ISCHR(m):
                info.update(type="char", rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)))
            elif stat.S_ISBLK(m):
                info.update(type="block", rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)))
            elif stat.S_ISFIFO(m):
                info["type"] = "fifo"
            else:
                info["type"] = "other"
            out[rel] = info
    return out


def compare_tree(expected, actual, prefix="", root=None, hardlinks="inode", devices=None):
    """Differences between EXPECTED `files` and walk_tree() output, as a list of strings.

    expected: {path: entry} (image paths); actual: walk_tree(OUT).
    prefix: only expected paths equal to / under this image path are expected (a
    directory or single-file get), '' = everything; the prefix's parent directories
    may appear in the output (as directories; their modes are not compared).
    hardlinks: "inode" = a hardlink must share its target's inode when both are present;
    "content" = same bytes is enough.
    devices: compare char/block/fifo entries (default: no; starget creates them only
    with --devices, as root); when False they are ignored on both sides.
    """
    if devices is None:
        devices = False
    special = ("char", "block", "fifo")
    diffs = []
    want = {}
    for path, e in expected.items():
        if path == "":
            continue
        if prefix and not (path == prefix or path.startswith(prefix + "/")):
            continue
        if e["type"] in special and not devices:
            continue
        want[path] = e
    ancestors = set()
    if prefix:
        parts = prefix.split("/")
        ancestors = {"/".join(parts[:i]) for i in range(1, len(parts))}
    have = {p: a for p, a in actual.items()
            if (devices or a["type"] not in special) and not (p in ancestors and a["type"] == "dir")}
    for path in sorted(set(have) - set(want)):
        diffs.append("unexpected %s %r in output" % (have[path]["type"], path))
    for path in sorted(set(want) - set(have)):
        diffs.append("missing %s %r" % (want[path]["type"], path))
    for path in sorted(set(want) & set(have)):
        e, a = want[path], have[path]
        t = e["type"]
        if t == "hardlink":
            if a["type"] != "reg":
                diffs.append("%r: hardlink came out as %s" % (path, a["type"]))
                continue
            if a["sha256"] != e["sha256"]:
                diffs.append("%r: hardlink content sha256 %s != %s" % (path, a["sha256"], e["sha256"]))
            target = have.get(e["link"])
            if hardlinks == "inode" and target is not None and target["ino"] != a["ino"]:
                diffs.append("%r: not a hardlink of %r (different inode)" % (path, e["link"]))
            if a["mode"] != e["mode"]:
                diffs.append("%r: mode %o != %o" % (path, a["mode"], e["mode"]))
            continue
        if a["type"] != t:
            diffs.append("%r: type %s != %s" % (path, a["type"], t))
            continue
        if t == "reg":
            if a["size"] != e["size"]:
                diffs.append("%r: size %d != %d" % (path, a["size"], e["size"]))
            if a["sha256"] != e["sha256"]:
                diffs.append("%r: sha256 %s != %s" % (path, a["sha256"], e["sha256"]))
        if t == "symlink":
            if a["link"] != e["link"]:
                diffs.append("%r: symlink target %r != %r" % (path, a["link"], e["link"]))
        elif a["mode"] != e["mode"]:
            # (symlink modes are not settable on Linux; lstat always says 0777)
            diffs.append("%r: mode %04o != %04o" % (path, a["mode"], e["mode"]))
        if t in ("char", "block"):
            if a["rdev"] != (e.get("dev_major", 0), e.get("dev_minor", 0)):
                diffs.append("%r: device %r != %r" % (path, a["rdev"], (e.get("dev_major"), e.get("dev_minor"))))
    return diffs


def snapshot_dir(path):
    """{relpath: (type, size, mtime_ns)} of a directory (to prove nothing was written)."""
    out = {}
    if not os.path.lexists(path):
        return None
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for name in [""] + dirnames + filenames:
            full = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(full)
            rel = os.path.relpath(full, path)
            out[rel] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


# =============================================================================
# real registry fixtures
# =============================================================================

def _require_registry():
    return os.environ.get("STARGET_REQUIRE_REGISTRY", "") == "1"


def _unavailable(reason):
    """Skip (or fail under STARGET_REQUIRE_REGISTRY=1) with a clear reason."""
    if _require_registry():
        pytest.fail("STARGET_REQUIRE_REGISTRY=1 but " + reason, pytrace=False)
    pytest.skip(reason)


def _registry_binary():
    """The registry binary (REGISTRY_BIN overrides, as in run-registry.sh), or None."""
    if os.environ.get("REGISTRY_BIN"):
        return shutil.which(os.environ["REGISTRY_BIN"])
    return shutil.which("docker-registry") or shutil.which("registry")


def _parse_kv(text):
    out = {}
    for line in text.splitlines():
        k, sep, v = line.partition("=")
        if sep and re.match(r"^[A-Z_]+$", k):
            out[k] = v.strip()
    return out


class Registry(object):
    """A running real registry with every fixture pushed."""

    def __init__(self, mode, addr, url, pid, workdir, user=None, password=None, extra=None):
        self.mode, self.addr, self.url, self.pid = mode, addr, url, pid
        self.workdir, self.user, self.password = workdir, user, password
        self.extra = extra or {}
        self.pushed = {}     # (layout, ref) -> image reference

    def image(self, layout, ref="latest"):
        """'127.0.0.1:PORT/fixtures/<layout>:<ref>'."""
        return "%s/fixtures/%s:%s" % (self.addr, layout, ref)

    def image_by_digest(self, layout, digest):
        return "%s/fixtures/%s@%s" % (self.addr, layout, digest)

    @property
    def credential(self):
        """The --credential value (None for an anonymous registry)."""
        if self.user is None:
            return None
        return "%s:%s" % (self.user, self.password)

    def cred_args(self):
        return ["--credential", self.credential] if self.user is not None else []

    def __repr__(self):
        return "<Registry %s %s>" % (self.mode, self.addr)


def _env_for_registry():
    # REGISTRY_* variables override the registry's config file: keep them out.
    return {k: v for k, v in os.environ.items()
            if not k.startswith("REGISTRY_") or k == "REGISTRY_BIN"}


def push_layout(addr, layout, ref, user=None, password=None, repo=None):
    """push-oci-layout.py LAYOUT ADDR/fixtures/LAYOUT:REF --ref REF."""
    target = "%s/%s:%s" % (addr, repo or ("fixtures/" + layout), ref)
    cmd = [sys.executable, os.path.join(REGISTRY_SCRIPTS, "push-oci-layout.py"),
           os.path.join(FIXTURES, layout), target, "--ref", ref, "-q"]
    if user is not None:
        cmd += ["--user", user, "--password", password]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=120, env=_env_for_registry())
    if p.returncode != 0:
        raise RuntimeError("push of %s:%s to %s failed (%d): %s%s"
                           % (layout, ref, addr, p.returncode, p.stdout, p.stderr))
    return target


class _TokenServer(object):
    def __init__(self, workdir, user, password):
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(REGISTRY_SCRIPTS, "token-server.py"), "--dir", workdir,
             "--user", user, "--password", password,
             "--issuer", "starget-test-issuer", "--service", "starget-registry"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
            env=_env_for_registry())
        self.issuer, self.service = "starget-test-issuer", "starget-registry"
        self.info = {}
        lines = []
        result = {}

        def reader():
            for line in self.proc.stdout:
                lines.append(line)
                result.update(_parse_kv(line))
                if "TOKEN_CERTBUNDLE" in result:
                    break

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(60)
        if "TOKEN_REALM" not in result or "TOKEN_CERTBUNDLE" not in result:
            self.stop()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError("token-server did not start: %r %r" % ("".join(lines), err))
        self.info = result
        self.realm = result["TOKEN_REALM"]
        self.certbundle = result["TOKEN_CERTBUNDLE"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for s in (self.proc.stdout, self.proc.stderr):
            try:
                s.close()
            except Exception:  # noqa: BLE001
                pass


def start_registry(mode, workdir, push=True):
    """Start a registry in `mode` (anon | basic | bearer) under workdir; push all fixtures.

    Returns (Registry, stop_function). Raises RuntimeError on failure.
    """
    regdir = os.path.join(workdir, "registry")
    cmd = ["bash", os.path.join(REGISTRY_SCRIPTS, "run-registry.sh"), "--dir", regdir, "--background"]
    user = password = None
    token = None
    if mode == "basic":
        user, password = REGISTRY_USER, REGISTRY_PASSWORD
        cmd += ["--user", user, "--password", password]
    elif mode == "bearer":
        user, password = REGISTRY_USER, REGISTRY_PASSWORD
        token = _TokenServer(os.path.join(workdir, "token"), user, password)
        cmd += ["--token-realm", token.realm, "--token-service", token.service,
                "--token-issuer", token.issuer, "--token-certbundle", token.certbundle]
    elif mode != "anon":
        raise ValueError(mode)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=90, env=_env_for_registry())
    if p.returncode != 0:
        if token:
            token.stop()
        raise RuntimeError("run-registry.sh (%s) failed (%d): %s%s"
                           % (mode, p.returncode, p.stdout, p.stderr))
    kv = _parse_kv(p.stdout)

    def stop():
        subprocess.run(["bash", os.path.join(REGISTRY_SCRIPTS, "run-registry.sh"), "--stop", regdir],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        if token:
            token.stop()

    reg = Registry(mode, kv["REGISTRY_ADDR"], kv["REGISTRY_URL"], kv.get("REGISTRY_PID"), workdir,
                   user, password, extra=dict(kv, **(token.info if token else {})))
    if push:
        try:
            with ThreadPoolExecutor(max_workers=4) as ex:
                futs = {ex.submit(push_layout, reg.addr, lay, ref, user, password): (lay, ref)
                        for lay, ref in all_images()}
                for fut, key in futs.items():
                    reg.pushed[key] = fut.result()
        except Exception:
            stop()
            raise
    return reg, stop


def _registry_fixture(mode):
    binary = _registry_binary()
    if not binary:
        _unavailable("docker-registry binary not found%s (apt-get install docker-registry); "
                     "real-registry tests need it"
                     % (" (REGISTRY_BIN=%s)" % os.environ["REGISTRY_BIN"] if os.environ.get("REGISTRY_BIN") else ""))
    if mode == "basic" and not shutil.which("htpasswd"):
        _unavailable("htpasswd not found (apt-get install apache2-utils); "
                     "the Basic-auth registry needs it")
    if mode == "bearer" and not shutil.which("openssl"):
        _unavailable("openssl not found; token-server.py needs it to make its key")
    workdir = tempfile.mkdtemp(prefix="registry-%s-" % mode, dir=session_tmp())
    try:
        reg, stop = start_registry(mode, workdir)
    except Exception as e:  # noqa: BLE001 - turn into a clear failure
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.fail("could not start the %s registry: %s" % (mode, e), pytrace=False)
    try:
        yield reg
    finally:
        stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def registry_anon():
    """Anonymous registry with every fixture under fixtures/<layout>:<ref>."""
    for r in _registry_fixture("anon"):
        yield r


@pytest.fixture(scope="session")
def registry_basic():
    """htpasswd Basic registry (REGISTRY_USER / REGISTRY_PASSWORD)."""
    for r in _registry_fixture("basic"):
        yield r


@pytest.fixture(scope="session")
def registry_bearer():
    """Bearer-token registry with token-server.py (anonymous pull allowed)."""
    for r in _registry_fixture("bearer"):
        yield r


# =============================================================================
# eStargz forging
# =============================================================================

def estargz_footer(toc_offset):
    """The 51-byte eStargz footer for `toc_offset`."""
    payload = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + len(payload).to_bytes(2, "little") + payload
    return (b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + len(extra).to_bytes(2, "little") + extra
            + b"\x01\x00\x00\xff\xff" + b"\x00" * 8)


def legacy_footer(toc_offset):
    """The 47-byte legacy stargz footer."""
    extra = b"%016xSTARGZ" % toc_offset
    return (b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + len(extra).to_bytes(2, "little") + extra
            + b"\x01\x00\x00\xff\xff" + b"\x00" * 8)


def toc_offset_of(blob):
    """TOC offset from a blob's 51-byte footer (independent of starget)."""
    tail = blob[-51:]
    assert tail[:4] == b"\x1f\x8b\x08\x04" and tail[12:14] == b"SG", "not an eStargz footer"
    return int(tail[16:32], 16)


def read_toc(blob):
    """(toc_offset, toc_json_bytes) of an eStargz blob."""
    off = toc_offset_of(blob)
    raw = zlib.decompressobj(31).decompress(blob[off:len(blob) - 51])
    tf = tarfile.open(fileobj=io.BytesIO(raw))
    m = tf.next()
    assert m.name == "stargz.index.json"
    return off, tf.extractfile(m).read()


def toc_member(toc_json):
    """A gzip member holding the tar entry stargz.index.json + end-of-archive."""
    ti = tarfile.TarInfo("stargz.index.json")
    ti.size = len(toc_json)
    ti.mtime = 0
    ti.type = tarfile.REGTYPE
    hdr = ti.tobuf(format=tarfile.USTAR_FORMAT)
    pad = (-len(toc_json)) % 512
    tar = hdr + toc_json + b"\0" * pad + b"\0" * 1024
    return gzip.compress(tar, 9)


def rewrite_toc(blob, edit):
    """Forge a blob: keep the payload members, replace the TOC by edit(toc_dict).

    Returns (new_blob, new_toc_json_bytes).
    """
    off, raw = read_toc(blob)
    toc = json.loads(raw)
    toc = edit(toc) or toc
    new_json = json.dumps(toc, separators=(",", ":")).encode()
    new_blob = blob[:off] + toc_member(new_json) + estargz_footer(off)
    return new_blob, new_json


def sha256_digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


# =============================================================================
# pytest-httpserver registry look-alike
# =============================================================================

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def parse_range(header, size):
    """'bytes=a-b' / 'bytes=a-' / 'bytes=-n' -> (start, end_inclusive) or None (unsatisfiable).

    Raises ValueError for a malformed or multi-range header.
    """
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header or "")
    if not m or (m.group(1) == "" and m.group(2) == ""):
        raise ValueError("bad range %r" % header)
    a, b = m.group(1), m.group(2)
    if a == "":
        n = int(b)
        if n == 0:
            return None
        return max(0, size - n), size - 1
    start = int(a)
    end = int(b) if b else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


class OCIServer(object):
    """Serve repositories of manifests and blobs on a pytest-httpserver HTTPServer.

    repos: {name: {"manifests": {ref_or_digest: (media_type, bytes)}, "blobs": {digest: bytes}}}
    auth: None | ("basic", user, password) | ("bearer", user, password)
    redirect_to: another OCIServer's base URL (blob GET/HEAD answer 307 there)
    ignore_range: answer 200 with the whole blob to a Range request.
    Every request is recorded in `self.requests` as (method, path, headers dict).
    """

    def __init__(self, httpserver, auth=None, redirect_to=None, ignore_range=False, storage=False):
        self.server = httpserver
        self.repos = {}
        self.auth = auth
        self.redirect_to = redirect_to
        self.ignore_range = ignore_range
        self.storage = storage      # True: serve /storage/<digest> (a redirect target)
        self.requests = []
        self.blobs = {}             # all blobs by digest (for /storage/)
        self.token = "tok-" + hashlib.sha256(os.urandom(16)).hexdigest()[:24]
        self._lock = threading.Lock()
        httpserver.expect_request(re.compile(r"^/.*")).respond_with_handler(self._handle)

    @property
    def base_url(self):
        return "http://%s:%d" % (self.server.host, self.server.port)

    @property
    def addr(self):
        return "%s:%d" % (self.server.host, self.server.port)

    def image(self, repo, ref="latest"):
        sep = "@" if ref.startswith("sha256:") else ":"
        return "%s/%s%s%s" % (self.addr, repo, sep, ref)

    # -- content ------------------------------------------------------------
    def add_blob(self, repo, data):
        d = sha256_digest(data)
        self.repos.setdefault(repo, {"manifests": {}, "blobs": {}})["blobs"][d] = data
        self.blobs[d] = data
        return d

    def add_manifest(self, repo, data, media_type, tag=None):
        r = self.repos.setdefault(repo, {"manifests": {}, "blobs": {}})
        d = sha256_digest(data)
        r["manifests"][d] = (media_type, data)
        if tag:
            r["manifests"][tag] = (media_type, data)
        return d

    def add_layout(self, repo, layout):
        """Serve every blob and every tagged manifest of testdata/fixtures/<layout>."""
        bdir = os.path.join(FIXTURES, layout, "blobs", "sha256")
        with open(os.path.join(FIXTURES, layout, "index.json"), encoding="utf-8") as f:
            idx = json.load(f)
        manifest_digests = {}
        for m in idx["manifests"]:
            manifest_digests[m["digest"]] = m["mediaType"]
            tag = m.get("annotations", {}).get(REF_NAME)
            data = blob_bytes(layout, m["digest"])
            self.add_manifest(repo, data, m["mediaType"], tag)
            doc = json.loads(data)
            for child in doc.get("manifests", []):
                manifest_digests[child["digest"]] = child["mediaType"]
                self.add_manifest(repo, blob_bytes(layout, child["digest"]), child["mediaType"])
        for name in os.listdir(bdir):
            d = "sha256:" + name
            if d not in manifest_digests:
                self.add_blob(repo, blob_bytes(layout, d))

    def add_image(self, repo, layer_blobs, tag="latest", annotations=None, config=None,
                  layer_media_type=OCI_LAYER_GZIP):
        """Build and serve an OCI manifest over `layer_blobs`; returns the manifest digest.

        annotations: list (one dict or None per layer).
        """
        if config is None:
            config = json.dumps({"architecture": "amd64", "os": "linux",
                                 "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        cd = self.add_blob(repo, config)
        layers = []
        for i, blob in enumerate(layer_blobs):
            d = self.add_blob(repo, blob)
            desc = {"mediaType": layer_media_type, "digest": d, "size": len(blob)}
            ann = (annotations or [None] * len(layer_blobs))[i]
            if ann:
                desc["annotations"] = ann
            layers.append(desc)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": len(config)},
                               "layers": layers}).encode()
        return self.add_manifest(repo, manifest, OCI_MANIFEST, tag)

    # -- HTTP -----------------------------------------------------------------
    def requests_to(self, pattern):
        return [r for r in self.requests if re.search(pattern, r[1])]

    def _resp(self, status, body=b"", headers=None, content_type="application/json"):
        from werkzeug.wrappers import Response
        h = {"Docker-Distribution-API-Version": "registry/2.0"}
        h.update(headers or {})
        r = Response(body, status=status, headers=h, content_type=content_type)
        return r

    def _error(self, status, code, message, headers=None):
        return self._resp(status, json.dumps({"errors": [{"code": code, "message": message}]}).encode(),
                          headers)

    def _authorized(self, request):
        if not self.auth:
            return True
        got = request.headers.get("Authorization", "")
        kind, user, pw = self.auth
        if kind == "basic":
            want = "Basic " + base64.b64encode(("%s:%s" % (user, pw)).encode()).decode()
            return got == want
        return got == "Bearer " + self.token

    def _challenge(self, scope=None):
        kind = self.auth[0]
        if kind == "basic":
            h = 'Basic realm="oci-server"'
        else:
            h = 'Bearer realm="%s/token",service="oci-server"' % self.base_url
            if scope:
                h += ',scope="%s"' % scope
        return self._error(401, "UNAUTHORIZED", "authentication required", {"WWW-Authenticate": h})

    def _handle(self, request):
        with self._lock:
            self.requests.append((request.method, request.full_path.rstrip("?"), dict(request.headers)))
        path = request.path
        if path == "/token" and self.auth and self.auth[0] == "bearer":
            got = request.headers.get("Authorization", "")
            want = "Basic " + base64.b64encode(("%s:%s" % self.auth[1:]).encode()).decode()
            if got and got != want:
                return self._error(401, "UNAUTHORIZED", "bad credentials",
                                   {"WWW-Authenticate": 'Basic realm="token"'})
            return self._resp(200, json.dumps({"token": self.token, "expires_in": 300}).encode())
        if self.storage and path.startswith("/storage/"):
            d = path[len("/storage/"):]
            if d not in self.blobs:
                return self._resp(404, b"no such object", content_type="text/plain")
            return self._serve_bytes(request, self.blobs[d])
        if path in ("/v2/", "/v2"):
            if not self._authorized(request):
                return self._challenge()
            return self._resp(200, b"{}")
        m = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", path)
        if not m:
            return self._resp(404, b"404 page not found", content_type="text/plain")
        repo, kind, ref = m.groups()
        if not self._authorized(request):
            return self._challenge("repository:%s:pull" % repo)
        r = self.repos.get(repo)
        if kind == "manifests":
            if r is None or ref not in r["manifests"]:
                return self._error(404, "MANIFEST_UNKNOWN", "manifest unknown")
            mt, data = r["manifests"][ref]
            h = {"Docker-Content-Digest": sha256_digest(data)}
            # (werkzeug drops the body of a HEAD answer and keeps Content-Length)
            return self._resp(200, data, h, content_type=mt)
        if r is None or ref not in r["blobs"]:
            return self._error(404, "BLOB_UNKNOWN", "blob unknown to registry")
        if self.redirect_to:
            loc = "%s/storage/%s?X-Signature=abc123" % (self.redirect_to, ref)
            return self._resp(307, b"", {"Location": loc}, content_type="text/plain")
        return self._serve_bytes(request, r["blobs"][ref], sha256_digest(r["blobs"][ref]))

    def _serve_bytes(self, request, data, digest=None):
        h = {"Accept-Ranges": "bytes"}
        if digest:
            h["Docker-Content-Digest"] = digest
        rng = request.headers.get("Range")
        if rng and not self.ignore_range:
            try:
                span = parse_range(rng, len(data))
            except ValueError:
                return self._resp(416, b"invalid range", {"Content-Range": "bytes */%d" % len(data)},
                                  content_type="text/plain")
            if span is None:
                return self._resp(416, b"invalid range", {"Content-Range": "bytes */%d" % len(data)},
                                  content_type="text/plain")
            a, b = span
            h["Content-Range"] = "bytes %d-%d/%d" % (a, b, len(data))
            return self._resp(206, data[a:b + 1], h,
                              content_type="application/octet-stream")
        return self._resp(200, data, h, content_type="application/octet-stream")


# =============================================================================
# ecosystem helpers: a TLS registry, a forward proxy, fake credential helpers
# =============================================================================

def make_tls_cert(directory, dns_names=("localhost",), ips=("127.0.0.1",)):
    """A self-signed cert.pem/key.pem under `directory` (for run-registry.sh --tls, which
    keeps an existing non-empty tls/cert.pem). Returns the cert path."""
    os.makedirs(directory, exist_ok=True)
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    san = ",".join(["DNS:%s" % n for n in dns_names] + ["IP:%s" % i for i in ips])
    p = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=starget-test", "-addext", "subjectAltName=" + san,
                        "-keyout", key, "-out", cert],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError("openssl failed: %s" % p.stderr)
    return cert


def start_tls_registry(workdir, images=(("basic", "latest"),), dns_names=("localhost",)):
    """An anonymous registry over HTTPS on 127.0.0.1 whose certificate also names
    `dns_names`; pushes `images` [(layout, ref)] to fixtures/<layout>.
    Returns (Registry, stop); Registry.extra["REGISTRY_CACERT"] is the CA (the cert itself)."""
    regdir = os.path.join(workdir, "registry")
    make_tls_cert(os.path.join(regdir, "tls"), dns_names=dns_names)
    script = os.path.join(REGISTRY_SCRIPTS, "run-registry.sh")
    p = subprocess.run(["bash", script, "--dir", regdir, "--tls", "--background"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       timeout=90, env=_env_for_registry())
    if p.returncode != 0:
        raise RuntimeError("run-registry.sh --tls failed (%d): %s%s" % (p.returncode, p.stdout, p.stderr))
    kv = _parse_kv(p.stdout)

    def stop():
        subprocess.run(["bash", script, "--stop", regdir], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)

    reg = Registry("tls", kv["REGISTRY_ADDR"], kv["REGISTRY_URL"], kv.get("REGISTRY_PID"), workdir, extra=kv)
    try:
        for layout, ref in images:
            target = "%s/fixtures/%s:%s" % (reg.addr, layout, ref)
            q = subprocess.run([sys.executable, os.path.join(REGISTRY_SCRIPTS, "push-oci-layout.py"),
                                os.path.join(FIXTURES, layout), target, "--ref", ref, "-q",
                                "--https", "--cacert", kv["REGISTRY_CACERT"]],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                               timeout=120, env=_env_for_registry())
            if q.returncode != 0:
                raise RuntimeError("push of %s over https failed: %s%s" % (target, q.stdout, q.stderr))
            reg.pushed[(layout, ref)] = target
    except Exception:
        stop()
        raise
    return reg, stop


class ForwardProxy(object):
    """A tiny threaded HTTP forward proxy on 127.0.0.1.

    - absolute-form requests (`GET http://host:port/path`) are forwarded for plain HTTP
      (one upstream connection per request; the client connection is kept alive);
    - `CONNECT host:port` opens a tunnel (for HTTPS).
    `hosts` maps fake names to addresses (e.g. {"registry.test": "127.0.0.1"}); other
    names are resolved normally. Every request line is recorded in `self.requests` as
    (method, target, headers dict with lower-case names).
    """

    def __init__(self, hosts=None):
        import socketserver
        global socket
        import socket
        self.hosts = dict(hosts or {})
        self.requests = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                try:
                    proxy._serve(self.request)
                except OSError:
                    pass

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def seen(self, method=None):
        with self._lock:
            return [r for r in self.requests if method is None or r[0] == method]

    def _resolve(self, host):
        return self.hosts.get(host.lower(), host)

    @staticmethod
    def _read_head(sock, buf):
        while b"\r\n\r\n" not in buf:
            data = sock.recv(65536)
            if not data:
                return None, buf
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        return head.decode("latin-1"), rest

    def _serve(self, sock):
        import http.client
        from urllib.parse import urlsplit
        buf = b""
        while True:
            head, buf = self._read_head(sock, buf)
            if head is None:
                return
            lines = head.split("\r\n")
            method, target, _version = (lines[0].split(" ", 2) + ["", ""])[:3]
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            with self._lock:
                self.requests.append((method, target, headers))
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                try:
                    upstream = socket.create_connection((self._resolve(host), int(port)), timeout=10)
                except (OSError, ValueError):
                    sock.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                    return
                sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if buf:
                    upstream.sendall(buf)
                self._pipe(sock, upstream)
                return
            parts = urlsplit(target)
            if parts.scheme != "http" or not parts.hostname:
                sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            length = int(headers.get("content-length") or 0)
            while len(buf) < length:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
            body, buf = buf[:length], buf[length:]
            hop = ("connection", "proxy-connection", "keep-alive", "proxy-authorization", "te",
                   "trailer", "transfer-encoding", "upgrade")
            fwd = {k: v for k, v in headers.items() if k not in hop}
            path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
            try:
                up = http.client.HTTPConnection(self._resolve(parts.hostname), parts.port or 80, timeout=30)
                up.request(method, path, body=body or None, headers=fwd)
                resp = up.getresponse()
                data = resp.read()
                status, reason, rheaders = resp.status, resp.reason, resp.getheaders()
                up.close()
            except OSError:
                sock.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                continue
            out = ["HTTP/1.1 %d %s" % (status, reason)]
            for k, v in rheaders:
                if k.lower() in ("transfer-encoding", "connection", "keep-alive") or \
                        (k.lower() == "content-length" and method != "HEAD"):
                    continue
                out.append("%s: %s" % (k, v))
            if method != "HEAD":
                out.append("Content-Length: %d" % len(data))
            sock.sendall(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + (data if method != "HEAD" else b""))

    @staticmethod
    def _pipe(a, b):
        import select
        socks = [a, b]
        try:
            while True:
                ready, _, _ = select.select(socks, [], [], 60)
                if not ready:
                    return
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        finally:
            b.close()


def write_credential_helper(directory, name, stdout="", stderr="", code=0):
    """An executable `docker-credential-NAME` in `directory` that records each call
    (argv and stdin) as one JSON line in `directory/NAME.calls`, then prints `stdout`
    and `stderr` and exits with `code`. Returns the path of the calls file."""
    os.makedirs(directory, exist_ok=True)
    calls = os.path.join(directory, name + ".calls")
    path = os.path.join(directory, "docker-credential-" + name)
    with open(path, "w") as f:
        f.write("#!%s\n" % sys.executable)
        f.write("import json, sys\n"
                "data = sys.stdin.read()\n"
                "with open(%r, 'a') as f:\n"
                "    f.write(json.dumps({'argv': sys.argv[1:], 'stdin': data}) + '\\n')\n"
                "sys.stdout.write(%r)\n"
                "sys.stderr.write(%r)\n"
                "sys.exit(%d)\n" % (calls, stdout, stderr, code))
    os.chmod(path, 0o755)
    return calls


def helper_calls(calls_file):
    """The recorded calls of a fake credential helper ([] when never called)."""
    if not os.path.exists(calls_file):
        return []
    with open(calls_file) as f:
        return [json.loads(line) for line in f if line.strip()]
