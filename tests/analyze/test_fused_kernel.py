"""The fused CPU kernel of the maps engine: the same maps as torch's operations (tail blocks,
shared beginnings, every token count), the same with several threads, adding or writing, and
the engine's fallback where the kernel is off, cannot be built, or scores are unbounded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ovstore.analyze import engine
from ovstore.analyze.kernel import fused_kernel, fused_maps

needs_kernel = pytest.mark.skipif(fused_kernel() is None, reason="no C compiler: the engine uses torch's operations")


def _case(heads: int, channels: int, steps: int, pixels: int, lengths: list[int], shared: int, scale: float = 0.4,
          seed: int = 0):
    """Prepared queries, keys in engine order and buckets for prompts of ``lengths`` tokens
    whose first ``shared`` rows are common to all."""
    g = torch.Generator().manual_seed(seed)
    queries = engine.prepare_queries(torch.randn(steps, heads, pixels, channels, generator=g) * scale)
    rows, keys, offsets = [], [], [0]
    common = torch.randn(shared, heads * channels, generator=g)
    for p, n in enumerate(lengths):
        own = torch.randn(n - min(shared, n), heads * channels, generator=g)
        keys.append(torch.cat([common[:min(shared, n)], own]))
        rows += [("shared", t) if t < shared else (p, t) for t in range(n)]
        offsets.append(offsets[-1] + n)
    keys = torch.cat(keys).view(-1, heads, channels).transpose(0, 1) * scale  # (head, token, channel)
    buckets = engine.TokenBuckets.from_offsets(offsets, rows)
    return queries, keys[:, buckets.order].contiguous(), buckets


def _torch_maps(queries, keys, buckets, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(engine, "fused_kernel", lambda: None)
        return engine.ordered_token_maps(queries, keys, buckets)


def _direct_maps(queries, keys, buckets):
    """Softmax over each prompt's tokens, summed over steps and heads, one prompt at a time."""
    q = queries.data  # (head, channel, step*pixel)
    out = torch.zeros(buckets.total, queries.pixels, dtype=torch.float64)
    for n, start, stop in buckets.groups:
        for c0 in range(start, stop, n):
            scores = torch.einsum("htc,hcx->htx", keys[:, c0:c0 + n].double(), q.double())
            maps = scores.softmax(dim=1).view(keys.shape[0], n, queries.steps, queries.pixels)
            out[c0:c0 + n] = maps.sum(dim=(0, 2))
    return out


@needs_kernel
@pytest.mark.parametrize("heads,channels,steps,pixels,shared", [
    (4, 8, 3, 100, 0),     # a tail block of 36 pixels
    (3, 5, 2, 64, 1),      # odd channel count, one exact block, start-of-text shared
    (2, 40, 1, 130, 4),    # SD-like channels, a shared beginning of four rows
    (1, 3, 5, 7, 2),       # fewer pixels than one vector
])
def test_fused_equals_torch_and_direct(heads, channels, steps, pixels, shared, monkeypatch):
    lengths = [max(shared + 1, n) for n in (1, 2, 3, 4, 5, 7, 9, 13, 13, 13, 5, 5, 5, 5, 5, 5, 5, 5, 5)]
    queries, keys, buckets = _case(heads, channels, steps, pixels, lengths, shared)
    fused = engine.ordered_token_maps(queries, keys, buckets)
    plain = _torch_maps(queries, keys, buckets, monkeypatch)
    direct = _direct_maps(queries, keys, buckets)
    assert torch.allclose(fused.double(), direct, rtol=2e-6, atol=1e-6)
    assert torch.allclose(fused, plain, rtol=2e-6, atol=1e-6)
    # every token's map sums over steps and heads of a softmax: summed over a prompt's tokens,
    # each pixel gets steps * heads
    for n, start, stop in buckets.groups:
        per_prompt = fused[start:stop].view(-1, n, pixels).sum(dim=1)
        assert torch.allclose(per_prompt, torch.full_like(per_prompt, steps * heads), rtol=1e-5)


