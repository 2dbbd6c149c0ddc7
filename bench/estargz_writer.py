"""A minimal eStargz writer, for the benchmark only (stdlib).

Layout, as the reference Go writer (containerd/stargz-snapshotter estargz) does it:
every chunk of a regular file's payload starts a new gzip member; that member
then also takes the tar padding and the following tar headers, up to the next
payload. The blob ends with a gzip member holding the tar entry
`stargz.index.json` (the TOC) and the tar end-of-archive, then the 51-byte footer.
The blob as a whole is one valid tar.gz stream.
"""
import hashlib
import io
import json
import tarfile
import time
import zlib

CHUNK_SIZE = 4 << 20
TOC_NAME = "stargz.index.json"
LANDMARK = ".no.prefetch.landmark"


def footer(toc_offset):
    """51 bytes: an empty gzip member with FEXTRA subfield 'SG' = '%016xSTARGZ'."""
    payload = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + len(payload).to_bytes(2, "little") + payload
    return (b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + len(extra).to_bytes(2, "little")
            + extra + b"\x01\x00\x00\xff\xff" + b"\x00" * 8)


def rfc3339(mtime):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime))


class Writer(object):
    """w = Writer(fileobj); w.add(tarinfo, fileobj); ...; w.close() -> dict of digests."""

    def __init__(self, out, level=6, chunk_size=CHUNK_SIZE):
        self.out, self.level, self.chunk_size = out, level, chunk_size
        self.pos, self.z, self.entries = 0, None, []
        self.blob_sha, self.tar_sha, self.tar_size = hashlib.sha256(), hashlib.sha256(), 0
        landmark = tarfile.TarInfo(LANDMARK)
        landmark.size, landmark.mode = 1, 0o644
        self.add(landmark, io.BytesIO(b"\x0f"), meta=False)

    def _emit(self, data):
        self.out.write(data)
        self.blob_sha.update(data)
        self.pos += len(data)

    def _close_member(self):
        if self.z is not None:
            self._emit(self.z.flush())
            self.z = None

    def _write(self, raw):
        if self.z is None:
            self.z = zlib.compressobj(self.level, zlib.DEFLATED, 31)
        self.tar_sha.update(raw)
        self.tar_size += len(raw)
        self._emit(self.z.compress(raw))

    def add(self, ti, fileobj=None, meta=True):
        self._write(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        types = {tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.DIRTYPE: "dir",
                 tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char",
                 tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}
        e = {"name": ti.name + ("/" if ti.isdir() and not ti.name.endswith("/") else ""),
             "type": types[ti.type]}
        if ti.isreg() and ti.size:
            e["size"] = ti.size
        if meta:
            e["modtime"] = rfc3339(ti.mtime)
        if ti.linkname:
            e["linkName"] = ti.linkname
        for key, value in (("mode", ti.mode & 0o7777 if meta else 0), ("uid", ti.uid), ("gid", ti.gid),
                           ("devMajor", ti.devmajor if ti.ischr() or ti.isblk() else 0),
                           ("devMinor", ti.devminor if ti.ischr() or ti.isblk() else 0)):
            if value:
                e[key] = value
        self.entries.append(e)
        if not ti.isreg():
            return
        whole, first, done = hashlib.sha256(), e, 0
        while done < ti.size:
            n = min(self.chunk_size, ti.size - done)
            data = fileobj.read(n)
            if len(data) != n:
                raise IOError("short read on %s" % ti.name)
            self._close_member()               # every chunk starts a new gzip member
            c = e if done == 0 else {"name": e["name"], "type": "chunk"}
            c["offset"] = self.pos
            if done:
                c["chunkOffset"] = done
            if n == self.chunk_size:           # as Go: full-size chunks carry chunkSize
                c["chunkSize"] = n
            c["chunkDigest"] = "sha256:" + hashlib.sha256(data).hexdigest()
            if c is not e:
                self.entries.append(c)
            whole.update(data)
            self._write(data)
            done += n
        first["digest"] = "sha256:" + whole.hexdigest()
        # key order as the Go writer: digest before chunkSize/chunkDigest
        for key in ("chunkSize", "chunkDigest"):
            if key in first:
                first[key] = first.pop(key)
        self._write(b"\0" * (-ti.size % 512))

    def close(self):
        """Write the TOC member and the footer; return digests and sizes."""
        self._close_member()
        toc_offset = self.pos
        toc = json.dumps({"version": 1, "entries": self.entries}, indent="\t").encode()
        ti = tarfile.TarInfo(TOC_NAME)
        ti.size, ti.mode, ti.mtime = len(toc), 0, 0
        self._write(ti.tobuf(tarfile.USTAR_FORMAT) + toc + b"\0" * (-len(toc) % 512) + b"\0" * 1024)
        self._close_member()
        self._emit(footer(toc_offset))
        return {"digest": "sha256:" + self.blob_sha.hexdigest(), "size": self.pos,
                "diff_id": "sha256:" + self.tar_sha.hexdigest(), "uncompressed_size": self.tar_size,
                "toc_digest": "sha256:" + hashlib.sha256(toc).hexdigest(), "toc_offset": toc_offset,
                "toc_entries": len(self.entries)}
