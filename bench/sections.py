"""The start-up, scaling and minbase sections of bench/run.py, and the Go original (stdlib only).

Each section takes the running run.Bench (registry, proxy, launcher, work dir) and returns
a dict of results; the *_report functions turn them into Markdown tables and target lines.
"""
import glob
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import image  # noqa: E402
import plan  # noqa: E402
import synth  # noqa: E402

MiB = 1 << 20


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def verdict(value, limit):
    """'met' or 'missed by X %' for a value that must be <= limit."""
    if value is None:
        return "not measured"
    return "met" if value <= limit else "**missed by %.0f %%**" % (100.0 * (value / limit - 1))


def med(xs):
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------- the Go original

GO_CANDIDATES = [os.path.join(ROOT, "..", ".mirror", "flaneur2020+stargzget", "repo")]   # a local mirror, if any


def build_go(work, src=None):
    """(binary, how) or (None, why not): builds flaneur2020/stargzget's cmd/starget in a temp
    dir under `work` (never in the repo): module mode first (a module cache or proxy), then
    GOPATH mode over Debian's Go library packages (/usr/share/gocode: golang-github-spf13-
    cobra-dev, golang-github-opencontainers-go-digest-dev, golang-github-schollz-progressbar-dev)."""
    src = src or os.environ.get("STARGET_BENCH_GO_SRC") or next(
        (c for c in GO_CANDIDATES if os.path.exists(c)), None)
    if not src or not os.path.exists(src):
        return None, "no source of flaneur2020/stargzget here (give --go-src DIR or a bare git dir)"
    go = shutil.which("go")
    if not go:
        return None, "no `go` (apt-get install golang-go)"
    gopath = os.path.join(work, "gopath")
    tree = os.path.join(gopath, "src", "github.com", "flaneur2020", "stargz-get")
    os.makedirs(tree)
    if os.path.isdir(os.path.join(src, "objects")) or os.path.isdir(os.path.join(src, ".git")):
        gitdir = src if os.path.isdir(os.path.join(src, "objects")) else os.path.join(src, ".git")
        arch = subprocess.run(["git", "--git-dir", gitdir, "archive", "HEAD", "cmd", "go.mod", "go.sum", "stargzget"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if arch.returncode != 0:
            return None, "git archive of %s failed: %s" % (src, arch.stderr.decode(errors="replace").strip()[:200])
        subprocess.run(["tar", "-x", "-C", tree], input=arch.stdout, check=True)
        rev = subprocess.run(["git", "--git-dir", gitdir, "log", "-1", "--format=%h"], stdout=subprocess.PIPE,
                             universal_newlines=True).stdout.strip()
    else:
        shutil.rmtree(tree)
        shutil.copytree(src, tree, ignore=shutil.ignore_patterns("testdata", ".git"))
        rev = "working tree"
    out = os.path.join(work, "stargzget-go")
    env = dict(os.environ, GOCACHE=os.path.join(work, "gocache"), GOFLAGS="", HOME=work)
    errors = []
    attempts = [("module mode", dict(env, GOPATH=os.path.join(work, "gomod")))]
    if os.path.isdir("/usr/share/gocode/src"):
        attempts.append(("GOPATH mode over Debian's Go packages",
                         dict(env, GO111MODULE="off", GOPATH=gopath + ":/usr/share/gocode/src/..")))
    for how, e in attempts:
        p = subprocess.run([go, "build", "-o", out, "./cmd/starget"], cwd=tree, env=e, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, universal_newlines=True, timeout=600)
        if p.returncode == 0:
            ver = subprocess.run([go, "version"], stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
            return out, "flaneur2020/stargzget %s, built with %s (%s)" % (rev, ver.replace("go version ", ""), how)
        errors.append("%s: %s" % (how, " | ".join(p.stdout.strip().splitlines()[-1:])[:160]))
    return None, "build failed: " + "; ".join(errors)


# ---------------------------------------------------------------- shared

def run_client(bench, argv, cache=None, cold=False, stdout=None):
    """One timed run through the proxy: wall, rss, rc, requests, blob requests by kind."""
    if cold and cache:
        shutil.rmtree(cache, ignore_errors=True)
    if cache:
        os.makedirs(cache, exist_ok=True)
    bench.proxy.stats.reset()
    err = os.path.join(bench.work, "stderr.txt")
    env = bench.env(cache or os.path.join(bench.work, "cache-none"))
    wall, rss, rc = bench.launcher.run(argv, env, stderr_path=err, stdout_path=stdout)
    s = bench.proxy.stats.snapshot()
    kinds = {}
    for r in s["log"]:
        k = "manifest" if "/manifests/" in r["path"] else "blob " + ("data" if r.get("range") else "whole") \
            if "/blobs/" in r["path"] else "other"
        kinds[k] = kinds.get(k, 0) + 1
    res = {"wall": wall, "rss": rss, "rc": rc, "requests": s["requests"], "bytes": s["bytes"], "log": s["log"],
           "kinds": kinds}
    if rc:
        with open(err, "rb") as f:
            res["error"] = f.read().decode(errors="replace").strip().splitlines()[-1:]
    return res


def data_only(bench, r, layers_meta):
    """Blob requests that are not file data (range ending before the TOC): for a warm get."""
    bad = 0
    offs = {b["digest"]: b["toc_offset"] for b in layers_meta}
    for rec in r["log"]:
        if "/blobs/" not in rec["path"]:
            continue
        d = rec["path"].rsplit("/", 1)[-1]
        rng = rec.get("range") or ""
        try:
            end = int(rng.split("=")[1].split("-")[1])
        except (IndexError, ValueError):
            bad += 1
            continue
        if d not in offs or end >= offs[d]:
            bad += 1
    return bad


def ls_check(path, expected):
    with open(path) as f:
        got = set(l.rstrip("\n") for l in f)
    if got == expected:
        return "ok"
    return "%d lines, %d expected (%d missing, %d extra)" % (len(got), len(expected), len(expected - got),
                                                             len(got - expected))


# ---------------------------------------------------------------- start-up

def startup(bench, n=15, ls_ref=None):
    """Medians of `python3 -c pass`, `python3 -c "import http.client, json, zlib, hashlib"`,
    `starget --help` and a warm `starget ls` (small image), from the source file and installed
    (an entry-point wrapper importing the module from a dir with its cached .pyc)."""
    py, st = sys.executable, bench.starget
    env = bench.env(os.path.join(bench.work, "cache-startup"))
    inst = dict(env, PYTHONPATH=os.path.dirname(st), PYTHONPYCACHEPREFIX=os.path.join(bench.work, "pycache"))
    entry = "import sys; from starget import main; sys.exit(main())"       # what a console script runs
    prime = {k: v for k, v in inst.items() if k != "PYTHONDONTWRITEBYTECODE"}
    bench.launcher.run([py, "-c", entry, "--help"], prime)                   # writes the .pyc
    variants = [("python3 -c pass", [py, "-c", "pass"], env),
                ("python3 -S -c pass (no site hooks)", [py, "-S", "-c", "pass"], env),
                ("python3 -c \"import http.client, json, zlib, hashlib\"",
                 [py, "-c", "import http.client, json, zlib, hashlib"], env),
                ("starget --help, source (python3 starget.py)", [py, st, "--help"], env),
                ("starget --help, installed (cached .pyc)", [py, "-c", entry, "--help"], inst)]
    if ls_ref:
        img = "%s/%s" % (bench.host, ls_ref)
        bench.launcher.run([py, st, "--no-progress", "ls", img], env)         # fills the TOC cache
        variants += [("starget ls (warm, 1k entries), source", [py, st, "--no-progress", "ls", img], env),
                     ("starget ls (warm, 1k entries), installed", [py, "-c", entry, "--no-progress", "ls", img],
                      inst)]
    walls = {name: [] for name, _, _ in variants}
    for _ in range(n):                       # round robin, so that noise hits all alike
        for name, argv, e in variants:
            wall, _, rc = bench.launcher.run(argv, e)
            if rc == 0:
                walls[name].append(wall)
    return {"order": [v[0] for v in variants], "median": {k: med(v) for k, v in walls.items()}, "runs": n}


def startup_report(s):
    m = s["median"]
    base, imp = m["python3 -c pass"], m["python3 -c \"import http.client, json, zlib, hashlib\""]
    lines = ["| command | median | minus `python3 -c pass` | / `python3 -c pass` | / the imports line |",
             "|---|---:|---:|---:|---:|"]
    for name in s["order"]:
        t = m[name]
        lines.append("| %s | %s | %s | %s | %s |" % (
            name, "%.1f ms" % (t * 1000) if t else "failed", "%+.1f ms" % ((t - base) * 1000) if t else "",
            "%.2f" % (t / base) if t else "", "%.2f" % (t / imp) if t else ""))
    h = m["starget --help, source (python3 starget.py)"]
    targets = [("`python3 starget.py --help` under 80 ms", "%.1f ms" % (h * 1000) if h else "failed",
                verdict(h, 0.080))]
    return "\n".join(lines), targets


# ---------------------------------------------------------------- scaling

def scaling(bench, sizes, pcts, runs, go=None, go_sizes=()):
    py, st = sys.executable, bench.starget
    images = [(n, p) for n in sizes for p in pcts] + [(n, 0) for n in go_sizes if n not in sizes]
    help_walls = [bench.launcher.run([py, st, "--help"], bench.env(os.path.join(bench.work, "c")))[0]
                  for _ in range(5)]
    rows = []
    for n, pct in images:
        layout = synth.scaling_layout(n, pct, log)
        meta, layers = bench.load_layers(layout)
        ref = "bench/scale-%d-%d:latest" % (n, pct)
        bench.registry.push(layout, ref)
        img = "%s/%s" % (bench.host, ref)
        expected = set(k for k in plan.merged(layers) if k)
        subset = meta["subset"]
        mn = plan.minimum(layers, subset, meta["manifest_size"])
        cache = os.path.join(bench.work, "cache-scale")
        listing = os.path.join(bench.work, "ls.txt")
        log("scaling: %d entries, %d %% whiteouts: cold ls" % (n, pct))
        cold = run_client(bench, [py, st, "--no-progress", "ls", img], cache, cold=True, stdout=listing)
        check = ls_check(listing, expected) if cold["rc"] == 0 else "exit %d %s" % (cold["rc"], cold.get("error"))
        warm_ls, warm_get = [], []
        for k in range(runs):
            warm_ls.append(run_client(bench, [py, st, "--no-progress", "ls", img], cache))
            out = os.path.join(bench.scratch, "out")
            shutil.rmtree(out, ignore_errors=True)
            g = run_client(bench, [py, st, "--no-progress", "get", img, subset, out], cache)
            if k == 0:
                g["check"] = bench.verify(out, mn["expected"], mn["dirs"]) if g["rc"] == 0 else "exit %d" % g["rc"]
            shutil.rmtree(out, ignore_errors=True)
            warm_get.append(g)
        go_walls = []
        if go and (n in go_sizes or pct == 0):
            for k in range(runs):
                r = run_client(bench, [go, "ls", img])
                if r["rc"] == 0:
                    go_walls.append(r["wall"])
        okl = [r for r in warm_ls if r["rc"] == 0]
        okg = [r for r in warm_get if r["rc"] == 0]
        rows.append({
            "n": n, "pct": pct, "entries": sum(l["toc_entries"] for l in meta["layers"]), "visible": len(expected),
            "blob_bytes": sum(l["size"] for l in meta["layers"]), "subset_files": mn["files"],
            "cold_ls": cold["wall"] if cold["rc"] == 0 else None, "cold_rss": cold["rss"], "ls_check": check,
            "warm_ls": med([r["wall"] for r in okl]), "warm_ls_rss": max([r["rss"] for r in warm_ls] or [0]),
            "warm_ls_blob_requests": max([r["kinds"].get("blob data", 0) + r["kinds"].get("blob whole", 0)
                                          for r in warm_ls] or [0]),
            "warm_get": med([r["wall"] for r in okg]), "get_check": warm_get[0].get("check") if warm_get else "-",
            "warm_get_requests": med([r["requests"] for r in okg]), "warm_get_min_requests": mn["warm_requests"],
            "warm_get_non_data": max([data_only(bench, r, meta["layers"]) for r in warm_get] or [0]),
            "go_ls": med(go_walls), "failures": len(warm_ls) - len(okl) + len(warm_get) - len(okg)})
        log("  cold ls %.2fs, warm ls %s, warm get %s, go ls %s" % (
            cold["wall"], rows[-1]["warm_ls"], rows[-1]["warm_get"], rows[-1]["go_ls"]))
    return {"rows": rows, "help": med(help_walls), "runs": runs}


def _f(t):
    return "%.3f s" % t if t is not None else "-"


def scaling_report(s):
    rows, hlp = s["rows"], s["help"]
    lines = ["| entries | whiteouts | TOC entries (all layers) | visible paths | blobs | cold ls | cold ls RSS | "
             "warm ls | warm ls RSS | warm get 1 % | ls output | get output | blob req. warm ls | "
             "warm get requests (min) | non-data blob req. warm get | Go ls |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append("| %d | %d %% | %d | %d | %s | %s | %.1f MiB | %s | %.1f MiB | %s | %s | %s | %d | %s (%d) | %d | %s |" % (
            r["n"], r["pct"], r["entries"], r["visible"], "%.1f MB" % (r["blob_bytes"] / 1e6), _f(r["cold_ls"]),
            r["cold_rss"] / MiB, _f(r["warm_ls"]), r["warm_ls_rss"] / MiB, _f(r["warm_get"]), r["ls_check"],
            r["get_check"], r["warm_ls_blob_requests"],
            "%g" % r["warm_get_requests"] if r["warm_get_requests"] is not None else "-",
            r["warm_get_min_requests"], r["warm_get_non_data"], _f(r["go_ls"])))
    lines.append("")
    lines.append("`python3 starget.py --help` (the fixed start-up cost) in this section: %s. "
                 "Growth: t(100k) / t(10k), raw and above that start-up, against n log n (12.5) and n (10):"
                 % _f(hlp))
    lines.append("")
    lines += ["| whiteouts | measure | t(10k) | t(100k) | ratio | ratio above start-up | n log n ratio |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    by = {(r["n"], r["pct"]): r for r in rows}
    nlogn = 100000 * math.log(100000) / (10000 * math.log(10000))
    for pct in sorted(set(r["pct"] for r in rows)):
        a, b = by.get((10000, pct)), by.get((100000, pct))
        if not a or not b:
            continue
        for key in ("warm_ls", "warm_get", "cold_ls"):
            if a[key] and b[key]:
                lines.append("| %d %% | %s | %s | %s | %.1f | %s | %.1f |" % (
                    pct, key.replace("_", " "), _f(a[key]), _f(b[key]), b[key] / a[key],
                    "%.1f" % ((b[key] - hlp) / (a[key] - hlp)) if a[key] > hlp else "-", nlogn))
    t = []
    b10, b0 = by.get((100000, 10)), by.get((100000, 0))
    if b10 and b0 and b10["warm_ls"] and b0["warm_ls"]:
        t.append(("100k entries with 10 % whiteouts lists (warm) in <= 1.5 x the time without the whiteout layer",
                  "%s vs %s = %.2f x" % (_f(b10["warm_ls"]), _f(b0["warm_ls"]), b10["warm_ls"] / b0["warm_ls"]),
                  verdict(b10["warm_ls"] / b0["warm_ls"], 1.5)))
    big = [r for r in rows if r["n"] == max(x["n"] for x in rows)]
    worst = max(big, key=lambda r: r["cold_rss"])
    t.append(("peak RSS <= 200 MiB for a %dk-entry TOC (ls, cold and warm)" % (worst["n"] // 1000),
              "cold %.1f MiB, warm %.1f MiB (%d %% whiteouts)" % (worst["cold_rss"] / MiB, worst["warm_ls_rss"] / MiB,
                                                                 worst["pct"]),
              verdict(max(worst["cold_rss"], worst["warm_ls_rss"]), 200.0 * MiB)))
    t.append(("warm ls: no blob request (all scaling images)",
              "at most %d" % max(r["warm_ls_blob_requests"] for r in rows),
              "met" if not max(r["warm_ls_blob_requests"] for r in rows) else "**missed**"))
    nd = max(r["warm_get_non_data"] for r in rows)
    t.append(("warm get of the 1 % subset: only file data requests (all scaling images)",
              "%d non-data blob requests at most" % nd, "met" if not nd else "**missed**"))
    bad = [r for r in rows if r["ls_check"] != "ok" or r["get_check"] != "ok"]
    t.append(("ls and get output correct (merged view with whiteouts applied)",
              "all ok" if not bad else "; ".join("%d/%d%%: ls %s, get %s" % (r["n"], r["pct"], r["ls_check"],
                                                                           r["get_check"]) for r in bad),
              "met" if not bad else "**missed**"))
    return "\n".join(lines), t


# ---------------------------------------------------------------- minbase

def minbase(bench, runs, go=None, go_why=""):
    py, st = sys.executable, bench.starget
    layout = synth.minbase_layout(log)
    meta, layers = bench.load_layers(layout)
    ref = "bench/minbase:latest"
    bench.registry.push(layout, ref)
    img = "%s/%s" % (bench.host, ref)
    expected = set(k for k in plan.merged(layers) if k)
    cache = os.path.join(bench.work, "cache-minbase")
    listing = os.path.join(bench.work, "ls.txt")
    cold = run_client(bench, [py, st, "--no-progress", "ls", img], cache, cold=True, stdout=listing)
    check = ls_check(listing, expected) if cold["rc"] == 0 else "exit %d" % cold["rc"]
    warm, gos = [], []
    for _ in range(runs):
        warm.append(run_client(bench, [py, st, "--no-progress", "ls", img], cache))
        if go:
            gos.append(run_client(bench, [go, "ls", img]))
    ok = [r for r in warm if r["rc"] == 0]
    gok = [r for r in gos if r["rc"] == 0]
    return {"source": meta.get("source"), "whiteouts": meta.get("whiteouts"),
            "entries": [l["toc_entries"] for l in meta["layers"]], "visible": len(expected),
            "blob_bytes": sum(l["size"] for l in meta["layers"]),
            "cold": cold["wall"], "cold_rss": cold["rss"], "check": check,
            "warm": med([r["wall"] for r in ok]), "warm_rss": max([r["rss"] for r in warm] or [0]),
            "warm_blob_requests": max([r["kinds"].get("blob data", 0) + r["kinds"].get("blob whole", 0)
                                       for r in warm] or [0]),
            "go": med([r["wall"] for r in gok]), "go_requests": med([r["requests"] for r in gok]),
            "go_rss": max([r["rss"] for r in gos] or [0]),
            "go_why": go_why if not gos or gok else "it failed: %s" % " ".join(gos[0].get("error") or [])}


def minbase_report(m):
    lines = ["Image: %s; layers of %s TOC entries (the 2nd a package-install layer with %s whiteouts and an opaque "
             "var/lib/apt/lists), %d visible paths, %.1f MB of blobs." % (
                 m["source"], " + ".join(map(str, m["entries"])), m["whiteouts"], m["visible"], m["blob_bytes"] / 1e6),
             "", "| client | ls wall (median) | peak RSS | blob requests | output |", "|---|---:|---:|---:|---|",
             "| starget cold | %s | %.1f MiB | - | %s |" % (_f(m["cold"]), m["cold_rss"] / MiB, m["check"]),
             "| starget warm | %s | %.1f MiB | %d | |" % (_f(m["warm"]), m["warm_rss"] / MiB, m["warm_blob_requests"])]
    if m["go"] is not None:
        lines.append("| Go original (no TOC cache: always cold) | %s | %.1f MiB | %g requests in all | |" % (
            _f(m["go"]), m["go_rss"] / MiB, m["go_requests"]))
    else:
        lines.append("| Go original | not available (%s) | | | |" % m["go_why"])
    t = []
    if m["go"] is not None and m["warm"] is not None:
        t.append(("warm ls of the minbase image within 2.5 x of the Go original",
                  "%s vs %s = %.2f x" % (_f(m["warm"]), _f(m["go"]), m["warm"] / m["go"]),
                  verdict(m["warm"] / m["go"], 2.5)))
    elif m["warm"] is not None:
        t.append(("warm ls of the minbase image <= 0.20 s (Go original not available: %s)" % m["go_why"],
                  _f(m["warm"]), verdict(m["warm"], 0.20)))
    t.append(("warm ls of the minbase image: no blob request", "%d" % m["warm_blob_requests"],
              "met" if not m["warm_blob_requests"] else "**missed**"))
    return "\n".join(lines), t
