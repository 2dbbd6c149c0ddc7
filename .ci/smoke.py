#!/usr/bin/env python3
"""End-to-end smoke test of the starget command line under every Python 3.

    python3 .ci/smoke.py [--keep] [PYTHON ...]

Starts a real registry on loopback (testdata/registry/run-registry.sh), pushes
the fixture images basic, layers, minchunk, legacy, plain-gzip and zstd
(testdata/registry/push-oci-layout.py),
then, for each interpreter, runs starget.py (the file itself, as a user would)
and compares what it reports and writes with testdata/fixtures/EXPECTED.json:

  INTERP starget.py --help                          exits 0, prints usage
  INTERP starget.py --no-progress ls --json IMAGE   entries = EXPECTED files
  INTERP starget.py --no-progress get IMAGE . OUT   files on disk = EXPECTED
  INTERP starget.py --no-progress cat IMAGE FILE    bytes = EXPECTED sha256
  error cases (plain gzip layer, zstd layer, unknown tag, unknown path):
  the documented exit code and one "starget: error: " line on stderr

Interpreters: the arguments, else $STARGET_SMOKE_PYTHONS (space-separated),
else every ~/.pyenv/versions/3.*/bin/python3, else this python3.
Prints one line per interpreter and closes with "N passed, M failed"; exits
non-zero if any interpreter failed. The registry is stopped at exit.
This driver runs under the system python3; only starget.py runs under each
interpreter.
"""
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARGET = os.path.join(ROOT, "starget.py")
FIXTURES = os.path.join(ROOT, "testdata", "fixtures")
RUN_REGISTRY = os.path.join(ROOT, "testdata", "registry", "run-registry.sh")
PUSH = os.path.join(ROOT, "testdata", "registry", "push-oci-layout.py")
IMAGES = ("basic", "layers", "minchunk", "legacy")  # compared with EXPECTED.json
ERROR_IMAGES = ("plain-gzip", "zstd")              # pushed for the error checks
CAT_FILES = {"basic": "etc/os-release", "layers": "etc/config.txt"}
CMD_TIMEOUT = 300                   # seconds for one starget run
MAX_DETAILS = 40                    # detail lines shown per check

LS_KEYS = ("path", "type", "mode", "size", "digest", "link", "layer", "blob",
           "uid", "gid", "mtime")


class Failed(Exception):
    """A check failed; args[0] is a list of detail lines."""


def version_key(path):
    m = re.search(r"/(\d+)\.(\d+)\.(\d+)[^/]*/bin/", path)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


def find_interpreters(argv):
    if argv:
        return argv
    env = os.environ.get("STARGET_SMOKE_PYTHONS", "").split()
    if env:
        return env
    found = []
    for d in glob.glob(os.path.expanduser("~/.pyenv/versions/3.*")):
        for name in ("python3", "python"):
            p = os.path.join(d, "bin", name)
            if os.access(p, os.X_OK):
                found.append(p)
                break
    if found:
        return sorted(found, key=version_key)
    print("smoke: no ~/.pyenv/versions/3.* found; using %s only" % sys.executable)
    return [sys.executable]


def run(cmd, env=None, timeout=CMD_TIMEOUT):
    """Run cmd with no stdin; return (exit code, stdout bytes, stderr text)."""
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        return -1, e.stdout or b"", "timed out after %ss\n%s" % (
            timeout, (e.stderr or b"").decode("utf-8", "replace"))
    except OSError as e:
        return 127, b"", "cannot run %s: %s" % (cmd[0], e)
    return p.returncode, p.stdout, p.stderr.decode("utf-8", "replace")


def tail(text, n=25):
    lines = text.rstrip("\n").splitlines()
    return ["  | " + line for line in lines[-n:]]


def run_ok(cmd, env, what):
    rc, out, err = run(cmd, env)
    if rc != 0:
        raise Failed(["%s exited %s: %s" % (what, rc, " ".join(cmd[1:]))] + tail(err))
    return out, err


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- registry ---------------------------------------------------------------

def start_registry(regdir):
    rc, out, err = run(["bash", RUN_REGISTRY, "--dir", regdir, "--background"], timeout=120)
    if rc != 0:
        raise Failed(["run-registry.sh exited %s" % rc] + tail(err))
    info = dict(line.split("=", 1) for line in out.decode().splitlines() if "=" in line)
    if "REGISTRY_ADDR" not in info:
        raise Failed(["run-registry.sh printed no REGISTRY_ADDR"] + tail(out.decode()))
    return info["REGISTRY_ADDR"]


