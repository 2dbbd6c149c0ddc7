"""Performance behaviour locked in by tests (not timed): requests, connections, cache."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "testdata"))
sys.path.insert(0, HERE)

import starget  # noqa: E402
from harness import registry_anon, run_cli, expected_files, compare_tree, walk_tree  # noqa: E402,F401


def _client(registry, layout, **transport_options):
    transport = starget.Transport(retry=starget.RetryPolicy(retries=2, base=0.01), **transport_options)
    return starget.RegistryClient(registry.image(layout), transport=transport)


def _blob_requests(stderr):
    return [line for line in stderr.splitlines() if "> GET" in line and "/blobs/" in line]


# ---- transport -------------------------------------------------------------

def test_one_connection_serves_every_request_of_a_sequential_get(registry_anon, tmp_path):
    client = _client(registry_anon, "layers")
    index = starget.open_image(client.ref, client=client, concurrency=1)
    stats = starget.Downloader(client, concurrency=1).download(index, ".", str(tmp_path))
    assert not stats.failures
    assert client.transport.stats.requests >= 4          # manifest + 3 TOCs + data
    assert client.transport.stats.connections == 1


def test_no_proxy_and_loopback_are_never_proxied():
    transport = starget.Transport(environ={"HTTPS_PROXY": "http://proxy.invalid:3128",
                                           "NO_PROXY": ".corp.example,mirror.local:5000"})
    url = starget._URL
    assert transport._proxy_for(url("https://registry.corp.example/v2/")) is None
    assert transport._proxy_for(url("https://mirror.local:5000/v2/")) is None
    assert transport._proxy_for(url("https://mirror.local/v2/")) == "http://proxy.invalid:3128"
    assert transport._proxy_for(url("https://127.0.0.1:5000/v2/")) is None
    assert transport._proxy_for(url("http://other.example/v2/")) is None   # no HTTP_PROXY set


# ---- image index: footer, TOC and the cache ----------------------------------

@pytest.mark.parametrize("layout", ["basic", "layers", "legacy", "minchunk"])
def test_footer_and_small_toc_come_in_one_request_per_layer(registry_anon, layout):
    client = _client(registry_anon, layout)
    index = starget.open_image(client.ref, client=client, cache=None)
    layers = len(index.layers)
    assert client.transport.stats.requests == 1 + layers   # the manifest, then one tail read each


def test_a_toc_bigger_than_the_tail_read_costs_one_more_request(registry_anon, monkeypatch):
    monkeypatch.setattr(starget, "TAIL_READ_SIZE", 512)
    client = _client(registry_anon, "basic")
    index = starget.open_image(client.ref, client=client, cache=None)
    assert client.transport.stats.requests == 1 + 2
    expected = expected_files("basic", "latest")
    assert sorted(e.path for e in index.entries()) == sorted(p for p in expected if p)


def test_warm_cache_fetches_no_toc(registry_anon, tmp_path):
    cache = starget.TOCCache(str(tmp_path / "cache"))
    cold = _client(registry_anon, "layers")
    starget.open_image(cold.ref, client=cold, cache=cache)
    warm = _client(registry_anon, "layers")
    index = starget.open_image(warm.ref, client=warm, cache=cache)
    assert warm.transport.stats.requests == 1              # the manifest only
    assert len(index.entries()) == len([p for p in expected_files("layers", "latest") if p])


def test_warm_ls_from_the_command_line_makes_no_blob_request(registry_anon, tmp_path):
    env = {"STARGET_CACHE_DIR": str(tmp_path / "cache")}
    image = registry_anon.image("layers")
    rc, first, err1 = run_cli("-d", "ls", image, env=env)
    assert rc == 0 and len(_blob_requests(err1)) == 3
    rc, second, err2 = run_cli("-d", "ls", image, env=env)
    assert rc == 0 and second == first
    assert _blob_requests(err2) == []
    rc, _, err3 = run_cli("-d", "--no-cache", "ls", image, env=env)
    assert rc == 0 and len(_blob_requests(err3)) == 3


def test_a_corrupt_cache_entry_is_ignored_and_refetched(registry_anon, tmp_path):
    cache = starget.TOCCache(str(tmp_path / "cache"))
    client = _client(registry_anon, "basic")
    starget.open_image(client.ref, client=client, cache=cache)
    [entry] = os.listdir(str(tmp_path / "cache" / "toc"))
    path = tmp_path / "cache" / "toc" / entry
    data = path.read_bytes()
    path.write_bytes(data[:-10] + b"x" * 10)
    again = _client(registry_anon, "basic")
    index = starget.open_image(again.ref, client=again, cache=cache)
    assert again.transport.stats.requests == 2             # manifest + the TOC again
    assert index.find_file("bin/busybox") is not None


# ---- download: the fewest requests -------------------------------------------

@pytest.mark.parametrize("layout,pattern", [("basic", "."), ("basic", "etc/"), ("minchunk", "."),
                                            ("layers", ".")])
def test_requests_do_not_grow_with_the_number_of_files(registry_anon, tmp_path, layout, pattern):
    client = _client(registry_anon, layout)
    index = starget.open_image(client.ref, client=client, cache=None)
    job = starget.DownloadJob(index, pattern, str(tmp_path))
    before = client.transport.stats.requests
    stats = starget.Downloader(client, concurrency=4).download(index, pattern, str(tmp_path))
    data_requests = client.transport.stats.requests - before
    files = len([e for e in job.regular])
    layers_touched = len(set(e.content.blob for e in job.regular))
    payload = sum(c.end - c.offset for e in job.regular for c in e.content.chunks)
    assert not stats.failures
    assert files > layers_touched
    assert data_requests <= layers_touched + payload // starget.PART_SIZE + 1
    prefix = "" if pattern == "." else pattern.rstrip("/")
    assert compare_tree(expected_files(layout, "latest"), walk_tree(str(tmp_path)), prefix=prefix) == []


def test_plan_coalesces_small_gaps_and_splits_long_runs():
    def task(chunks, blob="sha256:" + "a" * 64):
        entry = starget.TOCEntry("f%d" % len(chunks), "reg", size=sum(c.size for c in chunks))
        entry.chunks, entry.blob = chunks, blob
        return starget._FileTask(entry, entry.path, "/nonexistent/" + entry.path)

    mib = 1 << 20
    near = task([starget.Chunk(0, 10, 100, 0, None, end=200), starget.Chunk(10, 10, 300, 0, None, end=400)])
    far = task([starget.Chunk(0, 10, 10 * mib, 0, None, end=10 * mib + 50)])
    ranges = starget.DownloadJob.plan_ranges([near, far], concurrency=4, gap=starget.COALESCE_GAP)
    assert [(m[0].offset, m[-1].end) for _, m in ranges] == [(100, 400), (10 * mib, 10 * mib + 50)]

    big = task([starget.Chunk(i * 4 * mib, 4 * mib, 1 + i * 4 * mib, 0, None, end=1 + (i + 1) * 4 * mib)
                for i in range(8)])
    ranges = starget.DownloadJob.plan_ranges([big], concurrency=4)
    assert len(ranges) == 4                                # 32 MiB cut for 4 workers
    assert ranges[0][1][0].offset == 1 and ranges[-1][1][-1].end == 1 + 32 * mib
    starts = [m[0].offset for _, m in ranges]
    assert starts == sorted(starts)
    ranges = starget.DownloadJob.plan_ranges([big], concurrency=1)
    assert len(ranges) == 1                                # one worker: one request


def test_a_remembered_redirect_skips_the_registry(httpserver, tmp_path):
    """After one blob redirect, the next ranges of that blob go straight to storage."""
    from harness import OCIServer
    from pytest_httpserver import HTTPServer
    storage_server = HTTPServer(host="127.0.0.1")
    storage_server.start()
    try:
        storage = OCIServer(storage_server, storage=True)
        registry = OCIServer(httpserver, redirect_to=storage.base_url)
        registry.add_layout("fixtures/basic", "basic")
        storage.add_layout("fixtures/basic", "basic")
        client = starget.RegistryClient(registry.image("fixtures/basic"))
        index = starget.open_image(client.ref, client=client, cache=None)
        stats = starget.Downloader(client, concurrency=1).download(index, "bin/", str(tmp_path))
        assert not stats.failures
        registry_blob_gets = [r for r in registry.requests if "/blobs/" in r[1]]
        storage_gets = [r for r in storage.requests if r[0] == "GET"]
        assert len(registry_blob_gets) == 1
        assert len(storage_gets) >= 2
    finally:
        storage_server.stop()
