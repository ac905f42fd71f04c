/* CPU kernels for dsvl2: bfloat16 matrix-vector products at memory bandwidth for decoding, and
 * attention for many query rows (prefill, the vision tower) at the end of the file.
 *
 * Decoding one token reads every active weight once, so it is bound by memory traffic; torch's
 * bf16 GEMV reaches only a third to a half of the machine's bandwidth. These kernels stream each
 * weight row once, multiply with AVX512-BF16 dot products where the CPU has them (fp32 products of
 * bf16 pairs, fp32 accumulation: the same arithmetic as a GEMM's inner loop), and fall back to
 * AVX2/FMA or plain C. Compiled on the user's machine at first use (-march=native) and called
 * through ctypes with raw pointers: no Python objects are touched here.
 *
 * Layouts: weights are row-major (rows, K) bf16, as nn.Linear stores them; x is (M, K) with a
 * leading dimension; outputs are (M, rows).
 */
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

typedef uint16_t bf16;

static inline float bf16_to_f32(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

int dsvl2_kernel_isa(void) {
#if defined(__AVX512BF16__)
    return 3;
#elif defined(__AVX512F__)
    return 2;
#elif defined(__AVX2__) && defined(__FMA__)
    return 1;
#else
    return 0;
#endif
}

/* Streaming read of `bytes` bytes (the 64-bit words of buf, a trailing partial word ignored),
 * for the benchmark's bandwidth ceiling: the decode kernels are bound by how fast they stream
 * weights, so the ceiling must be measured by a read at least as fast as theirs. torch's sum()
 * is not (it measured 7-12% below our decode kernels), which put decode above 100% of its floor.
 * Same wide unaligned loads as dot_row (64 bytes with AVX512, 32 with AVX2), the same OpenMP
 * static split into contiguous ranges, one sequential stream per thread; the work per load is a
 * single integer add, so the loads are the only cost. Returns the wrapping sum of the words as a
 * checksum (the caller checks it, and it keeps the compiler from dropping the loads). */
uint64_t dsvl2_stream_read(const void *buf, int64_t bytes, int threads) {
    const uint64_t *w = (const uint64_t *)buf;
    const int64_t words = bytes / 8, chunk = 8192; /* 64 KiB per work item */
    int64_t chunks = (words + chunk - 1) / chunk;
    uint64_t total = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+:total)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t i = c * chunk, end = i + chunk < words ? i + chunk : words;
        uint64_t t = 0;
#if defined(__AVX512F__)
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        for (; i + 32 <= end; i += 32) {
            a0 = _mm512_add_epi64(a0, _mm512_loadu_si512((const void *)(w + i)));
            a1 = _mm512_add_epi64(a1, _mm512_loadu_si512((const void *)(w + i + 8)));
            a2 = _mm512_add_epi64(a2, _mm512_loadu_si512((const void *)(w + i + 16)));
            a3 = _mm512_add_epi64(a3, _mm512_loadu_si512((const void *)(w + i + 24)));
        }
        t = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
#elif defined(__AVX2__)
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (; i + 16 <= end; i += 16) {
            a0 = _mm256_add_epi64(a0, _mm256_loadu_si256((const __m256i *)(w + i)));
            a1 = _mm256_add_epi64(a1, _mm256_loadu_si256((const __m256i *)(w + i + 4)));
            a2 = _mm256_add_epi64(a2, _mm256_loadu_si256((const __m256i *)(w + i + 8)));
            a3 = _mm256_add_epi64(a3, _mm256_loadu_si256((const __m256i *)(w + i + 12)));
        }
        uint64_t lanes[4];
        _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
        t = lanes[0] + lanes[1] + lanes[2] + lanes[3];
#endif
        for (; i < end; i++) t += w[i]; /* the tail, and the whole range in the portable build */
        total += t;
    }
    return total;
}

/* dot product of one weight row with one x row, in float32. One row at a time with independent
 * accumulators along K: the weights stream through memory as one sequential read per thread,
 * which the hardware prefetcher follows best (measured 2x faster than interleaving 4 rows). */
static inline float dot_row(const bf16 *x, const bf16 *w, int64_t K) {
#if defined(__AVX512BF16__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t k = 0;
#define DP(acc, off) acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const void *)(w + k + off)), \
                                            (__m512bh)_mm512_loadu_si512((const void *)(x + k + off)))
    for (; k + 128 <= K; k += 128) { DP(a0, 0); DP(a1, 32); DP(a2, 64); DP(a3, 96); }
    for (; k + 32 <= K; k += 32) DP(a0, 0);
#undef DP
    if (k < K) {
        __mmask32 m = (__mmask32)((1ull << (K - k)) - 1);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(m, w + k),
                              (__m512bh)_mm512_maskz_loadu_epi16(m, x + k));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif defined(__AVX512F__)
#define LD16(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm512_fmadd_ps(LD16(w + k), LD16(x + k), a0);
        a1 = _mm512_fmadd_ps(LD16(w + k + 16), LD16(x + k + 16), a1);
    }
#undef LD16
    float t = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    for (; k < K; k++) t += bf16_to_f32(w[k]) * bf16_to_f32(x[k]);
    return t;
#elif defined(__AVX2__) && defined(__FMA__)
    /* 16 bf16 of one 32-byte load as two float32 vectors without a shuffle: the even elements
     * shifted into the high half of each 32-bit lane, the odd ones masked in place (a bf16 is
     * the high half of its float32). The dot product pairs even with even and odd with odd. */
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
#define EVEN(v) _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))
#define ODD(v) _mm256_castsi256_ps(_mm256_and_si256(v, hi))
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + k)), x0 = _mm256_loadu_si256((const __m256i *)(x + k));
        __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + k + 16));
        __m256i x1 = _mm256_loadu_si256((const __m256i *)(x + k + 16));
        a0 = _mm256_fmadd_ps(EVEN(w0), EVEN(x0), a0);
        a1 = _mm256_fmadd_ps(ODD(w0), ODD(x0), a1);
        a2 = _mm256_fmadd_ps(EVEN(w1), EVEN(x1), a2);
        a3 = _mm256_fmadd_ps(ODD(w1), ODD(x1), a3);
    }
    for (; k + 16 <= K; k += 16) {
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + k)), x0 = _mm256_loadu_si256((const __m256i *)(x + k));
        a0 = _mm256_fmadd_ps(EVEN(w0), EVEN(x0), a0);
        a1 = _mm256_fmadd_ps(ODD(w0), ODD(x0), a1);
    }
#undef EVEN
#undef ODD
    float acc[8];
    _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    float t = 0;
    for (int i = 0; i < 8; i++) t += acc[i];
    for (; k < K; k++) t += bf16_to_f32(w[k]) * bf16_to_f32(x[k]);
    return t;
#else
    float t = 0;
    for (int64_t k = 0; k < K; k++) t += bf16_to_f32(w[k]) * bf16_to_f32(x[k]);
    return t;
#endif
}

/* rows [r0, r1) of y = x @ w.T for M rows of x; y_f32 or y_bf16 (one of them non-NULL). */
static void gemv_rows(const bf16 *x, int64_t ldx, int64_t M, const bf16 *w, int64_t K,
                      int64_t r0, int64_t r1, float *y_f32, bf16 *y_bf16, int64_t ldy) {
    for (int64_t r = r0; r < r1; r++)
        for (int64_t m = 0; m < M; m++) { /* the row stays in L1 for the other x rows */
            float t = dot_row(x + m * ldx, w + r * K, K);
            if (y_f32) y_f32[m * ldy + r] = t;
            else y_bf16[m * ldy + r] = f32_to_bf16(t);
        }
}

/* y (M, N) = x (M, K) @ w (N, K).T ; out_f32 selects float32 output (logits) over bf16. */
void dsvl2_gemv_bf16(const bf16 *x, int64_t ldx, int64_t M, const bf16 *w, int64_t N, int64_t K,
                     void *y, int64_t ldy, int out_f32, int threads) {
    const int64_t block = 64; /* rows per work item: ~160 KB of weights at K=1280 */
    int64_t blocks = (N + block - 1) / block;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t r0 = b * block, r1 = r0 + block < N ? r0 + block : N;
        gemv_rows(x, ldx, M, w, K, r0, r1, out_f32 ? (float *)y : NULL, out_f32 ? NULL : (bf16 *)y, ldy);
    }
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* One token's output: sum_j weights[j] * bf16(expert_out[j]) in float32 (expert outputs come
 * back from the projections in bf16, as on the torch path); into out_f32 or out_bf16. */
static void combine_token(const float *expert_out, const float *weights, int64_t k, int64_t D, float *out_f32,
                          bf16 *out_bf16) {
    for (int64_t c = 0; c < D; c++) {
        float acc = 0.0f;
        for (int64_t j = 0; j < k; j++) acc += weights[j] * bf16_to_f32(f32_to_bf16(expert_out[j * D + c]));
        if (out_f32) out_f32[c] = acc;
        else out_bf16[c] = f32_to_bf16(acc);
    }
}

/* Routed experts for a few tokens, one call per MoE layer, expert ids read here (no host loop):
 *   for each token t and slot j: e = ids[t, j]
 *     h = bf16(silu(bf16(Wg[e] x_t)) * bf16(Wu[e] x_t))        (gate_up stacked as (E, 2M, D))
 *     o = bf16(Wd[e] h)                                        (down stacked as (E, D, M))
 *   out[t] = bf16(sum_j weights[t, j] * o)                     (sum in float32)
 * The bf16 roundings between steps are those of the eager torch path.
 * scratch: at least T*k*(2M + D) floats.
 */