def stop_registry(regdir):
    if os.path.exists(os.path.join(regdir, "registry.pid")):
        run(["bash", RUN_REGISTRY, "--stop", regdir], timeout=60)


def push_images(addr):
    images = {}
    for name in IMAGES + ERROR_IMAGES:
        target = "%s/smoke/%s:latest" % (addr, name)
        rc, out, err = run([sys.executable, PUSH, os.path.join(FIXTURES, name), target, "-q"],
                           timeout=300)
        if rc != 0:
            raise Failed(["push of %s failed (exit %s)" % (name, rc)] + tail(err))
        images[name] = target
    return images


# --- checks -----------------------------------------------------------------

def expected_files(name):
    with open(os.path.join(FIXTURES, "EXPECTED.json")) as f:
        doc = json.load(f)
    ref = doc["fixtures"][name]["refs"]["latest"]
    blobs = [layer["digest"] for layer in ref["layers"]]
    return {p: e for p, e in ref["files"].items() if p != ""}, blobs


def check_help(interp, env):
    out, _ = run_ok([interp, STARGET, "--help"], env, "--help")
    text = out.decode("utf-8", "replace")
    if "usage" not in text.lower():
        raise Failed(["--help printed no usage:"] + tail(text, 5))
    for cmd in ("info", "ls", "get", "cat"):
        if cmd not in text:
            raise Failed(["--help does not mention the %r command" % cmd])


def check_ls(interp, env, image, name):
    exp, blobs = expected_files(name)
    out, _ = run_ok([interp, STARGET, "--no-progress", "ls", "--json", image], env, "ls --json")
    try:
        got = json.loads(out.decode("utf-8"))
    except ValueError as e:
        raise Failed(["ls --json output is not JSON: %s" % e] + tail(out.decode("utf-8", "replace"), 5))
    if not isinstance(got, list):
        raise Failed(["ls --json printed a %s, not an array" % type(got).__name__])
    bad = []
    paths = [e.get("path") for e in got if isinstance(e, dict)]
    if len(paths) != len(got):
        bad.append("ls --json: some array items are not objects")
    if paths != sorted(paths):
        bad.append("ls --json: entries not sorted by path")
    if len(set(paths)) != len(paths):
        bad.append("ls --json: duplicate paths")
    missing = sorted(set(exp) - set(paths))
    extra = sorted(set(paths) - set(exp))
    if missing:
        bad.append("ls --json: missing %d: %s" % (len(missing), ", ".join(missing[:8])))
    if extra:
        bad.append("ls --json: unexpected %d: %s" % (len(extra), ", ".join(map(repr, extra[:8]))))
    for e in got:
        if not isinstance(e, dict) or e.get("path") not in exp:
            continue
        x = exp[e["path"]]
        p = e["path"]
        keys = [k for k in LS_KEYS if k not in e]
        if keys:
            bad.append("%s: keys missing: %s" % (p, ", ".join(keys)))
            continue
        want = {
            "type": x["type"],
            "mode": x["mode"],
            "size": x.get("size", 0) if x["type"] in ("reg", "hardlink") else 0,
            "link": x.get("link") if x["type"] in ("symlink", "hardlink") else None,
            "layer": x["layer"],
            "blob": blobs[x["layer"]],
            "uid": x["uid"],
            "gid": x["gid"],
            "mtime": x["mtime"],
        }
        for k, v in sorted(want.items()):
            if e[k] != v:
                bad.append("%s: %s is %r, expected %r" % (p, k, e[k], v))
        if x["type"] in ("reg", "hardlink"):
            digest = "sha256:" + x["sha256"]
            # an empty file may carry no digest in the TOC
            if e["digest"] != digest and not (x.get("size", 0) == 0 and e["digest"] is None):
                bad.append("%s: digest is %r, expected %r" % (p, e["digest"], digest))
        elif e["digest"] is not None:
            bad.append("%s: digest is %r, expected null" % (p, e["digest"]))
    if bad:
        raise Failed(bad)
    return len(got)


