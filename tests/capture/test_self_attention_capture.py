"""--self-attention: the averaged attn1 matrix of each image, stored, read back and resumable."""

from __future__ import annotations

import numpy as np
import pytest

from ovstore.capture import CaptureConfig, build_requests, capture, run_capture
from ovstore.capture.self_attention import parse_self_attention
from ovstore.errors import InvalidInputError, StoreError
from ovstore.store import open_store, verify_store

PROMPTS = ["a red circle", "a blue square"]


def _reference_probs(pipe):
    """Patch every attn1's ``get_attention_scores`` (run by diffusers' classic AttnProcessor) to
    keep its probabilities: the attention the UNet itself computed, per layer and call."""
    from diffusers.models.attention_processor import AttnProcessor

    seen: dict[str, list] = {}
    originals = []
    for name, module in pipe.unet.named_modules():
        if name.endswith("attn1"):
            original = module.get_attention_scores

            def patched(query, key, mask=None, _name=name, _original=original):
                probs = _original(query, key, mask)
                seen.setdefault(_name, []).append(probs.detach().clone())
                return probs

            module.set_processor(AttnProcessor())
            module.get_attention_scores = patched
            originals.append((module, original))
    return seen, originals


def test_captured_matrix_equals_the_unets_own_attention(tmp_path):
    from conftest import TINY_SD15

    from ovstore.capture import load_pipeline

    pipe, identity = load_pipeline(str(TINY_SD15))  # its own: the reference hooks change how attention is computed
    from ovstore.families import get_family

    family = get_family("unet")
    layers = family.self_attention_layers(pipe, *family.latent_size(pipe, 64, 64))
    grids = sorted({(h, w) for _, h, w, _ in layers})[:2]  # the two coarser grids: the finest costs CPU time
    seen, originals = _reference_probs(pipe)
    processors = pipe.unet.attn_processors
    try:
        requests = build_requests([(p, None, 5) for p in PROMPTS], guidance=7.5, num_inference_steps=3)
        config = CaptureConfig(num_inference_steps=3, guidance=7.5, height=64, width=64, batch_size=2,
                               self_attention=",".join(str(h) for h, _ in grids), calls="1:")
        capture(pipe, identity, requests, tmp_path / "s.zarr", config=config)
    finally:
        for module, original in originals:
            module.get_attention_scores = original
        pipe.unet.set_attn_processor(processors)
    store = open_store(tmp_path / "s.zarr")
    assert store.layout.self_attention == tuple(grids) and store.meta["format_minor_version"] == 1
    n_calls = store.layout.num_unet_calls
    for grid in grids:
        names = [name for name, h, w, _ in layers if (h, w) == grid]
        for image in range(2):
            # CFG batch [uncond0, uncond1, cond0, cond1] x heads; the uncond half is stored
            per_call = []
            for name in names:
                assert len(seen[name]) == n_calls
                for call in range(1, n_calls):  # calls "1:" were stored
                    probs = seen[name][call]
                    heads = probs.shape[0] // 4
                    per_call.append(probs.reshape(4, heads, *probs.shape[1:])[image].mean(0).numpy())
            expected = np.mean(per_call, axis=0)
            got = store.self_attention(image, grid).astype(np.float32)
            assert got.shape == (grid[0] * grid[1],) * 2
            np.testing.assert_allclose(got, expected, atol=2e-3, rtol=1e-2)
            np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=grid[0] * grid[1] * 1e-3)
    assert verify_store(store).ok


def test_rows_sum_to_one_and_the_view_reads_the_same(tmp_path):
    run_capture(prompts=PROMPTS, steps=2, out=tmp_path / "v.zarr", self_attention="16")
    store = open_store(tmp_path / "v.zarr")
    view = store.self_attention_view()
    assert view.dims == ("image", "branch", "query_pixel", "key_pixel") and view.shape == (2, 1, 256, 256)
    for image in range(2):
        matrix = store.self_attention(image)
        assert matrix.dtype == np.float16 and (matrix >= 0).all()
        np.testing.assert_allclose(matrix.astype(np.float32).sum(axis=1), 1.0, atol=0.05)
        np.testing.assert_array_equal(view.isel(image=image, branch=0).values, matrix)
    assert not np.array_equal(store.self_attention(0), store.self_attention(1))  # per image, not shared


