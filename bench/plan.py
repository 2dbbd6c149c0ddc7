"""TOC reading, extents, the merged view and the minimal fetch plan (stdlib only).

Shared by the bench driver (to compute the minimum a client must fetch) and by the
"ideal" client (which fetches exactly that).

Minimum for a request (pattern):
  needed layers = for one file: the layer that provides it and every layer above it
                  (a correct client must look there for overrides and whiteouts);
                  for a directory or everything: all layers;
  bytes   = manifest + per needed layer [tocOffset, blob end) (TOC member + footer)
            + the compressed extent [offset, next greater offset or tocOffset) of every
            chunk of every selected regular file (each extent counted once);
  requests = 1 (manifest) + 1 per needed layer (footer+TOC) + 1 per contiguous run of
            needed extents.  Warm (TOCs cached): bytes and requests without the TOC parts.
"""
import json
import tarfile
import zlib


def parse_footer(tail):
    """TOC offset from the last 51 bytes of an eStargz blob."""
    if len(tail) != 51 or tail[:4] != b"\x1f\x8b\x08\x04" or tail[12:14] != b"SG":
        raise ValueError("not an eStargz footer")
    return int(tail[16:32], 16)


def read_toc(data):
    """(toc dict, raw JSON bytes) from the bytes starting at tocOffset."""
    d = zlib.decompressobj(31)
    raw = d.decompress(data)
    ti = tarfile.TarInfo.frombuf(raw[:512], "utf-8", "surrogateescape")
    if ti.name != "stargz.index.json":
        raise ValueError("no TOC at offset")
    js = raw[512:512 + ti.size]
    return json.loads(js), js


def normalize(name):
    name = name.strip("/")
    while name.startswith("./"):
        name = name[2:]
    return "" if name == "." else name.strip("/")


class Chunk(object):
    __slots__ = ("start", "end", "inner", "size", "file_offset", "digest")

    def __init__(self, start, end, inner, size, file_offset, digest):
        self.start, self.end, self.inner, self.size = start, end, inner, size
        self.file_offset, self.digest = file_offset, digest


class Entry(object):
    def __init__(self, raw):
        self.name = normalize(raw.get("name", ""))
        self.type = raw.get("type", "")
        self.size = raw.get("size", 0)
        self.mode = raw.get("mode", 0)
        self.digest = raw.get("digest")
        self.link = raw.get("linkName", "")
        self.chunks = []


class Layer(object):
    """One layer's TOC: .entries (path -> Entry, TOC order), .files (regular files)."""

    def __init__(self, toc, toc_offset, blob_size, index=0, digest=None):
        self.toc_offset, self.blob_size, self.index, self.digest = toc_offset, blob_size, index, digest
        offsets = sorted(set(e["offset"] for e in toc["entries"] if e.get("offset")))
        following = dict(zip(offsets, offsets[1:] + [toc_offset]))
        self.entries, self.files = {}, {}
        current = None
        for raw in toc["entries"]:
            t = raw.get("type")
            if t == "chunk":
                if current is None:
                    raise ValueError("chunk without reg")
                self._chunk(current, raw, following)
                continue
            e = Entry(raw)
            if e.name in (".no.prefetch.landmark", ".prefetch.landmark", ""):
                current = None
                continue
            self.entries[e.name] = e
            current = e if t == "reg" else None
            if t == "reg":
                self.files[e.name] = e
                if e.size:
                    self._chunk(e, raw, following)

    @staticmethod
    def _chunk(entry, raw, following):
        off = raw.get("chunkOffset", 0)
        size = raw.get("chunkSize") or entry.size - off
        start = raw["offset"]
        entry.chunks.append(Chunk(start, following[start], raw.get("innerOffset", 0), size, off,
                                  raw.get("chunkDigest")))

    @property
    def toc_bytes(self):
        return self.blob_size - self.toc_offset


WHITEOUT, OPAQUE = ".wh.", ".wh..wh..opq"