def check_get(interp, env, image, name, out_dir):
    exp, _ = expected_files(name)
    os.makedirs(out_dir)
    run_ok([interp, STARGET, "--no-progress", "get", image, ".", out_dir], env, "get")
    got = {}
    for dirpath, dirnames, filenames in os.walk(out_dir):
        for n in dirnames + filenames:
            full = os.path.join(dirpath, n)
            got[os.path.relpath(full, out_dir).replace(os.sep, "/")] = full
    bad = []
    extra = sorted(set(got) - set(exp))
    if extra:
        bad.append("get: unexpected %d: %s" % (len(extra), ", ".join(extra[:8])))
    written = skipped = 0
    missing = []
    for p in sorted(exp):
        x = exp[p]
        t = x["type"]
        full = got.get(p)
        if full is None:
            if t in ("char", "block", "fifo"):
                skipped += 1        # the contract does not promise device nodes
            else:
                missing.append(p)
            continue
        written += 1
        st = os.lstat(full)
        mode = stat.S_IMODE(st.st_mode)
        if t == "dir":
            if not stat.S_ISDIR(st.st_mode):
                bad.append("get: %s is not a directory" % p)
            elif mode != x["mode"]:
                bad.append("get: %s mode %04o, expected %04o" % (p, mode, x["mode"]))
        elif t == "symlink":
            if not stat.S_ISLNK(st.st_mode):
                bad.append("get: %s is not a symlink" % p)
            elif os.readlink(full) != x["link"]:
                bad.append("get: %s -> %r, expected %r" % (p, os.readlink(full), x["link"]))
        elif t in ("reg", "hardlink"):
            if not stat.S_ISREG(st.st_mode):
                bad.append("get: %s is not a regular file" % p)
                continue
            if st.st_size != x["size"]:
                bad.append("get: %s size %d, expected %d" % (p, st.st_size, x["size"]))
            elif sha256_file(full) != x["sha256"]:
                bad.append("get: %s sha256 differs" % p)
            if mode != x["mode"]:
                bad.append("get: %s mode %04o, expected %04o" % (p, mode, x["mode"]))
        else:  # char, block, fifo
            want = {"char": stat.S_ISCHR, "block": stat.S_ISBLK, "fifo": stat.S_ISFIFO}[t]
            if not want(st.st_mode):
                bad.append("get: %s is not a %s" % (p, t))
            elif t != "fifo" and (os.major(st.st_rdev), os.minor(st.st_rdev)) != (
                    x.get("dev_major", 0), x.get("dev_minor", 0)):
                bad.append("get: %s device %d,%d, expected %d,%d" % (
                    p, os.major(st.st_rdev), os.minor(st.st_rdev),
                    x.get("dev_major", 0), x.get("dev_minor", 0)))
    if missing:
        bad.insert(0, "get: %d not written: %s" % (len(missing), ", ".join(missing[:8])))
    if bad:
        raise Failed(bad)
    return written, skipped


def check_errors(interp, env, images):
    """Error paths: documented exit code, one 'starget: error: ' line on stderr."""
    base = images["basic"].rsplit(":", 1)[0]
    cases = [
        (["ls", images["plain-gzip"]], 6, "plain gzip layer"),
        (["ls", images["zstd"]], 7, "zstd layer"),
        (["ls", base + ":no-such-tag"], 3, "unknown tag"),
        (["cat", images["basic"], "no/such/file"], 3, "unknown path"),
    ]
    bad = []
    for args, want, what in cases:
        rc, out, err = run([interp, STARGET, "--no-progress"] + args, env)
        lines = [line for line in err.splitlines() if line.strip()]
        if rc != want:
            bad.append("%s: exit %s, expected %s: %s" % (what, rc, want, " ".join(args)))
            bad.extend(tail(err, 15))
        elif len(lines) != 1 or not lines[0].startswith("starget: error: "):
            bad.append("%s: stderr is not one 'starget: error: ' line:" % what)
            bad.extend(tail(err, 15))
    if bad:
        raise Failed(bad)


def check_cat(interp, env, image, name):
    exp, _ = expected_files(name)
    path = CAT_FILES[name]
    out, _ = run_ok([interp, STARGET, "--no-progress", "cat", image, path], env, "cat")
    if hashlib.sha256(out).hexdigest() != exp[path]["sha256"]:
        raise Failed(["cat %s: %d bytes, sha256 differs from EXPECTED" % (path, len(out))])


UNICODE_FILE = "docs/\u00fcn\u00efc\u00f8d\u00e9-\u540d\u524d.txt"   # in the basic image


