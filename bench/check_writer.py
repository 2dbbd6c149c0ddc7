"""Self-check of the benchmark eStargz writer: python3 bench/check_writer.py [LAYOUT]

- the whole blob is one valid tar.gz stream (tarfile) whose members match the TOC;
- footer, TOC member and TOC digest annotation agree;
- every payload inflates on its own from its `offset`, one gzip member per extent,
  and matches chunkDigest / digest;
- the TOC uses the same keys and key order as the Go library's fixture TOCs.
"""
import gzip
import hashlib
import os
import sys
import tarfile
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import image  # noqa: E402
import plan  # noqa: E402

FIXTURES = os.path.join(HERE, "..", "testdata", "fixtures")
KEY_ORDER = ["name", "type", "size", "modtime", "linkName", "mode", "uid", "gid", "userName",
             "groupName", "offset", "innerOffset", "devMajor", "devMinor", "numLink", "xattrs",
             "digest", "chunkOffset", "chunkSize", "chunkDigest"]


def check_key_order(entries, where):
    for e in entries:
        keys = list(e)
        assert keys == sorted(keys, key=KEY_ORDER.index), (where, keys)


def check_fixture_shape():
    """Our key order assumption holds on the Go-written fixture."""
    path = os.path.join(FIXTURES, "basic", "blobs", "sha256")
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as f:
            blob = f.read()
        if blob[-51:-29].endswith(b"SG\x16\x00") or blob[-51:][12:14] == b"SG":
            toc, _ = plan.read_toc(blob[plan.parse_footer(blob[-51:]):])
            check_key_order(toc["entries"], "fixture " + name)
            return toc
    raise AssertionError("no fixture eStargz blob found")


def check_blob(path, info):
    with open(path, "rb") as f:
        blob = f.read()
    assert len(blob) == info["size"]
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == info["digest"]
    toc_offset = plan.parse_footer(blob[-51:])
    assert toc_offset == info["toc_offset"]
    toc, raw_json = plan.read_toc(blob[toc_offset:])
    assert "sha256:" + hashlib.sha256(raw_json).hexdigest() == info["toc_digest"]
    check_key_order(toc["entries"], path)
    assert toc["entries"][0]["name"] == ".no.prefetch.landmark"
    # one tar.gz stream; members match the TOC (minus chunk entries)
    tar_sha = hashlib.sha256(gzip.decompress(blob)).hexdigest()
    assert "sha256:" + tar_sha == info["diff_id"]
    with tarfile.open(path, "r:gz") as t:
        names = [m.name + ("/" if m.isdir() else "") for m in t]
    assert names == [e["name"] for e in toc["entries"] if e["type"] != "chunk"] + ["stargz.index.json"], path
    # every extent is exactly one gzip member and inflates to its chunk
    layer = plan.Layer(toc, toc_offset, info["size"])
    whole = {}
    for f in layer.files.values():
        for c in f.chunks:
            d = zlib.decompressobj(31)
            out = d.decompress(blob[c.start:c.end])
            assert d.eof and not d.unused_data, (f.name, c.start, c.end)
            data = out[c.inner:c.inner + c.size]
            assert len(data) == c.size
            assert "sha256:" + hashlib.sha256(data).hexdigest() == c.digest, f.name
            whole.setdefault(f.name, hashlib.sha256()).update(data)
        if f.size:
            assert "sha256:" + whole[f.name].hexdigest() == f.digest, f.name
    return len(toc["entries"])


def main():
    check_fixture_shape()
    layout = sys.argv[1] if len(sys.argv) > 1 else image.cached_layout("img")
    meta = image.load_meta(layout)
    for info in meta["layers"]:
        n = check_blob(os.path.join(layout, "blobs", "sha256", info["digest"][7:]), info)
        print("ok %s (%d bytes, %d TOC entries)" % (info["digest"][:19], info["size"], n))
    print("writer OK")


if __name__ == "__main__":
    main()
