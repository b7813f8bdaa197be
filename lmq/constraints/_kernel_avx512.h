/* The hot loops of _kernel.c in AVX-512 intrinsics (the same contract as
 * _kernel_loops.h): the two halves of a mask word are the lane masks of two 16-lane
 * vectors.
 *
 * A pick with its normalizer is one pass over the row, block by block (BLOCK_WORDS words,
 * small enough to stay in L1): the block's running maximum (its candidates compacted
 * where `compact`), then its exponentials from L1 against that maximum, summed while the
 * next block is scanned; the sum so far is rescaled when the maximum grows. A 152k row
 * is read from L2, so reading it once and overlapping those loads with the arithmetic
 * is the gain.
 *
 * exp is 2^t with t = u / 32: 2^(k / 32) from a 32-entry table and the exponent field
 * (k = round(u)), times a degree-2 polynomial for 2^(r / 32), |r| <= 1/2 (relative error
 * < 2e-7 over the range kept; Cephes' degree-6 polynomial costs half again as much). */

#define T512 __attribute__((target("avx512f,avx512dq,popcnt")))
#define LOCAL512 static inline __attribute__((always_inline)) T512
#define BLOCK_WORDS 64             /* a block of the fused pass: 2,048 tokens, 8 KiB of row */
#define DRAW_GROUPS (BLOCK_WORDS / DRAW_WORDS)   /* draw blocks in a block */
#define EXP_FLOOR (-125.0f * 32)   /* u below this (2^t < 2^-125) weighs 0 */

/* The bits of 2^(j / 32) less j << 18 (see exp2_32nds). */
static const uint32_t EXP2_TABLE[32] = {
    0x3f800000, 0x3f7ecd87, 0x3f7daac3, 0x3f7c980f, 0x3f7b95c2, 0x3f7aa43a, 0x3f79c3d3, 0x3f78f4f0,
    0x3f7837f0, 0x3f778d3a, 0x3f76f532, 0x3f767043, 0x3f75fed7, 0x3f75a15b, 0x3f75583f, 0x3f7523f6,
    0x3f7504f3, 0x3f74fbaf, 0x3f7508a4, 0x3f752c4d, 0x3f75672a, 0x3f75b9be, 0x3f76248c, 0x3f76a81e,
    0x3f7744fd, 0x3f77fbb8, 0x3f78ccdf, 0x3f79b907, 0x3f7ac0c7, 0x3f7be4ba, 0x3f7d257d, 0x3f7e83b3};

typedef struct { __m512i low, high; } Exp2Table;

LOCAL512 Exp2Table exp2_table(void) {
    return (Exp2Table){_mm512_loadu_si512(EXP2_TABLE), _mm512_loadu_si512(EXP2_TABLE + 16)};
}

/* 2^(u / 32) for u >= EXP_FLOOR (others: unspecified) as the product scale * poly, left
 * for the caller's sum to take in one fused multiply-add (ten instructions where a
 * multiply-add then an add made eleven: a dense in-place step 8% faster). With k = round(u) (the low bits of u + 1.5 * 2^23) and
 * r = u - k (one vreduceps, AVX512DQ: the same value as u - (y - 1.5 * 2^23) in one
 * instruction instead of two): 2^(k / 32) has the bits of 2^(j / 32), j = k & 31, plus
 * (k >> 5) << 23, which is the table's entry plus k << 18; 2^(r / 32) = 1 + r p(r). */
typedef struct { __m512 scale, poly; } Exp2;

LOCAL512 Exp2 exp2_32nds(__m512 u, Exp2Table table) {
    const __m512 shifter = _mm512_set1_ps(12582912.0f);
    __m512 y = _mm512_add_ps(u, shifter);
    __m512 r = _mm512_reduce_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512i k = _mm512_castps_si512(y);
    __m512 scale = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_permutex2var_epi32(table.low, k, table.high),
                                                        _mm512_slli_epi32(k, 18)));
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(2.34596184e-4f), r, _mm512_set1_ps(2.16611661e-2f));
    return (Exp2){scale, _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.0f))};
}

