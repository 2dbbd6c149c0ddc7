#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
# Copyright The starget authors.
"""starget: get files out of eStargz container images without pulling them.

One file, standard library only, CPython 3.6 to 3.13. It reads an eStargz
layer's footer and table of contents (TOC), then fetches only the gzip
members that hold the wanted files, with HTTP Range requests.

    python3 starget.py get registry.example.com/team/tools:1.4 bin/ ./out
    python3 starget.py ls --json 127.0.0.1:5000/test/img:latest

Map of this file (sections in the order data flows; each uses only those above):

    errors        StargzError (typed: code, transient, damaged, retry_after), ErrorCode
                  (the exit codes), _NotEStargzError, _TLSHandshakeError
    logging       _log, _redact: levels; secrets scrubbed from every line;
                  _configure_logging adds and removes only its own handler
    references    ImageRef (also docker://), Platform
    credentials   Credentials: --credential, auth files, docker credential helpers
    config        _GLOBAL_OPTIONS (the one option table: flags, config keys, defaults,
                  checks, completion words), _parse_simple_yaml, Config
    transport     RetryPolicy (run: the one retry loop; decide: the one decision),
                  _ConnectionPool, _Response, Transport (TLS, proxies, redirects; one
                  attempt per request)
    registry      media type tables, _Endpoint (host, scheme, role, its own auth),
                  _endpoint_fallback, _RegistryAuth (challenges, tokens), RegistryClient
    formats       pure, no I/O: _ImageManifest/_ImageIndexManifest.from_json,
                  _choose_platform; parse_footer, _extract_toc_json, _inflate_members,
                  parse_toc (_TOCReader), TOCEntry, Chunk, LayerTOC
    image index   TOCCache, _fetch_layer_toc, _StreamedLayerTOC (--fallback-stream),
                  _resolve_manifest (walks the endpoints), ImageIndex (merged view),
                  open_image
    download      DownloadJob (the pure plan), _Fetcher (ranges in, verified chunks
                  out), _TreeWriter/_PartialFile (destination, resume, links,
                  metadata), ExtractionPolicy, _Run (one run's state), Downloader
    file objects  _ImageFile (ImageIndex.open, open): one file read by Range requests
                  as it is read, each chunk verified before a byte of it is returned
    cli           main: argparse commands, output formats, shell completion

Public API (`__all__`; stable; everything else has a leading underscore):

    __version__, StargzError, ErrorCode, ImageRef, Platform, Credentials, Config,
    RetryPolicy, Transport, RegistryClient, parse_footer, parse_toc, LayerTOC,
    TOCEntry, Chunk, ImageIndex, TOCCache, open_image, DownloadJob, Downloader,
    DownloadStats, ExtractionPolicy, open, main

Example:

    import starget
    index = starget.open_image("127.0.0.1:5000/test/img:latest")
    print(index.find_file("etc/os-release").size)
    stats = starget.Downloader(index.client).download(index, "etc/", "out")
    print(stats.files, stats.bytes)
    with index.open("data/big.bin") as f:   # fetches only the chunk it reads
        f.seek(1000000)
        print(f.read(4))
"""

__version__ = "0.1.0"
__all__ = [
    "__version__", "StargzError", "ErrorCode", "ImageRef", "Platform", "Credentials", "Config",
    "RetryPolicy", "Transport", "RegistryClient", "parse_footer", "parse_toc", "LayerTOC",
    "TOCEntry", "Chunk", "ImageIndex", "TOCCache", "open_image", "DownloadJob", "Downloader",
    "DownloadStats", "ExtractionPolicy", "open", "main",
]

import base64
import hashlib
import io
import json
import logging
import os
import posixpath
import random
import re
import socket
import stat
import sys
import threading
import time
import zlib
from enum import IntEnum
# http.client, ssl, subprocess, calendar, argparse and concurrent.futures are
# imported where they are used, so that `starget --help` starts fast.

# =============================================================================
# errors
# =============================================================================

class ErrorCode(IntEnum):
    """What went wrong; the value is the process exit code."""
    INTERNAL = 1      # a bug in starget
    USAGE = 2         # bad arguments or configuration
    NOT_FOUND = 3     # image, tag, layer or path does not exist
    AUTH = 4          # authentication or authorisation failed
    NETWORK = 5       # connection, timeout, server error (after retries)
    FORMAT = 6        # not eStargz, or a malformed / hostile footer or TOC
    UNSUPPORTED = 7   # a layer format starget does not read (zstd, ...)
    INTEGRITY = 8     # a digest did not match
    UNSAFE = 9        # a write outside the destination was refused
    IO = 10           # a local file system error
    PARTIAL = 11      # some files failed, the others were written
    INTERRUPTED = 130  # Ctrl-C; re-run the same command to resume


class StargzError(Exception):
    """The one exception family starget raises: a code, a one-line message, a cause.

    Two typed attributes say whether trying again can help; `RetryPolicy.decide` is
    the one place that reads them:
      transient  a fault of the moment (connection, timeout, 429/5xx, a broken body):
                 another attempt after a pause may succeed;
      damaged    bytes arrived but came out wrong (corrupt gzip, a digest mismatch):
                 fetching them once more may succeed.
    `retry_after` is the wait a server asked for (429/503), in seconds."""

    def __init__(self, code, message, cause=None, transient=False, damaged=False, retry_after=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.cause = cause
        self.transient, self.damaged, self.retry_after = transient, damaged, retry_after

    @property
    def exit_code(self):
        return int(self.code)

    def __str__(self):
        return self.message


class _NotEStargzError(StargzError):
    """A layer that is not eStargz (plain tar+gzip, no footer): `--fallback-stream`
    streams it instead."""


class _TLSHandshakeError(StargzError):
    """The server does not speak TLS at all (not a failed verification): an endpoint
    that allows plain HTTP may be tried over http:// instead."""


def _fail(code, message, cause=None, **attributes):
    """Raise a StargzError; a `cause` becomes its __cause__ (as `raise ... from`)."""
    error = StargzError(code, message, cause, **attributes)
    if cause is not None:
        raise error from cause
    raise error


def _reworded(error, message):
    """A copy of `error` saying `message` (raise it `from` the original), so that no
    message is changed while the exception is in flight."""
    return error.__class__(error.code, message, error.cause, error.transient, error.damaged, error.retry_after)


# =============================================================================
# logging
# =============================================================================

_log = logging.getLogger("starget")
_log.addHandler(logging.NullHandler())

_secrets = set()
_secrets_lock = threading.Lock()
# Header and query forms that carry credentials, scrubbed even when unregistered.
_SECRET_PATTERNS = [
    re.compile(r"(?i)(authorization:\s*\w+\s+)\S+"),
    re.compile(r"(?i)((?:access_token|token|refresh_token|password|secret)[\"']?\s*[=:]\s*[\"']?)[^\s\"'&,}]+"),
]


def _register_secret(value):
    """Never print this string: passwords, tokens, header values."""
    if value and len(value) >= 4:
        with _secrets_lock:
            _secrets.add(value)


def _redact(text):
    """Return text with every registered secret and credential form masked."""
    text = str(text)
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, "***")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1***", text)
    return text


class _RedactingFormatter(logging.Formatter):
    """`starget: warning: ...` with every secret masked."""

    def format(self, record):
        text = "starget: %s: %s" % (record.levelname.lower(), record.getMessage())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return _redact(text)


def _configure_logging(verbose=False, debug=False, stream=None):
    """CLI logging: warnings by default, info with --verbose, everything with --debug.

    Returns a function that undoes exactly this: it removes the one handler added
    here and restores the logger's level and propagation. A program that vendors
    starget and calls main() keeps the handlers it attached to the `starget` logger.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_RedactingFormatter())
    level, propagate = _log.level, _log.propagate
    _log.addHandler(handler)
    _log.setLevel(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
    _log.propagate = False     # stderr gets each line once, not again from the root logger

    def restore():
        _log.removeHandler(handler)
        _log.setLevel(level)
        _log.propagate = propagate
    return restore



# =============================================================================
# references
# =============================================================================

_DOCKER_HUB = "registry-1.docker.io"
_DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
_REPO_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(r"^%s(?:/%s)*\Z" % (_REPO_COMPONENT, _REPO_COMPONENT))
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_REGISTRY_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?\Z")   # host[:port]
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
# skopeo/podman transports other than docker:// (a registry): local files and daemons.
_OTHER_TRANSPORT_RE = re.compile(r"^(oci|oci-archive|docker-archive|docker-daemon|containers-storage|dir|"
                                 r"ostree|sif|tarball):(?![0-9])")   # `dir:5000/x` is a registry with a port


def _host_of(registry):
    """'host:port' or '[v6]:port' -> host, without the port."""
    if registry.startswith("["):
        return registry[:registry.index("]") + 1] if "]" in registry else registry
    return registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry


def _is_loopback(registry):
    host = _host_of(registry)
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


class ImageRef(object):
    """A parsed `[registry/]repository[:tag][@sha256:...]`, normalised like docker."""

    __slots__ = ("registry", "repository", "tag", "digest")

    def __init__(self, registry, repository, tag=None, digest=None):
        self.registry, self.repository, self.tag, self.digest = registry, repository, tag, digest

    @classmethod
    def parse(cls, text):
        """Also accepts skopeo's `docker://` transport prefix; other transports
        (oci:, docker-archive:, ...) are refused: starget reads registries only."""
        if not isinstance(text, str) or not text or len(text) > 4096 or text != text.strip():
            _fail(ErrorCode.USAGE, "invalid image reference %r" % (text,))
        if text.startswith("docker://"):
            text = text[len("docker://"):]
        transport = _OTHER_TRANSPORT_RE.match(text)
        if transport:
            _fail(ErrorCode.USAGE, "%r names the %s transport: starget reads images from registries only "
                  "(IMAGE is [docker://][registry/]repository[:tag][@sha256:...])" % (text, transport.group(1)))
        name, digest = text, None
        if "@" in text:
            name, digest = text.split("@", 1)
            if not _DIGEST_RE.match(digest):
                _fail(ErrorCode.USAGE, "invalid digest in image reference %r (want sha256:<64 hex>)" % text)
        tag = None
        last = name.rsplit("/", 1)[-1]
        if ":" in last:
            name, tag = name.rsplit(":", 1)
            if not _TAG_RE.match(tag):
                _fail(ErrorCode.USAGE, "invalid tag %r in image reference %r" % (tag, text))
        first, _, rest = name.partition("/")
        if rest and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            registry, repository = first, rest
        else:
            registry, repository = "docker.io", name
        if registry in ("docker.io", "index.docker.io", _DOCKER_HUB):
            registry = _DOCKER_HUB
            if "/" not in repository:
                repository = "library/" + repository
        if not _REPO_RE.match(repository) or len(repository) > 255:
            _fail(ErrorCode.USAGE, "invalid repository name %r in image reference %r "
                  "(lower-case letters, digits, separators)" % (repository, text))
        if not _REGISTRY_RE.match(registry):
            _fail(ErrorCode.USAGE, "invalid registry %r in image reference %r" % (registry, text))
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, repository, tag, digest)

    @property
    def reference(self):
        """What goes after /manifests/: the digest when pinned, else the tag."""
        return self.digest or self.tag

    @property
    def loopback(self):
        return _is_loopback(self.registry)

    def __str__(self):
        text = "%s/%s" % (self.registry, self.repository)
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + self.digest
        return text

    def __repr__(self):
        return "ImageRef(%r)" % str(self)

    def __eq__(self, other):
        return isinstance(other, ImageRef) and str(self) == str(other)

    def __hash__(self):
        return hash(str(self))


_MACHINE_TO_ARCH = {
    "x86_64": ("amd64", None), "amd64": ("amd64", None), "i386": ("386", None),
    "i686": ("386", None), "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None), "riscv64": ("riscv64", None),
}


class Platform(object):
    """`os/arch[/variant]` as in OCI image indexes."""

    __slots__ = ("os", "architecture", "variant")

    def __init__(self, os_name, architecture, variant=None):
        self.os, self.architecture = os_name, architecture
        self.variant = str(variant) if variant else None

    @classmethod
    def parse(cls, text):
        parts = (text or "").strip().split("/")
        if len(parts) not in (2, 3) or not all(re.match(r"^[A-Za-z0-9._-]+\Z", p) for p in parts):
            _fail(ErrorCode.USAGE, "invalid platform %r (want os/arch[/variant], e.g. linux/arm64)" % (text,))
        return cls(*parts)

    @classmethod
    def host(cls):
        machine = os.uname().machine.lower() if hasattr(os, "uname") else "x86_64"
        arch, variant = _MACHINE_TO_ARCH.get(machine, (machine, None))
        os_name = "linux" if sys.platform.startswith("linux") else sys.platform.rstrip("0123456789")
        return cls(os_name, arch, variant)

    @classmethod
    def from_descriptor(cls, desc):
        plat = desc.get("platform")
        plat = plat if isinstance(plat, dict) else {}
        return cls(str(plat.get("os", "")), str(plat.get("architecture", "")), plat.get("variant"))

    def matches(self, other):
        """Does an index entry `other` satisfy this requested platform?"""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        if self.variant is None:
            return True
        default = "v8" if self.architecture == "arm64" else None
        return (other.variant or default) == self.variant

    def __str__(self):
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


# =============================================================================
# credentials
# =============================================================================

class _Credential(object):
    """A user and secret for one registry; `identity_token` replaces the password."""

    __slots__ = ("username", "password", "identity_token", "source")

    def __init__(self, username, password=None, identity_token=None, source=""):
        self.username, self.password = username, password
        self.identity_token, self.source = identity_token, source
        _register_secret(password)
        _register_secret(identity_token)

    def basic_header(self):
        raw = ("%s:%s" % (self.username, self.password or "")).encode("utf-8")
        value = "Basic " + base64.b64encode(raw).decode("ascii")
        _register_secret(value.split(" ", 1)[1])
        return value

    def __repr__(self):
        return "Credential(%r, source=%r)" % (self.username, self.source)


def _auth_key_host(key):
    """Normalise an auth-file key: 'https://host/v1/' -> 'host', 'host/ns/repo' kept."""
    key = re.sub(r"^[a-z]+://", "", key.strip()).rstrip("/")
    if key.endswith("/v1") or key.endswith("/v2"):
        key = key[:-3]
    if key in ("index.docker.io", "docker.io"):
        key = _DOCKER_HUB
    elif key.startswith("index.docker.io/") or key.startswith("docker.io/"):
        key = _DOCKER_HUB + "/" + key.split("/", 1)[1]
    return key


def _helper_server(registry):
    """The server name docker's credential helpers know a registry by."""
    return _DOCKER_HUB_AUTH_KEY if registry == _DOCKER_HUB else registry


def _cred_helper_of(config, registry):
    """The NAME of `credHelpers[registry]` in a docker config, or None."""
    helpers = config.get("credHelpers")
    for key, helper in (helpers.items() if isinstance(helpers, dict) else ()):
        if isinstance(key, str) and _auth_key_host(key) == registry and isinstance(helper, str) and helper:
            return helper
    return None


def _creds_store_of(config):
    store = config.get("credsStore")
    return store if isinstance(store, str) and store else None


def _run_helper(program, action, data, environ):
    """`program action` (a docker-credential-NAME) with `data` on stdin: the finished
    process. OSError (not found, not executable) and TimeoutExpired pass through."""
    import shutil
    import subprocess
    path = shutil.which(program, path=environ.get("PATH") or os.environ.get("PATH", os.defpath))
    if path is None:
        raise FileNotFoundError(2, "not found on PATH")
    # On timeout, run() kills the helper and reaps it before raising.
    return subprocess.run([path, action], input=data.encode("utf-8"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=60)


def _helper_message(proc):
    """The first line a failed helper printed (helpers print errors on stdout or stderr)."""
    message = (proc.stdout.decode("utf-8", "replace").strip()
               or proc.stderr.decode("utf-8", "replace")).strip().splitlines()
    return message[0] if message else "exit status %d" % proc.returncode


class Credentials(object):
    """Finds credentials for a registry, first hit wins, cached for the run.

    Order: the explicit `--credential`; `REGISTRY_AUTH_FILE`; podman's
    `$XDG_RUNTIME_DIR/containers/auth.json` and `~/.config/containers/auth.json`;
    docker's `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`. In each file
    `credHelpers[host]`, then `credsStore`, then `auths`. Only `login` and `logout`
    write one of them (_LoginStore).
    """

    def __init__(self, explicit=None, environ=None, home=None):
        self.environ = os.environ if environ is None else environ
        self.home = home or self.environ.get("HOME") or os.path.expanduser("~")
        self.explicit = None
        if explicit:
            if ":" not in explicit:
                _fail(ErrorCode.USAGE, "--credential wants USER:PASSWORD")
            user, password = explicit.split(":", 1)
            self.explicit = _Credential(user, password, source="--credential")
        self._cache = {}
        self._lock = threading.Lock()

    def auth_files(self):
        env, files = self.environ, []
        if env.get("REGISTRY_AUTH_FILE"):
            files.append(env["REGISTRY_AUTH_FILE"])
        if env.get("XDG_RUNTIME_DIR"):
            files.append(os.path.join(env["XDG_RUNTIME_DIR"], "containers", "auth.json"))
        config_home = env.get("XDG_CONFIG_HOME") or os.path.join(self.home, ".config")
        files.append(os.path.join(config_home, "containers", "auth.json"))
        docker_dir = env.get("DOCKER_CONFIG") or os.path.join(self.home, ".docker")
        files.append(os.path.join(docker_dir, "config.json"))
        return files

    def lookup(self, registry, repository=""):
        if self.explicit:
            return self.explicit
        key = (registry, repository)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._find(registry, repository)
            return self._cache[key]

    def _find(self, registry, repository):
        for path in self.auth_files():
            config = self._load(path)
            if config is None:
                continue
            found = self._from_config(config, path, registry, repository)
            if found is not None:
                _log.debug("credentials for %s from %s", registry, found.source)
                return found
        return None

    @staticmethod
    def _load(path):
        try:
            with io.open(path, "rb") as f:
                config = json.loads(f.read().decode("utf-8"))
        except (IOError, OSError):
            return None
        except ValueError as e:
            _fail(ErrorCode.USAGE, "cannot parse credentials file %s: %s" % (path, e), e)
        if not isinstance(config, dict):
            _fail(ErrorCode.USAGE, "credentials file %s is not a JSON object" % path)
        return config

    def _from_config(self, config, path, registry, repository):
        """docker's order: the host's credHelper, then credsStore (which keeps only
        empty placeholders in `auths`), then `auths` itself."""
        helper = _cred_helper_of(config, registry)
        if helper:
            return self._from_helper(helper, registry, required=True)
        store = _creds_store_of(config)
        if store:
            found = self._from_helper(store, registry, required=False)
            if found is not None:
                return found
        auths = config.get("auths")
        entry = self._auth_entry(auths if isinstance(auths, dict) else {}, registry, repository)
        return self._from_auth_entry(entry, path) if entry is not None else None

    @staticmethod
    def _auth_entry(auths, registry, repository):
        """The most specific key: host/ns/repo (podman), then host/ns, then host."""
        normalised = {}
        for key, value in auths.items():
            if isinstance(key, str) and isinstance(value, dict):
                normalised.setdefault(_auth_key_host(key), value)
        parts = [registry] + [p for p in repository.split("/") if p]
        for n in range(len(parts), 0, -1):
            if "/".join(parts[:n]) in normalised:
                return normalised["/".join(parts[:n])]
        return None

    @staticmethod
    def _from_auth_entry(entry, path):
        source = "auth file %s" % path
        if entry.get("identitytoken"):
            return _Credential("<token>", None, identity_token=entry["identitytoken"], source=source)
        if entry.get("auth"):
            try:
                user, password = base64.b64decode(entry["auth"]).decode("utf-8").split(":", 1)
            except (ValueError, TypeError, UnicodeDecodeError) as e:
                _fail(ErrorCode.USAGE, "malformed 'auth' value in %s (want base64 of user:password)" % path, e)
            return _Credential(user, password, source=source)
        if entry.get("username"):
            return _Credential(entry["username"], entry.get("password"), source=source)
        return None

    def _from_helper(self, name, registry, required):
        import subprocess
        program = "docker-credential-" + name
        try:
            proc = _run_helper(program, "get", _helper_server(registry), self.environ)
        except (OSError, subprocess.TimeoutExpired) as e:
            if required:
                _fail(ErrorCode.AUTH, "credential helper %s for %s cannot run: %s" % (program, registry, e), e)
            _log.warning("credential helper %s (credsStore) cannot run (%s); continuing without credentials",
                        program, getattr(e, "strerror", None) or e)
            return None
        text = proc.stdout.decode("utf-8", "replace").strip()
        if proc.returncode != 0:
            message = _helper_message(proc)
            if "credentials not found" in message.lower():
                return None
            _fail(ErrorCode.AUTH, "credential helper %s failed for %s: %s" % (program, registry, _redact(message)))
        try:
            data = json.loads(text)
            user, secret = data["Username"], data["Secret"]
        except (ValueError, KeyError, TypeError) as e:
            _fail(ErrorCode.AUTH, "credential helper %s returned malformed output for %s" % (program, registry), e)
        source = "credential helper %s" % program
        if user == "<token>":
            return _Credential(user, None, identity_token=secret, source=source)
        return _Credential(user, secret, source=source)


def _login_credentials(user, password):
    """Credentials that answer with exactly these, wherever asked (login checks them)."""
    credentials = Credentials(environ={})
    credentials.explicit = _Credential(user, password, source="the credentials given to login")
    return credentials


class _LoginStore(object):
    """Where `login` keeps credentials and `logout` removes them, as docker login does:
    the file is REGISTRY_AUTH_FILE, else docker's config.json; in it, the registry's
    `credHelpers` program, else the `credsStore` program, else `auths` (base64 of
    user:password, unencrypted). Only the registry's keys change: the rest of the
    file is written back as it was."""

    def __init__(self, environ=None, home=None):
        finder = Credentials(environ=environ, home=home)
        self.environ = finder.environ
        docker_dir = self.environ.get("DOCKER_CONFIG") or os.path.join(finder.home, ".docker")
        self.path = self.environ.get("REGISTRY_AUTH_FILE") or os.path.join(docker_dir, "config.json")
        self.config = self._read(self.path)

    @staticmethod
    def _read(path):
        """The file's JSON object ({} when there is none); one that cannot be read
        back whole is an error, never overwritten."""
        try:
            with io.open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        except OSError as e:
            _fail(ErrorCode.IO, "cannot read %s: %s" % (path, e.strerror or e), e)
        try:
            config = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError) as e:
            _fail(ErrorCode.USAGE, "cannot parse credentials file %s (%s): not changing it" % (path, e))
        if not isinstance(config, dict) or not isinstance(config.get("auths", {}), dict):
            _fail(ErrorCode.USAGE, "credentials file %s is not a JSON object with an 'auths' object" % path)
        return config

    def helper(self, registry):
        """The docker-credential-NAME that keeps this registry's credentials, or None."""
        name = _cred_helper_of(self.config, registry) or _creds_store_of(self.config)
        return "docker-credential-" + name if name else None

    def _keys(self, registry):
        """The `auths` keys that name this registry (host, https://host/v1/, ...): a
        stale one left beside the new one could win the lookup."""
        return [key for key in self.config.get("auths", {}) if _auth_key_host(key) == registry]

    def store(self, registry, user, password):
        """Keep the credentials; returns where (the helper, or the file)."""
        helper, keys = self.helper(registry), self._keys(registry)
        auths = self.config.setdefault("auths", {})
        for key in keys[1:]:
            del auths[key]
        key = keys[0] if keys else _helper_server(registry)
        if helper:
            self._run(helper, "store", json.dumps({"ServerURL": _helper_server(registry), "Username": user,
                                                   "Secret": password}), registry)
            auths[key] = {}      # docker's placeholder: no secret in the file (a stale one goes)
        else:
            raw = ("%s:%s" % (user, password)).encode("utf-8")
            auths[key] = {"auth": base64.b64encode(raw).decode("ascii")}
        self._write()
        return helper or self.path

    def erase(self, registry):
        """Remove the credentials; False when there were none."""
        helper, keys = self.helper(registry), self._keys(registry)
        found = bool(helper) and self._run(helper, "erase", _helper_server(registry), registry)
        for key in keys:
            del self.config["auths"][key]
        if keys:
            self._write()
        return found or bool(keys)

    def _run(self, program, action, data, registry):
        """A helper's store or erase; False when it had nothing to erase."""
        import subprocess
        try:
            proc = _run_helper(program, action, data, self.environ)
        except (OSError, subprocess.TimeoutExpired) as e:
            _fail(ErrorCode.IO, "credential helper %s cannot run: %s" % (program, getattr(e, "strerror", None) or e), e)
        if proc.returncode == 0:
            return True
        message = _helper_message(proc)
        if action == "erase" and "credentials not found" in message.lower():
            return False
        _fail(ErrorCode.IO, "credential helper %s cannot %s the credentials of %s: %s"
              % (program, action, registry, _redact(message)))

    def _write(self):
        """Replace the file atomically (a temporary file, then os.replace), mode 0600."""
        import tempfile
        path = os.path.realpath(self.path)     # a symlinked config stays a link, to the new file
        temp = None
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            fd, temp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=os.path.dirname(path))
            with os.fdopen(fd, "w", encoding="utf-8") as f:      # mkstemp made it 0600
                f.write(json.dumps(self.config, indent="\t") + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
            temp = None
        except OSError as e:
            _fail(ErrorCode.IO, "cannot write %s: %s" % (path, e.strerror or e), e)
        finally:
            if temp is not None:
                try:
                    os.unlink(temp)
                except OSError:
                    pass

# =============================================================================
# config
# =============================================================================

_CONFIG_DIR_NAME = ".stargz-get"
_CONFIG_FILE_NAME = "config.yaml"
_MAX_CONFIG_SIZE = 1 << 20

_YAML_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_YAML_NULLS = ("null", "~")
_YAML_INT_RE = re.compile(r"^[-+]?(?:0|[1-9][0-9]*)\Z")   # 0755 stays a string: YAML 1.1 and 1.2 disagree
_YAML_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}
_YAML_DOC_START_RE = re.compile(r"^---(?:[ \t]+#.*|[ \t]*)$")
# What a plain (unquoted) key or value may not start with, and why.
_YAML_INDICATORS = {
    "[": "flow collections ([...]) are not supported; quote keys such as \"[::1]:5000\"",
    "]": "unexpected ']'", "}": "unexpected '}'", ",": "a plain value cannot start with ','; quote it",
    "{": "flow mappings ({...}) are not supported; use indented 'key: value' lines",
    "&": "anchors (&name) are not supported", "*": "aliases (*name) are not supported",
    "!": "tags (!tag) are not supported", "|": "multi-line scalars (| and >) are not supported",
    ">": "multi-line scalars (| and >) are not supported", "%": "directives and values starting with '%' "
    "are not supported; quote the value", "@": "'@' is reserved in YAML; quote the value",
    "`": "'`' is reserved in YAML; quote the value",
}


class _YAMLMapping(dict):
    """A parsed mapping that also remembers the line of each key, for error messages."""

    def __init__(self):
        dict.__init__(self)
        self.lines = {}


def _parse_simple_yaml(text, source="config.yaml"):
    """Parse the small YAML subset starget's config file uses; returns a dict.

    Accepted: nested mappings by indentation (spaces), `key: value` with plain,
    'single' or "double" (escapes \\" \\\\ \\n \\t) quoted scalars; true/false/yes/no/
    on/off, null/~, decimal integers; `#` comments; blank lines; a leading `---`.
    Keys are always strings and end at the first ': ' (or ':' at the end of the
    line), so `mirror.internal:5000:` is the key `mirror.internal:5000`.
    Everything else (lists, flow {} [], anchors, tags, | >, duplicate keys, bad
    indentation) is a USAGE error "SOURCE line N: what is wrong". The mappings
    returned are dicts with a `.lines` attribute: key -> line number.
    """
    root = _YAMLMapping()
    stack = [[None, root]]   # [indent, mapping], outermost first; the root's indent comes from its first key
    pending = None           # (mapping, key, indent) of a `key:` whose value may be an indented mapping
    seen_content = False
    if text.startswith("\ufeff"):
        text = text[1:]
    for lineno, line in enumerate(text.split("\n"), 1):
        def fail(what):
            _fail(ErrorCode.USAGE, "%s line %d: %s" % (source, lineno, what))

        line = line[:-1] if line.endswith("\r") else line
        body = line.lstrip(" \t")
        if not body or body.startswith("#"):
            continue
        indent = len(line) - len(body)
        if "\t" in line[:indent]:
            fail("tab characters are not allowed in indentation (use spaces)")
        if _YAML_DOC_START_RE.match(body) and indent == 0:
            if seen_content:
                fail("a second document ('---') is not supported")
            seen_content = True
            continue
        if body.startswith("---") or body.startswith("..."):
            fail("document markers other than a leading '---' are not supported")
        seen_content = True
        key, value, has_value = _yaml_key_value(body, fail)

        if pending is not None:
            mapping, parent_key, parent_indent = pending
            pending = None
            if indent > parent_indent:      # the value of `parent_key:` is this nested mapping
                child = _YAMLMapping()
                mapping[parent_key] = child
                stack.append([indent, child])
        popped = False
        while len(stack) > 1 and indent < stack[-1][0]:
            stack.pop()
            popped = True
        if stack[-1][0] is None:
            stack[-1][0] = indent
        level, mapping = stack[-1]
        if indent > level:
            fail("indentation does not match any outer level" if popped else
                 "unexpected indentation (only a 'key:' with no value may be followed by an indented block)")
        if indent < level:
            fail("indentation does not match any outer level")
        if key in mapping:
            fail("duplicate key %r (first on line %d)" % (key, mapping.lines[key]))
        mapping[key] = value
        mapping.lines[key] = lineno
        if not has_value:
            pending = (mapping, key, indent)
    return root


def _yaml_key_value(body, fail):
    """One content line -> (key, value, has_value); has_value is False for `key:`."""
    if body == "-" or body.startswith("- ") or body.startswith("-\t"):
        fail("lists ('- item') are not supported")
    if body == "?" or body.startswith("? ") or body.startswith("?\t"):
        fail("complex keys ('? key') are not supported")
    if body[0] in _YAML_INDICATORS:
        fail(_YAML_INDICATORS[body[0]])
    if body[0] in "\"'":
        key, end = _yaml_quoted(body, fail)
        rest = body[end:].lstrip(" \t")
        if not rest.startswith(":") or rest[1:2] not in ("", " ", "\t"):
            fail("expected ': ' after the quoted key")
        after = rest[1:]
    else:
        colon = -1
        for i, ch in enumerate(body):
            if ch == "#" and body[i - 1] in " \t":
                break                                   # a comment starts: no ':' on this line
            if ch == ":" and body[i + 1:i + 2] in ("", " ", "\t"):
                colon = i
                break
        if colon < 0:
            fail("expected 'key: value', got %r" % body.split(" #")[0].strip())
        key = body[:colon].rstrip(" \t")
        if not key:
            fail("a key is missing before ':'")
        after = body[colon + 1:]
    value = after.lstrip(" \t")
    if not value or value.startswith("#"):
        return key, None, False
    return key, _yaml_scalar(value, fail), True


def _yaml_quoted(text, fail):
    """A quoted scalar at the start of `text` -> (string, index after the closing quote)."""
    quote, out, i = text[0], [], 1
    while i < len(text):
        ch = text[i]
        if ch == quote:
            if quote == "'" and text[i + 1:i + 2] == "'":   # '' is a literal ' inside '...'
                out.append("'")
                i += 2
                continue
            return "".join(out), i + 1
        if ch == "\\" and quote == '"':
            escape = text[i + 1:i + 2]
            if escape not in _YAML_ESCAPES:
                fail("unsupported escape '\\%s' in a double-quoted string (use \\\" \\\\ \\n \\t, "
                     "or single quotes for backslashes)" % escape)
            out.append(_YAML_ESCAPES[escape])
            i += 2
            continue
        out.append(ch)
        i += 1
    fail("unterminated %s-quoted string (strings cannot span lines)" % ("single" if quote == "'" else "double"))


def _yaml_scalar(text, fail):
    """The value after `key: ` (comment included) -> str, int, bool or None."""
    if text[0] in "\"'":
        value, end = _yaml_quoted(text, fail)
        rest = text[end:]
        after = rest.lstrip(" \t")
        if after and not (after.startswith("#") and len(after) < len(rest)):
            fail("unexpected text after the quoted value: %r" % after)
        return value
    if text == "-" or text.startswith("- ") or text.startswith("-\t"):
        fail("lists ('- item') are not supported")
    if text == "?" or text.startswith("? "):
        fail("complex keys ('? key') are not supported")
    if text[0] in _YAML_INDICATORS:
        fail(_YAML_INDICATORS[text[0]])
    comment = re.search(r"[ \t]#", text)
    if comment:
        text = text[:comment.start()]
    text = text.rstrip(" \t")
    if re.search(r":[ \t]", text) or text.endswith(":"):
        fail("a value cannot contain ': ' (a mapping needs its own indented line; quote strings)")
    lowered = text.lower()
    if lowered in _YAML_BOOLS:
        return _YAML_BOOLS[lowered]
    if lowered in _YAML_NULLS:
        return None
    if _YAML_INT_RE.match(text):
        return int(text)
    return text


# -- the validated configuration --------------------------------------------

# The global options, in one table: the command line's flags (cli), the
# `defaults:` of the config file, their defaults, what they accept, and how
# --help and the completion scripts show them are all made from it, so that a
# flag and its config key cannot drift apart. It lives here, above cli, because
# the config file is checked against it.

def _check_count(value, option):
    """A whole number in the option's range, from the command line ("8") or YAML (8)."""
    if isinstance(value, str) and re.match(r"^[-+]?[0-9]+\Z", value):
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        number = None
    if number is None or not option.low <= number <= option.high:
        raise ValueError("must be a whole number from %d to %d, got %r" % (option.low, option.high, value))
    return number


def _check_seconds(value, option):
    """A number of seconds above 0 (0 would make the socket non-blocking), at most the high end."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not 0 < number <= option.high:     # NaN fails this too
        raise ValueError("must be a number of seconds above 0 and at most %g, got %r" % (option.high, value))
    return number


def _check_switch(value, option=None):
    """true or false; on the command line a switch takes no value, so this is the file's."""
    if not isinstance(value, bool):
        raise ValueError("must be true or false, got %r" % (value,))
    return value


def _check_text(value, option=None):
    """Any string (--credential's form is the credentials' to check)."""
    if not isinstance(value, str):
        raise ValueError("must be a string, got %r" % (value,))
    return value


def _check_platform(value, option=None):
    """os/arch[/variant], kept as the text given (the session parses it)."""
    try:
        Platform.parse(_check_text(value))
    except StargzError:
        raise ValueError("must be os/arch[/variant] (e.g. linux/arm64), got %r" % (value,))
    return value


# kind -> the one function that checks a value of that kind, wherever it comes from
_OPTION_CHECKS = {"count": _check_count, "seconds": _check_seconds, "switch": _check_switch,
                  "text": _check_text, "file": _check_text, "platform": _check_platform}


class _Option(object):
    """One global option. `flags` as typed; `dest` its argparse name; `kind` what it
    accepts (a key of _OPTION_CHECKS; a "switch" takes no value on the command line);
    `default` when neither the flag nor the file sets it; `low`..`high` its range;
    `config` its key in `defaults:` (None: not settable there) and `config_negates`
    when that key means the opposite (`cache: false` is --no-cache); `metavar` and
    `help` for --help; `summary` for the completion scripts (default: `help`), which pass the flag on
    to `__complete` when `forwarded` (it changes how the image is reached);
    `suggestions` are the values they offer for it."""

    __slots__ = ("flags", "dest", "kind", "default", "low", "high", "config", "config_negates",
                 "metavar", "help", "summary", "forwarded", "suggestions")

    def __init__(self, flags, dest, kind, default, help, summary=None, low=None, high=None, config=None,
                 config_negates=False, metavar=None, forwarded=True, suggestions=()):
        self.flags, self.dest, self.kind, self.default = flags, dest, kind, default
        self.low, self.high, self.config, self.config_negates = low, high, config, config_negates
        self.metavar, self.help, self.summary = metavar, help, summary or help
        self.forwarded, self.suggestions = forwarded, suggestions

    @property
    def takes_value(self):
        return self.kind != "switch"

    def check(self, value):
        """The value, checked (and typed); ValueError says what is wrong, after the option's name."""
        return _OPTION_CHECKS[self.kind](value, self)

    def __repr__(self):
        return "_Option(%r)" % (self.flags,)


