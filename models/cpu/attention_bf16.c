/* Softmax attention for bf16 q, k, v on x86 CPUs with AVX512-BF16 (models/cpu/attention.py builds it).

   torch's CPU SDPA kernel runs bf16 at its fp32 speed (bench/bench_attention.py). This one multiplies
   bf16 pairs with VDPBF16PS, keeps the scores and the softmax in fp32 and rounds the probabilities to
   bf16 for the second product, as SDPA does, so its error against fp32 attention is SDPA's.

   Per (batch, head): k is repacked as [D/2][M] pairs of dims and v as [M/2][D] pairs of keys (zero
   padded), then 32 query rows at a time: scores for 4 rows x 64 keys per register tile, an fp32
   softmax over the whole row, and p v for 8 rows x up to 64 dims per tile. No mask, no dropout, scale
   given by the caller. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

/* e^x for 16 floats (x <= 0 here): Cephes' single-precision polynomial, scaled by 2^n. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-100.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500E-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507E-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073E-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894E-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459E-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201E-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}

/* Rows r0..r0+7 of the block times V for dims d0..d0+16*NV: NV is a constant in each call site, so the
   8 x NV accumulators stay in registers. */
static inline __attribute__((always_inline)) void pv_tile(
        const bf16 *P, const uint32_t *Vp, int64_t Mp, int64_t Dp, int64_t d0, int64_t r0, const int NV,
        const float *rowsum, int64_t rows, bf16 *o, int64_t so, int64_t D) {
    const uint32_t *P32 = (const uint32_t *)P;
    const int64_t Mp2 = Mp / 2;
    __m512 acc[8][4];
    for (int a = 0; a < 8; a++) for (int c = 0; c < NV; c++) acc[a][c] = _mm512_setzero_ps();
    for (int64_t jp = 0; jp < Mp2; jp++) {
        __m512i vv[4];
        for (int c = 0; c < NV; c++) vv[c] = _mm512_loadu_si512(Vp + jp * Dp + d0 + 16 * c);
        for (int a = 0; a < 8; a++) {
            __m512i pb = _mm512_set1_epi32((int)P32[(r0 + a) * Mp2 + jp]);
            for (int c = 0; c < NV; c++) acc[a][c] = _mm512_dpbf16_ps(acc[a][c], (__m512bh)vv[c], (__m512bh)pb);
        }
    }
    for (int a = 0; a < 8; a++) {
        if (r0 + a >= rows) break;
        __m512 inv = _mm512_set1_ps(1.0f / rowsum[r0 + a]);
        bf16 *out = o + (r0 + a) * so;
        for (int c = 0; c < NV; c++) {
            int64_t d = d0 + 16 * c;
            __mmask16 m = D - d >= 16 ? 0xFFFF : (__mmask16)((1u << (D - d)) - 1);
            _mm256_mask_storeu_epi16(out + d, m, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[a][c], inv)));
        }
    }
}

#define QB 32