/* u = (x - top) * scale * 32 / ln 2 as x * factor + offset */
#define FACTOR(scale) _mm512_set1_ps((scale) * 46.1662413084468283f)
#define OFFSET(top, scale) _mm512_set1_ps(offset_of(top, scale))

static inline float offset_of(float top, float scale) {
    return -top * scale * 46.1662413084468283f;
}

/* The factor turning weights summed against `from` into weights against `to`: the ratio
 * of the offsets as rounded (the same for every weight of a block, so a draw's blocks
 * keep the proportions each has to the others). */
static inline double rescale(float from, float to, float scale) {
    return exp2(((double)offset_of(to, scale) - (double)offset_of(from, scale)) / 32.0);
}

/* `sum` plus exp((x - top) * scale) of the lanes of `x` in `keep` (those under EXP_FLOOR
 * add 0) */
LOCAL512 __m512 add_weights(__m512 sum, __m512 x, __mmask16 keep, __m512 factor, __m512 offset,
                            Exp2Table table) {
    __m512 u = _mm512_fmadd_ps(x, factor, offset);
    keep = _mm512_mask_cmp_ps_mask(keep, u, _mm512_set1_ps(EXP_FLOOR), _CMP_GE_OQ);
    Exp2 e = exp2_32nds(u, table);
    return _mm512_mask3_fmadd_ps(e.scale, e.poly, sum, keep);
}

/* exp((x - top) * scale) of the 16 entries at `row` where `keep`, 0 elsewhere */
LOCAL512 __m512 weights_512(const float *row, __mmask16 keep, __m512 factor, __m512 offset,
                            Exp2Table table) {
    return add_weights(_mm512_setzero_ps(), _mm512_loadu_ps(row), keep, factor, offset, table);
}

/* Σ of the 16 lanes in double */
LOCAL512 double lanes_sum_512(__m512 lanes) {
    __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(lanes), 1));
    return _mm512_reduce_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(lanes)))
         + _mm512_reduce_add_pd(_mm512_cvtps_pd(high));
}

/* The candidate bits of one block (edits applied) and where its scores are. Blocks are
 * BLOCK_WORDS whole words (fewer at the end); a last, partial word is a block of its own,
 * its scores a zero-padded copy and its bits clear past the row's end. */
typedef struct {
    uint32_t bits[BLOCK_WORDS];
    const float *row;
    Py_ssize_t words;
    float tail[32];
} Block;

/* How many words the block starting at word `first` of `c` has. */
static Py_ssize_t block_words(const Words *c, Py_ssize_t first) {
    const Py_ssize_t whole = c->size / 32;
    return first < whole ? (whole - first < BLOCK_WORDS ? whole - first : BLOCK_WORDS) : 1;
}

/* The block starting at word `first` of `c`; `next` walks the edits in order. */
static void load_block(const Words *c, Py_ssize_t first, Py_ssize_t *next, Block *b) {
    const Py_ssize_t whole = c->size / 32;
    b->words = block_words(c, first);
    if (c->bits) memcpy(b->bits, c->bits + first, sizeof(uint32_t) * (size_t)b->words);
    else memset(b->bits, 0xFF, sizeof(uint32_t) * (size_t)b->words);
    for (; *next < c->n_edits && c->edits[*next].word < first + b->words; (*next)++) {
        const Edit *e = &c->edits[*next];
        b->bits[e->word - first] = (b->bits[e->word - first] | e->set) & ~e->clear;
    }
    b->row = c->row + 32 * first;
    if (first == whole) {                           /* the row ends inside this word */
        Py_ssize_t left = c->size - 32 * first;
        b->bits[0] &= (1u << left) - 1u;
        memcpy(b->tail, b->row, sizeof(float) * (size_t)left);
        memset(b->tail + left, 0, sizeof(float) * (size_t)(32 - left));
        b->row = b->tail;
    }
}