void dsvl2_moe_bf16(const bf16 *x, int64_t T, int64_t D, const int64_t *ids, const float *weights, int64_t k,
                    const bf16 *gate_up, const bf16 *down, int64_t M, bf16 *out, float *scratch, int threads) {
    int64_t items = T * k;
    float *act = scratch;                 /* (items, 2M) */
    float *expert_out = scratch + items * 2 * M; /* (items, D) */
    bf16 *hidden = (bf16 *)(expert_out + items * D); /* (items, M) bf16: needs items*M*2 bytes more */
    /* phase 1: gate and up projections, rows spread over threads */
    const int64_t block = 64;
    int64_t gu_blocks = (2 * M + block - 1) / block;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static) collapse(2)
        for (int64_t i = 0; i < items; i++)
            for (int64_t b = 0; b < gu_blocks; b++) {
                const bf16 *w = gate_up + ids[i] * 2 * M * D;
                int64_t r0 = b * block, r1 = r0 + block < 2 * M ? r0 + block : 2 * M;
                gemv_rows(x + (i / k) * D, D, 1, w, D, r0, r1, act + i * 2 * M, NULL, 0);
            }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < items; i++)
            for (int64_t c = 0; c < M; c++) {
                float g = bf16_to_f32(f32_to_bf16(act[i * 2 * M + c]));
                float u = bf16_to_f32(f32_to_bf16(act[i * 2 * M + M + c]));
                float s = bf16_to_f32(f32_to_bf16(silu(g)));
                hidden[i * M + c] = f32_to_bf16(s * u);
            }
        int64_t d_blocks = (D + block - 1) / block;
#pragma omp for schedule(static) collapse(2)
        for (int64_t i = 0; i < items; i++)
            for (int64_t b = 0; b < d_blocks; b++) {
                const bf16 *w = down + ids[i] * D * M;
                int64_t r0 = b * block, r1 = r0 + block < D ? r0 + block : D;
                gemv_rows(hidden + i * M, M, 1, w, M, r0, r1, expert_out + i * D, NULL, 0);
            }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++)
            combine_token(expert_out + t * k * D, weights + t * k, k, D, NULL, out + t * D);
    }
}

/* Attention of a few query rows over a long bf16 cache, for decoding.
 *
 * torch's bf16 matmul goes through oneDNN, which builds (and caches, with its scratch memory) a
 * new primitive for every key length: decoding grows the key length by one each step, so every
 * step paid ~3 ms of primitive creation per matmul shape and the cache kept growing. Here:
 *   for each group g (a batch row and kv head) and each of its R query rows r:
 *     s_l = scale * q_r . k_l          (fp32, AVX512-BF16 dot products as in dot_row)
 *     p   = softmax(s)                 (fp32)
 *     out_r = sum_l p_l v_l            (fp32 accumulation, bf16 output)
 * q (G, R, d) contiguous bf16. k and v are strided views of the cache (unit stride along the
 * feature dim): element (g, l, c) of k is at k + (g / Hk) * k_bs + (g % Hk) * k_hs + l * k_ls + c.
 * MLA passes v as the first dv features of the same latent rows (v = k, same strides).
 * scores: G*R*L floats of scratch. out (G, R, dv) bf16.
 */
#if defined(__AVX512BF16__)
static void attn_decode_one_row(const bf16 *q, int64_t d, const bf16 *kg, int64_t k_ls, const bf16 *vg,
                                int64_t v_ls, int64_t dv, int64_t L, float scale, float *s, bf16 *out);
#endif

void dsvl2_attn_decode_bf16(const bf16 *q, int64_t G, int64_t R, int64_t d, const bf16 *k, const bf16 *v,
                            int64_t Hk, int64_t k_bs, int64_t k_hs, int64_t k_ls, int64_t v_bs, int64_t v_hs,
                            int64_t v_ls, int64_t dv, int64_t L, float scale, float *scores, bf16 *out,
                            int threads) {
#if defined(__AVX512BF16__)
    if (R == 1 && d % 32 == 0 && d <= 256 && dv % 64 == 0 && G >= threads) { /* a group per work item */
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t g = 0; g < G; g++)
            attn_decode_one_row(q + g * d, d, k + (g / Hk) * k_bs + (g % Hk) * k_hs, k_ls,
                                v + (g / Hk) * v_bs + (g % Hk) * v_hs, v_ls, dv, L, scale, scores + g * L,
                                out + g * dv);
        return;
    }
#endif
    const int64_t lblock = 64, cblock = 64;
    int64_t lblocks = (L + lblock - 1) / lblock, cblocks = (dv + cblock - 1) / cblock;
#pragma omp parallel num_threads(threads)
    {
        /* pass 1: scores; each key row is read once and used by all R query rows of its group */
#pragma omp for schedule(static) collapse(2)
        for (int64_t g = 0; g < G; g++)
            for (int64_t b = 0; b < lblocks; b++) {
                const bf16 *kg = k + (g / Hk) * k_bs + (g % Hk) * k_hs;
                int64_t l1 = (b + 1) * lblock < L ? (b + 1) * lblock : L;
                for (int64_t l = b * lblock; l < l1; l++)
                    for (int64_t r = 0; r < R; r++)
                        scores[(g * R + r) * L + l] = scale * dot_row(q + (g * R + r) * d, kg + l * k_ls, d);
            }
        /* softmax per row, in place */
#pragma omp for schedule(static)
        for (int64_t row = 0; row < G * R; row++) {
            float *s = scores + row * L, mx = -INFINITY, sum = 0.0f;
            for (int64_t l = 0; l < L; l++) mx = s[l] > mx ? s[l] : mx;
            for (int64_t l = 0; l < L; l++) { s[l] = expf(s[l] - mx); sum += s[l]; }
            float inv = 1.0f / sum;
            for (int64_t l = 0; l < L; l++) s[l] *= inv;
        }
        /* pass 2: weighted sum of value rows, a block of feature columns per work item; the
         * accumulators (R x cblock floats) stay in L1 while the value rows stream past */
        float acc[64 * 64];
        float vrow[64];
#pragma omp for schedule(static) collapse(2)
        for (int64_t g = 0; g < G; g++)
            for (int64_t cb = 0; cb < cblocks; cb++) {
                const bf16 *vg = v + (g / Hk) * v_bs + (g % Hk) * v_hs;
                int64_t c0 = cb * cblock, n = c0 + cblock < dv ? cblock : dv - c0;
                for (int64_t r0 = 0; r0 < R; r0 += 64) { /* rows in groups of 64: acc fits */
                    int64_t nr = R - r0 < 64 ? R - r0 : 64;
                    memset(acc, 0, sizeof(float) * nr * cblock);
                    for (int64_t l = 0; l < L; l++) {
                        const bf16 *vl = vg + l * v_ls + c0;
                        for (int64_t c = 0; c < n; c++) vrow[c] = bf16_to_f32(vl[c]);
                        for (int64_t r = 0; r < nr; r++) {
                            float p = scores[(g * R + r0 + r) * L + l];
                            float *a = acc + r * cblock;
                            for (int64_t c = 0; c < n; c++) a[c] += p * vrow[c];
                        }
                    }
                    for (int64_t r = 0; r < nr; r++)
                        for (int64_t c = 0; c < n; c++)
                            out[(g * R + r0 + r) * dv + c0 + c] = f32_to_bf16(acc[r * cblock + c]);
                }
            }
    }
}

/* Per-head matrix-vector products, for MLA's absorbed decode path: a few rows per head against
 * one small matrix per head (torch's bf16 batched matmul reads these at ~6 GB/s).
 *   kn == 0: y[h, t, n] = sum_k x[h, t, k] * W[h, n, k]    (W as (H, N, K): rows are dot products)
 *   kn == 1: y[h, t, n] = sum_k x[h, t, k] * W[h, k, n]    (W as (H, K, N): rows are added up)
 * x (H, T, K) and y (H, T, N) contiguous bf16, T <= 8, N <= 4096 when kn == 1.
 */
void dsvl2_head_gemv_bf16(const bf16 *x, int64_t H, int64_t T, const bf16 *w, int64_t N, int64_t K, int kn,
                          bf16 *y, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t h = 0; h < H; h++) {
        const bf16 *wh = w + h * N * K, *xh = x + h * T * K;
        bf16 *yh = y + h * T * N;
        if (!kn) {
            gemv_rows(xh, K, T, wh, K, 0, N, NULL, yh, N);
            continue;
        }
        float acc[8 * 4096];
        memset(acc, 0, sizeof(float) * T * N);
        for (int64_t k = 0; k < K; k++) { /* stream row k of W once, for every x row */
            const bf16 *row = wh + k * N;
            for (int64_t t = 0; t < T; t++) {
                float s = bf16_to_f32(xh[t * K + k]);
                float *a = acc + t * N;
                for (int64_t n = 0; n < N; n++) a[n] += s * bf16_to_f32(row[n]);
            }
        }
        for (int64_t i = 0; i < T * N; i++) yh[i] = f32_to_bf16(acc[i]);
    }
}

/* ------------------------------------------------------------------------------------------
 * Routed experts with 4-bit weights (quant/int4.py: w = (q - 8) * scale + zero per group of
 * G inputs), read directly in torch's CPU int4 packing so that prefill (torch's kernel) and
 * decode (this one) share one copy of the weights. That packing, checked at run time by
 * quant/int4.py before this kernel is used: for each block of 64 output rows, (K, 32) bytes, byte j
 * of input k holding row j in its low nibble and row j + 32 in its high nibble. Scales and
 * zeros: (K/G, N, 2) bf16.
 * Per group, sum_k w x = scale * sum_k q x + (zero - 8 scale) * sum_k x: the codes are
 * multiplied as small integers converted to float, and the scales applied once per group.
 */
static void int4_block(const uint8_t *P, const bf16 *sz, int64_t N, int64_t K, int64_t G, int64_t b,
                       const float *xf, const float *xs, float *out) {
    float acc[64], res[64];
    memset(res, 0, sizeof res);
    const uint8_t *pb = P + b * K * 32;
    for (int64_t g0 = 0; g0 < K; g0 += G) {
#if defined(__AVX512F__)
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        const __m128i low = _mm_set1_epi8(0x0f);
#define Q(v) _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v))
        for (int64_t k = g0; k < g0 + G; k++) {
            __m128i b0 = _mm_loadu_si128((const __m128i *)(pb + k * 32));
            __m128i b1 = _mm_loadu_si128((const __m128i *)(pb + k * 32 + 16));
            __m512 xk = _mm512_set1_ps(xf[k]);
            a0 = _mm512_fmadd_ps(Q(_mm_and_si128(b0, low)), xk, a0);                       /* rows 0-15 */
            a1 = _mm512_fmadd_ps(Q(_mm_and_si128(b1, low)), xk, a1);                       /* rows 16-31 */
            a2 = _mm512_fmadd_ps(Q(_mm_and_si128(_mm_srli_epi16(b0, 4), low)), xk, a2);    /* rows 32-47 */
            a3 = _mm512_fmadd_ps(Q(_mm_and_si128(_mm_srli_epi16(b1, 4), low)), xk, a3);    /* rows 48-63 */
        }
#undef Q
        _mm512_storeu_ps(acc, a0); _mm512_storeu_ps(acc + 16, a1);
        _mm512_storeu_ps(acc + 32, a2); _mm512_storeu_ps(acc + 48, a3);
#else
        memset(acc, 0, sizeof acc);
        for (int64_t k = g0; k < g0 + G; k++)
            for (int j = 0; j < 32; j++) {
                uint8_t byte = pb[k * 32 + j];
                acc[j] += (float)(byte & 15) * xf[k];
                acc[j + 32] += (float)(byte >> 4) * xf[k];
            }
#endif
        const bf16 *s = sz + ((g0 / G) * N + b * 64) * 2;
        float xsum = xs[g0 / G];
        for (int j = 0; j < 64; j++) {
            float scale = bf16_to_f32(s[2 * j]), zero = bf16_to_f32(s[2 * j + 1]);
            res[j] += scale * acc[j] + (zero - 8.0f * scale) * xsum;
        }
    }
    memcpy(out, res, sizeof res);
}

