# SPDX-License-Identifier: Apache-2.0
# Copyright The starget authors.
"""Ecosystem tests for starget: credentials (auth files, credential helpers), TLS
against a real HTTPS registry, forward proxies, output details, the vendoring API.

Real registries come from testdata/harness.py (anonymous, Basic, and an HTTPS one
started here); a small forward proxy (harness.ForwardProxy) maps the fake name
`registry.test` to 127.0.0.1 so that starget treats the registry as a remote one
(https by default, proxied).

Run:  python -m pytest -q test_ecosystem.py
"""
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "testdata"))
sys.path.insert(0, HERE)

from harness import (  # noqa: E402
    REPO, STARGET, ForwardProxy, OCIServer, assert_one_line_error, compare_tree, error_lines,
    expected_files, expected_ref, helper_calls, hermetic_env, run_cli, start_tls_registry,
    walk_tree, write_credential_helper,
    registry_anon, registry_basic, registry_bearer,  # noqa: F401  (pytest fixtures)
)

import starget  # noqa: E402

BUSYBOX_SHA = expected_files("basic", "latest")["bin/busybox"]["sha256"]
FAST = ["--retries", "0"]


def _write_json(path, doc):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(str(path), "w") as f:
        json.dump(doc, f)


def _b64(user, password):
    return base64.b64encode(("%s:%s" % (user, password)).encode()).decode()


def _auths(key, user, password):
    return {"auths": {key: {"auth": _b64(user, password)}}}


def _reg_paths(files, prefix=""):
    return sorted(p for p, e in files.items()
                  if e["type"] in ("reg", "hardlink") and (not prefix or p.startswith(prefix + "/")))


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


def _no_creds(tmp_path):
    return starget.Credentials(environ={}, home=str(tmp_path / "nohome"))


# =============================================================================
# credentials: unit tests on Credentials(environ=..., home=...).lookup
# =============================================================================

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
    assert isinstance(cred, starget.Credential)
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


# -- credential helpers (unit) -------------------------------------------------

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
    """credHelpers[host] beats auths; auths beat credsStore (which is then not run)."""
    helper = write_credential_helper(helper_dir, "helper", stdout=_helper_json("from-helper", "h"))
    store = write_credential_helper(helper_dir, "store", stdout=_helper_json("from-store", "s"))
    environ = {}
    _place(tmp_path, "DOCKER_CONFIG", {"credHelpers": {HOST: "helper"}, "credsStore": "store",
                                       "auths": {HOST: {"auth": _b64("from-auths", "a")},
                                                 "other.example": {"auth": _b64("o", "o")}}}, environ)
    creds = starget.Credentials(environ=environ, home=str(tmp_path / "home"))
    assert creds.lookup(HOST).username == "from-helper"
    assert creds.lookup("other.example").username == "o"
    assert creds.lookup("third.example").username == "from-store"
    assert len(helper_calls(helper)) == 1
    assert [c["stdin"] for c in helper_calls(store)] == ["third.example"]


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


# =============================================================================
# credentials: end to end against the real Basic registry
# =============================================================================

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


# -- credential helpers end to end --------------------------------------------

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


# =============================================================================
# TLS against a real HTTPS registry
# =============================================================================

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
    assert client.base_url.startswith("https://")
    out = str(api_env / "out")
    _api_get(client, ".", out)
    assert compare_tree(expected_files("basic", "latest"), walk_tree(out)) == []


def test_tls_api_without_ca_is_network_error(tls_registry, api_env):
    client = _tls_client(tls_registry)
    with pytest.raises(starget.StargzError) as ei:
        client.resolve()
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
        client.resolve()
    assert ei.value.code == starget.ErrorCode.NETWORK


def test_tls_api_ssl_cert_file(tls_registry, api_env, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", tls_registry.cacert)
    client = _tls_client(tls_registry)
    out = str(api_env / "out")
    _api_get(client, "etc/os-release", out)
    assert compare_tree(expected_files("basic", "latest"), walk_tree(out), prefix="etc/os-release") == []


# -- TLS through the command line ---------------------------------------------
# starget speaks plain HTTP to 127.0.0.1 and has no flag to change that, so the
# command line reaches the HTTPS registry as registry.test:PORT through the proxy
# (registry.test is in the certificate).

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


# =============================================================================
# proxies
# =============================================================================

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
    client.resolve()
    seen = proxy.seen()
    assert seen and all(h.get("proxy-authorization") == "Basic " + _b64("pu", "p@ss") for m, t, h in seen)


@pytest.mark.parametrize("no_proxy", ["registry.test", ".test", "*", "other.example, registry.test",
                                      "REGISTRY.TEST"])
def test_proxy_no_proxy_bypasses(registry_anon, proxy, api_env, no_proxy):
    client = _proxied_client(registry_anon.addr, {"HTTP_PROXY": proxy.url, "NO_PROXY": no_proxy})
    with pytest.raises(starget.StargzError) as ei:
        client.resolve()
    assert ei.value.code == starget.ErrorCode.NETWORK
    assert "cannot resolve host registry.test" in ei.value.message
    assert proxy.seen() == []


def test_proxy_no_proxy_with_port(registry_anon, proxy, api_env):
    port = registry_anon.addr.rsplit(":", 1)[1]
    client = _proxied_client(registry_anon.addr, {"HTTP_PROXY": proxy.url, "NO_PROXY": "registry.test:%s" % port})
    with pytest.raises(starget.StargzError):
        client.resolve()
    assert proxy.seen() == []
    other = _proxied_client(registry_anon.addr, {"HTTP_PROXY": proxy.url, "NO_PROXY": "registry.test:1"})
    other.resolve()
    assert proxy.seen()


def test_proxy_loopback_never_proxied(registry_anon, api_env):
    transport = starget.Transport(environ={"HTTP_PROXY": "http://127.0.0.1:1", "HTTPS_PROXY": "http://127.0.0.1:1"},
                                  retry=starget.RetryPolicy(retries=0))
    client = starget.RegistryClient(registry_anon.image("basic"), transport=transport,
                                    credentials=starget.Credentials(environ={}, home="/nonexistent"))
    assert client.resolve().layers


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
    client.resolve()
    seen = proxy.seen("CONNECT")
    assert seen and all(h.get("proxy-authorization") == "Basic " + _b64("pu", "secret") for m, t, h in seen)


def test_proxy_refused_api(api_env):
    transport = starget.Transport(environ={"HTTPS_PROXY": "http://127.0.0.1:1"}, retry=starget.RetryPolicy(retries=0))
    client = starget.RegistryClient("registry.test:5000/x/y:1", transport=transport,
                                    credentials=starget.Credentials(environ={}, home="/nonexistent"))
    with pytest.raises(starget.StargzError) as ei:
        client.resolve()
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
# output and commands
# =============================================================================

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
    assert_one_line_error(rc, err, 3)
    assert out == b""


def test_cat_with_blob(registry_anon):
    m = expected_ref("basic", "latest")
    rc, out, err = run_cli("cat", registry_anon.image("basic"), m["layers"][0]["digest"][:15], "bin/busybox",
                           binary=True)
    assert rc == 0, err
    assert hashlib.sha256(out).hexdigest() == BUSYBOX_SHA


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


# -- --fallback-stream ------------------------------------------------------------

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


# =============================================================================
# vendoring: the example in starget.__doc__
# =============================================================================

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
