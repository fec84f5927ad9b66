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
 */
#include <immintrin.h>
#include <stddef.h>

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

static inline __attribute__((always_inline)) void tile(const float *x, int ldx, const int M, int K,
        const float *w, size_t bstride, const int CB, const float *bias, float *y, int ldy, int n0) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0,
           a9 = a0, a10 = a0, a11 = a0;
    for (int k = 0; k < K; k++) {
        const float *wk = w + (size_t)k * 8;
        __m256 w0 = _mm256_load_ps(wk);
        __m256 w1 = CB > 1 ? _mm256_load_ps(wk + bstride) : w0;
        __m256 w2 = CB > 2 ? _mm256_load_ps(wk + 2 * bstride) : w0;
        __m256 w3 = CB > 3 ? _mm256_load_ps(wk + 3 * bstride) : w0;
        ACC_STEP(0) ACC_STEP(1) ACC_STEP(2) ACC_STEP(3) ACC_STEP(4) ACC_STEP(5)
        ACC_STEP(6) ACC_STEP(7) ACC_STEP(8) ACC_STEP(9) ACC_STEP(10) ACC_STEP(11)
    }
    ACC_STORE(0) ACC_STORE(1) ACC_STORE(2) ACC_STORE(3) ACC_STORE(4) ACC_STORE(5)
    ACC_STORE(6) ACC_STORE(7) ACC_STORE(8) ACC_STORE(9) ACC_STORE(10) ACC_STORE(11)
}

/* a tile of MM rows x CC column blocks, as a switch case */
#define CASE(MM, CC) case MM: tile(xm, K, MM, K, wc, bstride, CC, bias, ym, N, nc); break;

/* CB column blocks of 8 starting at column n0, for all M rows: in chunks the registers hold
   (3 rows x 4 blocks, 4 x 3, 6 x 2 or 12 x 1 accumulators) */
static void rows_block(const float *x, int M, int K, const float *w, size_t bstride, int CB,
                       const float *bias, float *y, int N, int n0) {
    int cap = CB == 4 ? 3 : CB == 3 ? 4 : CB == 2 ? 6 : 12;
    for (int m0 = 0; m0 < M; m0 += cap) {
        int mm = M - m0 < cap ? M - m0 : cap;
        const float *xm = x + (size_t)m0 * K, *wc = w;
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

void rows_linear(const float *x, int M, int K, const float *w, int N, const float *bias, float *y, int threads) {
    int nb = N / 8;
    int CB = M <= 3 ? 4 : 3;      /* column blocks per tile: 3 rows x 4, else 4 rows x 3 */
    int groups = (nb + CB - 1) / CB;
    size_t bstride = (size_t)K * 8;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int g = 0; g < groups; g++) {
        int b0 = g * CB;
        int cb = nb - b0 < CB ? nb - b0 : CB;
        rows_block(x, M, K, w + (size_t)b0 * bstride, bstride, cb, bias, y, N, b0 * 8);
    }
}