def check_c_locale(interp, env, image, out_dir):
    """Python 3.6 in the C locale (cron, env -i, minimal containers): names that are
    not ASCII come out byte-exact from ls, cat and get."""
    exp, _ = expected_files("basic")
    out, _ = run_ok([interp, STARGET, "--no-progress", "ls", image], env, "ls (C locale)")
    want = sorted(p for p in exp if p)
    got = out.decode("utf-8").splitlines()
    if got != want:
        raise Failed(["ls in the C locale: %d lines, want %d; missing %s" % (
            len(got), len(want), sorted(set(want) - set(got))[:5])])
    out, _ = run_ok([interp, STARGET, "--no-progress", "cat", image, UNICODE_FILE], env,
                    "cat (C locale)")
    if hashlib.sha256(out).hexdigest() != exp[UNICODE_FILE]["sha256"]:
        raise Failed(["cat %s in the C locale: sha256 differs" % UNICODE_FILE])
    run_ok([interp, STARGET, "--no-progress", "get", image, "docs/", out_dir], env, "get (C locale)")
    local = os.path.join(out_dir.encode(), UNICODE_FILE.encode("utf-8"))
    if sha256_file(local) != exp[UNICODE_FILE]["sha256"]:
        raise Failed(["get docs/ in the C locale: %s differs or is missing" % UNICODE_FILE])


def smoke_one(interp, images, work):
    rc, out, err = run([interp, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                       timeout=60)
    version = out.decode().strip() if rc == 0 else interp
    if rc != 0:
        return version, False, ["cannot run %s" % interp] + tail(err)
    env = dict(os.environ)
    for k in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"):
        env.pop(k, None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env["STARGET_CACHE_DIR"] = os.path.join(work, "cache-" + version)  # cold cache each time

    parts, details, ok = [], [], True
    files = skipped = 0
    checks = [("help", lambda: check_help(interp, env))]
    checks.append(("ls", lambda: [check_ls(interp, env, images[n], n) for n in IMAGES]))

    def do_get():
        nonlocal files, skipped
        for n in IMAGES:
            w, s = check_get(interp, env, images[n], n, os.path.join(work, "out-%s-%s" % (version, n)))
            files += w
            skipped += s
    checks.append(("get", do_get))
    checks.append(("cat", lambda: [check_cat(interp, env, images[n], n) for n in CAT_FILES]))
    checks.append(("errors", lambda: check_errors(interp, env, images)))
    if version.startswith("3.6."):
        c_env = {k: v for k, v in env.items() if not k.startswith("LC_") and k not in ("LANG", "PYTHONIOENCODING")}
        c_env["LC_ALL"] = "C"
        checks.append(("C locale", lambda: check_c_locale(interp, c_env, images["basic"],
                                                          os.path.join(work, "out-c-locale"))))

    for label, fn in checks:
        try:
            fn()
        except Failed as e:
            ok = False
            lines = e.args[0]
            parts.append(label + " FAILED")
            details.append("  %s:" % label)
            details.extend("    " + line for line in lines[:MAX_DETAILS])
            if len(lines) > MAX_DETAILS:
                details.append("    ... %d more" % (len(lines) - MAX_DETAILS))
        except Exception as e:  # noqa: BLE001 - a bug in the driver or the environment
            ok = False
            parts.append(label + " ERROR")
            details.append("  %s: %s: %s" % (label, type(e).__name__, e))
        else:
            if label == "get":
                note = "%d files" % files
                if skipped:
                    note += ", %d device/fifo not created" % skipped
                parts.append("get ok (%s)" % note)
            else:
                parts.append(label + " ok")
    return version, ok, [", ".join(parts)] + details


def main(argv):
    keep = "--keep" in argv
    argv = [a for a in argv if a != "--keep"]
    interps = find_interpreters(argv)

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)

    work = tempfile.mkdtemp(prefix="starget-smoke-")
    regdir = os.path.join(work, "registry")
    passed = failed = 0
    try:
        try:
            if not os.path.exists(STARGET):
                raise Failed(["%s does not exist" % STARGET])
            addr = start_registry(regdir)
            print("smoke: registry at %s" % addr)
            images = push_images(addr)
            print("smoke: pushed %s to %s/smoke/" % (", ".join(sorted(images)), addr))
        except Failed as e:
            print("smoke: setup failed:")
            for line in e.args[0]:
                print("  " + line)
            print("0 passed, %d failed" % len(interps))
            return 1
        sys.stdout.flush()
        for interp in interps:
            version, ok, lines = smoke_one(interp, images, work)
            print("%s: %s" % (version, lines[0]))
            for line in lines[1:]:
                print(line)
            sys.stdout.flush()
            if ok:
                passed += 1
            else:
                failed += 1
    except KeyboardInterrupt:
        print("smoke: interrupted")
        return 130
    finally:
        stop_registry(regdir)
        if keep:
            print("smoke: kept %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("%d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
