"""The two reference clients of the benchmark (stdlib only), run as subprocesses.

  clients.py ideal HOST:PORT REPO:TAG PATTERN OUT --hints FILE [--concurrency N]
      The lower bound: GET the manifest, then per needed layer ONE Range request for
      [tocOffset, end) (it is told tocOffset and which layers it needs: an oracle), then
      ONE Range request per contiguous run of needed compressed extents; inflates each
      member, checks chunk digests, writes the files.
  clients.py full HOST:PORT REPO:TAG PATTERN OUT [--concurrency N]
      A full pull: GET the manifest, GET every layer blob whole (in parallel, checking
      the blob digest), then extract the matching members of each layer, in order, with
      tarfile (what `docker pull` + copying the path out amounts to).
"""
import argparse
import concurrent.futures
import hashlib
import http.client
import json
import os
import shutil
import sys
import tarfile
import threading
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import plan  # noqa: E402

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
BUF = 256 * 1024


class Registry(object):
    """One kept-alive connection per thread."""

    def __init__(self, host, repo):
        self.host, self.repo, self.local = host, repo, threading.local()

    def get(self, path, headers=None, expect=(200,)):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(self.host, timeout=120)
        conn.request("GET", "/v2/%s/%s" % (self.repo, path), headers=headers or {})
        resp = conn.getresponse()
        if resp.status not in expect:
            raise SystemExit("GET %s: HTTP %d %s" % (path, resp.status, resp.read()[:200]))
        return resp

    def manifest(self, tag):
        return json.loads(self.get("manifests/" + tag, {"Accept": MANIFEST_TYPE}).read())

    def blob_range(self, digest, start, end):
        return self.get("blobs/" + digest, {"Range": "bytes=%d-%d" % (start, end - 1)}, expect=(206,))


def read_exact(resp, n):
    data = resp.read(n)
    if len(data) != n:
        raise SystemExit("short read")
    return data


def ideal(reg, tag, pattern, out, hints, concurrency):
    m = reg.manifest(tag)
    descs = m["layers"]
    pool = concurrent.futures.ThreadPoolExecutor(concurrency)

    def fetch_toc(i):
        d = descs[i]
        off = hints["toc_offsets"][d["digest"]]
        data = reg.blob_range(d["digest"], off, d["size"]).read()
        toc, raw = plan.read_toc(data)
        want = d["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
        if "sha256:" + hashlib.sha256(raw).hexdigest() != want:
            raise SystemExit("TOC digest mismatch")
        if plan.parse_footer(data[-51:]) != off:
            raise SystemExit("footer mismatch")
        return plan.Layer(toc, off, d["size"], i, d["digest"])

    empty = {"entries": []}
    layers = [plan.Layer(empty, d["size"], d["size"], i, d["digest"]) for i, d in enumerate(descs)]
    for layer in pool.map(fetch_toc, hints["needed"]):
        layers[layer.index] = layer
    sel, _ = plan.select(layers, pattern)
    by_start = {}       # (layer, start) -> [(path, chunk)]
    extents, dirs, empty_files = {}, set(), []
    for path, (i, e) in sel.items():
        target = os.path.join(out, path)
        dirs.add(target if e.type == "dir" else os.path.dirname(target))
        if e.type == "reg" and e.chunks:
            for c in e.chunks:
                by_start.setdefault((i, c.start), []).append((target, e.mode & 0o7777, c))
                extents.setdefault(i, set()).add((c.start, c.end))
        elif e.type == "reg":
            empty_files.append((target, e.mode & 0o7777))
        elif e.type == "symlink":
            empty_files.append((target, e.link))
    os.umask(0)
    for d in sorted(dirs):
        os.makedirs(d, exist_ok=True)

    def fetch_run(job):
        i, (start, end, parts) = job
        resp = reg.blob_range(descs[i]["digest"], start, end)
        for s, e in parts:
            d = zlib.decompressobj(31)
            member = d.decompress(read_exact(resp, e - s))
            for target, mode, c in by_start[(i, s)]:
                data = member[c.inner:c.inner + c.size]
                if "sha256:" + hashlib.sha256(data).hexdigest() != c.digest:
                    raise SystemExit("chunk digest mismatch in " + target)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT, mode)
                try:
                    os.pwrite(fd, data, c.file_offset)
                finally:
                    os.close(fd)
        return end - start

    jobs = [(i, r) for i in sorted(extents) for r in plan.runs_of(extents[i])]
    jobs.sort(key=lambda j: j[1][0] - j[1][1])       # biggest first
    for _ in pool.map(fetch_run, jobs):
        pass
    pool.shutdown()
    for target, mode in empty_files:
        if isinstance(mode, int):
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT, mode))
        else:
            os.symlink(mode, target)


def full(reg, tag, pattern, out, concurrency):
    m = reg.manifest(tag)
    tmp = os.path.join(out, ".full-pull-blobs")
    os.makedirs(tmp)

    def download(d):
        resp = reg.get("blobs/" + d["digest"])
        path = os.path.join(tmp, d["digest"][7:])
        h = hashlib.sha256()
        with open(path, "wb") as f:
            while True:
                piece = resp.read(BUF)
                if not piece:
                    break
                h.update(piece)
                f.write(piece)
        if "sha256:" + h.hexdigest() != d["digest"]:
            raise SystemExit("blob digest mismatch")
        return path

    with concurrent.futures.ThreadPoolExecutor(min(concurrency, 3)) as pool:   # docker: 3 at a time
        paths = list(pool.map(download, m["layers"]))
    p = plan.normalize(pattern)
    for path in paths:
        with tarfile.open(path, "r:gz") as t:
            for member in t:
                name = plan.normalize(member.name)
                if name in ("stargz.index.json", ".no.prefetch.landmark", ".prefetch.landmark", ""):
                    continue
                if p and name != p and not name.startswith(p + "/"):
                    continue
                if hasattr(tarfile, "data_filter"):
                    t.extract(member, out, filter="data")
                else:
                    t.extract(member, out)
    shutil.rmtree(tmp)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["ideal", "full"])
    ap.add_argument("host")
    ap.add_argument("image", help="REPO:TAG")
    ap.add_argument("pattern")
    ap.add_argument("out")
    ap.add_argument("--hints")
    ap.add_argument("--concurrency", type=int, default=4)
    a = ap.parse_args()
    repo, tag = a.image.rsplit(":", 1)
    reg = Registry(a.host, repo)
    os.makedirs(a.out, exist_ok=True)
    if a.mode == "ideal":
        with open(a.hints) as f:
            ideal(reg, tag, a.pattern, a.out, json.load(f), a.concurrency)
    else:
        full(reg, tag, a.pattern, a.out, a.concurrency)


if __name__ == "__main__":
    main()
