/* Fused OVAM token softmax for the CPU (ovstore.analyze.kernel).
 *
 * For one group of prompts of equal token count n, one layer and a range of pixels: the
 * scores of every token against every stored query, exp2, the softmax over each prompt's
 * tokens, and the sums over steps and heads, with no score written to memory in between.
 * A block of 64 pixels of one prompt chunk stays in L1 while steps and heads are visited,
 * so each output element is written once.
 *
 * Portable C with GCC/Clang vector extensions (16 lanes; the compiler maps them onto the
 * machine's vector width), no intrinsics. exp2 is a degree-6 polynomial on [-0.5, 0.5]
 * (relative error 1e-7) times a power of two built in the exponent bits. The caller
 * guarantees that every score is bounded (|q|·|k|·log2 e < 126), as the engine's
 * overflow-free softmax does.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

#define LANES 16
#ifndef NV
#define NV 4                /* vectors per block: 64 pixels */
#endif
#define BLOCK (LANES * NV)
#define MAX_TOKENS 512
#ifndef ACC_FLOATS
#define ACC_FLOATS 8192     /* accumulator of one prompt chunk: 32 KiB, in L1 */
#endif

static inline vf splat(float x) { vf v = {x}; return __builtin_shuffle(v, (vi){}); }  /* a broadcast */

static inline vf exp2v(vf x) {
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: x + magic rounds x to an integer */
    /* no clamp: the caller guarantees |x| < 126 (bounded scores) */
    vf t = x + magic;
    vi k = (vi)t - (vi)magic;           /* round(x) */
    vf f = x - (t - magic);             /* in [-0.5, 0.5] */
    vf p = splat(0.0001546531857457012f);
    p = p * f + splat(0.0013395285932347178f);
    p = p * f + splat(0.009618040174245834f);
    p = p * f + splat(0.05550340563058853f);
    p = p * f + splat(0.24022650718688965f);
    p = p * f + splat(0.6931471824645996f);
    p = p * f + splat(1.0f);
    vi scale = (k + 127) << 23;
    return p * (vf)scale;
}

static inline vf load(const float *src, int64_t n) {
    vf v;
    if (n >= LANES) { memcpy(&v, src, sizeof v); return v; }
    v = splat(0.0f);
    if (n > 0) memcpy(&v, src, (size_t)n * sizeof(float));
    return v;
}

static inline void add_store(float *dst, vf v, int64_t n, int accumulate) {
    if (accumulate) v += load(dst, n);
    if (n >= LANES) memcpy(dst, &v, sizeof v);
    else if (n > 0) memcpy(dst, &v, (size_t)n * sizeof(float));
}

/* The exponentials of the scores of `nt` consecutive key rows (`k`, `channels` apart; nt is 1, 2
 * or 4, a constant at each call, so every loop unrolls and the scores stay in registers) against
 * a block's queries (`channels` rows of BLOCK pixels, `q_channel` apart): each query vector is
 * loaded once for all of them. Written to `e[j * NV + v]` and added to `sum`. */
static inline __attribute__((always_inline)) void exp_scores(const float *k, int64_t channels, const float *qh,
                                                             int64_t q_channel, const int nt, vf *e, vf sum[NV]) {
    vf sc[4][NV];
    for (int j = 0; j < nt; j++)
        for (int v = 0; v < NV; v++) sc[j][v] = splat(0.0f);
    for (int64_t c = 0; c < channels; c++) {
        vf kc[4];
        for (int j = 0; j < nt; j++) kc[j] = splat(k[j * channels + c]);
        for (int v = 0; v < NV; v++) {
            vf qq;
            memcpy(&qq, qh + c * q_channel + v * LANES, sizeof qq);
            for (int j = 0; j < nt; j++) sc[j][v] += kc[j] * qq;
        }
    }
    for (int v = 0; v < NV; v++) {
        vf x[4];
        for (int j = 0; j < nt; j++) e[j * NV + v] = x[j] = exp2v(sc[j][v]);
        sum[v] += nt == 4 ? (x[0] + x[1]) + (x[2] + x[3]) : nt == 2 ? x[0] + x[1] : x[0];
    }
}

/* One block of BLOCK pixels of prompts [p0, p0 + pc): every trip count is a constant, so the
 * score, exp2 and accumulation loops are unrolled over the block's vectors. `qb` points at the
 * block's first pixel of head 0, step 0. */
