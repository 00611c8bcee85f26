"""The viewer's parts without HTTP: the query cache's bounds, the request gate's refusals and
dropping of superseded requests, and the `ovstore serve` entry points."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ovstore.errors import InvalidInputError
from ovstore.serve import Busy, QueryCache, RequestGate, Superseded
from serve_helpers import get, server, served_store, store_before  # noqa: F401 (fixtures)


class _Prepared:
    def __init__(self, n: int) -> None:
        self.data = torch.zeros(n)


def test_query_cache_keeps_the_most_recent_images_within_its_bounds():
    reads = []
    cache = QueryCache(lambda i: (reads.append(i), {"layer": _Prepared(100)})[1], max_images=3, max_bytes=10**6)
    for image in (0, 1, 2, 0, 3):  # 0 is used again before 3 arrives: 1 is the least recent
        cache.get(image)
    assert reads == [0, 1, 2, 3] and cache.images() == [2, 0, 3]
    assert (cache.hits, cache.misses) == (1, 4)
    small = QueryCache(lambda i: {"layer": _Prepared(100)}, max_images=10, max_bytes=900)  # 400 bytes an image
    for image in range(5):
        small.get(image)
    assert small.images() == [3, 4] and small.nbytes == 800
    huge = QueryCache(lambda i: {"layer": _Prepared(10**4)}, max_images=10, max_bytes=1)
    huge.get(0)
    huge.get(1)
    assert huge.images() == [1]  # the most recent image is kept whatever its size


def test_concurrent_misses_of_one_image_read_it_once():
    reads = []

    def slow(image):
        reads.append(image)
        time.sleep(0.2)
        return {"layer": _Prepared(10)}

    cache = QueryCache(slow)
    threads = [threading.Thread(target=cache.get, args=(7,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reads == [7]


def test_gate_refuses_beyond_its_queue_and_drops_superseded_requests():
    gate = RequestGate(active=1, waiting=1, wait_s=5)
    release = threading.Event()
    holder = threading.Thread(target=gate.run, args=(release.wait,))
    holder.start()
    time.sleep(0.05)
    outcome = {}

    def waiting(seq):
        try:
            outcome[seq] = gate.run(lambda: "ran", "tab-A", seq)
        except (Busy, Superseded) as exc:
            outcome[seq] = type(exc).__name__

    first = threading.Thread(target=waiting, args=(1,))
    first.start()
    time.sleep(0.05)
    with pytest.raises(Busy):  # one running, one waiting: the queue is full
        gate.run(lambda: None)
    gate.note("tab-A", 2)  # the user typed on: request 1 of this view is dropped before it runs
    first.join(timeout=5)
    release.set()
    holder.join(timeout=5)
    assert outcome == {1: "Superseded"}
    assert gate.run(lambda: "ran", "tab-A", 3) == "ran"
    assert (gate.dropped, gate.refused) == (1, 1)


def test_gate_gives_up_after_its_wait():
    gate = RequestGate(active=1, waiting=4, wait_s=0.1)
    release = threading.Event()
    holder = threading.Thread(target=gate.run, args=(release.wait,))
    holder.start()
    time.sleep(0.05)
    with pytest.raises(Busy, match="within 0.1 s"):
        gate.run(lambda: None)
    release.set()
    holder.join()


def test_serve_prints_the_url_and_warns_off_loopback(served_store):
    from ovstore.serve import serve

    lines, servers = [], []
    thread = threading.Thread(target=serve, args=(served_store,),
                              kwargs=dict(host="127.0.0.2", port=0, announce=lines.append, ready=servers.append))
    thread.start()
    deadline = time.monotonic() + 60
    while not servers and time.monotonic() < deadline:
        time.sleep(0.05)
    server = servers[0]
    assert get(server, "/api/info")[0] == 200
    server.shutdown()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert "no authentication" in lines[0] and "127.0.0.2" in lines[0]
    assert lines[1].startswith(f"serving {served_store}") and server.url in lines[1]


def test_a_port_in_use_is_a_one_line_error(server):
    from ovstore.serve import make_app

    with pytest.raises(InvalidInputError, match="cannot listen on 127.0.0.1:.*choose another --port"):
        make_app(server.service, port=server.server_address[1])


def test_cli_serve_refuses_a_missing_store_in_one_line(tmp_path, monkeypatch, capsys):
    import sys

    from ovstore.cli import main

    monkeypatch.setattr(sys, "argv", ["ovstore", "serve", str(tmp_path / "nothing.zarr"), "--port", "0"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "does not exist" in err[0]
