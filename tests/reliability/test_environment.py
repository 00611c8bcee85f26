"""The machine a command runs on: a ``--device`` this torch cannot use, a ``--scheduler``
address that is malformed or that nothing answers. One line, exit 2, before any work, nothing
written."""

from __future__ import annotations

import socket

import pytest
import torch

from reliability_helpers import digest, run_cli
from test_bad_input import TINY

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")

#: (id, command line, expected part of the message); {store}, {out}, {mask} filled in
DEVICE_CASES = [
    pytest.param("maps cuda", ["maps", "{store}", "-a", "cat", "--out", "{out}/m.npy", "--device", "cuda"],
                 "has no CUDA device", marks=NO_CUDA),
    pytest.param("maps --skip-damaged cuda", ["maps", "{store}", "-a", "cat", "--out", "{out}/m.zarr", "--skip-damaged",
                                              "--device", "cuda"], "use --device cpu", marks=NO_CUDA),
    pytest.param("label cuda", ["label", "{store}", "--classes", "cat", "--out", "{out}/lab", "--scheduler",
                                "synchronous", "--device", "cuda:0"], "has no CUDA device", marks=NO_CUDA),
    pytest.param("optimize cuda", ["optimize", "{store}", "--image", "0", "--mask", "{mask}", "--init", "cat",
                                   "--epochs", "2", "--out", "{out}/t.safetensors", "--device", "cuda"],
                 "install a CUDA build of torch", marks=NO_CUDA),
    pytest.param("capture cuda", ["capture", str(TINY), "--prompt", "x", "--steps", "2", "--out", "{out}/c.zarr",
                                  "--device", "cuda"], "has no CUDA device", marks=NO_CUDA),
    pytest.param("maps gpu", ["maps", "{store}", "-a", "cat", "--out", "{out}/m.npy", "--device", "gpu"],
                 "--device 'gpu' is not a torch device; write cpu, cuda or cuda:N"),
    pytest.param("label cuda:x", ["label", "{store}", "--classes", "cat", "--out", "{out}/lab", "--device", "cuda:x"],
                 "--device 'cuda:x' is not a torch device"),
    pytest.param("optimize meta", ["optimize", "{store}", "--image", "0", "--mask", "{mask}", "--init", "cat",
                                   "--out", "{out}/t.safetensors", "--device", "meta"], "ovstore computes on cpu"),
    pytest.param("capture gpu", ["capture", str(TINY), "--prompt", "x", "--out", "{out}/c.zarr", "--device", "gpu"],
                 "is not a torch device"),
    pytest.param("demo cuda:x", ["demo", "--out", "{out}/demo", "--device", "cuda:x"], "is not a torch device"),
]


@pytest.fixture(scope="module")
def mask(tmp_path_factory):
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("mask") / "mask.png"
    good = np.zeros((64, 64), np.uint8)
    good[10:30, 10:30] = 255
    Image.fromarray(good).save(path)
    return path


@pytest.mark.parametrize("what,args,message", DEVICE_CASES)
def test_unusable_devices_are_refused_before_any_work(multi_store, mask, monkeypatch, capsys, tmp_path, what, args,
                                                       message):
    before = digest(multi_store)
    line = run_cli(monkeypatch, capsys, *[a.format(store=multi_store, out=tmp_path, mask=mask) for a in args])
    assert message in line, line
    assert digest(multi_store) == before and list(tmp_path.iterdir()) == []


def test_every_device_entry_checks_the_device(multi_store, tmp_path):
    """The Python API refuses too, at each command's library entry."""
    from ovstore.analyze import compute_maps, write_maps_zarr
    from ovstore.capture import load_pipeline
    from ovstore.errors import InvalidInputError
    from ovstore.label import LabelConfig, label_store
    from ovstore.optimize import TokenTask, optimize_tokens

    calls = [lambda: compute_maps(multi_store, "a cat", device="gpu"),
             lambda: write_maps_zarr(multi_store, "a cat", tmp_path / "never.zarr", device="gpu"),
             lambda: optimize_tokens(multi_store, [TokenTask("cat", (0,), ("none.png",))], device="gpu"),
             lambda: label_store(multi_store, tmp_path / "never", LabelConfig(classes=("cat",)), device="gpu"),
             lambda: load_pipeline(str(TINY), device="gpu")]
    for call in calls:
        with pytest.raises(InvalidInputError, match="not a torch device"):
            call()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- --scheduler
@pytest.mark.parametrize("address,message", [
    ("foo", "--scheduler 'foo' is not a scheduler address; write tcp://HOST:PORT"),
    ("tcp://", "is not a scheduler address"),
    ("tcp://host:notaport", "is not a scheduler address"),
    ("tcp://host", "listens on 8786 by default"),
    ("tcp://host:99999", "is not a scheduler address"),
    ("htp://host:8786", "protocol 'htp' is not one of"),
    ("threads", "or 'synchronous' to run in this process"),
])
def test_malformed_scheduler_addresses(multi_store, monkeypatch, capsys, tmp_path, address, message):
    before = digest(multi_store)
    line = run_cli(monkeypatch, capsys, "label", multi_store, "--classes", "cat", "--out", tmp_path / "lab",
                   "--scheduler", address)
    assert message in line, line
    assert digest(multi_store) == before and list(tmp_path.iterdir()) == []


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_scheduler(multi_store, monkeypatch, capsys, tmp_path):
    from ovstore import cluster

    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 1.0)  # the default is 5 s
    address = f"tcp://127.0.0.1:{closed_port()}"
    before = digest(multi_store)
    line = run_cli(monkeypatch, capsys, "label", multi_store, "--classes", "cat", "--out", tmp_path / "lab",
                   "--scheduler", address)
    assert f"no Dask scheduler answered at {address} within 1 s" in line and "nothing was written" in line, line
    assert digest(multi_store) == before and list(tmp_path.iterdir()) == []
    # a bare HOST:PORT is tcp, as Dask reads it
    assert cluster.check_scheduler_address("127.0.0.1:8786") == "tcp://127.0.0.1:8786"
    assert cluster.check_scheduler_address("tcp://[::1]:8786") == "tcp://[::1]:8786"


def test_a_scheduler_address_that_answers_is_used(multi_store, tmp_path):
    from distributed import LocalCluster

    from ovstore.label import LabelConfig, label_store

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        result = label_store(multi_store, tmp_path / "lab", LabelConfig(classes=("cat",)), images=[0],
                             scheduler=cluster.scheduler_address)
    assert result.labelled == (0,) and (tmp_path / "lab" / "annotations.json").exists()