def test_reserved_slots_resume_with_the_stores_self_attention(tmp_path):
    direct = tmp_path / "direct.zarr"
    run_capture(prompts=PROMPTS, steps=2, seed=3, out=direct, self_attention="8,16")
    shared = tmp_path / "shared.zarr"
    run_capture(prompts=PROMPTS, steps=2, seed=3, out=shared, self_attention="8,16", reserve_only=True)
    assert open_store(shared).complete_images() == []
    with pytest.raises(StoreError):  # a reserved slot's matrix is not data yet
        open_store(shared).self_attention(0)
    run_capture(out=shared, resume=True)  # the store's settings, self-attention included
    a, b = open_store(direct), open_store(shared)
    assert b.layout.self_attention == ((8, 8), (16, 16)) and b.complete_images() == [0, 1]
    for image in range(2):
        for grid in (8, 16):
            np.testing.assert_array_equal(a.self_attention(image, grid), b.self_attention(image, grid))


def test_a_store_without_self_attention_names_the_capture_option(tmp_path):
    run_capture(prompts=PROMPTS[:1], steps=2, out=tmp_path / "plain.zarr")
    store = open_store(tmp_path / "plain.zarr")
    assert "format_minor_version" not in store.meta and "self_attention" not in store.meta["layout"]
    with pytest.raises(InvalidInputError, match="--self-attention"):
        store.self_attention(0)


@pytest.mark.parametrize("spec, message", [("abc", "not understood"), ("0", "whole number"),
                                           ("7", "run at 16x16")])
def test_bad_self_attention_grids_are_refused_before_a_store_exists(tmp_path, spec, message):
    out = tmp_path / "bad.zarr"
    with pytest.raises(InvalidInputError, match=message):
        run_capture(prompts=PROMPTS[:1], steps=2, out=out, self_attention=spec)
    assert not out.exists()


def test_mmdit_families_refuse_self_attention():
    from ovstore.families import get_family

    for name in ("sd3", "flux"):
        with pytest.raises(InvalidInputError, match="--self-attention.*drop it"):
            get_family(name).self_attention_layers(None, 16, 16)


def test_parse_self_attention():
    assert parse_self_attention("32, 16x16,32") == ((16, 16), (32, 32))
    assert parse_self_attention(None) == () and parse_self_attention("") == ()


def test_kill_while_writing_a_matrix_then_resume_loses_nothing(tmp_path):
    """SIGKILL in the middle of writing image 1's self-attention chunk (half a temporary file
    written), with the fault-injection helpers of tests/reliability/test_kill_points.py: image 0
    stays complete and equal to an uninterrupted run, and `--resume` finishes image 1 exactly."""
    import importlib.util
    import os
    import signal
    from pathlib import Path

    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("fault_injection", root / "scripts" / "fault_injection.py")
    faults = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(faults)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    args = ["capture", "--prompts-file", prompts, "--steps", "2", "--self-attention", "8,16"]
    faults.run_cli(*args, "--out", tmp_path / "reference.zarr")
    out = tmp_path / "killed.zarr"
    status = faults.killed_run(lambda: faults.run_cli(*args, "--out", out), r"/killed\.zarr/self_attention/16x16/c/1/",
                               1, True)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the kill point was not reached"
    assert list(out.rglob("*.partial"))  # a real half-written chunk
    reference, killed = open_store(tmp_path / "reference.zarr"), open_store(out)
    assert killed.complete_images() == [0] and verify_store(killed).ok
    faults.run_cli("capture", "--resume", "--out", out)
    finished = open_store(out)
    assert finished.complete_images() == [0, 1] and verify_store(finished).ok
    for image in range(2):
        for grid in (8, 16):
            np.testing.assert_array_equal(finished.self_attention(image, grid, branch=None),
                                          reference.self_attention(image, grid, branch=None))
        np.testing.assert_array_equal(finished.image(image), reference.image(image))