_GLOBAL_OPTIONS = (
    _Option(("--credential",), "credential", "text", None, "registry credentials",
            "registry credentials USER:PASSWORD", metavar="USER:PASSWORD"),
    _Option(("-v", "--verbose"), "verbose", "switch", False, "say what is happening", forwarded=False),
    _Option(("-d", "--debug"), "debug", "switch", False, "log every request (secrets masked)",
            "log every request", forwarded=False),
    _Option(("-k", "--insecure"), "insecure", "switch", False,
            "skip TLS verification; allow plain HTTP to any registry", "skip TLS verification"),
    _Option(("--no-progress",), "no_progress", "switch", False, "no progress bar", config="no_progress",
            forwarded=False),
    _Option(("--concurrency",), "concurrency", "count", 4, "parallel requests", low=1, high=256,
            config="concurrency", metavar="N"),
    _Option(("--platform",), "platform", "platform", None, "image platform (the host's)",
            "image platform os/arch[/variant]", config="platform", metavar="OS/ARCH[/VARIANT]",
            suggestions=("linux/amd64", "linux/arm64", "linux/arm64/v8", "linux/arm/v7",
                         "linux/ppc64le", "linux/s390x", "linux/riscv64")),
    _Option(("--retries",), "retries", "count", 3, "retries per request", low=0, high=20, config="retries",
            metavar="N"),
    _Option(("--skip-verify",), "skip_verify", "switch", False, "do not check digests"),
    _Option(("--no-cache",), "no_cache", "switch", False, "do not use the TOC cache", config="cache",
            config_negates=True),
    _Option(("--cacert",), "cacert", "file", None, "extra CA certificates (PEM)",
            "extra CA certificates (PEM file)", metavar="FILE"),
    _Option(("--timeout",), "timeout", "seconds", 30.0, "read stall timeout", "read stall timeout in seconds",
            high=86400, config="timeout", metavar="SECONDS"),
    _Option(("--connect-timeout",), "connect_timeout", "seconds", 15.0, "connect timeout",
            "connect timeout in seconds", high=86400, config="connect_timeout", metavar="SECONDS"),
    _Option(("--fallback-stream",), "fallback_stream", "switch", False,
            "read layers that are not lazy (plain tar+gzip/zstd) by streaming them instead of refusing them",
            "stream layers that are not lazy (plain tar+gzip/zstd)"),
    _Option(("--devices",), "devices", "switch", False,
            "create the device nodes and FIFOs the image holds (root only; skipped otherwise)",
            "create device nodes and FIFOs (root only)"),
)
# config key -> its option: the schema of `defaults:`
_CONFIG_DEFAULTS = dict((o.config, o) for o in _GLOBAL_OPTIONS if o.config)
# key -> (kind, arguments): what each setting of a registry accepts.
_CONFIG_REGISTRY = {
    "plain_http": ("bool",), "insecure": ("bool",), "ca_file": ("path",), "mirror": ("host",),
    "auth_type": ("choice", "basic", "bearer", "none"),
}


def _config_host_key(host):
    """Registry names are case-insensitive; docker.io has three spellings."""
    host = host.strip().lower()
    return _DOCKER_HUB if host in ("docker.io", "index.docker.io") else host


class Config(object):
    """Settings from ~/.stargz-get/config.yaml, or the file $STARGET_CONFIG names.

    Command-line flags always win over the file. Example (every key optional):

        defaults:
          concurrency: 8            # 1-256, like --concurrency
          retries: 5                # 0-20, like --retries
          no_progress: true
          platform: linux/arm64     # like --platform
          cache: false              # like --no-cache
          timeout: 60               # seconds, above 0 and at most 86400, like --timeout
          connect_timeout: 5.5      # likewise, like --connect-timeout
        registries:
          mirror.internal:5000:     # host[:port], exactly as in image names
            plain_http: true
          registry.example.com:
            ca_file: ~/certs/example-ca.pem   # relative paths: to this file's directory
            insecure: false
            auth_type: bearer       # basic, bearer or none
          docker.io:
            mirror: mirror.internal:5000      # pull through this host instead

    A missing ~/.stargz-get/config.yaml is an empty configuration; a missing
    $STARGET_CONFIG file, a syntax error or an unknown key is a USAGE error
    that names the file and the line.
    """

    def __init__(self, defaults=None, registries=None, path=None):
        self.path = path
        self._defaults = dict(defaults or {})
        self._registries = dict(registries or {})

    @classmethod
    def load(cls, path=None, environ=None):
        environ = os.environ if environ is None else environ
        named_by = "the caller" if path is not None else "STARGET_CONFIG" if environ.get("STARGET_CONFIG") else None
        if path is None:
            path = environ.get("STARGET_CONFIG")
        if not path:
            home = environ.get("HOME") or os.path.expanduser("~")
            path = os.path.join(home, _CONFIG_DIR_NAME, _CONFIG_FILE_NAME)
        path = os.path.expanduser(path)
        try:
            with io.open(path, "rb") as f:
                data = f.read(_MAX_CONFIG_SIZE + 1)
        except (FileNotFoundError, NotADirectoryError) as e:
            if named_by is None:     # the default file is optional
                return cls()
            _fail(ErrorCode.USAGE, "config file %s (named by %s) does not exist" % (path, named_by), e)
        except (IOError, OSError) as e:
            _fail(ErrorCode.USAGE, "cannot read config file %s: %s" % (path, e.strerror or e), e)
        if len(data) > _MAX_CONFIG_SIZE:
            _fail(ErrorCode.USAGE, "config file %s is larger than %d bytes" % (path, _MAX_CONFIG_SIZE))
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            _fail(ErrorCode.USAGE, "config file %s is not UTF-8 text" % path, e)
        return cls.from_text(text, source=path)

    @classmethod
    def from_text(cls, text, source="config.yaml"):
        """Parse and check a config document; `source` names it in error messages."""
        doc = _parse_simple_yaml(text, source)
        checker = _ConfigChecker(source, os.path.dirname(os.path.abspath(source)))
        defaults, registries = {}, {}
        for key, value in doc.items():
            line = doc.lines[key]
            if key == "defaults":
                defaults = checker.section(value, line, "defaults", _CONFIG_DEFAULTS)
            elif key == "registries":
                registries = checker.registries(value, line)
            else:
                checker.fail(line, "unknown key %r (known: defaults, registries)" % key)
        return cls(defaults, registries, path=source)

    def default(self, name, fallback=None):
        """A `defaults:` value, or `fallback` when the file does not set it."""
        value = self._defaults.get(name)
        return fallback if value is None else value

    def registry(self, host):
        """The settings of registry `host[:port]` (a new dict; empty if none)."""
        return dict(self._registries.get(_config_host_key(host), {}))

    def flag_defaults(self):
        """The `defaults:` as argparse destinations, for the flags the user did not give."""
        values = {}
        for key, option in _CONFIG_DEFAULTS.items():
            if self._defaults.get(key) is not None:
                value = self._defaults[key]
                values[option.dest] = not value if option.config_negates else value
        return values

    def __repr__(self):
        return "Config(path=%r, defaults=%r, registries=%r)" % (self.path, self._defaults, self._registries)


class _ConfigChecker(object):
    """Checks parsed sections against the schema, naming the line of each mistake."""

    def __init__(self, source, base_dir):
        self.source, self.base_dir = source, base_dir

    def fail(self, line, what):
        _fail(ErrorCode.USAGE, "%s line %d: %s" % (self.source, line, what))

    def section(self, mapping, line, where, schema):
        """A mapping of known keys -> {key: checked value}; null values are left out."""
        if mapping is None:
            return {}
        if not isinstance(mapping, dict):
            self.fail(line, "%s must be a mapping (indented 'key: value' lines), got %r" % (where, mapping))
        values = {}
        for key, value in mapping.items():
            key_line = mapping.lines[key]
            if key not in schema:
                self.fail(key_line, "unknown key %r in %s (known: %s)" % (key, where, ", ".join(sorted(schema))))
            if value is not None:
                values[key] = self.value(value, schema[key], key_line, "%s.%s" % (where, key))
        return values

    def registries(self, mapping, line):
        if mapping is None:
            return {}
        if not isinstance(mapping, dict):
            self.fail(line, "registries must be a mapping of host[:port] to settings, got %r" % (mapping,))
        result, first_line = {}, {}
        for host, settings in mapping.items():
            host_line = mapping.lines[host]
            if not _REGISTRY_RE.match(host):
                self.fail(host_line, "registries: %r is not a registry host[:port] (no scheme, no path)" % host)
            key = _config_host_key(host)
            if key in result:
                self.fail(host_line, "registries: %r is the same registry as line %d" % (host, first_line[key]))
            result[key] = self.section(settings, host_line, "registries.%s" % host, _CONFIG_REGISTRY)
            first_line[key] = host_line
        return result

    def value(self, value, spec, line, where):
        """The checked value of one key: `spec` is an _Option (`defaults:`) or a
        registry setting's (kind, arguments)."""
        try:
            if isinstance(spec, _Option):
                return spec.check(value)
            return self._registry_value(value, spec)
        except ValueError as e:
            self.fail(line, "%s %s" % (where, e))

    def _registry_value(self, value, spec):
        kind = spec[0]
        if kind == "bool":
            return _check_switch(value)
        if not isinstance(value, str) or not value:
            raise ValueError("must be a string, got %r" % (value,))
        if kind == "choice" and value not in spec[1:]:
            raise ValueError("must be one of %s, got %r" % (", ".join(spec[1:]), value))
        if kind == "host":
            if not _REGISTRY_RE.match(value):
                raise ValueError("must be a registry host[:port] (no scheme, no path), got %r" % value)
            value = _config_host_key(value)
        elif kind == "path":
            value = os.path.join(self.base_dir, os.path.expanduser(value))
        return value


# =============================================================================
# transport
# =============================================================================

_READ_SIZE = 256 << 10          # how much of a body one read takes
_REDIRECTS = (301, 302, 303, 307, 308)
_SENSITIVE_HEADERS = ("authorization", "proxy-authorization", "cookie")

def _parse_retry_after(value, now=None):
    """`Retry-After` in seconds or as an HTTP date -> seconds to wait, or None."""
    if not value:
        return None
    value = value.strip()
    if re.match(r"^[0-9]{1,10}\Z", value):
        return float(value)
    import calendar
    import email.utils
    try:
        parsed = email.utils.parsedate_tz(value)
        when = calendar.timegm(parsed[:9]) - (parsed[9] or 0) if parsed else None
    except (TypeError, ValueError, OverflowError):
        return None
    return None if when is None else max(0.0, when - (time.time() if now is None else now))


class RetryPolicy(object):
    """Which failures deserve another try and how long to wait: exponential backoff
    with full jitter. `run` is the one retry loop of starget and `decide` the one
    place that reads an error's `transient`/`damaged` attributes."""

    REFETCHES = 1       # damaged bytes are fetched once more, whatever --retries says

    def __init__(self, retries=3, base=0.5, max_delay=10.0, retry_after_cap=60.0, sleep=time.sleep):
        self.retries, self.base, self.max_delay = retries, base, max_delay
        self.retry_after_cap, self.sleep = retry_after_cap, sleep

    def delay(self, attempt, retry_after=None):
        if retry_after is not None:
            return min(retry_after, self.retry_after_cap)
        return random.uniform(0, min(self.base * (2 ** attempt), self.max_delay))

    @staticmethod
    def retryable_status(status):
        # 501 means "never implemented": asking again cannot help.
        return status in (408, 429) or (500 <= status <= 599 and status != 501)

    def decide(self, error, retries_done, refetches_done):
        """Seconds to wait before trying again after `error`, or None to give up."""
        if not isinstance(error, StargzError):
            return None
        if error.damaged:
            return 0.0 if refetches_done < self.REFETCHES else None
        if not error.transient or retries_done >= self.retries:
            return None
        return self.delay(retries_done, error.retry_after)

    def run(self, operation, what, stats=None):
        """operation() until it succeeds or `decide` gives up; each retry is logged and
        counted in `stats` (a TransportStats)."""
        retries_done = refetches_done = 0
        while True:
            try:
                return operation()
            except StargzError as error:
                wait = self.decide(error, retries_done, refetches_done)
                if wait is None:
                    raise
                if error.damaged:
                    refetches_done += 1
                else:
                    retries_done += 1
                _log.info("retrying %s after: %s", what, error.message)
                if stats is not None:
                    stats.add("retries")
                if wait > 0:
                    self.sleep(wait)


class _TransportStats(object):
    """Counters of one transport, safe to bump from any thread."""

    FIELDS = ("requests", "connections", "retries", "bytes")

    def __init__(self):
        self._lock = threading.Lock()
        for name in self.FIELDS:
            setattr(self, name, 0)

    def add(self, name, n=1):
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def as_dict(self):
        return {name: getattr(self, name) for name in self.FIELDS}


class _URL(object):
    """The parts of an http(s) URL the transport needs."""

    __slots__ = ("scheme", "host", "port", "path", "text")

    def __init__(self, text):
        from urllib.parse import urlsplit
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            _fail(ErrorCode.NETWORK, "unsupported URL %s" % _redact(text))
        self.scheme, self.host, self.text = parts.scheme, parts.hostname, text
        try:
            self.port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            _fail(ErrorCode.NETWORK, "invalid port in URL %s" % _redact(text), e)
        self.path = (parts.path or "/") + ("?" + parts.query if parts.query else "")

    @property
    def origin(self):
        return (self.scheme, self.host, self.port)

    @property
    def netloc(self):
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s:%d" % (host, self.port)


class _ConnectionPool(object):
    """Keep-alive connections by origin, shared by all threads. It also knows the
    connections with a request in flight, so that `abort` can wake their readers."""

    def __init__(self, max_idle_per_origin=8):
        self.max_idle_per_origin = max_idle_per_origin
        self._idle = {}         # origin -> [connection]
        self._active = set()
        self._lock = threading.Lock()

    def take(self, origin):
        """An idle connection to `origin`, now active, or None."""
        with self._lock:
            idle = self._idle.get(origin)
            if not idle:
                return None
            conn = idle.pop()
            self._active.add(conn)
            return conn

    def activate(self, conn):
        with self._lock:
            self._active.add(conn)

    def release(self, origin, conn):
        """The response was read to its end: keep the connection for the next request."""
        with self._lock:
            self._active.discard(conn)
            idle = self._idle.setdefault(origin, [])
            if len(idle) < self.max_idle_per_origin:
                idle.append(conn)
                return
        conn.close()

    def discard(self, conn):
        """A connection in an unknown state (an error, a body left unread): close it."""
        with self._lock:
            self._active.discard(conn)
        conn.close()

    def drop_idle(self, origin):
        with self._lock:
            idle = self._idle.pop(origin, [])
        for conn in idle:
            conn.close()

    def idle_count(self):
        with self._lock:
            return sum(len(idle) for idle in self._idle.values())

    def abort(self):
        """Wake every thread blocked on a read (Ctrl-C): shut their sockets down."""
        with self._lock:
            active = list(self._active)
        for conn in active:
            try:
                if conn.sock is not None:
                    conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


class _Response(object):
    """An HTTP response whose body is read on demand; the connection goes back to
    the pool only when the body was read to its end."""

    def __init__(self, pool, conn, raw, url, stats):
        self._pool, self._conn, self._raw, self._stats = pool, conn, raw, stats
        self.status, self.url = raw.status, url
        self.reason = raw.reason

    def header(self, name, default=None):
        return self._raw.getheader(name, default)

    @property
    def length(self):
        value = self.header("Content-Length")
        return int(value) if value and value.strip().isdigit() else None

    def read(self, amount=None):
        import http.client
        try:
            data = self._raw.read(amount) if amount is not None else self._raw.read()
        except http.client.IncompleteRead as e:
            self.close()
            raise StargzError(ErrorCode.NETWORK, "connection closed after %d bytes of the body from %s (truncated)"
                              % (len(e.partial), self.url.netloc), e, transient=True) from e
        except (socket.timeout, OSError, http.client.HTTPException) as e:
            self.close()
            raise StargzError(ErrorCode.NETWORK, "reading from %s failed: %s" % (self.url.netloc, _describe_os_error(e)),
                              e, transient=True) from e
        self._stats.add("bytes", len(data))
        return data

    def truncated(self, missing):
        """The error for a body that ended `missing` bytes early."""
        self.close()
        return StargzError(ErrorCode.NETWORK, "body from %s ended %d bytes early (truncated)"
                           % (self.url.netloc, missing), transient=True)

    def read_all(self, limit=64 << 20):
        length = self.length
        if length is not None and length > limit:
            self.close()
            _fail(ErrorCode.FORMAT, "response from %s is too large (%d bytes)" % (self.url.netloc, length))
        data = self.read(limit + 1 if length is None else length + 1)   # no 4 MiB buffer for 1 kB
        if len(data) > limit:
            self.close()
            _fail(ErrorCode.FORMAT, "response from %s is too large" % self.url.netloc)
        self.close()
        if length is not None and len(data) < length:
            raise self.truncated(length - len(data))
        return data

    def read_exactly(self, amount):
        """Read `amount` body bytes or fail as a truncated body."""
        parts, remaining = [], amount
        while remaining > 0:
            data = self.read(min(remaining, 1 << 20))
            if not data:
                raise self.truncated(remaining)
            parts.append(data)
            remaining -= len(data)
        return b"".join(parts)

    def pieces(self, length):
        """The next `length` body bytes, as pieces of at most _READ_SIZE; a body that
        ends before them is truncated."""
        while length > 0:
            data = self.read(min(_READ_SIZE, length))
            if not data:
                raise self.truncated(length)
            length -= len(data)
            yield data

    def skip(self, amount):
        """Read and drop `amount` body bytes (a hole in a coalesced range)."""
        for _ in self.pieces(amount):
            pass

    def close(self):
        """Return the connection to the pool if the body is done, else drop it."""
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        if self._raw.isclosed() and not self._raw.will_close:
            self._pool.release(self.url.origin, conn)
        else:
            self._raw.close()
            self._pool.discard(conn)

    def discard(self, limit=64 << 10):
        """Drop a small error body so the connection can be reused."""
        length = self.length
        if self._conn is not None and length is not None and length <= limit:
            import http.client
            try:
                self._raw.read()
            except (OSError, http.client.HTTPException):
                pass
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _has_ca_dir():
    """A hashed CA directory counts as a bundle although OpenSSL loads it lazily."""
    import ssl
    capath = ssl.get_default_verify_paths().capath
    return bool(capath and os.path.isdir(capath) and os.listdir(capath))


def _describe_os_error(error):
    import http.client
    if isinstance(error, socket.timeout):
        return "timed out"
    if isinstance(error, http.client.RemoteDisconnected):
        return "server closed the connection"
    text = getattr(error, "strerror", None) or str(error) or error.__class__.__name__
    return text


def _proxy_headers(proxy):
    """Proxy-Authorization for the user and password in a proxy URL (masked in logs)."""
    from urllib.parse import urlsplit, unquote
    parts = urlsplit(proxy)
    if not parts.username:
        return {}
    raw = ("%s:%s" % (unquote(parts.username), unquote(parts.password or ""))).encode("utf-8")
    value = base64.b64encode(raw).decode("ascii")
    _register_secret(value)
    return {"Proxy-Authorization": "Basic " + value}


class Transport(object):
    """The one HTTP path: pooled keep-alive connections shared by all threads,
    TLS contexts built once, proxies from the environment, redirects that never
    carry credentials to another host, retries with backoff."""

    CERTS_DIRS = ("/etc/containers/certs.d", "/etc/docker/certs.d")

    def __init__(self, insecure=False, cafile=None, connect_timeout=15.0, read_timeout=30.0,
                 retry=None, environ=None, certs_dirs=None, max_idle_per_host=8, host_tls=None):
        self.insecure, self.cafile = insecure, cafile
        # per registry "host[:port]" -> {"insecure": bool, "ca_file": path}, from the config file
        self.host_tls = {host.lower(): settings for host, settings in (host_tls or {}).items()}
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.retry = retry or RetryPolicy()
        self.environ = os.environ if environ is None else environ
        self.certs_dirs = self.CERTS_DIRS if certs_dirs is None else certs_dirs
        self.stats = _TransportStats()
        self.pool = _ConnectionPool(max_idle_per_host)
        self._lock = threading.Lock()
        self._tls_contexts = {}

    # -- connections ---------------------------------------------------------
    def _env(self, name):
        return self.environ.get(name.lower()) or self.environ.get(name.upper())

    def _proxy_for(self, url):
        """The proxy URL for this request, or None: `HTTPS_PROXY`/`HTTP_PROXY` unless
        `NO_PROXY` names the host; loopback is never proxied (as in Go)."""
        if url.host in ("localhost", "::1") or url.host.startswith("127."):
            return None
        proxy = self._env(url.scheme + "_proxy")
        if not proxy or self._bypass_proxy(url):
            return None
        return proxy if "://" in proxy else "http://" + proxy

    def _bypass_proxy(self, url):
        for item in (self._env("no_proxy") or "").split(","):
            item = item.strip().lower()
            if not item:
                continue
            if item == "*":
                return True
            name, _, port = item.rpartition(":") if re.search(r":\d+\Z", item) else (item, "", "")
            if port and int(port) != url.port:
                continue
            name = name.lstrip(".").strip("[]")
            host = url.host.lower()
            if host == name or host.endswith("." + name):
                return True
        return False

    def _tls_context(self, url):
        key = url.netloc
        with self._lock:
            ctx = self._tls_contexts.get(key)
        if ctx is not None:
            return ctx
        import ssl
        settings = self.host_tls.get(url.netloc) or self.host_tls.get(url.host) or {}
        insecure = self.insecure or settings.get("insecure")
        ctx = ssl.create_default_context()
        if insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        cafile = None
        try:
            for cafile in (self.cafile, settings.get("ca_file")):
                if cafile and not insecure:
                    ctx.load_verify_locations(cafile=cafile)
            cafile = "the certificates for %s in %s" % (url.netloc, " or ".join(self.certs_dirs))
            self._load_host_certs(ctx, url)   # with -k too: a client certificate still counts
        except (OSError, ssl.SSLError) as e:
            _fail(ErrorCode.USAGE, "cannot load CA certificates from %s: %s" % (cafile, _describe_os_error(e)), e)
        with self._lock:
            self._tls_contexts[key] = ctx
        return ctx

    def has_ca_for(self, host):
        """Is a CA configured for registry `host[:port]` (--cacert, ca_file, certs.d)?"""
        settings = self.host_tls.get(host.lower()) or {}
        if self.cafile or settings.get("ca_file"):
            return True
        for root in self.certs_dirs:
            folder = os.path.join(root, host)
            if os.path.isdir(folder) and any(name.endswith(".crt") for name in os.listdir(folder)):
                return True
        return False

    def _load_host_certs(self, ctx, url):
        """Per-registry CAs and client certificates, as docker and podman read them."""
        names = [url.netloc, url.host] if url.port != 443 else [url.host, url.netloc]
        for root in self.certs_dirs:
            for name in names:
                folder = os.path.join(root, name)
                if not os.path.isdir(folder):
                    continue
                for entry in sorted(os.listdir(folder)):
                    path = os.path.join(folder, entry)
                    if entry.endswith(".crt"):
                        ctx.load_verify_locations(cafile=path)
                    elif entry.endswith(".cert"):
                        keyfile = path[:-5] + ".key"
                        if os.path.exists(keyfile):
                            ctx.load_cert_chain(path, keyfile)

    def _connect(self, url):
        import http.client
        proxy = self._proxy_for(url)
        proxy_url = _URL(proxy) if proxy else None
        connect_host, connect_port = (proxy_url.host, proxy_url.port) if proxy_url else (url.host, url.port)
        if url.scheme == "https":
            conn = http.client.HTTPSConnection(connect_host, connect_port, timeout=self.connect_timeout,
                                               context=self._tls_context(url))
            if proxy_url:
                conn.set_tunnel(url.host, url.port, headers=_proxy_headers(proxy))
        else:
            conn = http.client.HTTPConnection(connect_host, connect_port, timeout=self.connect_timeout)
        conn._starget_absolute_form = bool(proxy_url and url.scheme == "http")
        conn._starget_proxy_headers = _proxy_headers(proxy) if conn._starget_absolute_form else {}
        try:
            conn.connect()
        except Exception as e:
            conn.close()
            raise self._connect_error(e, url, proxy_url) from e
        conn.sock.settimeout(self.read_timeout)
        self.stats.add("connections")
        _log.debug("new connection to %s%s", url.netloc, " via proxy %s" % proxy_url.netloc if proxy_url else "")
        return conn

    def _connect_error(self, error, url, proxy_url):
        import ssl
        where = url.netloc
        if proxy_url and isinstance(error, OSError) and "Tunnel connection failed" in str(error):
            return StargzError(ErrorCode.NETWORK, "proxy %s refused the tunnel to %s: %s"
                               % (proxy_url.netloc, where, str(error).split(":", 1)[-1].strip()), error,
                               transient=True)
        if isinstance(error, ssl.SSLError):
            reason = getattr(error, "reason", None) or str(error)
            if "CERTIFICATE_VERIFY_FAILED" in str(error) or "certificate verify failed" in str(error):
                no_bundle = not self._tls_context(url).cert_store_stats().get("x509_ca") and not _has_ca_dir()
                why = "no CA bundle found (install ca-certificates or set SSL_CERT_FILE)" if no_bundle else\
                    getattr(error, "verify_message", None) or reason
                return StargzError(ErrorCode.NETWORK, "TLS verification failed for %s (%s): pass --cacert FILE, "
                                   "put the CA in /etc/containers/certs.d/%s/ca.crt, or use -k/--insecure"
                                   % (where, why, where), error)
            return _TLSHandshakeError(ErrorCode.NETWORK, "TLS handshake with %s failed: %s" % (where, reason), error)
        if isinstance(error, socket.gaierror):
            # A name that does not exist stays so; a temporary DNS failure may pass.
            unknown = error.errno in (getattr(socket, "EAI_NONAME", -2), getattr(socket, "EAI_NODATA", -5))
            return StargzError(ErrorCode.NETWORK, "cannot resolve host %s (%s); check the name, DNS, or "
                               "HTTPS_PROXY/NO_PROXY" % ((proxy_url or url).host, error.strerror), error,
                               transient=not unknown)
        if isinstance(error, ConnectionRefusedError):
            target = "proxy %s" % proxy_url.netloc if proxy_url else where
            return StargzError(ErrorCode.NETWORK, "connection refused by %s" % target, error, transient=True)
        return StargzError(ErrorCode.NETWORK, "cannot connect to %s: %s" % (where, _describe_os_error(error)),
                           error, transient=True)

    def _acquire(self, url, fresh=False):
        """(connection, reused): an idle one to the URL's origin unless `fresh`."""
        conn = None if fresh else self.pool.take(url.origin)
        if conn is not None:
            return conn, True
        conn = self._connect(url)
        self.pool.activate(conn)
        return conn, False

    def abort(self):
        """Wake every thread blocked on a read (Ctrl-C)."""
        self.pool.abort()

    def close(self):
        self.pool.close()

    # -- requests ------------------------------------------------------------
    def _send_once(self, method, url, headers, body):
        """One request on a pooled connection; if a kept-alive connection turns out
        stale, the origin's idle ones are dropped and a new connection is tried once:
        that is the pool's housekeeping, not a retry."""
        import http.client
        for fresh_try in (False, True):
            conn, reused = self._acquire(url, fresh=fresh_try)
            target = url.text if conn._starget_absolute_form else url.path
            all_headers = dict(conn._starget_proxy_headers)
            all_headers.update(headers)
            try:
                conn.request(method, target, body=body, headers=all_headers)
                raw = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                    http.client.CannotSendRequest, http.client.BadStatusLine) as e:
                self.pool.discard(conn)
                if reused and not fresh_try:
                    self.pool.drop_idle(url.origin)   # the server closed them all, most likely
                    continue
                raise StargzError(ErrorCode.NETWORK, "%s %s: %s" % (method, url.netloc, _describe_os_error(e)),
                                  e, transient=True) from e
            except (socket.timeout, OSError, http.client.HTTPException) as e:
                self.pool.discard(conn)
                raise StargzError(ErrorCode.NETWORK, "%s %s: %s" % (method, url.netloc, _describe_os_error(e)),
                                  e, transient=True) from e
            except (ValueError, UnicodeError) as e:   # a header or URL http.client will not send
                self.pool.discard(conn)
                raise StargzError(ErrorCode.NETWORK, "%s %s: invalid request: %s" % (method, url.netloc, e), e) from e
            self.stats.add("requests")
            _log.debug("> %s %s", method, _redact(url.text))
            _log.debug("< %d %s", raw.status, raw.reason)
            return _Response(self.pool, conn, raw, url, self.stats)

    def request(self, method, url, headers=None, body=None, follow_redirects=True):
        """Send a request once, following redirects; retries are the caller's, through
        RetryPolicy.run, so that a request and the reading of its body are retried
        together, and once.

        The caller's `Authorization` goes only to the origin it was meant for;
        an https -> http redirect is refused."""
        headers = dict(headers or {})
        target = _URL(url)
        origin = target.origin
        for _hop in range(10):
            sent = headers if target.origin == origin else {
                k: v for k, v in headers.items() if k.lower() not in _SENSITIVE_HEADERS}
            response = self._send_once(method, target, sent, body)
            location = response.header("Location")
            if not (follow_redirects and response.status in _REDIRECTS and location):
                return response
            response.discard()
            target, method, body = self._redirect(target, origin, location, response.status, method, body)
        _fail(ErrorCode.NETWORK, "too many redirects from %s" % _redact(url))

    @staticmethod
    def _redirect(target, origin, location, status, method, body):
        """(next URL, method, body) of a redirect, or a refusal."""
        from urllib.parse import quote, urljoin
        next_target = _URL(urljoin(target.text, quote(location, safe="/:?#[]@!$&'()*+,;=%~")))
        if body is not None and status != 303 and next_target.origin != origin:   # 301/302 resend it too
            _fail(ErrorCode.NETWORK, "refused to send a request body on to %s after a redirect" % next_target.netloc)
        if target.scheme == "https" and next_target.scheme == "http":
            _fail(ErrorCode.NETWORK, "refused redirect from https://%s to plain http://%s"
                  % (target.netloc, next_target.netloc))
        _log.debug("redirect %d to %s", status, _redact(next_target.text))
        if status == 303:
            return next_target, "GET", None
        return next_target, method, body

# =============================================================================
# registry
# =============================================================================

# Media types, one row each: (media type, what it is). Manifests and indexes are
# asked for by the first table; a layer's compression is read from the second.
_MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_MANIFEST_MEDIA_TYPES = (
    (_MEDIA_OCI_MANIFEST, "manifest"),
    (_MEDIA_OCI_INDEX, "index"),
    (_MEDIA_DOCKER_MANIFEST, "manifest"),
    (_MEDIA_DOCKER_LIST, "index"),
)
_LAYER_MEDIA_TYPES = (
    ("application/vnd.oci.image.layer.v1.tar+gzip", "gzip"),
    ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "gzip"),
    ("application/vnd.docker.image.rootfs.diff.tar.gzip", "gzip"),
    ("application/vnd.oci.image.layer.v1.tar+zstd", "zstd"),
    ("application/vnd.oci.image.layer.v1.tar", "none"),
    ("application/vnd.docker.image.rootfs.diff.tar", "none"),
)
_MANIFEST_ACCEPT = ", ".join(media for media, _ in _MANIFEST_MEDIA_TYPES)
_INDEX_MEDIA_TYPES = tuple(media for media, kind in _MANIFEST_MEDIA_TYPES if kind == "index")
_MAX_MANIFEST_SIZE = 4 << 20


def _parse_www_authenticate(value):
    """`Bearer realm="...",service="..."` -> ("bearer", {...}); quoted values may hold commas."""
    if not isinstance(value, str) or not value.strip():
        return "", {}
    value = value.strip()
    scheme, _, rest = value.partition(" ")
    params = {}
    for match in re.finditer(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*(?:,|$)', rest):
        raw = match.group(2)
        params[match.group(1).lower()] = (re.sub(r"\\(.)", r"\1", raw) if raw is not None else match.group(3))
    return scheme.lower(), params


def _sha256_digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _AuthState(object):
    """The Authorization value an endpoint answers to, shared by the threads using it."""

    def __init__(self, value=None):
        self._value, self._lock = value, threading.Lock()

    def get(self):
        with self._lock:
            return self._value

    def set(self, value):
        with self._lock:
            self._value = value


class _Endpoint(object):
    """One place the distribution API is spoken for an image: a host and a scheme.
    A value: nothing changes it but its own auth state. `role` says why it is in
    the list: "mirror", "registry" or "plain-http" (the fallback of an https
    endpoint that allows plain HTTP, tried when the server does not speak TLS)."""

    __slots__ = ("host", "scheme", "role", "auth")

    def __init__(self, host, scheme, role, authorization=None):
        self.host, self.scheme, self.role = host, scheme, role
        self.auth = _AuthState(authorization)

    @property
    def base_url(self):
        return "%s://%s" % (self.scheme, self.host)

    def __repr__(self):
        return "Endpoint(%r, %s)" % (self.base_url, self.role)


def _endpoint_fallback(endpoints, position, error):
    """After `error` at endpoints[position]: the position to try next, or None to give up.

    A server that does not speak TLS moves on to the same host's plain-http endpoint;
    a mirror that fails or lacks the image, to the image's own registry."""
    here = endpoints[position]
    following = endpoints[position + 1:]
    if isinstance(error, _TLSHandshakeError) and following and following[0].role == "plain-http"\
            and following[0].host == here.host:
        (_log.debug if _is_loopback(here.host) else _log.warning)("%s does not speak TLS; using plain HTTP", here.host)
        return position + 1
    if here.role == "mirror" or (here.role == "plain-http" and endpoints[position - 1].role == "mirror"):
        if error.code in (ErrorCode.NETWORK, ErrorCode.NOT_FOUND, ErrorCode.AUTH):
            for offset, endpoint in enumerate(following, position + 1):
                if endpoint.role == "registry":
                    _log.warning("mirror %s: %s; using %s", here.host, error.message, endpoint.host)
                    return offset
    return None


def _error_text(response):
    """`CODE: message` from a distribution error body, else the status line."""
    try:
        body = response.read_all(64 << 10) if (response.length or 0) <= (64 << 10) else b""
    except StargzError:
        body = b""
    finally:
        response.close()
    try:
        err = json.loads(body.decode("utf-8"))["errors"][0]
        return _redact("%s: %s" % (err.get("code", "?"), err.get("message", "")))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError):
        first = body.decode("utf-8", "replace").strip().splitlines()
        return _redact(first[0][:200] if first else response.reason or "")


def _raise_for_status(response, what, other=ErrorCode.NETWORK):
    """The error for an unexpected status: 429 and 5xx (but 501) are transient."""
    status = response.status
    retry_after = _parse_retry_after(response.header("Retry-After")) if status in (429, 503) else None
    text = _error_text(response)
    if status == 404 and other == ErrorCode.NETWORK:
        _fail(ErrorCode.NOT_FOUND, "%s not found (%s)" % (what, text))
    if status in (401, 403) and other == ErrorCode.NETWORK:
        _fail(ErrorCode.AUTH, "access to %s denied: HTTP %d (%s)" % (what, status, text))
    if RetryPolicy.retryable_status(status):
        _fail(ErrorCode.NETWORK, "%s: HTTP %d from %s (%s)" % (what, status, response.url.netloc, text),
              transient=True, retry_after=retry_after)
    if other == ErrorCode.NETWORK:
        _fail(other, "%s: unexpected HTTP %d (%s)" % (what, status, text))
    _fail(other, "%s failed: HTTP %d %s" % (what, status, text))


