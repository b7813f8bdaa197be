/* The per-token step of lmq in compiled code: a masked pick with its log-normalizer, and a
 * plain temperature draw, each in one or two passes over a float32 logits row.
 *
 * lmq/constraints/token_choice.py is the public API and holds the numpy fallback these
 * functions must agree with; this module is private. It uses the CPython C API and the
 * buffer protocol only (numpy arrays arrive as buffers), so building it needs nothing
 * but a C compiler.
 *
 * Candidates of a step: the tokens of the mask (a sorted int32 id list, a packed uint32
 * bit row with bit t % 32 of word t / 32 set when token t is allowed, or every token when
 * there is no mask), plus the `allow` ids, less the `hidden` ids. The hot loops
 * work on 32 tokens (one mask word) at a time: written with GCC vector extensions
 * (_kernel_loops.h, compiled for AVX2 and the baseline: exp a polynomial, Cephes',
 * relative error ~1e-7; float32 lane sums flushed to double every FLUSH_WORDS words) and
 * with AVX-512 (F and DQ) intrinsics (_kernel_avx512.h: a mask word's halves are the lane
 * masks; the pick and its normalizer in one pass, exp from a table and a degree-2
 * polynomial; where the CPU also has AVX512_VBMI2, "avx512vbmi2", a dense mask's
 * candidates are compacted a word at a time); the best set the CPU supports is chosen
 * when the module loads, so the binary stays portable.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))
#define FLUSH_WORDS 32        /* float32 lane sums are added to the double total this often */
#define DRAW_WORDS 8          /* a draw's block: 256 tokens */

/* ------------------------------------------------------------------ candidate words */

/* A change to one mask word: bits set by `allow`, bits cleared by `hidden`. */
typedef struct { Py_ssize_t word; uint32_t set, clear; } Edit;

typedef struct {
    const float *row;
    Py_ssize_t size;
    const uint32_t *bits;     /* NULL: every token */
    Edit *edits;              /* sorted by word, one per word */
    Py_ssize_t n_edits;
} Words;

static int edit_order(const void *a, const void *b) {
    Py_ssize_t x = ((const Edit *)a)->word, y = ((const Edit *)b)->word;
    return (x > y) - (x < y);
}

/* The edits of `allow` and `hidden` ids (out of range ids are ignored), merged per word. */
static Edit *make_edits(const int64_t *allow, Py_ssize_t n_allow, const int64_t *hidden,
                        Py_ssize_t n_hidden, Py_ssize_t size, Py_ssize_t *count) {
    Edit *edits = malloc(sizeof(Edit) * (size_t)(n_allow + n_hidden + 1));
    Py_ssize_t n = 0;
    if (!edits) return NULL;
    for (Py_ssize_t i = 0; i < n_allow + n_hidden; i++) {
        int64_t id = i < n_allow ? allow[i] : hidden[i - n_allow];
        if (id < 0 || id >= size) continue;
        uint32_t bit = 1u << (id & 31);
        edits[n++] = (Edit){(Py_ssize_t)(id >> 5), i < n_allow ? bit : 0, i < n_allow ? 0 : bit};
    }
    qsort(edits, (size_t)n, sizeof(Edit), edit_order);
    Py_ssize_t merged = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (merged && edits[merged - 1].word == edits[i].word) {
            edits[merged - 1].set |= edits[i].set;
            edits[merged - 1].clear |= edits[i].clear;
        } else {
            edits[merged++] = edits[i];
        }
    }
    *count = merged;
    return edits;
}

/* The candidate bits of word w; `next` walks the edits in order. */
INLINE uint32_t word_bits(const Words *c, Py_ssize_t w, Py_ssize_t *next) {
    uint32_t bits = c->bits ? c->bits[w] : 0xFFFFFFFFu;
    if (*next < c->n_edits && c->edits[*next].word == w) {
        bits = (bits | c->edits[*next].set) & ~c->edits[*next].clear;
        (*next)++;
    }
    Py_ssize_t left = c->size - w * 32;
    if (left < 32) bits &= (1u << left) - 1u;
    return bits;
}

