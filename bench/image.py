"""Build the benchmark images as OCI layouts (stdlib only), cached under $TMPDIR.

main image ("bench/img:latest"), three eStargz layers over the running Python's
standard library (without site-packages, config-*/ and test/**/__pycache__):
  layer 0: the library except test/ and lib-dynload/
  layer 1: test/
  layer 2: lib-dynload/ and opt/bench/blob-20m.bin (20,000,000 bytes, seeded, ~half random)
big image ("bench/big:latest"): one layer, opt/bench/blob-1g.bin (1 GiB of text-like
data, compressed at zlib level 1), for the peak RSS check.
"""
import hashlib
import json
import os
import random
import shutil
import sys
import sysconfig
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import estargz_writer  # noqa: E402

MTIME = 1700000000
FILE_20M = "opt/bench/blob-20m.bin"
FILE_1G = "opt/bench/blob-1g.bin"
SIZE_20M = 20 * 1000 * 1000
SIZE_1G = 1 << 30
CACHE_ROOT = os.path.join(tempfile.gettempdir(), "starget-bench-cache")


def _tarinfo(name, kind="reg", size=0, mode=0o644, link=""):
    ti = tarfile.TarInfo(name)
    ti.type = {"reg": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}[kind]
    ti.size, ti.mode, ti.mtime, ti.linkname = size, mode, MTIME, link
    return ti


class GeneratedFile(object):
    """A read()-able deterministic stream of `size` bytes."""

    def __init__(self, size, block):
        self.size, self.block, self.pos, self.buf = size, block, 0, b""

    def read(self, n):
        out = []
        while n > 0 and self.pos < self.size:
            if not self.buf:
                self.buf = self.block(self.pos)
            take = min(n, len(self.buf), self.size - self.pos)
            out.append(self.buf[:take])
            self.buf = self.buf[take:]
            self.pos += take
            n -= take
        return b"".join(out)


def file_20m():
    rng = random.Random(20)
    words = b"the quick brown fox jumps over a lazy dog while starget fetches one file".split()

    def block(pos):  # 64 KiB: 32 KiB random bytes, 32 KiB text lines
        text = b"".join(b"%010d %s\n" % (pos + i, b" ".join(rng.choice(words) for _ in range(6)))
                        for i in range(0, 32768, 48))
        return rng.getrandbits(8 * 32768).to_bytes(32768, "little") + text[:32768]
    return GeneratedFile(SIZE_20M, block)


def file_1g():
    base = b"".join(b"%09d starget benchmark: a gigabyte of low entropy text, line after line\n" % i
                    for i in range(14000))[:1 << 20]

    def block(pos):  # 4 MiB: a distinct header, then the same 1 MiB of text four times
        head = b"chunk at %016d\n" % pos
        return (head + base * 4)[:4 << 20]
    return GeneratedFile(SIZE_1G, block)


def stdlib_layers():
    root = sysconfig.get_paths()["stdlib"]
    prefix = "usr/lib/" + os.path.basename(root)
    layers = [[], [], []]
    for d in ("usr", "usr/lib", prefix):
        for layer in layers:
            layer.append((_tarinfo(d, "dir", mode=0o755), None))
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        rel = "" if rel == "." else rel.replace(os.sep, "/")
        top = rel.split("/")[0]
        dirnames[:] = sorted(d for d in dirnames if not (
            (rel == "" and (d == "site-packages" or d.startswith("config-")))
            or (top == "test" and d == "__pycache__")))
        index = 1 if top == "test" else 2 if top == "lib-dynload" else 0
        if rel:
            layers[index].append((_tarinfo(prefix + "/" + rel, "dir", mode=0o755), None))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            arc = prefix + "/" + (rel + "/" if rel else "") + name
            st = os.lstat(path)
            if os.path.islink(path):
                layers[index].append((_tarinfo(arc, "symlink", mode=0o777, link=os.readlink(path)), None))
            elif os.path.isfile(path):
                layers[index].append((_tarinfo(arc, size=st.st_size, mode=st.st_mode & 0o7777), path))
    layers[2] += [(_tarinfo("opt", "dir", mode=0o755), None), (_tarinfo("opt/bench", "dir", mode=0o755), None),
                  (_tarinfo(FILE_20M, size=SIZE_20M), file_20m)]
    return layers


def big_layers():
    return [[(_tarinfo("opt", "dir", mode=0o755), None), (_tarinfo("opt/bench", "dir", mode=0o755), None),
             (_tarinfo(FILE_1G, size=SIZE_1G), file_1g)]]


def _put_blob(layout, data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return "sha256:" + digest, len(data)


def write_layout(layout, layers, level=6, tag="latest"):
    """Write an OCI layout with one eStargz layer per entry of `layers`."""
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs)
    infos = []
    for entries in layers:
        tmp = os.path.join(blobs, "tmp")
        with open(tmp, "wb") as out:
            w = estargz_writer.Writer(out, level=level)
            for ti, src in entries:
                if src is None:
                    w.add(ti)
                elif callable(src):
                    w.add(ti, src())
                else:
                    with open(src, "rb") as f:
                        w.add(ti, f)
            info = w.close()
        os.rename(tmp, os.path.join(blobs, info["digest"].split(":")[1]))
        infos.append(info)
    config = {"created": "2023-11-14T22:13:20Z", "architecture": "amd64", "os": "linux",
              "config": {"Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": [i["diff_id"] for i in infos]}}
    cdigest, csize = _put_blob(layout, json.dumps(config, separators=(",", ":")).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": cdigest, "size": csize},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": i["digest"], "size": i["size"],
                            "annotations": {"containerd.io/snapshot/stargz/toc.digest": i["toc_digest"],
                                            "io.containers.estargz.uncompressed-size":
                                                str(i["uncompressed_size"])}} for i in infos]}
    mbytes = json.dumps(manifest, separators=(",", ":")).encode()
    mdigest, msize = _put_blob(layout, mbytes)
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": manifest["mediaType"], "digest": mdigest, "size": msize,
                            "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    meta = {"manifest_digest": mdigest, "manifest_size": msize, "layers": infos}
    with open(os.path.join(layout, "bench-meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def cached_layout(kind, log=print):
    """Path of the layout for kind 'img' or 'big', building it on first use."""
    key = hashlib.sha256()
    key.update(sys.version.encode() + sysconfig.get_paths()["stdlib"].encode() + kind.encode())
    for name in ("estargz_writer.py", "image.py"):
        with open(os.path.join(HERE, name), "rb") as f:
            key.update(f.read())
    path = os.path.join(CACHE_ROOT, "%s-py%d.%d-%s" % (kind, sys.version_info[0], sys.version_info[1],
                                                      key.hexdigest()[:12]))
    if os.path.exists(os.path.join(path, "bench-meta.json")):
        return path
    log("building %s image layout in %s ..." % (kind, path))
    tmp = path + ".tmp%d" % os.getpid()
    shutil.rmtree(tmp, ignore_errors=True)
    if kind == "img":
        write_layout(tmp, stdlib_layers())
    else:
        write_layout(tmp, big_layers(), level=1)
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)
    return path


def load_meta(layout):
    with open(os.path.join(layout, "bench-meta.json")) as f:
        return json.load(f)


if __name__ == "__main__":
    import time
    t = time.time()
    for kind in sys.argv[1:] or ["img"]:
        p = cached_layout(kind)
        print(p, "%.1fs" % (time.time() - t))
        print(json.dumps(load_meta(p), indent=1))
