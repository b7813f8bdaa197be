/* The hot loops of _kernel.c, included once per instruction set: before each inclusion
 * _kernel.c defines SUFFIX (appended to every name), TARGET (the function attribute that
 * selects the instruction set) and VBYTES (its vector width in bytes). The loops are
 * written with GCC vector extensions of exactly that width, so each copy compiles to
 * that set's native vector instructions. */

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define N(name) CAT(name, SUFFIX)
#define LANES (VBYTES / 4)
#define PARTS (32 / LANES)                   /* vectors per mask word */
#define LOCAL static inline __attribute__((always_inline)) TARGET

typedef float N(vf) __attribute__((vector_size(VBYTES)));
typedef int32_t N(vi) __attribute__((vector_size(VBYTES)));
typedef uint32_t N(vu) __attribute__((vector_size(VBYTES)));
#define vf N(vf)
#define vi N(vi)
#define vu N(vu)

LOCAL vf N(load)(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
LOCAL vf N(splat)(float x) { return (vf){0} + x; }
LOCAL vf N(blend)(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* all-ones in lane j iff bit j of the word's part `part` is set */
LOCAL vi N(lane_mask)(uint32_t bits, int part) {
    vu lane_bits;
    for (int j = 0; j < LANES; j++) lane_bits[j] = 1u << j;
    uint32_t half = bits >> (part * LANES);
    return (vi)(((vu){0} + half) & lane_bits) != 0;
}

/* exp(x) for x <= 0 (exactly 0 below -87, -inf included): Cephes' expf polynomial */
LOCAL vf N(vexp)(vf x) {
    vi low = x < N(splat)(-87.0f);
    x = N(blend)(low, N(splat)(-87.0f), x);
    vf t = x * N(splat)(1.44269504088896341f) + N(splat)(12582912.0f);   /* round(x / ln 2) */
    vf n = t - N(splat)(12582912.0f);
    vi k = (vi)t - 0x4B400000;
    vf r = x - n * N(splat)(0.693359375f) + n * N(splat)(2.12194440e-4f);
    vf p = N(splat)(1.9875691500e-4f);
    p = p * r + N(splat)(1.3981999507e-3f);
    p = p * r + N(splat)(8.3334519073e-3f);
    p = p * r + N(splat)(4.1665795894e-2f);
    p = p * r + N(splat)(1.6666665459e-1f);
    p = p * r + N(splat)(5.0000001201e-1f);
    p = p * r * r + r + N(splat)(1.0f);
    vf scale = (vf)((k + 127) << 23);
    return (vf)((vi)(p * scale) & ~low);
}

LOCAL float N(exp_one)(float x) {
    vf v = N(vexp)(N(splat)(x));
    return v[0];
}

/* exp((x - top) * scale) of the 32 entries of word w, 0 where `bits` is clear */
LOCAL void N(word_weights)(const float *row, float top, float scale, uint32_t bits, vf *out) {
    for (int part = 0; part < PARTS; part++)
        out[part] = (vf)((vi)N(vexp)((N(load)(row + part * LANES) - N(splat)(top)) * N(splat)(scale))
                         & N(lane_mask)(bits, part));
}

TARGET static double N(words_sum)(const Words *c, Py_ssize_t first, Py_ssize_t last, float top,
                                  float scale, Py_ssize_t *next);

/* The highest candidate score and its first index (-1 when every candidate is -inf);
 * with `total`, Σ exp(x - top) over the candidates in a second pass (`compact` is a
 * hint this instruction set ignores). */
TARGET static Py_ssize_t N(words_best)(const Words *c, float *top, double *total, int compact) {
    const Py_ssize_t full = c->size / 32, words = (c->size + 31) / 32;
    vf best[PARTS];
    vi at[PARTS];
    for (int part = 0; part < PARTS; part++) {
        best[part] = N(splat)(-INFINITY);
        at[part] = (vi){0};
    }
    Py_ssize_t next = 0;
    for (Py_ssize_t w = 0; w < full; w++) {
        uint32_t bits = word_bits(c, w, &next);
        if (!bits) continue;
        for (int part = 0; part < PARTS; part++) {
            vf x = N(blend)(N(lane_mask)(bits, part), N(load)(c->row + 32 * w + part * LANES),
                            N(splat)(-INFINITY));
            vi up = x > best[part];
            best[part] = N(blend)(up, x, best[part]);
            at[part] = (at[part] & ~up) | (((vi){0} + (int32_t)w) & up);
        }
    }
    float m = -INFINITY;
    for (int part = 0; part < PARTS; part++)
        for (int j = 0; j < LANES; j++) m = best[part][j] > m ? best[part][j] : m;
    Py_ssize_t index = -1;
    if (m > -INFINITY) {            /* each lane kept the first index of its own maximum */
        for (int part = 0; part < PARTS; part++)
            for (int j = 0; j < LANES; j++) {
                Py_ssize_t i = (Py_ssize_t)at[part][j] * 32 + part * LANES + j;
                if (best[part][j] == m && (index < 0 || i < index)) index = i;
            }
    }
    for (Py_ssize_t w = full; w < words; w++) {        /* the last, partial word */
        uint32_t bits = word_bits(c, w, &next);
        for (int j = 0; j < c->size - 32 * w; j++) {
            float x = c->row[32 * w + j];
            if ((bits >> j & 1) && x > m) { m = x; index = 32 * w + j; }
        }
    }
    *top = m;
    if (total) {
        Py_ssize_t first_edit = 0;
        *total = index >= 0 ? N(words_sum)(c, 0, words, m, 1.0f, &first_edit) : 0.0;
    }
    return index;
}

/* Σ exp((x - top) * scale) over the candidates of words [first, last), (scale > 0):
 * float32 lanes, added to the double total every FLUSH_WORDS words. */
TARGET static double N(words_sum)(const Words *c, Py_ssize_t first, Py_ssize_t last, float top,
                                  float scale, Py_ssize_t *next) {
    double total = 0.0;
    vf lanes = {0};
    for (Py_ssize_t w = first; w < last; w++) {
        uint32_t bits = word_bits(c, w, next);
        if (!bits) continue;
        if ((w + 1) * 32 > c->size) {                  /* the last, partial word */
            for (int j = 0; j < c->size - 32 * w; j++)
                if (bits >> j & 1) total += N(exp_one)((c->row[32 * w + j] - top) * scale);
            continue;
        }
        vf weights[PARTS];
        N(word_weights)(c->row + 32 * w, top, scale, bits, weights);
        for (int part = 0; part < PARTS; part++) lanes += weights[part];
        if ((w - first) % FLUSH_WORDS == FLUSH_WORDS - 1) {
            for (int j = 0; j < LANES; j++) total += lanes[j];
            lanes = (vf){0};
        }
    }
    for (int j = 0; j < LANES; j++) total += lanes[j];
    return total;
}

/* `draw_sums`: the best first, then the cumulative sums of exp((x - top) * scale) per
 * block of DRAW_WORDS words in a second pass. */
TARGET static int N(draw_sums)(const Words *c, float scale, float *top, double *sums) {
    if (N(words_best)(c, top, NULL, 0) < 0) return 0;
    const Py_ssize_t words = (c->size + 31) / 32;
    Py_ssize_t next = 0;
    double running = 0.0;
    for (Py_ssize_t first = 0; first < words; first += DRAW_WORDS) {
        Py_ssize_t last = first + DRAW_WORDS < words ? first + DRAW_WORDS : words;
        running += N(words_sum)(c, first, last, *top, scale, &next);
        sums[first / DRAW_WORDS] = running;
    }
    return 1;
}

/* The entries' weights in the block `block` (DRAW_WORDS words; 0 past the row's end). */
TARGET static void N(block_weights)(const Words *c, Py_ssize_t block, float top, float scale,
                                    float *weights) {
    Py_ssize_t first = block * DRAW_WORDS, words = (c->size + 31) / 32, next = 0;
    while (next < c->n_edits && c->edits[next].word < first) next++;
    for (Py_ssize_t w = first; w < first + DRAW_WORDS; w++) {
        float *out = weights + 32 * (w - first);
        if (w >= words) {
            memset(out, 0, 32 * sizeof(float));
            continue;
        }
        uint32_t bits = word_bits(c, w, &next);
        if ((w + 1) * 32 > c->size) {
            for (int j = 0; j < 32; j++)
                out[j] = j < c->size - 32 * w && (bits >> j & 1)
                    ? N(exp_one)((c->row[32 * w + j] - top) * scale) : 0.0f;
            continue;
        }
        vf parts[PARTS];
        N(word_weights)(c->row + 32 * w, top, scale, bits, parts);
        memcpy(out, parts, sizeof parts);
    }
}

static const Loops N(loops) = {N(words_best), N(draw_sums), N(block_weights)};

#undef vf
#undef vi
#undef vu
#undef LANES
#undef PARTS
#undef LOCAL
#undef N
#undef SUFFIX
#undef TARGET
#undef VBYTES