/* The hot loops of one instruction set (_kernel_loops.h). */
typedef struct {
    /* the best candidate; with `total`, Σ exp(x - top) over the candidates as well
     * (`compact`: a hint that the candidates are a small part of the words) */
    Py_ssize_t (*best)(const Words *c, float *top, double *total, int compact);
    /* a draw's top (the highest candidate score) and the cumulative sums of exp((x - top)
     * * scale) per block of DRAW_WORDS words: 1, 0 when no candidate is finite, -1 when
     * out of memory */
    int (*draw_sums)(const Words *c, float scale, float *top, double *sums);
    void (*block_weights)(const Words *c, Py_ssize_t block, float top, float scale, float *weights);
} Loops;

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include "_kernel_avx512.h"
#define SUFFIX _avx2
#define TARGET __attribute__((target("avx2,fma")))
#define VBYTES 32
#include "_kernel_loops.h"
#endif
#define SUFFIX _base
#define TARGET
#define VBYTES 16
#include "_kernel_loops.h"

static const Loops *loops = &loops_base;

/* The drawn index for `target` in [0, total): the first candidate whose cumulative weight
 * exceeds it (the last candidate of its block on rounding at the edge). */
static Py_ssize_t draw_index(const Words *c, float top, float scale, const double *sums,
                             Py_ssize_t blocks, double target) {
    Py_ssize_t block = 0, chosen = -1;
    while (block < blocks - 1 && sums[block] <= target) block++;
    double running = block ? sums[block - 1] : 0.0;
    float weights[DRAW_WORDS * 32];
    loops->block_weights(c, block, top, scale, weights);
    for (Py_ssize_t i = 0; i < DRAW_WORDS * 32; i++) {
        if (weights[i] == 0.0f) continue;
        chosen = block * DRAW_WORDS * 32 + i;
        running += weights[i];
        if (running > target) break;
    }
    return chosen;
}

/* ------------------------------------------------------------------ sparse candidates */

/* The candidates of a sparse mask gathered: (values, ids), ids ascending within the mask
 * then the allowed extra ids; the caller frees both. */
static Py_ssize_t gather(const float *row, Py_ssize_t size, const int32_t *ids, Py_ssize_t n_ids,
                         const int64_t *allow, Py_ssize_t n_allow, const int64_t *hidden,
                         Py_ssize_t n_hidden, float **values, int64_t **tokens) {
    *values = malloc(sizeof(float) * (size_t)(n_ids + n_allow + 1));
    *tokens = malloc(sizeof(int64_t) * (size_t)(n_ids + n_allow + 1));
    if (!*values || !*tokens) return -1;
    Py_ssize_t n = 0;
    for (Py_ssize_t i = 0; i < n_ids + n_allow; i++) {
        int64_t id = i < n_ids ? ids[i] : allow[i - n_ids];
        if (id < 0 || id >= size) continue;
        int skip = 0;
        for (Py_ssize_t h = 0; h < n_hidden && !skip; h++) skip = hidden[h] == id;
        if (i >= n_ids) {                         /* an extra id already in the mask */
            Py_ssize_t lo = 0, hi = n_ids;
            while (lo < hi) { Py_ssize_t mid = (lo + hi) / 2; if (ids[mid] < id) lo = mid + 1; else hi = mid; }
            skip |= lo < n_ids && ids[lo] == id;
            for (Py_ssize_t j = n_ids; j < i && !skip; j++) skip = allow[j - n_ids] == id;
        }
        if (skip) continue;
        (*values)[n] = row[id];
        (*tokens)[n++] = id;
    }
    return n;
}

/* ------------------------------------------------------------------ Python glue */

typedef struct { Py_buffer view; int held; } Arg;

static void release(Arg *args, int n) {
    for (int i = 0; i < n; i++) if (args[i].held) PyBuffer_Release(&args[i].view);
}

/* A C-contiguous buffer of items of `itemsize` bytes and kind `kind` ('f' float, 'i'
 * signed, 'u' unsigned), or None when `optional`. */
