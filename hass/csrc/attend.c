/* Row-independent attention for hass.rowkernel: out = softmax(q k^T * scale + mask) v, fp32, AVX2 + FMA.
 *
 * Every (query row, head) is computed on its own, in one fixed order: the
 * scores key by key (each a dot product summed in a fixed pattern), their maximum, then the
 * softmax denominator and the weighted sum of values over the visible keys in increasing
 * key order. Keys a row does not see are skipped, not added as zeros. So a row's output
 * depends only on its own query and the keys and values it sees, never on how many other
 * rows share the call, where masked keys sit between them, or the thread count: a tree
 * verification over N tokens gives each node bit for bit what a one-token step over the same
 * visible keys gives.
 *
 * q:   element (h, i, d) at q[h * qhs + i * qns + d]
 * k, v: element (g, j, d) at k[g * khs + j * D + d] (rows of D contiguous floats)
 * mask: NULL = causal (row i sees keys 0 .. L - N + i), else an additive float mask, row i at
 *       mask + i * mns, L entries (a key is visible where its entry is above -1e30; the
 *       entry is added to its score)
 * allow: NULL, or a boolean mask (bytes), row i at allow + i * ans: key j visible where nonzero
 *       (with neither mask, causal)
 * out: [N][H][D] contiguous
 */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#define HIDDEN_LIMIT (-1e30f)

/* lane sums of eight vectors, one lane per vector: vector t's eight lanes are summed as
   ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), the same pattern for every t */
static inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                           __m256 a7) {
    __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

/* exp of eight lanes: x = n ln2 + r, a degree-6 polynomial for e^r, times 2^n; every lane is
   computed alike, so a value does not depend on the lane it sits in. The lanes that are used
   hold a visible key's score minus the row's maximum (<= 0); below -87 the result is 0. The
   other lanes (hidden keys, padding past the last key) may hold anything and are never read. */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

#define HIDDEN(j) ((mrow && !(mrow[j] > HIDDEN_LIMIT)) || (arow && !arow[j]))

/* the scores of keys j0 .. j0 + 7 (keys past `visible` read as key j0: their lanes are
   never used), each key's dot product summed in one fixed order over D */
static inline __m256 scores8(const float *qv, const float *kb, int D, int j0, int visible) {
    const float *k0 = kb + (size_t)j0 * D, *kt[8];
    for (int t = 0; t < 8; t++)
        kt[t] = j0 + t < visible ? k0 + (size_t)t * D : k0;
    __m256 q = _mm256_loadu_ps(qv);
    __m256 a0 = _mm256_mul_ps(q, _mm256_loadu_ps(kt[0])), a1 = _mm256_mul_ps(q, _mm256_loadu_ps(kt[1])),
           a2 = _mm256_mul_ps(q, _mm256_loadu_ps(kt[2])), a3 = _mm256_mul_ps(q, _mm256_loadu_ps(kt[3])),
           a4 = _mm256_mul_ps(q, _mm256_loadu_ps(kt[4])), a5 = _mm256_mul_ps(q, _mm256_loadu_ps(kt[5])),
           a6 = _mm256_mul_ps(q, _mm256_loadu_ps(kt[6])), a7 = _mm256_mul_ps(q, _mm256_loadu_ps(kt[7]));
    for (int d = 8; d < D; d += 8) {
        q = _mm256_loadu_ps(qv + d);
        a0 = _mm256_fmadd_ps(q, _mm256_loadu_ps(kt[0] + d), a0);
        a1 = _mm256_fmadd_ps(q, _mm256_loadu_ps(kt[1] + d), a1);
        a2 = _mm256_fmadd_ps(q, _mm256_loadu_ps(kt[2] + d), a2);
        a3 = _mm256_fmadd_ps(q, _mm256_loadu_ps(kt[3] + d), a3);
        a4 = _mm256_fmadd_ps(q, _mm256_loadu_ps(kt[4] + d), a4);
        a5 = _mm256_fmadd_ps(q, _mm256_loadu_ps(kt[5] + d), a5);
        a6 = _mm256_fmadd_ps(q, _mm256_loadu_ps(kt[6] + d), a6);
        a7 = _mm256_fmadd_ps(q, _mm256_loadu_ps(kt[7] + d), a7);
    }
    return hsum8(a0, a1, a2, a3, a4, a5, a6, a7);
}

/* o[d0 .. d0 + 63] += sum over the visible keys j0 .. j1 - 1, in key order, of p_j v_j[d0 ..]:
   eight accumulators in registers, loaded from and stored back to o, so consecutive key
   blocks continue each chain exactly as one pass would */
static inline void weigh64(const float *vb, int D, int d0, int j0, int j1, const float *mrow,
                           const unsigned char *arow, const float *s, float *o) {
    __m256 o0 = _mm256_loadu_ps(o + d0), o1 = _mm256_loadu_ps(o + d0 + 8), o2 = _mm256_loadu_ps(o + d0 + 16),
           o3 = _mm256_loadu_ps(o + d0 + 24), o4 = _mm256_loadu_ps(o + d0 + 32), o5 = _mm256_loadu_ps(o + d0 + 40),
           o6 = _mm256_loadu_ps(o + d0 + 48), o7 = _mm256_loadu_ps(o + d0 + 56);
    for (int j = j0; j < j1; j++) {
        if (HIDDEN(j))
            continue;
        __m256 p = _mm256_set1_ps(s[j]);
        const float *vj = vb + (size_t)j * D + d0;
        o0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj), o0);
        o1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 8), o1);
        o2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 16), o2);
        o3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 24), o3);
        o4 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 32), o4);
        o5 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 40), o5);
        o6 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 48), o6);
        o7 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 56), o7);
    }
    _mm256_storeu_ps(o + d0, o0); _mm256_storeu_ps(o + d0 + 8, o1); _mm256_storeu_ps(o + d0 + 16, o2);
    _mm256_storeu_ps(o + d0 + 24, o3); _mm256_storeu_ps(o + d0 + 32, o4); _mm256_storeu_ps(o + d0 + 40, o5);
    _mm256_storeu_ps(o + d0 + 48, o6); _mm256_storeu_ps(o + d0 + 56, o7);
}

