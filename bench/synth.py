"""Synthetic benchmark images for the scaling and minbase sections (stdlib only), cached
as OCI layouts next to image.py's (in $TMPDIR/starget-bench-cache/, keyed by the source of
this file, image.py and the writer, so re-runs are fast).

scaling(n, pct): a base layer of about n tiny files (16-40 bytes each, in directories of
  40 under usr/share/, plus opt/subset/ holding 1 % of the files: the `get` scenario) and,
  for pct > 0, an upper layer as `apt-get install` + `rm -rf` leave it: new files, and
  whiteouts hiding about pct % of the base's entries: half as whiteouts of single files
  (`.wh.NAME`), a quarter as whiteouts of whole directories, a quarter as opaque
  directories (`DIR/.wh..wh..opq`, with a few new files in them). pct = 0: the base alone
  (the same base blob), so "10 % whiteouts" compares with "the same image without the
  whiteout layer".
minbase(): a Debian-like minbase image in 3 layers: the tree of `debootstrap --foreign
  --variant=minbase bookworm` (first stage only: the packages unpacked, no chroot) from the
  mirror apt is set up with (read from /etc/apt/sources.list*, never hard-coded); a
  package-install layer (new files, whiteouts of every file under usr/share/doc and
  usr/share/man, an opaque var/lib/apt/lists); a small config layer. If debootstrap is
  missing or fails, a synthesised minbase-like tree (about 4,800 paths in the same 3
  layers); `meta["source"]` says which.
"""
import glob
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import image  # noqa: E402

SUBSET = "opt/subset"
PER_DIR = 40


def _ti(name, kind="reg", size=0, mode=0o644, link=""):
    return image._tarinfo(name, kind, size, mode, link)


class Bytes(object):
    def __init__(self, data):
        self.data = data

    def read(self, n):
        out, self.data = self.data[:n], self.data[n:]
        return out


def _file(name, data, mode=0o644):
    return (_ti(name, size=len(data), mode=mode), (lambda d=data: Bytes(d)))


def _dirs(paths):
    """Directory entries for every parent of `paths`, parents first."""
    seen, out = set(), []
    for p in paths:
        parts = p.split("/")[:-1]
        for k in range(1, len(parts) + 1):
            d = "/".join(parts[:k])
            if d not in seen:
                seen.add(d)
                out.append((_ti(d, "dir", mode=0o755), None))
    return out