/* What a pass computes: the best alone, or with the normalizer over compacted
 * candidates (compacted a byte of the mask at a time, or a word at a time where the CPU
 * has AVX512_VBMI2), or over the candidates in place, or a draw's sums per DRAW_WORDS
 * words (a constant argument of the always-inline functions below, so that each pass
 * compiles to its own loop). */
enum { BEST_ONLY, SUM_COMPACTED, SUM_COMPRESSED, SUM_IN_PLACE, SUM_DRAW };
#define COMPACTS(pass) ((pass) == SUM_COMPACTED || (pass) == SUM_COMPRESSED)

/* A block's exponentials still to sum, against the running maximum of the blocks up to
 * it: its candidates' scores compacted (`kept`, `n` of them) or its words. */
typedef struct {
    const Block *block;
    const float *kept;
    Py_ssize_t n;
    __m512 factor, offset;
    double *groups;                  /* SUM_DRAW: the block's sums per DRAW_WORDS words */
} Pending;

/* How many `pending_step`s sum a pending block, all of them whole. */
LOCAL512 Py_ssize_t pending_steps(const Pending *p, const int pass) {
    return COMPACTS(pass) ? p->n / 16 : p->block->words;
}

/* `sum` plus the weights of step `step` of a pending block: 16 compacted scores or one
 * word (SUM_DRAW: the sum written to its group once the group's last word is in, then 0) */
LOCAL512 __m512 pending_step(const Pending *p, Py_ssize_t step, __m512 sum, Exp2Table table, const int pass) {
    if (COMPACTS(pass))
        return add_weights(sum, _mm512_loadu_ps(p->kept + 16 * step), 0xFFFF, p->factor, p->offset, table);
    uint32_t bits = p->block->bits[step];
    const float *row = p->block->row + 32 * step;
    if (bits) {
        sum = add_weights(sum, _mm512_loadu_ps(row), (__mmask16)bits, p->factor, p->offset, table);
        sum = add_weights(sum, _mm512_loadu_ps(row + 16), (__mmask16)(bits >> 16), p->factor, p->offset, table);
    }
    if (pass == SUM_DRAW && ((step + 1) % DRAW_WORDS == 0 || step + 1 == p->block->words)) {
        p->groups[step / DRAW_WORDS] = lanes_sum_512(sum);
        return _mm512_setzero_ps();
    }
    return sum;
}

/* `sum` plus the rest of a pending block after its whole steps */
LOCAL512 __m512 pending_rest(const Pending *p, __m512 sum, Exp2Table table, const int pass) {
    Py_ssize_t left = COMPACTS(pass) ? p->n % 16 : 0;
    if (!left) return sum;
    __mmask16 keep = (__mmask16)((1u << left) - 1u);
    return add_weights(sum, _mm512_maskz_loadu_ps(keep, p->kept + p->n - left), keep, p->factor, p->offset,
                       table);
}

/* COMPACT_ORDER[m]: the lanes set in the 8-bit mask m, in order (then zeros). */
static uint8_t COMPACT_ORDER[256][8];

static void compact_order_init(void) {
    for (int m = 0; m < 256; m++) {
        int k = 0;
        for (int lane = 0; lane < 8; lane++)
            if (m >> lane & 1) COMPACT_ORDER[m][k++] = (uint8_t)lane;
    }
}

/* The scores of the lanes set in the 8-bit mask `m` of the 8 at `x`, written at `out`
 * in order (up to 8 more lanes may be written after them); their count. A permutation
 * from a table and a 256-bit store: on Zen 4 cheaper than vcompressps (whose 512-bit
 * form with full-width, masked or 256-bit stores made a 152k row 1-4 µs slower). */
LOCAL512 int compact8(float *out, const float *x, uint8_t m) {
    __m256i order = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)COMPACT_ORDER[m]));
    _mm256_storeu_ps(out, _mm256_permutevar8x32_ps(_mm256_loadu_ps(x), order));
    return __builtin_popcount(m);
}