/* the same for eight dimensions (head sizes that are not a multiple of 64) */
static inline void weigh8(const float *vb, int D, int d0, int j0, int j1, const float *mrow,
                          const unsigned char *arow, const float *s, float *o) {
    __m256 acc = _mm256_loadu_ps(o + d0);
    for (int j = j0; j < j1; j++)
        if (!HIDDEN(j))
            acc = _mm256_fmadd_ps(_mm256_set1_ps(s[j]), _mm256_loadu_ps(vb + (size_t)j * D + d0), acc);
    _mm256_storeu_ps(o + d0, acc);
}

#define KEY_BLOCK 64      /* keys per block: a block of keys (or values) of 64 floats each is 16 KiB, in L1 */

/* One query row of the G heads that share a key/value head: q0 is the first head's query
   (the next at + qhs), o0 its output (the next at + D), s the G score rows (L + 8 each).
   Keys go in blocks that all G heads use while they sit in L1; every head's arithmetic is
   the one-head order: its scores eight keys at a time, its maximum, its probabilities,
   its sum and its weighted values key by key. */
static void group_row(const float *q0, long qhs, int G, const float *kb, const float *vb, int D, int L, int visible,
                      const float *mrow, const unsigned char *arow, float scale, float *o0, float *s0) {
    __m256 sc = _mm256_set1_ps(scale);
    for (int jb = 0; jb < visible; jb += KEY_BLOCK) {
        int je = jb + KEY_BLOCK < visible ? jb + KEY_BLOCK : visible;
        for (int h = 0; h < G; h++)
            for (int j = jb; j < je; j += 8)
                _mm256_storeu_ps(s0 + (size_t)h * (L + 8) + j, _mm256_mul_ps(scores8(q0 + h * qhs, kb, D, j, visible), sc));
    }
    float total[G];
    for (int h = 0; h < G; h++) {
        float *s = s0 + (size_t)h * (L + 8), best = -INFINITY;
        for (int j = 0; j < visible; j++) {
            if (HIDDEN(j))
                continue;
            if (mrow)
                s[j] += mrow[j];
            if (s[j] > best)
                best = s[j];
        }
        /* probabilities (lanes past `visible` and hidden keys are computed, never used) */
        __m256 mx = _mm256_set1_ps(best);
        for (int j = 0; j < visible; j += 8)
            _mm256_storeu_ps(s + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mx)));
        float t = 0.0f;
        for (int j = 0; j < visible; j++)
            if (!HIDDEN(j))
                t += s[j];
        total[h] = t;
        for (int d = 0; d < D; d += 8)
            _mm256_storeu_ps(o0 + (size_t)h * D + d, _mm256_setzero_ps());
    }
    for (int jb = 0; jb < visible; jb += KEY_BLOCK) {
        int je = jb + KEY_BLOCK < visible ? jb + KEY_BLOCK : visible;
        for (int h = 0; h < G; h++) {
            const float *s = s0 + (size_t)h * (L + 8);
            float *o = o0 + (size_t)h * D;
            int d0 = 0;
            for (; d0 + 64 <= D; d0 += 64)
                weigh64(vb, D, d0, jb, je, mrow, arow, s, o);
            for (; d0 < D; d0 += 8)
                weigh8(vb, D, d0, jb, je, mrow, arow, s, o);
        }
    }
    for (int h = 0; h < G; h++) {
        __m256 inv = _mm256_set1_ps(total[h] > 0.0f ? 1.0f / total[h] : 0.0f);
        float *o = o0 + (size_t)h * D;
        for (int d = 0; d < D; d += 8)
            _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(o + d), inv));
    }
}

int rows_attention(const float *q, int H, int N, int D, long qhs, long qns, const float *k, const float *v,
                   int KV, int L, long khs, long vhs, const float *mask, long mns, const unsigned char *allow, long ans,
                   float scale, float *out, int threads) {
    if (D % 8 || H % KV || N > L)
        return 1;
    int group = H / KV, failed = 0;
    /* one task per (query row, key/value head): the group's heads share its key blocks */
    #pragma omp parallel for schedule(static) num_threads(threads) reduction(|:failed)
    for (int t = 0; t < N * KV; t++) {
        float *s = (float *)malloc(sizeof(float) * (size_t)group * (size_t)(L + 8));   /* the heads' scores */
        if (!s) {
            failed = 1;
            continue;
        }
        int i = t / KV, g = t % KV, h = g * group;
        const float *mrow = mask ? mask + (size_t)i * mns : NULL;
        const unsigned char *arow = allow ? allow + (size_t)i * ans : NULL;
        int visible = mask || allow ? L : L - N + i + 1;
        group_row(q + h * qhs + i * qns, qhs, group, k + g * khs, v + g * vhs, D, L, visible, mrow, arow, scale,
                  out + ((size_t)i * H + h) * D, s);
        free(s);
    }
    return failed ? 2 : 0;
}