/* One (batch, head) slice: q [N, D], k [M, D], v [M, D] -> o [N, D], rows at the given strides. */
static void one_head(const bf16 *q, int64_t sq, const bf16 *k, int64_t sk, const bf16 *v, int64_t sv,
                     bf16 *o, int64_t so, int64_t N, int64_t M, int64_t D, float scale,
                     uint32_t *Kp, uint32_t *Vp, uint32_t *Qp, float *S, bf16 *P) {
    const int64_t D2 = (D + 1) / 2, Mp = (M + 63) / 64 * 64, Dp = (D + 15) / 16 * 16;
    /* K as [D2][Mp] pairs of dims; V as [Mp/2][Dp] pairs of keys; zero padding. */
    for (int64_t t = 0; t < D2; t++)
        for (int64_t j = 0; j < Mp; j++) {
            uint32_t lo = 0, hi = 0;
            if (j < M) { lo = k[j * sk + 2 * t]; hi = (2 * t + 1 < D) ? k[j * sk + 2 * t + 1] : 0; }
            Kp[t * Mp + j] = lo | (hi << 16);
        }
    for (int64_t jp = 0; jp < Mp / 2; jp++)
        for (int64_t d = 0; d < Dp; d++) {
            uint32_t lo = 0, hi = 0;
            if (d < D) {
                if (2 * jp < M) lo = v[2 * jp * sv + d];
                if (2 * jp + 1 < M) hi = v[(2 * jp + 1) * sv + d];
            }
            Vp[jp * Dp + d] = lo | (hi << 16);
        }
    float rowsum[QB];
    for (int64_t i0 = 0; i0 < N; i0 += QB) {
        const int64_t rows = N - i0 < QB ? N - i0 : QB;
        for (int64_t r = 0; r < QB; r++)
            for (int64_t t = 0; t < D2; t++) {
                uint32_t lo = 0, hi = 0;
                if (r < rows) { lo = q[(i0 + r) * sq + 2 * t]; hi = (2 * t + 1 < D) ? q[(i0 + r) * sq + 2 * t + 1] : 0; }
                Qp[r * D2 + t] = lo | (hi << 16);
            }
        /* scores, 4 rows x 64 keys per register tile */
        const __m512 vscale = _mm512_set1_ps(scale);
        for (int64_t r0 = 0; r0 < QB; r0 += 4)
            for (int64_t j0 = 0; j0 < Mp; j0 += 64) {
                __m512 acc[4][4];
                for (int a = 0; a < 4; a++) for (int c = 0; c < 4; c++) acc[a][c] = _mm512_setzero_ps();
                for (int64_t t = 0; t < D2; t++) {
                    __m512i kv[4];
                    for (int c = 0; c < 4; c++) kv[c] = _mm512_loadu_si512(Kp + t * Mp + j0 + 16 * c);
                    for (int a = 0; a < 4; a++) {
                        __m512i qb = _mm512_set1_epi32((int)Qp[(r0 + a) * D2 + t]);
                        for (int c = 0; c < 4; c++)
                            acc[a][c] = _mm512_dpbf16_ps(acc[a][c], (__m512bh)kv[c], (__m512bh)qb);
                    }
                }
                for (int a = 0; a < 4; a++) for (int c = 0; c < 4; c++)
                    _mm512_storeu_ps(S + (r0 + a) * Mp + j0 + 16 * c, _mm512_mul_ps(acc[a][c], vscale));
            }
        /* softmax in fp32, probabilities rounded to bf16 for the second product */
        for (int64_t r = 0; r < rows; r++) {
            float *s = S + r * Mp;
            __m512 mx = _mm512_set1_ps(-__builtin_inff());
            for (int64_t j = 0; j < M; j += 16) {
                __mmask16 m = M - j >= 16 ? 0xFFFF : (__mmask16)((1u << (M - j)) - 1);
                mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-__builtin_inff()), m, s + j));
            }
            __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx)), sum = _mm512_setzero_ps();
            bf16 *p = P + r * Mp;
            for (int64_t j = 0; j < Mp; j += 16) {
                __mmask16 m = j >= M ? 0 : (M - j >= 16 ? 0xFFFF : (__mmask16)((1u << (M - j)) - 1));
                __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), vmax)));
                sum = _mm512_add_ps(sum, e);
                _mm256_storeu_si256((__m256i *)(p + j), (__m256i)_mm512_cvtneps_pbh(e));
            }
            rowsum[r] = _mm512_reduce_add_ps(sum);
        }
        for (int64_t r = rows; r < QB; r++) { memset(P + r * Mp, 0, Mp * sizeof(bf16)); rowsum[r] = 1.0f; }
        /* p v: RB rows x NV vectors of 16 dims per register tile, pairs of keys per step */
        for (int64_t d0 = 0; d0 < Dp; d0 += 64) {
            const int nv = (Dp - d0) / 16 < 4 ? (int)((Dp - d0) / 16) : 4;
            for (int64_t r0 = 0; r0 < QB; r0 += 8) {
                switch (nv) {
                case 1: pv_tile(P, Vp, Mp, Dp, d0, r0, 1, rowsum, rows, o + i0 * so, so, D); break;
                case 2: pv_tile(P, Vp, Mp, Dp, d0, r0, 2, rowsum, rows, o + i0 * so, so, D); break;
                case 3: pv_tile(P, Vp, Mp, Dp, d0, r0, 3, rowsum, rows, o + i0 * so, so, D); break;
                default: pv_tile(P, Vp, Mp, Dp, d0, r0, 4, rowsum, rows, o + i0 * so, so, D); break;
                }
            }
        }
    }
}

/* Heads [bh0, bh1) of q/k/v/o given as [B, H, rows, D] with element strides (sb, sh, sn; last dim 1). */
int sdport_attention_bf16(const bf16 *q, const int64_t *qs, const bf16 *k, const int64_t *ks,
                          const bf16 *v, const int64_t *vs, bf16 *o, const int64_t *os,
                          int64_t H, int64_t N, int64_t M, int64_t D, float scale, int64_t bh0, int64_t bh1) {
    const int64_t D2 = (D + 1) / 2, Mp = (M + 63) / 64 * 64, Dp = (D + 15) / 16 * 16;
    uint32_t *Kp = aligned_alloc(64, (size_t)(D2 * Mp * 4 + 64) / 64 * 64);
    uint32_t *Vp = aligned_alloc(64, (size_t)((Mp / 2) * Dp * 4 + 64) / 64 * 64);
    uint32_t *Qp = aligned_alloc(64, (size_t)(QB * D2 * 4 + 64) / 64 * 64);
    float *S = aligned_alloc(64, (size_t)(QB * Mp * 4 + 64) / 64 * 64);
    bf16 *P = aligned_alloc(64, (size_t)(QB * Mp * 2 + 64) / 64 * 64);
    if (!Kp || !Vp || !Qp || !S || !P) { free(Kp); free(Vp); free(Qp); free(S); free(P); return -1; }
    for (int64_t bh = bh0; bh < bh1; bh++) {
        int64_t b = bh / H, h = bh % H;
        one_head(q + b * qs[0] + h * qs[1], qs[2], k + b * ks[0] + h * ks[1], ks[2],
                 v + b * vs[0] + h * vs[1], vs[2], o + b * os[0] + h * os[1], os[2], N, M, D, scale,
                 Kp, Vp, Qp, S, P);
    }
    free(Kp); free(Vp); free(Qp); free(S); free(P);
    return 0;
}