class _RegistryAuth(object):
    """Answers a registry's 401 challenges for one repository: Basic with the
    credentials found, or a Bearer token from the challenge's realm."""

    def __init__(self, ref, credentials, auth_type, transport):
        self.ref, self.credentials, self.auth_type, self.transport = ref, credentials, auth_type, transport

    def _credential(self, endpoint):
        if self.auth_type == "none":
            return None
        return self.credentials.lookup(endpoint.host, self.ref.repository)

    def answer(self, endpoint, challenge, sent):
        """Turn a 401 challenge into an Authorization value, or fail with AUTH."""
        scheme, params = _parse_www_authenticate(challenge)
        cred = self._credential(endpoint)
        where = endpoint.host
        if scheme == "basic":
            if cred is None or cred.identity_token:
                _fail(ErrorCode.AUTH, "%s requires authentication: pass --credential USER:PASSWORD or log in "
                      "with docker/podman" % where)
            header = cred.basic_header()
            if sent == header:
                _fail(ErrorCode.AUTH, "authentication failed for %s: wrong username or password (%s)"
                      % (where, cred.source))
            return header
        if scheme == "bearer" and params.get("realm"):
            if sent and params.get("error") == "insufficient_scope":
                _fail(ErrorCode.AUTH, "access to %s on %s denied (insufficient_scope)" % (self.ref.repository, where))
            return "Bearer " + self._fetch_token(endpoint, params, cred)
        _fail(ErrorCode.AUTH, "%s sent an authentication challenge starget cannot answer: %s"
              % (where, _redact(challenge or "(none)")))

    def rejected(self, endpoint, challenge, sent):
        """A 401 for the credentials just sent: say which and why."""
        scheme, params = _parse_www_authenticate(challenge)
        cred = self._credential(endpoint)
        if scheme == "basic" or (sent or "").startswith("Basic "):
            if cred is None:
                _fail(ErrorCode.AUTH, "%s requires authentication: pass --credential USER:PASSWORD or log in "
                      "with docker/podman" % endpoint.host)
            _fail(ErrorCode.AUTH, "authentication failed for %s: wrong username or password (%s)"
                  % (endpoint.host, cred.source))
        reason = params.get("error") or "token rejected"
        _fail(ErrorCode.AUTH, "access to %s on %s denied (%s)%s" % (
            self.ref.repository, endpoint.host, reason,
            "" if cred is not None else ": pass --credential or log in with docker/podman"))

    def _token_request(self, endpoint, params, cred):
        """(method, url, headers, body) of the token request a Bearer challenge asks for."""
        from urllib.parse import urlencode
        query = {}
        scope = params.get("scope") or (self.ref.repository and "repository:%s:pull" % self.ref.repository)
        if scope:       # none for a registry-wide client (login): a token for the account only
            query["scope"] = scope
        if params.get("service"):
            query["service"] = params["service"]
        realm = params["realm"]
        if cred is not None and endpoint.scheme == "https" and not realm.lower().startswith("https://")\
                and not _is_loopback(_URL(realm).netloc):
            _fail(ErrorCode.AUTH, "%s names a plain-http token server (%s): refusing to send credentials there"
                  % (endpoint.host, _redact(realm)))
        if cred is not None and cred.identity_token:
            # docker's identity tokens are OAuth2 refresh tokens.
            query.update(grant_type="refresh_token", refresh_token=cred.identity_token, client_id="starget")
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            return "POST", realm, headers, urlencode(query).encode("ascii")
        headers = {"Authorization": cred.basic_header()} if cred is not None else {}
        return "GET", realm + ("&" if "?" in realm else "?") + urlencode(query), headers, None

    def _fetch_token(self, endpoint, params, cred):
        method, url, headers, body = self._token_request(endpoint, params, cred)
        response = self.transport.request(method, url, headers=headers, body=body)
        if response.status in (401, 403):
            response.discard()
            if cred is None:
                _fail(ErrorCode.AUTH, "token server for %s refused anonymous access: pass --credential"
                      % endpoint.host)
            _fail(ErrorCode.AUTH, "authentication failed for %s: the token server rejected the credentials (%s)"
                  % (endpoint.host, cred.source))
        if response.status != 200:
            _raise_for_status(response, "token request to %s" % response.url.netloc, ErrorCode.AUTH)
        try:
            doc = json.loads(response.read_all(1 << 20).decode("utf-8"))
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError, UnicodeDecodeError, RecursionError):
            token = None
        if not isinstance(token, str) or not re.match(r"^[\x21-\x7e]{1,16384}\Z", token):
            _fail(ErrorCode.AUTH, "token server for %s answered without a usable token" % endpoint.host)
        _register_secret(token)
        return token


class RegistryClient(object):
    """Speaks the distribution API for one repository: auth, manifests, blob ranges.

    `endpoints` are tried in order by resolution (mirrors, then the registry);
    `select` records the one that answered, and every later request goes there.
    Each method makes one attempt: retries are the callers', through RetryPolicy.run."""

    BLOB_LOCATION_TTL = 300.0

    def __init__(self, ref, credentials=None, insecure=False, transport=None, plain_http=None,
                 mirrors=(), auth_type=None):
        """`mirrors`: [(host, plain_http)] tried before the image's own registry, as
        docker's registry mirrors are; `auth_type` "none" never sends credentials,
        "basic" sends them at once, without waiting for a challenge."""
        self.ref = ref if isinstance(ref, ImageRef) else ImageRef.parse(ref)
        self.insecure = insecure
        self.transport = transport or Transport(insecure=insecure)
        self.credentials = credentials if credentials is not None else Credentials()
        self.auth_type = auth_type
        self.auth = _RegistryAuth(self.ref, self.credentials, auth_type, self.transport)
        hosts = [(host, plain, "mirror") for host, plain in mirrors]
        hosts.append((self.ref.registry, plain_http, "registry"))
        self.endpoints = tuple(self._endpoints_of(hosts))
        self.endpoint = self.endpoints[0]
        self._lock = threading.Lock()
        self._blob_locations = {}       # digest -> (url, expiry) after a cross-host redirect
        self._warned_no_ranges = False

    def _endpoints_of(self, hosts):
        """Endpoints for [(host, plain_http, role)]. plain_http True: http only; False:
        https (plus http with --insecure); None: the same, but a loopback host may also
        fall back to http, as docker does for registries it treats as insecure, unless
        a CA is configured for it (then it means TLS)."""
        for host, plain_http, role in hosts:
            authorization = None
            if self.auth_type == "basic" and role == "registry":   # configured: no wait for a 401
                cred = self.credentials.lookup(host, self.ref.repository)
                if cred is not None and not cred.identity_token:
                    authorization = cred.basic_header()
            if plain_http:
                yield _Endpoint(host, "http", role, authorization)
                continue
            yield _Endpoint(host, "https", role, authorization)
            loopback_default = plain_http is None and _is_loopback(host) and not self.transport.has_ca_for(host)
            if self.insecure or loopback_default:
                yield _Endpoint(host, "http", "plain-http", authorization)

    def select(self, endpoint):
        """Speak to `endpoint` from now on (resolution found the image there)."""
        self.endpoint = endpoint

    @property
    def retry(self):
        return self.transport.retry

    def retrying(self, operation, what):
        """operation() through the one retry loop, counted in the transport's stats."""
        return self.transport.retry.run(operation, what, self.transport.stats)

    # -- requests ------------------------------------------------------------
    def request(self, method, path, headers=None, endpoint=None):
        """A request to the registry with auth; a 401 is answered once (a fresh token,
        also when one expires in the middle of a download)."""
        endpoint = endpoint or self.endpoint
        answered = False
        while True:
            url = "%s/v2/%s%s" % (endpoint.base_url, self.ref.repository, path) if path.startswith("/") else path
            sent_headers = dict(headers or {})
            authorization = endpoint.auth.get()
            if authorization:
                sent_headers["Authorization"] = authorization
            response = self.transport.request(method, url, headers=sent_headers)
            if response.status != 401:
                return response
            challenge = response.header("WWW-Authenticate", "")
            response.discard()
            if answered:
                self.auth.rejected(endpoint, challenge, authorization)
            endpoint.auth.set(self.auth.answer(endpoint, challenge, authorization))
            answered = True

    # -- manifests -----------------------------------------------------------
    def get_manifest(self, reference=None, endpoint=None):
        """(raw bytes, media type, digest) of a manifest or index, digest-checked when pinned."""
        reference = reference or self.ref.reference
        what = "manifest %s" % ("%s@%s" % (self.ref.repository, reference) if reference.startswith("sha256:")
                                else "%s:%s" % (self.ref.repository, reference))

        def fetch():
            response = self.request("GET", "/manifests/" + reference, {"Accept": _MANIFEST_ACCEPT}, endpoint)
            if response.status != 200:
                _raise_for_status(response, "image %s (%s)" % (self.ref, what))
            return response, response.read_all(_MAX_MANIFEST_SIZE)

        response, raw = self.retrying(fetch, what)
        digest = _sha256_digest(raw)
        if reference.startswith("sha256:") and digest != reference:
            _fail(ErrorCode.INTEGRITY, "%s does not match its digest (got %s)" % (what, digest))
        media_type = (response.header("Content-Type") or "").split(";")[0].strip()
        return raw, media_type, digest

    def get_config(self, digest):
        """The raw config blob (small), checked against its digest; None if unavailable."""
        if not digest or not _DIGEST_RE.match(str(digest)):
            return None

        def fetch():
            response = self.request("GET", "/blobs/" + digest)
            if response.status == 200:
                return response.read_all(_MAX_MANIFEST_SIZE)
            if RetryPolicy.retryable_status(response.status):
                _raise_for_status(response, "config blob %s" % digest)
            response.discard()
            return None

        raw = self.retrying(fetch, "config blob %s" % digest)
        if raw is not None and _sha256_digest(raw) != digest:
            _fail(ErrorCode.INTEGRITY, "config blob %s does not match its digest" % digest)
        return raw

    # -- blobs ---------------------------------------------------------------
    def _stored_location(self, digest, headers):
        """A response from where a redirect sent this blob before, or None."""
        with self._lock:
            location = self._blob_locations.get(digest)
        if not location or location[1] <= time.time():
            return None
        response = None
        try:
            response = self.transport.request("GET", location[0], headers=headers)
        except StargzError as e:
            _log.info("stored location of %s failed (%s): asking the registry again", digest, e.message)
        if response is not None and response.status not in (200, 206):   # expired signature, ...
            response.discard()
            response = None
        if response is None:
            with self._lock:
                self._blob_locations.pop(digest, None)
        return response

    def open_blob(self, digest, start, end):
        """A response positioned at byte `start` of the blob, for the inclusive range [start, end]."""
        headers = {"Range": "bytes=%d-%d" % (start, end)}
        response = self._stored_location(digest, headers)
        if response is None:
            response = self.request("GET", "/blobs/" + digest, headers)
            if response.url.origin != _URL(self.endpoint.base_url).origin and response.status in (200, 206):
                with self._lock:
                    self._blob_locations[digest] = (response.url.text, time.time() + self.BLOB_LOCATION_TTL)
        what = "blob %s" % digest
        if response.status == 206:
            match = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", response.header("Content-Range") or "")
            if not match or int(match.group(1)) != start or int(match.group(2)) < end:
                response.close()
                _fail(ErrorCode.NETWORK, "%s: server sent range %s for bytes=%d-%d"
                      % (what, response.header("Content-Range"), start, end))
            return response
        if response.status == 200:
            if not self._warned_no_ranges:
                self._warned_no_ranges = True
                _log.warning("%s ignores HTTP Range requests: reading whole blobs (slow)", response.url.netloc)
            response.skip(start)
            return response
        if response.status == 416:
            response.close()  # distribution's 416 announces a wrong Content-Length: never read it
            _fail(ErrorCode.FORMAT, "%s: range %d-%d not satisfiable; the blob is shorter than its descriptor says"
                  % (what, start, end))
        _raise_for_status(response, what)

    def read_blob(self, digest, start, end):
        """Bytes [start, end] (inclusive) of a blob, in one attempt."""
        response = self.open_blob(digest, start, end)
        try:
            return response.read_exactly(end - start + 1)
        finally:
            response.close()


# -- the registry itself: login, tags, the catalog -------------------------------
#
# Module functions over a RegistryClient: they speak to the registry, never to a
# mirror (a mirror holds some of its tags, and a login is the registry's).

_MAX_LIST_PAGES = 1000
_LINK_NEXT_RE = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')


def _registry_client(client, credentials=None, auth_type=None):
    """A client for `client`'s registry as a whole (no repository): the same transport
    and endpoints, each with an auth state of its own (_at_registry skips the mirrors)."""
    wide = RegistryClient(ImageRef(client.ref.registry, ""), credentials or client.credentials,
                          client.insecure, client.transport, auth_type=auth_type)
    wide.endpoints = tuple(_Endpoint(e.host, e.scheme, e.role) for e in client.endpoints)
    wide.endpoint = wide.endpoints[0]
    return wide


def _at_registry(client, operation):
    """operation(endpoint) at the registry's endpoints in order (https, then plain
    http where allowed), as _endpoint_fallback says; the one that answers is selected."""
    endpoints = tuple(e for e in client.endpoints if e.role != "mirror" and e.host == client.ref.registry)
    position = 0
    while True:
        try:
            result = operation(endpoints[position])
        except StargzError as error:
            position = _endpoint_fallback(endpoints, position, error)
            if position is None:
                raise
            continue
        client.select(endpoints[position])
        return result


def _check_login(client):
    """GET /v2/, answering its challenge with the client's credentials as a pull does
    (Basic, or a token from the realm): AUTH when they are refused. True when the
    registry asked for them, False when it lets anyone in (nothing was checked)."""
    def check(endpoint):
        def attempt():
            response = client.request("GET", endpoint.base_url + "/v2/", endpoint=endpoint)
            if response.status != 200:
                _raise_for_status(response, "registry %s" % endpoint.host)
            response.discard()
            return endpoint.auth.get() is not None
        return client.retrying(attempt, "login to %s" % endpoint.host)
    return _at_registry(client, check)


def _next_link(link, url):
    """The `Link: <...>; rel="next"` of a list page, as an absolute URL, or None. Only
    on the same origin: the request carries the registry's Authorization."""
    from urllib.parse import urljoin
    match = _LINK_NEXT_RE.search(link or "")
    if not match:
        return None
    target = urljoin(url, match.group(1))
    if _URL(target).origin != _URL(url).origin:
        _fail(ErrorCode.FORMAT, "%s sent a next-page link to another host (%s): refused"
              % (_URL(url).netloc, _redact(target)))
    return target


def _list_pages(client, path, key, what, valid, max_pages=_MAX_LIST_PAGES):
    """The strings under `key` of a paginated list (tags, the catalog), following
    the Link headers; stops with a warning after `max_pages` or on a page seen before.
    Names that do not match `valid` are dropped with a warning (they are printed one
    a line, where a newline or an escape sequence would forge output)."""
    def pages(endpoint):
        items, url, seen = [], endpoint.base_url + path, set()
        while url is not None:
            if url in seen or len(seen) >= max_pages:
                _log.warning("%s: stopped after %d page(s): a page seen before, or too many", what, len(seen))
                break
            seen.add(url)

            def fetch(url=url):
                response = client.request("GET", url, {"Accept": "application/json"}, endpoint)
                if response.status != 200:
                    _raise_for_status(response, what)
                return response.header("Link"), response.read_all(_MAX_MANIFEST_SIZE)
            link, raw = client.retrying(fetch, what)
            try:
                page = json.loads(raw.decode("utf-8")).get(key) or []
            except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
                page = None
            if not isinstance(page, list) or not all(isinstance(item, str) for item in page):
                _fail(ErrorCode.FORMAT, "%s: the registry's answer is not a JSON object with a %r list" % (what, key))
            kept = [item for item in page if valid.match(item)]
            if len(kept) < len(page):
                _log.warning("%s: %d invalid names left out", what, len(page) - len(kept))
            items.extend(kept)
            url = _next_link(link, url)
        return items
    return _at_registry(client, pages)


def _list_tags(client, max_pages=_MAX_LIST_PAGES):
    """The tags of the client's repository, in the registry's order."""
    name = client.ref.repository
    return _list_pages(client, "/v2/%s/tags/list" % name, "tags",
                       "tags of %s/%s" % (client.ref.registry, name), _TAG_RE, max_pages)


def _list_catalog(client, max_pages=_MAX_LIST_PAGES):
    """The repositories of the client's registry (/v2/_catalog; many registries refuse it)."""
    return _list_pages(client, "/v2/_catalog", "repositories", "catalog of %s" % client.ref.registry,
                       _REPO_RE, max_pages)

# =============================================================================
# formats (pure: bytes or JSON in, objects out; no I/O)
# =============================================================================

# -- image manifests and indexes ------------------------------------------------

_ANNOTATION_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"


class _LayerDescriptor(object):
    """One layer of a manifest: what the registry says about the blob; `position`
    is its place in the manifest's list, 0 at the bottom."""

    __slots__ = ("position", "digest", "size", "media_type", "annotations")

    def __init__(self, position, digest, size, media_type, annotations):
        self.position, self.digest, self.size = position, digest, size
        self.media_type, self.annotations = media_type, annotations

    @property
    def toc_digest(self):
        return self.annotations.get(_ANNOTATION_TOC_DIGEST)

    @property
    def compression(self):
        """gzip, zstd, none or unknown, from the media type table (then its suffix)."""
        media = self.media_type or ""
        for known, compression in _LAYER_MEDIA_TYPES:
            if media == known:
                return compression
        if "zstd" in media:
            return "zstd"
        if "gzip" in media or media.endswith(".tar.gz"):
            return "gzip"
        if media.endswith(".tar"):
            return "none"
        return "unknown"

    @classmethod
    def from_json(cls, position, doc, manifest_digest):
        if not isinstance(doc, dict) or not _DIGEST_RE.match(str(doc.get("digest", "")))\
                or doc.get("size").__class__ is not int or doc["size"] < 0:
            _fail(ErrorCode.FORMAT, "manifest %s has a malformed layer descriptor #%d" % (manifest_digest, position))
        annotations = doc.get("annotations") if isinstance(doc.get("annotations"), dict) else {}
        return cls(position, doc["digest"], doc["size"], str(doc.get("mediaType", "")), annotations)


class _ImageManifest(object):
    """A resolved image manifest: its digest, platform and layers; `index` is the
    ImageIndexManifest it was chosen from, or None for a single-platform image."""

    def __init__(self, ref, digest, media_type, platform, layers, config_digest, raw, index=None):
        self.ref, self.digest, self.media_type = ref, digest, media_type
        self.platform, self.layers, self.config_digest, self.raw = platform, layers, config_digest, raw
        self.index = index

    @classmethod
    def from_json(cls, doc, ref, digest, media_type, raw, platform=None, index=None):
        media_type = doc.get("mediaType") or media_type
        raw_layers = doc.get("layers") or []
        if not isinstance(raw_layers, list):
            _fail(ErrorCode.FORMAT, "manifest %s: 'layers' is not a list" % digest)
        layers = [_LayerDescriptor.from_json(i, layer, digest) for i, layer in enumerate(raw_layers)]
        if not layers and "layers" not in doc:
            _fail(ErrorCode.UNSUPPORTED, "%s is not an image manifest (media type %s)" % (ref, media_type))
        config = doc.get("config") if isinstance(doc.get("config"), dict) else {}
        return cls(ref, digest, media_type, platform, layers, config.get("digest"), raw, index)


class _ImageIndexManifest(object):
    """An OCI image index (or docker manifest list): the platforms it offers."""

    def __init__(self, digest, media_type, entries):
        self.digest, self.media_type = digest, media_type
        self.entries = entries      # [(Platform, descriptor dict)], attestations left out

    @classmethod
    def from_json(cls, doc, digest, media_type):
        entries = []
        listed = doc.get("manifests")
        for desc in listed if isinstance(listed, list) else []:
            if not isinstance(desc, dict) or not _DIGEST_RE.match(str(desc.get("digest", ""))):
                continue
            plat = Platform.from_descriptor(desc)
            annotations = desc.get("annotations") if isinstance(desc.get("annotations"), dict) else {}
            if (plat.os, plat.architecture) == ("unknown", "unknown") or\
                    annotations.get("vnd.docker.reference.type") == "attestation-manifest":
                continue
            entries.append((plat, desc))
        return cls(digest, doc.get("mediaType") or media_type, entries)

    @property
    def platforms(self):
        return [plat for plat, _ in self.entries]


def _parse_manifest_json(raw, what):
    """A manifest's or index's bytes -> its JSON object."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise StargzError(ErrorCode.FORMAT, "manifest of %s is not valid JSON" % what, e) from e
    if not isinstance(doc, dict):
        _fail(ErrorCode.FORMAT, "manifest of %s is not a JSON object" % what)
    return doc


def _is_image_index(doc, media_type):
    media_type = doc.get("mediaType") or media_type
    return media_type in _INDEX_MEDIA_TYPES or (isinstance(doc.get("manifests"), list) and "layers" not in doc)


def _choose_platform(index, wanted, what):
    """The index entry (descriptor dict) for platform `wanted`, or NOT_FOUND naming
    the platforms there are."""
    for plat, desc in index.entries:
        if wanted.matches(plat):
            return desc
    available = ", ".join(sorted(set(str(p) for p in index.platforms))) or "none"
    _fail(ErrorCode.NOT_FOUND, "%s has no image for platform %s (available: %s); use --platform"
          % (what, wanted, available))


def _platform_of_config(raw):
    """The platform an image's config blob declares, or None."""
    try:
        config = json.loads(raw.decode("utf-8"))
        return Platform(str(config["os"]), str(config["architecture"]), config.get("variant"))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError):
        return None


# -- eStargz: footer and TOC ----------------------------------------------------

_TOC_TAR_NAME = "stargz.index.json"
_FOOTER_SIZE = 51
_LEGACY_FOOTER_SIZE = 47
_PREFETCH_LANDMARK = ".prefetch.landmark"
_NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
_WHITEOUT_PREFIX = ".wh."
_OPAQUE_WHITEOUT = ".wh..wh..opq"
_MAX_TOC_JSON_SIZE = 256 << 20      # uncompressed TOC bound: decompression bombs stop here
_MAX_FILE_SIZE = 1 << 46            # 64 TiB: anything larger is a hostile or broken TOC
_MAX_OFFSET = 1 << 50
_ID_LIMIT = (1 << 32) - 2           # uid, gid, device numbers: what the kernel accepts
_ENTRY_TYPES = ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk")
_ZSTD_CHUNKED_MAGIC = b"GnUlInUx"
_ENTRY_TYPE_SET = frozenset(_ENTRY_TYPES)
_BASE64_RE = re.compile(r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")   # TOC xattr values
# A name that _normalize_path would return unchanged (but a directory's trailing "/"):
# no empty, "." or ".." component, no leading "/", no NUL. The TOC reader's fast path.
_CLEAN_NAME_RE = re.compile(r"(?:(?!\.\.?(?:/|\Z))[^/\x00]+/)*(?!\.\.?(?:/|\Z))[^/\x00]+/?\Z")
_FOOTER_PAYLOAD_RE = re.compile(br"^([0-9a-f]{16})STARGZ\Z")


def parse_footer(tail):
    """(toc_offset, footer_size) from the last bytes of a blob: the 51-byte eStargz
    footer, else the 47-byte legacy stargz one."""
    if not isinstance(tail, (bytes, bytearray)):
        _fail(ErrorCode.FORMAT, "footer must be bytes")
    tail = bytes(tail)
    if len(tail) >= _FOOTER_SIZE:
        footer = tail[-_FOOTER_SIZE:]
        # gzip header with FEXTRA; XLEN=26; subfield 'S''G' of 22 bytes
        if footer[:4] == b"\x1f\x8b\x08\x04" and footer[10:16] == b"\x1a\x00SG\x16\x00":
            match = _FOOTER_PAYLOAD_RE.match(footer[16:38])
            if match and footer[38:] == b"\x01\x00\x00\xff\xff" + b"\x00" * 8:
                return int(match.group(1), 16), _FOOTER_SIZE
    if len(tail) >= _LEGACY_FOOTER_SIZE:
        footer = tail[-_LEGACY_FOOTER_SIZE:]
        if footer[:4] == b"\x1f\x8b\x08\x04" and footer[10:12] == b"\x16\x00":
            match = _FOOTER_PAYLOAD_RE.match(footer[12:34])
            if match and footer[34:] == b"\x01\x00\x00\xff\xff" + b"\x00" * 8:
                return int(match.group(1), 16), _LEGACY_FOOTER_SIZE
    raise _NotEStargzError(ErrorCode.FORMAT, "not eStargz: the layer has no eStargz or stargz footer")


def _extract_toc_json(member):
    """The uncompressed `stargz.index.json` bytes from the TOC's gzip member."""
    inflater = zlib.decompressobj(31)
    try:
        data = inflater.decompress(bytes(member), _MAX_TOC_JSON_SIZE + 1024)
    except zlib.error as e:
        raise StargzError(ErrorCode.FORMAT, "TOC is not valid gzip: %s" % e, e, damaged=True) from e
    if len(data) < 512:
        _fail(ErrorCode.FORMAT, "TOC member is truncated (%d bytes inflated)" % len(data))
    import tarfile   # its header parser (checksum, octal and base-256 numbers) is the reference
    try:
        header = tarfile.TarInfo.frombuf(data[:512], "utf-8", "surrogateescape")
    except tarfile.HeaderError as e:
        raise StargzError(ErrorCode.FORMAT, "TOC member does not start with a valid tar header: %s" % e, e) from e
    if header.name.lstrip("./") != _TOC_TAR_NAME or header.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        _fail(ErrorCode.FORMAT, "TOC member does not start with %s (found %r)" % (_TOC_TAR_NAME, header.name[:60]))
    size = header.size
    if size > _MAX_TOC_JSON_SIZE:
        _fail(ErrorCode.FORMAT, "TOC size field is invalid or too large")
    if len(data) < 512 + size:
        _fail(ErrorCode.FORMAT, "TOC member is truncated (want %d bytes of JSON, have %d)" % (size, len(data) - 512))
    return data[512:512 + size]


def _inflate_members(pieces, max_out=1 << 20):
    """Inflate concatenated gzip members (a layer, or the members of one range) that
    arrive as `pieces`, an iterable of compressed bytes; yields inflated bytes, at
    most `max_out` at a time, so that memory stays bounded whatever the ratio.
    Corrupt data raises FORMAT, `damaged` (a fetch again may mend it)."""
    inflater = zlib.decompressobj(31)
    for data in pieces:
        while data:
            try:
                out = inflater.decompress(data, max_out)
            except zlib.error as e:
                raise StargzError(ErrorCode.FORMAT, "corrupt gzip data: %s" % e, e, damaged=True) from e
            data = inflater.unconsumed_tail
            if out:
                yield out
            if inflater.eof:    # the next member continues the stream
                data, inflater = inflater.unused_data, zlib.decompressobj(31)
            elif not out:
                break


# -- zstd:chunked: a TOC in zstd skippable frames, payloads as zstd frames ------

_ZSTD_SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
_ZSTD_CHUNKED_FOOTER_SIZE = 48       # a skippable frame: magic, LE32 40, 4 x LE64, "GnUlInUx"
_ZSTD_ANNOTATION_PREFIXES = ("io.github.containers.zstd-chunked.", "io.containers.zstd-chunked.")
_ZSTD_DECODER_HINT = "use Python 3.14 or later, or install one: pip install backports.zstd"


def _zstd_module(what):
    """The interpreter's zstd decoder, imported only when a zstd layer is read:
    compression.zstd (3.14+), else the backports.zstd package (the same API)."""
    try:
        from compression import zstd
        return zstd
    except ImportError:
        pass
    try:
        from backports import zstd
        return zstd
    except ImportError:
        _fail(ErrorCode.UNSUPPORTED, "%s is zstd-compressed and this Python has no zstd decoder: %s"
              % (what, _ZSTD_DECODER_HINT))


def _zstd_annotation(annotations, name):
    """`manifest-position` or `manifest-checksum`, under either writer's prefix."""
    for prefix in _ZSTD_ANNOTATION_PREFIXES:
        value = annotations.get(prefix + name)
        if value is not None:
            return value
    return None


def _parse_zstd_chunked_position(text):
    """`offset:length:uncompressedLength:type` -> a tuple of four ints, or FORMAT."""
    parts = text.split(":") if isinstance(text, str) else []
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 16 for p in parts):
        _fail(ErrorCode.FORMAT, "malformed zstd:chunked manifest position %r" % (text,))
    return tuple(int(p) for p in parts)


def _parse_zstd_chunked_footer(tail):
    """(toc offset, compressed length, uncompressed length, type) from a blob's last
    48 bytes, or FORMAT if they are not a zstd:chunked footer."""
    footer = bytes(tail[-_ZSTD_CHUNKED_FOOTER_SIZE:])
    if len(footer) != _ZSTD_CHUNKED_FOOTER_SIZE or footer[:4] != _ZSTD_SKIPPABLE_MAGIC \
            or footer[4:8] != b"\x28\x00\x00\x00" or footer[-8:] != _ZSTD_CHUNKED_MAGIC:
        raise _NotEStargzError(ErrorCode.FORMAT, "not zstd:chunked: the layer has no zstd:chunked footer")
    return tuple(int.from_bytes(footer[i:i + 8], "little") for i in (8, 16, 24, 32))


def _decompress_zstd_toc(data, uncompressed_length, zstd):
    """The TOC JSON from its zstd frame, never more than the declared (and bounded) size."""
    if uncompressed_length > _MAX_TOC_JSON_SIZE:
        _fail(ErrorCode.FORMAT, "zstd:chunked TOC is too large (%d bytes)" % uncompressed_length)
    try:
        out = zstd.ZstdDecompressor().decompress(bytes(data), uncompressed_length + 1)
    except zstd.ZstdError as e:
        raise StargzError(ErrorCode.FORMAT, "zstd:chunked TOC is not valid zstd: %s" % e, e, damaged=True) from e
    if len(out) != uncompressed_length:
        _fail(ErrorCode.FORMAT, "zstd:chunked TOC holds %d bytes, not the %d its position says"
              % (len(out), uncompressed_length), damaged=True)
    return out


def _inflate_zstd_frames(pieces, zstd, max_out=1 << 20):
    """_inflate_members for zstd: concatenated zstd frames arriving as `pieces`."""
    decompressor = zstd.ZstdDecompressor()
    try:
        for data in pieces:
            while True:
                out = decompressor.decompress(data, max_out)
                if out:
                    yield out
                if decompressor.eof:   # the next frame continues the stream
                    data, decompressor = decompressor.unused_data, zstd.ZstdDecompressor()
                    if not data:
                        break
                elif decompressor.needs_input:
                    break
                else:
                    data = b""         # more output is waiting for the same input
    except zstd.ZstdError as e:
        raise StargzError(ErrorCode.FORMAT, "corrupt zstd data: %s" % e, e, damaged=True) from e


_RFC3339_RE = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.\d+)?(Z|z|[+-]\d\d:\d\d)?\Z")


def _parse_rfc3339(text):
    """Seconds since the epoch, or 0 for a missing or malformed time."""
    match = _RFC3339_RE.match(text) if isinstance(text, str) else None
    if not match:
        return 0
    fields = [int(g) for g in match.groups()[:6]]
    try:
        import calendar
        seconds = calendar.timegm((fields[0], fields[1], fields[2], fields[3], fields[4], fields[5], 0, 0, 0))
    except (ValueError, OverflowError):
        return 0
    zone = match.group(7)
    if zone and zone not in "Zz":
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds


def _normalize_path(name):
    """A TOC or pattern name as a clean relative path ('' is the root).

    Refuses what could point outside the image: NUL, absolute names, `..`."""
    if not isinstance(name, str) or "\x00" in name:
        _fail(ErrorCode.UNSAFE, "invalid name %r" % (name,))
    if name.startswith("/") and name.strip("/"):
        _fail(ErrorCode.UNSAFE, "absolute name %r" % name)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        _fail(ErrorCode.UNSAFE, "name %r goes up with '..'" % name)
    if not parts and name.strip() not in ("", ".", "./", "/"):
        _fail(ErrorCode.UNSAFE, "invalid name %r" % name)
    return "/".join(parts)


class Chunk(object):
    """One piece of a regular file's payload: where it sits in the file (`file_offset`,
    `size`), the compressed extent in the blob of the gzip member holding it
    (`member_offset` to `member_end`), where it starts inside that member's inflated
    bytes (`inner_offset`) and its digest."""

    __slots__ = ("file_offset", "size", "member_offset", "member_end", "inner_offset", "digest")

    def __init__(self, file_offset, size, member_offset, inner_offset, digest, member_end=None):
        self.file_offset, self.size, self.member_offset = file_offset, size, member_offset
        self.inner_offset, self.digest, self.member_end = inner_offset, digest, member_end

    def __repr__(self):
        return "Chunk(file_offset=%d, size=%d, member=%d-%s, inner=%d)" % (
            self.file_offset, self.size, self.member_offset, self.member_end, self.inner_offset)


class TOCEntry(object):
    """One file system entry of a layer's TOC (chunk entries folded into `chunks`)."""

    __slots__ = ("path", "type", "size", "mode", "uid", "gid", "uname", "gname", "mtime", "link",
                 "digest", "offset", "inner_offset", "dev_major", "dev_minor", "xattrs", "chunks",
                 "layer", "blob", "link_target", "spool")

    def __init__(self, path, type, size=0, mode=0, uid=0, gid=0, uname=None, gname=None, mtime=0,
                 link=None, digest=None, offset=0, inner_offset=0, dev_major=0, dev_minor=0, xattrs=None,
                 chunks=None, layer=None, blob=None, link_target=None, spool=None):
        self.path, self.type, self.size, self.mode = path, type, size, mode
        self.uid, self.gid, self.uname, self.gname, self.mtime = uid, gid, uname, gname, mtime
        self.link, self.digest, self.offset, self.inner_offset = link, digest, offset, inner_offset
        self.dev_major, self.dev_minor, self.xattrs = dev_major, dev_minor, xattrs
        self.chunks = chunks or []
        self.layer, self.blob, self.link_target, self.spool = layer, blob, link_target, spool

    @property
    def name(self):
        return posixpath.basename(self.path)

    @property
    def content(self):
        """The entry whose bytes this one has (a hardlink's target, else itself)."""
        return self.link_target if self.type == "hardlink" and self.link_target is not None else self

    def to_json(self):
        """The stable `ls --json` object."""
        content = self.content
        return {
            "path": self.path, "type": self.type, "mode": self.mode,
            "size": content.size if content.type == "reg" else 0,
            "digest": content.digest if content.type == "reg" else None,
            "link": self.link if self.type in ("symlink", "hardlink") else None,
            "layer": self.layer, "blob": self.blob, "uid": self.uid, "gid": self.gid, "mtime": self.mtime,
        }

    def __repr__(self):
        return "TOCEntry(%r, %r)" % (self.path, self.type)


class LayerTOC(object):
    """The parsed TOC of one layer: entries in blob order, extents of every payload."""

    def __init__(self, entries, toc_offset=None, toc_digest=None, blob=None, layer=None,
                 prioritized=(), warnings=(), raw_count=None, footer_size=_FOOTER_SIZE):
        self.entries, self.toc_offset, self.toc_digest = entries, toc_offset, toc_digest
        self.raw_count = len(entries) if raw_count is None else raw_count
        self.footer_size = footer_size
        self.blob, self.layer = blob, layer
        self.prioritized, self.warnings = list(prioritized), list(warnings)
        self.compression = "gzip"      # how its payloads are compressed: gzip or zstd

    def __len__(self):
        return len(self.entries)

    def set_origin(self, blob, layer):
        """Tag every entry with the layer it came from."""
        self.blob, self.layer = blob, layer
        for entry in self.entries:
            entry.blob, entry.layer = blob, layer


