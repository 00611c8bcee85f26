"""--generation-context maps equal the attention hooked during generation (the public cases
of the online golden data, copied to tests/data/online), within 1e-4 of max|golden|."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DATA = Path(__file__).parent.parent / "data"
CASES = DATA / "online" / "cases"
PIPELINES = {"sd15": DATA / "golden" / "tiny-sd15", "sdxl": DATA / "online" / "sdxl-pipeline"}


def _capture(pipe_and_identity, case, out):
    from ovstore.capture import CaptureConfig, build_requests, capture

    pipe, identity = pipe_and_identity
    requests = build_requests([(case["prompt"], case["negative_prompt"], case["seed"])],
                              guidance=case["guidance_scale"], num_inference_steps=case["steps"])
    config = CaptureConfig(num_inference_steps=case["steps"], guidance=case["guidance_scale"], dtype="float32",
                           branch="cond", height=case["height"], width=case["width"])
    capture(pipe, identity, requests, out, config=config)
    return out


@pytest.fixture(scope="module")
def pipes(tiny_pipe):
    from ovstore.capture import load_pipeline

    return {"sd15": tiny_pipe, "sdxl": load_pipeline(str(PIPELINES["sdxl"]))}


@pytest.mark.parametrize("name", ["sd15-cfg", "sdxl-cfg", "sdxl-nocfg"])
def test_generation_context_maps_equal_online_golden(name, pipes, tmp_path):
    from ovstore.analyze import compute_context_maps
    from ovstore.store import open_store

    case = json.loads((CASES / name / "case.json").read_text())
    golden = np.load(CASES / name / "maps.npy")
    store = open_store(_capture(pipes[case["family"]], case, tmp_path / "store.zarr"))
    assert store.layout.model.family == "unet"
    assert store.branch_labels(0) == ((case["stored_branch"]) if case["stored_branch"] != "none" else "cond",)
    # the golden README allows one grey level between float32 summation orders
    image = np.asarray(Image.open(CASES / name / "image.png").convert("RGB")).astype(int)
    assert np.abs(store.image(0).astype(int) - image).max() <= 1
    embeddings, ids = store.context(0, 0)
    assert list(ids) == case["context_token_ids"]
    np.testing.assert_allclose(embeddings, np.load(CASES / name / "encoder_hidden_states.npy"), rtol=0, atol=1e-5)

    maps = compute_context_maps(store)
    assert maps.shape == (1, *golden.shape)
    assert list(maps.token_str.values[0]) == case["context_tokens"]
    diff = np.abs(maps.values[0] - golden).max()
    assert diff <= 1e-4 * np.abs(golden).max(), (diff, np.abs(golden).max())
    # the model's probabilities: per pixel, tokens sum to calls x heads of the summed layers
    np.testing.assert_allclose(maps.values[0].sum(0), case["token_sum_per_pixel"]["value"], rtol=1e-5)
