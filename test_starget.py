# SPDX-License-Identifier: Apache-2.0
# Copyright The starget authors.
"""Tests for starget (the 0.1 slice).

Sections mirror starget.py: errors, logging, references, credentials, transport,
registry, estargz format, image index, download, cli/end-to-end.

Happy paths run against a REAL registry (Debian's docker-registry, started by
testdata/harness.py in three modes: anonymous, htpasswd Basic, Bearer token);
pytest-httpserver covers what a real registry will not do on demand (redirects to
another host, ignoring Range, hostile blobs). Expected results come from
testdata/fixtures/EXPECTED.json only.

Run:  python -m pytest -q test_starget.py
      STARGET_REQUIRE_REGISTRY=1 python -m pytest ...   (fail instead of skip without a registry)
"""
import base64
import hashlib
import json
import os
import re
import sys
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "testdata"))
sys.path.insert(0, HERE)

from harness import (  # noqa: E402
    TOC_DIGEST_ANNOTATION, OCIServer, assert_one_line_error,
    blob_bytes, compare_tree, error_lines, estargz_footer, expected_files, expected_fixture,
    expected_ls, expected_ref, legacy_footer, load_expected, project_ls, read_toc,
    rewrite_toc, run_cli, sha256_digest, snapshot_dir, walk_tree,
    registry_anon, registry_basic, registry_bearer,  # noqa: F401  (pytest fixtures)
)

import starget  # noqa: E402

try:
    from hypothesis import given, settings, HealthCheck, strategies as st
except ImportError:  # pragma: no cover
    given = None


def _hypothesis(fn):
    """Skip a property test when hypothesis is missing."""
    if given is None:
        return pytest.mark.skip(reason="hypothesis not installed")(fn)
    return fn


# ---------------------------------------------------------------------------
# What the fixtures are (all derived from EXPECTED.json)
# ---------------------------------------------------------------------------

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
    return all(l.get("estargz") and l.get("compression") == "gzip" for l in manifest["layers"])


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
    """parent/out (the OUTPUT_DIR, created empty), parent/canary/keep.txt (must stay)."""

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

    def assert_nothing_outside(self):
        assert sorted(os.listdir(self.base)) == self._base_listing, "something written next to parent"
        assert self._outside() == self._before, "something written outside OUTPUT_DIR"

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
                            details={"k": 1})
    assert isinstance(e, Exception)
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


# =============================================================================
# credentials
# =============================================================================

def _auth_config(registry_key, user, password):
    return {"auths": {registry_key: {"auth": base64.b64encode(("%s:%s" % (user, password)).encode()).decode()}}}


def _write_json(path, doc):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
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


# =============================================================================
# estargz format
# =============================================================================

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
def test_parse_footer_zstd_is_unsupported(layout):
    m = expected_ref(layout, _first_ref(layout))
    blob = blob_bytes(layout, m["layers"][0]["digest"])
    with pytest.raises(starget.StargzError) as ei:
        starget.parse_footer(blob[-51:])
    assert ei.value.code == starget.ErrorCode.UNSUPPORTED


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
    _entry = st.fixed_dictionaries({}, optional={
        "name": st.one_of(st.text(max_size=20), st.sampled_from(["a", "a/b", "../x", "./", "/x", "a/.wh.b"])),
        "type": st.sampled_from(["dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk", "x"]),
        "size": _json_leaf, "offset": _json_leaf, "chunkOffset": _json_leaf, "chunkSize": _json_leaf,
        "innerOffset": _json_leaf, "linkName": _json_leaf, "mode": _json_leaf, "digest": _json_leaf,
        "chunkDigest": _json_leaf, "modtime": _json_leaf, "uid": _json_leaf, "xattrs": _json_leaf,
    })

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(entries=st.lists(_entry, max_size=8), version=st.sampled_from([1, 1, 1, 2, "1", None]))
    def test_parse_toc_fuzz_only_stargz_errors(entries, version):
        doc = json.dumps({"version": version, "entries": entries}).encode()
        try:
            toc = starget.parse_toc(doc, toc_offset=1 << 20)
        except starget.StargzError as e:
            assert e.code in (starget.ErrorCode.FORMAT, starget.ErrorCode.UNSAFE)
        else:
            for e in toc.entries:
                assert ".." not in e.path.split("/") and not e.path.startswith("/")


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


# =============================================================================
# download
# =============================================================================

@pytest.fixture
def api_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STARGET_CACHE_DIR", str(tmp_path / "cache"))
    for k in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path


def test_api_open_image_find_and_download(registry_anon, api_env):
    files = expected_files("basic", "latest")
    idx = starget.open_image(registry_anon.image("basic"))
    e = idx.find_file("etc/os-release")
    assert e is not None
    assert e.size == files["etc/os-release"]["size"]
    assert e.digest == "sha256:" + files["etc/os-release"]["sha256"]
    assert idx.find_file("no/such/file") is None
    out = str(api_env / "out")
    stats = starget.Downloader(idx.client).download(idx, "etc/", out)
    assert stats is not None
    assert compare_tree(files, walk_tree(out), prefix="etc") == []


def test_api_blob_restriction(registry_anon, api_env):
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


# =============================================================================
# cli / end-to-end
# =============================================================================

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


@pytest.mark.parametrize("layout", ZSTD_LAYOUTS)
def test_e2e_zstd_is_unsupported(registry_anon, ws, layout):
    rc, out, err = run_cli("get", registry_anon.image(layout, _first_ref(layout)), ".", ws.out)
    line = assert_one_line_error(rc, err, 7)
    assert "zstd" in line.lower() and ("unsupported" in line.lower() or "not supported" in line.lower())
    ws.assert_out_empty()


@pytest.mark.parametrize("layout", PLAIN_GZIP_LAYOUTS + ZSTD_LAYOUTS)
def test_e2e_ls_refuses_unreadable_layers(registry_anon, layout):
    rc, out, err = run_cli("ls", registry_anon.image(layout, _first_ref(layout)))
    assert_one_line_error(rc, err, (6, 7))


def _format_of(layer):
    kind = (layer.get("footer") or {}).get("kind")
    if layer.get("compression") == "zstd":
        return "zstd"
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


def test_e2e_global_flags_after_command(registry_anon):
    plat = "linux/arm64/v8"
    files = expected_files("multiarch", "latest", plat)
    data = _ls_json("ls", "--json", registry_anon.image("multiarch"), "--platform", plat, "--no-progress")
    assert project_ls(data) == expected_ls(files)


def test_e2e_version():
    rc, out, err = run_cli("--version")
    assert rc == 0
    assert starget.__version__ in out + err


@pytest.mark.parametrize("args", [[], ["frobnicate", "x"], ["get"], ["ls", "--concurrency", "abc", "x/y"],
                                  ["--credential", "nocolon", "ls", "127.0.0.1:1/x/y"],
                                  ["--platform", "linux", "ls", "127.0.0.1:1/x/y"]])
def test_e2e_usage_errors(args):
    rc, out, err = run_cli(*args)
    assert rc == 2, (rc, err)
    assert "Traceback" not in err


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


# ---- hostile images (served by pytest-httpserver) --------------------------

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
