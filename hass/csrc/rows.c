/* The 'rows' kernel of hass.rowkernel: y = x W^T + b for a few rows x, fp32, AVX2 + FMA.
 *
 * W is packed as [N/8][K][8]: eight output columns side by side for every k, so a column
 * block streams through memory once, front to back. Every output is a single FMA chain
 * over k in increasing order, whatever the number of rows M, the blocking or the thread
 * count: row i of an M-row product is bit for bit the one-row product of row i. That is
 * what lets a verify forward of N tree tokens give exactly the logits of N plain steps.
 *
 * A tile keeps M x CB accumulators (M rows, CB column blocks of 8) in registers; the
 * blocking below keeps at most 12 of the 16 ymm registers busy with them.
 *
 * The packed weight may be stored in a smaller form that holds it exactly (chosen by
 * hass.rowkernel.pack_rows_exact): fp16 (widened with F16C), or int8 with one fp32 scale per
 * 32 inputs and output column (the q8 form, w = q * d, the weight as a GGUF Q8_0 tensor
 * dequantises to it). Either gives the very fp32 weight in register before its FMA, so the
 * products are bit for bit the fp32 ones; only the bytes read from memory shrink.
 */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

/* One accumulator register per (row, column block), a<m * CB + c>: named variables, not an
   array, so that gcc keeps them in registers (with an array it stored all twelve to the stack
   every k), in row-major order, so that each row's broadcast is used up before the next one
   is loaded (with 12 accumulators there are 4 registers left for it and the weights). M and
   CB are constants at every call (the switches below), so the unused ones fold away. */
#define ACC_STEP(i)                                                                               \
    if ((i) < M * CB)                                                                             \
        a##i = _mm256_fmadd_ps(_mm256_broadcast_ss(x + (size_t)((i) / CB) * ldx + k), W((i) % CB), a##i);
#define ACC_STORE(i)                                                                              \
    if ((i) < M * CB)                                                                             \
        _mm256_storeu_ps(y + (size_t)((i) / CB) * ldy + n0 + ((i) % CB) * 8,                      \
                         bias ? _mm256_add_ps(a##i, _mm256_loadu_ps(bias + n0 + ((i) % CB) * 8)) : a##i);
#define W(c) ((c) == 0 ? w0 : (c) == 1 ? w1 : (c) == 2 ? w2 : w3)

/* column block c's 8 weights at input k, as fp32, from the stored form (KIND 0 fp32, 1 fp16, 2 q8;
   s: the block's q8 scales for this group of 32 inputs) */
static inline __attribute__((always_inline)) __m256 wload(const void *w, size_t off, const int KIND, __m256 s) {
    if (KIND == 1)
        return _mm256_cvtph_ps(_mm_load_si128((const __m128i *)((const uint16_t *)w + off)));
    if (KIND == 2)
        return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                   _mm_loadl_epi64((const __m128i *)((const int8_t *)w + off)))), s);
    return _mm256_load_ps((const float *)w + off);
}

static inline __attribute__((always_inline)) void tile(const float *x, int ldx, const int M, int K,
        const void *w, size_t bstride, const int CB, const float *bias, float *y, int ldy, int n0,
        const int KIND, const float *sc, size_t sstride) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0,
           a9 = a0, a10 = a0, a11 = a0;
    /* the q8 form's scales change every 32 inputs: held in registers for the group where the
       accumulators leave room for them (one row), else read with each weight (one group spans
       all of K for the other forms) */
    const int G = KIND == 2 ? 32 : K, HOLD = KIND == 2 && M * CB + 2 * CB <= 12;
    for (int k0 = 0; k0 < K; k0 += G) {
        const float *sk = KIND == 2 ? sc + (size_t)(k0 >> 5) * 8 : sc;
        __m256 s0 = HOLD ? _mm256_load_ps(sk) : _mm256_setzero_ps();
        __m256 s1 = HOLD && CB > 1 ? _mm256_load_ps(sk + sstride) : s0;
        __m256 s2 = HOLD && CB > 2 ? _mm256_load_ps(sk + 2 * sstride) : s0;
        __m256 s3 = HOLD && CB > 3 ? _mm256_load_ps(sk + 3 * sstride) : s0;
#define SCALE(c, held) (KIND != 2 ? (held) : HOLD ? (held) : _mm256_load_ps(sk + (c) * sstride))
        for (int k = k0; k < k0 + G; k++) {
            size_t wk = (size_t)k * 8;
            __m256 w0 = wload(w, wk, KIND, SCALE(0, s0));
            __m256 w1 = CB > 1 ? wload(w, wk + bstride, KIND, SCALE(1, s1)) : w0;
            __m256 w2 = CB > 2 ? wload(w, wk + 2 * bstride, KIND, SCALE(2, s2)) : w0;
            __m256 w3 = CB > 3 ? wload(w, wk + 3 * bstride, KIND, SCALE(3, s3)) : w0;
            ACC_STEP(0) ACC_STEP(1) ACC_STEP(2) ACC_STEP(3) ACC_STEP(4) ACC_STEP(5)
            ACC_STEP(6) ACC_STEP(7) ACC_STEP(8) ACC_STEP(9) ACC_STEP(10) ACC_STEP(11)
        }
    }
    ACC_STORE(0) ACC_STORE(1) ACC_STORE(2) ACC_STORE(3) ACC_STORE(4) ACC_STORE(5)
    ACC_STORE(6) ACC_STORE(7) ACC_STORE(8) ACC_STORE(9) ACC_STORE(10) ACC_STORE(11)
}