static int get_buffer(PyObject *obj, Arg *arg, Py_ssize_t itemsize, char kind, const char *name,
                      int optional) {
    arg->held = 0;
    if (obj == Py_None && optional) return 0;
    if (PyObject_GetBuffer(obj, &arg->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    arg->held = 1;
    const char *format = arg->view.format ? arg->view.format : "B";
    if (*format == '<' || *format == '=' || *format == '@') format++;
    char code = *format;
    char actual = strchr("efd", code) ? 'f' : strchr("bhilqn", code) ? 'i' : strchr("BHILQN", code) ? 'u' : '?';
    if (arg->view.itemsize != itemsize || actual != kind) {
        PyErr_Format(PyExc_TypeError, "%s: expected a contiguous buffer of %zd-byte %s items, got format '%s'",
                     name, itemsize, kind == 'f' ? "float" : kind == 'i' ? "signed" : "unsigned",
                     arg->view.format ? arg->view.format : "B");
        return -1;
    }
    return 0;
}

#define ITEMS(arg) ((arg).held ? (arg).view.len / (arg).view.itemsize : 0)

/* A step's buffers into a[0..3]: the float32 row, the mask's bit words (or None; they
 * must cover the row), the int64 allow and hidden ids (or None). */
static int get_step(PyObject *row, PyObject *bits, PyObject *allow, PyObject *hidden, Arg *a) {
    if (get_buffer(row, &a[0], 4, 'f', "row", 0) || get_buffer(bits, &a[1], 4, 'u', "bits", 1)
        || get_buffer(allow, &a[2], 8, 'i', "allow", 1) || get_buffer(hidden, &a[3], 8, 'i', "hidden", 1))
        return -1;
    if (a[1].held && ITEMS(a[1]) < (ITEMS(a[0]) + 31) / 32) {
        PyErr_Format(PyExc_ValueError, "bits: %zd words cannot cover %zd tokens", ITEMS(a[1]), ITEMS(a[0]));
        return -1;
    }
    return 0;
}

/* best(row, ids, bits, allow, hidden, want_normalizer, compact) -> (index, log-normalizer
 * or None); `compact`: a dense mask blocking many tokens, whose candidates are compacted
 * while picking where the instruction set can (the normalizer then sums them alone). */
static PyObject *kernel_best(PyObject *self, PyObject *args) {
    PyObject *row_o, *ids_o, *bits_o, *allow_o, *hidden_o;
    int want, compact;
    if (!PyArg_ParseTuple(args, "OOOOOpp", &row_o, &ids_o, &bits_o, &allow_o, &hidden_o, &want, &compact))
        return NULL;
    Arg a[5];
    memset(a, 0, sizeof a);
    if (get_step(row_o, bits_o, allow_o, hidden_o, a) || get_buffer(ids_o, &a[4], 4, 'i', "ids", 1)) {
        release(a, 5);
        return NULL;
    }
    const float *row = a[0].view.buf;
    Py_ssize_t size = ITEMS(a[0]), n_allow = ITEMS(a[2]), n_hidden = ITEMS(a[3]);
    const int64_t *allow = a[2].held ? a[2].view.buf : NULL, *hidden = a[3].held ? a[3].view.buf : NULL;
    Py_ssize_t index = -1;
    float top = -INFINITY;
    double total = 0.0;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    if (a[4].held) {
        float *values = NULL;
        int64_t *tokens = NULL;
        Py_ssize_t n = gather(row, size, a[4].view.buf, ITEMS(a[4]), allow, n_allow, hidden, n_hidden,
                              &values, &tokens);
        if (n < 0) {
            failed = 1;
        } else {
            Words c = {values, n, NULL, NULL, 0};
            if (loops->best(&c, &top, want ? &total : NULL, 0) >= 0) {
                for (Py_ssize_t i = 0; i < n; i++)      /* ties: the lowest token id */
                    if (values[i] == top && (index < 0 || tokens[i] < index)) index = tokens[i];
            }
        }
        free(values);
        free(tokens);
    } else {
        Py_ssize_t n_edits = 0;
        Edit *edits = make_edits(allow, n_allow, hidden, n_hidden, size, &n_edits);
        if (!edits) {
            failed = 1;
        } else {
            Words c = {row, size, a[1].held ? a[1].view.buf : NULL, edits, n_edits};
            index = loops->best(&c, &top, want ? &total : NULL, compact);
            free(edits);
        }
    }
    Py_END_ALLOW_THREADS
    release(a, 5);
    if (failed) return PyErr_NoMemory();
    if (!want) return Py_BuildValue("nO", index, Py_None);
    return Py_BuildValue("nd", index, index >= 0 ? (double)top + log(total) : -INFINITY);
}

/* One plain draw: (index or -1, top + log Σ exp((row - top) * scale)). */
static int draw_one(const float *row, Py_ssize_t size, const int64_t *hidden, Py_ssize_t n_hidden,
                    float scale, double u, Py_ssize_t *index, double *normalizer) {
    Py_ssize_t n_edits = 0, blocks = (size + 32 * DRAW_WORDS - 1) / (32 * DRAW_WORDS);
    Edit *edits = make_edits(NULL, 0, hidden, n_hidden, size, &n_edits);
    double *sums = malloc(sizeof(double) * (size_t)(blocks + 1));
    if (!edits || !sums) { free(edits); free(sums); return -1; }
    Words c = {row, size, NULL, edits, n_edits};
    float top;
    *index = -1;
    *normalizer = -INFINITY;
    int found = loops->draw_sums(&c, scale, &top, sums);
    if (found > 0) {
        double total = sums[blocks - 1];
        if (total > 0.0) {
            *normalizer = (double)top + log(total);
            *index = draw_index(&c, top, scale, sums, blocks, u * total);
        }
    }
    free(edits);
    free(sums);
    return found < 0 ? -1 : 0;
}

/* draw(rows, hiddens, us, temperature) -> [(index, normalizer)]: one draw per row. */
static PyObject *kernel_draw(PyObject *self, PyObject *args) {
    PyObject *rows_o, *hiddens_o, *us_o;
    double temperature;
    if (!PyArg_ParseTuple(args, "OOOd", &rows_o, &hiddens_o, &us_o, &temperature)) return NULL;
    PyObject *rows = PySequence_Fast(rows_o, "rows must be a sequence");
    PyObject *hiddens = rows ? PySequence_Fast(hiddens_o, "hiddens must be a sequence") : NULL;
    PyObject *us = hiddens ? PySequence_Fast(us_o, "us must be a sequence") : NULL;
    PyObject *out = NULL;
    Py_ssize_t n = rows ? PySequence_Fast_GET_SIZE(rows) : 0;
    Arg *a = NULL;
    double *u = NULL, *normalizers = NULL;
    Py_ssize_t *indices = NULL;
    if (!us) goto done;
    if (PySequence_Fast_GET_SIZE(hiddens) != n || PySequence_Fast_GET_SIZE(us) != n) {
        PyErr_SetString(PyExc_ValueError, "rows, hiddens and us differ in length");
        goto done;
    }
    a = calloc((size_t)(2 * n + 1), sizeof(Arg));
    u = malloc(sizeof(double) * (size_t)(n + 1));
    normalizers = malloc(sizeof(double) * (size_t)(n + 1));
    indices = malloc(sizeof(Py_ssize_t) * (size_t)(n + 1));
    if (!a || !u || !normalizers || !indices) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (get_buffer(PySequence_Fast_GET_ITEM(rows, i), &a[2 * i], 4, 'f', "row", 0)
            || get_buffer(PySequence_Fast_GET_ITEM(hiddens, i), &a[2 * i + 1], 8, 'i', "hidden", 1))
            goto done;
        u[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(us, i));
        if (u[i] == -1.0 && PyErr_Occurred()) goto done;
    }
    int failed = 0;
    float scale = (float)(1.0 / temperature);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && !failed; i++)
        failed = draw_one(a[2 * i].view.buf, ITEMS(a[2 * i]), a[2 * i + 1].held ? a[2 * i + 1].view.buf : NULL,
                          ITEMS(a[2 * i + 1]), scale, u[i], &indices[i], &normalizers[i]);
    Py_END_ALLOW_THREADS
    if (failed) { PyErr_NoMemory(); goto done; }
    out = PyList_New(n);
    for (Py_ssize_t i = 0; out && i < n; i++) {
        PyObject *pair = Py_BuildValue("nd", indices[i], normalizers[i]);
        if (!pair) { Py_CLEAR(out); break; }
        PyList_SET_ITEM(out, i, pair);
    }
done:
    if (a) release(a, (int)(2 * n));
    free(a); free(u); free(normalizers); free(indices);
    Py_XDECREF(rows); Py_XDECREF(hiddens); Py_XDECREF(us);
    return out;
}