/* The positions (0-31) of the bits set in `bits`, in order, as bytes (then zeros): one
 * vpcompressb (AVX512_VBMI2) of the bytes 0..31. Written in assembly so that the AVX-512
 * loops stay compiled for F and DQ alone: only the loops of "avx512vbmi2" run it. */
LOCAL512 __m256i set_positions(uint32_t bits) {
    const __m256i iota = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
                                          20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
    __m256i positions;
    __asm__("kmovd %[bits], %%k1\n\tvpcompressb %[iota], %[positions]%{%%k1%}%{z%}"
            : [positions] "=v"(positions) : [iota] "v"(iota), [bits] "r"(bits) : "k1");
    return positions;
}

/* compact8 for a whole mask word (32 lanes at `x`; up to 16 more lanes may be written):
 * the word's two vectors permuted by its set bits' positions, one 16-lane store where at
 * most 16 are set (a second past that). A third of compact8's instructions and half its
 * stores: a dense [a-z ]+ step 1.1 µs (8%) faster on Zen 4. */
LOCAL512 int compress32(float *out, const float *x, uint32_t bits) {
    __m256i positions = set_positions(bits);
    __m512 low = _mm512_loadu_ps(x), high = _mm512_loadu_ps(x + 16);
    _mm512_storeu_ps(out, _mm512_permutex2var_ps(low, _mm512_cvtepu8_epi32(_mm256_castsi256_si128(positions)),
                                                 high));
    int count = __builtin_popcount(bits);
    if (count > 16)
        _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(
            low, _mm512_cvtepu8_epi32(_mm256_extracti128_si256(positions, 1)), high));
    return count;
}

/* The running per-lane maxima over block `b`'s candidates (COMPACTS(pass): their scores
 * compacted into `kept`, the maxima taken over those), while the previous block's exponentials
 * (`pending`, or none) are summed into *sum: that arithmetic runs while this block's
 * loads wait on L2. */
LOCAL512 Py_ssize_t block_max(const Block *b, __m512 *best0, __m512 *best1, float *kept,
                              const Pending *pending, __m512 *sum, Exp2Table table, const int pass) {
    /* locals: the compiler must assume the vector stores may write the structures */
    const Pending p = pending ? *pending : (Pending){0};
    const float *row = b->row;
    const uint32_t *words = b->bits;
    const Py_ssize_t count = b->words, steps = pass != BEST_ONLY && pending ? pending_steps(&p, pass) : 0;
    __m512 low_best = *best0, high_best = *best1, s = *sum;
    Py_ssize_t n = 0, step = 0;
    for (Py_ssize_t j = 0; j < count; j++) {
        if (pass != BEST_ONLY && step < steps) s = pending_step(&p, step++, s, table, pass);
        uint32_t bits = words[j];
        if (!bits) continue;
        if (pass == SUM_COMPRESSED) {
            n += compress32(kept + n, row + 32 * j, bits);
            continue;
        }
        if (pass == SUM_COMPACTED) {
            for (int part = 0; part < 4; part++)
                n += compact8(kept + n, row + 32 * j + 8 * part, (uint8_t)(bits >> (8 * part)));
            continue;
        }
        __m512 x0 = _mm512_loadu_ps(row + 32 * j), x1 = _mm512_loadu_ps(row + 32 * j + 16);
        low_best = _mm512_mask_max_ps(low_best, (__mmask16)bits, x0, low_best);
        high_best = _mm512_mask_max_ps(high_best, (__mmask16)(bits >> 16), x1, high_best);
    }
    if (COMPACTS(pass)) {    /* the maxima over the compacted scores, in L1: fewer vectors */
        Py_ssize_t i = 0;
        for (; i + 32 <= n; i += 32) {
            low_best = _mm512_max_ps(low_best, _mm512_loadu_ps(kept + i));
            high_best = _mm512_max_ps(high_best, _mm512_loadu_ps(kept + i + 16));
        }
        for (; i < n; i += 16) {
            __mmask16 keep = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
            low_best = _mm512_mask_max_ps(low_best, keep, _mm512_maskz_loadu_ps(keep, kept + i), low_best);
        }
    }
    if (pass != BEST_ONLY && pending) {
        for (; step < steps; step++) s = pending_step(&p, step, s, table, pass);
        s = pending_rest(&p, s, table, pass);
    }
    *best0 = low_best;
    *best1 = high_best;
    *sum = s;
    return n;
}