static void to_f32_with_group_sums(const bf16 *x, int64_t K, int64_t G, float *xf, float *xs) {
    for (int64_t g0 = 0; g0 < K; g0 += G) {
        float t = 0.0f;
        for (int64_t k = g0; k < g0 + G; k++) { xf[k] = bf16_to_f32(x[k]); t += xf[k]; }
        xs[g0 / G] = t;
    }
}

/* Rows [64b, 64b + 64) (cut at N) of y = W x for one int8 matrix: codes (N, K) int8, one bf16
 * scale per row (quant/int8.py: w = q * scale). */
static void int8_block(const int8_t *Q, const bf16 *scale, int64_t N, int64_t K, int64_t b, const float *xf,
                       float *out) {
    int64_t r1 = (b + 1) * 64 < N ? (b + 1) * 64 : N;
    for (int64_t r = b * 64; r < r1; r++) {
        const int8_t *q = Q + r * K;
        float t = 0.0f;
        int64_t k = 0;
#if defined(__AVX512F__)
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (; k + 32 <= K; k += 32) {
            a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + k)))),
                                 _mm512_loadu_ps(xf + k), a0);
            a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + k + 16)))),
                                 _mm512_loadu_ps(xf + k + 16), a1);
        }
        t = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
        for (; k < K; k++) t += (float)q[k] * xf[k];
        out[r - b * 64] = t * bf16_to_f32(scale[r]);
    }
}

/* One quantized matrix of one expert: rows block b of W x into out (up to 64 floats). */
static inline void quant_block(int bits, const uint8_t *q, const bf16 *s, int64_t N, int64_t K, int64_t G,
                               int64_t b, const float *xf, const float *xs, float *out) {
    if (bits == 4) int4_block(q, s, N, K, G, b, xf, xs, out);
    else int8_block((const int8_t *)q, s, N, K, b, xf, out);
}

/* The quantized counterpart of dsvl2_moe_bf16, for int4 (bits 4) and int8 (bits 8); out (T, D)
 * float32. The bf16 roundings between steps are those of torch's int4/int8 paths: their kernels
 * take and return bf16, and silu(gate) is rounded too when the model computes in bf16
 * (bf16_act), not when it computes in float32.
 * int4: gate_up codes (E, 2M/64, D, 32) bytes and scales (E, D/G1, 2M, 2); down codes
 * (E, D/64, M, 32) and scales (E, M/G2, D, 2); 2M and D multiples of 64.
 * int8: gate_up codes (E, 2M, D) and scales (E, 2M); down codes (E, D, M) and scales (E, D);
 * G1 = D and G2 = M.
 * *_qstride, *_sstride: bytes of codes and scale entries per expert.
 * scratch: T*(D + D/G1) + T*k*(2M + M + M/G2 + D) floats. */
void dsvl2_moe_quant(int bits, const bf16 *x, int64_t T, int64_t D, const int64_t *ids, const float *weights,
                     int64_t k, const uint8_t *gu_q, const bf16 *gu_s, int64_t gu_qstride, int64_t gu_sstride,
                     int64_t G1, const uint8_t *dn_q, const bf16 *dn_s, int64_t dn_qstride, int64_t dn_sstride,
                     int64_t G2, int64_t M, int bf16_act, float *out, float *scratch, int threads) {
    int64_t items = T * k;
    float *xf = scratch, *xs = xf + T * D;
    float *act = xs + T * (D / G1);        /* (items, 2M) */
    float *hid = act + items * 2 * M;      /* (items, M) */
    float *hs = hid + items * M;           /* (items, M/G2) */
    float *eo = hs + items * (M / G2);     /* (items, D) */
    int64_t gu_blocks = (2 * M + 63) / 64, d_blocks = (D + 63) / 64;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) to_f32_with_group_sums(x + t * D, D, G1, xf + t * D, xs + t * (D / G1));
#pragma omp for schedule(static) collapse(2)
        for (int64_t i = 0; i < items; i++)
            for (int64_t b = 0; b < gu_blocks; b++) {
                int64_t e = ids[i], t = i / k;
                quant_block(bits, gu_q + e * gu_qstride, gu_s + e * gu_sstride, 2 * M, D, G1, b,
                            xf + t * D, xs + t * (D / G1), act + i * 2 * M + b * 64);
            }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < items; i++) {
            for (int64_t c = 0; c < M; c++) {
                float g = bf16_to_f32(f32_to_bf16(act[i * 2 * M + c]));
                float u = bf16_to_f32(f32_to_bf16(act[i * 2 * M + M + c]));
                float s = bf16_act ? bf16_to_f32(f32_to_bf16(silu(g))) : silu(g);
                hid[i * M + c] = bf16_to_f32(f32_to_bf16(s * u));
            }
            for (int64_t g0 = 0; g0 < M; g0 += G2) {
                float t = 0.0f;
                for (int64_t c = g0; c < g0 + G2; c++) t += hid[i * M + c];
                hs[i * (M / G2) + g0 / G2] = t;
            }
        }
#pragma omp for schedule(static) collapse(2)
        for (int64_t i = 0; i < items; i++)
            for (int64_t b = 0; b < d_blocks; b++) {
                int64_t e = ids[i];
                quant_block(bits, dn_q + e * dn_qstride, dn_s + e * dn_sstride, D, M, G2, b,
                            hid + i * M, hs + i * (M / G2), eo + i * D + b * 64);
            }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++)
            combine_token(eo + t * k * D, weights + t * k, k, D, out + t * D, NULL);
    }
}

/* ------------------------------------------------------------------------------------------
 * Attention of many query rows: prefill and the vision tower (flash-attention style).
 *
 * torch's CPU flash attention runs at a quarter of a bf16 GEMM here. This one, per batch row,
 * head and block of PF_BM query rows, walks the keys in blocks of PF_BN:
 *   S = scale * Q K^T                      (fp32, AVX512-BF16 dot products over pairs along d)
 *   m' = max(m, rowmax S), P = exp(S - m')  (online softmax in fp32: the running max and sum)
 *   O = O exp(m - m') + bf16(P) V          (dot products over pairs of keys, fp32 accumulators)
 * and writes bf16(O / sum) at the end: the score matrix never leaves L1.
 * The dot-product instruction multiplies pairs of bf16, so the operands are packed once per
 * (batch, kv head) before the loop, into a workspace the caller allocates
 * (dsvl2_attn_prefill_bytes):
 *   K block: [ceil(d/2)][PF_BN keys][2]  (a vector holds one pair of features for 16 keys)
 *   V block: [PF_BN/2 key pairs][dvp][2] (a vector holds one pair of keys for 16 features)
 * zero-padded to whole blocks, dvp = dv rounded up to 16. Query i (0-based) sits at position
 * offset + i; with `causal` it sees keys 0..offset+i, else every key.
 * The portable path (other ISAs) does the same blocks in plain C with the same bf16 rounding of P.
 */
#define PF_BM 48 /* query rows per work item: a multiple of 12, so the 6-, 4- and 3-row tiles divide it */
#define PF_BN 64 /* keys per block */

static inline int64_t pf_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

static inline int64_t pf_group_elems(int64_t L, int64_t d, int64_t dv) { /* packed K and V, bf16 */
    return pf_up(L, PF_BN) * (pf_up(d, 2) + pf_up(dv, 16));
}

static inline int64_t pf_thread_bytes(int64_t d, int64_t dv) { /* Q, S, P, O, m, alpha, l */
    return PF_BM * pf_up(d, 2) * 2 + PF_BM * PF_BN * 4 + PF_BM * PF_BN * 2 + PF_BM * pf_up(dv, 16) * 4
           + (2 + 16) * PF_BM * 4;
}

int64_t dsvl2_attn_prefill_bytes(int64_t groups, int64_t L, int64_t d, int64_t dv, int threads) {
    return groups * pf_group_elems(L, d, dv) * 2 + (int64_t)threads * pf_thread_bytes(d, dv) + 64;
}

/* Key block kb of one (batch, kv head) into the packed layouts above. */
static void pf_pack(const bf16 *k, int64_t k_ls, const bf16 *v, int64_t v_ls, int64_t L, int64_t d, int64_t dv,
                    int64_t kb, bf16 *kp, bf16 *vp) {
    int64_t pairs = pf_up(d, 2) / 2, dvp = pf_up(dv, 16), k0 = kb * PF_BN;
    int64_t n = L - k0 < PF_BN ? L - k0 : PF_BN; /* real keys in the block; the rest are zeros */
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (!(d & 1)) { /* K: 16 keys' copies of one feature pair per gather; V: two keys interleaved per permute */
        const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                _mm512_set1_epi32((int)k_ls));
        for (int64_t j = 0; j < PF_BN; j += 16) {
            int64_t left = n - j;
            __mmask16 live = left >= 16 ? (__mmask16)0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
            const bf16 *kr = k + (k0 + (live ? j : 0)) * k_ls;
            for (int64_t p = 0; p < pairs; p++)
                _mm512_storeu_si512((void *)(kp + p * PF_BN * 2 + j * 2),
                                    _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, rows, kr + 2 * p, 2));
        }
        const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                            39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
        const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
        for (int64_t j = 0; j < PF_BN; j += 2) {
            const bf16 *r0 = v + (k0 + j) * v_ls, *r1 = r0 + v_ls;
            for (int64_t c = 0; c < dvp; c += 32) {
                int64_t left = dv - c;
                __mmask32 cols = left >= 32 ? ~(__mmask32)0 : left <= 0 ? 0 : (__mmask32)((1ull << left) - 1);
                __m512i a = j < n ? _mm512_maskz_loadu_epi16(cols, r0 + c) : _mm512_setzero_si512();
                __m512i b = j + 1 < n ? _mm512_maskz_loadu_epi16(cols, r1 + c) : _mm512_setzero_si512();
                bf16 *dst = vp + (j / 2) * dvp * 2 + c * 2;
                _mm512_storeu_si512((void *)dst, _mm512_permutex2var_epi16(a, lo, b));
                if (c + 16 < dvp) _mm512_storeu_si512((void *)(dst + 32), _mm512_permutex2var_epi16(a, hi, b));
            }
        }
        return;
    }