@needs_kernel
def test_threads_write_and_accumulate():
    queries, keys, buckets = _case(4, 8, 3, 300, [13] * 20, shared=5)
    keys_log2e = (keys * engine._LOG2_E).contiguous()
    n, start, stop = buckets.groups[0]
    shared = buckets.shared_prefix(start, stop, n)
    assert shared == 5
    one = torch.zeros(buckets.total, queries.pixels)
    assert fused_maps(keys_log2e, start, stop, n, shared, queries.data, queries.steps, queries.pixels, one)
    three = torch.full((buckets.total, queries.pixels), float("nan"))
    assert fused_maps(keys_log2e, start, stop, n, shared, queries.data, queries.steps, queries.pixels, three,
                      threads=3, accumulate=False)
    assert torch.equal(one, three)  # pixel ranges split between threads: the same arithmetic per pixel
    assert fused_maps(keys_log2e, start, stop, n, shared, queries.data, queries.steps, queries.pixels, one)
    assert torch.allclose(one, 2 * three, rtol=1e-6)


def test_unbounded_scores_take_torch(monkeypatch):
    """Scores beyond the overflow-free range go through the max-subtracting softmax."""
    queries, keys, buckets = _case(2, 8, 2, 70, [3, 3, 6], shared=1, scale=6.0)
    assert queries.max_norm * float(keys.norm(dim=2).amax()) >= engine._SAFE_EXP
    maps = engine.ordered_token_maps(queries, keys, buckets)
    assert torch.isfinite(maps).all()
    assert torch.allclose(maps.double(), _direct_maps(queries, keys, buckets), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_an_unusable_cache_folder_builds_in_a_temporary_one(tmp_path):
    """A kernel cache that cannot be written (here: a path below a file) is not the end: the
    kernel is built in a temporary folder instead."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = "from ovstore.analyze import kernel; assert kernel.fused_kernel() is not None; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OVSTORE_KERNEL_CACHE": str(blocker / "kernels")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("env", [{"OVSTORE_FUSED_KERNEL": "0"}, {"CC": "/bin/false"}])
def test_off_or_unbuildable_falls_back(env, tmp_path):
    """Turned off, or with a compiler that fails (and an empty kernel cache), the engine still
    computes the maps, with torch's operations."""
    code = ("import torch; from ovstore.analyze import kernel, engine; "
            "assert kernel.fused_kernel() is None; "
            "q = engine.prepare_queries(torch.randn(2, 2, 30, 4)); k = torch.randn(2, 6, 4); "
            "b = engine.TokenBuckets.from_offsets([0, 3, 6]); m = engine.ordered_token_maps(q, k, b); "
            "assert torch.allclose(m.view(2, 3, 30).sum(1), torch.full((2, 30), 4.0)); print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OVSTORE_KERNEL_CACHE": str(tmp_path), **env})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    if "CC" in env:
        assert "could not be built" in result.stderr


@pytest.mark.parametrize("kernel", [True, False])
def test_out_adds_layers_in_place(kernel, monkeypatch):
    """``ordered_token_maps(..., out=)`` adds to ``out`` (layers of one resolution summed with
    no pass of their own), by the kernel or by torch's operations alike."""
    if kernel and fused_kernel() is None:
        pytest.skip("no C compiler")
    if not kernel:
        monkeypatch.setattr(engine, "fused_kernel", lambda: None)
    first, keys, buckets = _case(3, 8, 2, 90, [2, 4, 4, 7], shared=1, seed=1)
    second, _, _ = _case(3, 8, 2, 90, [2, 4, 4, 7], shared=1, seed=2)
    one = engine.ordered_token_maps(first, keys, buckets)
    two = engine.ordered_token_maps(second, keys, buckets)
    total = one.clone()
    result = engine.ordered_token_maps(second, keys, buckets, out=total)
    assert result.data_ptr() == total.data_ptr()
    assert torch.allclose(total, one + two, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_narrow_build_equals_direct(tmp_path, monkeypatch):
    """The build for CPUs without AVX-512 (two vectors a block, ``-DNV=2``) gives the same maps."""
    import shutil
    from importlib import resources

    from ovstore.analyze import kernel

    source = tmp_path / "fused_maps.c"
    source.write_bytes(resources.files("ovstore.analyze").joinpath("_fused_maps.c").read_bytes())
    built = tmp_path / "narrow.so"
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    subprocess.run([compiler, "-O3", "-ffp-contract=fast", "-fPIC", "-shared", "-DNV=2", str(source), "-o",
                    str(built)], check=True, capture_output=True, timeout=120)
    monkeypatch.setattr(kernel, "_loaded", kernel._load(built))
    queries, keys, buckets = _case(3, 8, 2, 100, [2, 3, 5, 5, 5, 9, 13], shared=1)
    fused = engine.ordered_token_maps(queries, keys, buckets)
    assert torch.allclose(fused.double(), _direct_maps(queries, keys, buckets), rtol=2e-6, atol=1e-6)