static void block_maps(const float *keys, int64_t key_head, const float *qb, int64_t q_head,
                       int64_t q_channel, int64_t q_step, int64_t heads, int64_t channels, int64_t steps,
                       int64_t p0, int64_t pc, int64_t n, int64_t shared, vf *acc, vf *own, vf *common) {
    memset(acc, 0, sizeof(vf) * (size_t)(pc * n * NV));
    for (int64_t s = 0; s < steps; s++) {
        for (int64_t h = 0; h < heads; h++) {
            const float *qh = qb + h * q_head + s * q_step;
            const float *kh = keys + h * key_head;
            vf common_sum[NV];
            for (int v = 0; v < NV; v++) common_sum[v] = splat(0.0f);
            for (int64_t t = 0; t < shared; t++)
                exp_scores(kh + (p0 * n + t) * channels, channels, qh, q_channel, 1, common + t * NV, common_sum);
            for (int64_t p = 0; p < pc; p++) {
                vf z[NV];
                for (int v = 0; v < NV; v++) z[v] = common_sum[v];
                const float *kp = kh + (p0 + p) * n * channels;
                int64_t t = shared;
                for (; t + 4 <= n; t += 4)
                    exp_scores(kp + t * channels, channels, qh, q_channel, 4, own + t * NV, z);
                for (; t + 2 <= n; t += 2)
                    exp_scores(kp + t * channels, channels, qh, q_channel, 2, own + t * NV, z);
                for (; t < n; t++)
                    exp_scores(kp + t * channels, channels, qh, q_channel, 1, own + t * NV, z);
                vf inv[NV];
                for (int v = 0; v < NV; v++) inv[v] = splat(1.0f) / z[v];
                vf *a = acc + p * n * NV;
                for (int64_t t = 0; t < shared; t++)
                    for (int v = 0; v < NV; v++) a[t * NV + v] += common[t * NV + v] * inv[v];
                for (int64_t t = shared; t < n; t++)
                    for (int v = 0; v < NV; v++) a[t * NV + v] += own[t * NV + v] * inv[v];
            }
        }
    }
}

/* keys: row r of head h at keys[h*key_head + r*channels] (scaled by log2 e), rows of prompt p
 *       at r = p*n + t; the first `shared` rows of every prompt are equal (their exponentials
 *       are computed once per chunk and block).
 * q:    channel c of head h, step s, pixel x at q[h*q_head + c*q_channel + s*q_step + x].
 * out:  token row r (= p*n + t), pixel x at out[r*out_row + x]; maps are added to it
 *       (`accumulate`) or written over it.
 * Pixels [first, last) of prompts [p_first, p_last) are computed. Returns 0, -1 if n is out
 * of range, -2 if memory ran out. */
int ovstore_fused_maps(const float *keys, int64_t key_head, const float *q, int64_t q_head,
                       int64_t q_channel, int64_t q_step, int64_t heads, int64_t channels,
                       int64_t steps, int64_t first, int64_t last, int64_t p_first, int64_t p_last,
                       int64_t n, int64_t shared, float *out, int64_t out_row, int accumulate) {
    if (n < 1 || n > MAX_TOKENS || shared < 0 || shared >= n) return -1;
    int64_t chunk = ACC_FLOATS / (n * BLOCK);
    if (chunk < 1) chunk = 1;
    vf *acc = aligned_alloc(64, sizeof(vf) * (size_t)(chunk * n * NV));
    vf *own = aligned_alloc(64, sizeof(vf) * (size_t)(n * NV));
    vf *common = aligned_alloc(64, sizeof(vf) * (size_t)(n * NV));
    float *pad = NULL;
    int code = 0;
    if (!acc || !own || !common) { code = -2; goto done; }
    for (int64_t x0 = first; x0 < last; x0 += BLOCK) {
        int64_t width = last - x0 < BLOCK ? last - x0 : BLOCK;
        const float *qb = q + x0;
        int64_t qh = q_head, qc = q_channel, qs = q_step;
        if (width < BLOCK) {  /* the last, partial block: its queries copied into zero-padded rows */
            if (!pad) pad = aligned_alloc(64, sizeof(float) * (size_t)(heads * channels * steps * BLOCK));
            if (!pad) { code = -2; goto done; }
            memset(pad, 0, sizeof(float) * (size_t)(heads * channels * steps * BLOCK));
            for (int64_t h = 0; h < heads; h++)
                for (int64_t c = 0; c < channels; c++)
                    for (int64_t s = 0; s < steps; s++)
                        memcpy(pad + ((h * channels + c) * steps + s) * BLOCK,
                               q + h * q_head + c * q_channel + s * q_step + x0, sizeof(float) * (size_t)width);
            qb = pad; qh = channels * steps * BLOCK; qc = steps * BLOCK; qs = BLOCK;
        }
        for (int64_t p0 = p_first; p0 < p_last; p0 += chunk) {
            int64_t pc = p_last - p0 < chunk ? p_last - p0 : chunk;
            block_maps(keys, key_head, qb, qh, qc, qs, heads, channels, steps, p0, pc, n, shared, acc, own, common);
            for (int64_t p = 0; p < pc; p++)
                for (int64_t t = 0; t < n; t++) {
                    float *o = out + ((p0 + p) * n + t) * out_row + x0;
                    for (int64_t v = 0; v * LANES < width; v++)
                        add_store(o + v * LANES, acc[(p * n + t) * NV + v], width - v * LANES, accumulate);
                }
        }
    }
done:
    free(acc); free(own); free(common); free(pad);
    return code;
}