#endif
    uint32_t *kp32 = (uint32_t *)kp;
    for (int64_t j = 0; j < PF_BN; j++) {
        if (j >= n) { /* padding keys: zeros (their scores are masked, their P is 0) */
            for (int64_t p = 0; p < pairs; p++) kp32[p * PF_BN + j] = 0;
            for (int64_t c = 0; c < dvp; c++) vp[(j / 2) * dvp * 2 + c * 2 + (j & 1)] = 0;
            continue;
        }
        const bf16 *kr = k + (k0 + j) * k_ls, *vr = v + (k0 + j) * v_ls;
        for (int64_t p = 0; p < d / 2; p++) {
            uint32_t w;
            memcpy(&w, kr + 2 * p, 4);
            kp32[p * PF_BN + j] = w;
        }
        if (d & 1) kp32[(d / 2) * PF_BN + j] = kr[d - 1]; /* the odd last feature pairs with a zero */
        bf16 *vo = vp + (j / 2) * dvp * 2 + (j & 1);
        for (int64_t c = 0; c < dv; c++) vo[c * 2] = vr[c];
        for (int64_t c = dv; c < dvp; c++) vo[c * 2] = 0;
    }
}

#if defined(__AVX512BF16__)
#define PF_INLINE static inline __attribute__((always_inline))

static inline __m512bh pf_pair(const bf16 *p) { /* one bf16 pair broadcast to every lane */
    int32_t w;
    memcpy(&w, p, 4);
    return (__m512bh)_mm512_set1_epi32(w);
}

/* S rows [0, 6) x keys [0, 16 NK) of a block: q (6, dpad) packed rows, kb the packed K block. */
PF_INLINE void pf_s_tile(const bf16 *q, int64_t dpad, const bf16 *kb, const int NK, float *s, float scale) {
    __m512 acc[6][4];
    for (int r = 0; r < 6; r++)
        for (int c = 0; c < NK; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < dpad / 2; p++) {
        __m512bh kv[4];
        for (int c = 0; c < NK; c++) kv[c] = (__m512bh)_mm512_loadu_si512((const void *)(kb + p * PF_BN * 2 + c * 32));
        for (int r = 0; r < 6; r++) {
            __m512bh qp = pf_pair(q + r * dpad + 2 * p);
            for (int c = 0; c < NK; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], kv[c], qp);
        }
    }
    __m512 sc = _mm512_set1_ps(scale);
    for (int r = 0; r < 6; r++)
        for (int c = 0; c < NK; c++) _mm512_storeu_ps(s + r * PF_BN + c * 16, _mm512_mul_ps(acc[r][c], sc));
}

/* O rows [0, MR) x features [c0, c0 + 16 NV + 8 HALF) = O alpha + P V over `pairs` key pairs of a
 * block. HALF: 8 more features in a 256-bit accumulator (head dim 72 = 4 x 16 + 8: a whole 16-wide
 * vector would waste a tenth of the products). */
PF_INLINE void pf_pv_tile(const bf16 *P, const bf16 *vb, int64_t dvp, int64_t c0, int64_t pairs, const int MR,
                          const int NV, const int HALF, float *O, const float *alpha) {
    __m512 acc[6][8];
    __m256 tail[6];
    for (int r = 0; r < MR; r++) {
        __m512 a = _mm512_set1_ps(alpha[r]);
        for (int c = 0; c < NV; c++) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(O + r * dvp + c0 + c * 16), a);
        if (HALF) tail[r] = _mm256_mul_ps(_mm256_loadu_ps(O + r * dvp + c0 + NV * 16), _mm512_castps512_ps256(a));
    }
    for (int64_t j = 0; j < pairs; j++) {
        const bf16 *vj = vb + j * dvp * 2 + c0 * 2;
        for (int c = 0; c < NV; c++) {
            __m512bh vv = (__m512bh)_mm512_loadu_si512((const void *)(vj + c * 32));
            for (int r = 0; r < MR; r++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], vv, pf_pair(P + r * PF_BN + 2 * j));
        }
        if (HALF) {
            __m256bh vv = (__m256bh)_mm256_loadu_si256((const __m256i *)(vj + NV * 32));
            for (int r = 0; r < MR; r++)
                tail[r] = _mm256_dpbf16_ps(tail[r], vv, (__m256bh)_mm512_castsi512_si256((__m512i)pf_pair(P + r * PF_BN + 2 * j)));
        }
    }
    for (int r = 0; r < MR; r++) {
        for (int c = 0; c < NV; c++) _mm512_storeu_ps(O + r * dvp + c0 + c * 16, acc[r][c]);
        if (HALF) _mm256_storeu_ps(O + r * dvp + c0 + NV * 16, tail[r]);
    }
}

/* 2^x for finite x <= PF_SLACK (below -150 it gives 0): 2^round(x) times a degree-5 polynomial
 * of the rest, whose relative error (~2e-6) is far below the bf16 rounding P gets next. */
static inline __m512 pf_exp2(__m512 x) {
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, n); /* [-0.5, 0.5] */
    __m512 p = _mm512_set1_ps(1.3333558e-3f); /* ln2^k / k!, k = 5..0 */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

#define PF_SLACK 8.0f /* log2 units a score may exceed the running max before O is rescaled */

/* One softmax row of a key block: s (scores in log2 units) over `valid` keys of `computed` (a
 * multiple of 16 on the AVX512 path); writes bf16 P (zeros past `valid`), updates the running max
 * m and the row sum l (16 partial sums on the AVX512 path, l[0] alone otherwise) and returns
 * alpha, the factor for the row's O so far. Lazy rescaling: while no score exceeds m by more
 * than PF_SLACK the max is kept (alpha = 1, P <= 2^8, far from overflow), which skips the
 * horizontal max of almost every block; the result is the same up to P's bf16 rounding, which
 * is relative and so does not depend on the reference point. */
static inline float pf_softmax_row(const float *s, int64_t valid, int64_t computed, bf16 *P, float *m, float *l) {
    if (valid <= 0) { /* nothing visible in this block (causal): P = 0, O unchanged */
        memset(P, 0, sizeof(bf16) * computed);
        return 1.0f;
    }
    float alpha = 1.0f;
#if defined(__AVX512BF16__)
    __m512 x[4], sum;
    int nv = (int)(computed / 16);
    if (valid == PF_BN && *m > -INFINITY) { /* a whole block after the first: no masks */
        for (int c = 0; c < 4; c++) x[c] = _mm512_loadu_ps(s + 16 * c);
        __m512 mx = _mm512_max_ps(_mm512_max_ps(x[0], x[1]), _mm512_max_ps(x[2], x[3]));
        if (_mm512_cmp_ps_mask(mx, _mm512_set1_ps(*m + PF_SLACK), _CMP_GT_OQ)) {
            float m_new = _mm512_reduce_max_ps(mx);
            alpha = exp2f(*m - m_new);
            *m = m_new;
        }
        __m512 mv = _mm512_set1_ps(*m);
        for (int c = 0; c < 4; c++) x[c] = pf_exp2(_mm512_sub_ps(x[c], mv));
        sum = _mm512_add_ps(_mm512_add_ps(x[0], x[1]), _mm512_add_ps(x[2], x[3]));
    } else {
        __m512 mx = _mm512_set1_ps(-INFINITY);
        __mmask16 keep[4];
        for (int c = 0; c < nv; c++) {
            int64_t left = valid - 16 * c;
            keep[c] = left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
            x[c] = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), keep[c], s + 16 * c);
            mx = _mm512_max_ps(mx, x[c]);
        }
        float m_new = _mm512_reduce_max_ps(mx);
        if (m_new > *m + PF_SLACK || *m == -INFINITY) {
            alpha = exp2f(*m - m_new); /* the first visible block: exp2(-inf) = 0 */
            *m = m_new;
        }
        __m512 mv = _mm512_set1_ps(*m);
        sum = _mm512_setzero_ps();
        for (int c = 0; c < nv; c++) {
            x[c] = _mm512_maskz_mov_ps(keep[c], pf_exp2(_mm512_max_ps(_mm512_sub_ps(x[c], mv), _mm512_set1_ps(-150.0f))));
            sum = _mm512_add_ps(sum, x[c]);
        }
    }
    for (int c = 0; c + 1 < nv; c += 2)
        _mm512_storeu_si512((void *)(P + 16 * c), (__m512i)_mm512_cvtne2ps_pbh(x[c + 1], x[c]));
    if (nv & 1) _mm256_storeu_si256((__m256i *)(P + 16 * (nv - 1)), (__m256i)_mm512_cvtneps_pbh(x[nv - 1]));
    _mm512_storeu_ps(l, _mm512_fmadd_ps(_mm512_loadu_ps(l), _mm512_set1_ps(alpha), sum));
#else
    float m_new = -INFINITY;
    for (int64_t j = 0; j < valid; j++) m_new = s[j] > m_new ? s[j] : m_new;
    if (m_new > *m + PF_SLACK || *m == -INFINITY) {
        alpha = exp2f(*m - m_new);
        *m = m_new;
    }
    float total = 0.0f;
    for (int64_t j = 0; j < computed; j++) {
        float p = j < valid ? exp2f(s[j] - *m) : 0.0f;
        total += p;
        P[j] = f32_to_bf16(p);
    }
    l[0] = l[0] * alpha + total;
#endif
    return alpha;
}