/* The first candidate of the block starting at word `first` scoring `top` (-1: none). */
static Py_ssize_t T512 first_at(const Words *c, Py_ssize_t first, float top, Block *b) {
    Py_ssize_t next = 0;
    while (next < c->n_edits && c->edits[next].word < first) next++;
    load_block(c, first, &next, b);
    const __m512 target = _mm512_set1_ps(top);
    for (Py_ssize_t j = 0; j < b->words; j++) {
        uint32_t bits = b->bits[j];
        uint32_t equal = _mm512_mask_cmp_ps_mask((__mmask16)bits, _mm512_loadu_ps(b->row + 32 * j), target, _CMP_EQ_OQ)
            | (uint32_t)_mm512_mask_cmp_ps_mask((__mmask16)(bits >> 16), _mm512_loadu_ps(b->row + 32 * j + 16),
                                                target, _CMP_EQ_OQ) << 16;
        if (equal) return 32 * (first + j) + __builtin_ctz(equal);
    }
    return -1;
}

/* `words_best` as pass `pass` (see the top of this file): block i's exponentials are
 * summed against the running maximum after it while block i + 1 is scanned (two blocks,
 * two compaction buffers, alternate). The running maximum only grows, so the block where
 * it last grew holds the first best. SUM_DRAW: the weights are exp((x - top) * scale),
 * each block's sums per DRAW_WORDS words go to `groups` (DRAW_GROUPS a block) against the
 * maximum in `maxima` (one a block), and the result is the first word of the block
 * holding the best (-1: none). */
LOCAL512 Py_ssize_t best_pass(const Words *c, float *top, double *total, const int pass, float scale,
                              double *groups, float *maxima) {
    const Py_ssize_t words = (c->size + 31) / 32;
    const Exp2Table table = exp2_table();
    Block blocks[2];
    float room[2][COMPACTS(pass) ? BLOCK_WORDS * 32 + 32 : 1] __attribute__((aligned(64)));
    __m512 best0 = _mm512_set1_ps(-INFINITY), best1 = best0;
    float m = -INFINITY;
    double sum = 0.0;
    Py_ssize_t next = 0, at = -1, i = 0, block = 0;
    Pending pending;
    int waiting = 0;                 /* whether `pending` holds a block's sum to do */
    for (Py_ssize_t first = 0, scanned = 0; first < words; first += scanned, i ^= 1, block++) {
        Block *b = &blocks[i];
        load_block(c, first, &next, b);
        scanned = b->words;
        __m512 lanes = _mm512_setzero_ps();
        Py_ssize_t n = block_max(b, &best0, &best1, room[i], waiting ? &pending : NULL, &lanes, table, pass);
        if (waiting && pass != SUM_DRAW) sum += lanes_sum_512(lanes);
        float running = _mm512_reduce_max_ps(_mm512_max_ps(best0, best1));
        if (running > m) {
            if (sum > 0.0) sum *= rescale(m, running, scale);
            m = running;
            at = first;
        }
        waiting = pass != BEST_ONLY && m > -INFINITY;
        if (pass == SUM_DRAW) {
            maxima[block] = m;
            if (!waiting) memset(groups + DRAW_GROUPS * block, 0, sizeof(double) * DRAW_GROUPS);
        }
        pending = (Pending){b, room[i], n, FACTOR(scale), OFFSET(m, scale), groups + DRAW_GROUPS * block};
    }
    if (waiting) {
        __m512 lanes = _mm512_setzero_ps();
        for (Py_ssize_t step = 0; step < pending_steps(&pending, pass); step++)
            lanes = pending_step(&pending, step, lanes, table, pass);
        sum += lanes_sum_512(pending_rest(&pending, lanes, table, pass));
    }
    *top = m;
    if (pass == SUM_DRAW) return at;
    if (total) *total = sum;
    return at >= 0 ? first_at(c, at, m, &blocks[0]) : -1;
}