/* masked(row, bits, allow, hidden, out): `out` = `row` with every non-candidate at -inf. */
static PyObject *kernel_masked(PyObject *self, PyObject *args) {
    PyObject *row_o, *bits_o, *allow_o, *hidden_o, *out_o;
    if (!PyArg_ParseTuple(args, "OOOOO", &row_o, &bits_o, &allow_o, &hidden_o, &out_o)) return NULL;
    Arg a[5];
    memset(a, 0, sizeof a);
    if (get_step(row_o, bits_o, allow_o, hidden_o, a) || get_buffer(out_o, &a[4], 4, 'f', "out", 0)) {
        release(a, 5);
        return NULL;
    }
    Py_ssize_t size = ITEMS(a[0]);
    if (ITEMS(a[4]) != size || a[4].view.readonly) {
        release(a, 5);
        PyErr_SetString(PyExc_ValueError, "out must be a writable row of the row's size");
        return NULL;
    }
    Py_ssize_t n_edits = 0;
    Edit *edits = make_edits(a[2].held ? a[2].view.buf : NULL, ITEMS(a[2]),
                             a[3].held ? a[3].view.buf : NULL, ITEMS(a[3]), size, &n_edits);
    if (!edits) { release(a, 5); return PyErr_NoMemory(); }
    Words c = {a[0].view.buf, size, a[1].held ? a[1].view.buf : NULL, edits, n_edits};
    float *out = a[4].view.buf;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t next = 0;
    for (Py_ssize_t w = 0; w < (size + 31) / 32; w++) {
        uint32_t bits = word_bits(&c, w, &next);
        Py_ssize_t end = size - 32 * w < 32 ? size - 32 * w : 32;
        for (Py_ssize_t j = 0; j < end; j++) out[32 * w + j] = bits >> j & 1 ? c.row[32 * w + j] : -INFINITY;
    }
    Py_END_ALLOW_THREADS
    free(edits);
    release(a, 5);
    Py_RETURN_NONE;
}