def merged(layers):
    """path -> (layer index, Entry), merged as overlayfs does: upper layers win, `.wh.NAME`
    deletes NAME (and all below it), `DIR/.wh..wh..opq` hides everything the lower layers
    have below DIR. Whiteout entries themselves are not in the view."""
    view = {}
    for i, layer in enumerate(layers):
        opaque, gone, own = [], [], []
        for name, e in layer.entries.items():
            base = name.rsplit("/", 1)[-1]
            parent = name[:-len(base)].rstrip("/")
            if base == OPAQUE:
                opaque.append(parent)
            elif base.startswith(WHITEOUT) and base != WHITEOUT:
                gone.append((parent + "/" if parent else "") + base[len(WHITEOUT):])
            else:
                own.append((name, e))
        if "" in opaque:
            view = {}
        elif opaque or gone:
            gone, below = set(gone), set(opaque) | set(gone)     # below: hide what is under it

            def hidden(k):
                if k in gone:
                    return True
                while "/" in k:
                    k = k.rsplit("/", 1)[0]
                    if k in below:
                        return True
                return False
            view = {k: v for k, v in view.items() if not hidden(k)}
        for name, e in own:
            view[name] = (i, e)
    return view


def select(layers, pattern):
    """(selected {path: (layer, Entry)}, needed layer indexes) for a get PATH pattern."""
    view = merged(layers)
    p = normalize(pattern)
    if p in view and view[p][1].type != "dir":
        provider = view[p][0]
        return {p: view[p]}, list(range(provider, len(layers)))
    sel = {k: v for k, v in view.items() if not p or k == p or k.startswith(p + "/")}
    return sel, list(range(len(layers)))


def ideal_hints(layers, pattern, toc_offsets):
    """What a perfect client would know in advance (bench/clients.py ideal and curl):
    the needed layers and their TOC offsets, the directories and empty files / symlinks
    to create, and the contiguous runs to fetch with, per gzip member, the file chunks it
    holds: [rel path, mode, inner offset, size, file offset, chunk digest]."""
    sel, needed = select(layers, pattern)
    members, extents, dirs, others = {}, {}, set(), []
    for path, (i, e) in sorted(sel.items()):
        if e.type == "dir":
            dirs.add(path)
            continue
        if "/" in path:
            dirs.add(path.rsplit("/", 1)[0])
        if e.type == "reg" and e.chunks:
            for c in e.chunks:
                members.setdefault((i, c.start), []).append(
                    [path, e.mode & 0o7777, c.inner, c.size, c.file_offset, c.digest])
                extents.setdefault(i, set()).add((c.start, c.end))
        elif e.type == "reg":
            others.append([path, e.mode & 0o7777, None])
        elif e.type == "symlink":
            others.append([path, None, e.link])
    runs = []
    for i in sorted(extents):
        for start, end, parts in runs_of(extents[i]):
            runs.append({"layer": i, "start": start, "end": end,
                         "members": [[s, e, members[(i, s)]] for s, e in parts]})
    return {"needed": needed, "toc_offsets": toc_offsets, "dirs": sorted(d for d in dirs if d),
            "others": others, "runs": runs}


def runs_of(extents):
    """Merge sorted (start, end) extents into contiguous runs [[start, end, [extents]]]."""
    runs = []
    for start, end in sorted(extents):
        if runs and runs[-1][1] == start:
            runs[-1][1] = end
            runs[-1][2].append((start, end))
        else:
            runs.append([start, end, [(start, end)]])
    return runs


def minimum(layers, pattern, manifest_size):
    sel, needed = select(layers, pattern)
    extents = {i: set() for i in range(len(layers))}
    files = {}
    for path, (i, e) in sel.items():
        if e.type == "reg":
            files[path] = (e.size, e.digest)
            for c in e.chunks:
                extents[i].add((c.start, c.end))
    runs = {i: runs_of(x) for i, x in extents.items() if x}
    data = sum(end - start for x in extents.values() for start, end in x)
    toc = sum(layers[i].toc_bytes for i in needed)
    nruns = sum(len(r) for r in runs.values())
    touched = sorted(set(needed) | set(runs))
    return {"pattern": pattern, "files": len(files), "file_bytes": sum(s for s, _ in files.values()),
            "needed_layers": needed, "layers_touched": touched, "data_bytes": data, "toc_bytes": toc,
            "runs": nruns, "bytes": manifest_size + toc + data, "requests": 1 + len(needed) + nruns,
            "warm_bytes": manifest_size + data, "warm_requests": 1 + nruns,
            "expected": files, "dirs": sorted(p for p, (i, e) in sel.items() if e.type == "dir")}
