#!/usr/bin/env python3
"""starget benchmark: python3 bench/run.py [--quick] [--runs N] [--out bench/RESULTS.md]

Builds (once, cached in $TMPDIR/starget-bench-cache) an eStargz image of the running
Python's standard library, pushes it to a local docker-registry, puts the WAN emulator
in front of it and, for each scenario and network setting, runs side by side:
starget cold (empty cache), starget warm (TOC cache from a previous run), the ideal
client (the minimal bytes in the fewest requests) and a full pull (every blob whole,
then extract). Prints a table of median wall time, requests, connections, bytes,
bytes / minimum and peak RSS; checks the targets; --out writes the Markdown report.
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import clients  # noqa: E402
import sections  # noqa: E402
import image  # noqa: E402
import plan  # noqa: E402
import wanproxy  # noqa: E402

REGISTRY = os.path.join(ROOT, "testdata", "registry")
MiB = 1 << 20
NETS = [("0 ms", 0.0, None), ("25 ms, 100 Mbit/s", 0.025, 100.0)]
CLIENTS = ["starget cold", "starget warm", "ideal", "curl", "full pull"]
SECTIONS = ("get", "startup", "scaling", "minbase", "big")
NOTES_BEGIN, NOTES_END = "<!-- notes:begin -->", "<!-- notes:end -->"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- environment

class Registry(object):
    def __init__(self, workdir):
        self.dir = os.path.join(workdir, "registry")
        out = subprocess.run(["bash", os.path.join(REGISTRY, "run-registry.sh"), "--dir", self.dir,
                              "--background"], stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout
        self.addr = re.search(r"REGISTRY_ADDR=(\S+)", out).group(1)

    def push(self, layout, ref):
        subprocess.run([sys.executable, os.path.join(REGISTRY, "push-oci-layout.py"), layout,
                        "%s/%s" % (self.addr, ref)], stdout=subprocess.DEVNULL, check=True)

    def stop(self):
        subprocess.run(["bash", os.path.join(REGISTRY, "run-registry.sh"), "--stop", self.dir])


def client_env(cache_dir, home, plain_hosts=()):
    """The environment clients run in. `plain_hosts` get `plain_http: true` in a starget
    config file: the bench's registry stands for a remote plain-HTTP mirror behind the
    emulated WAN, so starget must not first try TLS on it, as it does for a loopback
    registry it knows nothing about (that probe costs a round trip the ideal client and
    curl do not pay either)."""
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
           and not k.startswith("STARGET_") and k not in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG")}
    env["STARGET_CACHE_DIR"] = cache_dir
    env["DOCKER_CONFIG"] = os.path.join(home, "docker")          # no credentials
    env["XDG_RUNTIME_DIR"] = os.path.join(home, "run")
    if plain_hosts:
        config = os.path.join(home, "starget-config.yaml")
        with open(config, "w") as f:
            f.write("registries:\n" + "".join('  "%s":\n    plain_http: true\n' % h for h in plain_hosts))
        env["STARGET_CONFIG"] = config
    return env


class Launcher(object):
    """Runs clients from a small helper process (bench/launcher.py) so that their peak RSS
    (ru_maxrss) is their own, not this process's: (wall seconds, peak RSS bytes, exit code)."""

    def __init__(self):
        self.p = subprocess.Popen([sys.executable, os.path.join(HERE, "launcher.py")], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, universal_newlines=True)

    def run(self, argv, env=None, timeout=900, stderr_path=None, stdout_path=None):
        self.p.stdin.write(json.dumps({"argv": argv, "env": env, "stderr": stderr_path, "stdout": stdout_path,
                                       "timeout": timeout}) + "\n")
        self.p.stdin.flush()
        r = json.loads(self.p.stdout.readline())
        return r["wall"], r["maxrss"], r["rc"]

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def tail(path, n=3):
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
        return " | ".join(lines[-n:])
    except OSError:
        return ""


def verify(out, expected, dirs):
    """'ok' or a short description of what is wrong in the output tree."""
    missing = wrong = 0
    for path, (size, digest) in expected.items():
        p = os.path.join(out, path)
        if not os.path.isfile(p) or os.path.getsize(p) != size:
            missing += 1
            continue
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for piece in iter(lambda: f.read(1 << 20), b""):
                h.update(piece)
        if size and "sha256:" + h.hexdigest() != digest:
            wrong += 1
    found = sum(len(files) for _, _, files in os.walk(out))
    problems = []
    if missing:
        problems.append("%d missing/short" % missing)
    if wrong:
        problems.append("%d wrong digest" % wrong)
    if found != len(expected):
        problems.append("%d files written, %d expected" % (found, len(expected)))
    missing_dirs = sum(1 for d in dirs if not os.path.isdir(os.path.join(out, d)))
    if missing_dirs:
        problems.append("%d dirs missing" % missing_dirs)
    return "; ".join(problems) or "ok"