/* One work item: query rows [i0, i0 + rows) of one head against its packed keys and values. */
static void pf_block(const bf16 *q, int64_t q_ts, const bf16 *kpack, const bf16 *vpack, int64_t L, int64_t d,
                     int64_t dv, int64_t i0, int64_t rows, int causal, int64_t offset, float scale2, bf16 *out,
                     int64_t o_ts, char *scratch) {
    const int64_t dpad = pf_up(d, 2), dvp = pf_up(dv, 16), rp = pf_up(rows, 12);
    bf16 *Q = (bf16 *)scratch;                       /* (PF_BM, dpad) */
    float *S = (float *)(Q + PF_BM * dpad);          /* (PF_BM, PF_BN) */
    bf16 *P = (bf16 *)(S + PF_BM * PF_BN);           /* (PF_BM, PF_BN) */
    float *O = (float *)(P + PF_BM * PF_BN);         /* (PF_BM, dvp) */
    float *m = O + PF_BM * dvp, *alpha = m + PF_BM, *l = alpha + PF_BM; /* l: (PF_BM, 16) partial sums */
    for (int64_t r = 0; r < rp; r++) { /* padding rows are zeros: computed, never written out */
        bf16 *dst = Q + r * dpad;
        if (r < rows) memcpy(dst, q + (i0 + r) * q_ts, sizeof(bf16) * d);
        for (int64_t c = r < rows ? d : 0; c < dpad; c++) dst[c] = 0;
        m[r] = -INFINITY;
        for (int c = 0; c < 16; c++) l[r * 16 + c] = 0.0f;
    }
    memset(O, 0, sizeof(float) * rp * dvp);
    int64_t kend = causal ? offset + i0 + rows : L; /* keys any row of the block sees */
    kend = kend < L ? kend : L;
    for (int64_t k0 = 0; k0 < kend; k0 += PF_BN) {
        const int64_t kb = k0 / PF_BN, kn = kend - k0 < PF_BN ? kend - k0 : PF_BN;
        const bf16 *kblk = kpack + kb * PF_BN * dpad, *vblk = vpack + kb * PF_BN * dvp;
#if defined(__AVX512BF16__)
        const int64_t computed = pf_up(kn, 16);
        for (int64_t r0 = 0; r0 < rp; r0 += 6) {
            switch (computed / 16) { /* constant tile widths: the accumulators stay in registers */
            case 1: pf_s_tile(Q + r0 * dpad, dpad, kblk, 1, S + r0 * PF_BN, scale2); break;
            case 2: pf_s_tile(Q + r0 * dpad, dpad, kblk, 2, S + r0 * PF_BN, scale2); break;
            case 3: pf_s_tile(Q + r0 * dpad, dpad, kblk, 3, S + r0 * PF_BN, scale2); break;
            default: pf_s_tile(Q + r0 * dpad, dpad, kblk, 4, S + r0 * PF_BN, scale2); break;
            }
        }
#else
        const int64_t computed = pf_up(kn, 2);
        for (int64_t r = 0; r < rp; r++) {
            float *s = S + r * PF_BN;
            for (int64_t j = 0; j < computed; j++) s[j] = 0.0f;
            for (int64_t p = 0; p < dpad / 2; p++) {
                float q0 = bf16_to_f32(Q[r * dpad + 2 * p]), q1 = bf16_to_f32(Q[r * dpad + 2 * p + 1]);
                const bf16 *kk = kblk + p * PF_BN * 2;
                for (int64_t j = 0; j < computed; j++)
                    s[j] += q0 * bf16_to_f32(kk[2 * j]) + q1 * bf16_to_f32(kk[2 * j + 1]);
            }
            for (int64_t j = 0; j < computed; j++) s[j] *= scale2;
        }
#endif
        for (int64_t r = 0; r < rp; r++) {
            int64_t limit = causal ? offset + i0 + r + 1 : L; /* keys below it are visible to row r */
            limit = limit < L ? limit : L;
            alpha[r] = pf_softmax_row(S + r * PF_BN, limit - k0 < kn ? limit - k0 : kn, computed, P + r * PF_BN,
                                      m + r, l + 16 * r);
        }
        const int64_t pairs = pf_up(kn, 2) / 2;
#if defined(__AVX512BF16__)
        for (int64_t c0 = 0; c0 < dv; c0 += 128) { /* up to 8 vectors of features per tile */
            int64_t cols = dv - c0 < 128 ? dv - c0 : 128;
            int nv = (int)(cols / 16), half = cols % 16 && cols % 16 <= 8;
            nv += cols % 16 > 8;
            int width = nv + half, mr = width <= 4 ? 6 : width <= 6 ? 4 : 3; /* about 24 accumulators */
            for (int64_t r0 = 0; r0 < rp; r0 += mr) {
                const bf16 *Pr = P + r0 * PF_BN;
                float *Or = O + r0 * dvp;
#define PF_PV(NV_, HALF_) pf_pv_tile(Pr, vblk, dvp, c0, pairs, (NV_ + HALF_) <= 4 ? 6 : (NV_ + HALF_) <= 6 ? 4 : 3, \
                                     NV_, HALF_, Or, alpha + r0)
                switch (nv * 2 + half) { /* constant tile shapes: the accumulators stay in registers */
                case 1: PF_PV(0, 1); break;
                case 2: PF_PV(1, 0); break;
                case 3: PF_PV(1, 1); break;
                case 4: PF_PV(2, 0); break;
                case 5: PF_PV(2, 1); break;
                case 6: PF_PV(3, 0); break;
                case 7: PF_PV(3, 1); break;
                case 8: PF_PV(4, 0); break;
                case 9: PF_PV(4, 1); break;
                case 10: PF_PV(5, 0); break;
                case 11: PF_PV(5, 1); break;
                case 12: PF_PV(6, 0); break;
                case 13: PF_PV(6, 1); break;
                case 14: PF_PV(7, 0); break;
                default: PF_PV(8, 0); break;
                }
#undef PF_PV
            }
        }
#else
        for (int64_t r = 0; r < rp; r++) {
            float *o = O + r * dvp;
            for (int64_t c = 0; c < dv; c++) o[c] *= alpha[r];
            for (int64_t j = 0; j < pairs; j++) {
                float p0 = bf16_to_f32(P[r * PF_BN + 2 * j]), p1 = bf16_to_f32(P[r * PF_BN + 2 * j + 1]);
                const bf16 *vv = vblk + j * dvp * 2;
                for (int64_t c = 0; c < dv; c++) o[c] += p0 * bf16_to_f32(vv[2 * c]) + p1 * bf16_to_f32(vv[2 * c + 1]);
            }
        }
#endif
    }
    for (int64_t r = 0; r < rows; r++) {
        float total = 0.0f;
        for (int c = 0; c < 16; c++) total += l[r * 16 + c];
        float inv = 1.0f / total;
        const float *o = O + r * dvp;
        bf16 *dst = out + (i0 + r) * o_ts;
        int64_t c = 0;
#if defined(__AVX512BF16__)
        for (; c + 16 <= dv; c += 16)
            _mm256_storeu_si256((__m256i *)(dst + c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + c), _mm512_set1_ps(inv))));
#endif
        for (; c < dv; c++) dst[c] = f32_to_bf16(o[c] * inv);
    }
}

/* out = softmax(scale q k^T [causal]) v for every batch row b and head h (kv head h / (H / Hk)).
 * q (B, H, T, d), k (B, Hk, L, d), v (B, Hk, L, dv), out (B, H, T, dv): any strides (b, h, t)
 * with unit stride along the features, so views of a fused projection and a head-merged output
 * work in place. d, dv <= 256 (the scratch sizes). work: dsvl2_attn_prefill_bytes(B * Hk, ...). */
void dsvl2_attn_prefill_bf16(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *out, int64_t B, int64_t H,
                             int64_t Hk, int64_t T, int64_t L, int64_t d, int64_t dv, int64_t q_bs, int64_t q_hs,
                             int64_t q_ts, int64_t k_bs, int64_t k_hs, int64_t k_ls, int64_t v_bs, int64_t v_hs,
                             int64_t v_ls, int64_t o_bs, int64_t o_hs, int64_t o_ts, float scale, int causal,
                             int64_t offset, void *work, int threads) {
    const int64_t groups = B * Hk, nkb = (L + PF_BN - 1) / PF_BN, nqb = (T + PF_BM - 1) / PF_BM;
    const int64_t ge = pf_group_elems(L, d, dv), kelems = pf_up(L, PF_BN) * pf_up(d, 2);
    const int64_t dpad = pf_up(d, 2), dvp = pf_up(dv, 16), rep = H / Hk;
    bf16 *pack = (bf16 *)(((uintptr_t)work + 63) & ~(uintptr_t)63);
    char *thread_scratch = (char *)(pack + groups * ge);
    const float scale2 = scale * 1.4426950408889634f; /* scores in log2 units: exp2 in the softmax */
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static) collapse(2)
        for (int64_t g = 0; g < groups; g++)
            for (int64_t kb = 0; kb < nkb; kb++)
                pf_pack(k + (g / Hk) * k_bs + (g % Hk) * k_hs, k_ls, v + (g / Hk) * v_bs + (g % Hk) * v_hs, v_ls,
                        L, d, dv, kb, pack + g * ge + kb * PF_BN * dpad, pack + g * ge + kelems + kb * PF_BN * dvp);
        char *scratch = thread_scratch + omp_get_thread_num() * pf_thread_bytes(d, dv);
        /* causal blocks near the end see the most keys: hand those out first */
#pragma omp for schedule(dynamic, 1) collapse(3)
        for (int64_t qi = 0; qi < nqb; qi++)
            for (int64_t b = 0; b < B; b++)
                for (int64_t h = 0; h < H; h++) {
                    int64_t qb = nqb - 1 - qi, i0 = qb * PF_BM, rows = T - i0 < PF_BM ? T - i0 : PF_BM;
                    const bf16 *base = pack + (b * Hk + h / rep) * ge;
                    pf_block(q + b * q_bs + h * q_hs, q_ts, base, base + kelems, L, d, dv, i0, rows, causal, offset,
                             scale2, out + b * o_bs + h * o_hs, o_ts, scratch);
                }
    }
}

/* ------------------------------------------------------------------ vision elementwise passes
 * The SigLIP tower's non-GEMM work: fc1's bias plus tanh-GELU in one in-place pass over the
 * bias-free GEMM's output, and LayerNorm without torch's input clone. bf16 in and out, float32
 * math; rows split over the threads, 16 lanes at a time with AVX512, the tails (and the whole row
 * in the other builds) in plain C with the same formulas, so every build agrees within one bf16
 * rounding of the output. */

