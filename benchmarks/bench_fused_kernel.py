"""A fused score-softmax-sum kernel over a tile (numba), beside the engine, on one layer of the
tiny store's shape: the experiment behind "a fused kernel" in BENCHMARKS.md.

For each prompt, head and block of ``BX`` columns (stored call x pixel) the kernel computes the
prompt's scores against the block's queries, their exponentials (``exp2`` of log2(e)-scaled keys
as a degree-6 polynomial on the fraction and the integer part added to the exponent bits, so the
loop vectorizes without SVML), one reciprocal per column and the normalised maps added into the
output, without writing scores to memory between those steps. It is checked against the engine
(``ordered_token_maps``) on the same random queries and keys and timed beside it and beside the
exp + matmul bound. Needs numba (``pip install numba``), which ovstore itself does not use.

    python benchmarks/bench_fused_kernel.py [--prompts 1000] [--heads 4] [--channels 8] [--calls 11] [--pixels 1024]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

try:
    import numba as nb
except ImportError:
    sys.exit("bench_fused_kernel.py needs numba: pip install numba")


@nb.njit(fastmath=True, boundscheck=False)
def softmax_sum(q, keys, offsets, P, out, buf, ibuf):
    """``out (T, P) +=`` the token softmax summed over heads and calls: ``q (H, C, calls*P)``,
    ``keys (H, T, C)`` scaled by log2(e), prompt ``g`` the tokens ``offsets[g]:offsets[g+1]``."""
    H, C, X = q.shape
    BX = buf.shape[1]
    for g in range(offsets.shape[0] - 1):
        t0 = offsets[g]; n = offsets[g + 1] - t0
        for h in range(H):
            for x0 in range(0, X, BX):
                px0 = x0 % P
                for j in range(n):
                    row = buf[j]
                    for xx in range(BX):
                        row[xx] = 0.0
                    # eight channels per pass: one load and store of the score row per eight products
                    for c0 in range(0, C - 7, 8):
                        k = keys[h, t0 + j, c0:c0 + 8]
                        q0 = q[h, c0, x0:x0 + BX]
                        q1 = q[h, c0 + 1, x0:x0 + BX]
                        q2 = q[h, c0 + 2, x0:x0 + BX]
                        q3 = q[h, c0 + 3, x0:x0 + BX]
                        q4 = q[h, c0 + 4, x0:x0 + BX]
                        q5 = q[h, c0 + 5, x0:x0 + BX]
                        q6 = q[h, c0 + 6, x0:x0 + BX]
                        q7 = q[h, c0 + 7, x0:x0 + BX]
                        k0, k1, k2, k3, k4, k5, k6, k7 = k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]
                        for xx in range(BX):
                            row[xx] += (k0 * q0[xx] + k1 * q1[xx] + k2 * q2[xx] + k3 * q3[xx]
                                        + k4 * q4[xx] + k5 * q5[xx] + k6 * q6[xx] + k7 * q7[xx])
                    for c in range(C - C % 8, C):
                        kc = keys[h, t0 + j, c]
                        qs = q[h, c, x0:x0 + BX]
                        for xx in range(BX):
                            row[xx] += kc * qs[xx]
                    # exp2: 2^i * p(f), f in [-0.5, 0.5]
                    irow = ibuf[j]
                    for xx in range(BX):
                        v = row[xx]
                        ri = np.int32(v + np.float32(128.5)) - 128
                        r = np.float32(ri)
                        f = v - r
                        p = np.float32(1.535336188319500e-4)
                        p = p * f + np.float32(1.339887440266574e-3)
                        p = p * f + np.float32(9.618437357674640e-3)
                        p = p * f + np.float32(5.550332471162809e-2)
                        p = p * f + np.float32(2.402264791363012e-1)
                        p = p * f + np.float32(6.931472028550421e-1)
                        p = p * f + np.float32(1.0)
                        row[xx] = p
                        irow[xx] = ri << 23
                    rowi = row.view(np.int32)
                    for xx in range(BX):
                        rowi[xx] += irow[xx]
                # normalise and accumulate
                s = buf[n]
                for xx in range(BX):
                    s[xx] = 0.0
                for j in range(n):
                    row = buf[j]
                    for xx in range(BX):
                        s[xx] += row[xx]
                for xx in range(BX):
                    s[xx] = np.float32(1.0) / s[xx]
                for j in range(n):
                    row = buf[j]; o = out[t0 + j, px0:px0 + BX]
                    for xx in range(BX):
                        o[xx] += row[xx] * s[xx]


def run(q: np.ndarray, keys: np.ndarray, offsets: np.ndarray, pixels: int, block: int) -> np.ndarray:
    out = np.zeros((keys.shape[1], pixels), np.float32)
    longest = int(np.max(np.diff(offsets)))
    buf = np.empty((longest + 1, block), np.float32)
    ibuf = np.empty((longest + 1, block), np.int32)
    softmax_sum(q, keys, offsets, pixels, out, buf, ibuf)
    return out


def main() -> None:
    from ovstore.analyze.engine import PreparedQueries, TokenBuckets, ordered_token_maps

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--calls", type=int, default=11)
    parser.add_argument("--pixels", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    heads, channels, calls, pixels = args.heads, args.channels, args.calls, args.pixels
    offsets = np.concatenate([[0], np.cumsum(rng.integers(3, 11, args.prompts))]).astype(np.int64)  # 1-8 words + SoT/EoT
    tokens = int(offsets[-1])
    q = (rng.standard_normal((heads, channels, calls * pixels)) * 0.5).astype(np.float32)
    keys = (rng.standard_normal((heads, tokens, channels)) * 0.5).astype(np.float32)
    buckets = TokenBuckets.from_offsets(list(offsets))
    prepared = PreparedQueries(torch.from_numpy(q), calls, pixels, float(np.linalg.norm(q, axis=1).max()))
    ordered = torch.from_numpy(keys)[:, buckets.order]
    engine_s = []
    for _ in range(3):
        t0 = time.perf_counter()
        reference = ordered_token_maps(prepared, ordered, buckets)[buckets.inverse].numpy()
        engine_s.append(time.perf_counter() - t0)
    scaled = (keys * np.float32(1.4426950408889634)).astype(np.float32)
    run(q, scaled, offsets[:3], pixels, 64)  # compile
    x = torch.rand(1 << 18)
    o = torch.empty_like(x)
    t0 = time.perf_counter()
    for _ in range(100):
        torch.exp2(x, out=o)
    exp_ns = (time.perf_counter() - t0) / (100 * x.numel()) * 1e9
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t0 = time.perf_counter()
    for _ in range(3):
        a @ b
    gflops = 3 * 2 * 2048 ** 3 / (time.perf_counter() - t0) / 1e9
    scores = heads * tokens * calls * pixels
    bound = scores * exp_ns * 1e-9 + 2 * channels * scores / (gflops * 1e9)
    print(f"{args.prompts} prompts ({tokens} tokens), {heads} heads x {channels} channels, {calls} calls x "
          f"{pixels} pixels; 1 thread; exp2 {exp_ns:.2f} ns/element, matmul {gflops:.0f} GFLOP/s\n")
    print("| implementation | s | ÷ engine | ÷ exp + matmul bound | max relative difference from the engine |")
    print("|---|---:|---:|---:|---:|")
    engine = min(engine_s)
    print(f"| engine (`ordered_token_maps`) | {engine:.3f} | 1.00 | {engine / bound:.2f} | |")
    pixel_blocks = [b for b in (64, 256, 512, 1024) if pixels % b == 0]
    for block in pixel_blocks:
        t0 = time.perf_counter()
        got = run(q, scaled, offsets, pixels, block)
        t = time.perf_counter() - t0
        err = float(np.abs(got - reference).max() / np.abs(reference).max())
        print(f"| fused kernel, blocks of {block} columns | {t:.3f} | {t / engine:.2f} | {t / bound:.2f} | {err:.1e} |")
    print(f"| bound | {bound:.3f} | {bound / engine:.2f} | 1.00 | |")


if __name__ == "__main__":
    main()