# ---------------------------------------------------------------- image facts

def load_layers(layout):
    meta = image.load_meta(layout)
    layers = []
    for i, info in enumerate(meta["layers"]):
        with open(os.path.join(layout, "blobs", "sha256", info["digest"][7:]), "rb") as f:
            f.seek(info["toc_offset"])
            toc, _ = plan.read_toc(f.read())
        layers.append(plan.Layer(toc, info["toc_offset"], info["size"], i, info["digest"]))
    return meta, layers


def choose_dir(layers):
    """The directory whose regular files add up closest to 1 % of the image's."""
    view = plan.merged(layers)
    sizes, counts = {}, {}
    for path, (i, e) in view.items():
        if e.type != "reg":
            continue
        parts = path.split("/")
        for k in range(1, len(parts)):
            d = "/".join(parts[:k])
            sizes[d] = sizes.get(d, 0) + e.size
            counts[d] = counts.get(d, 0) + 1
    target = 0.01 * sum(e.size for i, e in view.values() if e.type == "reg")
    candidates = [d for d in sizes if not d.endswith("__pycache__")]
    return min(candidates, key=lambda d: (abs(sizes[d] - target), -counts[d], d))


def classify(record, blobs, needed=None):
    path = record["path"]
    if "/manifests/" in path:
        return "manifest"
    m = re.search(r"/blobs/(sha256:[0-9a-f]+)", path)
    if not m:
        return "other " + path
    info = blobs.get(m.group(1))
    if info is None:
        return "config/other blob"
    if record["method"] == "HEAD":
        return "HEAD blob"
    r = record.get("range")
    if not r:
        return "whole blob"
    rm = re.match(r"bytes=(\d*)-(\d*)$", r)
    if not rm:
        return "odd range"
    if not rm.group(1) or not rm.group(2) or int(rm.group(2)) >= info["size"] - 51:
        kind = "tail (footer+TOC)"
    elif int(rm.group(1)) >= info["toc_offset"]:
        kind = "TOC rest"
    else:
        kind = "data"
    if needed is not None and info["index"] not in needed:
        kind += ", layer not needed"
    return kind


def describe_log(log_records, blobs, needed=None, limit=12):
    lines = []
    t0 = log_records[0]["t"] if log_records else 0
    for r in log_records[:limit]:
        m = re.search(r"/blobs/(sha256:[0-9a-f]+)", r["path"])
        where = ("layer %d" % blobs[m.group(1)]["index"]) if m and m.group(1) in blobs else r["path"]
        lines.append("+%.3fs %s %s %s -> %s, %d B, conn %d [%s]" % (
            r["t"] - t0, r["method"], where, r.get("range") or "", r["status"], r["bytes"], r["conn"],
            classify(r, blobs, needed)))
    if len(log_records) > limit:
        kinds = {}
        for r in log_records[limit:]:
            k = classify(r, blobs, needed)
            kinds[k] = kinds.get(k, 0) + 1
        lines.append("... and %d more: %s" % (len(log_records) - limit,
                                              ", ".join("%d %s" % (v, k) for k, v in sorted(kinds.items()))))
    return lines


def first_data_delay(log_records, blobs):
    """Seconds from the first request to the first data range request (None if none)."""
    if not log_records:
        return None
    for r in log_records:
        if classify(r, blobs).startswith("data"):
            return r["t"] - log_records[0]["t"]
    return None


# ---------------------------------------------------------------- the bench