#define GELU_K0 0.7978845608028654f /* sqrt(2 / pi) */
#define GELU_K1 0.044715f

/* gelu_tanh(z) = 0.5 z (1 + tanh(u)), u = K0 (z + K1 z^3), written as z / (1 + e^(-2u)). */
static inline float gelu_tanh_f32(float z) {
    float u = GELU_K0 * (z + GELU_K1 * z * z * z);
    float t = -2.0f * u;
    t = t > 88.0f ? 88.0f : t; /* e^88 is finite: z / (1 + e^t) -> 0 without inf / inf */
    return z / (1.0f + expf(t));
}

#if defined(__AVX512F__)
static inline __m512 ew_load_bf16(const bf16 *p) { /* 16 bf16 -> 16 float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline void ew_store_bf16(bf16 *p, __m512 v) { /* round to nearest even, NaN kept quiet */
#if defined(__AVX512BF16__)
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
#else
    __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_srli_epi32(r, 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(r));
#endif
}

/* e^x for x <= 88: 2^round(y) times a degree-6 polynomial of the rest (y = x log2 e), relative
 * error ~2e-7, far below the bf16 rounding of the result. */
static inline __m512 ew_exp(__m512 x) {
    __m512 y = _mm512_mul_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(1.4426950408889634f));
    y = _mm512_max_ps(y, _mm512_set1_ps(-150.0f)); /* 2^-150 underflows to 0 */
    __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(y, n); /* [-0.5, 0.5] */
    __m512 p = _mm512_set1_ps(1.5403530e-4f); /* ln2^k / k!, k = 6..0 */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 ew_gelu_tanh(__m512 z) {
    __m512 z2 = _mm512_mul_ps(z, z);
    __m512 u = _mm512_mul_ps(_mm512_mul_ps(z, _mm512_set1_ps(GELU_K0)),
                             _mm512_fmadd_ps(z2, _mm512_set1_ps(GELU_K1), _mm512_set1_ps(1.0f)));
    __m512 e = ew_exp(_mm512_mul_ps(u, _mm512_set1_ps(-2.0f)));
    return _mm512_div_ps(z, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}
#endif

#if defined(__AVX512BF16__)
/* {sum of a's lanes, of b's, of c's, of d's}: halves added, then two rounds of pairwise adds,
 * ~3 instructions a vector where four separate reductions take ~8 each. */
static inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
#define HALVES(x) _mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)))
    __m256 ab = _mm256_hadd_ps(HALVES(a), HALVES(b)); /* a01 a23 b01 b23 | a45 a67 b45 b67 */
    __m256 cd = _mm256_hadd_ps(HALVES(c), HALVES(d));
#undef HALVES
    __m256 abcd = _mm256_hadd_ps(ab, cd); /* a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7 */
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

/* One query row over one group's cache (decode with one query per kv head: MHA, R == 1), every
 * step in registers: q stays loaded (d <= 256), keys go four at a time, the softmax uses the
 * vector exp, and the value rows stream past 8 float accumulators (128 columns) in one sweep. The general
 * path below it spilled accumulators and a converted value row to L1 on every key and ran a
 * scalar expf per score: at 2000 cached tokens it read the cache at half the probe's bandwidth.
 * q (d) bf16, keys kg + l * k_ls, values vg + l * v_ls; s: L floats of scratch; out (dv) bf16. */
static void attn_decode_one_row(const bf16 *q, int64_t d, const bf16 *kg, int64_t k_ls, const bf16 *vg,
                                int64_t v_ls, int64_t dv, int64_t L, float scale, float *s, bf16 *out) {
    __m512bh qv[8];
    const int64_t nq = d / 32;
    for (int64_t c = 0; c < nq; c++) qv[c] = (__m512bh)_mm512_loadu_si512((const void *)(q + 32 * c));
    int64_t l = 0;
    for (; l + 4 <= L; l += 4) {
        const bf16 *k0 = kg + l * k_ls;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t c = 0; c < nq; c++) {
#define KEY(j) (__m512bh)_mm512_loadu_si512((const void *)(k0 + (j) * k_ls + 32 * c))
            a0 = _mm512_dpbf16_ps(a0, KEY(0), qv[c]);
            a1 = _mm512_dpbf16_ps(a1, KEY(1), qv[c]);
            a2 = _mm512_dpbf16_ps(a2, KEY(2), qv[c]);
            a3 = _mm512_dpbf16_ps(a3, KEY(3), qv[c]);
#undef KEY
        }
        _mm_storeu_ps(s + l, _mm_mul_ps(hsum4(a0, a1, a2, a3), _mm_set1_ps(scale)));
    }
    for (; l < L; l++) s[l] = scale * dot_row(q, kg + l * k_ls, d);
    /* softmax: max, then exp and sum; 1/sum is applied to the output, not to every weight */
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (l = 0; l < L; l += 16) {
        __mmask16 m = L - l >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (L - l)) - 1);
        mv = _mm512_mask_max_ps(mv, m, mv, _mm512_maskz_loadu_ps(m, s + l));
    }
    __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(mv)), sv = _mm512_setzero_ps();
    for (l = 0; l < L; l += 16) {
        __mmask16 m = L - l >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (L - l)) - 1);
        __m512 e = ew_exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + l), mx));
        _mm512_mask_storeu_ps(s + l, m, e);
        sv = _mm512_mask_add_ps(sv, m, sv, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sv));
    /* values: 128 columns (8 accumulators) a sweep when dv allows, else 64: one pass over the rows */
    const int64_t width = dv % 128 == 0 ? 128 : 64, nv = width / 16;
    for (int64_t c0 = 0; c0 < dv; c0 += width) {
        __m512 o[8];
        for (int j = 0; j < 8; j++) o[j] = _mm512_setzero_ps();
        const bf16 *vc = vg + c0;
        for (l = 0; l < L; l++) {
            const bf16 *vl = vc + l * v_ls;
            __m512 p = _mm512_set1_ps(s[l]);
#define V16(off) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(vl + (off)))), 16))
            if (nv == 8) {
                for (int j = 0; j < 8; j++) o[j] = _mm512_fmadd_ps(p, V16(16 * j), o[j]);
            } else {
                for (int j = 0; j < 4; j++) o[j] = _mm512_fmadd_ps(p, V16(16 * j), o[j]);
            }
#undef V16
        }
        float t[128];
        for (int64_t j = 0; j < nv; j++) _mm512_storeu_ps(t + 16 * j, _mm512_mul_ps(o[j], inv));
        for (int64_t c = 0; c < width; c++) out[c0 + c] = f32_to_bf16(t[c]);
    }
}
#endif

/* x (rows, N) with row stride ldx, in place: x = gelu_tanh(x + bias) (bias (N,), or NULL). */
void dsvl2_bias_gelu_bf16(bf16 *x, int64_t rows, int64_t N, int64_t ldx, const bf16 *bias, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        bf16 *row = x + r * ldx;
        int64_t c = 0;
#if defined(__AVX512F__)
        for (; c + 16 <= N; c += 16) {
            __m512 z = ew_load_bf16(row + c);
            if (bias) z = _mm512_add_ps(z, ew_load_bf16(bias + c));
            ew_store_bf16(row + c, ew_gelu_tanh(z));
        }
#endif
        for (; c < N; c++)
            row[c] = f32_to_bf16(gelu_tanh_f32(bf16_to_f32(row[c]) + (bias ? bf16_to_f32(bias[c]) : 0.0f)));
    }
}

/* LayerNorm over the last dim: x (rows, N) with row stride ldx -> out (rows, N) contiguous,
 * (x - mean) / sqrt(var + eps) * weight + bias, float32 statistics (two passes: the mean, then
 * the centred squares, as torch does). weight, bias (N,) bf16, either may be NULL. */
void dsvl2_layer_norm_bf16(const bf16 *x, int64_t rows, int64_t N, int64_t ldx, const bf16 *weight,
                           const bf16 *bias, float eps, bf16 *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const bf16 *row = x + r * ldx;
        bf16 *dst = out + r * N;
        float sum = 0.0f, sq = 0.0f;
        int64_t c = 0;
#if defined(__AVX512F__)
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        for (; c + 16 <= N; c += 16) s0 = _mm512_add_ps(s0, ew_load_bf16(row + c));
        sum = _mm512_reduce_add_ps(s0);
#endif
        for (; c < N; c++) sum += bf16_to_f32(row[c]);
        const float mean = sum / (float)N;
        c = 0;
#if defined(__AVX512F__)
        const __m512 vm = _mm512_set1_ps(mean);
        for (; c + 16 <= N; c += 16) {
            __m512 d = _mm512_sub_ps(ew_load_bf16(row + c), vm);
            s1 = _mm512_fmadd_ps(d, d, s1);
        }
        sq = _mm512_reduce_add_ps(s1);
#endif
        for (; c < N; c++) {
            float d = bf16_to_f32(row[c]) - mean;
            sq += d * d;
        }
        const float rstd = 1.0f / sqrtf(sq / (float)N + eps);
        c = 0;
#if defined(__AVX512F__)
        const __m512 vr = _mm512_set1_ps(rstd);
        for (; c + 16 <= N; c += 16) {
            __m512 y = _mm512_mul_ps(_mm512_sub_ps(ew_load_bf16(row + c), vm), vr);
            if (weight) y = _mm512_mul_ps(y, ew_load_bf16(weight + c));
            if (bias) y = _mm512_add_ps(y, ew_load_bf16(bias + c));
            ew_store_bf16(dst + c, y);
        }
#endif
        for (; c < N; c++) {
            float y = (bf16_to_f32(row[c]) - mean) * rstd;
            if (weight) y *= bf16_to_f32(weight[c]);
            if (bias) y += bf16_to_f32(bias[c]);
            dst[c] = f32_to_bf16(y);
        }
    }
}

/* The language model's RMSNorm, as model/attention.py's RMSNorm computes it in bf16:
 *   y = bf16(w * bf16(x * rsqrt(mean(x^2) + eps)))     (statistics in float32)
 * One pass per row instead of torch's eight ops (float copy, pow, mean, add, rsqrt, mul, cast,
 * mul): decoding runs 2 per layer on a single row, where each op's dispatch cost more than its
 * arithmetic. Only the order of the float32 sum of squares differs from torch's. x rows ldx
 * apart, w (N) bf16, out (rows, N) contiguous. */