/* trie_walk(transitions, byte, child_start, lo, exact, roots, state, out): out[p] = 1 for
 * every sorted position p of a token whose bytes walk from DFA `state` without reaching
 * state 0 (DEAD); the trie is a VocabularyIndex's (its first `roots` nodes are depth 1).
 * The live (node, state) pairs level by level: token_masks.py's walk, compiled. */
static PyObject *kernel_trie_walk(PyObject *self, PyObject *args) {
    PyObject *t_o, *byte_o, *child_o, *lo_o, *exact_o, *out_o;
    Py_ssize_t roots, state;
    if (!PyArg_ParseTuple(args, "OOOOOnnO", &t_o, &byte_o, &child_o, &lo_o, &exact_o, &roots, &state, &out_o))
        return NULL;
    Arg a[6];
    memset(a, 0, sizeof a);
    if (get_buffer(t_o, &a[0], 4, 'i', "transitions", 0) || get_buffer(byte_o, &a[1], 4, 'i', "byte", 0)
        || get_buffer(child_o, &a[2], 4, 'i', "child_start", 0) || get_buffer(lo_o, &a[3], 4, 'i', "lo", 0)
        || get_buffer(exact_o, &a[4], 4, 'i', "exact", 0) || get_buffer(out_o, &a[5], 1, 'u', "out", 0)) {
        release(a, 6);
        return NULL;
    }
    Py_ssize_t nodes = ITEMS(a[1]), cells = ITEMS(a[0]), positions = ITEMS(a[5]);
    if (ITEMS(a[2]) != nodes + 1 || ITEMS(a[3]) != nodes || ITEMS(a[4]) != nodes || roots < 0
        || roots > nodes || cells % 256 || state < 0 || state >= cells / 256 || a[5].view.readonly) {
        release(a, 6);
        PyErr_SetString(PyExc_ValueError, "trie_walk: inconsistent trie, automaton or output");
        return NULL;
    }
    const int32_t *table = a[0].view.buf, *byte = a[1].view.buf, *child = a[2].view.buf,
                  *lo = a[3].view.buf, *exact = a[4].view.buf;
    uint8_t *out = a[5].view.buf;
    /* level by level, as the trie is laid out: each level's live pairs in node order */
    int32_t *pairs = malloc(4 * (size_t)(nodes + 1) * sizeof *pairs);
    if (!pairs) { release(a, 6); return PyErr_NoMemory(); }
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    int32_t *level = pairs, *next_level = pairs + 2 * (nodes + 1);
    Py_ssize_t count = 0, n_states = cells / 256;
    for (Py_ssize_t node = 0; node < roots; node++) {
        int32_t next = table[state * 256 + (byte[node] & 255)];
        if (next) { level[count++] = (int32_t)node; level[count++] = next; }
    }
    while (count && !bad) {
        Py_ssize_t next_count = 0;
        for (Py_ssize_t i = 0; i < count; i += 2) {
            int32_t node = level[i], here = level[i + 1];
            if (here < 0 || here >= n_states || lo[node] < 0 || exact[node] < 0
                || (Py_ssize_t)lo[node] + exact[node] > positions || child[node] < 0
                || child[node + 1] > nodes || child[node] > child[node + 1]) { bad = 1; break; }
            memset(out + lo[node], 1, (size_t)exact[node]);
            const int32_t *row = table + (Py_ssize_t)here * 256;
            for (int32_t c = child[node]; c < child[node + 1]; c++) {
                int32_t next = row[byte[c] & 255];
                if (next) { next_level[next_count++] = c; next_level[next_count++] = next; }
            }
        }
        int32_t *swap = level;
        level = next_level;
        next_level = swap;
        count = next_count;
    }
    Py_END_ALLOW_THREADS
    free(pairs);
    release(a, 6);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "trie_walk: an index out of range");
        return NULL;
    }
    Py_RETURN_NONE;
}