def scaling_base(n):
    """(layer entries, [(dir, [file names])]) for about n TOC entries."""
    rng = random.Random(n)
    nsub = max(1, n // 100)
    ndirs = max(1, (n - nsub) // (PER_DIR + 1))
    tree = [("usr/share/p%05d" % d, ["f%03d.txt" % k for k in range(PER_DIR)]) for d in range(ndirs)]
    tree.append((SUBSET, ["s%05d.txt" % k for k in range(nsub)]))
    entries = _dirs([d + "/x" for d, _ in tree])
    for d, names in tree:
        for name in names:
            path = d + "/" + name
            entries.append(_file(path, (path + "\n").encode() * rng.randint(1, 2)))
    return entries, tree


def scaling_upper(n, pct, tree):
    """The apt-get / rm -rf layer: whiteouts hiding about pct % of the base's entries."""
    rng = random.Random(n * 100 + pct)
    budget = n * pct // 100
    dirs = [t for t in tree if t[0] != SUBSET]
    rng.shuffle(dirs)
    whole = max(1, budget // 4 // (PER_DIR + 1))
    opaque = max(1, budget // 4 // (PER_DIR + 1))
    gone_dirs, opq_dirs, rest = dirs[:whole], dirs[whole:whole + opaque], dirs[whole + opaque:]
    single = []
    while len(single) < budget // 2 and rest:
        d, names = rest[len(single) % len(rest)]
        single.append(d + "/" + names[rng.randrange(len(names))])
    single = sorted(set(single))
    paths = ["usr/lib/newpkg%03d/lib%d.so" % (k // 10, k) for k in range(max(1, budget // 4))]
    entries = []
    wh = [os.path.dirname(p) + "/.wh." + os.path.basename(p) for p in single]
    wh += ["usr/share/.wh." + os.path.basename(d) for d, _ in gone_dirs]
    for d, _ in opq_dirs:
        wh.append(d + "/.wh..wh..opq")
        paths += [d + "/new%d.txt" % k for k in range(3)]
    entries = _dirs(sorted(wh + paths))
    entries += [(_ti(p), None) for p in sorted(wh)]
    entries += [_file(p, (p + "\n").encode()) for p in sorted(paths)]
    return entries


# ---------------------------------------------------------------- minbase

def apt_mirror():
    """The Debian archive URL apt uses for bookworm main (from its sources), or None."""
    for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*")):
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M):
            return m.group(1)
        for stanza in text.split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:(.*)$", stanza, re.M)
            if uris and suites and "bookworm" in suites.group(1).split() and "security" not in uris.group(1):
                return uris.group(1)
    return None


def debootstrap_tree(dest, log):
    """Run debootstrap's first stage into dest; (ok, reason)."""
    if not shutil.which("debootstrap"):
        return False, "debootstrap not installed"
    if os.geteuid() != 0:
        return False, "debootstrap needs root"
    mirror = apt_mirror()
    if not mirror:
        return False, "no bookworm mirror in apt's sources"
    log("debootstrap --foreign --variant=minbase bookworm (apt's mirror) ...")
    try:
        p = subprocess.run(["debootstrap", "--foreign", "--variant=minbase", "bookworm", dest, mirror],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=900)
    except subprocess.TimeoutExpired:
        return False, "debootstrap took over 15 minutes"
    if p.returncode != 0:
        return False, "debootstrap failed: " + " | ".join(p.stdout.strip().splitlines()[-2:])
    return True, "debootstrap --foreign --variant=minbase bookworm (first stage: packages unpacked, no chroot)"


def tree_entries(root):
    """(path, tarinfo-source) for a real tree: dirs, regular files, symlinks (hard links as
    copies; devices, sockets and fifos left out), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        if rel != ".":
            out.append((rel, "dir", None))
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            r = name if rel == "." else rel + "/" + name
            if os.path.islink(p):
                out.append((r, "symlink", os.readlink(p)))
            elif os.path.isfile(p):
                out.append((r, "reg", p))
        for name in dirnames:                       # symlinks to directories
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                out.append((name if rel == "." else rel + "/" + name, "symlink", os.readlink(p)))
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return out


def _layer_from_tree(items):
    entries = []
    for path, kind, src in items:
        if kind == "dir":
            entries.append((_ti(path, "dir", mode=0o755), None))
        elif kind == "symlink":
            entries.append((_ti(path, "symlink", mode=0o777, link=src), None))
        else:
            st = os.stat(src)
            entries.append((_ti(path, size=st.st_size, mode=st.st_mode & 0o7777), src))
    return entries


def synth_minbase_tree():
    """[(path, kind, data)] of a minbase-like tree, about 4,300 paths (bytes as data)."""
    rng = random.Random(4800)
    items = [(d, "dir", None) for d in ("bin", "etc", "lib", "usr", "usr/bin", "usr/sbin", "usr/lib",
                                       "usr/lib/x86_64-linux-gnu", "usr/share", "usr/share/doc",
                                       "usr/share/man", "usr/share/locale", "usr/share/zoneinfo", "var",
                                       "var/lib", "var/lib/dpkg", "var/lib/dpkg/info", "var/lib/apt",
                                       "var/lib/apt/lists", "etc/default", "usr/share/perl5")]

    def blob(k, lo, hi):
        return bytes(rng.getrandbits(8) for _ in range(16)) * rng.randint(lo, hi) if k else b""
    for k in range(300):
        items.append(("usr/bin/tool%03d" % k, "reg", blob(1, 200, 4000)))
    for k in range(60):
        items.append(("usr/sbin/admin%02d" % k, "reg", blob(1, 100, 2000)))
    for k in range(500):
        items.append(("usr/lib/x86_64-linux-gnu/lib%03d.so.1" % k, "reg", blob(1, 100, 8000)))
        if k % 3 == 0:
            items.append(("usr/lib/x86_64-linux-gnu/lib%03d.so" % k, "symlink", "lib%03d.so.1" % k))
    for p in range(90):
        d = "usr/share/doc/pkg%02d" % p
        items.append((d, "dir", None))
        for name in ("copyright", "changelog.Debian.gz", "NEWS.Debian.gz")[:rng.randint(1, 3)]:
            items.append((d + "/" + name, "reg", blob(1, 10, 200)))
    for sec in range(1, 9):
        d = "usr/share/man/man%d" % sec
        items.append((d, "dir", None))
        for k in range(25):
            items.append((d + "/page%02d.%d.gz" % (k, sec), "reg", blob(1, 10, 100)))
    for region in range(12):
        d = "usr/share/zoneinfo/Region%02d" % region
        items.append((d, "dir", None))
        for k in range(130):
            items.append((d + "/City%03d" % k, "reg", blob(1, 2, 20)))
    for k in range(400):
        items.append(("var/lib/dpkg/info/pkg%02d.%s" % (k // 5, ("list", "md5sums", "postinst", "prerm",
                                                                  "conffiles")[k % 5]), "reg", blob(1, 2, 100)))
    for k in range(300):
        d = "usr/share/perl5/Mod%02d" % (k // 20)
        if k % 20 == 0:
            items.append((d, "dir", None))
        items.append((d + "/Part%02d.pm" % k, "reg", blob(1, 10, 300)))
    for k in range(80):
        items.append(("etc/conf%02d" % k, "reg", blob(1, 1, 40)))
    for k in range(6):
        items.append(("var/lib/apt/lists/list%d_Packages" % k, "reg", blob(1, 100, 1000)))
    items.append(("bin/sh", "symlink", "dash"))
    return sorted(items, key=lambda t: t[0])


def _synth_layer(items):
    entries = []
    for path, kind, data in items:
        if kind == "dir":
            entries.append((_ti(path, "dir", mode=0o755), None))
        elif kind == "symlink":
            entries.append((_ti(path, "symlink", mode=0o777, link=data), None))
        else:
            entries.append(_file(path, data, 0o755 if "/bin/" in path else 0o644))
    return entries


def minbase_layers(items, from_disk):
    """3 layers over a tree's items [(path, kind, src)]: base, package install, config."""
    base = _layer_from_tree(items) if from_disk else _synth_layer(items)
    paths = {p: k for p, k, _ in items}
    # package-install layer: whiteouts of every file under usr/share/doc and usr/share/man
    # (a docker `rm -rf` of docs after apt-get install), an opaque var/lib/apt/lists, new files
    gone = sorted(p for p, k in paths.items() if k != "dir"
                  and (p.startswith("usr/share/doc/") or p.startswith("usr/share/man/")))[:600]
    wh = [os.path.dirname(p) + "/.wh." + os.path.basename(p) for p in gone]
    wh.append("var/lib/apt/lists/.wh..wh..opq")
    new = ["usr/lib/python3/dist-packages/pkg%02d/mod%02d.py" % (k // 20, k) for k in range(200)]
    new += ["usr/bin/newtool%02d" % k for k in range(40)]
    new += ["var/lib/apt/lists/lock"]
    upper = _dirs(sorted(wh + new)) + [(_ti(p), None) for p in sorted(wh)]
    upper += [_file(p, (b"# %s\n" % p.encode()) * 20) for p in sorted(new)]
    conf = [(_ti("etc", "dir", mode=0o755), None)] + [_file("etc/app%d.conf" % k, b"key=value\n" * 5)
                                                       for k in range(20)]
    return [base, upper, conf], len(wh)


# ---------------------------------------------------------------- cache

def _key(*parts):
    h = hashlib.sha256()
    for name in ("estargz_writer.py", "image.py", "synth.py"):
        with open(os.path.join(HERE, name), "rb") as f:
            h.update(f.read())
    h.update(repr(parts).encode())
    return h.hexdigest()[:12]


def _cached(name, build, log):
    path = os.path.join(image.CACHE_ROOT, "%s-%s" % (name, _key(name)))
    if os.path.exists(os.path.join(path, "bench-meta.json")):
        return path
    log("building %s image layout in %s ..." % (name, path))
    tmp = path + ".tmp%d" % os.getpid()
    shutil.rmtree(tmp, ignore_errors=True)
    extra = build(tmp)
    if extra:
        meta = image.load_meta(tmp)
        meta.update(extra)
        with open(os.path.join(tmp, "bench-meta.json"), "w") as f:
            import json
            json.dump(meta, f, indent=1)
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)
    return path


def scaling_layout(n, pct, log=print):
    def build(tmp):
        base, tree = scaling_base(n)
        layers = [base] + ([scaling_upper(n, pct, tree)] if pct else [])
        image.write_layout(tmp, layers)
        return {"subset": SUBSET + "/", "n": n, "pct": pct}
    return _cached("scale-%d-%d" % (n, pct), build, log)


def minbase_layout(log=print):
    def build(tmp):
        src = os.path.join(image.CACHE_ROOT, "debootstrap-minbase-bookworm")
        reason = None
        if not os.path.exists(os.path.join(src, ".complete")):
            shutil.rmtree(src, ignore_errors=True)
            ok, reason = debootstrap_tree(src, log)
            if ok:
                with open(os.path.join(src, ".complete"), "w") as f:
                    f.write(reason + "\n")
            else:
                shutil.rmtree(src, ignore_errors=True)
        if os.path.exists(os.path.join(src, ".complete")):
            with open(os.path.join(src, ".complete")) as f:
                reason = f.read().strip()
            items = [t for t in tree_entries(src) if t[0] != ".complete" and t[0] != "debootstrap"
                     and not t[0].startswith("debootstrap/") and not (
                         t[0].startswith("var/cache/apt/archives/") and t[0].endswith(".deb"))]
            layers, nwh = minbase_layers(items, True)
            source = reason
        else:
            layers, nwh = minbase_layers(synth_minbase_tree(), False)
            source = "synthesised minbase-like tree (%s)" % reason
        image.write_layout(tmp, layers)
        return {"source": source, "whiteouts": nwh}
    return _cached("minbase", build, log)


if __name__ == "__main__":
    import json
    for arg in sys.argv[1:] or ["1000:10"]:
        if arg == "minbase":
            p = minbase_layout()
        else:
            n, pct = map(int, arg.split(":"))
            p = scaling_layout(n, pct)
        m = image.load_meta(p)
        print(p, json.dumps({k: v for k, v in m.items() if k != "layers"}),
              [(l["toc_entries"], l["size"]) for l in m["layers"]])