/* a tile of MM rows x CC column blocks, as a switch case */
#define CASE(MM, CC) case MM: tile(xm, K, MM, K, w, bstride, CC, bias, ym, N, nc, KIND, sc, sstride); break;

/* CB column blocks of 8 starting at column n0, for all M rows: in chunks the registers hold
   (3 rows x 4 blocks, 4 x 3, 6 x 2 or 12 x 1 accumulators) */
static inline __attribute__((always_inline)) void rows_block(const float *x, int M, int K, const void *w,
        size_t bstride, int CB, const float *bias, float *y, int N, int n0, const int KIND, const float *sc,
        size_t sstride) {
    int cap = CB == 4 ? 3 : CB == 3 ? 4 : CB == 2 ? 6 : 12;
    for (int m0 = 0; m0 < M; m0 += cap) {
        int mm = M - m0 < cap ? M - m0 : cap;
        const float *xm = x + (size_t)m0 * K;
        float *ym = y + (size_t)m0 * N;
        int nc = n0;
        if (CB == 4) {
            switch (mm) { CASE(1, 4) CASE(2, 4) CASE(3, 4) }
        } else if (CB == 3) {
            switch (mm) { CASE(1, 3) CASE(2, 3) CASE(3, 3) CASE(4, 3) }
        } else if (CB == 2) {
            switch (mm) { CASE(1, 2) CASE(2, 2) CASE(3, 2) CASE(4, 2) CASE(5, 2) CASE(6, 2) }
        } else {
            switch (mm) { CASE(1, 1) CASE(2, 1) CASE(3, 1) CASE(4, 1) CASE(5, 1) CASE(6, 1)
                          CASE(7, 1) CASE(8, 1) CASE(9, 1) CASE(10, 1) CASE(11, 1) CASE(12, 1) }
        }
    }
}

/* Column blocks per tile for an M-row product: the fewest passes over each tile's weights
   (the first pass reads them from memory, the others from L2), ties going to the wider
   tile: 1-3 rows in one pass of 4 blocks, 4 in one of 3, 5-6 in one of 2, 7-8 in two of 3
   (4 + 4 rows rather than 6 + 2), 9-12 in two of 2. Against 3 blocks for every M >= 4,
   5-6 and 9-12 rows took 0.5-2.5 ms less over the default model's 210 layer products
   (15-28 ms, 2-core Zen 3). Longer products (prompts) keep 3 blocks of 4 rows.
   The q8 form (the output heads) widens every weight with three instructions, once per
   pass, so it gains most from rows per pass: 2 rows in one pass of 3 blocks, 3-6 in one of
   2, 7-10 in one of 1, more in passes of 6 x 2. On the 49,152 x 576 head (interleaved C
   runs, 2-core Zen 3) that took 8 % (2 rows), 7-14 % (3-4) and 11-21 % (7-10) less time;
   1 row and 5-6 rows were level with the layout above. */
static inline int column_blocks(int M, const int KIND) {
    if (KIND == 2)
        return M == 1 ? 4 : M == 2 ? 3 : M <= 6 ? 2 : M <= 10 ? 1 : 2;
    return M <= 3 ? 4 : M == 5 || M == 6 || (M >= 9 && M <= 12) ? 2 : 3;
}

/* y[M, N] = x[M, K] W^T + b with W packed as [N/8][K][8] in the stored form KIND (ELEM bytes a
   weight); sc: the q8 scales, [N/8][K/32][8] (K a multiple of 32), else unused. A macro, not a
   function, so that KIND is a literal inside each OpenMP region (a variable shared into the
   outlined region would leave the form's branches in the inner loop). */
#define ROWS_ENTRY(KIND, ELEM)                                                                      \
    int nb = N / 8;                                                                                \
    int CB = column_blocks(M, KIND);                                                               \
    int groups = (nb + CB - 1) / CB;                                                               \
    size_t bstride = (size_t)K * 8, sstride = (size_t)(K / 32) * 8;                               \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                              \
    for (int g = 0; g < groups; g++) {                                                             \
        int b0 = g * CB;                                                                           \
        int cb = nb - b0 < CB ? nb - b0 : CB;                                                      \
        rows_block(x, M, K, (const char *)w + (size_t)b0 * bstride * (ELEM), bstride, cb, bias, y, N, \
                   b0 * 8, KIND, (KIND) == 2 ? sc + (size_t)b0 * sstride : sc, sstride);          \
    }

void rows_linear(const float *x, int M, int K, const float *w, int N, const float *bias, float *y, int threads) {
    const float *sc = NULL;
    ROWS_ENTRY(0, 4)
}

void rows_linear_f16(const float *x, int M, int K, const uint16_t *w, int N, const float *bias, float *y,
                     int threads) {
    const float *sc = NULL;
    ROWS_ENTRY(1, 2)
}

void rows_linear_q8(const float *x, int M, int K, const int8_t *w, const float *sc, int N, const float *bias,
                    float *y, int threads) {
    ROWS_ENTRY(2, 1)
}