void dsvl2_rms_norm_bf16(const bf16 *x, int64_t rows, int64_t N, int64_t ldx, const bf16 *w, float eps, bf16 *out,
                         int threads) {
#pragma omp parallel for schedule(static) num_threads(rows < threads ? (int)rows : threads)
    for (int64_t r = 0; r < rows; r++) {
        const bf16 *row = x + r * ldx;
        bf16 *dst = out + r * N;
        float sq = 0.0f;
        int64_t c = 0;
#if defined(__AVX512F__)
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        for (; c + 32 <= N; c += 32) {
            __m512 a = ew_load_bf16(row + c), b = ew_load_bf16(row + c + 16);
            s0 = _mm512_fmadd_ps(a, a, s0);
            s1 = _mm512_fmadd_ps(b, b, s1);
        }
        for (; c + 16 <= N; c += 16) {
            __m512 a = ew_load_bf16(row + c);
            s0 = _mm512_fmadd_ps(a, a, s0);
        }
        sq = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#endif
        for (; c < N; c++) sq += bf16_to_f32(row[c]) * bf16_to_f32(row[c]);
        const float rstd = 1.0f / sqrtf(sq / (float)N + eps); /* torch's rsqrt on CPU: 1 / sqrt */
        c = 0;
#if defined(__AVX512F__)
        const __m512 vr = _mm512_set1_ps(rstd);
        for (; c + 16 <= N; c += 16) {
            __m512 h = _mm512_mul_ps(ew_load_bf16(row + c), vr);
            ew_store_bf16(dst + c, h); /* the normalised row in bf16 first, as h.to(x.dtype) */
            ew_store_bf16(dst + c, _mm512_mul_ps(ew_load_bf16(dst + c), ew_load_bf16(w + c)));
        }
#endif
        for (; c < N; c++)
            dst[c] = f32_to_bf16(bf16_to_f32(w[c]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(row[c]) * rstd)));
    }
}

/* Rotary position embedding as model/attention.py's apply_rope computes it in bf16, for rows of
 * x (B, H, T, d) with any strides but unit stride along d, and cos/sin (B, 1, T, d):
 *   xr  = x, or with `interleaved` its pairs regrouped evens then odds (DeepSeek-V2's layout)
 *   out = bf16( bf16(xr * cos) + bf16(rotate_half(xr) * sin) ),  rotate_half = (-xr2, xr1)
 * the three roundings of torch's three bf16 ops (the products of two bf16 are exact in float32,
 * so each rounding is torch's). One pass instead of seven ops per call (slices, neg, cat, two
 * muls, an add; and a view, transpose and copy when interleaved). out (B, H, T, d) contiguous.
 * x's strides in elements: xs_b, xs_h, xs_t; cos/sin's: cs_b, cs_t (0 where broadcast). */
void dsvl2_rope_bf16(const bf16 *x, int64_t B, int64_t H, int64_t T, int64_t d, int64_t xs_b, int64_t xs_h,
                     int64_t xs_t, const bf16 *cos, const bf16 *sin, int64_t cs_b, int64_t cs_t, int interleaved,
                     bf16 *out, int threads) {
    const int64_t rows = B * H * T, half = d / 2;
#pragma omp parallel for schedule(static) num_threads(rows * d < 65536 ? 1 : threads)
    for (int64_t r = 0; r < rows; r++) {
        int64_t b = r / (H * T), h = (r / T) % H, tt = r % T;
        const bf16 *xr = x + b * xs_b + h * xs_h + tt * xs_t;
        const bf16 *c = cos + b * cs_b + tt * cs_t, *s = sin + b * cs_b + tt * cs_t;
        bf16 *o = out + r * d;
        for (int64_t j = 0; j < d; j++) {
            /* element j of the regrouped row, and of its rotation partner */
            int64_t jj = j < half ? j : j - half, other = j < half ? j + half : j - half;
            int64_t src = interleaved ? (j < half ? 2 * jj : 2 * jj + 1) : j;
            int64_t osrc = interleaved ? (other < half ? 2 * other : 2 * (other - half) + 1) : other;
            float v = bf16_to_f32(xr[src]), w = bf16_to_f32(xr[osrc]);
            float rot = j < half ? -w : w;
            float a = bf16_to_f32(f32_to_bf16(v * bf16_to_f32(c[j])));
            float q = bf16_to_f32(f32_to_bf16(rot * bf16_to_f32(s[j])));
            o[j] = f32_to_bf16(a + q);
        }
    }
}

/* The gated MLPs' activation over many rows (prefill): h (rows, 2I) holds gate | up, as the
 * fused gate_up projection writes it, rows ldh apart;
 *   out (rows, I) = bf16( bf16(silu(gate)) * up )
 * the two roundings of torch's bf16 F.silu(gate) * up, in one pass instead of two ops (and
 * their reads of the split halves). silu in float32 with the vector exp (relative error ~2e-7,
 * far below the bf16 rounding next). */
void dsvl2_silu_mul_bf16(const bf16 *h, int64_t rows, int64_t I, int64_t ldh, bf16 *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const bf16 *g = h + r * ldh, *u = g + I;
        bf16 *o = out + r * I;
        int64_t c = 0;
#if defined(__AVX512F__)
        for (; c + 16 <= I; c += 16) {
            __m512 x = ew_load_bf16(g + c);
            __m512 s = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), ew_exp(_mm512_sub_ps(_mm512_setzero_ps(), x))));
            ew_store_bf16(o + c, s);
            ew_store_bf16(o + c, _mm512_mul_ps(ew_load_bf16(o + c), ew_load_bf16(u + c)));
        }
#endif
        for (; c < I; c++)
            o[c] = f32_to_bf16(bf16_to_f32(f32_to_bf16(silu(bf16_to_f32(g[c])))) * bf16_to_f32(u[c]));
    }
}

/* The routed experts' outputs back in token order, weighted and summed (engine's prefill path,
 * as model/moe.py's combine_experts): rows of `sorted_out` (N*k, D) bf16 are the token copies
 * sorted by expert, row i being copy order[i] (copy f = token f / k, slot f % k);
 *   y[t] = bf16( sum_j weights[t, j] * float(row of copy t*k + j) )    (float32, j in order)
 * One pass instead of an index_put into a fresh (N*k, D), a float32 copy of it, a product and a
 * sum over k (~15 ms a layer for tiny's 1024-row chunk). inv: N*k int64 of scratch. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off"))) /* products rounded before the sum, as torch's */
#endif
void dsvl2_moe_combine_bf16(const bf16 *sorted_out, const int64_t *order, const float *weights, int64_t N,
                            int64_t k, int64_t D, int64_t *inv, bf16 *y, int threads) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    for (int64_t i = 0; i < N * k; i++) inv[order[i]] = i;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < N; t++) {
        bf16 *dst = y + t * D;
        int64_t c = 0;
#if defined(__AVX512F__)
        for (; c + 16 <= D; c += 16) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t j = 0; j < k; j++)
                acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_set1_ps(weights[t * k + j]),
                                                       ew_load_bf16(sorted_out + inv[t * k + j] * D + c)));
            ew_store_bf16(dst + c, acc);
        }
#endif
        for (; c < D; c++) {
            float acc = 0.0f;
            for (int64_t j = 0; j < k; j++) acc += weights[t * k + j] * bf16_to_f32(sorted_out[inv[t * k + j] * D + c]);
            dst[c] = f32_to_bf16(acc);
        }
    }
}

/* ------------------------------------------------------------------ int8 vision linears (opt-in)
 * The SigLIP tower's four linears (qkv, proj, fc1, fc2) as u8 x s8 -> s32 products with
 * AVX512-VNNI's vpdpbusd, which runs twice the multiply-adds per instruction of the bf16 dot
 * product: y = (sa[m] sw[n]) (sum_k qa[m,k] qw[n,k]) + bias[n], with symmetric int8 activations
 * (one scale per row, computed per call) and weights (one scale per output channel, at load).
 *
 * vpdpbusd multiplies unsigned by signed bytes, so activations are stored as u = q + 128 in
 * [1, 255]; sum_k u_k w_k = sum_k q_k w_k + 128 colsum(w): the GEMM subtracts corr[n] =
 * 128 colsum(w_n), kept from packing. Every product and sum is exact in int32 (|sum| <=
 * K 255 127 < 2^31 for K < 66000), so the only roundings are the two quantizations, the int32 ->
 * float conversion and the bf16 store.
 *
 * Weights packed at load: [Np/64][Kp/4][64][4] int8 (Np = N rounded up to 64, Kp = K to 4, zero
 * padded): one 64-column panel's 4 consecutive k for 64 columns is 256 contiguous bytes, four zmm
 * loads, each 16 columns x 4 k as vpdpbusd wants them. Quantization and packing are plain C in
 * every build; the GEMM needs AVX512-VNNI and BW (dsvl2_int8_vnni() says whether this build has
 * it; without, dsvl2_int8_gemm returns -1 and the caller keeps the bf16 path). */

/* max |x| over a bf16 row: the symmetric int8 scale of a weight row or an activation row */
static float row_absmax(const bf16 *row, int64_t K) {
    float amax = 0.0f;
    int64_t k = 0;
#if defined(__AVX512F__)
    __m512 vmax = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(ew_load_bf16(row + k)));
    amax = _mm512_reduce_max_ps(vmax);
#endif
    for (; k < K; k++) {
        float a = fabsf(bf16_to_f32(row[k]));
        amax = a > amax ? a : amax;
    }
    return amax;
}

#define I8_NR 64 /* output columns per packed panel: 4 zmm of int32 accumulators */
#define I8_MR 6  /* rows per micro-tile: 6 x 4 = 24 accumulators + 4 weights + 1 broadcast <= 32 zmm */
#define I8_MC 96 /* rows per work item (16 micro-tiles): items are (panel, row chunk) pairs */

int dsvl2_int8_vnni(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return 1;
#else
    return 0;
#endif
}

static inline int64_t i8_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* Round half to even, as _mm512_cvtps_epi32 in the default rounding mode and torch.round do. */
static inline int32_t i8_round(float v) { return (int32_t)nearbyintf(v); }