/* Each pass a function of its own: inlined into one function, the three passes share its
 * register allocation and the compacting one runs 1 µs (7%) slower on a 152k row. */
#define PASS(name, pass) \
    T512 __attribute__((noinline)) static Py_ssize_t name(const Words *c, float *top, double *total) { \
        return best_pass(c, top, total, pass, 1.0f, NULL, NULL); \
    }
PASS(best_alone, BEST_ONLY)
PASS(best_compacted, SUM_COMPACTED)
PASS(best_compressed, SUM_COMPRESSED)
PASS(best_in_place, SUM_IN_PLACE)

T512 static Py_ssize_t words_best_avx512(const Words *c, float *top, double *total, int compact) {
    if (!total) return best_alone(c, top, NULL);
    return compact ? best_compacted(c, top, total) : best_in_place(c, top, total);
}

T512 static Py_ssize_t words_best_avx512vbmi2(const Words *c, float *top, double *total, int compact) {
    return total && compact ? best_compressed(c, top, total) : words_best_avx512(c, top, total, compact);
}

/* `draw_sums` in one pass (best_pass's SUM_DRAW), then each block's sums scaled from its
 * maximum to the row's and accumulated. */
T512 static int draw_sums_avx512(const Words *c, float scale, float *top, double *sums) {
    const Py_ssize_t words = (c->size + 31) / 32, blocks = words / BLOCK_WORDS + 2;
    double *groups = malloc(sizeof(double) * (size_t)(DRAW_GROUPS * blocks));
    float *maxima = malloc(sizeof(float) * (size_t)blocks);
    if (!groups || !maxima) { free(groups); free(maxima); return -1; }
    int found = best_pass(c, top, NULL, SUM_DRAW, scale, groups, maxima) >= 0;
    if (found) {
        memset(sums, 0, sizeof(double) * (size_t)((words + DRAW_WORDS - 1) / DRAW_WORDS));
        double factor = 0.0;
        float scaled_from = NAN;
        for (Py_ssize_t first = 0, block = 0; first < words; first += block_words(c, first), block++) {
            if (!(maxima[block] == scaled_from)) {          /* the maximum grew: a new factor */
                scaled_from = maxima[block];
                factor = rescale(scaled_from, *top, scale);
            }
            for (Py_ssize_t g = 0; g * DRAW_WORDS < block_words(c, first); g++)
                sums[first / DRAW_WORDS + g] += groups[DRAW_GROUPS * block + g] * factor;
        }
        for (Py_ssize_t g = 1; g < (words + DRAW_WORDS - 1) / DRAW_WORDS; g++) sums[g] += sums[g - 1];
    }
    free(groups);
    free(maxima);
    return found;
}

T512 static void block_weights_avx512(const Words *c, Py_ssize_t block, float top, float scale,
                                      float *weights) {
    const __m512 factor = FACTOR(scale), offset = OFFSET(top, scale);
    const Exp2Table table = exp2_table();
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
        _mm512_storeu_ps(out, weights_512(row, (__mmask16)bits, factor, offset, table));
        _mm512_storeu_ps(out + 16, weights_512(row + 16, (__mmask16)(bits >> 16), factor, offset, table));
    }
}

static const Loops loops_avx512 = {words_best_avx512, draw_sums_avx512, block_weights_avx512};
static const Loops loops_avx512vbmi2 = {words_best_avx512vbmi2, draw_sums_avx512, block_weights_avx512};
