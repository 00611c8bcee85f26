"""Shared fixtures: the golden reference case and session-wide captures of the tiny pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # the golden files were made with one thread

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden"
TINY_SD15 = GOLDEN / "tiny-sd15"
CASE = GOLDEN / "cases" / "public-basic"


@pytest.fixture(scope="session")
def golden_case() -> dict:
    case = json.loads((CASE / "case.json").read_text())
    case["maps"] = np.load(CASE / "maps.npy")
    case["maps_expanded"] = np.load(CASE / "maps_expanded.npy")
    case["queries"] = dict(np.load(CASE / "queries.npz"))
    case["text_embedding"] = np.load(CASE / "text_embedding.npy")
    from PIL import Image

    case["image"] = np.asarray(Image.open(CASE / "image.png").convert("RGB"))
    return case


@pytest.fixture(scope="session")
def tiny_pipe():
    from ovstore.capture import load_pipeline

    return load_pipeline(str(TINY_SD15))


@pytest.fixture(scope="session")
def golden_store(tmp_path_factory, tiny_pipe, golden_case):
    """The golden case captured in float32, as the reference stores it."""
    from ovstore.capture import CaptureConfig, build_requests, capture

    pipe, identity = tiny_pipe
    out = tmp_path_factory.mktemp("golden") / "golden.zarr"
    requests = build_requests([(golden_case["prompt"], None, golden_case["seed"])],
                              guidance=golden_case["guidance"], num_inference_steps=golden_case["steps"])
    config = CaptureConfig(num_inference_steps=golden_case["steps"], guidance=golden_case["guidance"], dtype="float32")
    capture(pipe, identity, requests, out, config=config)
    return out


@pytest.fixture(scope="session")
def multi_store(tmp_path_factory, tiny_pipe):
    """Three images in float16 with every layer, batch size 2."""
    from ovstore.capture import CaptureConfig, build_requests, capture

    pipe, identity = tiny_pipe
    out = tmp_path_factory.mktemp("multi") / "multi.zarr"
    requests = build_requests([("a cat on a sofa", None, None), ("a red car", "blurry", None),
                               ("a dog in a park", None, 42)], seed=7, num_inference_steps=4)
    capture(pipe, identity, requests, out, config=CaptureConfig(num_inference_steps=4, batch_size=2))
    return out


@pytest.fixture(scope="session")
def dask_cluster():
    """One LocalCluster of two worker processes for every test that runs on Dask (a cluster's
    workers take seconds to start and import torch; they are started once)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster


@pytest.fixture
def dask_client(dask_cluster):
    """A client of :func:`dask_cluster`, with both workers up (a test may have killed one)."""
    from distributed import Client

    with Client(dask_cluster) as client:
        client.wait_for_workers(2, timeout=120)
        yield client