/* w (N, K) bf16 row-major (nn.Linear's weight) -> packed (Np Kp bytes, layout above), scales (Np)
 * float32 (amax / 127 per output channel; 0 for an all-zero or padding channel) and corr (Np)
 * int32 = 128 sum_k q[n, k]. q = round(w * (127 / amax)) clamped to [-127, 127] (the clamp only
 * catches float rounding at +-amax). */
void dsvl2_int8_pack_weights(const bf16 *w, int64_t N, int64_t K, int8_t *packed, float *scales, int32_t *corr,
                             int threads) {
    const int64_t Np = i8_up(N, I8_NR), Kp = i8_up(K, 4);
    memset(packed, 0, (size_t)(Np * Kp));
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < Np; n++) {
        if (n >= N) {
            scales[n] = 0.0f;
            corr[n] = 0;
            continue;
        }
        const bf16 *row = w + n * K;
        const float amax = row_absmax(row, K);
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int8_t *panel = packed + (n / I8_NR) * (Kp * I8_NR) + (n % I8_NR) * 4;
        int32_t sum = 0;
        int64_t k = 0;
#if defined(__AVX512F__)
        /* 16 k at a time (4 groups of 4 bytes, one per k-step of the panel): the scalar loop
         * below took ~4 ns a weight, 1.6 s of load time for SigLIP-SO400M */
        const __m512 vinv = _mm512_set1_ps(inv);
        const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
        __m512i vsum = _mm512_setzero_si512();
        for (; k + 16 <= K; k += 16) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(ew_load_bf16(row + k), vinv)); /* nearest even */
            q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
            vsum = _mm512_add_epi32(vsum, q);
            uint32_t four[4];
            _mm_storeu_si128((__m128i *)four, _mm512_cvtepi32_epi8(q));
            for (int g = 0; g < 4; g++) memcpy(panel + (k / 4 + g) * (I8_NR * 4), &four[g], 4);
        }
        sum = _mm512_reduce_add_epi32(vsum);
#endif
        for (; k < K; k++) {
            int32_t q = i8_round(bf16_to_f32(row[k]) * inv);
            q = q > 127 ? 127 : (q < -127 ? -127 : q);
            panel[(k / 4) * (I8_NR * 4) + (k % 4)] = (int8_t)q;
            sum += q;
        }
        scales[n] = amax / 127.0f;
        corr[n] = 128 * sum;
    }
}

/* x (M, K) bf16 with row stride ldx -> q (M, ldq) u8 = round(x * (127 / amax_row)) + 128 (the
 * columns K..ldq-1, up to a multiple of 4, set to 128: zero after the offset) and scales (M)
 * float32 = amax_row / 127. A row of zeros gets scale 0 and codes 128. */
void dsvl2_int8_quantize_rows(const bf16 *x, int64_t M, int64_t K, int64_t ldx, uint8_t *q, int64_t ldq,
                              float *scales, int threads) {
#pragma omp parallel for schedule(dynamic, 32) num_threads(threads)
    for (int64_t m = 0; m < M; m++) {
        const bf16 *row = x + m * ldx;
        uint8_t *dst = q + m * ldq;
        const float amax = row_absmax(row, K);
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int64_t k = 0;
#if defined(__AVX512F__)
        const __m512 vinv = _mm512_set1_ps(inv);
        const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), off = _mm512_set1_epi32(128);
        for (; k + 16 <= K; k += 16) {
            __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(ew_load_bf16(row + k), vinv)); /* nearest even */
            v = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(v, lo), hi), off);
            _mm_storeu_si128((__m128i *)(dst + k), _mm512_cvtepi32_epi8(v));
        }
#endif
        for (; k < K; k++) {
            int32_t v = i8_round(bf16_to_f32(row[k]) * inv);
            v = v > 127 ? 127 : (v < -127 ? -127 : v);
            dst[k] = (uint8_t)(v + 128);
        }
        for (; k < ldq; k++) dst[k] = 128;
        scales[m] = amax / 127.0f;
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* One micro-tile: MR rows of a (u8, row stride lda) times one packed 64-column panel over Kp,
 * then the epilogue into y. MR is a compile-time constant at every call (i8_tile_N below), so
 * the accumulator array is unrolled into registers. */
static inline __attribute__((always_inline)) void i8_tile(const int MR, const uint8_t *a, int64_t lda,
                                                           const float *sa, const int8_t *panel, int64_t Kp,
                                                           const float *sw, const int32_t *corr, const float *bias,
                                                           int64_t ncols, int gelu, bf16 *y, int64_t ldy) {
    __m512i acc[I8_MR][4];
#pragma GCC unroll 6
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_si512();
    const int8_t *b = panel;
    for (int64_t k = 0; k < Kp; k += 4, b += 4 * I8_NR) {
        const __m512i b0 = _mm512_loadu_si512((const void *)b), b1 = _mm512_loadu_si512((const void *)(b + 64));
        const __m512i b2 = _mm512_loadu_si512((const void *)(b + 128)), b3 = _mm512_loadu_si512((const void *)(b + 192));
#pragma GCC unroll 6
        for (int r = 0; r < MR; r++) {
            int32_t four;
            memcpy(&four, a + r * lda + k, 4);
            const __m512i av = _mm512_set1_epi32(four); /* 4 u8 of row r, every lane */
            acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], av, b0);
            acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], av, b1);
            acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], av, b2);
            acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], av, b3);
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
        const int64_t c = 16 * j;
        if (c >= ncols) break;
        const __mmask16 keep = ncols - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (ncols - c)) - 1u);
        const __m512i vc = _mm512_loadu_si512((const void *)(corr + c));
        const __m512 vs = _mm512_loadu_ps(sw + c);
        /* bias has N floats (sw and corr are padded to the panel): no lane past N is read */
        const __m512 vb = bias ? _mm512_maskz_loadu_ps(keep, bias + c) : _mm512_setzero_ps();
#pragma GCC unroll 6
        for (int r = 0; r < MR; r++) {
            __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][j], vc));
            v = _mm512_fmadd_ps(v, _mm512_mul_ps(vs, _mm512_set1_ps(sa[r])), vb);
            if (gelu) v = ew_gelu_tanh(v);
            bf16 *dst = y + r * ldy + c;
            if (keep == 0xffff) {
                ew_store_bf16(dst, v);
            } else { /* last panel of an N that is not a multiple of 16: store through a buffer */
                bf16 tmp[16];
                ew_store_bf16(tmp, v);
                _mm256_mask_storeu_epi16((void *)dst, keep, _mm256_loadu_si256((const __m256i *)tmp));
            }
        }
    }
}

#define I8_TILE(R)                                                                                          \
    static void i8_tile_##R(const uint8_t *a, int64_t lda, const float *sa, const int8_t *panel, int64_t Kp, \
                            const float *sw, const int32_t *corr, const float *bias, int64_t ncols, int gelu,  \
                            bf16 *y, int64_t ldy) {                                                          \
        i8_tile(R, a, lda, sa, panel, Kp, sw, corr, bias, ncols, gelu, y, ldy);                             \
    }
I8_TILE(1)
I8_TILE(2)
I8_TILE(3)
I8_TILE(4)
I8_TILE(5)
I8_TILE(6)
#endif

/* y (M, N) bf16, row stride ldy = (sa[m] sw[n]) (sum_k a[m, k] bp[n, k] - corr[n]) + bias[n],
 * tanh-GELU applied when `gelu`. a: (M, lda) u8 from dsvl2_int8_quantize_rows (lda >= Kp, the
 * columns K..Kp-1 zero after the offset), sa (M); bp, sw, corr: dsvl2_int8_pack_weights of an
 * (N, K) weight with Kp = K rounded up to 4; bias (N) float32 or NULL. Returns 0, or -1 when this
 * build has no AVX512-VNNI (nothing is written). */
int dsvl2_int8_gemm(const uint8_t *a, int64_t lda, const float *sa, int64_t M, const int8_t *bp, const float *sw,
                    const int32_t *corr, const float *bias, int64_t N, int64_t Kp, int gelu, bf16 *y, int64_t ldy,
                    int threads) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    const int64_t panels = i8_up(N, I8_NR) / I8_NR, chunks = (M + I8_MC - 1) / I8_MC;
    /* Panel-major items (64 Kp bytes of weights, 72 KB at K 1152, stay in a thread's L2 while
     * row chunks stream past), handed out two at a time as threads free up: when another process
     * holds one of the cores a static split waits for its slowest thread; on an idle CPU the
     * two schedules measured the same within the noise. */
#pragma omp parallel for collapse(2) schedule(dynamic, 2) num_threads(threads)
    for (int64_t p = 0; p < panels; p++)
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t n0 = p * I8_NR, ncols = N - n0 < I8_NR ? N - n0 : I8_NR;
            const int8_t *panel = bp + p * Kp * I8_NR;
            const int64_t m_end = (c + 1) * I8_MC < M ? (c + 1) * I8_MC : M;
            const float *bi = bias ? bias + n0 : NULL;
            for (int64_t m = c * I8_MC; m < m_end; m += I8_MR) {
                const uint8_t *am = a + m * lda;
                bf16 *ym = y + m * ldy + n0;
                switch (m_end - m < I8_MR ? m_end - m : I8_MR) {
                case 6: i8_tile_6(am, lda, sa + m, panel, Kp, sw + n0, corr + n0, bi, ncols, gelu, ym, ldy); break;
                case 5: i8_tile_5(am, lda, sa + m, panel, Kp, sw + n0, corr + n0, bi, ncols, gelu, ym, ldy); break;
                case 4: i8_tile_4(am, lda, sa + m, panel, Kp, sw + n0, corr + n0, bi, ncols, gelu, ym, ldy); break;
                case 3: i8_tile_3(am, lda, sa + m, panel, Kp, sw + n0, corr + n0, bi, ncols, gelu, ym, ldy); break;
                case 2: i8_tile_2(am, lda, sa + m, panel, Kp, sw + n0, corr + n0, bi, ncols, gelu, ym, ldy); break;
                default: i8_tile_1(am, lda, sa + m, panel, Kp, sw + n0, corr + n0, bi, ncols, gelu, ym, ldy); break;
                }
            }
        }
    return 0;
#else
    (void)a; (void)lda; (void)sa; (void)M; (void)bp; (void)sw; (void)corr; (void)bias; (void)N; (void)Kp;
    (void)gelu; (void)y; (void)ldy; (void)threads;
    return -1;
#endif
}