class Bench(object):
    def __init__(self, args, work):
        self.args, self.work = args, work
        self.launcher = Launcher()          # first, while this process is still small
        self.home = os.path.join(work, "home")
        os.makedirs(os.path.join(self.home, "docker"))
        os.makedirs(os.path.join(self.home, "run"), mode=0o700)
        # measure a snapshot: starget.py may be edited while the bench runs
        self.source = os.path.abspath(args.starget)
        os.makedirs(os.path.join(work, "snapshot"))
        self.starget = os.path.join(work, "snapshot", "starget.py")
        shutil.copyfile(self.source, self.starget)
        self.scratch = tempfile.mkdtemp(prefix="starget-bench-out-", dir=args.scratch) if args.scratch else work

    def setup(self):
        self.registry = Registry(self.work)
        self.proxy = wanproxy.WanProxy(self.registry.addr).start()
        self.host = "127.0.0.1:%d" % self.proxy.port
        if "get" in self.args.sections:
            self.setup_img()

    def env(self, cache):
        return client_env(cache, self.home, (self.host, self.registry.addr))

    @staticmethod
    def load_layers(layout):
        return load_layers(layout)

    @staticmethod
    def verify(out, expected, dirs):
        return verify(out, expected, dirs)

    def setup_img(self):
        self.layout = image.cached_layout("img", log)
        self.meta, self.layers = load_layers(self.layout)
        self.blobs = {info["digest"]: dict(info, index=i) for i, info in enumerate(self.meta["layers"])}
        self.dir = choose_dir(self.layers)
        prefix = "usr/lib/" + os.path.basename(image.sysconfig.get_paths()["stdlib"])
        self.scenarios = [("one small file", prefix + "/json/decoder.py"),
                          ("one 20 MB file", image.FILE_20M),
                          ("directory ~1 %", self.dir + "/"),
                          ("everything", ".")]
        self.minimum = {name: plan.minimum(self.layers, pat, self.meta["manifest_size"])
                        for name, pat in self.scenarios}
        self.registry.push(self.layout, "bench/img:latest")

    def teardown(self):
        self.launcher.close()
        if self.scratch != self.work:
            shutil.rmtree(self.scratch, ignore_errors=True)
        if hasattr(self, "proxy"):
            self.proxy.stop()
        if hasattr(self, "registry"):
            self.registry.stop()

    def argv(self, client, pattern, out, image_ref="bench/img:latest", hints=None):
        if client.startswith("starget"):
            return [sys.executable, self.starget, "--no-progress", "get", "%s/%s" % (self.host, image_ref),
                    pattern, out]
        if client == "curl":
            return ["curl", "-K", hints]
        mode = "ideal" if client == "ideal" else "full"
        argv = [sys.executable, os.path.join(HERE, "clients.py"), mode, self.host, image_ref, pattern, out]
        return argv + (["--hints", hints] if hints else [])

    def one(self, client, pattern, cache, hints=None, check=None, image_ref="bench/img:latest"):
        out = os.path.join(self.scratch, "out")
        shutil.rmtree(out, ignore_errors=True)
        if client == "starget cold":
            shutil.rmtree(cache, ignore_errors=True)
            os.makedirs(cache)
        self.proxy.stats.reset()
        errfile = os.path.join(self.work, "stderr.txt")
        wall, rss, rc = self.launcher.run(self.argv(client, pattern, out, image_ref, hints),
                                          self.env(cache), stderr_path=errfile)
        s = self.proxy.stats.snapshot()
        r = {"wall": wall, "rss": rss, "rc": rc, "requests": s["requests"], "connections": s["connections"],
             "bytes": s["bytes"], "log": s["log"]}
        if rc != 0:
            r["error"] = tail(errfile)
        if client == "curl":
            r["check"] = "transfer only" if rc == 0 else "exit %d: %s" % (rc, r.get("error", ""))
        elif check is not None:
            r["check"] = verify(out, *check) if rc == 0 else "exit %d: %s" % (rc, r.get("error", ""))
        shutil.rmtree(out, ignore_errors=True)
        return r

    def write_hints(self, layers, pattern, meta, image_ref="bench/img:latest"):
        """The oracle for the ideal client (hints.json) and the same requests as a curl config."""
        toc_offsets = {b["digest"]: b["toc_offset"] for b in meta["layers"]}
        h = plan.ideal_hints(layers, pattern, toc_offsets)
        hints, curlcfg = os.path.join(self.work, "hints.json"), os.path.join(self.work, "curl.cfg")
        with open(hints, "w") as f:
            json.dump(h, f)
        repo, tag = image_ref.rsplit(":", 1)
        with open(curlcfg, "w") as f:
            f.write(clients.curl_config(self.host, repo, tag, [(b["digest"], b["size"]) for b in meta["layers"]], h))
        return hints, curlcfg

    def scenario(self, net, name, pattern, runs):
        mn = self.minimum[name]
        hints, curlcfg = self.write_hints(self.layers, pattern, self.meta)
        warm_cache = os.path.join(self.work, "cache-warm")
        cold_cache = os.path.join(self.work, "cache-cold")
        shutil.rmtree(warm_cache, ignore_errors=True)
        os.makedirs(warm_cache)
        self.one("starget warm", pattern, warm_cache)            # fills the warm cache, not measured
        results = {c: [] for c in CLIENTS}
        for k in range(runs):
            for c in CLIENTS:
                check = (mn["expected"], mn["dirs"]) if k == 0 else None
                cache = warm_cache if c == "starget warm" else cold_cache
                results[c].append(self.one(c, pattern, cache, {"ideal": hints, "curl": curlcfg}.get(c), check))
            log("  %s / %s: run %d/%d: %s" % (net, name, k + 1, runs, ", ".join(
                "%s %.2fs" % (c, results[c][-1]["wall"]) for c in CLIENTS)))
        rows = {}
        for c in CLIENTS:
            rs = results[c]
            ok = [r for r in rs if r["rc"] == 0]
            base = mn["warm_bytes"] if c == "starget warm" else mn["bytes"]
            med = lambda key, src=ok or rs: statistics.median(r[key] for r in src)   # noqa: E731
            rows[c] = {"wall": med("wall"), "requests": med("requests"), "connections": med("connections"),
                       "bytes": med("bytes"), "ratio": med("bytes") / base, "rss": max(r["rss"] for r in rs),
                       "walls": [round(r["wall"], 3) for r in rs], "failures": len(rs) - len(ok),
                       "check": rs[0].get("check", "?"), "log": rs[0]["log"], "min_bytes": base,
                       "min_requests": mn["warm_requests"] if c == "starget warm" else mn["requests"]}
            if len(ok) < len(rs):
                rows[c]["error"] = next(r.get("error", "") for r in rs if r["rc"] != 0)
        return rows

    def big(self):
        layout = image.cached_layout("big", log)
        meta, layers = load_layers(layout)
        self.registry.push(layout, "bench/big:latest")
        self.proxy.configure(0.0, None)
        mn = plan.minimum(layers, image.FILE_1G, meta["manifest_size"])
        cache = os.path.join(self.work, "cache-big")
        r = self.one("starget cold", image.FILE_1G, cache, check=(mn["expected"], mn["dirs"]),
                     image_ref="bench/big:latest")
        r.update(min_bytes=mn["bytes"], min_requests=mn["requests"], size=image.SIZE_1G,
                 blob=meta["layers"][0]["size"])
        return r

    def run(self):
        a = self.args
        res = {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
               "machine": machine(), "nets": {}, "create_us": file_create_cost(self.scratch),
               "scratch": self.scratch, "starget": starget_version(self.source, self.starget),
               "sections": a.sections}
        if "get" in a.sections:
            res["image"] = self.image_facts()
            nets = NETS[:1] if a.quick else NETS
            for label, rtt, mbit in nets:
                self.proxy.configure(rtt, mbit)
                res["nets"][label] = {}
                for name, pattern in self.scenarios:
                    log("%s / %s (%s)" % (label, name, pattern))
                    res["nets"][label][name] = self.scenario(label, name, pattern, a.runs)
            self.proxy.configure(0.0, None)
        go, go_why = None, "not needed by the sections run"
        if "scaling" in a.sections or "minbase" in a.sections:
            log("Go original: building")
            go, go_why = sections.build_go(tempfile.mkdtemp(prefix="go-", dir=self.work), a.go_src)
            log("Go original: %s" % (go_why if go else "not available: " + go_why))
            res["go"] = {"available": bool(go), "how": go_why}
        if "startup" in a.sections:
            log("startup")
            self.registry.push(sections.synth.scaling_layout(1000, 0, log), "bench/scale-1000-0:latest")
            res["startup"] = sections.startup(self, n=7 if a.quick else 15, ls_ref="bench/scale-1000-0:latest")
        if "scaling" in a.sections:
            sizes = [1000, 10000] if a.quick else [1000, 10000, 100000]
            pcts = [0, 10] if a.quick else [0, 1, 10]
            res["scaling"] = sections.scaling(self, sizes, pcts, 1 if a.quick else min(a.runs, 3), go,
                                              go_sizes=() if a.quick else (60000,))
        if "minbase" in a.sections:
            log("minbase")
            res["minbase"] = sections.minbase(self, 2 if a.quick else a.runs, go, go_why)
        if "big" in a.sections and a.big:
            log("peak RSS: get of a 1 GiB file")
            res["big"] = self.big()
        with open(self.source, "rb") as f1, open(self.starget, "rb") as f2:
            changed = f1.read() != f2.read()
        if changed:
            res["starget"] += " (a snapshot taken at the start: the file changed during the run)"
        return res

    def image_facts(self):
        files = sum(len(l.files) for l in self.layers)
        return {"layers": [{"size": b["size"], "toc_bytes": b["size"] - b["toc_offset"],
                            "entries": b["toc_entries"], "files": len(self.layers[i].files),
                            "file_bytes": sum(e.size for e in self.layers[i].files.values())}
                           for i, b in enumerate(self.meta["layers"])],
                "files": files, "file_bytes": sum(e.size for l in self.layers for e in l.files.values()),
                "blob_bytes": sum(b["size"] for b in self.meta["layers"]),
                "scenarios": [(n, p, {k: v for k, v in self.minimum[n].items() if k not in ("expected", "dirs")})
                              for n, p in self.scenarios]}


