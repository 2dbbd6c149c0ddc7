"""The two reference clients of the benchmark (stdlib only), run as subprocesses.

  clients.py ideal HOST:PORT REPO:TAG PATTERN OUT --hints FILE
      The yardstick, the floor of any Python client: it is told (--hints, see
      plan.ideal_hints) what a perfect client would know: the needed layers, their TOC
      offsets, the contiguous runs of the selected files and each file's extents. On ONE
      kept-alive connection, one request after the other: the manifest, per needed layer
      ONE Range request for [tocOffset, end) (inflated and json.loads-ed), then ONE Range
      request per run; inflates each member, checks chunk digests, writes the files.
  curl_config(...) (imported by run.py): the same requests for one `curl -K FILE`
      process on one connection, transfer only (the lower yardstick).
  clients.py full HOST:PORT REPO:TAG PATTERN OUT [--concurrency N]
      A full pull: GET the manifest, GET every layer blob whole (in parallel, checking
      the blob digest), then extract the matching members of each layer, in order, with
      tarfile (what `docker pull` + copying the path out amounts to).
"""
import hashlib
import http.client
import json
import os
import sys
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
# The ideal client imports no more than it needs (it is the floor of start-up too);
# the full pull imports the rest (argparse, threads, tarfile, bench/plan.py) in main/full.

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
BUF = 256 * 1024


class Registry(object):
    """One kept-alive connection per thread (the full pull)."""

    def __init__(self, host, repo):
        import threading
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


def ideal(host, repo, tag, out, hints):
    """The yardstick: ONE kept-alive connection, requests one after the other: the manifest,
    per needed layer the TOC range [tocOffset, end) (inflated, json.loads-ed and its digest
    checked: work no client can skip), then one Range request per contiguous run of the
    selected extents (from the hints: an oracle), each member inflated, each chunk's sha256
    checked and written with pwrite."""
    conn = http.client.HTTPConnection(host, timeout=120)

    def get(path, headers, expect):
        conn.request("GET", "/v2/%s/%s" % (repo, path), headers=headers)
        resp = conn.getresponse()
        if resp.status not in expect:
            raise SystemExit("GET %s: HTTP %d %s" % (path, resp.status, resp.read()[:200]))
        return resp

    m = json.loads(get("manifests/" + tag, {"Accept": MANIFEST_TYPE}, (200,)).read())
    descs = m["layers"]
    for i in hints["needed"]:
        d = descs[i]
        off = hints["toc_offsets"][d["digest"]]
        data = get("blobs/" + d["digest"], {"Range": "bytes=%d-%d" % (off, d["size"] - 1)}, (206,)).read()
        raw = zlib.decompressobj(31).decompress(data)
        size = int(raw[124:136].rstrip(b"\0 ") or b"0", 8)     # the tar header of stargz.index.json
        js = raw[512:512 + size]
        json.loads(js)
        if "sha256:" + hashlib.sha256(js).hexdigest() != d["annotations"][TOC_DIGEST]:
            raise SystemExit("TOC digest mismatch")
    os.umask(0)
    for d in hints["dirs"]:
        os.makedirs(os.path.join(out, d), exist_ok=True)
    for run in hints["runs"]:
        digest = descs[run["layer"]]["digest"]
        resp = get("blobs/" + digest, {"Range": "bytes=%d-%d" % (run["start"], run["end"] - 1)}, (206,))
        for s, e, writes in run["members"]:
            member = zlib.decompressobj(31).decompress(read_exact(resp, e - s))
            for path, mode, inner, size, file_offset, chunk_digest in writes:
                data = member[inner:inner + size]
                if "sha256:" + hashlib.sha256(data).hexdigest() != chunk_digest:
                    raise SystemExit("chunk digest mismatch in " + path)
                fd = os.open(os.path.join(out, path), os.O_WRONLY | os.O_CREAT, mode)
                try:
                    os.pwrite(fd, data, file_offset)
                finally:
                    os.close(fd)
        if resp.read(1):
            raise SystemExit("long response")
    for path, mode, link in hints["others"]:
        if link is None:
            os.close(os.open(os.path.join(out, path), os.O_WRONLY | os.O_CREAT, mode))
        else:
            os.symlink(link, os.path.join(out, path))
    conn.close()


def curl_config(host, repo, tag, layers, hints):
    """A curl --config (-K) file for the same requests as the ideal client, in one curl
    process (so on one kept-alive connection): the manifest, the TOC ranges, the runs.
    Transfer only: every body goes to /dev/null. `layers`: [(digest, size)]."""
    base = "http://%s/v2/%s/" % (host, repo)
    reqs = [(base + "manifests/" + tag, None)]
    for i in hints["needed"]:
        digest, size = layers[i]
        reqs.append((base + "blobs/" + digest, "%d-%d" % (hints["toc_offsets"][digest], size - 1)))
    for run in hints["runs"]:
        reqs.append((base + "blobs/" + layers[run["layer"]][0], "%d-%d" % (run["start"], run["end"] - 1)))
    out = []
    for k, (url, rng) in enumerate(reqs):
        if k:
            out.append("next")
        out += ['url = "%s"' % url, 'output = "/dev/null"', "silent", "show-error", "fail",
                'header = "Accept: %s"' % MANIFEST_TYPE]
        if rng:
            out.append('range = "%s"' % rng)
    return "\n".join(out) + "\n"


def full(reg, tag, pattern, out, concurrency):
    import concurrent.futures
    import shutil
    import tarfile
    sys.path.insert(0, HERE)
    import plan
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
    if len(sys.argv) == 8 and sys.argv[1] == "ideal" and sys.argv[6] == "--hints":   # no argparse: the floor
        repo, tag = sys.argv[3].rsplit(":", 1)
        os.makedirs(sys.argv[5], exist_ok=True)
        with open(sys.argv[7]) as f:
            return ideal(sys.argv[2], repo, tag, sys.argv[5], json.load(f))
    import argparse
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
    os.makedirs(a.out, exist_ok=True)
    if a.mode == "ideal":
        with open(a.hints) as f:
            ideal(a.host, repo, tag, a.out, json.load(f))
    else:
        full(Registry(a.host, repo), tag, a.pattern, a.out, a.concurrency)


if __name__ == "__main__":
    main()
