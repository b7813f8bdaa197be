/* The hot loops of _kernel.c in AVX-512 intrinsics (the same contract as
 * _kernel_loops.h): the two halves of a mask word are the lane masks of two 16-lane
 * vectors, and exp is 2^t = 2^n * 2^f with f = t - round(t) in [-0.5, 0.5], 2^f Cephes'
 * exp2f polynomial and the scaling one `vscalefps`. */

#define T512 __attribute__((target("avx512f,popcnt")))
#define LOCAL512 static inline __attribute__((always_inline)) T512

/* 2^t for the lanes of `keep` with t >= -126 (others: unspecified) */
LOCAL512 __m512 exp2_512(__m512 t) {
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* exp((x - top) * scale) of the 16 entries at `row` where `keep` (0 elsewhere and where
 * the result would be below 2^-126, -inf included) */
LOCAL512 __m512 weights_512(const float *row, __mmask16 keep, __m512 factor, __m512 offset) {
    __m512 t = _mm512_fmadd_ps(_mm512_loadu_ps(row), factor, offset);
    keep = _mm512_mask_cmp_ps_mask(keep, t, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
    return _mm512_maskz_mov_ps(keep, exp2_512(t));
}

/* Σ of the 16 lanes in double */
LOCAL512 double lanes_sum_512(__m512 lanes) {
    __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(lanes), 1));
    return _mm512_reduce_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(lanes)))
         + _mm512_reduce_add_pd(_mm512_cvtps_pd(high));
}

#define FACTOR(scale) _mm512_set1_ps((scale) * 1.44269504088896341f)
#define OFFSET(top, scale) _mm512_set1_ps(-(top) * (scale) * 1.44269504088896341f)

/* `words_best`; with `kept` (room for size + 32 floats), the candidates' scores are also
 * written there in order, their count in *n_kept: a mask blocking many tokens then sums
 * its normalizer over them alone. */
T512 static Py_ssize_t words_best_avx512(const Words *c, float *top, float *kept, Py_ssize_t *n_kept) {
    const Py_ssize_t full = c->size / 32, words = (c->size + 31) / 32;
    __m512 best0 = _mm512_set1_ps(-INFINITY), best1 = best0;
    __m512i at0 = _mm512_setzero_si512(), at1 = at0;
    Py_ssize_t next = 0, n = 0;
    for (Py_ssize_t w = 0; w < full; w++) {
        uint32_t bits = word_bits(c, w, &next);
        if (!bits) continue;
        __m512i here = _mm512_set1_epi32((int32_t)w);
        __m512 x0 = _mm512_loadu_ps(c->row + 32 * w), x1 = _mm512_loadu_ps(c->row + 32 * w + 16);
        __mmask16 up0 = _mm512_mask_cmp_ps_mask((__mmask16)bits, x0, best0, _CMP_GT_OQ);
        __mmask16 up1 = _mm512_mask_cmp_ps_mask((__mmask16)(bits >> 16), x1, best1, _CMP_GT_OQ);
        best0 = _mm512_mask_mov_ps(best0, up0, x0);
        best1 = _mm512_mask_mov_ps(best1, up1, x1);
        at0 = _mm512_mask_mov_epi32(at0, up0, here);
        at1 = _mm512_mask_mov_epi32(at1, up1, here);
        if (kept) {
            _mm512_storeu_ps(kept + n, _mm512_maskz_compress_ps((__mmask16)bits, x0));
            n += __builtin_popcount(bits & 0xFFFF);
            _mm512_storeu_ps(kept + n, _mm512_maskz_compress_ps((__mmask16)(bits >> 16), x1));
            n += __builtin_popcount(bits >> 16);
        }
    }
    float m = _mm512_reduce_max_ps(_mm512_max_ps(best0, best1));
    Py_ssize_t index = -1;
    if (m > -INFINITY) {            /* each lane kept the first index of its own maximum */
        float b[32];
        int32_t a[32];
        _mm512_storeu_ps(b, best0);
        _mm512_storeu_ps(b + 16, best1);
        _mm512_storeu_si512(a, at0);
        _mm512_storeu_si512(a + 16, at1);
        for (int j = 0; j < 32; j++) {
            Py_ssize_t i = (Py_ssize_t)a[j] * 32 + j;
            if (b[j] == m && (index < 0 || i < index)) index = i;
        }
    }
    for (Py_ssize_t w = full; w < words; w++) {        /* the last, partial word */
        uint32_t bits = word_bits(c, w, &next);
        for (int j = 0; j < c->size - 32 * w; j++) {
            float x = c->row[32 * w + j];
            if (!(bits >> j & 1)) continue;
            if (kept) kept[n++] = x;
            if (x > m) { m = x; index = 32 * w + j; }
        }
    }
    *top = m;
    if (n_kept) *n_kept = kept ? n : -1;
    return index;
}