#include "_kernel_dfa.h"
#include "_kernel_options.h"

/* The instruction sets this CPU can run, best first. */
static int supported(const char *name) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (!strcmp(name, "avx512vbmi2"))
        return supported("avx512") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi2");
    if (!strcmp(name, "avx512")) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
    if (!strcmp(name, "avx2")) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return !strcmp(name, "baseline");
}

static const Loops *loops_of(const char *name) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (!strcmp(name, "avx512vbmi2")) return &loops_avx512vbmi2;
    if (!strcmp(name, "avx512")) return &loops_avx512;
    if (!strcmp(name, "avx2")) return &loops_avx2;
#endif
    return &loops_base;
}

static const char *NAMES[] = {"avx512vbmi2", "avx512", "avx2", "baseline"};

/* use(name): run the loops of instruction set `name` from now on (tests cover each). */
static PyObject *kernel_use(PyObject *self, PyObject *arg) {
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    if (!supported(name)) return PyErr_Format(PyExc_ValueError, "instruction set %s is not available", name);
    loops = loops_of(name);
    return PyObject_SetAttrString(self, "instructions", arg) < 0 ? NULL : Py_NewRef(Py_None);
}

static PyMethodDef methods[] = {
    {"best", kernel_best, METH_VARARGS,
     "best(row, ids, bits, allow, hidden, want_normalizer, compact) -> (index, log-normalizer or None)"},
    {"draw", kernel_draw, METH_VARARGS,
     "draw(rows, hiddens, us, temperature) -> [(index, normalizer)]"},
    {"masked", kernel_masked, METH_VARARGS,
     "masked(row, bits, allow, hidden, out): out = row with non-candidates at -inf"},
    {"trie_walk", kernel_trie_walk, METH_VARARGS,
     "trie_walk(transitions, byte, child_start, lo, exact, roots, state, out): out[p] = 1 for "
     "the sorted positions of the tokens alive from `state`"},
    {"use", kernel_use, METH_O, "use(name): the loops of instruction set `name` from now on"},
    {"grammar_dfa", kernel_grammar_dfa, METH_VARARGS,
     "grammar_dfa(text, bound, most_nfa_states, max_rules, max_depth, character_utf8) -> "
     "(table, classes, byte_class, accepting, transitions, cells), None or NotImplemented (see _kernel_dfa.h)"},
    {"options_dfa", kernel_options_dfa, METH_VARARGS,
     "options_dfa(words, most_trie_nodes) -> (table, classes, byte_class, accepting) or NotImplemented "
     "(see _kernel_options.h)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernel",
                                    "lmq's per-token kernels (see token_choice.py).", -1, methods};

/* `instructions`: the set in use (the best this CPU has); `available`: all it can run. */
PyMODINIT_FUNC PyInit__kernel(void) {
    PyObject *m = PyModule_Create(&module), *available = PyList_New(0);
    for (size_t i = 0; m && available && i < sizeof NAMES / sizeof *NAMES; i++) {
        if (!supported(NAMES[i])) continue;
        PyObject *name = PyUnicode_FromString(NAMES[i]);
        if (!name || PyList_Append(available, name) < 0) Py_CLEAR(available);
        Py_XDECREF(name);
    }
    if (!m || !available || PyModule_AddObjectRef(m, "available", available) < 0
        || PyModule_AddObjectRef(m, "instructions", PyList_GET_ITEM(available, 0)) < 0) {
        Py_XDECREF(available);
        Py_XDECREF(m);
        return NULL;
    }
#if defined(__x86_64__) && defined(__GNUC__)
    compact_order_init();
#endif
    loops = loops_of(PyUnicode_AsUTF8(PyList_GET_ITEM(available, 0)));
    Py_DECREF(available);
    return m;
}