def file_create_cost(where, n=2000):
    """Microseconds to create one small file (open O_CREAT, ftruncate, close) in a fresh directory."""
    d = tempfile.mkdtemp(dir=where)
    t0 = time.perf_counter()
    for i in range(n):
        fd = os.open(os.path.join(d, "f%d" % i), os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, 4096)
        os.close(fd)
    cost = (time.perf_counter() - t0) / n * 1e6
    shutil.rmtree(d)
    return cost


def starget_version(path, snapshot=None):
    """sha256 prefix of the starget.py measured, and the git commit it sits on (+ dirty)."""
    with open(snapshot or path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    try:
        root = os.path.dirname(path)
        head = subprocess.run(["git", "-C", root, "log", "-1", "--format=%h %s", "--", os.path.basename(path)],
                              stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, universal_newlines=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", os.path.basename(path)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               universal_newlines=True).stdout.strip()
    except OSError:
        head, dirty = "", ""
    return "starget.py sha256:%s%s" % (digest, " (git %s%s)" % (head, ", uncommitted changes" if dirty else "")
                                       if head else "")


def machine():
    def cmd(argv):
        try:
            return subprocess.run(argv, stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
        except OSError:
            return "?"
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    except OSError:
        pass
    mem = cmd(["free", "-h"]).splitlines()
    reg = cmd(["docker-registry", "--version"])
    return {"nproc": cmd(["nproc"]), "cpu": cpu, "mem": mem[1].split()[1] if len(mem) > 1 else "?",
            "python": platform.python_version(), "kernel": platform.release(),
            "os": cmd(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]), "registry": reg}


# ---------------------------------------------------------------- reporting

def fmt_bytes(n):
    for unit, div in (("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return "%.*f %s" % (2 if n < 10 * div else 1, n / div, unit)
    return "%d B" % n


def table(res):
    out = []
    for label, scen in res["nets"].items():
        out.append("### Network: %s\n" % label)
        out.append("| scenario | client | wall (median) | requests | conns | bytes | bytes / min | peak RSS | output |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---|")
        for name, rows in scen.items():
            for c, r in rows.items():
                fail = " (%d failed)" % r["failures"] if r["failures"] else ""
                out.append("| %s | %s | %.3f s%s | %g | %g | %s | %.3f | %.1f MiB | %s |" % (
                    name, c, r["wall"], fail, r["requests"], r["connections"], fmt_bytes(r["bytes"]), r["ratio"],
                    r["rss"] / MiB, r["check"]))
        out.append("")
    return "\n".join(out)


def verdict(value, limit):
    """'met' or 'missed by X %' for a value that must be <= limit."""
    if value is None:
        return "not measured"
    return "met" if value <= limit else "**missed by %.0f %%**" % (100.0 * (value / limit - 1)) \
        if limit else "**missed**"


def ratio_table(res):
    """Per network and scenario: starget / ideal, starget / curl, full / starget (walls)."""
    out = ["| network | scenario | cold / ideal | warm / ideal | cold / curl | warm / curl | ideal / curl | "
           "full / cold |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, scen in res["nets"].items():
        for name, rows in scen.items():
            w = {c: r["wall"] for c, r in rows.items()}
            out.append("| %s | %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.1f |" % (
                label, name, w["starget cold"] / w["ideal"], w["starget warm"] / w["ideal"],
                w["starget cold"] / w["curl"], w["starget warm"] / w["curl"], w["ideal"] / w["curl"],
                w["full pull"] / w["starget cold"]))
    return "\n".join(out)


def targets(res, image_facts):
    """[(target, measured, verdict)]"""
    t = []
    mins = {n: m for n, p, m in image_facts["scenarios"]}
    for label, scen in res["nets"].items():
        at25 = "25 ms" in label
        d, di = scen["directory ~1 %"]["starget cold"], scen["directory ~1 %"]["ideal"]
        limit = 1.25 if at25 else 1.6
        t.append(("cold get of the ~1 %% directory: wall <= %.2f x ideal, %s" % (limit, label),
                  "%.3f s vs %.3f s = %.2f x (vs curl: %.2f x)" % (
                      d["wall"], di["wall"], d["wall"] / di["wall"], d["wall"] / scen["directory ~1 %"]["curl"]["wall"]),
                  verdict(d["wall"] / di["wall"] if not d["failures"] else None, limit)))
        for name in ("directory ~1 %", "one small file"):
            for c in ("starget cold", "starget warm"):
                r = scen[name][c]
                t.append(("bytes <= 1.05 x minimum: %s, %s, %s" % (name, c, label),
                          "%s / %s = %.3f x" % (fmt_bytes(r["bytes"]), fmt_bytes(r["min_bytes"]), r["ratio"]),
                          verdict(r["ratio"] if not r["failures"] else None, 1.05)))
        m = mins["directory ~1 %"]
        allowed = 1 + 2 * len(m["needed_layers"]) + m["runs"]
        r = scen["directory ~1 %"]["starget cold"]
        t.append(("requests for the cold directory get <= 1 manifest (no index here) + 2 x %d needed layers + %d "
                  "runs = %d, %s" % (len(m["needed_layers"]), m["runs"], allowed, label),
                  "%g requests (ideal %d)" % (r["requests"], r["min_requests"]), verdict(r["requests"], allowed)))
        r, i = scen["one 20 MB file"]["starget cold"], scen["one 20 MB file"]["ideal"]
        if at25:
            t.append(("cold get of the 20 MB file (13 MB compressed) <= 1.05 x ideal, %s" % label,
                      "%.3f s vs %.3f s = %.2f x (vs curl: %.2f x)" % (
                          r["wall"], i["wall"], r["wall"] / i["wall"], r["wall"] / scen["one 20 MB file"]["curl"]["wall"]),
                      verdict(r["wall"] / i["wall"] if not r["failures"] else None, 1.05)))
            dd, f = scen["directory ~1 %"]["starget cold"], scen["directory ~1 %"]["full pull"]
            t.append(("1 %% subset >= 10 x faster than the full pull: %s" % label,
                      "%.3f s vs %.3f s = %.1f x" % (dd["wall"], f["wall"], f["wall"] / dd["wall"]),
                      verdict(10 * dd["wall"] / f["wall"] if not dd["failures"] else None, 1.0)))
        worst = max((r["rss"], n, c) for n, rows in scen.items() for c, r in rows.items() if c.startswith("starget"))
        t.append(("peak RSS <= 64 MiB, all scenarios: %s" % label,
                  "max %.1f MiB (%s, %s)" % (worst[0] / MiB, worst[1], worst[2]), verdict(worst[0], 64 * MiB)))
    return t


def diagnostics(res, blobs):
    out = []
    needed = {n: set(m["needed_layers"]) for n, p, m in res["image"]["scenarios"]}
    for label, scen in res["nets"].items():
        for name, rows in scen.items():
            ideal_delay = first_data_delay(rows["ideal"]["log"], blobs)
            for c in ("starget cold", "starget warm"):
                r = rows[c]
                extra_req = r["requests"] - r["min_requests"]
                extra_bytes = r["bytes"] - r["min_bytes"]
                if r["failures"]:
                    out.append("- %s, %s, %s: %d of the runs failed: %s" % (label, name, c, r["failures"],
                                                                         r.get("error", "")))
                if extra_req <= 0 and r["ratio"] <= 1.05:
                    continue
                delay = first_data_delay(r["log"], blobs)
                out.append("- %s, %s, %s: %g requests (minimum %d), %s (minimum %s, +%s); first data request "
                           "after %s (ideal: %s). First run:" % (
                               label, name, c, r["requests"], r["min_requests"], fmt_bytes(r["bytes"]),
                               fmt_bytes(r["min_bytes"]), fmt_bytes(max(extra_bytes, 0)),
                               "%.3f s" % delay if delay is not None else "-",
                               "%.3f s" % ideal_delay if ideal_delay is not None else "-"))
                out.extend("    - " + l for l in describe_log(r["log"], blobs, needed[name]))
    return "\n".join(out) or "(none: starget made no requests beyond the minimum)"


def report(res, bench):
    m, im = res["machine"], res.get("image")
    lines = ["# starget benchmark results", "",
             "Generated by `python3 bench/run.py%s` on %s, measuring %s." % (
                 " " + " ".join(bench.args.argv_echo) if bench.args.argv_echo else "", res["date"], res["starget"]),
             "Machine: %s CPUs (%s), %s RAM, %s, kernel %s, Python %s, %s. Output written to %s, where creating "
             "one small file costs %.0f µs." % (
                 m["nproc"], m["cpu"], m["mem"], m["os"], m["kernel"], m["python"], m["registry"] or "docker-registry",
                 "%s (--scratch)" % bench.args.scratch if bench.args.scratch else "the temp dir (disk)",
                 res["create_us"]),
             "", "Sections run: %s (`--only`). Wall times include process start; the machine is shared and noisy, "
             "so compare figures of the same run, as ratios." % ", ".join(res["sections"]), ""]
    all_targets = []
    if im:
        get_lines, get_targets = get_report(res, bench)
        lines += get_lines
        all_targets += get_targets
    if "startup" in res:
        text, t = sections.startup_report(res["startup"])
        lines += ["## Start-up", "", "Medians of %d runs each, round robin. \"installed\": what a console-script "
                  "entry point runs (`from starget import main`), the module imported from a dir with its cached "
                  ".pyc (`PYTHONPYCACHEPREFIX`); \"source\": `python3 starget.py`, compiled on every run. `ls` is "
                  "warm (TOC cached) on the 1k-entry scaling image." % res["startup"]["runs"], "", text, ""]
        all_targets += t
    go = res.get("go")
    if go:
        lines += ["Go original: %s." % (go["how"] if go["available"] else "not available (%s)" % go["how"]), ""]
    if "scaling" in res:
        text, t = sections.scaling_report(res["scaling"])
        lines += ["## Scaling: synthetic images (`bench/synth.py`)", "",
                  "A base layer of n tiny files (directories of 40 under usr/share/, plus opt/subset/ with 1 %% of "
                  "the files) and, for whiteouts > 0, an upper layer as an apt-get + rm -rf leaves it (new files; "
                  "whiteouts of files, of whole directories and opaque directories hiding about that share of the "
                  "base's entries); 0 %% is the base alone. 0 ms network; warm = TOC cache from the cold ls; medians "
                  "of %d runs; \"warm get 1 %%\" gets opt/subset/. Go ls (no cache: always cold) on the "
                  "whiteout-free images only, where both list the same." % res["scaling"]["runs"], "", text, ""]
        all_targets += t
    if "minbase" in res:
        text, t = sections.minbase_report(res["minbase"])
        lines += ["## Warm `ls` of a Debian-like minbase image", "", text, ""]
        all_targets += t
    if "big" in res:
        b = res["big"]
        all_targets.append(("peak RSS <= 64 MiB for a 1 GiB file (get, cold, 0 ms)",
                            "%.1f MiB, %.1f s, %s, %d requests, output %s" % (
                                b["rss"] / MiB, b["wall"], fmt_bytes(b["bytes"]), b["requests"], b.get("check")),
                            verdict(b["rss"] if b["rc"] == 0 else None, 64 * MiB)))
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for what, measured, ok in all_targets:
        lines.append("| %s | %s | %s |" % (what, measured, ok))
    if im:
        lines += ["", "## Requests beyond the minimum (starget)", "", diagnostics(res, bench.blobs)]
    lines.append("")
    return "\n".join(lines)


def get_report(res, bench):
    im = res["image"]
    lines = ["## Get: the standard-library image", "",
             "Image: 3 eStargz layers written by `bench/estargz_writer.py` (4 MiB chunks, zlib level 6) over this "
             "Python's standard library (no site-packages, config-*/, test/**/__pycache__) plus a 20 MB file: "
             "%d regular files, %s uncompressed, %s compressed (layers: %s)." % (
                 im["files"], fmt_bytes(im["file_bytes"]), fmt_bytes(im["blob_bytes"]),
                 "; ".join("%s, %d files, TOC+footer %s" % (fmt_bytes(l["size"]), l["files"], fmt_bytes(l["toc_bytes"]))
                           for l in im["layers"])),
             "Registry: Debian docker-registry (distribution) on loopback, behind `bench/wanproxy.py` (one RTT per "
             "request, one more per new connection, shared token bucket on response bodies). starget runs as "
             "`python3 starget.py --no-progress get IMAGE PATH OUT` with default concurrency; wall times are medians "
             "of %d runs and include process start; requests/conns/bytes are medians as counted by the proxy "
             "(response bodies, manifest included); peak RSS is the child's ru_maxrss (max over runs)." % bench.args.runs,
             "",
             "Scenarios and their minimum (see `bench/plan.py`: manifest + TOC member and footer of each layer a "
             "correct client must read + the compressed extents of the selected files, one request per layer TOC and "
             "per contiguous run):", ""]
    lines.append("| scenario | path | files | file bytes | needed layers | minimum bytes | minimum requests | warm minimum |")
    lines.append("|---|---|---:|---:|---|---:|---:|---:|")
    for name, pat, mn in im["scenarios"]:
        lines.append("| %s | `%s` | %d | %s | %s | %s | %d | %s in %d |" % (
            name, pat, mn["files"], fmt_bytes(mn["file_bytes"]), ",".join(map(str, mn["needed_layers"])),
            fmt_bytes(mn["bytes"]), mn["requests"], fmt_bytes(mn["warm_bytes"]), mn["warm_requests"]))
    lines += ["", "bytes / min: starget warm is compared with the warm minimum (no TOC), every other client with "
              "the cold minimum. \"ideal\" is `bench/clients.py ideal` (told the TOC offsets and needed layers); "
              "\"full pull\" is `bench/clients.py full` (3 blobs in parallel, then tarfile extraction of the path).",
              "\"curl\" is one `curl -K FILE` process with the ideal's requests (same ranges, one connection, "
              "bodies to /dev/null: the transfer alone, no inflate, no check, no write).",
              "", "### Results", "", table(res), "### Ratios of wall times (same run)", "", ratio_table(res), "",
              ]
    return lines, targets(res, im)


def write_report(path, text):
    notes = "%s\n## Notes\n\n(analysis of missed targets goes here)\n%s\n" % (NOTES_BEGIN, NOTES_END)
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if NOTES_BEGIN in old and NOTES_END in old:
            notes = old[old.index(NOTES_BEGIN):old.index(NOTES_END) + len(NOTES_END)] + "\n"
    with open(path, "w") as f:
        f.write(text + "\n" + notes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 runs, 0 ms only, no 1 GiB file")
    ap.add_argument("--runs", type=int, help="runs per client and scenario (default 5; --quick: 2)")
    ap.add_argument("--out", help="write the Markdown report here (e.g. bench/RESULTS.md)")
    ap.add_argument("--json", help="also dump the raw results here")
    ap.add_argument("--big", dest="big", action="store_true", default=None,
                    help="peak RSS check with a 1 GiB file (default: on unless --quick)")
    ap.add_argument("--no-big", dest="big", action="store_false")
    ap.add_argument("--starget", default=os.path.join(ROOT, "starget.py"))
    ap.add_argument("--scratch", help="where clients write their output (default: the work dir in $TMPDIR); "
                    "e.g. /dev/shm to take the disk out of the measurement")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--only", help="comma-separated sections: %s (default: all)" % ",".join(SECTIONS))
    ap.add_argument("--go-src", help="source of flaneur2020/stargzget (a tree or a bare git dir) for the Go "
                    "comparison; default $STARGET_BENCH_GO_SRC, else a mirror beside the repo")
    a = ap.parse_args()
    a.argv_echo, skip = [], False
    for arg in sys.argv[1:]:                      # the command line as the report shows it, minus --json
        if skip or arg == "--json" or arg.startswith("--json="):
            skip = arg == "--json"
            continue
        a.argv_echo.append(arg)
    if a.runs is None:
        a.runs = 2 if a.quick else 5
    if a.big is None:
        a.big = not a.quick
    a.sections = [x.strip() for x in a.only.split(",")] if a.only else list(SECTIONS)
    for x in a.sections:
        if x not in SECTIONS:
            ap.error("unknown section %r (choose from %s)" % (x, ", ".join(SECTIONS)))
    if not os.path.exists(a.starget):
        ap.error("no starget at %s" % a.starget)
    work = tempfile.mkdtemp(prefix="starget-bench-")
    bench = Bench(a, work)
    try:
        bench.setup()
        if "get" in a.sections:
            log("image: %s; proxy %s -> registry %s; directory scenario: %s" % (
                bench.layout, bench.host, bench.registry.addr, bench.dir))
        res = bench.run()
    finally:
        bench.teardown()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = report(res, bench)
    print(text)
    if a.out:
        write_report(a.out, text)
        log("wrote " + a.out)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