T512 static double words_sum_avx512(const Words *c, Py_ssize_t first, Py_ssize_t last, float top,
                                    float scale, Py_ssize_t *next) {
    const __m512 factor = FACTOR(scale), offset = OFFSET(top, scale);
    double total = 0.0;
    __m512 lanes = _mm512_setzero_ps();
    for (Py_ssize_t w = first; w < last; w++) {
        uint32_t bits = word_bits(c, w, next);
        if (!bits) continue;
        if ((w + 1) * 32 > c->size) {                  /* the last, partial word */
            float tail[32] = {0};
            memcpy(tail, c->row + 32 * w, sizeof(float) * (size_t)(c->size - 32 * w));
            lanes = _mm512_add_ps(lanes, weights_512(tail, (__mmask16)bits, factor, offset));
            lanes = _mm512_add_ps(lanes, weights_512(tail + 16, (__mmask16)(bits >> 16), factor, offset));
            continue;
        }
        lanes = _mm512_add_ps(lanes, weights_512(c->row + 32 * w, (__mmask16)bits, factor, offset));
        lanes = _mm512_add_ps(lanes, weights_512(c->row + 32 * w + 16, (__mmask16)(bits >> 16), factor, offset));
        if ((w - first) % FLUSH_WORDS == FLUSH_WORDS - 1) {
            total += lanes_sum_512(lanes);
            lanes = _mm512_setzero_ps();
        }
    }
    return total + lanes_sum_512(lanes);
}

T512 static void block_sums_avx512(const Words *c, float top, float scale, double *sums) {
    const Py_ssize_t words = (c->size + 31) / 32;
    Py_ssize_t next = 0;
    double running = 0.0;
    for (Py_ssize_t first = 0; first < words; first += DRAW_WORDS) {
        Py_ssize_t last = first + DRAW_WORDS < words ? first + DRAW_WORDS : words;
        running += words_sum_avx512(c, first, last, top, scale, &next);
        sums[first / DRAW_WORDS] = running;
    }
}

T512 static void block_weights_avx512(const Words *c, Py_ssize_t block, float top, float scale,
                                      float *weights) {
    const __m512 factor = FACTOR(scale), offset = OFFSET(top, scale);
    Py_ssize_t first = block * DRAW_WORDS, words = (c->size + 31) / 32, next = 0;
    while (next < c->n_edits && c->edits[next].word < first) next++;
    for (Py_ssize_t w = first; w < first + DRAW_WORDS; w++) {
        float *out = weights + 32 * (w - first);
        uint32_t bits = w < words ? word_bits(c, w, &next) : 0;
        float tail[32] = {0};
        const float *row = c->row + 32 * w;
        if (bits && (w + 1) * 32 > c->size) {
            memcpy(tail, row, sizeof(float) * (size_t)(c->size - 32 * w));
            row = tail;
        } else if (!bits) {
            row = tail;
        }
        _mm512_storeu_ps(out, weights_512(row, (__mmask16)bits, factor, offset));
        _mm512_storeu_ps(out + 16, weights_512(row + 16, (__mmask16)(bits >> 16), factor, offset));
    }
}

static const Loops loops_avx512 = {words_best_avx512, words_sum_avx512, block_sums_avx512,
                                   block_weights_avx512};