# The parsed form of a TOC, as the cache keeps it: one JSON list per TOCEntry field
# (columns, in its argument order), so that loading builds the entries with `map`
# over flat lists instead of a Python loop over nested rows. A regular file's usual
# single chunk (the entry's own payload) is only its member's end.
_PARSED_TOC_FORMAT = 2
_ROW_FIELDS = ("path", "type", "size", "mode", "uid", "gid", "uname", "gname", "mtime", "link", "digest",
               "offset", "inner_offset", "dev_major", "dev_minor", "xattrs")
_CLEAN_PATH_RE = re.compile(r"(?:(?!\.\.?(?:/|\Z))[^/\x00]+/)*(?!\.\.?(?:/|\Z))[^/\x00]+\Z")


def _toc_rows(toc):
    """A LayerTOC as plain JSON values (see _toc_from_rows)."""
    entries = toc.entries
    doc = {name: [getattr(e, name) for e in entries] for name in _ROW_FIELDS}
    ends, chunked = [], {}
    for i, e in enumerate(entries):
        chunks = e.chunks
        c = chunks[0] if len(chunks) == 1 else None
        if c is not None and c.member_end is not None and (c.file_offset, c.size, c.member_offset, c.inner_offset,
                                                          c.digest) == (0, e.size, e.offset, e.inner_offset, e.digest):
            ends.append(c.member_end)
        else:
            ends.append(None)
            if chunks:
                chunked[str(i)] = [[c.file_offset, c.size, c.member_offset, c.inner_offset, c.digest, c.member_end]
                                   for c in chunks]
    doc.update(member_ends=ends, chunked=chunked, toc_offset=toc.toc_offset, toc_digest=toc.toc_digest,
               raw_count=toc.raw_count, footer_size=toc.footer_size, prioritized=toc.prioritized,
               warnings=toc.warnings)
    return doc


def _toc_from_rows(doc):
    """The LayerTOC _toc_rows made. Written by starget, but a file on disk: names and
    types are checked again (cheaply), and anything off is a FORMAT error."""
    try:
        columns = [doc[name] for name in _ROW_FIELDS]
        paths, kinds = columns[0], columns[1]
        if any(len(column) != len(paths) for column in columns) or not set(kinds) <= set(_ENTRY_TYPES) \
                or not all(path == "" or _CLEAN_PATH_RE.match(path) for path in paths):
            raise ValueError("unsafe or inconsistent entries")
        for name in ("size", "mode", "uid", "gid", "mtime", "offset", "inner_offset", "dev_major", "dev_minor"):
            low = -_MAX_OFFSET if name == "mtime" else 0      # a time may be before 1970
            if not all(v.__class__ is int and low <= v < _MAX_OFFSET for v in columns[_ROW_FIELDS.index(name)]):
                raise ValueError("a %s that is not a sane integer" % name)
        entries = list(map(TOCEntry, *columns))
        for entry, end in zip(entries, doc["member_ends"]):
            if end is not None:
                entry.chunks = [Chunk(0, entry.size, entry.offset, entry.inner_offset, entry.digest, end)]
        for i, rows in doc["chunked"].items():
            entries[int(i)].chunks = [Chunk(*row) for row in rows]
        _link_hardlinks(entries)
        return LayerTOC(entries, doc["toc_offset"], doc["toc_digest"], prioritized=doc["prioritized"],
                        warnings=doc["warnings"], raw_count=doc["raw_count"], footer_size=doc["footer_size"])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise StargzError(ErrorCode.FORMAT, "not a parsed TOC: %s" % e, e) from e


def _link_hardlinks(entries):
    """Point each hardlink at the earlier regular file it names (as parse_toc did)."""
    names, named = {}, 0      # names: path -> the latest entry among entries[:named]
    for i, entry in enumerate(entries):
        if entry.type != "hardlink":
            continue
        for earlier in entries[named:i]:
            names[earlier.path] = earlier
        named = i
        target = names[entry.link].content
        if target.type != "reg":
            raise ValueError("hardlink %r" % entry.path)
        entry.link_target = target


def _int_field(raw, key, name, limit=_MAX_OFFSET):
    value = raw.get(key)
    if value is None:
        return 0
    if value.__class__ is not int or value < 0 or value > limit:   # bool is not accepted
        _fail(ErrorCode.FORMAT, "TOC entry %r: field %s=%r is not a sane non-negative integer" % (name, key, value))
    return value


def _digest_field(raw, key, name):
    value = raw.get(key)
    if value is None or value == "":
        return None
    if value.__class__ is not str or not _DIGEST_RE.match(value):
        _fail(ErrorCode.FORMAT, "TOC entry %r: %s %r is not a sha256 digest" % (name, key, value))
    return value


def parse_toc(data, toc_offset=None, blob=None, layer=None):
    """Parse `stargz.index.json` bytes into a LayerTOC.

    The TOC is untrusted: an unsafe name (`..`, absolute, NUL, empty) or structural
    nonsense (bad types, offsets past the TOC, chunks that do not tile their file)
    refuses the whole layer; a hardlink to a missing target is skipped with a warning."""
    raw_entries = _toc_entries(data)
    reader = _TOCReader(toc_offset)
    reader.read(raw_entries)
    toc = reader.finish(_sha256_digest(bytes(data)), len(raw_entries))
    if blob is not None or layer is not None:
        toc.set_origin(blob, layer)
    return toc


def _toc_entries(data):
    """The `entries` list of a TOC document, after the checks of its envelope."""
    if not isinstance(data, (bytes, bytearray)):
        _fail(ErrorCode.FORMAT, "TOC must be bytes")
    if len(data) > _MAX_TOC_JSON_SIZE:
        _fail(ErrorCode.FORMAT, "TOC is too large")
    try:
        doc = json.loads(bytes(data).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise StargzError(ErrorCode.FORMAT, "TOC is not valid JSON: %s" % str(e)[:120], e) from e
    if not isinstance(doc, dict):
        _fail(ErrorCode.FORMAT, "TOC is not a JSON object")
    if doc.get("version") != 1:
        _fail(ErrorCode.FORMAT, "unsupported TOC version %r (want 1)" % (doc.get("version"),))
    raw_entries = doc.get("entries")
    if not isinstance(raw_entries, list):
        _fail(ErrorCode.FORMAT, "TOC has no entries list")
    return raw_entries


class _TOCReader(object):
    """Turns a TOC's raw entries, in order, into TOCEntry objects: chunk entries are
    folded into the file before them, landmarks noted, links checked."""

    def __init__(self, toc_offset):
        self.toc_offset = toc_offset
        self.limit = toc_offset if toc_offset is not None else _MAX_OFFSET
        self.entries, self.warnings, self.prioritized = [], [], []
        self.names = {}
        self.member_offsets = set()
        self.mtimes = {}      # writers stamp most entries with one time: parse each string once

    def read(self, raw_entries):
        """Every raw entry, in order. The loop is the hot path of a big TOC: locals, one
        test for the usual clean name and sane numbers (the full checks run only when it
        fails), and nothing at all for the fields an entry does not have."""
        entries, names, member_offsets, mtimes = self.entries, self.names, self.member_offsets, self.mtimes
        limit, int_field, digest_field = self.limit, _int_field, _digest_field
        clean, digest_ok, types = _CLEAN_NAME_RE.match, _DIGEST_RE.match, _ENTRY_TYPE_SET
        last_reg = None       # the regular file a following chunk entry continues
        for raw in raw_entries:
            if raw.__class__ is not dict:
                _fail(ErrorCode.FORMAT, "TOC entry is not an object")
            get = raw.get
            kind, raw_name = get("type"), get("name")
            if kind.__class__ is str and kind in types and raw_name.__class__ is str and clean(raw_name):
                path = raw_name[:-1] if raw_name[-1] == "/" else raw_name
            else:
                path = self._path_of(raw_name, kind)
            offset = get("offset", 0)
            if offset.__class__ is not int or not 0 <= offset < limit:
                offset = self._offset(raw, path)
            if offset:
                member_offsets.add(offset)
            inner = int_field(raw, "innerOffset", path, _MAX_TOC_JSON_SIZE * 64) if "innerOffset" in raw else 0
            if kind == "chunk":
                last_reg = self._chunk(last_reg, raw, path, offset, inner)
                continue
            last_reg = None
            if path in (_PREFETCH_LANDMARK, _NO_PREFETCH_LANDMARK):
                if path == _PREFETCH_LANDMARK:
                    self.prioritized = [e.path for e in entries if e.type == "reg"]
                continue
            modtime = get("modtime")
            mtime = mtimes.get(modtime) if modtime.__class__ is str else 0
            if mtime is None:
                mtime = mtimes[modtime] = _parse_rfc3339(modtime)
            size, mode, uid, gid = get("size", 0), get("mode", 0), get("uid", 0), get("gid", 0)
            if not (size.__class__ is int and mode.__class__ is int and uid.__class__ is int
                    and gid.__class__ is int and 0 <= size <= _MAX_FILE_SIZE and 0 <= mode <= 0o7777777
                    and 0 <= uid <= _ID_LIMIT and 0 <= gid <= _ID_LIMIT):
                size, mode, uid, gid = (int_field(raw, "size", path, _MAX_FILE_SIZE),
                                        int_field(raw, "mode", path, 0o7777777),
                                        int_field(raw, "uid", path, _ID_LIMIT), int_field(raw, "gid", path, _ID_LIMIT))
            digest = get("digest")
            if digest is not None and (digest.__class__ is not str or not digest_ok(digest)):
                digest = digest_field(raw, "digest", path)
            entry = TOCEntry(path, kind, size, mode & 0o7777, uid, gid, get("userName"), get("groupName"), mtime,
                             None, digest, offset, inner)
            if "devMajor" in raw or "devMinor" in raw or "xattrs" in raw:
                self._rare_fields(entry, raw)
            if entry.uname.__class__ is not str or entry.gname.__class__ is not str:
                entry.uname = entry.uname if entry.uname.__class__ is str else None
                entry.gname = entry.gname if entry.gname.__class__ is str else None
            if kind == "symlink" or kind == "hardlink":
                if not self._link(entry, raw):
                    continue
            elif kind == "reg":
                if size:
                    entry.chunks.append(Chunk(0, int_field(raw, "chunkSize", path, _MAX_FILE_SIZE), offset, inner,
                                              digest_field(raw, "chunkDigest", path)))
                last_reg = entry
            entries.append(entry)
            names[path] = entry

    def _offset(self, raw, path):
        """The slow path of an entry's `offset`: checked, and refused past the TOC."""
        offset = _int_field(raw, "offset", path)
        if offset and offset >= self.limit:
            _fail(ErrorCode.FORMAT, "TOC entry %r: offset %d is past the TOC at %d" % (path, offset, self.limit))
        return offset

    @staticmethod
    def _chunk(last_reg, raw, path, offset, inner):
        """A `chunk` entry: one more piece of the regular file just before it."""
        if last_reg is None or last_reg.path != path:
            _fail(ErrorCode.FORMAT, "TOC chunk entry %r does not follow its file" % path)
        last_reg.chunks.append(Chunk(_int_field(raw, "chunkOffset", path, _MAX_FILE_SIZE),
                                     _int_field(raw, "chunkSize", path, _MAX_FILE_SIZE), offset, inner,
                                     _digest_field(raw, "chunkDigest", path)))
        return last_reg

    @staticmethod
    def _path_of(raw_name, kind):
        """The normalised path of an entry; hostile names refuse the layer."""
        if kind not in _ENTRY_TYPES:
            _fail(ErrorCode.FORMAT, "TOC entry %r has unknown type %r" % (raw_name, kind))
        try:
            path = _normalize_path(raw_name)
        except StargzError as e:
            raise StargzError(ErrorCode.FORMAT, "refusing a hostile TOC: entry %s" % e.message) from e
        if not raw_name or (path == "" and kind != "dir"):
            _fail(ErrorCode.FORMAT, "refusing a hostile TOC: a %s entry named %r" % (kind, raw_name))
        return path

    @staticmethod
    def _rare_fields(entry, raw):
        entry.dev_major = _int_field(raw, "devMajor", entry.path, _ID_LIMIT)
        entry.dev_minor = _int_field(raw, "devMinor", entry.path, _ID_LIMIT)
        xattrs = raw.get("xattrs")
        entry.xattrs = xattrs if isinstance(xattrs, dict) and all(
            isinstance(k, str) and isinstance(v, str) and _BASE64_RE.match(v) for k, v in xattrs.items()) else None

    def _link(self, entry, raw):
        """Fill in a link's target; False (with a warning) to skip a bad link."""
        link = raw.get("linkName")
        if not isinstance(link, str) or not link or "\x00" in link:
            self.warnings.append("skipped TOC entry %r: bad link name" % entry.path)
            return False
        if entry.type == "symlink":
            entry.link = link
            return True
        try:
            entry.link = _normalize_path(link)
        except StargzError as e:
            self.warnings.append("skipped hardlink %r: %s" % (entry.path, e.message))
            return False
        target = self.names.get(entry.link)
        if target is None or target.content.type != "reg":
            self.warnings.append("skipped hardlink %r: target %r is not an earlier regular file"
                                 % (entry.path, entry.link))
            return False
        entry.link_target = target.content
        return True

    def finish(self, toc_digest, raw_count):
        for entry in self.entries:
            if entry.type == "reg":
                _settle_chunks(entry)
        _assign_extents(self.entries, self.member_offsets, self.toc_offset)
        return LayerTOC(self.entries, self.toc_offset, toc_digest, prioritized=self.prioritized,
                        warnings=self.warnings, raw_count=raw_count)


def _settle_chunks(entry):
    """Fill in open-ended chunk sizes and check that the chunks tile the file."""
    if not entry.size:
        entry.chunks = []
        return
    chunks = entry.chunks
    position = 0
    for i, chunk in enumerate(chunks):
        if chunk.file_offset != position:
            _fail(ErrorCode.FORMAT, "TOC entry %r: chunk at %d leaves a gap or overlap at %d"
                  % (entry.path, chunk.file_offset, position))
        if chunk.size == 0:
            if i != len(chunks) - 1:
                _fail(ErrorCode.FORMAT, "TOC entry %r: an open-ended chunk is not the last" % entry.path)
            chunk.size = entry.size - position
        if i and chunk.member_offset < chunks[i - 1].member_offset:
            _fail(ErrorCode.FORMAT, "TOC entry %r: chunk offsets go backwards" % entry.path)
        position += chunk.size
    if position != entry.size:
        _fail(ErrorCode.FORMAT, "TOC entry %r: chunks cover %d bytes of %d" % (entry.path, position, entry.size))
    if len(chunks) == 1 and chunks[0].digest is None:
        chunks[0].digest = entry.digest
    for chunk in chunks:
        if chunk.member_offset == 0:
            _fail(ErrorCode.FORMAT, "TOC entry %r: payload without an offset" % entry.path)


def _assign_extents(entries, member_offsets, toc_offset):
    """A payload's compressed extent ends at the next greater member offset, or the TOC."""
    offsets = sorted(member_offsets)
    following = dict(zip(offsets, offsets[1:] + [toc_offset]))
    for entry in entries:
        if entry.type == "reg":
            for chunk in entry.chunks:
                chunk.member_end = following[chunk.member_offset]

# =============================================================================
# image index (layers merged, lookups, patterns; TOC fetching and cache)
# =============================================================================

# The first read of a layer is its tail: the footer and, for a small TOC, all of it.
# A bigger TOC costs one more request for exactly its missing head, so the tail
# stays small: what it over-reads of a small layer is waste.
_TAIL_READ_SIZE = 16 << 10
_MAX_TOC_MEMBER_SIZE = 64 << 20


def _default_cache_dir(environ=None):
    env = os.environ if environ is None else environ
    if env.get("STARGET_CACHE_DIR"):
        return env["STARGET_CACHE_DIR"]
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "starget")


class TOCCache(object):
    """Content-addressed TOCs, keyed by blob digest, checked against the TOC digest.
    Writes happen on a writer thread, off the path to the first data request; `flush`
    waits for them (the interpreter does too at exit: the thread is not a daemon)."""

    def __init__(self, directory=None):
        self.directory = directory or _default_cache_dir()
        self._pending, self._writer, self._lock = [], None, threading.Lock()

    def _later(self, write):
        with self._lock:
            self._pending.append(write)
            if self._writer is None:
                self._writer = threading.Thread(target=self._drain, name="starget-toc-cache")
                self._writer.start()

    def _drain(self):
        while True:
            with self._lock:
                if not self._pending:
                    self._writer = None
                    return
                write = self._pending.pop(0)
            try:
                write()
            except Exception as e:    # a cache that cannot be written is no error; the thread goes on
                _log.debug("TOC cache write failed: %r", e)

    def flush(self):
        """Wait until every write asked for so far is on disk (or has failed, quietly)."""
        with self._lock:
            writer = self._writer
        if writer is not None:
            writer.join()

    def _path(self, blob):
        return os.path.join(self.directory, "toc", blob.replace(":", "-") + ".json")

    def get(self, blob, toc_digest=None):
        """(toc_offset, json bytes, footer size) or None; a corrupt or mismatching entry is ignored."""
        try:
            with io.open(self._path(blob), "rb") as f:
                header = json.loads(f.readline().decode("utf-8"))
                data = f.read()
        except (IOError, OSError, ValueError, UnicodeDecodeError):
            return None
        digest = _sha256_digest(data)
        if not isinstance(header, dict) or header.get("toc_digest") != digest or\
                (toc_digest and toc_digest != digest) or not isinstance(header.get("toc_offset"), int):
            return None
        return header["toc_offset"], data, header.get("footer_size", _FOOTER_SIZE)

    def put(self, blob, toc_offset, data, footer_size=_FOOTER_SIZE):
        header = {"blob": blob, "toc_offset": toc_offset, "toc_digest": _sha256_digest(data),
                  "footer_size": footer_size}
        self._later(lambda: self._write(self._path(blob), header, data))

    def _parsed_path(self, blob):
        return os.path.join(self.directory, "toc", blob.replace(":", "-") + ".parsed.json")

    def get_parsed(self, blob, toc_digest=None):
        """The LayerTOC a run of this starget version parsed and checked, or None: an
        entry that is damaged (its digest), foreign (another version or TOC) or odd is
        ignored, and the TOC is parsed again."""
        try:
            with io.open(self._parsed_path(blob), "rb") as f:
                header = json.loads(f.readline().decode("utf-8"))
                body = f.read()
            if not isinstance(header, dict) or header.get("starget") != __version__ \
                    or header.get("format") != _PARSED_TOC_FORMAT or header.get("sha256") != _sha256_digest(body) \
                    or (toc_digest and header.get("toc_digest") != toc_digest):
                return None
            return _toc_from_rows(json.loads(body.decode("utf-8")))
        except (IOError, OSError, ValueError, UnicodeDecodeError, RecursionError, StargzError):
            return None

    def put_parsed(self, blob, toc):
        self._later(lambda: self._write_parsed(blob, toc))

    def _write_parsed(self, blob, toc):
        body = json.dumps(_toc_rows(toc), separators=(",", ":")).encode("utf-8")
        header = {"starget": __version__, "format": _PARSED_TOC_FORMAT, "toc_digest": toc.toc_digest,
                  "sha256": _sha256_digest(body)}
        self._write(self._parsed_path(blob), header, body)

    def _write(self, path, header, body):
        """A header line and a body, under the final name only once complete; the temp
        file is a new one (mkstemp: never a link planted in a shared cache), removed if
        the write fails."""
        import tempfile
        temp = None
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with io.open(fd, "wb") as f:
                f.write(json.dumps(header).encode("utf-8") + b"\n")
                f.write(body)
            os.replace(temp, path)
            temp = None
        except (IOError, OSError) as e:
            _log.debug("cannot write TOC cache %s: %s", path, e)
        finally:
            if temp is not None and os.path.lexists(temp):
                os.unlink(temp)


# The `format` info shows for a layer read lazily, told apart by its footer's size.
_LAYER_FORMATS = {_FOOTER_SIZE: "estargz", _LEGACY_FOOTER_SIZE: "legacy-stargz",
                  _ZSTD_CHUNKED_FOOTER_SIZE: "zstd:chunked"}


def _check_lazy_readable(layer):
    """Refuse, before any byte is read, a layer whose media type cannot be read lazily."""
    compression = layer.compression
    if compression == "none":
        raise _NotEStargzError(ErrorCode.UNSUPPORTED, "layer %s has media type %s: not a gzip layer, cannot be read "
                              "lazily" % (layer.digest, layer.media_type))
    if compression not in ("gzip", "zstd"):
        _fail(ErrorCode.UNSUPPORTED, "layer %s has media type %s: not a gzip layer, cannot be read lazily"
              % (layer.digest, layer.media_type or "(none)"))


def _fetch_layer_toc(client, layer, cache=None):
    """The LayerTOC of one layer: from the cache, else one tail read (two for a big TOC)."""
    _check_lazy_readable(layer)
    expected = layer.toc_digest
    if expected is not None and not _DIGEST_RE.match(str(expected)):
        _fail(ErrorCode.FORMAT, "layer %s has a malformed TOC digest annotation" % layer.digest)
    parsed = cache.get_parsed(layer.digest, expected) if cache else None
    if parsed is not None:      # a warm run: no JSON parsed, nothing validated twice
        _log.debug("parsed TOC of %s from the cache", layer.digest)
        parsed.set_origin(layer.digest, layer.position)
        parsed.compression = layer.compression
        return parsed
    cached = cache.get(layer.digest, expected) if cache else None
    if cached is not None:
        toc_offset, data, footer_size = cached
        _log.debug("TOC of %s from the cache", layer.digest)
    else:
        toc_offset, data, footer_size = client.retrying(lambda: _read_toc_from_blob(client, layer),
                                                        "the TOC of %s" % layer.digest)
        if cache:
            cache.put(layer.digest, toc_offset, data, footer_size)
    try:
        toc = parse_toc(data, toc_offset, blob=layer.digest, layer=layer.position)
    except StargzError as e:
        raise _reworded(e, "layer %s: %s" % (layer.digest, e.message)) from e
    toc.footer_size, toc.compression = footer_size, layer.compression
    if cache:
        cache.put_parsed(layer.digest, toc)
    return toc


def _read_toc_from_blob(client, layer):
    """(toc offset, TOC JSON bytes, footer size), checked against the manifest's TOC
    digest: one attempt (damaged bytes are `damaged`, so the caller fetches again)."""
    if layer.compression == "zstd":
        return _read_zstd_chunked_toc(client, layer)
    size = layer.size
    if size < _LEGACY_FOOTER_SIZE:
        _fail(ErrorCode.FORMAT, "not eStargz: layer %s is only %d bytes" % (layer.digest, size))
    tail_start = max(0, size - _TAIL_READ_SIZE)
    tail = client.read_blob(layer.digest, tail_start, size - 1)
    try:
        toc_offset, footer_size = parse_footer(tail)
    except StargzError as e:
        message = "layer %s (%s): %s" % (layer.digest, layer.media_type, e.message)
        if e.code == ErrorCode.FORMAT:
            message += "; it is a plain tar+gzip layer: rebuild the image as eStargz (e.g. nerdctl image "\
                       "convert --estargz) or pass --fallback-stream to stream it"
        raise _reworded(e, message) from e
    member_end = size - footer_size
    if toc_offset >= member_end or member_end - toc_offset > _MAX_TOC_MEMBER_SIZE:
        _fail(ErrorCode.FORMAT, "layer %s: footer points to a TOC at %d, outside the blob of %d bytes"
              % (layer.digest, toc_offset, size))
    if toc_offset >= tail_start:
        member = tail[toc_offset - tail_start:member_end - tail_start]
    else:
        member = client.read_blob(layer.digest, toc_offset, tail_start - 1) + tail[:member_end - tail_start]
    data = _extract_toc_json(member)
    expected = layer.toc_digest
    if expected and _sha256_digest(data) != expected:
        _fail(ErrorCode.INTEGRITY, "layer %s: TOC digest %s does not match the manifest annotation %s; "
              "refusing the layer" % (layer.digest, _sha256_digest(data), expected), damaged=True)
    return toc_offset, data, footer_size


def _read_zstd_chunked_toc(client, layer):
    """The same for a zstd:chunked layer: one request where the manifest-position
    annotation says where the TOC is, else the 48-byte footer first. The offset
    returned is where the TOC's skippable frame starts: the payloads end there."""
    zstd = _zstd_module("layer %s" % layer.digest)
    position = _zstd_annotation(layer.annotations, "manifest-position")
    try:
        if position is not None:
            offset, length, uncompressed, _ = _parse_zstd_chunked_position(position)
        elif layer.size < _ZSTD_CHUNKED_FOOTER_SIZE:
            raise _NotEStargzError(ErrorCode.FORMAT, "not zstd:chunked: only %d bytes" % layer.size)
        else:
            tail = client.read_blob(layer.digest, layer.size - _ZSTD_CHUNKED_FOOTER_SIZE, layer.size - 1)
            offset, length, uncompressed, _ = _parse_zstd_chunked_footer(tail)
    except StargzError as e:
        message = "layer %s (%s): %s" % (layer.digest, layer.media_type, e.message)
        if isinstance(e, _NotEStargzError):
            message += "; it is a plain tar+zstd layer: pass --fallback-stream to stream it"
        raise _reworded(e, message) from e
    if offset < 8 or not 0 < length <= _MAX_TOC_MEMBER_SIZE or offset + length > layer.size:
        _fail(ErrorCode.FORMAT, "layer %s: the zstd:chunked TOC at %d+%d lies outside the blob of %d bytes"
              % (layer.digest, offset, length, layer.size))
    compressed = client.read_blob(layer.digest, offset, offset + length - 1)
    checksum = _zstd_annotation(layer.annotations, "manifest-checksum")
    if checksum and _sha256_digest(compressed) != checksum:
        _fail(ErrorCode.INTEGRITY, "layer %s: zstd:chunked TOC does not match its manifest-checksum %s"
              % (layer.digest, checksum), damaged=True)
    data = _decompress_zstd_toc(compressed, uncompressed, zstd)
    if layer.toc_digest and _sha256_digest(data) != layer.toc_digest:
        _fail(ErrorCode.INTEGRITY, "layer %s: TOC digest %s does not match the manifest annotation %s; "
              "refusing the layer" % (layer.digest, _sha256_digest(data), layer.toc_digest), damaged=True)
    return offset - 8, data, _ZSTD_CHUNKED_FOOTER_SIZE


_TAR_TYPES = {b"0": "reg", b"\x00": "reg", b"7": "reg", b"1": "hardlink", b"2": "symlink",
              b"3": "char", b"4": "block", b"5": "dir", b"6": "fifo"}


class _PiecesFile(io.RawIOBase):
    """A read-only file over an iterator of bytes (an inflated layer as it streams),
    for tarfile's stream mode: nothing is kept but the piece being read."""

    def __init__(self, pieces):
        super().__init__()
        self._pieces, self._rest = pieces, memoryview(b"")

    def readable(self):
        return True

    def readinto(self, buffer):
        while not self._rest:
            data = next(self._pieces, None)
            if data is None:
                return 0
            self._rest = memoryview(data)    # a view: taking a slice off copies nothing
        n = min(len(buffer), len(self._rest))
        buffer[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n


class _StreamedLayerTOC(LayerTOC):
    """--fallback-stream: a layer that is neither eStargz nor zstd:chunked, so with no
    TOC. Nothing is read until its entries are asked for (`ls`, the merged view);
    then the layer streams once and its tar headers become its entries (no data kept,
    nothing spooled). `get` and `cat` stream it themselves (_LayerStream), writing the
    selected files as they pass, and lower layers that cannot change the result are
    never read. `directory` holds the files `open` reads (one each, no whole layer)."""

    def __init__(self, client, layer, directory):
        LayerTOC.__init__(self, [], None, None, blob=layer.digest, layer=layer.position, footer_size=0)
        self.client, self.descriptor, self.directory = client, layer, directory
        self.compression = layer.compression
        self._entries = None

    @property
    def loaded(self):
        return self._entries is not None

    @property
    def entries(self):
        if self._entries is None:
            self.read(lambda entry, tar, info: None)
        return self._entries

    @entries.setter
    def entries(self, value):
        self._entries = None if not value else value   # LayerTOC.__init__ sets [] before the first read

    @property
    def raw_count(self):
        return len(self.entries)

    @raw_count.setter
    def raw_count(self, value):
        pass

    def read(self, visit):
        """Stream the layer once (through the retry loop): `visit(entry, tar, info)`
        for each usable member as it passes, which may read its data from `tar`. The
        entries become this layer's (at the first read) only once the whole blob has
        matched its digest; a failed attempt starts over, so `visit` sees it again."""
        layer = self.descriptor
        entries = self.client.retrying(lambda: self._read_once(visit), "layer %s" % layer.digest)
        if self._entries is None:
            self._entries = entries
            for warning in self.warnings:
                _log.warning("layer %s: %s", layer.digest, warning)

    def _read_once(self, visit):
        import tarfile
        layer, hasher = self.descriptor, hashlib.sha256()

        def hashed(pieces):
            for data in pieces:
                hasher.update(data)
                yield data

        entries, names, warnings = [], {}, []
        response = self.client.open_blob(layer.digest, 0, max(0, layer.size - 1))
        try:
            pieces = hashed(response.pieces(layer.size))
            if layer.compression == "gzip":
                inflated = _inflate_members(pieces)
            elif layer.compression == "zstd":
                inflated = _inflate_zstd_frames(pieces, _zstd_module("layer %s" % layer.digest))
            else:
                inflated = pieces
            with tarfile.open(fileobj=_PiecesFile(inflated), mode="r|", tarinfo=_bounded_tarinfo()) as tar:
                for info in tar:
                    tar.members = []    # stream mode keeps every header otherwise
                    if len(entries) >= _MAX_STREAMED_ENTRIES:
                        _fail(ErrorCode.FORMAT, "layer %s has more than %d entries" % (layer.digest,
                                                                                       _MAX_STREAMED_ENTRIES))
                    entry = _entry_of_tarinfo(info, names, warnings)
                    if entry is not None:
                        entry.blob, entry.layer = layer.digest, layer.position
                        entries.append(entry)
                        names[entry.path] = entry
                        visit(entry, tar, info)
            for _ in pieces:    # past the tar's end: the rest of the blob, for its digest
                pass
        except (tarfile.TarError, EOFError, ValueError) as e:
            raise StargzError(ErrorCode.FORMAT, "layer %s is not a readable tar: %s" % (layer.digest, e), e) from e
        except StargzError as e:
            if e.code != ErrorCode.FORMAT or not e.damaged:
                raise
            raise _reworded(e, "layer %s is not valid %s: %s" % (layer.digest, layer.compression, e.message)) from e
        finally:
            response.close()
        if "sha256:" + hasher.hexdigest() != layer.digest:
            _fail(ErrorCode.INTEGRITY, "layer %s does not match its digest" % layer.digest)
        self.warnings = warnings
        return entries

    def spool_file(self, entry):
        """For `open`: stream the layer and keep `entry`'s bytes (only those) in a file
        of `directory`, which is what the file object reads; checked like the layer."""
        self.spool_files([entry])

    def spool_files(self, entries):
        """The same for several entries of this layer, in one pass over its stream
        (get --tar): the temp disk holds the selected files, never the layer."""
        import shutil
        import tempfile
        paths = {}
        for entry in entries:
            fd, paths[entry.path] = tempfile.mkstemp(dir=self.directory, suffix=".file")
            os.close(fd)

        def keep(member, tar, info):
            if member.path in paths and member.type == "reg":
                with tar.extractfile(info) as data, io.open(paths[member.path], "wb") as out:
                    shutil.copyfileobj(data, out)
        self.read(keep)
        for entry in entries:
            entry.spool, entry.chunks = paths[entry.path], [Chunk(0, entry.size, 0, 0, None, member_end=0)]


_MAX_TAR_EXTENDED_HEADER = 1 << 20     # a pax or GNU long-name header: names, not payloads
_MAX_STREAMED_ENTRIES = 4 << 20


def _bounded_tarinfo():
    """A TarInfo class whose pax and GNU long-name headers are refused past 1 MiB:
    tarfile reads such a header whole, so a hostile layer could declare gigabytes."""
    import tarfile

    class _BoundedTarInfo(tarfile.TarInfo):
        def _proc_gnulong(self, tar):
            if self.size > _MAX_TAR_EXTENDED_HEADER:
                raise tarfile.HeaderError("GNU long-name header of %d bytes" % self.size)
            return super()._proc_gnulong(tar)

        def _proc_pax(self, tar):
            if self.size > _MAX_TAR_EXTENDED_HEADER:
                raise tarfile.HeaderError("pax header of %d bytes" % self.size)
            return super()._proc_pax(tar)
    return _BoundedTarInfo


def _entry_of_tarinfo(info, names, warnings):
    """The TOCEntry of one tar header of a streamed layer, or None to skip it. A
    regular file has one chunk (its whole data, empty or not) with no digest: what
    checks it is the layer's digest, at the end of the stream."""
    kind = _TAR_TYPES.get(info.type)
    try:
        name = _normalize_path(info.name)
    except StargzError as e:
        warnings.append("skipped tar entry: %s" % e.message)
        return None
    if kind is None or (kind in ("symlink", "hardlink") and not info.linkname):
        return None
    entry = TOCEntry(name, kind, size=info.size if kind == "reg" else 0, mode=info.mode & 0o7777,
                     uid=info.uid, gid=info.gid, uname=info.uname or None, gname=info.gname or None,
                     mtime=int(info.mtime) if -2 ** 40 < info.mtime < 2 ** 40 else 0, link=info.linkname or None, dev_major=info.devmajor,
                     dev_minor=info.devminor, offset=0, inner_offset=0)
    if kind == "reg":
        entry.chunks = [Chunk(0, info.size, 0, 0, None, member_end=0)]
    if kind == "hardlink":
        try:
            entry.link = _normalize_path(info.linkname)
        except StargzError:
            entry.link = None
        target = names.get(entry.link)
        if target is None or target.content.type != "reg":
            warnings.append("skipped hardlink %r: target %r is not an earlier file" % (name, info.linkname))
            return None
        entry.link_target = target.content
    return entry


def _resolve_in(view, path, follow_last, collected=None):
    """Resolve `path` inside the image like a chroot: absolute and `..` links stay in.

    Returns the resolved path; symlink entries passed through go to `collected`."""
    todo = [p for p in path.split("/") if p not in ("", ".")]
    resolved = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = "/".join(resolved + [part])
        entry = view.get(candidate)
        if entry is not None and entry.type == "symlink" and (todo or follow_last):
            hops += 1
            if hops > 40:
                _fail(ErrorCode.NOT_FOUND, "too many levels of symbolic links resolving %r" % path)
            if collected is not None:
                collected.append(entry)
            if entry.link.startswith("/"):
                resolved = []
            todo = [p for p in entry.link.split("/") if p not in ("", ".")] + todo
            continue
        resolved.append(part)
    return "/".join(resolved)


def _remove_subtree(view, children, path, keep_top=False):
    """Delete everything below `path` (and, unless `keep_top`, `path` itself) from a
    path -> entry map. `children` (see ImageIndex._link_path) is kept in step, and
    only the removed subtree is visited, not the whole map."""
    if path == "":   # the prefix is "", which every path has: the whole map goes
        root = view.get("")
        view.clear()
        children.clear()
        if keep_top and root is not None:
            view[""] = root
        return
    if not keep_top:
        view.pop(path, None)
        siblings = children.get(path[:path.rfind("/")]) if "/" in path else None
        if siblings is not None:
            siblings.discard(path)
    todo = list(children.pop(path, ()))
    while todo:
        below = todo.pop()
        view.pop(below, None)
        todo.extend(children.pop(below, ()))


# -- globs ---------------------------------------------------------------------
#
# A PATH with `*`, `?` or `[` is a glob over the paths as the view stores them: it
# never goes through a symlink (so `**` cannot loop). Each glob is compiled once into
# a regex over the whole path, so selecting is one pass over the view, whatever its size.

_GLOB_CHARS = re.compile(r"[*?\[]")


def _is_glob(pattern):
    return isinstance(pattern, str) and _GLOB_CHARS.search(pattern) is not None


def _glob_component(part):
    """One component of a glob as a regex that never matches '/': `*` any run of
    characters, `?` one, `[...]` / `[!...]` a class; an unclosed `[` is itself."""
    out, i, n = [], 0, len(part)
    while i < n:
        c = part[i]
        i += 1
        if c == "*":
            if not out or out[-1] != "[^/]*":     # `**` inside a name is `*`: no backtracking blow-up
                out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1 if i < n and part[i] in "!^" else i
            j = part.find("]", j + 1 if j < n and part[j] == "]" else j)   # a leading ] is a member
            if j < 0:
                out.append(re.escape(c))
                continue
            body, i = part[i:j], j + 1
            negate = body[:1] in ("!", "^")
            # escaped one by one (a '-' stays a range): `[[]` or `[a&&b]` are members, not set syntax
            members = "".join(ch if ch.isalnum() or ch == "-" else "\\" + ch for ch in body[1 if negate else 0:])
            # a range such as [+-0] holds '/': the lookahead keeps classes inside one component
            out.append("(?!/)[%s%s]" % ("^" if negate else "", members))
        else:
            out.append(re.escape(c))
    return "".join(out)


def _glob_regex(pattern):
    """A glob -> (regex text for one whole normalised path, whether only directories
    match: a trailing '/'). A `**` component is zero or more whole components (one or
    more at the end: what is below); `.` and empty components are dropped, as in paths."""
    parts = []
    for part in pattern.split("/"):
        if part not in ("", ".") and not (part == "**" and parts[-1:] == ["**"]):
            parts.append(part)      # `**/**` is `**`: two in a row would backtrack quadratically
    out = []
    for n, part in enumerate(parts):
        last = n == len(parts) - 1
        if part == "**":
            out.append("[^/]+(?:/[^/]+)*" if last else "(?:[^/]+/)*")
        else:
            out.append(_glob_component(part) + ("" if last else "/"))
    if not parts:                   # `/` or `.`: everything
        return "[\\s\\S]*", False
    return "".join(out), pattern.endswith("/")


def _glob_matcher(patterns):
    """A predicate (path, entry) -> whether one of the globs matches `path` or a path
    above it (a match brings its subtree). Compiled once into at most three regexes,
    so an entry costs three matches however many globs there are."""
    whole, dirs, above = [], [], []
    for pattern in patterns:
        regex, dir_only = _glob_regex(pattern)
        (dirs if dir_only else whole).append(regex)
        above.append(regex)

    def compiled(regexes, tail):
        return re.compile("(?:%s)%s" % ("|".join(regexes), tail)).match if regexes else lambda path: None
    whole, dirs, above = compiled(whole, r"\Z"), compiled(dirs, r"\Z"), compiled(above, "/")

    def matches(path, entry):
        return bool(above(path) or whole(path) or (entry.type == "dir" and dirs(path)))
    return matches


def _glob_select(view, pattern):
    """The entries of `view` (path -> entry) a glob selects, sorted by path."""
    matches = _glob_matcher([pattern])
    return sorted((e for p, e in view.items() if p and matches(p, e)), key=lambda e: e.path)


class ImageIndex(object):
    """The files of an image: all layers merged as overlayfs would (later layers win,
    whiteouts delete, opaque directories hide lower contents, landmarks hidden)."""

    def __init__(self, layers, client=None, manifest=None):
        self.layers = list(layers)
        self.client, self.manifest = client, manifest
        self._merged = None

    def layer(self, blob):
        """The LayerTOC whose digest is `blob` or starts with it (a unique prefix)."""
        if not isinstance(blob, str) or not re.match(r"^sha256:[0-9a-f]{1,64}\Z", blob):
            _fail(ErrorCode.USAGE, "invalid layer digest %r (want sha256:HEX or a unique prefix)" % (blob,))
        matches = [t for t in self.layers if t is not None and t.blob and t.blob.startswith(blob)]
        if len(matches) > 1:
            _fail(ErrorCode.USAGE, "layer prefix %s is ambiguous: %s" % (blob, ", ".join(t.blob for t in matches)))
        if not matches:
            known = ", ".join(t.blob[:19] for t in self.layers if t is not None and t.blob) or "none loaded"
            _fail(ErrorCode.NOT_FOUND, "no layer %s in this image (layers: %s)" % (blob, known))
        return matches[0]

    def view(self, blob=None):
        """path -> TOCEntry: the merged view, or one layer's own entries."""
        if blob is not None:
            view = {}
            for entry in self.layer(blob).entries:
                if not entry.name.startswith(_WHITEOUT_PREFIX):
                    view[entry.path] = entry
            return view
        if self._merged is None:
            self._merged = self._merge()
        return self._merged

    def _merge(self):
        merged = {}
        children = None   # parent -> child paths, so removals walk only what they remove;
        # built at the first removal: an image without whiteouts never pays for it
        for toc in self.layers:
            if toc is None:
                _fail(ErrorCode.INTERNAL, "merged view needs every layer's TOC")
            own, removals = [], []
            for entry in toc.entries:
                name = entry.path[entry.path.rfind("/") + 1:]
                if name.startswith(_WHITEOUT_PREFIX):
                    parent = posixpath.dirname(entry.path)
                    if name == _OPAQUE_WHITEOUT:
                        removals.append((parent, True))
                    elif name != _WHITEOUT_PREFIX:   # `.wh.` alone names nothing (not the parent)
                        removals.append((posixpath.join(parent, name[len(_WHITEOUT_PREFIX):]), False))
                else:
                    own.append(entry)
            if removals and children is None:
                children = self._children_of(merged)
            for path, keep_top in removals:
                _remove_subtree(merged, children, path, keep_top)
            for entry in own:
                path = entry.path
                old = merged.get(path)
                if old is not None and old.type == "dir" and entry.type != "dir":
                    if children is None:
                        children = self._children_of(merged)
                    _remove_subtree(merged, children, path)
                merged[path] = entry
                if children is not None:
                    self._link_path(children, path)
        return {path: merged[path] for path in sorted(merged)}

    @classmethod
    def _children_of(cls, merged):
        children = {}
        for path in merged:
            cls._link_path(children, path)
        return children

    @staticmethod
    def _link_path(children, path):
        """Record `path` in `children`: text before its last "/" -> the set of paths one
        level below. By string, not by entry: "a/b/c" links through "a/b" even when no
        entry "a/b" exists (TOCs may omit parent dirs), and "a/b-c" is not below "a/b".
        A path whose parent already has a set stops there: that parent is linked already."""
        while "/" in path:
            parent = path[:path.rfind("/")]
            siblings = children.get(parent)
            if siblings is not None:
                siblings.add(path)
                return
            children[parent] = {path}
            path = parent

    def entries(self, blob=None):
        """Every entry but the root, sorted by path."""
        if blob is None:    # the merged view is sorted already
            return [e for path, e in self.view().items() if path]
        return [e for path, e in sorted(self.view(blob).items()) if path]

    def find_file(self, path, blob=None):
        """The entry at `path` (intermediate symlinks followed inside the image), or None."""
        if not isinstance(path, str) or "\x00" in path:
            return None
        view = self.view(blob)
        return view.get(_resolve_in(view, path, follow_last=False))

    def open(self, path, blob=None):
        """The regular file at `path` (a final symlink followed inside the image) as a
        read-only, seekable binary file object that fetches only the chunks it reads:
        see _ImageFile. NOT_FOUND for a missing path or one that is not a file."""
        return _open_in(self, path, blob)

    def filter_files(self, pattern, blob=None, exclude=()):
        """Entries selected by a pattern: `.` or `/` everything; `dir/` or `dir` a whole
        directory; `file` one entry. A trailing slash follows a final symlink, as a shell
        does; the links passed through are selected too, so the tree reads the same.
        A pattern with `*`, `?` or `[` is a glob (see _glob_regex); one that matches
        nothing is taken as a plain path, as a shell leaves it, so that a name with `[`
        still works. `exclude`: globs whose matches, with their subtrees, are dropped."""
        view = self.view(blob)
        if not isinstance(pattern, str) or "\x00" in pattern:
            _fail(ErrorCode.USAGE, "invalid path pattern %r" % (pattern,))
        selected = _glob_select(view, pattern) if _is_glob(pattern) else None
        if not selected:
            try:
                selected = self._select_path(view, pattern)
            except StargzError as error:
                if selected is None or error.code != ErrorCode.NOT_FOUND:
                    raise
                _fail(ErrorCode.NOT_FOUND, "no match in the image for %s" % pattern)
        if exclude:
            dropped = _glob_matcher(exclude)
            selected = [e for e in selected if not dropped(e.path, e)]
        return selected

    @staticmethod
    def _select_path(view, pattern):
        links = []
        target = _resolve_in(view, pattern, follow_last=pattern.endswith("/"), collected=links)
        if target == "":   # `.`, `/`, `..`: the whole image, root entry or not
            return [e for p, e in view.items() if p]
        entry = view.get(target)
        if entry is None:
            _fail(ErrorCode.NOT_FOUND, "no such file or directory in the image: %s" % pattern)
        if pattern.endswith("/") and entry.type != "dir":
            _fail(ErrorCode.NOT_FOUND, "not a directory in the image: %s" % pattern)
        selected = {e.path: e for e in links}
        if entry.type == "dir":
            prefix = target + "/" if target else ""
            selected.update((p, e) for p, e in view.items() if p.startswith(prefix) or p == target)
        else:
            selected[target] = entry
        selected.pop("", None)
        return [selected[p] for p in sorted(selected)]


# -- comparing two views ---------------------------------------------------------
#
# What `diff` compares, from the TOCs alone: the `ls --json` fields that say what a
# file is, then those that say who may use it. Not layer or blob (the same file may
# come from another layer), nor mtime: a rebuilt image re-stamps every time.
_DIFF_CONTENT_FIELDS = ("type", "size", "digest", "link")
_DIFF_METADATA_FIELDS = ("mode", "uid", "gid", "xattrs")


def _compared_fields(entry):
    doc = entry.to_json()
    doc["xattrs"] = entry.xattrs or {}
    return tuple(doc[f] for f in _DIFF_CONTENT_FIELDS + _DIFF_METADATA_FIELDS)


def _diff_views(a, b):
    """Two views (path -> TOCEntry) -> [(path, change, fields)], sorted by path: change
    is "added" (only in b), "deleted" (only in a), "modified" (a content field differs)
    or "metadata" (only mode, owner or xattrs); fields names what differs. Pure."""
    names = _DIFF_CONTENT_FIELDS + _DIFF_METADATA_FIELDS
    changes = []
    for path in sorted(set(a) | set(b)):
        if path == "":          # the root is no path of the listing
            continue
        old, new = a.get(path), b.get(path)
        if old is None or new is None:
            changes.append((path, "added" if old is None else "deleted", []))
            continue
        before, after = _compared_fields(old), _compared_fields(new)
        if before == after:
            continue
        fields = [name for name, x, y in zip(names, before, after) if x != y]
        content = any(f in _DIFF_CONTENT_FIELDS for f in fields)
        changes.append((path, "modified" if content else "metadata", fields))
    return changes


def _resolve_manifest(client, platform=None):
    """The image manifest for `platform` (default: the host's), through an index if
    there is one. The client's endpoints are walked in order (see _endpoint_fallback);
    the one that answers is selected for every later request."""
    endpoints = client.endpoints
    position = 0
    while True:
        endpoint = endpoints[position]
        try:
            manifest = _manifest_at(client, endpoint, platform)
        except StargzError as error:
            position = _endpoint_fallback(endpoints, position, error)
            if position is None:
                raise
            continue
        client.select(endpoint)
        return manifest


def _manifest_at(client, endpoint, platform):
    ref = client.ref
    raw, media_type, digest = client.get_manifest(ref.reference, endpoint)
    doc = _parse_manifest_json(raw, ref)
    if not _is_image_index(doc, media_type):
        return _ImageManifest.from_json(doc, ref, digest, media_type, raw)   # its config names the platform
    index = _ImageIndexManifest.from_json(doc, digest, media_type)
    child = _choose_platform(index, platform or Platform.host(), ref)
    raw, media_type, digest = client.get_manifest(child["digest"], endpoint)
    return _ImageManifest.from_json(_parse_manifest_json(raw, ref), ref, digest, media_type, raw,
                                   Platform.from_descriptor(child), index)


def _config_platform(client, manifest):
    """The platform the image's config blob declares (one small extra request), or None."""
    raw = client.get_config(manifest.config_digest)
    return _platform_of_config(raw) if raw is not None else None


def open_image(reference, platform=None, client=None, cache=None, blob=None, concurrency=4,
               fallback_dir=None, **client_options):
    """Resolve an image and load its TOCs: the merged ImageIndex (or, with `blob`,
    only that layer's TOC). With `fallback_dir`, layers that are not lazy (no TOC)
    are streamed when first needed instead of refused (see _StreamedLayerTOC). `client_options` go to RegistryClient."""
    if client is None:
        client = RegistryClient(reference, **client_options)
    if isinstance(platform, str):
        platform = Platform.parse(platform)
    manifest = _resolve_manifest(client, platform)
    wanted = manifest.layers
    if blob is not None:
        probe = ImageIndex([LayerTOC([], blob=layer.digest, layer=layer.position) for layer in manifest.layers])
        chosen = probe.layer(blob).blob
        wanted = [layer for layer in manifest.layers if layer.digest == chosen]

    def load(layer):
        try:
            return _fetch_layer_toc(client, layer, cache)
        except _NotEStargzError:
            if fallback_dir is None:
                raise
            _log.info("layer %s is not eStargz: it is streamed when needed (--fallback-stream)", layer.digest)
            return _StreamedLayerTOC(client, layer, fallback_dir)

    tocs = _map_parallel(load, wanted, concurrency)
    by_position = dict(zip([layer.position for layer in wanted], tocs))
    for toc in tocs:
        for warning in toc.warnings:
            _log.warning("layer %s: %s", toc.blob, warning)
    layers = [by_position.get(layer.position) for layer in manifest.layers]
    if blob is not None:
        layers = [toc if toc is not None else LayerTOC([], blob=layer.digest, layer=layer.position)
                  for toc, layer in zip(layers, manifest.layers)]
    return ImageIndex(layers, client, manifest)


def _map_parallel(function, items, concurrency):
    """[function(item) for item in items] on up to `concurrency` threads; the first error is raised."""
    items = list(items)
    if len(items) <= 1 or concurrency <= 1:
        return [function(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=min(concurrency, len(items))) as pool:
        return list(pool.map(function, items))

# =============================================================================
# download (plan what to fetch, fetch in parallel, inflate, verify, write safely)
# =============================================================================
#
# Along the data's path: DownloadJob plans (pure: which entries, which byte ranges),
# _Fetcher turns ranges into verified inflated chunks, _TreeWriter and _PartialFile
# put them and the other entries under the destination. Downloader is the reusable
# front; each run's state lives on its own _Run.

_COALESCE_GAP = 32 << 10      # fetch a small hole rather than pay another round trip
_PART_SIZE = 8 << 20          # cut long runs so that workers share them
_PARTIAL_SUFFIX = ".partial"
_STATE_SUFFIX = ".partial.state"


def _is_root():
    return hasattr(os, "geteuid") and os.geteuid() == 0


class ExtractionPolicy(object):
    """What starget may create under the destination: owners and setuid/setgid bits
    only for root, as tar does; device nodes and FIFOs only when asked (`--devices`),
    as tarfile's `data` filter: an untrusted image must not plant /dev/mem."""

    def __init__(self, same_owner=None, special_files=False, keep_setid=None):
        root = _is_root()
        self.same_owner = root if same_owner is None else same_owner
        self.special_files = special_files
        self.keep_setid = root if keep_setid is None else keep_setid

    def mode_of(self, entry):
        mode = (entry.mode or 0) & 0o7777
        return mode if self.keep_setid else mode & ~0o6000


def _is_systemic(error):
    """Whether `error` would hit every remaining file alike, so that going on only
    repeats it: the destination refuses writes (read-only, full, over quota, not
    permitted), the registry stays unreachable after the retry loop (a refused,
    reset or timed-out connection: an OSError below a transient network error), or
    the credentials are rejected. A digest mismatch, an unsafe name, a malformed
    entry, a 5xx for one range or an IO error of one path (EISDIR) fail one file.
    Decided by the error's code, flags and errno, never by its text."""
    import errno
    if error.code == ErrorCode.AUTH:
        return True
    if error.code == ErrorCode.NETWORK:
        return error.transient and isinstance(error.cause, OSError)
    names = ("EROFS", "ENOSPC", "EDQUOT", "EACCES", "EPERM")
    return (error.code == ErrorCode.IO and isinstance(error.cause, OSError)
            and error.cause.errno in set(getattr(errno, name, None) for name in names) - {None})


def _io_error(what, error):
    """The IO error for the OSError `error` while doing `what`, keeping it as the
    cause: its errno is what _is_systemic reads."""
    return StargzError(ErrorCode.IO, "%s: %s" % (what, _describe_os_error(error)), error)


class DownloadStats(object):
    """What a download did; `failures` lists (path, message). `fatal` is the
    systemic failure (see _is_systemic) that stopped the run, or None; `planned`
    counts the files the run was to write, `kept` those found complete already."""

    def __init__(self):
        self.files = self.bytes = self.skipped = self.requests = self.retries = self.fetched = 0
        self.planned = self.kept = 0
        self.failures, self.failure_codes, self.warnings = [], [], []
        self.fatal = None
        self.elapsed = 0.0
        self._lock = threading.Lock()

    def add(self, name, n=1):
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def fail(self, path, message, code=ErrorCode.IO):
        with self._lock:
            self.failures.append((path, message))
            self.failure_codes.append(code)

    def stop_with(self, error):
        """Record the systemic failure that ends the run; only the first is its cause."""
        with self._lock:
            if self.fatal is None:
                self.fatal = error

    def as_dict(self):
        return {"files": self.files, "bytes": self.bytes, "skipped": self.skipped, "requests": self.requests,
                "retries": self.retries, "fetched": self.fetched, "elapsed": round(self.elapsed, 3),
                "failures": [{"path": p, "error": m} for p, m in self.failures],
                "kept": self.kept, "fatal": None if self.fatal is None else self.fatal.message}


# -- planner -------------------------------------------------------------------

class _Member(object):
    """A gzip member to fetch and the keys of the chunks it yields."""

    __slots__ = ("offset", "end", "keys")

    def __init__(self, offset, end):
        self.offset, self.end, self.keys = offset, end, []


class DownloadJob(object):
    """The plan for one `get`: which entries, which files, which byte ranges.
    Pure: it reads the index, never the network or the disk."""

    def __init__(self, index, pattern, output_dir, blob=None, policy=None, exclude=()):
        self.index, self.pattern, self.output_dir, self.blob = index, pattern, output_dir, blob
        self.policy = policy or ExtractionPolicy()
        self.entries = index.filter_files(pattern, blob, exclude=exclude)
        view = index.view(blob)
        self.dirs, self.regular, self.symlinks, self.hardlinks, self.specials = [], [], [], [], []
        selected_ids = set(id(e) for e in self.entries)
        for entry in self.entries:
            blocker = self._blocking_ancestor(view, entry.path)
            if blocker is not None:
                # Only a crafted image puts a file below a symlink: writing it would
                # go through the link, so the whole job is refused before any write.
                _fail(ErrorCode.UNSAFE, "refusing a hostile image: %s lies below %s, which is a %s, not a directory"
                      % (entry.path, blocker.path, blocker.type))
            if entry.type == "dir":
                self.dirs.append(entry)
            elif entry.type == "reg":
                self.regular.append(entry)
            elif entry.type == "symlink":
                self.symlinks.append(entry)
            elif entry.type == "hardlink":
                target = entry.link_target
                if target is not None and id(target) in selected_ids and view.get(target.path) is target:
                    self.hardlinks.append(entry)
                else:
                    self.regular.append(entry)   # its target is not written: copy the content
            else:
                self.specials.append(entry)
        self.conflicts = self._take_working_names()

    WORKING_SUFFIXES = (_PARTIAL_SUFFIX, _STATE_SUFFIX, _STATE_SUFFIX + ".tmp")

    def _take_working_names(self):
        """Entries named like the working files of a selected file (`a.partial` next to
        `a`) would be overwritten or read as resume state: they are refused."""
        regular = set(e.path for e in self.regular)
        conflicts = []
        for group in (self.dirs, self.regular, self.symlinks, self.hardlinks, self.specials):
            for entry in list(group):
                owner = self._working_file_owner(entry.path, regular)
                if owner is not None:
                    group.remove(entry)
                    conflicts.append((entry.path, "refusing %s: the name is starget's working file for %s"
                                      % (entry.path, owner)))
        return conflicts

    def _working_file_owner(self, path, regular):
        """The selected file whose working name `path` (or one of its parents) takes."""
        parts = path.split("/")
        for n in range(1, len(parts) + 1):
            prefix = "/".join(parts[:n])
            for suffix in self.WORKING_SUFFIXES:
                if prefix.endswith(suffix) and prefix[:-len(suffix)] in regular:
                    return prefix[:-len(suffix)]
        return None

    @staticmethod
    def _blocking_ancestor(view, path):
        parts = path.split("/")
        for n in range(1, len(parts)):
            ancestor = view.get("/".join(parts[:n]))
            if ancestor is not None and ancestor.type != "dir":
                return ancestor
        return None

    @staticmethod
    def plan_ranges(chunks, concurrency=4, gap=_COALESCE_GAP, part_size=_PART_SIZE):
        """[(blob, [members])] for `chunks`, each (blob, member_offset, member_end, key):
        one member per (blob, offset) holding its chunks' keys in the order given,
        members coalesced across small gaps, long runs cut at member boundaries so
        that `concurrency` workers share them."""
        members = {}
        for blob, offset, end, key in chunks:
            member = members.get((blob, offset))
            if member is None:
                member = members[(blob, offset)] = _Member(offset, end)
            member.keys.append(key)
        ranges = []
        by_blob = {}
        for (blob, _), member in members.items():
            by_blob.setdefault(blob, []).append(member)
        for blob, blob_members in sorted(by_blob.items()):
            blob_members.sort(key=lambda m: m.offset)
            runs = [[blob_members[0]]]
            for member in blob_members[1:]:
                if member.offset - runs[-1][-1].end <= gap:
                    runs[-1].append(member)
                else:
                    runs.append([member])
            for run in runs:
                ranges.extend((blob, part) for part in DownloadJob._split_run(run, concurrency, part_size))
        return ranges

    @staticmethod
    def _split_run(run, concurrency, part_size):
        length = run[-1].end - run[0].offset
        pieces = min(max(1, concurrency), max(1, -(-length // part_size)))
        if pieces == 1:
            return [run]
        target = length / float(pieces)
        parts, current = [], []
        for member in run:
            current.append(member)
            if current[-1].end - current[0].offset >= target and len(parts) < pieces - 1:
                parts.append(current)
                current = []
        if current:
            parts.append(current)
        return parts


class _Progress(object):
    """A one-line progress bar, only on a terminal (stderr): redrawn at most every
    INTERVAL seconds, fit to the terminal's width, ended by one summary line. The
    stream, the clock and the width (a function of the stream) may be given."""

    INTERVAL = 0.1

    def __init__(self, total, files, enabled, files_done=0, stream=None, clock=time.monotonic, width=None):
        self.total, self.files, self.enabled = total, files, enabled
        self.done, self.files_done = 0, files_done
        self.stream = sys.stderr if stream is None else stream
        self.clock, self.width = clock, width or _terminal_width
        self.start = self.last = clock()
        self.shown = 0      # the length of the line on the screen
        self.lock = threading.Lock()

    def add(self, nbytes=0, files=0):
        if not self.enabled:
            return
        with self.lock:
            self.done += nbytes
            self.files_done += files
            now = self.clock()
            if now - self.last >= self.INTERVAL:
                self.last = now
                self._draw(now)

    def _draw(self, now, final=False):
        width = self.width(self.stream)
        line = _progress_line(self.done, self.total, self.files_done, self.files, now - self.start, width, final)
        # Spaces over what a longer line left, not ESC [K: NO_COLOR allows no escapes.
        pad = max(0, min(self.shown, width - 1) - len(line))
        self.stream.write("\r" + line + " " * pad + ("\n" if final else ""))
        self.shown = len(line)
        self.stream.flush()

    def finish(self, files_done=None):
        """The last line: what was done, in how long; `files_done` as counted at the end."""
        if self.enabled:
            with self.lock:
                self.files_done = self.files_done if files_done is None else files_done
                self._draw(self.clock(), final=True)


def _terminal_width(stream):
    """The columns of the terminal `stream` is on; shutil.get_terminal_size asks
    stdout, which may be a file (`starget get ... > log`) while stderr is the terminal."""
    import shutil
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    return columns or shutil.get_terminal_size().columns


def _duration(seconds):
    seconds = int(seconds + 0.5)
    if seconds >= 3600:
        return "%d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)
    return "%d:%02d" % (seconds // 60, seconds % 60)


def _progress_line(done, total, files_done, files, elapsed, width, final=False):
    """The progress line: percentage, bytes, speed, ETA (or, when `final`, the time
    taken) and files, in at most `width - 1` columns, as a full-width line wraps on
    some terminals. What does not fit goes, bytes first; percentage and files stay."""
    rate = done / elapsed if elapsed > 0 else 0.0
    if final:
        timing = "in %s" % _duration(elapsed)
    else:
        timing = "ETA %s" % _duration((total - done) / rate) if rate > 0 and done < total else ""
    parts = [("%3d%%" % (min(100, 100 * done // total) if total else 100), 0),
             ("%s / %s" % (_human_size(done), _human_size(total)), 3),
             ("%s/s" % _human_size(rate), 2), (timing, 1),
             ("%d/%d file%s" % (files_done, files, "" if files == 1 else "s"), 0)]
    for drop in (3, 2, 1, 0):
        line = "  ".join(text for text, rank in parts if text)
        if len(line) <= width - 1:
            return line
        parts = [(text, rank) for text, rank in parts if rank != drop]
    return line[:max(0, width - 1)]


def _human_size(n):
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024


# -- tree writer: destination checks, partial files and resume state, the tree --

_FS_IS_UTF8 = sys.getfilesystemencoding().lower().replace("-", "") == "utf8"


def _local_name(name):
    """An image's name as the OS takes it: its UTF-8 bytes, whatever the locale. With a
    UTF-8 file system encoding that is the name itself; under Python 3.6 in the C
    locale (ASCII) it is the surrogate-escaped form, which os functions turn back
    into exactly those bytes (3.7+ coerces the C locale to UTF-8 itself)."""
    if _FS_IS_UTF8:
        return name
    return os.fsdecode(name.encode("utf-8", "surrogateescape"))


class _Destination(object):
    """The output directory; every write goes through `prepare`, which refuses
    names that leave it and parents that are symlinks or not directories."""

    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.verified = set()   # directories checked (or made) during this run

    def path(self, rel):
        _normalize_path(rel)  # raises UNSAFE for '..', absolute, NUL
        return os.path.join(self.root, *_local_name(rel).split("/")) if rel else self.root

    def prepare(self, rel):
        """Create the parents of `rel` as real directories; return its absolute path."""
        current = self.root
        parts = _local_name(rel).split("/")
        for part in parts[:-1]:
            current = os.path.join(current, part)
            if current in self.verified:
                continue
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                os.mkdir(current, 0o755)
                self.verified.add(current)
                continue
            if stat.S_ISLNK(st.st_mode):
                _fail(ErrorCode.UNSAFE, "refusing to write %s: %s is a symlink" % (rel, current))
            if not stat.S_ISDIR(st.st_mode):
                _fail(ErrorCode.UNSAFE, "refusing to write %s: %s is not a directory" % (rel, current))
            self.verified.add(current)
        return self.path(rel)

    def check_free_space(self, entries):
        """Refuse up front what cannot fit (a hostile TOC may declare absurd sizes)."""
        needed = 0
        for entry in entries:
            size = entry.content.size or 0
            try:
                if os.lstat(self.path(entry.path)).st_size == size:
                    continue    # probably there from an earlier run
            except (OSError, StargzError):
                pass
            needed += size
        try:
            fs = os.statvfs(self.root)
        except (OSError, AttributeError):
            return
        free = fs.f_bavail * fs.f_frsize
        if needed > free:
            _fail(ErrorCode.IO, "not enough free space in %s: need %s, have %s"
                  % (self.root, _human_size(needed), _human_size(free)))


def _hash_file_range(fd, start, size):
    digest = hashlib.sha256()
    position, end = start, start + size
    while position < end:
        data = os.pread(fd, min(_READ_SIZE * 4, end - position), position)
        if not data:
            break
        digest.update(data)
        position += len(data)
    return "sha256:" + digest.hexdigest(), position - start


class _PartialFile(object):
    """One regular file to produce: its chunks, those verified, its partial file
    `NAME.partial` and its resume state `NAME.partial.state`."""

    def __init__(self, entry, final):
        self.entry, self.path, self.final = entry, entry.path, final
        self.source = entry.content
        self.chunks = self.source.chunks
        self.partial, self.state_file = final + _PARTIAL_SUFFIX, final + _STATE_SUFFIX
        self.done = set()
        self.fd = None
        self.failed = None
        self.finished = False
        self.lock = threading.RLock()

    @property
    def complete(self):
        return len(self.done) == len(self.chunks)

    def wanted(self, index):
        """Chunk `index` is still to be had."""
        return self.failed is None and not self.finished and index not in self.done

    def ensure_open(self):
        """The partial file's descriptor, created on the first write (so that the
        first requests go out before thousands of files are created)."""
        with self.lock:
            if self.fd is None:
                flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                self.fd = os.open(self.partial, flags, 0o600)
                os.ftruncate(self.fd, self.source.size or 0)
            return self.fd

    def state(self):
        return {"blob": self.source.blob, "digest": self.source.digest, "size": self.source.size,
                "chunks": len(self.chunks), "done": sorted(self.done)}

    def already_final(self):
        """A previous run finished this file: same size and digest under the final name."""
        source = self.source
        try:
            st = os.lstat(self.final)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != (source.size or 0) or not source.digest:
            return False
        fd = os.open(self.final, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            return _hash_file_range(fd, 0, st.st_size)[0] == source.digest
        finally:
            os.close(fd)

    def resume(self, verify):
        """Keep the chunks of `NAME.partial` that a previous run verified (hashed
        again here); discard a partial file from another image version."""
        state = self._saved_state()
        if os.path.lexists(self.partial):
            st = os.lstat(self.partial)
            if not stat.S_ISREG(st.st_mode):
                _fail(ErrorCode.UNSAFE, "refusing to reuse %s: not a regular file" % self.partial)
        fresh = self.state()
        if not isinstance(state, dict) or any(state.get(k) != fresh[k] for k in ("blob", "digest", "size", "chunks")):
            for stale in (self.partial, self.state_file):
                if os.path.lexists(stale):
                    os.unlink(stale)
            state = None
        if state:
            self.ensure_open()
            for i in state.get("done") or []:
                if isinstance(i, int) and 0 <= i < len(self.chunks):
                    chunk = self.chunks[i]
                    digest, got = _hash_file_range(self.fd, chunk.file_offset, chunk.size)
                    if got == chunk.size and (digest == chunk.digest or (not chunk.digest and not verify)):
                        self.done.add(i)
            if self.done:
                _log.info("resuming %s: %d of %d chunks already verified", self.path, len(self.done), len(self.chunks))

    def _saved_state(self):
        if not os.path.lexists(self.state_file):
            return None
        try:
            fd = os.open(self.state_file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd) as f:
                return json.loads(f.read(1 << 20))
        except (OSError, ValueError, RecursionError):
            return None

    def record(self, index):
        """Chunk `index` is verified and written: note it (and save the resume state).
        False when it was noted already or the file failed meanwhile."""
        with self.lock:
            if self.failed is not None or index in self.done:
                return False
            self.done.add(index)
            if len(self.chunks) > 1:
                self._save_state()
            return True

    def _save_state(self):
        temp = self.state_file + ".tmp"
        try:
            if os.path.lexists(temp):
                os.unlink(temp)
            # O_EXCL | O_NOFOLLOW: never write through a link planted at this name
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(self.state(), f)
            os.replace(temp, self.state_file)
        except OSError as e:
            _log.debug("cannot save resume state for %s: %s", self.path, e)

    def fail(self, message):
        """Mark the file failed; False when it had failed or was finished already."""
        with self.lock:
            if self.failed is not None or self.finished:
                return False
            self.failed = message
            return True

    def close(self):
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


class _TreeWriter(object):
    """What one run creates under the destination: directories (made 0700, their
    modes applied last), regular files by way of their partial files, hardlinks,
    symlinks and special files, with owners, modes and times as the policy allows.
    `written` maps id(entry) to the final path of each file this run wrote or
    verified: the only files a hardlink may point to."""

    def __init__(self, dest, policy, verify, stats, stop=None):
        self.dest, self.policy, self.verify, self.stats = dest, policy, verify, stats
        self.stop = stop or threading.Event()
        self.written = {}

    def failed(self, path, error):
        """The one place a failure is counted. A systemic one (_is_systemic) would
        fail every entry still to come: it is recorded once, as the run's cause, and
        sets `stop`, so that no new work starts; any other fails `path` only."""
        if _is_systemic(error):
            self.stats.stop_with(error)
            self.stop.set()
        else:
            self.stats.fail(path, error.message, error.code)

    # -- directories -----------------------------------------------------------
    def make_dirs(self, dirs):
        """Create the selected directories; returns [(entry, path)] of those made or
        found as real directories: only these get their attributes at the end."""
        made = []
        for entry in dirs:
            if self.stop.is_set():
                break
            try:
                path = self.dest.prepare(entry.path)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    os.mkdir(path, 0o700)
                    made.append((entry, path))
                    continue
                if stat.S_ISLNK(st.st_mode):
                    _fail(ErrorCode.UNSAFE, "refusing to write into %s: it is a symlink" % path)
                if not stat.S_ISDIR(st.st_mode):
                    _fail(ErrorCode.UNSAFE, "refusing to write into %s: it exists and is not a directory" % path)
                made.append((entry, path))
            except StargzError as e:
                self.failed(entry.path, e)
            except OSError as e:
                self.failed(entry.path, _io_error("cannot create directory %s" % (e.filename or entry.path), e))
        return made

    def finish_dirs(self, made):
        """Modes and times last, deepest first, so read-only directories were writable meanwhile."""
        for entry, path in sorted(made, key=lambda item: item[0].path.count("/"), reverse=True):
            try:
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    self.apply_metadata(path, entry)
            except OSError as e:
                _log.warning("cannot set attributes of %s: %s", path, _describe_os_error(e))

    # -- regular files -----------------------------------------------------------
    def prepare_files(self, entries):
        """A _PartialFile for each entry still to fetch, resumed where a previous run
        left it; files found complete are skipped (or finished) here."""
        files = []
        for entry in entries:
            if self.stop.is_set():
                break
            try:
                file = _PartialFile(entry, self.dest.prepare(entry.path))
                if os.path.isdir(file.final) and not os.path.islink(file.final):
                    _fail(ErrorCode.IO, "%s exists and is a directory" % file.final)
                if file.already_final():
                    self.stats.add("skipped")
                    self.stats.add("kept")
                    self.apply_metadata(file.final, entry)
                    self.written[id(entry)] = file.final
                    continue
                file.resume(self.verify)
                files.append(file)
                if file.complete:
                    self.finish(file, None)
            except StargzError as e:
                self.failed(entry.path, e)
            except OSError as e:
                self.failed(entry.path, _io_error("cannot write %s" % (e.filename or entry.path), e))
        return files

    def finish(self, file, progress):
        """All chunks verified: check the whole file, set its attributes, rename it."""
        error = None
        with file.lock:
            if file.finished or file.failed is not None:
                return
            try:
                self._commit(file)
            except StargzError as e:
                error = e
            except OSError as e:
                error = _io_error("cannot write %s" % file.final, e)
            if error is not None:
                file.failed = error.message
        if error is not None:
            self.failed(file.path, error)
            return
        self.stats.add("files")
        self.stats.add("bytes", file.source.size or 0)
        if progress is not None:
            progress.add(files=1)

    def _commit(self, file):
        source = file.source
        file.ensure_open()   # an empty file had no chunk to create it
        if self.verify and source.digest and (len(file.chunks) != 1 or file.chunks[0].digest != source.digest):
            digest, _ = _hash_file_range(file.fd, 0, source.size or 0)
            if digest != source.digest:
                os.unlink(file.state_file) if os.path.exists(file.state_file) else None
                os.unlink(file.partial)
                _fail(ErrorCode.INTEGRITY, "%s: content digest %s does not match the TOC's %s"
                      % (file.path, digest, source.digest))
        self.set_owner(file.final, file.entry, file.fd)
        os.fchmod(file.fd, self.policy.mode_of(file.entry))
        os.close(file.fd)
        file.fd = None
        os.replace(file.partial, file.final)
        if os.path.exists(file.state_file):
            os.unlink(file.state_file)
        os.utime(file.final, (file.entry.mtime, file.entry.mtime))
        file.finished = True
        self.written[id(file.entry)] = file.final

    def fail(self, file, error):
        """`file` cannot be had: counted once, whatever failed first."""
        if file.fail(error.message):
            self.failed(file.path, error)

    # -- links and special files -------------------------------------------------
    def _replace_with(self, entry, make):
        """Create a non-regular entry at its path, replacing a file or link there."""
        try:
            path = self.dest.prepare(entry.path)
            if os.path.lexists(path):
                if os.path.isdir(path) and not os.path.islink(path):
                    _fail(ErrorCode.IO, "%s exists and is a directory" % path)
                os.unlink(path)
            make(path)
            self.stats.add("files")
            return path
        except StargzError as e:
            self.failed(entry.path, e)
        except OSError as e:
            self.failed(entry.path, _io_error("cannot create %s %s" % (entry.type, e.filename or entry.path), e))
        except (OverflowError, ValueError) as e:
            self.stats.fail(entry.path, "cannot create %s: %s" % (entry.type, _describe_os_error(e)))
        return None

    def make_hardlinks(self, hardlinks):
        """Link only to a file this run wrote or found complete: never to a path that
        was not checked (it could lead through a symlink out of the destination)."""
        for entry in hardlinks:
            target_path = self.written.get(id(entry.link_target))
            if target_path is None:
                self.stats.fail(entry.path, "hardlink target %s was not written" % entry.link_target.path)
                continue
            self._replace_with(entry, lambda path: os.link(target_path, path, follow_symlinks=False))

    def make_symlinks(self, symlinks):
        for entry in symlinks:
            path = self._replace_with(entry, lambda p: os.symlink(_local_name(entry.link), p))
            if path and os.utime in getattr(os, "supports_follow_symlinks", ()):
                try:
                    self.set_owner(path, entry)
                    os.utime(path, (entry.mtime, entry.mtime), follow_symlinks=False)
                except OSError:
                    pass

    def make_specials(self, specials):
        if specials and not self.policy.special_files:
            message = "skipped %d device node%s and FIFO%s (pass --devices, as root, to create them)" % (
                len(specials), "" if len(specials) == 1 else "s", "" if len(specials) == 1 else "s")
            self.stats.warnings.append(message)     # logged by the run, after the progress line
            self.stats.add("skipped", len(specials))
            return
        kinds = {"char": stat.S_IFCHR, "block": stat.S_IFBLK}
        for entry in specials:
            mode = self.policy.mode_of(entry)
            if entry.type == "fifo":
                make = lambda p: os.mkfifo(p, mode)
            else:
                make = lambda p: os.mknod(p, mode | kinds[entry.type], os.makedev(entry.dev_major, entry.dev_minor))
            path = self._replace_with(entry, make)
            if path:
                self.apply_metadata(path, entry)

    # -- owners, modes, times ----------------------------------------------------
    def set_owner(self, path, entry, fd=None):
        if not self.policy.same_owner or entry.uid is None:
            return
        try:
            if fd is not None:
                os.fchown(fd, entry.uid, entry.gid or 0)
            else:
                os.lchown(path, entry.uid, entry.gid or 0)
        except (OSError, OverflowError) as e:
            _log.debug("cannot chown %s: %s", path, e)

    def apply_metadata(self, path, entry):
        try:
            self.set_owner(path, entry)
            os.chmod(path, self.policy.mode_of(entry))
            os.utime(path, (entry.mtime, entry.mtime))
        except OSError as e:
            _log.warning("cannot set attributes of %s: %s", path, _describe_os_error(e))


# -- fetcher: ranges in, verified inflated chunks out ----------------------------

class _ChunkSink(object):
    """Receives the bytes of a member and keeps the slice that
    is one chunk: writes it at its place in the file and hashes it."""

    __slots__ = ("file", "index", "chunk", "start", "stop", "hasher", "written", "mismatch", "write_error")

    def __init__(self, file, index):
        self.file, self.index = file, index
        self.chunk = file.chunks[index]
        self.start = self.chunk.inner_offset or 0
        self.stop = self.start + self.chunk.size
        self.hasher = hashlib.sha256()
        self.written = 0
        self.mismatch = self.write_error = None

    def feed(self, produced, data, verify):
        low, high = max(self.start, produced), min(self.stop, produced + len(data))
        if low >= high or self.write_error:
            return
        piece = data[low - produced:high - produced]
        try:
            os.pwrite(self.file.ensure_open(), piece, self.chunk.file_offset + (low - self.start))
        except OSError as e:   # this file cannot be written; the others of the range go on
            self.write_error = _io_error("cannot write %s" % self.file.partial, e)
            return
        self.hasher.update(piece)
        self.written += len(piece)
        if self.written == self.chunk.size and verify and self.chunk.digest:
            digest = "sha256:" + self.hasher.hexdigest()
            if digest != self.chunk.digest:
                self.mismatch = "%s: chunk at %d has digest %s, the TOC says %s" % (
                    self.file.path, self.chunk.file_offset, digest, self.chunk.digest)


def _pour(pieces, sinks, position, stop, verify):
    """Hand the stream `pieces`, whose first byte is at `position`, to every sink up
    to `stop`; returns the position reached. Nothing is pulled from `pieces` once
    `stop` is reached: a member is never inflated past what its chunks need."""
    if position >= stop:
        return position
    for data in pieces:
        for sink in sinks:
            sink.feed(position, data, verify)
        position += len(data)
        if position >= stop:
            break
    return position


def _decoders_of(index):
    """blob -> the decompressor of its members, for the layers that are not gzip. The
    zstd decoder is imported at the first use, so that an image with a zstd:chunked
    layer still gives its gzip layers' files on a Python without one."""
    def zstd_frames(blob):
        def decompress(pieces):
            return _inflate_zstd_frames(pieces, _zstd_module("layer %s" % blob))
        return decompress
    return {toc.blob: zstd_frames(toc.blob) for toc in index.layers if toc is not None and toc.compression == "zstd"}


class _Fetcher(object):
    """One run's fetching: each planned range is one request through the retry loop,
    each of its members inflated as it streams, each chunk checked against its
    digest and handed to `deliver(sink)`. What cannot be had fails only the files
    it feeds, through `fail(file, error)`; Ctrl-C or a systemic failure sets `stop`,
    which ends workers."""

    def __init__(self, client, retry, verify, stop, stats, deliver, fail, decoders=None):
        self.client, self.retry, self.verify, self.stop, self.stats = client, retry, verify, stop, stats
        self.deliver, self.fail = deliver, fail
        self.decoders = decoders or {}   # blob -> its members' decompressor, if not gzip
        self._lock = threading.Lock()
        self._mismatches = {}   # (id(file), index) -> how often that chunk came out wrong

    def fetch(self, ranges, concurrency):
        """Fetch `ranges` (as DownloadJob.plan_ranges returns them) on a worker pool."""
        if not ranges:
            return
        from concurrent.futures import ThreadPoolExecutor, wait, FIRST_COMPLETED
        pool = ThreadPoolExecutor(max_workers=min(concurrency, len(ranges)))
        futures = [pool.submit(self._run_range, blob, members) for blob, members in ranges]
        try:
            pending = set(futures)
            while pending:   # a timeout, so that Ctrl-C reaches this thread
                _, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
        except KeyboardInterrupt:
            self.stop.set()
            for future in futures:
                future.cancel()
            self.client.transport.abort()
            pool.shutdown(wait=True)
            raise
        pool.shutdown(wait=True)
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error

    def _run_range(self, blob, members):
        """One coalesced range through the retry loop: each attempt fetches what is
        still missing; what finally fails, fails only the files it feeds."""
        def attempt():
            wanted = [m for m in members if any(file.wanted(i) for file, i in m.keys)]
            if wanted and not self.stop.is_set():
                self._fetch_members(blob, wanted)

        what = "bytes %d-%d of %s" % (members[0].offset, members[-1].end - 1, blob)
        try:
            self.retry.run(attempt, what, self.stats)
        except StargzError as error:
            if error.code == ErrorCode.INTERRUPTED:
                return
            for member in members:
                for file, i in member.keys:
                    if file.wanted(i):
                        self.fail(file, error)

    def _fetch_members(self, blob, members):
        start, end = members[0].offset, members[-1].end
        response = self.client.open_blob(blob, start, end - 1)
        refetch = False
        try:
            position = start
            for member in members:
                response.skip(member.offset - position)
                refetch = self._inflate_member(response, member, self.decoders.get(blob, _inflate_members)) \
                    or refetch
                position = member.end
        finally:
            response.close()
        if refetch:
            _fail(ErrorCode.INTEGRITY, "a chunk did not match its digest: fetching it again", damaged=True)

    def _inflate_member(self, response, member, decompress):
        """Inflate one member as it streams, handing each wanted chunk its bytes, and
        stop once they are complete; the rest of its extent is read, not inflated,
        so that the next member lines up. True when a chunk deserves one more fetch."""
        sinks = sorted((_ChunkSink(file, i) for file, i in member.keys if file.wanted(i)), key=lambda s: s.start)
        need = max(s.stop for s in sinks) if sinks else 0
        extent = self._extent(response, member.end - member.offset)
        broken = None
        try:
            produced = _pour(decompress(extent), sinks, 0, need, self.verify)
            if produced < need:
                broken = "the member at offset %d holds %d bytes, fewer than the TOC declares (%d)" % (
                    member.offset, produced, need)
        except StargzError as e:
            if not e.damaged:   # the connection broke, or Ctrl-C: this attempt is over
                raise
            broken = "corrupt data in the member at offset %d: %s" % (member.offset, e.cause)
        for _ in extent:    # the next members of the range are fine: keep reading
            pass
        return self._settle(sinks, broken, refetch=True)

    def _extent(self, response, length):
        """A member's compressed bytes as they arrive; Ctrl-C ends the attempt."""
        pieces = response.pieces(length)
        while True:
            if self.stop.is_set():
                _fail(ErrorCode.INTERRUPTED, "interrupted")
            data = next(pieces, None)
            if data is None:
                return
            yield data

    def _settle(self, sinks, broken, refetch):
        """Deliver each chunk that came out whole and right. One that did not fails
        its file, unless `refetch` and it is its first time: then it is fetched once
        more, and True is returned. `broken` says why incomplete chunks are."""
        due = False
        for sink in sinks:
            problem = sink.mismatch or (broken if sink.written < sink.chunk.size else None)
            if sink.write_error:
                self.fail(sink.file, sink.write_error)
            elif problem is None:
                self.deliver(sink)
            elif refetch and self._count_mismatch(sink) == 1:
                due = True
            else:
                self.fail(sink.file, StargzError(ErrorCode.INTEGRITY, problem))
        return due

    def _count_mismatch(self, sink):
        """How often this chunk came out wrong: once is refetched, twice fails its file."""
        key = (id(sink.file), sink.index)
        with self._lock:
            self._mismatches[key] = self._mismatches.get(key, 0) + 1
            return self._mismatches[key]


# -- the run ---------------------------------------------------------------------

class _Run(object):
    """One run of a DownloadJob and all its state: the client, the stats, the
    progress bar, the stop event (Ctrl-C, or a systemic failure: see _is_systemic),
    the tree writer (which knows the files written) and the fetcher (which counts
    mismatches)."""

    def __init__(self, downloader, job, client, stream=None):
        self.job, self.client, self.downloader = job, client, downloader
        self.stream = stream    # a _LayerStream that wrote the streamed layers' files already
        self.progress = None
        self.writer = stream.writer if stream is not None else _TreeWriter(
            _Destination(job.output_dir), downloader.policy, downloader.verify, DownloadStats(), threading.Event())
        self.stats, self.stop = self.writer.stats, self.writer.stop
        self.fetcher = _Fetcher(client, downloader.retry, downloader.verify, self.stop, self.stats,
                                self._chunk_verified, self.writer.fail, _decoders_of(job.index))

    def execute(self):
        started = time.time()
        job, stats, writer = self.job, self.stats, self.writer
        stream = self.stream
        before = stream.before if stream is not None else self.client.transport.stats.as_dict()
        try:
            os.makedirs(job.output_dir, exist_ok=True)
        except OSError as e:
            _fail(ErrorCode.IO, "cannot create %s: %s" % (job.output_dir, _describe_os_error(e)), e)
        for path, reason in job.conflicts:
            _log.warning("%s", reason)
            stats.fail(path, reason, ErrorCode.UNSAFE)
        regular = [e for e in job.regular if stream is None or not stream.handles(e)]
        writer.dest.check_free_space(regular)
        stats.planned = len(job.regular) + len(job.hardlinks) + len(job.symlinks) + (
            len(job.specials) if writer.policy.special_files else 0)
        made_dirs = writer.make_dirs(job.dirs)
        files = writer.prepare_files(regular)
        self.progress = _Progress(sum(f.source.size - sum(f.chunks[i].size for i in f.done) for f in files),
                                  stats.planned, self.downloader.progress_enabled, stats.files + stats.kept)
        try:
            try:
                self._fetch(files)
            finally:
                for file in files:
                    file.close()
            if not self.stop.is_set():   # after a systemic failure nothing new is started
                writer.make_hardlinks(job.hardlinks)
                writer.make_symlinks(job.symlinks)
                writer.make_specials(job.specials)
        finally:
            self.progress.finish(stats.files + stats.kept)   # the count the summary gives
        for message in stats.warnings:      # below the progress line, not into it
            _log.warning("%s", message)
        writer.finish_dirs(made_dirs)
        after = self.client.transport.stats.as_dict()
        stats.requests = after["requests"] - before["requests"]
        stats.retries += after["retries"] - before["retries"]
        stats.fetched = after["bytes"] - before["bytes"]
        stats.elapsed = time.time() - started
        return stats

    def _fetch(self, files):
        """The files' missing chunks, planned into ranges and fetched in parallel."""
        wanted = [(file.source.blob, chunk.member_offset, chunk.member_end, (file, i))
                  for file in files if not file.finished
                  for i, chunk in enumerate(file.chunks) if i not in file.done]
        downloader = self.downloader
        ranges = DownloadJob.plan_ranges(wanted, downloader.concurrency, downloader.gap, downloader.part_size)
        self.fetcher.fetch(ranges, downloader.concurrency)

    def _chunk_verified(self, sink):
        file = sink.file
        if file.record(sink.index):
            self.progress.add(sink.chunk.size)
            if file.complete:
                self.writer.finish(file, self.progress)


class _UpperLayers(object):
    """What the layers above the one streaming did to the paths below them, as
    ImageIndex._merge applies it: the entries they hold win (`provided`); a whiteout,
    or a non-directory, at a path hides it and all below (`cut`); an opaque directory
    hides what lies below it (`opaque`). A layer's own whiteouts apply only below it,
    so `learn` takes a layer once it has streamed."""

    def __init__(self):
        self.provided, self.cut, self.opaque = {}, set(), set()

    def visible(self, path):
        """Whether a lower layer's entry at `path` would show in the merged view."""
        if path in self.provided or (path and "" in self.opaque):
            return False
        parts = path.split("/")
        for n in range(1, len(parts) + 1):
            prefix = "/".join(parts[:n])
            if prefix in self.cut or (n < len(parts) and prefix in self.opaque):
                return False
        return True

    def learn(self, entries):
        for entry in entries:
            path = entry.path
            name = path[path.rfind("/") + 1:]
            if name == _OPAQUE_WHITEOUT:
                self.opaque.add(posixpath.dirname(path))
            elif name.startswith(_WHITEOUT_PREFIX):
                if name != _WHITEOUT_PREFIX:
                    self.cut.add(posixpath.join(posixpath.dirname(path), name[len(_WHITEOUT_PREFIX):]))
            else:
                self.provided.setdefault(path, entry)
                if entry.type != "dir":
                    self.cut.add(path)   # a file over a lower directory replaces its whole tree

    def settles(self, targets):
        """Whether no lower layer can change what `targets` are: neither the entry at
        each target and at its parents, nor (for a directory) what lies below it."""
        for target in targets:
            parts = target.split("/") if target else []
            if any(self.visible("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
                return False
            below = target + "/\x00" if target else "\x00"   # a name no layer provides
            if self.visible(below):
                return False
        return True


def _selects(path, targets):
    return any(not t or path == t or path.startswith(t + "/") for t in targets)


class _LayerStream(object):
    """--fallback-stream for `get` and `cat`: the layers without a TOC are streamed,
    top layer first, each at most once per selection. A member that is selected and
    still visible (see _UpperLayers) is written to its `.partial` name as it passes;
    links, directories and the rest are only recorded (the run makes them). The walk
    stops once no lower layer can change the selection, so those are never read; the
    lazy layers' TOCs are known up front and their files fetched as usual. The
    partial files are renamed (`commit`) only after every streamed layer matched its
    digest and the job was planned; temp disk holds nothing but selected files."""

    def __init__(self, downloader, index, blob=None):
        self.index, self.blob = index, blob
        self.client = downloader.client or index.client
        self.layers = [index.layer(blob)] if blob is not None else list(index.layers)
        self.writer = None
        self.files = {}           # destination path -> _PartialFile written from a stream
        self.before = self.client.transport.stats.as_dict()

    @staticmethod
    def pending(index, blob=None):
        """Whether `index` has a layer to stream that was not read yet."""
        layers = [index.layer(blob)] if blob is not None else index.layers
        return any(isinstance(toc, _StreamedLayerTOC) and not toc.loaded for toc in layers)

    def settle(self, pattern, output_dir, policy, verify, follow_last=None):
        """Stream what `pattern` needs into `output_dir`; returns the ImageIndex that
        is exact for it (the layers not read are empty). A symlink on the way moves
        the selection: the walk is done again for the path it leads to."""
        self.writer = _TreeWriter(_Destination(output_dir), policy, verify, DownloadStats())
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as e:
            _fail(ErrorCode.IO, "cannot create %s: %s" % (output_dir, _describe_os_error(e)), e)
        follow = pattern.endswith("/") if follow_last is None else follow_last
        targets = {_resolve_in({}, pattern, follow_last=False)}
        try:
            for _ in range(42):      # _resolve_in allows 40 links
                index = self._walk(targets)
                target = _resolve_in(index.view(self.blob), pattern, follow_last=follow)
                if target in targets:
                    return index
                targets.add(target)
            _fail(ErrorCode.NOT_FOUND, "too many levels of symbolic links resolving %r" % pattern)
        except BaseException:
            self.discard()
            raise

    def _walk(self, targets):
        upper, seen = _UpperLayers(), []
        for toc in reversed(self.layers):
            if self.blob is None and upper.settles(targets):
                break
            if isinstance(toc, _StreamedLayerTOC):
                self._stream(toc, upper, targets)
            upper.learn(toc.entries)
            seen.append(toc)
        layers = [toc if any(toc is s for s in seen) else LayerTOC([], blob=toc.blob, layer=toc.layer, footer_size=0)
                  for toc in self.layers]
        if self.blob is not None:
            return self.index
        return ImageIndex(layers, self.index.client, self.index.manifest)

    def _stream(self, toc, upper, targets):
        """Read `toc`'s layer (again only when it holds selected data not written yet);
        a hardlink whose target is not itself written needs the target's bytes,
        which passed before it: the layer is read once more for them."""
        while True:
            wanted = self._wanted(toc.entries, upper, targets) if toc.loaded else None
            if wanted == {}:
                return
            first = wanted is None

            def visit(entry, tar, info):
                if first and entry.type == "reg" and upper.visible(entry.path) and _selects(entry.path, targets):
                    self._write(entry, tar, info)
                for copy in (wanted or {}).get(entry.path, ()):
                    if entry.type == "reg":
                        self._write(copy, tar, info)
            toc.read(visit)
            if not first:
                return

    def _wanted(self, entries, upper, targets):
        """member path -> the selected, visible entries still to write from it: regular
        files, and hardlinks whose target will not be written (a copy of its bytes)."""
        wanted, last = {}, {}
        for entry in entries:
            last[entry.path] = entry    # the later of two same-named members wins
        for path, entry in last.items():
            if not upper.visible(path) or not _selects(path, targets) or path in self.files:
                continue
            if entry.type == "reg":
                wanted.setdefault(path, []).append(entry)
            elif entry.type == "hardlink" and entry.link_target is not None:
                target = entry.link_target
                if last.get(target.path) is not target or not upper.visible(target.path) \
                        or not _selects(target.path, targets):
                    wanted.setdefault(target.path, []).append(entry)
        return wanted

    def _write(self, entry, tar, info):
        """`info`'s data to `entry`'s partial file (under the destination's checks),
        hashed. What the destination refuses fails this file; an error reading the
        stream is the attempt's, so it goes up to the retry loop."""
        writer, path = self.writer, entry.path
        old = self.files.pop(path, None)
        if old is not None:
            old.close()
        if writer.stop.is_set():     # a systemic failure (a full disk): write nothing more
            return
        try:
            file = _PartialFile(entry, writer.dest.prepare(path))
            if os.path.isdir(file.final) and not os.path.islink(file.final):
                _fail(ErrorCode.IO, "%s exists and is a directory" % file.final)
            for stale in (file.partial, file.state_file):
                if os.path.lexists(stale):
                    os.unlink(stale)
            fd = file.ensure_open()
        except StargzError as e:
            writer.failed(path, e)
            return
        except OSError as e:
            writer.failed(path, _io_error("cannot write %s" % (e.filename or path), e))
            return
        hasher = hashlib.sha256()
        try:
            with tar.extractfile(info) as data:
                for piece in iter(lambda: data.read(_READ_SIZE * 4), b""):
                    hasher.update(piece)
                    view = memoryview(piece)
                    while view:
                        view = view[os.write(fd, view):]
        except OSError as e:
            writer.failed(path, _io_error("cannot write %s" % file.partial, e))
            return
        except BaseException:     # the stream broke: the retry loop reads the layer again
            file.close()
            if os.path.lexists(file.partial):
                os.unlink(file.partial)
            raise
        finally:
            file.close()
        self.files[path] = file
        file.digest = "sha256:" + hasher.hexdigest()

    def commit(self, job):
        """Every streamed layer matched its digest: rename the partial files the job
        selects, with their digests now known; drop the others. A selected file of a
        streamed layer that was neither written nor failed would be a bug: said so."""
        failed = set(path for path, _ in self.writer.stats.failures)
        for entry in job.regular:
            if not self.handles(entry):
                continue
            file = self.files.pop(entry.path, None)
            if file is None or file.entry is not entry:
                if file is not None:
                    self.files[entry.path] = file   # another entry's: dropped below
                if entry.path not in failed:
                    self.writer.stats.fail(entry.path, "%s was not found in its layer's stream" % entry.path,
                                           ErrorCode.INTERNAL)
                continue
            source = file.source
            source.digest = file.digest
            source.chunks = file.chunks = [Chunk(0, source.size or 0, 0, 0, file.digest, member_end=0)]
            file.done.add(0)
            self.writer.finish(file, None)
        self.discard()

    def discard(self):
        for file in self.files.values():
            self._drop(file)
        self.files = {}

    @staticmethod
    def _drop(file):
        file.close()
        try:
            os.unlink(file.partial)
        except OSError:
            pass

    def handles(self, entry):
        """Whether `entry`'s bytes come from a streamed layer (written here, or failed)."""
        return isinstance(self.index.layer(entry.content.blob), _StreamedLayerTOC)


class Downloader(object):
    """Runs DownloadJobs: fetch ranges on a worker pool, inflate each gzip member
    as it streams, verify every chunk and file, write to `.partial` names and
    rename only when complete. Re-running an interrupted job resumes it. The
    settings live here; each run's state lives on its own _Run, so one Downloader
    may run any number of jobs."""

    def __init__(self, client=None, concurrency=4, verify=True, retry=None, policy=None,
                 progress=False, gap=_COALESCE_GAP, part_size=_PART_SIZE):
        self.client = client
        self.concurrency = max(1, int(concurrency))
        self.verify = verify
        self.retry = retry or (client.transport.retry if client is not None else RetryPolicy())
        self.policy = policy or ExtractionPolicy()
        self.progress_enabled = progress
        self.gap, self.part_size = gap, part_size

    def download(self, index, pattern, output_dir, blob=None, exclude=(), stream=None):
        """Get the files `pattern` selects (less what the `exclude` globs match) into
        `output_dir`; returns DownloadStats. Layers to stream (--fallback-stream) are
        streamed first by a _LayerStream (`stream`: one that settled `index` already,
        as cat does)."""
        if stream is None and _LayerStream.pending(index, blob):
            stream = _LayerStream(self, index, blob)
            index = stream.settle(pattern, output_dir, self.policy, self.verify)
        if stream is None:
            return self.run(DownloadJob(index, pattern, output_dir, blob, self.policy, exclude=exclude))
        try:    # a hostile tree is refused here, before any streamed file is renamed
            job = DownloadJob(index, pattern, output_dir, blob, self.policy, exclude=exclude)
        except BaseException:
            stream.discard()
            raise
        stream.commit(job)
        return _Run(self, job, self.client or index.client, stream).execute()

    def run(self, job):
        """Run `job` with this Downloader's client, else the index's; returns DownloadStats."""
        return _Run(self, job, self.client or job.index.client).execute()


# -- tar stream: the selection as one pax archive on a stream, nothing on disk ---

_TAR_WINDOW = 32 << 20     # bytes fetched ahead of the stream: room for parallel, coalesced ranges
_TAR_MEMBER_TYPES = {"dir": b"5", "reg": b"0", "symlink": b"2", "hardlink": b"1", "char": b"3", "block": b"4",
                     "fifo": b"6"}     # tarfile's DIRTYPE, REGTYPE, ...: the inverse of _TAR_TYPES


class _TarUnit(object):
    """What is verified before any of its bytes is emitted: one chunk of a file, or
    the whole file when its chunks have no digests (as _Span). Each chunk gets a
    store of its own: workers of one window write different chunks at once."""

    __slots__ = ("path", "blob", "chunks", "digest", "stores", "done", "error")

    def __init__(self, source, path, chunks, digest):
        self.path, self.blob, self.chunks, self.digest = path, source.blob, chunks, digest
        self.stores, self.done, self.error = [], set(), None

    def wanted(self, i):       # what _Fetcher._run_range asks of each key (unit, i)
        return i not in self.done and self.error is None

    def open(self):
        import tempfile
        self.stores = [tempfile.SpooledTemporaryFile(_FILE_MEMORY) for _ in self.chunks]

    def close(self):
        for store in self.stores:
            store.close()
        self.stores = []


class _TarFetcher(_Fetcher):
    """_Fetcher's pool, retry loop and Ctrl-C handling, with each chunk kept in its
    unit's store instead of written into a file: the tar stream needs them in order."""

    def _inflate_member(self, response, member, decompress):
        keys = [(unit, i) for unit, i in member.keys if unit.wanted(i)]
        # Each chunk is a span of its own: its bytes start at 0 in its own store.
        sinks = [_SpanSink(c, _Span(c.file_offset, c.size, [c], c.digest), unit.stores[i])
                 for c, unit, i in ((unit.chunks[i], unit, i) for unit, i in keys)]
        need = max(sink.stop for sink in sinks) if sinks else 0
        extent = self._extent(response, member.end - member.offset)
        produced = _pour(decompress(extent), sinks, 0, need, self.verify)
        for _ in extent:    # read, not inflated, so that the next member lines up
            pass
        if produced < need:   # damaged: the retry loop fetches what is not done once more
            _fail(ErrorCode.INTEGRITY, "the member at offset %d holds %d bytes, fewer than the TOC declares (%d)"
                  % (member.offset, produced, need), damaged=True)
        for unit, i in keys:
            unit.done.add(i)
        return False


class _TarStream(object):
    """The selection of a DownloadJob as one POSIX pax tar on a binary stream:
    members in path order (a hardlink right after its target when the target sorts
    later: tar needs it first), owners, modes, times and xattrs from the TOC; devices
    and FIFOs are headers only. File data is fetched a window of units ahead, each
    unit checked before a byte of it is written, the file digest at the end of its
    member; the end-of-archive blocks come only when everything was verified, so a
    failure leaves an archive that tar reports as truncated."""

    def __init__(self, job, client, verify=True, concurrency=4, gap=_COALESCE_GAP, part_size=_PART_SIZE,
                 window=_TAR_WINDOW):
        self.job, self.client, self.verify, self.window = job, client, verify, window
        self.concurrency, self.gap, self.part_size = max(1, int(concurrency)), gap, part_size
        self.fetcher = _TarFetcher(client, client.transport.retry, verify, threading.Event(),
                                   client.transport.stats, None, self._failed, _decoders_of(job.index))
        self.members = self._order()
        self.units = {}     # id(member entry) -> its _TarUnits
        for entry, as_link in self.members:
            if entry.content.type == "reg" and not as_link and not entry.content.spool:
                self.units[id(entry)] = self._units_of(entry)
        self.queue = [unit for entry, _ in self.members for unit in self.units.get(id(entry), ())]
        self.fetched = 0    # queue[:fetched] were fetched (or are being written)

    def _order(self):
        """[(entry, as_link)] in path order; a hardlink waits for its target."""
        linked = set(id(e) for e in self.job.hardlinks)
        waiting, order, written = {}, [], set()
        for entry in sorted(self.job.entries, key=lambda e: e.path):
            as_link = id(entry) in linked
            if as_link and id(entry.link_target) not in written:
                waiting.setdefault(id(entry.link_target), []).append(entry)
                continue
            written.add(id(entry))
            order.append((entry, as_link))
            order.extend((e, True) for e in waiting.pop(id(entry), ()))
        return order

    @staticmethod
    def _units_of(entry):
        source = entry.content
        if all(c.digest for c in source.chunks):
            return [_TarUnit(source, entry.path, [c], c.digest) for c in source.chunks]
        return [_TarUnit(source, entry.path, list(source.chunks), source.digest)]

    def _failed(self, unit, error):
        if unit.error is None:
            unit.error = error

    def write(self, out):
        """Write the archive to `out` (a binary stream); a StargzError stops it."""
        for entry, as_link in self.members:
            out.write(self._header(entry, as_link))
            if entry.content.type == "reg" and not as_link:
                self._write_data(entry, out)
        out.write(b"\0" * (2 * 512))    # the end of the archive: only once everything was verified
        return len(self.members)

    def _header(self, entry, as_link):
        import tarfile
        info = tarfile.TarInfo(entry.path)
        kind = "hardlink" if as_link else ("reg" if entry.type == "hardlink" else entry.type)
        info.type = _TAR_MEMBER_TYPES[kind]
        info.mode = (entry.mode or 0) & 0o7777
        info.uid, info.gid = entry.uid or 0, entry.gid or 0
        info.uname, info.gname = entry.uname or "", entry.gname or ""
        info.mtime = entry.mtime or 0
        if kind == "reg":
            info.size = entry.content.size or 0
        elif kind == "symlink":
            info.linkname = entry.link or ""
        elif kind == "hardlink":
            info.linkname = entry.link_target.path   # the name it has in this archive
        elif kind in ("char", "block"):
            info.devmajor, info.devminor = entry.dev_major or 0, entry.dev_minor or 0
        for name, value in sorted((entry.xattrs or {}).items()):
            # tarfile writes a value that is not UTF-8 as its bytes (hdrcharset=BINARY)
            raw = base64.b64decode(value)
            info.pax_headers["SCHILY.xattr." + name] = raw.decode("utf-8", "surrogateescape")
        return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")

    def _write_data(self, entry, out):
        source = entry.content
        size = source.size or 0
        if source.spool:    # a --fallback-stream file: its spooled layer was verified whole
            pieces = self._spooled(entry)
        else:
            pieces = self._verified_pieces(self.units[id(entry)])
        hasher, written = hashlib.sha256(), 0
        for data in pieces:
            hasher.update(data)
            written += len(data)
            out.write(data)
        if written != size:    # the header said `size`: any other count would misframe the archive
            _fail(ErrorCode.INTEGRITY, "%s: %d bytes of content, the TOC says %d" % (entry.path, written, size))
        digest = "sha256:" + hasher.hexdigest()
        if self.verify and source.digest and digest != source.digest:
            _fail(ErrorCode.INTEGRITY, "%s: content digest %s does not match the TOC's %s"
                  % (entry.path, digest, source.digest))
        out.write(b"\0" * (-size % 512))

    def _spooled(self, entry):
        with _ImageFile(self.client, entry, entry.path) as f:
            for data in iter(lambda: f.read(_READ_SIZE), b""):
                yield data

    def _verified_pieces(self, units):
        """The bytes of `units`, each unit checked whole before its first byte."""
        for unit in units:
            if unit.error is None and not unit.stores:
                self._fetch_window()
            try:
                if unit.error is not None:
                    raise unit.error
                if len(unit.done) != len(unit.chunks):
                    _fail(ErrorCode.INTERRUPTED, "interrupted")
                if self.verify and unit.digest and self._digest(unit) != unit.digest:
                    first, last = unit.chunks[0], unit.chunks[-1]
                    _fail(ErrorCode.INTEGRITY, "%s: bytes %d-%d do not match the TOC's digest %s" % (
                        unit.path, first.file_offset, last.file_offset + last.size - 1, unit.digest))
                for store in unit.stores:
                    store.seek(0)
                    for data in iter(lambda: store.read(_READ_SIZE), b""):
                        yield data
            finally:
                unit.close()

    @staticmethod
    def _digest(unit):
        hasher = hashlib.sha256()
        for store in unit.stores:
            store.seek(0)
            for data in iter(lambda: store.read(_READ_SIZE), b""):
                hasher.update(data)
        return "sha256:" + hasher.hexdigest()

    def _fetch_window(self):
        """Fetch the next units of the queue, up to `window` bytes (one at least), in
        coalesced ranges on the worker pool."""
        start, total = self.fetched, 0
        while self.fetched < len(self.queue) and (self.fetched == start or total < self.window):
            unit = self.queue[self.fetched]
            total += sum(c.size for c in unit.chunks)
            unit.open()
            self.fetched += 1
        wanted = [(unit.blob, c.member_offset, c.member_end, (unit, i))
                  for unit in self.queue[start:self.fetched] for i, c in enumerate(unit.chunks)]
        ranges = DownloadJob.plan_ranges(wanted, self.concurrency, self.gap, self.part_size)
        self.fetcher.fetch(ranges, self.concurrency)

    def write_file(self, path):
        """Write the archive to `path` by way of `path.partial`, renamed only once the
        archive is complete: no half-written file under the final name. A failed
        archive is removed (it cannot be resumed)."""
        partial = path + _PARTIAL_SUFFIX
        try:
            if os.path.lexists(partial):    # a stale one, or a link planted there: never written through
                os.unlink(partial)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0), 0o644)
            with io.open(fd, "wb") as f:   # a write that fails (a full disk) is an OSError
                count = self.write(f)
            os.replace(partial, path)
            return count
        except OSError as e:
            self._discard(partial)
            raise _io_error("cannot write %s" % path, e) from e
        except BaseException:
            self._discard(partial)
            raise

    @staticmethod
    def _discard(partial):
        try:
            os.unlink(partial)
        except OSError:
            pass

# =============================================================================
# file objects (read an image's file without downloading it)
# =============================================================================
#
# ImageIndex.open and open() return an _ImageFile: a read-only, seekable raw file
# whose bytes are fetched a chunk at a time when first read, each request through
# the one retry loop, each chunk checked against its digest before any of its bytes
# is returned, and the last few chunks kept, so that reading a region again costs
# nothing. One object per thread: objects share only the client (its pool is safe).

_FILE_READ_AHEAD = 64 << 10    # the next chunk comes along when its member is this small
_FILE_CACHE_CHUNKS = 4         # verified chunks an open file keeps, and their bytes at most
_FILE_CACHE_BYTES = 16 << 20   # (the chunk being read is kept, whatever its size)
_FILE_MEMORY = 4 << 20         # a bigger chunk waits in a temporary file, not in memory


class _Span(object):
    """What is verified as one: a chunk, or the whole file when a chunk has no digest."""

    __slots__ = ("offset", "size", "chunks", "digest")

    def __init__(self, offset, size, chunks, digest):
        self.offset, self.size, self.chunks, self.digest = offset, size, chunks, digest


class _SpanSink(object):
    """Keeps one chunk's slice of its member's inflated bytes, at its place in the span."""

    __slots__ = ("store", "start", "stop", "at")

    def __init__(self, chunk, span, store):
        self.store, self.start = store, chunk.inner_offset or 0
        self.stop, self.at = self.start + chunk.size, chunk.file_offset - span.offset

    def feed(self, produced, data, verify=True):
        low, high = max(self.start, produced), min(self.stop, produced + len(data))
        if low < high:
            self.store.seek(self.at + low - self.start)
            self.store.write(data[low - produced:high - produced])


class _ImageFile(io.RawIOBase):
    """A regular file of an image as a read-only, seekable binary file (ImageIndex.open).

    Reads fetch only the chunks that hold the bytes asked for (and the next one when
    it comes cheaply). A file whose chunks have no digests of their own is verified
    as a whole: its first read fetches and checks all of it before returning a byte;
    a file with no digest at all (nothing to check against) is returned as it comes,
    as `get` writes it. A --fallback-stream file is read from its own copy, taken as
    its layer streamed by (the layer's digest checked; see _StreamedLayerTOC)."""

    def __init__(self, client, entry, name, owns_client=False, decompress=None):
        super().__init__()
        self._decompress = decompress or _inflate_members   # zstd frames for a zstd:chunked layer
        source = entry.content
        self.name, self._client, self._owns_client = name, client, owns_client
        self._blob, self._size, self._spool_path = source.blob, source.size or 0, source.spool
        self._spool_offset = source.chunks[0].inner_offset if source.spool and source.chunks else 0
        self._spool = None
        chunks = [] if source.spool else source.chunks
        if all(c.digest for c in chunks):
            self._spans = [_Span(c.file_offset, c.size, [c], c.digest) for c in chunks]
        else:
            self._spans = [_Span(0, self._size, list(chunks), source.digest)]
        self._starts = [span.offset for span in self._spans]
        self._position = 0
        self._cache = {}   # span index -> its verified bytes (a file), least recently read first

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        self._check_open()
        return self._position

    def seek(self, offset, whence=io.SEEK_SET):
        self._check_open()
        if not isinstance(offset, int):
            raise TypeError("an integer is required, not %s" % type(offset).__name__)
        bases = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}
        if whence not in bases:
            raise ValueError("invalid whence (%r)" % (whence,))
        if bases[whence] + offset < 0:
            raise ValueError("negative seek position %d" % (bases[whence] + offset))
        self._position = bases[whence] + offset
        return self._position

    def readinto(self, buffer):
        """Fill `buffer` from the current position (short only at the end of the file)."""
        self._check_open()
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._position < self._size:
            data = self._read_at(self._position, len(view) - done)
            view[done:done + len(data)] = data
            done += len(data)
            self._position += len(data)
        return done

    def readall(self):
        return self.read(max(0, self._size - self._position))

    def close(self):
        """Drop the cached chunks; the transport too when open() made it for this file."""
        if not self.closed:
            for store in self._cache.values():
                store.close()
            self._cache.clear()
            if self._spool is not None:
                self._spool.close()
            if self._owns_client:
                self._client.transport.close()
        super().close()

    def _check_open(self):
        if self.closed:
            raise ValueError("I/O operation on closed file")

    def _read_at(self, position, n):
        """Up to `n` bytes at `position` (< size), from one span or the spool."""
        if self._spool_path is not None:
            return self._read_spool(position, n)
        import bisect
        i = bisect.bisect_right(self._starts, position) - 1
        span = self._spans[i]
        store = self._span_bytes(i)
        store.seek(position - span.offset)
        data = store.read(min(n, span.offset + span.size - position))
        if not data:
            _fail(ErrorCode.INTERNAL, "%s: no bytes at %d" % (self.name, position))
        return data

    def _read_spool(self, position, n):
        try:
            if self._spool is None:
                self._spool = io.open(self._spool_path, "rb")
            self._spool.seek(self._spool_offset + position)
            data = self._spool.read(min(n, self._size - position))
        except OSError as e:
            raise StargzError(ErrorCode.IO, "cannot read the spooled layer: %s" % _describe_os_error(e), e) from e
        if not data:
            _fail(ErrorCode.FORMAT, "%s: the layer's tar ends inside the file" % self.name)
        return data

    def _span_bytes(self, i):
        """Span i's verified bytes: from the cache, else fetched (with the read-ahead)."""
        store = self._cache.pop(i, None)
        if store is None:
            wanted = [i] + self._read_ahead(i)
            first, last = self._spans[wanted[0]], self._spans[wanted[-1]]
            what = "bytes %d-%d of %s in %s" % (first.offset, last.offset + last.size - 1, self.name, self._blob)
            stores = self._client.retrying(lambda: self._fetch(wanted), what)
            for j, fetched in reversed(list(zip(wanted[1:], stores[1:]))):
                if fetched is not None:
                    self._remember(j, fetched)
            store = stores[0]
        self._remember(i, store)   # the most recently read: never the one evicted
        return store

    def _remember(self, i, store):
        self._cache[i] = store
        while len(self._cache) > 1 and (len(self._cache) > _FILE_CACHE_CHUNKS or sum(
                self._spans[j].size for j in self._cache) > _FILE_CACHE_BYTES):
            self._cache.pop(next(iter(self._cache))).close()

    def _read_ahead(self, i):
        """[i + 1] when the next span comes almost free with span i: it is in the same
        gzip member, or in a small member right after (no other round trip)."""
        if i + 1 >= len(self._spans) or i + 1 in self._cache:
            return []
        current, following = self._spans[i].chunks[-1], self._spans[i + 1].chunks[0]
        if following.member_offset == current.member_offset:
            return [i + 1]
        small = following.member_end - following.member_offset <= _FILE_READ_AHEAD
        return [i + 1] if small and following.member_offset == current.member_end else []

    def _fetch(self, indices):
        """One attempt: spans `indices` in one request, inflated and each checked
        against its digest (a mismatch is `damaged`: fetched once more). Their bytes;
        None for a read-ahead one that came out wrong: only a read of it may fail."""
        import tempfile
        stores = [tempfile.SpooledTemporaryFile(_FILE_MEMORY) for _ in indices]
        try:
            members = {}
            for i, store in zip(indices, stores):
                for chunk in self._spans[i].chunks:
                    sink = _SpanSink(chunk, self._spans[i], store)
                    members.setdefault((chunk.member_offset, chunk.member_end), []).append(sink)
            self._inflate(sorted(members.items()))
            for k, span in enumerate(self._spans[i] for i in indices):
                if self._verified(span, stores[k]):
                    continue
                if k == 0:
                    _fail(ErrorCode.INTEGRITY, "%s: bytes %d-%d do not match the TOC's digest %s" % (
                        self.name, span.offset, span.offset + span.size - 1, span.digest), damaged=True)
                stores[k].close()
                stores[k] = None
        except BaseException:
            for store in stores:
                if store is not None:
                    store.close()
            raise
        return stores

    def _inflate(self, members):
        """Fetch [((offset, end), sinks)] in one range, inflating each member only as
        far as its chunks need; the rest is read, not inflated, so the next lines up."""
        start, end = members[0][0][0], members[-1][0][1]
        response = self._client.open_blob(self._blob, start, end - 1)
        try:
            position = start
            for (offset, member_end), sinks in members:
                response.skip(offset - position)
                pieces = response.pieces(member_end - offset)
                need = max(sink.stop for sink in sinks)
                produced = _pour(self._decompress(pieces), sinks, 0, need, True)
                for _ in pieces:
                    pass
                if produced < need:
                    _fail(ErrorCode.INTEGRITY, "%s: the member at offset %d holds %d bytes, fewer than the TOC "
                          "declares (%d)" % (self.name, offset, produced, need), damaged=True)
                position = member_end
        finally:
            response.close()

    @staticmethod
    def _verified(span, store):
        """The span has no digest to check (see the class), or its bytes match it."""
        if not span.digest:
            return True
        hasher = hashlib.sha256()
        store.seek(0)
        for data in iter(lambda: store.read(_READ_SIZE), b""):
            hasher.update(data)
        return "sha256:" + hasher.hexdigest() == span.digest


def _open_in(index, path, blob=None, owns_client=False):
    """The _ImageFile of `path` in `index` (a final symlink followed inside the image)."""
    if not isinstance(path, str) or "\x00" in path:
        _fail(ErrorCode.USAGE, "invalid path %r" % (path,))
    view = index.view(blob)
    entry = view.get(_resolve_in(view, path, follow_last=True))
    if entry is None:
        _fail(ErrorCode.NOT_FOUND, "no such file in the image: %s" % path)
    if entry.content.type != "reg":
        _fail(ErrorCode.NOT_FOUND, "not a regular file in the image: %s (a %s)" % (path, entry.type))
    toc = index.layer(entry.content.blob)
    if isinstance(toc, _StreamedLayerTOC) and entry.content.spool is None:
        toc.spool_file(entry.content)   # a layer with no TOC: its bytes only as it streams
    decompress = _decoders_of(index).get(entry.content.blob)
    return _ImageFile(index.client, entry, path, owns_client, decompress)


def open(reference, path, **options):
    """One call: open_image(reference, **options), then its `.open(path)`. Closing the
    file closes the transport that was made for it (not that of a `client` passed in).
    Shadows the builtin `open` inside this module: starget itself calls `io.open`."""
    index = open_image(reference, **options)
    owns = options.get("client") is None
    try:
        return _open_in(index, path, options.get("blob"), owns)
    except BaseException:
        if owns:
            index.client.transport.close()
        raise

# =============================================================================
# cli
# =============================================================================

# -- shell completion -----------------------------------------------------------
#
# `starget completion bash|zsh|fish` prints a script; for the PATH argument of
# get/cat the scripts run `starget [flags] __complete IMAGE [BLOB] PREFIX`,
# which prints one candidate a line (directories end with '/'); for an IMAGE
# word with a '/', `starget [flags] __complete --image=WORD` (see _complete_image).

_COMPLETION_COMMANDS = (
    ("info", "show the layers of the image"),
    ("ls", "list the files of the image"),
    ("get", "download files"),
    ("cat", "write one file to standard output"),
    ("diff", "compare the files of two images"),
    ("completion", "print a shell completion script"),
    ("tags", "list the tags of a repository"),
    ("login", "store credentials for a registry"),
    ("logout", "remove the stored credentials of a registry"),
)
# argparse's own flags, completed along with the global options (_GLOBAL_OPTIONS)
_COMPLETION_HELP_FLAGS = (("-h", "show help"), ("--help", "show help"))
_COMPLETION_COMMAND_FLAGS = {
    "info": (("--json", "one JSON object"),),
    "ls": (("--json", "one JSON array"), ("-l", "long listing"), ("--long", "long listing"),
           ("--sizes", "show sizes"), ("--exclude", "leave out a glob")),
    "get": (("--exclude", "leave out a glob"), ("--tar", "write one tar archive")),
    "cat": (("--exclude", "leave out a glob"),),
    "diff": (("--json", "one JSON array"), ("--exit-code", "exit 1 when they differ"),
             ("--platform-a", "platform of the first image"), ("--platform-b", "platform of the second image")),
    "tags": (("--json", "one JSON array"),),
    "login": (("-u", "user name"), ("--username", "user name"), ("-p", "password (visible in ps)"),
              ("--password", "password (visible in ps)"), ("--password-stdin", "read the password from stdin")),
}
_COMPLETION_SHELLS = ("bash", "zsh", "fish")
# The IMAGE word asks the registry while the user waits: a slow one must not hang the shell.
_COMPLETE_TIMEOUT = 3.0
_COMPLETE_MAX_PAGES = 10


def _complete_paths(index, prefix, blob=None):
    """Shell-completion candidates for a path in the image: the entries one level
    below the directory part of `prefix` whose names start with its last part,
    sorted; directories (and links to them) end with '/'. What the user typed
    before the path proper (a leading '/' or './') is kept, since shells only
    accept candidates that start with the word as typed."""
    view = index.view(blob)
    lead, rest = "", prefix
    while rest.startswith("/") or rest.startswith("./"):
        step = 1 if rest.startswith("/") else 2
        lead, rest = lead + rest[:step], rest[step:]
    directory, _, partial = rest.rpartition("/")
    shown = lead + (directory + "/" if directory else "")
    try:   # the directory part may go through links (lib -> usr/lib): list where it leads
        parent = _resolve_in(view, directory, follow_last=True)
    except StargzError:
        return []
    if parent and (view.get(parent) is None or view[parent].type != "dir"):
        return []
    candidates = []
    for path, entry in view.items():
        if not path or posixpath.dirname(path) != parent:
            continue
        name = posixpath.basename(path)
        if name.startswith(partial):
            candidates.append(shown + name + ("/" if _completes_as_dir(view, entry) else ""))
    return sorted(candidates)


def _completes_as_dir(view, entry):
    if entry.type == "dir":
        return True
    if entry.type != "symlink":
        return False
    try:
        target = view.get(_resolve_in(view, entry.path, follow_last=True))
    except StargzError:      # a link loop: complete it as the link it is
        return False
    return target is not None and target.type == "dir"


def _complete_image(args, word):
    """Candidates for an IMAGE word: after a ':' that follows the last '/', the tags
    of the repository before it (`host:5000/repo:` -> `host:5000/repo:TAG`); else
    the repositories of the registry's /v2/_catalog (`host:5000/re` -> `host:5000/repo`).
    A word without '/' gets nothing (it may be a host:port being typed), and so does
    any error: a registry that refuses the catalog, or answers slower than
    _COMPLETE_TIMEOUT (no retries)."""
    import copy
    if "/" not in word or "@" in word:
        return []
    name, colon, partial = word.rpartition(":")
    tags = bool(colon) and "/" in name and "/" not in partial
    if not tags:
        name = word.partition("/")[0]
        if not _REGISTRY_RE.match(name) or not ("." in name or ":" in name or _host_of(name) == "localhost"):
            return []
    quick = copy.copy(args)
    quick.image = name if tags else _registry_image(name)
    quick.timeout = min(args.timeout, _COMPLETE_TIMEOUT)
    quick.connect_timeout = min(args.connect_timeout, _COMPLETE_TIMEOUT)
    quick.retries = 0
    session = None
    try:
        session = _Session(quick, Config.load())
        if tags:
            found = [name + ":" + tag for tag in _list_tags(session.client, _COMPLETE_MAX_PAGES)]
        else:
            client = _registry_client(session.client, auth_type=session.client.auth_type)
            found = [name + "/" + repo for repo in _list_catalog(client, _COMPLETE_MAX_PAGES)]
    except StargzError as e:
        _log.debug("no completion for %s: %s", word, e.message)
        return []
    finally:
        if session is not None:
            session.close()
    return sorted(candidate for candidate in found if candidate.startswith(word))


def _cmd_complete(session, out):
    """Hidden `starget __complete IMAGE [BLOB] PREFIX` and `__complete --image=WORD`,
    run by the completion scripts: one candidate a line (see _complete_paths and
    _complete_image)."""
    word = getattr(session.args, "image_word", None)
    if word is not None:
        candidates = _complete_image(session.args, word)
    else:
        blob, rest = _split_blob(session.args.args, 1)
        candidates = _complete_paths(session.load_image(blob), rest[0], blob)
    for candidate in candidates:
        out.write(candidate + "\n")
    return 0


def _completion_script(shell):
    """The completion script for `shell` (bash, zsh or fish), as text."""
    builders = {"bash": _bash_completion, "zsh": _zsh_completion, "fish": _fish_completion}
    if shell not in builders:
        _fail(ErrorCode.USAGE, "unknown shell %r for completion (want one of: %s)"
              % (shell, ", ".join(_COMPLETION_SHELLS)))
    return builders[shell]()


def _completion_fill(template, words):
    for name, value in words.items():
        template = template.replace("@%s@" % name, value)
    return template


def _option_named(flag):
    return next(o for o in _GLOBAL_OPTIONS if flag in o.flags)


def _completion_words():
    """The words the script templates need, from _GLOBAL_OPTIONS. The scripts pass
    every value flag on to __complete (they must skip its value anyway), so a
    value flag cannot be left out of `forwarded`."""
    value_flags = [f for o in _GLOBAL_OPTIONS if o.takes_value for f in o.flags]
    switches = [f for o in _GLOBAL_OPTIONS if not o.takes_value and o.forwarded for f in o.flags]
    return {
        "COMMANDS": " ".join(c for c, _ in _COMPLETION_COMMANDS),
        "GLOBAL_FLAGS": " ".join([f for o in _GLOBAL_OPTIONS for f in o.flags]
                                 + [f for f, _ in _COMPLETION_HELP_FLAGS]),
        "INFO_FLAGS": " ".join(f for f, _ in _COMPLETION_COMMAND_FLAGS["info"]),
        "LS_FLAGS": " ".join(f for f, _ in _COMPLETION_COMMAND_FLAGS["ls"]),
        "TAGS_FLAGS": " ".join(f for f, _ in _COMPLETION_COMMAND_FLAGS["tags"]),
        "LOGIN_FLAGS": " ".join(f for f, _ in _COMPLETION_COMMAND_FLAGS["login"]),
        "PLATFORMS": " ".join(_option_named("--platform").suggestions),
        "SHELLS": " ".join(_COMPLETION_SHELLS),
        "VALUE_FLAGS": "|".join(value_flags),
        "VALUE_FLAGS_EQ": "|".join(f + "=*" for f in value_flags),
        "FORWARDED_FLAGS": "|".join(switches),
    }


def _bash_completion():
    return _completion_fill(_BASH_COMPLETION, _completion_words())


def _zsh_completion():
    words = _completion_words()
    words["DESCRIBED_COMMANDS"] = " ".join("'%s:%s'" % (c, d.replace("'", "")) for c, d in _COMPLETION_COMMANDS)
    return _completion_fill(_ZSH_COMPLETION, words)


def _fish_completion():
    lines = []
    for command, description in _COMPLETION_COMMANDS:
        lines.append("complete -c starget -n __starget_needs_command -a %s -d '%s'"
                     % (command, description.replace("'", "")))
    for option in _GLOBAL_OPTIONS:
        extra = ""
        if option.suggestions:
            extra = " -x -a '%s'" % " ".join(option.suggestions)
        elif option.kind == "file":
            extra = " -r -F"
        elif option.takes_value:
            extra = " -x"
        for flag in option.flags:
            lines.append("complete -c starget %s%s -d '%s'" % (_fish_flag(flag), extra, option.summary))
    for flag, description in _COMPLETION_HELP_FLAGS:
        lines.append("complete -c starget %s -d '%s'" % (_fish_flag(flag), description))
    lines.append("complete -c starget -n __starget_needs_command -l version -d 'show the version'")
    for command in sorted(_COMPLETION_COMMAND_FLAGS):
        for flag, description in _COMPLETION_COMMAND_FLAGS[command]:
            lines.append("complete -c starget -n '__starget_command_is %s' %s -d '%s'"
                         % (command, _fish_flag(flag), description))
    words = _completion_words()
    words["COMPLETE_LINES"] = "\n".join(lines)
    for name in ("VALUE_FLAGS", "FORWARDED_FLAGS"):    # fish lists words, where bash and zsh have patterns
        words[name] = " ".join("'%s'" % f for f in words[name].split("|"))
    return _completion_fill(_FISH_COMPLETION, words)


def _fish_flag(flag):
    return "-l %s" % flag[2:] if flag.startswith("--") else "-s %s" % flag[1:]


_BASH_COMPLETION = r'''# bash completion for starget
# Install: starget completion bash > ~/.local/share/bash-completion/completions/starget
#      or: add  source <(starget completion bash)  to ~/.bashrc

_starget_words()
{
    # Bash splits words at ':', '=' and '@' (COMP_WORDBREAKS); glue them back so
    # that host:5000/img@sha256:... and --platform=linux/arm64 are one word each.
    local line=${COMP_LINE:0:COMP_POINT} word blank i
    _starget_w=()
    for ((i = 0; i <= COMP_CWORD; i++)); do
        word=${COMP_WORDS[i]}
        blank=${line%%[![:space:]]*}
        line=${line:${#blank}}
        if ((i > 0 && ${#_starget_w[@]} > 0)) && [[ -z $blank ]] &&
            [[ $word == [=:@]* || ${_starget_w[${#_starget_w[@]}-1]} == *[=:@] ]]; then
            _starget_w[${#_starget_w[@]}-1]+=$word
        else
            _starget_w+=("$word")
        fi
        line=${line#"$word"}
    done
}

_starget_trim()
{
    # Readline replaces only the text after the word's last ':', '=' or '@' (when
    # in COMP_WORDBREAKS), so candidates must lose what comes before it.
    local cur=$1 breaks="" lead
    [[ $COMP_WORDBREAKS == *:* ]] && breaks+=":"
    [[ $COMP_WORDBREAKS == *=* ]] && breaks+="="
    [[ $COMP_WORDBREAKS == *@* ]] && breaks+="@"
    [[ -n $breaks && $cur == *["$breaks"]* ]] || return 0
    lead=${cur%"${cur##*["$breaks"]}"}
    local i
    for i in "${!COMPREPLY[@]}"; do
        COMPREPLY[i]=${COMPREPLY[i]#"$lead"}
    done
}

_starget_unquote()
{
    # The word as the command will get it: bash leaves the user's backslashes and
    # quotes in COMP_WORDS (pkg\ with\ spaces/), which __complete must not see.
    local word=$1 quote="" c i
    _starget_word=""
    for ((i = 0; i < ${#word}; i++)); do
        c=${word:i:1}
        if [[ $quote == "'" ]]; then
            [[ $c == "'" ]] && quote="" || _starget_word+=$c
        elif [[ $c == '\' ]] && ((i + 1 < ${#word})) && [[ -z $quote || ${word:i+1:1} == [\$\`\"\\] ]]; then
            i=$((i + 1))
            _starget_word+=${word:i:1}
        elif [[ $c == [\"\'] && ( -z $quote || $c == "$quote" ) ]]; then
            [[ -z $quote ]] && quote=$c || quote=""
        else
            _starget_word+=$c
        fi
    done
}

_starget()
{
    local _starget_w
    _starget_words
    local n=${#_starget_w[@]} word i
    local cur=${_starget_w[n-1]} prev=""
    ((n > 1)) && prev=${_starget_w[n-2]}
    COMPREPLY=()

    # A flag's value: --platform VALUE or --platform=VALUE
    local flag="" value=$cur before=""
    if [[ $cur == --*=* ]]; then
        flag=${cur%%=*} value=${cur#*=} before="${cur%%=*}="
    else
        case $prev in
            @VALUE_FLAGS@) flag=$prev ;;
        esac
    fi
    if [[ -n $flag ]]; then
        case $flag in
            --platform) COMPREPLY=($(compgen -P "$before" -W "@PLATFORMS@" -- "$value")) ;;
            --cacert)
                compopt -o filenames 2>/dev/null
                COMPREPLY=($(compgen -P "$before" -f -- "$value")) ;;
        esac
        _starget_trim "$cur"
        return 0
    fi

    # The positional words (command, IMAGE, ...) and the flags __complete needs
    local -a args=() forward=()
    local skip=0
    for ((i = 1; i < n - 1; i++)); do
        word=${_starget_w[i]}
        if ((skip)); then
            forward+=("$word")
            skip=0
            continue
        fi
        case $word in
            @VALUE_FLAGS@) forward+=("$word"); skip=1 ;;
            @VALUE_FLAGS_EQ@|@FORWARDED_FLAGS@) forward+=("$word") ;;
            -*) ;;
            *) args+=("$word") ;;
        esac
    done
    local command=${args[0]-}

    if [[ $cur == -* ]]; then
        local flags="@GLOBAL_FLAGS@"
        case $command in
            "") flags+=" --version" ;;
            info) flags+=" @INFO_FLAGS@" ;;
            ls) flags+=" @LS_FLAGS@" ;;
            tags) flags+=" @TAGS_FLAGS@" ;;
            login) flags+=" @LOGIN_FLAGS@" ;;
        esac
        COMPREPLY=($(compgen -W "$flags" -- "$cur"))
        _starget_trim "$cur"
        return 0
    fi

    if [[ -z $command ]]; then
        COMPREPLY=($(compgen -W "@COMMANDS@" -- "$cur"))
        return 0
    fi
    if ((${#args[@]} == 1)) && [[ $cur == */* ]]; then
        case $command in
            info|ls|get|cat|tags)
                # IMAGE: the registry's repositories, or after a ':' that follows the
                # last '/', the repository's tags (the registry is asked: 3 s at most)
                local IFS=$'\n'
                COMPREPLY=($(starget "${forward[@]}" __complete --image="$cur" 2>/dev/null))
                [[ ${cur##*/} == *:* ]] || compopt -o nospace 2>/dev/null   # a ':TAG' may follow
                _starget_trim "$cur"
                return 0
                ;;
        esac
    fi
    case $command in
        completion)
            ((${#args[@]} == 1)) && COMPREPLY=($(compgen -W "@SHELLS@" -- "$cur"))
            ;;
        get|cat)
            # command IMAGE [BLOB] PATH [OUTPUT_DIR]
            ((${#args[@]} >= 2)) || return 0
            local image=${args[1]} blob="" position=$((${#args[@]} - 2))
            if ((position > 0)) && [[ ${args[2]} == sha256:* ]]; then
                blob=${args[2]}
                position=$((position - 1))
            fi
            local IFS=$'\n'
            if ((position == 0)) && [[ $cur != sha256:* ]]; then
                # Image paths are no local files: no -o filenames (readline would add a
                # second '/' to etc/ when ./etc is a directory), so they are quoted here.
                local _starget_word candidate
                _starget_unquote "$cur"
                while IFS= read -r candidate; do
                    [[ $cur == [\"\']* ]] || printf -v candidate '%q' "$candidate"
                    COMPREPLY+=("$candidate")
                done < <(starget "${forward[@]}" __complete "$image" ${blob:+"$blob"} "$_starget_word" 2>/dev/null)
                if ((${#COMPREPLY[@]} == 1)) && [[ ${COMPREPLY[0]} == */ ]]; then
                    compopt -o nospace 2>/dev/null   # go on typing inside the directory
                fi
            elif ((position == 1)) && [[ $command == get ]]; then
                compopt -o filenames 2>/dev/null
                COMPREPLY=($(compgen -d -- "$cur"))
            fi
            _starget_trim "$cur"
            ;;
    esac
    return 0
}

complete -F _starget starget
'''

_ZSH_COMPLETION = r'''#compdef starget
# zsh completion for starget
# Install: starget completion zsh > "${fpath[1]}/_starget"   (then start a new shell)
#      or: add  source <(starget completion zsh)  to ~/.zshrc (after compinit)

_starget() {
  local cur=${words[CURRENT]} prev=${words[CURRENT-1]}
  local -a commands platforms flags args forward candidates dirs files
  commands=(@DESCRIBED_COMMANDS@)
  platforms=(@PLATFORMS@)

  # A flag's value: --platform VALUE or --platform=VALUE
  local flag=""
  if [[ $cur == --*=* ]]; then
    flag=${cur%%=*}
    compset -P '*='
  else
    case $prev in
      @VALUE_FLAGS@) flag=$prev ;;
    esac
  fi
  if [[ -n $flag ]]; then
    case $flag in
      --platform) compadd -- $platforms ;;
      --cacert) _files ;;
    esac
    return 0
  fi

  # The positional words (command, IMAGE, ...) and the flags __complete needs
  local i word skip=0
  for ((i = 2; i < CURRENT; i++)); do
    word=${words[i]}
    if (( skip )); then
      forward+=("$word")
      skip=0
      continue
    fi
    case $word in
      @VALUE_FLAGS@) forward+=("$word"); skip=1 ;;
      @VALUE_FLAGS_EQ@|@FORWARDED_FLAGS@) forward+=("$word") ;;
      -*) ;;
      *) args+=("$word") ;;
    esac
  done
  local command=${args[1]-}

  if [[ $cur == -* ]]; then
    flags=(@GLOBAL_FLAGS@)
    case $command in
      "") flags+=(--version) ;;
      info) flags+=(@INFO_FLAGS@) ;;
      ls) flags+=(@LS_FLAGS@) ;;
      tags) flags+=(@TAGS_FLAGS@) ;;
      login) flags+=(@LOGIN_FLAGS@) ;;
    esac
    compadd -- $flags
    return 0
  fi

  if [[ -z $command ]]; then
    _describe -t commands 'starget command' commands
    return 0
  fi
  if (( ${#args} == 1 )) && [[ $cur == */* ]]; then
    case $command in
      info|ls|get|cat|tags)
        # IMAGE: the registry's repositories, or after a ':' that follows the
        # last '/', the repository's tags (the registry is asked: 3 s at most)
        candidates=(${(f)"$(starget $forward __complete --image=${(Q)cur} 2>/dev/null)"})
        if [[ ${cur##*/} == *:* ]]; then
          compadd -- $candidates
        else
          compadd -S '' -- $candidates     # a ':TAG' may follow
        fi
        return 0
        ;;
    esac
  fi
  case $command in
    completion)
      (( ${#args} == 1 )) && compadd -- @SHELLS@
      ;;
    get|cat)
      # command IMAGE [BLOB] PATH [OUTPUT_DIR]
      (( ${#args} >= 2 )) || return 0
      local image=${args[2]} blob="" position=$(( ${#args} - 2 ))
      if (( position > 0 )) && [[ ${args[3]} == sha256:* ]]; then
        blob=${args[3]}
        position=$(( position - 1 ))
      fi
      if (( position == 0 )) && [[ $cur != sha256:* ]]; then
        # words has the line as typed (pkg\ with\ spaces/): (Q) unquotes; compadd quotes back
        candidates=(${(f)"$(starget $forward __complete ${(Q)image} $blob "${(Q)cur}" 2>/dev/null)"})
        dirs=(${(M)candidates:#*/})
        files=(${candidates:#*/})
        (( ${#dirs} )) && compadd -S '' -- $dirs     # go on typing inside the directory
        (( ${#files} )) && compadd -- $files
      elif (( position == 1 )) && [[ $command == get ]]; then
        _files -/
      fi
      ;;
  esac
  return 0
}

if [[ ${funcstack[1]-} == _starget ]]; then
  _starget "$@"    # autoloaded from $fpath
else
  compdef _starget starget
fi
'''

_FISH_COMPLETION = r'''# fish completion for starget
# Install: starget completion fish > ~/.config/fish/completions/starget.fish
#      or: starget completion fish | source

function __starget_args --description 'the positional words of the starget command line'
    set -l tokens (commandline -opc)
    set -e tokens[1]
    set -l skip 0
    for word in $tokens
        if test $skip = 1
            set skip 0
            continue
        end
        if contains -- $word @VALUE_FLAGS@
            set skip 1
        else if not string match -q -- '-*' $word
            echo $word
        end
    end
end

function __starget_forward --description 'the flags of the command line that __complete needs'
    set -l tokens (commandline -opc)
    set -e tokens[1]
    set -l skip 0
    for word in $tokens
        if test $skip = 1
            echo $word
            set skip 0
        else if contains -- $word @VALUE_FLAGS@
            echo $word
            set skip 1
        else if contains -- $word @FORWARDED_FLAGS@; or string match -q -- '--*=*' $word
            echo $word
        end
    end
end

function __starget_needs_command
    set -l args (__starget_args)
    not set -q args[1]
end

function __starget_command_is
    set -l args (__starget_args)
    set -q args[1]; and contains -- $args[1] $argv
end

# Which positional word is being typed after IMAGE [BLOB]: 0 for PATH, 1 for OUTPUT_DIR
function __starget_position
    set -l args (__starget_args)
    set -q args[2]; or return 1
    contains -- $args[1] get cat; or return 1
    set -l position (math (count $args) - 2)
    if test $position -gt 0; and string match -q -- 'sha256:*' $args[3]
        set position (math $position - 1)
    end
    echo $position
end

function __starget_wants_path
    set -l position (__starget_position)
    set -l cur (commandline -ct)
    test "$position" = 0; and not string match -q -- 'sha256:*' "$cur"; and not string match -q -- '-*' "$cur"
end

function __starget_wants_output_dir
    set -l position (__starget_position)
    __starget_command_is get; and test "$position" = 1
end

# The IMAGE word, once it has a '/': repositories, or tags after a ':' past the last '/'
function __starget_wants_image
    set -l args (__starget_args)
    test (count $args) -eq 1; and contains -- $args[1] info ls get cat tags
    and string match -q -- '*/*' (commandline -ct)
end

function __starget_images
    set -l cur (commandline -ct | string unescape)
    starget (__starget_forward) __complete --image="$cur" 2>/dev/null
end

function __starget_paths
    set -l args (__starget_args)
    set -l blob
    if set -q args[3]; and string match -q -- 'sha256:*' $args[3]
        set blob $args[3]
    end
    set -l cur (commandline -ct | string unescape)   # the token as typed: pkg\ with\ spaces/
    starget (__starget_forward) __complete $args[2] $blob "$cur" 2>/dev/null
end

complete -c starget -f
@COMPLETE_LINES@
complete -c starget -n '__starget_command_is completion; and test (count (__starget_args)) -eq 1' -a '@SHELLS@'
complete -c starget -n __starget_wants_path -a '(__starget_paths)'
complete -c starget -n __starget_wants_image -a '(__starget_images)'
complete -c starget -n __starget_wants_output_dir -a '(__fish_complete_directories (commandline -ct))'
'''


def _argparse_type(option):
    """The option's check as an argparse `type=`: a bad value is a usage error naming the flag."""
    def parse(text):
        try:
            return option.check(text)
        except ValueError as e:
            import argparse
            raise argparse.ArgumentTypeError(str(e))
    parse.__name__ = option.kind
    return parse


def _add_global_options(parser):
    """Flags valid before or after the command name (as with Cobra's persistent flags).
    Their defaults are SUPPRESSed, so that a subcommand's parser does not overwrite a
    flag given before the command name; main() fills in what is missing."""
    import argparse
    group = parser.add_argument_group("global options")
    for option in _GLOBAL_OPTIONS:
        shown = option.help
        if option.default not in (None, False):
            shown += " (%g)" % option.default
        if option.takes_value:
            group.add_argument(*option.flags, dest=option.dest, type=_argparse_type(option),
                               metavar=option.metavar, default=argparse.SUPPRESS, help=shown)
        else:
            group.add_argument(*option.flags, dest=option.dest, action="store_true",
                               default=argparse.SUPPRESS, help=shown)


def _parser_class():
    """argparse's parser, with starget's usage errors (a function, so that argparse
    is imported only when a command line is parsed)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        argv = None        # what main() parses: error() names the misspelt word in it

        def error(self, message):
            top = self._top or self
            why, command = _misspelt_word(top, top.argv) if top.argv is not None else (None, None)
            prog = "%s %s" % (top.prog, command) if command else self.prog
            if why is None:   # argparse's own words, without the hidden command
                why = re.sub(r",\s*'?__complete'?", "", message)
            self.exit(int(ErrorCode.USAGE), "starget: error: %s; see %s --help\n" % (why, prog))
        _top = None
    return Parser


def _suggestion(word, known):
    """` (did you mean X?)` with the known words closest to `word`, or nothing."""
    import difflib
    close = difflib.get_close_matches(word, sorted(known), n=2, cutoff=0.6)
    return " (did you mean %s?)" % " or ".join(close) if close else ""


def _public_commands(parser):
    """The commands shown in help and errors: not the hidden ones (`__complete`)."""
    return [name for name in parser.commands if not name.startswith("_")]


def _misspelt_word(parser, argv):
    """The first flag or command in `argv` that `parser` does not know, said with
    the known ones closest to it, and the command it follows; None if there is none
    (the error is another)."""
    current, command, words = parser, None, iter(argv)
    for word in words:
        if word == "--":
            break
        known = current._option_string_actions
        if word.startswith("-") and word != "-":
            flag = word.split("=", 1)[0] if word.startswith("--") else word
            combined = re.match(r"^-[A-Za-z]{2,}$", word) and all("-" + c in known for c in word[1:])
            if flag not in known and not combined:
                where = " for %s" % command if command else ""
                return "unknown flag %s%s%s" % (flag, where, _suggestion(flag, known)), command
            if flag in known and known[flag].nargs != 0 and "=" not in word:
                next(words, None)       # its value
        elif command is None:
            if word not in parser.commands:
                public = _public_commands(parser)
                return "unknown command %r%s (commands: %s)" % (word, _suggestion(word, public),
                                                                 ", ".join(public)), None
            command, current = word, parser.commands[word]
    return None, None


_PATH_RULES = """\
IMAGE      [registry/]repository[:tag][@sha256:...]
BLOB       a layer digest, sha256:... or a unique prefix of one: only that layer's
           own entries instead of the merged view of all layers
PATH       . or /      everything
           dir/ or dir the directory dir, recursively
           file        that one file
           a glob      *, ? and [...] within a name, ** for any depth: every match
                       (and what is below it); etc/*.conf, usr/**/*.so, **/LICENSE"""


def _command_help(name, grammar, description, *examples):
    """add_parser()'s usage, description and epilog for a command taking PATHs."""
    import argparse
    epilog = _PATH_RULES + "\n\nexamples:\n" + "\n".join("  starget " + e for e in examples)
    return {"usage": "starget %s [flags] %s" % (name, grammar), "description": description,
            "epilog": epilog, "formatter_class": argparse.RawDescriptionHelpFormatter}


def _words_after_flags(parse_known_args):
    """A parser's parse_known_args that keeps the words after a flag (`ls IMAGE -l etc/`)
    for its nargs="*" positional: argparse fills that one, empty, at IMAGE and
    would call the later words unrecognized. Unknown flags stay unknown."""
    def parse(args=None, namespace=None):
        namespace, extras = parse_known_args(args, namespace)
        words = [w for w in extras if not w.startswith("-")]
        if words and "--" not in extras:
            namespace.args = list(namespace.args) + words
            extras = [w for w in extras if w.startswith("-")]
        return namespace, extras
    return parse


def _registry_image(host):
    """An image reference on `host`, for the commands about a registry itself (login,
    logout, the catalog): main() makes every command's session from an IMAGE, with
    that host's settings (TLS, plain_http). The repository is never asked for."""
    return host + "/starget"


def _registry_argument(text):
    """login's and logout's REGISTRY: host[:port], or a key as docker writes it
    (https://host/v1/); docker.io is Docker Hub. As an image on it (_registry_image)."""
    import argparse
    host = _auth_key_host(text)
    if not _REGISTRY_RE.match(host) or not ("." in host or ":" in host or _host_of(host) == "localhost"):
        raise argparse.ArgumentTypeError("%r is not a registry: want host[:port] with a '.' or a ':' "
                                         "(or localhost), as in IMAGE" % text)
    return _registry_image(host)


def _repository_argument(text):
    """tags' REPOSITORY: [registry/]repository; a tag or digest on it is refused (it
    would read as if it narrowed the list)."""
    import argparse
    try:
        ImageRef.parse(text)
    except StargzError as e:
        raise argparse.ArgumentTypeError(e.message)
    if "@" in text or ":" in text.rsplit("/", 1)[-1]:
        raise argparse.ArgumentTypeError("REPOSITORY takes no tag or digest: %r" % text)
    return text


def _add_registry_commands(add):
    """login, logout and tags, added with _build_parser's `add`. REGISTRY and REPOSITORY
    are checked here; login and logout then get an image on the registry, from which
    main() builds the session (see _registry_image)."""
    import argparse
    login = add("login", help="check and store credentials for a registry: login REGISTRY [-u USER]",
                usage="starget login [flags] REGISTRY [-u USER] [--password-stdin | -p PASSWORD]",
                description="Check the credentials against REGISTRY, then store them as docker login does:\n"
                "with the config's credential helper (credHelpers, credsStore), else in the auth file\n"
                "(REGISTRY_AUTH_FILE, else $DOCKER_CONFIG/config.json or ~/.docker/config.json).",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    login.add_argument("image", metavar="REGISTRY", type=_registry_argument, help="host[:port]")
    login.add_argument("-u", "--username", metavar="USER", help="user name (default: ask on the terminal)")
    secret = login.add_mutually_exclusive_group()
    secret.add_argument("-p", "--password", metavar="PASSWORD", help="password (visible to other users: ps)")
    secret.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    logout = add("logout", help="remove the stored credentials of a registry: logout REGISTRY")
    logout.add_argument("image", metavar="REGISTRY", type=_registry_argument, help="host[:port]")
    tags = add("tags", help="list the tags of a repository: tags [registry/]repository")
    tags.add_argument("image", metavar="REPOSITORY", type=_repository_argument,
                      help="[registry/]repository, without a tag or digest")
    tags.add_argument("--json", action="store_true", help="one JSON array")
    for sub in (login, logout, tags):
        _add_global_options(sub)


def _add_complete_command(add):
    """The hidden `__complete` (no help=): the completion scripts run `__complete IMAGE
    [BLOB] PREFIX` for a PATH, and `__complete --image=WORD` for the IMAGE word (which
    main() cannot make a session of: the mode makes its own; main()'s goes unused)."""
    complete = add("__complete")
    complete.add_argument("image", metavar="IMAGE", nargs="?", default=_registry_image("localhost"))
    complete.add_argument("args", metavar="[BLOB] PREFIX", nargs="*")
    complete.add_argument("--image", dest="image_word", metavar="WORD")
    return complete


def _add_path_arguments(command, metavar, nargs):
    """What ls, get and cat share: IMAGE, the words after it, --exclude."""
    import argparse
    command.add_argument("image", metavar="IMAGE", help=argparse.SUPPRESS)
    command.add_argument("args", metavar=metavar, nargs=nargs, help=argparse.SUPPRESS)
    command.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                         help="leave out what GLOB matches, with its subtree (repeatable)")


def _add_diff_command(add):
    import argparse
    diff = add("diff", help="compare two images' files: diff IMAGE_A IMAGE_B [PATH]",
               usage="starget diff [flags] IMAGE_A IMAGE_B [PATH]", formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Compare the files of two images (or of PATH in both) from their TOCs alone:\n"
                           "one line per changed path, sorted. A added, D deleted, M modified (type, size,\n"
                           "content or link target), m metadata only (mode, owner, xattrs); mtime is not compared.",
               epilog="examples:\n  starget diff ghcr.io/example/tools:1.4 ghcr.io/example/tools:1.5 usr/\n"
                      "  starget diff --platform-a linux/amd64 --platform-b linux/arm64 ghcr.io/example/tools:1.4 "
                      "ghcr.io/example/tools:1.4")
    diff.add_argument("image", metavar="IMAGE_A", help=argparse.SUPPRESS)
    diff.add_argument("image_b", metavar="IMAGE_B", help=argparse.SUPPRESS)
    diff.add_argument("args", metavar="[PATH]", nargs="*", help=argparse.SUPPRESS)
    diff.parse_known_args = _words_after_flags(diff.parse_known_args)
    diff.add_argument("--json", action="store_true", help="one JSON array")
    diff.add_argument("--exit-code", action="store_true", help="exit 1 when the images differ (as git diff does)")
    platform = _option_named("--platform")
    for side, which in (("a", "IMAGE_A"), ("b", "IMAGE_B")):
        diff.add_argument("--platform-" + side, dest="platform_" + side, type=_argparse_type(platform),
                          metavar=platform.metavar, help="platform of %s (default: --platform's)" % which)
    return diff


def _build_parser():
    Parser = _parser_class()
    parser = Parser(
        prog="starget", description="Get files out of eStargz container images without pulling them.",
        allow_abbrev=False,
        epilog="exit codes: 0 ok, 2 usage, 3 not found, 4 auth, 5 network, 6 format, 7 unsupported, "
               "8 integrity, 9 unsafe path, 10 local I/O, 11 some files failed, 130 interrupted")
    parser.add_argument("--version", action="version", version="starget " + __version__)
    _add_global_options(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    parser.commands = commands.choices      # name -> its parser

    def add(name, **kwargs):
        sub = commands.add_parser(name, allow_abbrev=False, **kwargs)
        sub._top = parser
        return sub

    info = add("info", help="show the image's layers")
    info.add_argument("image", metavar="IMAGE")
    info.add_argument("--json", action="store_true", help="one JSON object")

    ls = add("ls", help="list files: ls IMAGE [BLOB] [PATH]", **_command_help(
        "ls", "IMAGE [BLOB] [PATH]",
        "List the entries PATH selects (default: the whole image), sorted by path.",
        "ls ghcr.io/example/tools:1.4 etc/               # etc and everything below it",
        "ls -l ghcr.io/example/tools:1.4 sha256:9a6b7b10 bin/sh"))
    _add_path_arguments(ls, "[BLOB] [PATH]", "*")
    ls.parse_known_args = _words_after_flags(ls.parse_known_args)
    ls.add_argument("-l", "--long", action="store_true", help="type, mode, owner, size, time, link target")
    ls.add_argument("--json", action="store_true", help="one JSON array")
    ls.add_argument("--sizes", action="store_true", help="bytes and files per directory, like du")

    # usage= and the epilog say the grammar: argparse's own usage for nargs="+" would
    # read `[[BLOB] PATH ...]`, which the commands refuse.
    get = add("get", help="download files: get IMAGE [BLOB] PATH [OUTPUT_DIR]", **_command_help(
        "get", "IMAGE [BLOB] PATH [OUTPUT_DIR]",
        "Download the files PATH selects into OUTPUT_DIR (default: .); each lands at\n"
        "OUTPUT_DIR/<its path in the image>.",
        "get ghcr.io/example/tools:1.4 bin/ ./out      # out/bin/...",
        "get ghcr.io/example/tools:1.4 etc/os-release  # ./etc/os-release"))
    _add_path_arguments(get, "[BLOB] PATH [OUTPUT_DIR]", "+")
    get.add_argument("--tar", metavar="FILE", help="write one tar archive (POSIX pax) of the selection to "
                     "FILE (- for standard output) instead of files")

    cat = add("cat", help="write one file to standard output: cat IMAGE [BLOB] PATH", **_command_help(
        "cat", "IMAGE [BLOB] PATH",
        "Write the one regular file PATH names to standard output (a symlink is followed\n"
        "inside the image; the file is verified before a byte is written).",
        "cat ghcr.io/example/tools:1.4 etc/os-release",
        "cat ghcr.io/example/tools:1.4 sha256:9a6b7b10 bin/tool > tool"))
    _add_path_arguments(cat, "[BLOB] PATH", "+")

    diff = _add_diff_command(add)

    completion = add("completion", help="print a shell completion script: completion bash|zsh|fish")
    completion.add_argument("shell", metavar="SHELL", help="bash, zsh or fish")

    _add_registry_commands(add)
    complete = _add_complete_command(add)

    helper = add("help", help="show the help of starget or of one command: help [COMMAND]")
    helper.add_argument("topic", metavar="COMMAND", nargs="?")
    add("version", help="print the version")

    for sub in (info, ls, get, cat, diff, complete):
        _add_global_options(sub)
    return parser


def _cmd_help(parser, topic, out):
    """`starget help [COMMAND]`: the help --help prints, on standard output."""
    if topic is None:
        parser.print_help(out)
        return 0
    if topic not in _public_commands(parser):
        public = _public_commands(parser)
        _fail(ErrorCode.USAGE, "unknown command %r%s (commands: %s)" % (topic, _suggestion(topic, public),
                                                                         ", ".join(public)))
    parser.commands[topic].print_help(out)
    return 0


class _Session(object):
    """What every command needs, built from the parsed flags."""

    def __init__(self, args, config=None):
        self.args = args
        config = config or Config()
        ref = ImageRef.parse(args.image)
        settings = config.registry(ref.registry)            # config.yaml `registries:`
        mirrors = []
        if settings.get("mirror"):
            mirrors.append((settings["mirror"], config.registry(settings["mirror"]).get("plain_http")))
        host_tls = {}
        for host in [ref.registry] + [m for m, _ in mirrors]:
            host_settings = config.registry(host)
            host_tls[host] = {"insecure": host_settings.get("insecure"), "ca_file": host_settings.get("ca_file")}
        for cafile in [args.cacert] + [t["ca_file"] for t in host_tls.values()]:
            if cafile and not os.path.isfile(cafile):
                _fail(ErrorCode.USAGE, "CA certificate file %s does not exist" % cafile)
        insecure = args.insecure or bool(settings.get("insecure"))
        transport = Transport(insecure=args.insecure, cafile=args.cacert, read_timeout=args.timeout,
                              connect_timeout=args.connect_timeout, retry=RetryPolicy(retries=args.retries),
                              host_tls=host_tls)
        self.client = RegistryClient(ref, credentials=Credentials(args.credential), insecure=insecure,
                                     transport=transport, plain_http=settings.get("plain_http"),
                                     mirrors=mirrors, auth_type=settings.get("auth_type"))
        self.cache = None if args.no_cache else TOCCache()
        self.platform = Platform.parse(args.platform) if args.platform else None
        self.scratch = None

    def load_image(self, blob=None):
        """Resolve the manifest and fetch (or read from the cache) the TOCs: network I/O."""
        if self.args.fallback_stream and self.scratch is None:
            import tempfile
            self.scratch = tempfile.mkdtemp(prefix="starget-")
        return open_image(self.client.ref, self.platform, client=self.client, cache=self.cache,
                          blob=blob, concurrency=self.args.concurrency, fallback_dir=self.scratch)

    def close(self):
        self.client.transport.close()
        if self.cache is not None:
            self.cache.flush()
        if self.scratch is not None:
            import shutil
            shutil.rmtree(self.scratch, ignore_errors=True)


def _split_blob(values, most):
    """[BLOB] PATH [...]: a leading `sha256:` argument names a layer."""
    blob = values[0] if len(values) > 1 and values[0].startswith("sha256:") else None
    rest = values[1:] if blob else list(values)
    if not rest or len(rest) > most:
        _fail(ErrorCode.USAGE, "wrong number of arguments (see starget --help)")
    return blob, rest


def _image_path(path):
    """A PATH argument, refused when empty: '' would select the whole image, which
    an unset shell variable should not do."""
    if path == "":
        _fail(ErrorCode.USAGE, "empty PATH: use . or / for the whole image")
    return path


# The S_IF* bits stat.filemode needs; a TOC gives the type as a word.
_ENTRY_TYPE_BITS = {"dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "char": stat.S_IFCHR,
                    "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}


def _mode_string(entry):
    """`ls -l`'s mode column; a hardlink shows as `h`, since it has no file type of its own."""
    text = stat.filemode(_ENTRY_TYPE_BITS.get(entry.type, stat.S_IFREG) | ((entry.mode or 0) & 0o7777))
    return "h" + text[1:] if entry.type == "hardlink" else text


def _ls_arguments(values):
    """ls's [BLOB] [PATH] -> (blob or None, pattern): a first word starting with
    `sha256:` is a BLOB, alone too (`ls IMAGE sha256:9a6b` lists that layer)."""
    blob = values[0] if values and values[0].startswith("sha256:") else None
    rest = values[1:] if blob else list(values)
    if len(rest) > 1:
        _fail(ErrorCode.USAGE, "wrong number of arguments (see starget ls --help)")
    return blob, _image_path(rest[0]) if rest else "."


def _excludes(args):
    """--exclude's globs; an empty one (an unset variable) would leave out everything."""
    for glob in args.exclude:
        if glob == "":
            _fail(ErrorCode.USAGE, "empty --exclude: give a glob")
    return args.exclude


def _cmd_ls(session, out):
    args = session.args
    blob, pattern = _ls_arguments(args.args)
    index = session.load_image(blob)
    # filter_files returns the whole image (`.`) in view order: ls promises path order
    entries = sorted(index.filter_files(pattern, blob, exclude=_excludes(args)), key=lambda e: e.path)
    if args.sizes:
        return _print_sizes(entries, args.json, out)
    if args.json:
        out.write(json.dumps([e.to_json() for e in entries], indent=1, sort_keys=True) + "\n")
        return 0
    for entry in entries:
        if not args.long:
            out.write(entry.path + "\n")
            continue
        size = entry.content.size or 0 if entry.content.type == "reg" else 0
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(entry.mtime or 0))
        link = " -> " + entry.link if entry.type == "symlink" else\
            " link to " + entry.link if entry.type == "hardlink" else ""
        out.write("%s %5s/%-5s %12d %s %s%s\n" % (_mode_string(entry), entry.uid or 0, entry.gid or 0,
                                                 size, when, entry.path, link))
    return 0


def _directory_sizes(entries):
    """{directory: [bytes, files]} of the regular files below each directory (a
    hardlink counts once, as du does)."""
    totals = {"": [0, 0]}
    counted = set()
    for entry in entries:
        if entry.type == "dir":
            totals.setdefault(entry.path, [0, 0])
        content = entry.content
        if content.type != "reg" or id(content) in counted:
            continue
        counted.add(id(content))
        parts = entry.path.split("/")[:-1]
        for n in range(len(parts) + 1):
            total = totals.setdefault("/".join(parts[:n]), [0, 0])
            total[0] += content.size or 0
            total[1] += 1
    return totals


def _print_sizes(entries, as_json, out):
    totals = sorted(_directory_sizes(entries).items())
    if as_json:
        out.write(json.dumps([{"path": p, "bytes": b, "files": f} for p, (b, f) in totals], indent=1) + "\n")
        return 0
    for path, (size, files) in totals:
        out.write("%12d %6d  %s\n" % (size, files, path or "."))
    return 0


def _cmd_info(session, out):
    manifest = _resolve_manifest(session.client, session.platform)
    platform = manifest.platform or _config_platform(session.client, manifest)

    def describe(layer):
        row = {"index": layer.position, "digest": layer.digest, "media_type": layer.media_type,
               "size": layer.size, "format": layer.compression, "toc_digest": layer.toc_digest,
               "toc_entries": None}
        try:
            toc = _fetch_layer_toc(session.client, layer, session.cache)
            row.update(format=_LAYER_FORMATS.get(toc.footer_size, "estargz"),
                       toc_digest=toc.toc_digest, toc_entries=toc.raw_count)
        except StargzError as e:
            if e.code not in (ErrorCode.FORMAT, ErrorCode.UNSUPPORTED, ErrorCode.INTEGRITY):
                raise
            row["error"] = e.message
        return row

    layers = _map_parallel(describe, manifest.layers, session.args.concurrency)   # as open_image does
    index = manifest.index
    doc = {"reference": str(manifest.ref), "digest": manifest.digest, "media_type": manifest.media_type,
           "platform": str(platform) if platform else None, "layers": layers,
           "index": {"digest": index.digest, "media_type": index.media_type,
                     "platforms": [str(p) for p in index.platforms]} if index is not None else None}
    if session.args.json:
        out.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        return 0
    _print_info(doc, out)
    return 0


def _print_info(doc, out):
    """info's text: the index (a multi-platform image), the chosen manifest, its layers."""
    lines = [("image", doc["reference"])]
    if doc["index"] is not None:
        lines += [("index", doc["index"]["digest"]), ("index type", doc["index"]["media_type"]),
                  ("platforms", ", ".join(doc["index"]["platforms"]))]
    lines += [("digest", doc["digest"]), ("type", doc["media_type"])]
    if doc["platform"]:
        lines.append(("platform", doc["platform"]))
    width = max(len(label) for label, _ in lines) + 3     # the colon and two spaces
    for label, value in lines:
        out.write("%s%s\n" % ((label + ":").ljust(width), value))
    rows = [("#", "DIGEST", "SIZE", "FORMAT", "ENTRIES", "MEDIA TYPE")]
    for row in doc["layers"]:
        rows.append((str(row["index"]), row["digest"][:19], _human_size(row["size"]), row["format"],
                     "-" if row["toc_entries"] is None else str(row["toc_entries"]), row["media_type"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")


def _downloader(session):
    args = session.args
    if args.devices and not _is_root():
        _fail(ErrorCode.USAGE, "--devices needs root: only root can create device nodes")
    return Downloader(session.client, concurrency=args.concurrency, verify=not args.skip_verify,
                      progress=not args.no_progress and sys.stderr.isatty(),
                      policy=ExtractionPolicy(special_files=args.devices))


def _report(stats, verbose):
    """The summary of a download: one error line per failed file, then the verdict;
    a systemic failure (stats.fatal) is one line for its cause and one for what was written."""
    messages = [message if path in message else "%s: %s" % (path, message) for path, message in stats.failures]
    if len(messages) > 1 or (messages and stats.fatal is not None):
        for message in messages:
            sys.stderr.write("starget: error: %s\n" % _redact(message))
    if verbose:
        # Files written and files found complete, as the progress line counts them.
        count = stats.files + stats.kept
        files = ("1 file" if count == 1 else "%d files" % count) + (
            " (%d already present)" % stats.kept if stats.kept else "")
        _log.info("%s, %s written, %d skipped, %d requests, %s fetched, %d retries, %d failed, %.2fs",
                 files, _human_size(stats.bytes), stats.skipped - stats.kept, stats.requests,
                 _human_size(stats.fetched), stats.retries, len(stats.failures), stats.elapsed)
    if stats.fatal is not None:
        # One line for the cause, not one per entry it would fail; then how far it got.
        written = stats.files + stats.kept
        sys.stderr.write("starget: %s before the error; re-run the same command to resume\n" % (
            "%d of %d file%s written" % (written, stats.planned, "" if stats.planned == 1 else "s")
            if written else "nothing written"))
        _fail(stats.fatal.code, stats.fatal.message, stats.fatal.cause)
    if stats.failures:
        codes = set(stats.failure_codes)
        code = codes.pop() if len(codes) == 1 and not stats.files else ErrorCode.PARTIAL
        written = "; the others were written (re-run to retry)" if stats.files else ""
        if len(messages) == 1:
            _fail(code, messages[0] + written)
        _fail(code, "%d entries failed%s" % (len(messages), written))


def _cmd_get(session, out):
    blob, rest = _split_blob(session.args.args, 2)
    pattern, output_dir = _image_path(rest[0]), rest[1] if len(rest) > 1 else "."
    tar = session.args.tar
    if tar is not None and len(rest) > 1:
        _fail(ErrorCode.USAGE, "--tar writes one archive: give no OUTPUT_DIR with it")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):   # before any request
        _fail(ErrorCode.USAGE, "OUTPUT_DIR %s is not a directory (to write one file elsewhere: "
                               "starget cat IMAGE PATH > FILE)" % output_dir)
    index = session.load_image(blob)
    if tar is not None:
        _get_tar(session, DownloadJob(index, pattern, output_dir, blob, exclude=_excludes(session.args)), tar, out)
        return 0
    stats = _downloader(session).download(index, pattern, output_dir, blob, exclude=_excludes(session.args))
    _report(stats, session.args.verbose)
    return 0


def _get_tar(session, job, target, out):
    """get --tar: the selection as one archive on standard output (`-`) or in a file."""
    args = session.args
    streamed = {}       # layers without a TOC: their selected files kept as they stream, once per layer
    for entry in job.regular:
        toc = job.index.layers[entry.content.layer] if entry.content.layer is not None else None
        if isinstance(toc, _StreamedLayerTOC) and not entry.content.spool:
            streamed.setdefault(id(toc), (toc, []))[1].append(entry.content)
    for toc, entries in streamed.values():
        toc.spool_files(entries)
    stream = _TarStream(job, session.client, verify=not args.skip_verify, concurrency=args.concurrency)
    if target == "-":
        binary = out.buffer     # _Stdout's: a failed write (a full disk) is exit 10
        count = stream.write(binary)
        binary.flush()
    else:
        count = stream.write_file(target)
    _log.info("%d tar members written", count)


def _dangling_link(view, path):
    """The symlink of `path`'s chain of final links whose target is missing, or None
    (`path` itself is missing, or a directory on the way is): what cat names."""
    at = _resolve_in(view, path, follow_last=False)
    for _ in range(41):       # _resolve_in refused longer chains already
        link = view.get(at)
        if link is None or link.type != "symlink":
            return None
        target = link.link if link.link.startswith("/") else posixpath.join(posixpath.dirname(at), link.link)
        at = _resolve_in(view, target, follow_last=False)
        if at != "" and at not in view:
            return link
    return None


def _cat_target(index, blob, pattern, exclude):
    """The path of the one regular file `pattern` names for cat (a glob must match
    exactly one entry; a final symlink is followed), or the error saying why not."""
    view = index.view(blob)
    if _is_glob(pattern) and _glob_select(view, pattern):   # else a name with `[` in it, as get takes it
        matched = index.filter_files(pattern, blob, exclude=exclude)
        if len(matched) != 1:
            _fail(ErrorCode.USAGE, "%s matches %d entries; cat writes exactly one file" % (pattern, len(matched)))
        pattern = matched[0].path
    path = _resolve_in(view, pattern, follow_last=True)
    entry = view.get(path)
    if entry is None:
        link = _dangling_link(view, pattern)
        if link is not None:
            _fail(ErrorCode.NOT_FOUND, "dangling symlink: %s -> %s" % (link.path, link.link))
        _fail(ErrorCode.NOT_FOUND, ("no match in the image for %s" if _is_glob(pattern) else
                                    "no such file in the image: %s") % pattern)
    if entry.type not in ("reg", "hardlink"):
        _fail(ErrorCode.USAGE, "%s is a %s, not a regular file" % (pattern, entry.type))
    return path


def _cmd_cat(session, out):
    import shutil
    import tempfile
    blob, rest = _split_blob(session.args.args, 1)
    _image_path(rest[0])
    index = session.load_image(blob)
    downloader, stream = _downloader(session), None
    scratch = tempfile.mkdtemp(prefix="starget-cat-")
    try:
        if _LayerStream.pending(index, blob):   # read only the layers the file needs
            stream = _LayerStream(downloader, index, blob)
            index = stream.settle(rest[0], scratch, downloader.policy, downloader.verify, follow_last=True)
        path = _cat_target(index, blob, rest[0], _excludes(session.args))
        stats = downloader.download(index, path, scratch, blob, stream=stream)
        _report(stats, session.args.verbose)
        stream = getattr(out, "buffer", out)
        local = os.path.join(scratch, *_local_name(path).split("/"))
        os.chmod(local, 0o600)   # the image's mode may not let us read our own copy
        with io.open(local, "rb") as f:
            shutil.copyfileobj(f, stream)
        stream.flush()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _login_input(args):
    """(user, password) from -u, -p or --password-stdin, else asked on the terminal."""
    interactive = sys.stdin is not None and sys.stdin.isatty()
    user, password = args.username, args.password
    if password is not None:
        _log.warning("a password given with -p is visible to other users of this machine (ps): "
                     "use --password-stdin")
    elif args.password_stdin:
        if not user:
            _fail(ErrorCode.USAGE, "--password-stdin needs -u USER (standard input holds the password)")
        password = sys.stdin.read().rstrip("\r\n")
    if not user:
        if not interactive:
            _fail(ErrorCode.USAGE, "login needs -u USER: standard input is not a terminal")
        sys.stderr.write("Username: ")
        sys.stderr.flush()
        user = sys.stdin.readline().strip()
    if password is None:
        if not interactive:
            _fail(ErrorCode.USAGE, "login needs a password: --password-stdin or -p PASSWORD "
                  "(standard input is not a terminal)")
        import getpass
        password = getpass.getpass("Password: ")
    _register_secret(password)
    if not user or ":" in user:
        _fail(ErrorCode.USAGE, "invalid user name %r (empty, or with a ':')" % user)
    if not password:
        _fail(ErrorCode.USAGE, "empty password")
    return user, password


def _cmd_login(session, out):
    """`starget login REGISTRY`: check the credentials with the registry (the challenge
    and token flow of a pull), then store them; wrong ones are stored nowhere."""
    registry = session.client.ref.registry
    user, password = _login_input(session.args)
    store = _LoginStore()          # a file it could not write back whole fails here, before a request
    client = _registry_client(session.client, _login_credentials(user, password))
    if not _check_login(client):
        _log.warning("%s lets anyone in: it did not check the credentials", registry)
    where = store.store(registry, user, password)
    if where == store.path:
        _log.warning("the password is stored unencrypted in %s: configure a credential helper "
                     "(credsStore in it) to avoid this", where)
    out.write("Login Succeeded\n")
    return 0


def _cmd_logout(session, out):
    """`starget logout REGISTRY`: erase what login stored (no request to the registry)."""
    registry = session.client.ref.registry
    if _LoginStore().erase(registry):
        out.write("Removing login credentials for %s\n" % registry)
    else:
        _log.warning("not logged in to %s", registry)
    return 0


def _cmd_tags(session, out):
    """`starget tags REPOSITORY`: its tags, in the registry's order, one a line or --json."""
    tags = _list_tags(session.client)
    if session.args.json:
        out.write(json.dumps(tags) + "\n")
    else:
        for tag in tags:
            out.write(tag + "\n")
    return 0




_DIFF_LETTERS = {"added": "A", "deleted": "D", "modified": "M", "metadata": "m"}


def _cmd_diff(session, out):
    """diff IMAGE_A IMAGE_B [PATH]: manifests and TOCs only, never file content."""
    import argparse
    args = session.args
    if len(args.args) > 1:
        _fail(ErrorCode.USAGE, "wrong number of arguments (see starget diff --help)")
    pattern = _image_path(args.args[0]) if args.args else None
    if args.platform_a:
        session.platform = Platform.parse(args.platform_a)
    # IMAGE_B may live on another registry: a session of its own, with its settings
    other_args = argparse.Namespace(**vars(args))
    other_args.image, other_args.platform = args.image_b, args.platform_b or args.platform
    other = _Session(other_args, Config.load())
    try:
        indexes = [session.load_image(), other.load_image()]
    finally:
        other.close()
    sides, missing = [], []
    for index in indexes:
        try:
            sides.append(index.view() if pattern is None else {e.path: e for e in index.filter_files(pattern)})
        except StargzError as error:      # PATH in one image only: all added, or all deleted
            if error.code != ErrorCode.NOT_FOUND:
                raise
            missing.append(error)
            sides.append({})
    if len(missing) == 2:
        raise missing[0]
    changes = _diff_views(*sides)
    if args.json:
        doc = [{"path": path, "change": change, "fields": fields,
                "a": sides[0][path].to_json() if path in sides[0] else None,
                "b": sides[1][path].to_json() if path in sides[1] else None} for path, change, fields in changes]
        out.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    else:
        for path, change, _ in changes:
            out.write("%s %s\n" % (_DIFF_LETTERS[change], path))
    return 1 if changes and args.exit_code else 0


_COMMANDS = {"info": _cmd_info, "ls": _cmd_ls, "get": _cmd_get, "cat": _cmd_cat, "diff": _cmd_diff,
             "login": _cmd_login, "logout": _cmd_logout, "tags": _cmd_tags, "__complete": _cmd_complete}


class _Stdout(object):
    """The command's output stream, where a failed write (a full disk, a closed
    descriptor: sys.stdout is None) is a local I/O error, not a bug. A broken pipe
    passes through: main() treats the reader going away as success."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, data):
        if self._stream is None:
            self._fail("it is closed")
        try:
            if isinstance(data, str) and not _FS_IS_UTF8 and hasattr(self._stream, "buffer"):
                # Python 3.6 in the C locale: stdout is ASCII; names go out as their UTF-8 bytes
                self._stream.flush()
                return self._stream.buffer.write(data.encode("utf-8", "surrogateescape"))
            return self._stream.write(data)
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as e:
            self._fail(getattr(e, "strerror", None) or e)

    def flush(self):
        if self._stream is None:
            return
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as e:
            self._fail(getattr(e, "strerror", None) or e)

    @property
    def buffer(self):     # the binary stream below, for cat (AttributeError: there is none)
        return _Stdout(self._stream.buffer) if self._stream is not None else self

    def _fail(self, why):
        # What could not be written stays buffered: drop it, or the interpreter's
        # last flush at exit fails again, with a traceback.
        _discard_stdout(self._stream)
        _fail(ErrorCode.IO, "cannot write to standard output: %s" % why)


def _argument_text(arg):
    """A command-line argument as the text the user typed: under Python 3.6 in the C
    locale, argv holds surrogate escapes of non-ASCII bytes; image names are UTF-8."""
    if _FS_IS_UTF8:
        return arg
    return os.fsencode(arg).decode("utf-8", "surrogateescape")


def main(argv=None, out=None):
    """Run the command line; returns the exit code."""
    given_out = out
    out = _Stdout(sys.stdout if out is None else out)
    parser = _build_parser()
    parser.argv = [_argument_text(a) for a in sys.argv[1:]] if argv is None else list(argv)
    try:
        args = parser.parse_args(parser.argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else ErrorCode.USAGE
    given = set(vars(args))     # the flags on the command line (absent ones are SUPPRESSed)
    _fill_options(args, given, dict((o.dest, o.default) for o in _GLOBAL_OPTIONS))
    restore_logging = _configure_logging(args.verbose, args.debug)
    session = None
    try:
        if args.command in ("completion", "help", "version"):     # they need no image and no config
            if args.command == "completion":
                out.write(_completion_script(args.shell))
            elif args.command == "help":
                _cmd_help(parser, args.topic, out)
            else:
                out.write("starget %s\n" % __version__)
            out.flush()
            return 0
        config = Config.load()
        _fill_options(args, given, config.flag_defaults())   # config.yaml fills what the flags left
        session = _Session(args, config)
        code = _COMMANDS[args.command](session, out) or 0
        out.flush()      # here, so that a full disk is reported (at exit it would be lost)
        return code
    except StargzError as e:
        message = " ".join(_redact(e.message).split())
        sys.stderr.write("starget: error: %s\n" % message)
        if e.cause is not None:
            _log.debug("cause: %r", e.cause)
        return e.exit_code
    except KeyboardInterrupt:      # only get leaves partial files that a re-run resumes
        resume = "; run the same command again to resume" if args.command == "get" and not args.tar else ""
        sys.stderr.write("\nstarget: interrupted%s\n" % resume)
        return int(ErrorCode.INTERRUPTED)
    except BrokenPipeError:     # the reader went away (`starget ls IMAGE | head`): not an error
        _discard_stdout(sys.stdout if given_out is None else given_out)
        return 0
    except Exception as e:  # a bug: say so in one line, the traceback with --debug
        _log.debug("traceback", exc_info=True)
        sys.stderr.write("starget: internal error: %s: %s (re-run with --debug)\n"
                         % (e.__class__.__name__, _redact(e)))
        return int(ErrorCode.INTERNAL)
    finally:
        if session is not None:
            session.close()
        restore_logging()


def _fill_options(args, given, values):
    """Set the options the command line did not give (`given`) to `values`."""
    for dest, value in values.items():
        if dest not in given:
            setattr(args, dest, value)


def _discard_stdout(out):
    """After a broken pipe or a failed write on the process's own stdout, point file descriptor 1 at
    /dev/null, so that the interpreter's last flush at exit does not fail again.
    sys.stdout stays the same object; a stream the caller passed is left alone."""
    if out is not sys.__stdout__ or out is None:
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, out.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):    # no real file descriptor behind it
        pass


def _console_main():
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
