/* A regular GBNF grammar as a byte DFA, compiled: the cold compile of a JSON schema.
 *
 * grammar_dfa(text, ...) is gbnf_dfa.py's route (gbnf._parse's checks, _inlinable,
 * _Builder, _determinize, _trimmed) in one pass of C, and must give the identical DFA:
 * the same NFA state numbering, the same kernels met in the same order, the same byte
 * classes. It decides only the grammars it can vouch for: on anything gbnf.py would
 * report as an error, on a grammar with any cycle among its rules, and on nesting deep
 * enough that Python might hit its recursion limit, it answers NotImplemented and the
 * Python route runs (and names the error). Included once, from _kernel.c.
 */
#include <setjmp.h>

enum { DFA_NONE = 1, DFA_PYTHON, DFA_ERROR };     /* why a build stopped (longjmp) */
enum { N_LIT, N_CLASS, N_ANY, N_REF, N_REPEAT, N_SEQ, N_CHOICE };
#define MAX_REPETITIONS 2000        /* gbnf.MAX_REPETITIONS (llama.cpp's limit) */
#define MAX_CODE_POINT 0x10FFFF     /* gbnf.MAX_CODE_POINT */
#define MAX_FRAGMENT_DEPTH 300     /* deeper: Python's builder might overflow its stack */

typedef struct { int32_t *v; Py_ssize_t n, cap; } IVec;

typedef struct {                   /* a node of the grammar's tree */
    int kind;
    int32_t a, b, c;               /* LIT: bytes at a, length b; CLASS: ranges at a, count b,
                                      negated c; REF: rule; REPEAT: item, low, high (-1: none);
                                      SEQ/CHOICE: children at a, count b */
    int32_t utf8;                  /* CLASS/ANY: its UTF-8 automaton in `automata` (-1: not yet) */
} Node;

typedef struct {
    int32_t name_at, name_len, body;
    int32_t built, start, end, first, last;     /* the builder's copy of a built rule */
    IVec moves, moves_eps;
    int32_t state;                 /* checks: 0 new, 1 on the path, 2 done */
    int32_t height, nullable;
} Rule;

typedef struct {
    IVec edges, eps;               /* edges: (low, high, target) triples */
} NState;

typedef struct {
    jmp_buf fail;
    const char *text;
    Py_ssize_t len, pos;
    int depth, max_depth, max_rules;
    IVec bytes, ints, kids, refs;  /* literal bytes, class ranges, children, reference nodes */
    IVec scratch;                  /* the items of the sequences and choices being read */
    Node *nodes; Py_ssize_t n_nodes, cap_nodes;
    Rule *rules; Py_ssize_t n_rules, cap_rules;
    int32_t *names; Py_ssize_t names_cap;            /* open addressing: rule + 1, 0 empty */
    IVec automata;                 /* per automaton: n_states, then per state n_edges, triples */
    PyObject *character_utf8;
    NState *states; Py_ssize_t n_states, cap_states, most_states;
    struct Chunk *chunks;          /* the states' edge lists, freed at once */
    int32_t *arena_at; Py_ssize_t arena_left;
    int trim, fragment_depth;
} Gram;

static void *grow(Gram *g, void *p, Py_ssize_t *cap, Py_ssize_t need, size_t item) {
    if (need <= *cap) return p;
    Py_ssize_t cap2 = *cap ? *cap : 8;
    while (cap2 < need) cap2 *= 2;
    void *q = realloc(p, (size_t)cap2 * item);
    if (!q) { PyErr_NoMemory(); longjmp(g->fail, DFA_ERROR); }
    *cap = cap2;
    return q;
}

INLINE void push(Gram *g, IVec *a, int32_t x) {
    if (a->n == a->cap) a->v = grow(g, a->v, &a->cap, a->n + 1, sizeof *a->v);
    a->v[a->n++] = x;
}

INLINE void push3(Gram *g, IVec *a, int32_t x, int32_t y, int32_t z) {
    push(g, a, x); push(g, a, y); push(g, a, z);
}

/* The NFA states' edge lists, thousands of short ones, grow in an arena: no malloc each. */
typedef struct Chunk { struct Chunk *next; int32_t v[]; } Chunk;

static int32_t *arena(Gram *g, Py_ssize_t n) {
    if (n > g->arena_left) {
        Py_ssize_t size = n > 1 << 15 ? n : 1 << 15;
        Chunk *chunk = malloc(sizeof *chunk + sizeof *chunk->v * (size_t)size);
        if (!chunk) { PyErr_NoMemory(); longjmp(g->fail, DFA_ERROR); }
        chunk->next = g->chunks;
        g->chunks = chunk;
        g->arena_at = chunk->v;
        g->arena_left = size;
    }
    g->arena_left -= n;
    return (g->arena_at += n) - n;
}

INLINE void state_push(Gram *g, IVec *a, int32_t x) {
    if (a->n == a->cap) {
        Py_ssize_t cap = a->cap ? 2 * a->cap : 6;
        int32_t *v = arena(g, cap);
        if (a->n) memcpy(v, a->v, sizeof *v * (size_t)a->n);
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = x;
}

INLINE void state_push3(Gram *g, IVec *a, int32_t x, int32_t y, int32_t z) {
    state_push(g, a, x); state_push(g, a, y); state_push(g, a, z);
}

static int int_order(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

static int pair_order(const void *a, const void *b) {
    const int32_t *x = a, *y = b;
    for (int i = 0; i < 2; i++) if (x[i] != y[i]) return (x[i] > y[i]) - (x[i] < y[i]);
    return 0;
}

static int triple_order(const void *a, const void *b) {
    const int32_t *x = a, *y = b;
    for (int i = 0; i < 3; i++) if (x[i] != y[i]) return (x[i] > y[i]) - (x[i] < y[i]);
    return 0;
}

/* Sort n items of `width` int32s: most lists here are a few items, where an insertion
 * sort beats qsort's calls. */
static void sort_items(int32_t *v, Py_ssize_t n, int width, int (*order)(const void *, const void *)) {
    if (n > 16) { qsort(v, (size_t)n, (size_t)width * sizeof *v, order); return; }
    int32_t item[3];
    for (Py_ssize_t i = 1; i < n; i++) {
        memcpy(item, v + i * width, (size_t)width * sizeof *v);
        Py_ssize_t j = i;
        for (; j > 0 && order(v + (j - 1) * width, item) > 0; j--)
            memcpy(v + j * width, v + (j - 1) * width, (size_t)width * sizeof *v);
        memcpy(v + j * width, item, (size_t)width * sizeof *v);
    }
}

/* ------------------------------------------------------------------ parsing (gbnf._Parser) */

#define PEEK(g, k) ((g)->pos + (k) < (g)->len ? (unsigned char)(g)->text[(g)->pos + (k)] : 0)
#define AT_END(g) ((g)->pos >= (g)->len)

static _Noreturn void python_route(Gram *g) { longjmp(g->fail, DFA_PYTHON); }

static int32_t new_node(Gram *g, int kind, int32_t a, int32_t b, int32_t c) {
    g->nodes = grow(g, g->nodes, &g->cap_nodes, g->n_nodes + 1, sizeof *g->nodes);
    g->nodes[g->n_nodes] = (Node){kind, a, b, c, -1};
    return (int32_t)g->n_nodes++;
}

static void space(Gram *g, int newlines) {
    while (!AT_END(g)) {
        unsigned char c = PEEK(g, 0);
        if (c == ' ' || c == '\t' || (newlines && (c == '\r' || c == '\n'))) g->pos++;
        else if (c == '#') { while (!AT_END(g) && PEEK(g, 0) != '\r' && PEEK(g, 0) != '\n') g->pos++; }
        else break;
    }
}

static int word_char(unsigned char c) {
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '-';
}

static int32_t name(Gram *g) {
    Py_ssize_t start = g->pos;
    while (!AT_END(g) && word_char(PEEK(g, 0))) g->pos++;
    if (g->pos == start) python_route(g);
    return (int32_t)start;
}

static uint32_t name_hash(const char *s, Py_ssize_t n) {
    uint32_t h = 2166136261u;
    for (Py_ssize_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

/* The slot of rule name s[:n] in `names` (holding its rule + 1, or 0 where absent). */
static Py_ssize_t name_slot(Gram *g, const char *s, int32_t n) {
    Py_ssize_t mask = g->names_cap - 1, i = name_hash(s, n) & mask;
    for (;; i = (i + 1) & mask) {
        int32_t r = g->names[i];
        if (!r || (g->rules[r - 1].name_len == n && !memcmp(g->text + g->rules[r - 1].name_at, s, n)))
            return i;
    }
}

static int32_t integer(Gram *g) {
    Py_ssize_t start = g->pos;
    int32_t value = 0;
    while (!AT_END(g) && PEEK(g, 0) >= '0' && PEEK(g, 0) <= '9') {
        if (value <= MAX_REPETITIONS) value = value * 10 + (PEEK(g, 0) - '0');
        g->pos++;
    }
    if (g->pos == start) python_route(g);
    return value;                  /* past MAX_REPETITIONS: some value above it */
}

static int hex_value(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* One character of a literal or class: a UTF-8 sequence or an escape, as a code point. */
static int32_t character(Gram *g) {
    if (AT_END(g)) python_route(g);
    unsigned char c = PEEK(g, 0);
    if (c != '\\') {
        int n = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
        int32_t value = n == 1 ? c : c & (0x3F >> (n - 1));
        for (int k = 1; k < n; k++) value = value << 6 | (PEEK(g, k) & 0x3F);
        g->pos += n;               /* the text is valid UTF-8 (PyUnicode_AsUTF8AndSize) */
        return value;
    }
    unsigned char e = PEEK(g, 1);
    const char *simple = "tnr\\\"[]-";
    const int32_t values[] = {9, 10, 13, 92, 34, 91, 93, 45};
    for (int k = 0; simple[k]; k++)
        if (e && e == (unsigned char)simple[k]) { g->pos += 2; return values[k]; }
    int digits = e == 'x' ? 2 : e == 'u' ? 4 : e == 'U' ? 8 : 0;
    if (!digits) python_route(g);
    int64_t value = 0;
    for (int k = 0; k < digits; k++) {
        int h = hex_value(PEEK(g, 2 + k));
        if (h < 0) python_route(g);
        value = value << 4 | h;
    }
    if (value > MAX_CODE_POINT || (value >= 0xD800 && value <= 0xDFFF)) python_route(g);
    g->pos += 2 + digits;
    return (int32_t)value;
}

static void utf8_bytes(Gram *g, int32_t cp) {
    if (cp < 0x80) { push(g, &g->bytes, cp); return; }
    if (cp < 0x800) { push(g, &g->bytes, 0xC0 | cp >> 6); }
    else {
        if (cp < 0x10000) push(g, &g->bytes, 0xE0 | cp >> 12);
        else { push(g, &g->bytes, 0xF0 | cp >> 18); push(g, &g->bytes, 0x80 | (cp >> 12 & 0x3F)); }
        push(g, &g->bytes, 0x80 | (cp >> 6 & 0x3F));
    }
    push(g, &g->bytes, 0x80 | (cp & 0x3F));
}

static int32_t literal(Gram *g) {
    g->pos++;
    int32_t at = (int32_t)g->bytes.n;
    while (PEEK(g, 0) != '"') {      /* (0 past the end) */
        if (AT_END(g)) python_route(g);
        if (PEEK(g, 0) == '\\') utf8_bytes(g, character(g));
        else push(g, &g->bytes, PEEK(g, 0)), g->pos++;
    }
    g->pos++;
    return new_node(g, N_LIT, at, (int32_t)g->bytes.n - at, 0);
}

static int32_t char_class(Gram *g) {
    g->pos++;
    int negated = PEEK(g, 0) == '^';
    if (negated) g->pos++;
    int32_t at = (int32_t)g->ints.n;
    while (PEEK(g, 0) != ']') {
        if (AT_END(g)) python_route(g);
        int32_t low = character(g), high = low;
        if (PEEK(g, 0) == '-' && g->pos + 1 < g->len && PEEK(g, 1) != ']') {
            g->pos++;
            high = character(g);
        }
        push(g, &g->ints, low < high ? low : high);
        push(g, &g->ints, low < high ? high : low);
    }
    g->pos++;
    int32_t count = (int32_t)(g->ints.n - at) / 2;
    if (!count) python_route(g);
    return new_node(g, N_CLASS, at, count, negated);
}

static int32_t alternatives(Gram *g, int nested);

static int32_t repetition(Gram *g, int32_t item) {
    unsigned char c = PEEK(g, 0);
    g->pos++;
    if (c != '{') return new_node(g, N_REPEAT, item, c == '+', c == '?' ? 1 : -1);
    space(g, 0);
    int32_t low = integer(g), high;
    space(g, 0);
    if (PEEK(g, 0) == '}') high = low;
    else if (PEEK(g, 0) == ',') {
        g->pos++;
        space(g, 0);
        high = PEEK(g, 0) >= '0' && PEEK(g, 0) <= '9' ? integer(g) : -1;
        space(g, 0);
        if (PEEK(g, 0) != '}') python_route(g);
    } else python_route(g);
    g->pos++;
    if (low > MAX_REPETITIONS || high > MAX_REPETITIONS || (high >= 0 && high < low)) python_route(g);
    return new_node(g, N_REPEAT, item, low, high);
}


/* The node of the items scratch[mark:] (one item: itself), which leave the scratch stack. */
static int32_t group(Gram *g, Py_ssize_t mark, int kind) {
    Py_ssize_t count = g->scratch.n - mark;
    if (count == 1) return g->scratch.v[--g->scratch.n];
    int32_t node = new_node(g, kind, (int32_t)g->kids.n, (int32_t)count, 0);
    for (Py_ssize_t i = mark; i < mark + count; i++) push(g, &g->kids, g->scratch.v[i]);
    g->scratch.n = mark;
    return node;
}

static int32_t sequence(Gram *g, int nested) {
    Py_ssize_t mark = g->scratch.n;
    while (!AT_END(g)) {
        unsigned char c = PEEK(g, 0);
        int32_t item;
        if (c == '"') item = literal(g);
        else if (c == '[') item = char_class(g);
        else if (word_char(c)) {
            int32_t at = name(g);
            item = new_node(g, N_REF, at, (int32_t)(g->pos - at), 0);
            push(g, &g->refs, item);
        } else if (c == '(') {
            if (g->depth >= g->max_depth || g->depth >= MAX_FRAGMENT_DEPTH) python_route(g);
            g->depth++;
            g->pos++;
            space(g, 1);
            item = alternatives(g, 1);
            if (PEEK(g, 0) != ')') python_route(g);
            g->pos++;
            g->depth--;
        } else if (c == '.') {
            g->pos++;
            item = new_node(g, N_ANY, 0, 0, 0);
        } else if (c == '*' || c == '+' || c == '?' || c == '{') {
            if (g->scratch.n == mark) python_route(g);
            g->scratch.v[g->scratch.n - 1] = repetition(g, g->scratch.v[g->scratch.n - 1]);
            space(g, nested);
            continue;
        } else break;              /* '<' and '!' too: the caller then fails */
        push(g, &g->scratch, item);
        space(g, nested);
    }
    return group(g, mark, N_SEQ);
}

static int32_t alternatives(Gram *g, int nested) {
    Py_ssize_t mark = g->scratch.n;
    push(g, &g->scratch, sequence(g, nested));
    while (PEEK(g, 0) == '|') {
        g->pos++;
        space(g, 1);
        push(g, &g->scratch, sequence(g, nested));
    }
    return group(g, mark, N_CHOICE);
}

static void grow_names(Gram *g) {
    if (2 * (g->n_rules + 1) <= g->names_cap) return;
    Py_ssize_t cap = g->names_cap ? 2 * g->names_cap : 64;
    int32_t *old = g->names;
    Py_ssize_t old_cap = g->names_cap;
    g->names = calloc((size_t)cap, sizeof *g->names);
    if (!g->names) { g->names = old; PyErr_NoMemory(); longjmp(g->fail, DFA_ERROR); }
    g->names_cap = cap;
    for (Py_ssize_t i = 0; i < old_cap; i++)
        if (old[i]) {
            Rule *r = &g->rules[old[i] - 1];
            g->names[name_slot(g, g->text + r->name_at, r->name_len)] = old[i];
        }
    free(old);
}

static void rule(Gram *g) {
    int32_t at = name(g), n = (int32_t)(g->pos - at);
    space(g, 0);
    if (g->len - g->pos < 3 || memcmp(g->text + g->pos, "::=", 3)) python_route(g);
    grow_names(g);
    if (g->names[name_slot(g, g->text + at, n)] || g->n_rules >= g->max_rules) python_route(g);
    g->pos += 3;
    space(g, 1);
    int32_t body = alternatives(g, 0);
    if (PEEK(g, 0) == '\r') g->pos += PEEK(g, 1) == '\n' ? 2 : 1;
    else if (PEEK(g, 0) == '\n') g->pos++;
    else if (!AT_END(g)) python_route(g);
    space(g, 1);
    g->rules = grow(g, g->rules, &g->cap_rules, g->n_rules + 1, sizeof *g->rules);
    g->rules[g->n_rules] = (Rule){.name_at = at, .name_len = n, .body = body};
    g->names[name_slot(g, g->text + at, n)] = (int32_t)++g->n_rules;
}

/* ------------------------------------------------------------------ checks (gbnf._parse, _inlinable) */

/* Recursions over the tree stop at MAX_FRAGMENT_DEPTH (the Python route takes over). */
#define ENTER(g) do { if (++(g)->fragment_depth > MAX_FRAGMENT_DEPTH) python_route(g); } while (0)

static int32_t node_nullable(Gram *g, int32_t id);

static int32_t nullable(Gram *g, int32_t id) {
    ENTER(g);
    int32_t result = node_nullable(g, id);
    g->fragment_depth--;
    return result;
}

static int32_t node_nullable(Gram *g, int32_t id) {
    Node *n = &g->nodes[id];
    switch (n->kind) {
    case N_LIT: return n->b == 0;
    case N_REF: return g->rules[n->a].nullable;
    case N_REPEAT: return n->b == 0 || nullable(g, n->a);
    case N_SEQ:
        for (int32_t i = 0; i < n->b; i++) if (!nullable(g, g->kids.v[n->a + i])) return 0;
        return 1;
    case N_CHOICE:
        for (int32_t i = 0; i < n->b; i++) if (nullable(g, g->kids.v[n->a + i])) return 1;
        return 0;
    default: return 0;
    }
}

/* gbnf._check_left_recursion's `leftmost` walk, for its error: an unbounded repetition of
 * something that may be empty. */
static void leftmost(Gram *g, int32_t id) {
    Node *n = &g->nodes[id];
    ENTER(g);
    if (n->kind == N_REPEAT) {
        if (n->c < 0 && nullable(g, n->a)) python_route(g);
        if (n->c != 0) leftmost(g, n->a);
    } else if (n->kind == N_SEQ) {
        for (int32_t i = 0; i < n->b; i++) {
            leftmost(g, g->kids.v[n->a + i]);
            if (!nullable(g, g->kids.v[n->a + i])) break;
        }
    } else if (n->kind == N_CHOICE) {
        for (int32_t i = 0; i < n->b; i++) leftmost(g, g->kids.v[n->a + i]);
    }
    g->fragment_depth--;
}

static void check_rule(Gram *g, int32_t r);

/* The height of the rules `id` refers to (1 + the highest), checking them first. */
static int32_t referred(Gram *g, int32_t id) {
    Node *n = &g->nodes[id];
    if (n->kind == N_REF) {
        check_rule(g, n->a);
        return 1 + g->rules[n->a].height;
    }
    ENTER(g);
    int32_t height = 0;
    if (n->kind == N_REPEAT) height = referred(g, n->a);
    else if (n->kind == N_SEQ || n->kind == N_CHOICE)
        for (int32_t i = 0; i < g->nodes[id].b; i++) {
            int32_t h = referred(g, g->kids.v[g->nodes[id].a + i]);
            if (h > height) height = h;
        }
    g->fragment_depth--;
    return height;
}

/* A rule's height and nullability; any cycle among the rules goes to the Python route. */
static void check_rule(Gram *g, int32_t r) {
    if (g->rules[r].state == 2) return;
    if (g->rules[r].state == 1) python_route(g);
    ENTER(g);
    g->rules[r].state = 1;
    int32_t height = referred(g, g->rules[r].body);
    g->rules[r].height = height > 0 ? height : 1;
    g->rules[r].nullable = nullable(g, g->rules[r].body);
    leftmost(g, g->rules[r].body);
    g->rules[r].state = 2;
    g->fragment_depth--;
}

/* ------------------------------------------------------------------ the NFA (gbnf_dfa._Builder) */

static int32_t new_state(Gram *g) {
    if (g->n_states >= g->most_states) longjmp(g->fail, DFA_NONE);
    g->states = grow(g, g->states, &g->cap_states, g->n_states + 1, sizeof *g->states);
    g->states[g->n_states] = (NState){{0}, {0}};
    return (int32_t)g->n_states++;
}

/* The UTF-8 automaton of a class or `.` (regex.character_utf8; an ASCII one is its
 * ranges), stored in `automata`: its state count, then per state its edge count and edges. */
static int32_t utf8_automaton(Gram *g, int32_t id) {
    Node *n = &g->nodes[id];
    if (n->utf8 >= 0) return n->utf8;
    /* gbnf.code_point_ranges: sorted, merged, complemented where negated */
    IVec *r = &g->scratch;
    Py_ssize_t mark = r->n;
    if (n->kind == N_ANY) { push(g, r, 0); push(g, r, MAX_CODE_POINT); }
    else {
        for (int32_t i = 0; i < 2 * n->b; i++) push(g, r, g->ints.v[n->a + i]);
        sort_items(r->v + mark, n->b, 2, pair_order);
        Py_ssize_t out = mark;
        for (Py_ssize_t k = mark; k < r->n; k += 2) {
            if (out > mark && r->v[k] <= r->v[out - 1] + 1) {
                if (r->v[k + 1] > r->v[out - 1]) r->v[out - 1] = r->v[k + 1];
            } else { r->v[out] = r->v[k]; r->v[out + 1] = r->v[k + 1]; out += 2; }
        }
        r->n = out;
        if (n->c) {
            Py_ssize_t end = r->n;
            int32_t next_low = 0;
            for (Py_ssize_t k = mark; k < end; k += 2) {
                if (r->v[k] > next_low) { push(g, r, next_low); push(g, r, r->v[k] - 1); }
                next_low = r->v[k + 1] + 1;
            }
            if (next_low <= MAX_CODE_POINT) { push(g, r, next_low); push(g, r, MAX_CODE_POINT); }
            memmove(r->v + mark, r->v + end, (size_t)(r->n - end) * sizeof *r->v);
            r->n = mark + (r->n - end);
        }
    }
    int32_t at = (int32_t)g->automata.n;
    int ascii = 1;
    for (Py_ssize_t k = mark; k < r->n; k += 2) ascii &= r->v[k + 1] < 0x80;
    if (ascii) {
        push(g, &g->automata, 1);
        push(g, &g->automata, (int32_t)(r->n - mark) / 2);
        for (Py_ssize_t k = mark; k < r->n; k += 2) push3(g, &g->automata, r->v[k], r->v[k + 1], -1);
        r->n = mark;
        return g->nodes[id].utf8 = at;
    }
    PyObject *ranges = PyTuple_New((r->n - mark) / 2), *states = NULL;
    for (Py_ssize_t k = mark; ranges && k < r->n; k += 2) {
        PyObject *pair = Py_BuildValue("(ii)", r->v[k], r->v[k + 1]);
        if (!pair) Py_CLEAR(ranges);
        else PyTuple_SET_ITEM(ranges, (k - mark) / 2, pair);
    }
    r->n = mark;
    if (ranges) states = PyObject_CallOneArg(g->character_utf8, ranges);
    Py_XDECREF(ranges);
    int bad = !states || !PyTuple_Check(states) || !PyTuple_GET_SIZE(states);
    if (!bad) push(g, &g->automata, (int32_t)PyTuple_GET_SIZE(states));
    for (Py_ssize_t s = 0; !bad && s < PyTuple_GET_SIZE(states); s++) {
        PyObject *edges = PyTuple_GET_ITEM(states, s);
        bad = !PyTuple_Check(edges);
        if (!bad) push(g, &g->automata, (int32_t)PyTuple_GET_SIZE(edges));
        for (Py_ssize_t e = 0; !bad && e < PyTuple_GET_SIZE(edges); e++) {
            int32_t low, high, target;
            bad = !PyArg_ParseTuple(PyTuple_GET_ITEM(edges, e), "iii", &low, &high, &target);
            if (!bad) push3(g, &g->automata, low, high, target);
        }
    }
    Py_XDECREF(states);
    if (bad) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "character_utf8: not a UTF-8 automaton");
        longjmp(g->fail, DFA_ERROR);
    }
    return g->nodes[id].utf8 = at;
}

static void character_edges(Gram *g, int32_t id, int32_t start, int32_t end) {
    int32_t at = utf8_automaton(g, id);
    int32_t count = g->automata.v[at];
    Py_ssize_t base = g->n_states - 1;     /* automaton state s > 0 is base + s */
    g->trim |= g->automata.v[at + 1] == 0;
    for (int32_t s = 1; s < count; s++) new_state(g);
    Py_ssize_t k = at + 1;
    for (int32_t s = 0; s < count; s++) {
        int32_t edges = g->automata.v[k++], source = s ? (int32_t)(base + s) : start;
        for (int32_t e = 0; e < edges; e++, k += 3) {
            int32_t target = g->automata.v[k + 2];
            state_push3(g, &g->states[source].edges, g->automata.v[k], g->automata.v[k + 1],
                  target < 0 ? end : target ? (int32_t)(base + target) : start);
        }
    }
}

static void fragment(Gram *g, int32_t id, int32_t start, int32_t end);

static void build_rule(Gram *g, int32_t r, int32_t start, int32_t end) {
    Rule *rule = &g->rules[r];
    if (!rule->built) {
        int32_t inner = (int32_t)g->n_states;
        Py_ssize_t moves = g->states[start].edges.n, moves_eps = g->states[start].eps.n;
        fragment(g, rule->body, start, end);
        rule = &g->rules[r];
        rule->built = 1;
        rule->start = start;
        rule->end = end;
        rule->first = inner;
        rule->last = (int32_t)g->n_states;
        for (Py_ssize_t i = moves; i < g->states[start].edges.n; i++)
            push(g, &g->rules[r].moves, g->states[start].edges.v[i]);
        for (Py_ssize_t i = moves_eps; i < g->states[start].eps.n; i++)
            push(g, &g->rules[r].moves_eps, g->states[start].eps.v[i]);
        return;
    }
    if (g->n_states + rule->last - rule->first > g->most_states) longjmp(g->fail, DFA_NONE);
    int32_t shift = (int32_t)g->n_states - rule->first, old_start = rule->start, old_end = rule->end;
#define PLACE(t) ((t) == old_start ? start : (t) == old_end ? end : (t) + shift)
    for (int32_t s = rule->first; s < g->rules[r].last; s++) {
        int32_t copy = new_state(g);
        IVec *from = &g->states[s].edges, *to = &g->states[copy].edges;
        for (Py_ssize_t i = 0; i < from->n; i += 3)
            state_push3(g, to, from->v[i], from->v[i + 1], PLACE(from->v[i + 2]));
        for (Py_ssize_t i = 0; i < g->states[s].eps.n; i++)
            state_push(g, &g->states[copy].eps, PLACE(g->states[s].eps.v[i]));
    }
    rule = &g->rules[r];
    for (Py_ssize_t i = 0; i < rule->moves.n; i += 3)
        state_push3(g, &g->states[start].edges, rule->moves.v[i], rule->moves.v[i + 1], PLACE(rule->moves.v[i + 2]));
    for (Py_ssize_t i = 0; i < rule->moves_eps.n; i++)
        state_push(g, &g->states[start].eps, PLACE(rule->moves_eps.v[i]));
#undef PLACE
}

static void fragment(Gram *g, int32_t id, int32_t start, int32_t end) {
    ENTER(g);
    Node n = g->nodes[id];
    switch (n.kind) {
    case N_LIT:
        if (!n.b) { state_push(g, &g->states[start].eps, end); break; }
        for (int32_t i = 0, here = start; i < n.b; i++) {
            int32_t target = i == n.b - 1 ? end : new_state(g), byte = g->bytes.v[n.a + i];
            state_push3(g, &g->states[here].edges, byte, byte, target);
            here = target;
        }
        break;
    case N_CLASS: case N_ANY:
        character_edges(g, id, start, end);
        break;
    case N_REF:
        build_rule(g, n.a, start, end);
        break;
    case N_SEQ:
        for (int32_t i = 0, here = start; i < n.b; i++) {
            int32_t target = i == n.b - 1 ? end : new_state(g);
            fragment(g, g->kids.v[n.a + i], here, target);
            here = target;
        }
        if (!n.b) state_push(g, &g->states[start].eps, end);
        break;
    case N_CHOICE:
        for (int32_t i = 0; i < n.b; i++) fragment(g, g->kids.v[n.a + i], start, end);
        break;
    default: {                     /* N_REPEAT: GrammarNfa.repeat */
        int32_t here = start;
        for (int32_t i = 0; i < n.b; i++) {
            int32_t target = new_state(g);
            fragment(g, n.a, here, target);
            here = target;
        }
        if (n.c < 0) {
            int32_t hub = new_state(g), body_end = new_state(g);
            state_push(g, &g->states[here].eps, hub);
            fragment(g, n.a, hub, body_end);
            state_push(g, &g->states[body_end].eps, hub);
            state_push(g, &g->states[hub].eps, end);
            break;
        }
        for (int32_t i = 0; i < n.c - n.b; i++) {
            state_push(g, &g->states[here].eps, end);
            int32_t target = new_state(g);
            fragment(g, n.a, here, target);
            here = target;
        }
        state_push(g, &g->states[here].eps, end);
    }
    }
    g->fragment_depth--;
}

/* ------------------------------------------------------------------ subset construction (_determinize) */

/* A DFA state's key: a kernel (sorted NFA states with byte edges) and whether it accepts,
 * interned: `keys` holds per key its offset in `members`, length and accepting flag. */
typedef struct {
    IVec members, keys, table;     /* table: open addressing, key + 1, 0 empty */
    IVec reached;                  /* per NFA state: the key of its ε-closure, -1 not yet */
    IVec seen, stack, found;       /* closure walks: seen[state] == stamp */
    IVec merged;                   /* the union of the kernels covering a byte range */
    int32_t stamp;
} Keys;

static uint32_t key_hash(const int32_t *v, Py_ssize_t n, int32_t accept) {
    uint32_t h = 2166136261u ^ (uint32_t)accept;
    for (Py_ssize_t i = 0; i < n; i++) h = (h ^ (uint32_t)v[i]) * 16777619u;
    return h;
}

/* The key of kernel v[:n] (sorted, distinct) with `accept`, made if new. */
static int32_t intern(Gram *g, Keys *k, const int32_t *v, Py_ssize_t n, int32_t accept) {
    Py_ssize_t n_keys = k->keys.n / 3;
    if (2 * (n_keys + 1) > k->table.n) {           /* rehash at half full */
        Py_ssize_t cap = k->table.n ? 2 * k->table.n : 1024;
        free(k->table.v);
        k->table.v = calloc((size_t)cap, sizeof *k->table.v);
        if (!k->table.v) { PyErr_NoMemory(); longjmp(g->fail, DFA_ERROR); }
        k->table.n = k->table.cap = cap;
        for (Py_ssize_t key = 0; key < n_keys; key++) {
            int32_t *m = k->keys.v + 3 * key;
            Py_ssize_t i = key_hash(k->members.v + m[0], m[1], m[2]) & (cap - 1);
            while (k->table.v[i]) i = (i + 1) & (cap - 1);
            k->table.v[i] = (int32_t)key + 1;
        }
    }
    Py_ssize_t mask = k->table.n - 1, i = key_hash(v, n, accept) & mask;
    for (;; i = (i + 1) & mask) {
        int32_t key = k->table.v[i] - 1;
        if (key < 0) break;
        int32_t *m = k->keys.v + 3 * key;
        if (m[1] == n && m[2] == accept && !memcmp(k->members.v + m[0], v, (size_t)n * sizeof *v)) return key;
    }
    k->table.v[i] = (int32_t)n_keys + 1;
    push3(g, &k->keys, (int32_t)k->members.n, (int32_t)n, accept);
    for (Py_ssize_t j = 0; j < n; j++) push(g, &k->members, v[j]);
    return (int32_t)n_keys;
}

/* The key of a state's ε-closure (_determinize's `reach`). */
static int32_t reach(Gram *g, Keys *k, int32_t state, int32_t final) {
    if (k->reached.v[state] >= 0) return k->reached.v[state];
    k->found.n = k->stack.n = 0;
    int32_t accept = 0, stamp = ++k->stamp;
    k->seen.v[state] = stamp;
    push(g, &k->stack, state);
    while (k->stack.n) {
        int32_t s = k->stack.v[--k->stack.n];
        accept |= s == final;
        if (g->states[s].edges.n) push(g, &k->found, s);
        for (Py_ssize_t i = 0; i < g->states[s].eps.n; i++) {
            int32_t t = g->states[s].eps.v[i];
            if (k->seen.v[t] != stamp) { k->seen.v[t] = stamp; push(g, &k->stack, t); }
        }
    }
    sort_items(k->found.v, k->found.n, 1, int_order);
    int32_t key = intern(g, k, k->found.v, k->found.n, accept);
    k->reached.v[state] = key;
    return key;
}

/* The moves of `key` (_moves): (low, high, target key) over disjoint byte ranges, into `out`. */
static void moves_of(Gram *g, Keys *k, int32_t key, int32_t final, IVec *edges, IVec *out) {
    edges->n = out->n = 0;
    int32_t at = k->keys.v[3 * key], n = k->keys.v[3 * key + 1];
    for (int32_t i = 0; i < n; i++) {
        IVec *e = &g->states[k->members.v[at + i]].edges;
        for (Py_ssize_t j = 0; j < e->n; j++) push(g, edges, e->v[j]);
    }
    Py_ssize_t count = edges->n / 3;
    sort_items(edges->v, count, 3, triple_order);
    int disjoint = 1;
    for (Py_ssize_t i = 0; i + 1 < count; i++) disjoint &= edges->v[3 * i + 1] < edges->v[3 * i + 3];
    if (disjoint) {
        for (Py_ssize_t i = 0; i < count; i++)
            push3(g, out, edges->v[3 * i], edges->v[3 * i + 1], reach(g, k, edges->v[3 * i + 2], final));
        return;
    }
    uint8_t cut[257] = {0};
    for (Py_ssize_t i = 0; i < count; i++) cut[edges->v[3 * i]] = cut[edges->v[3 * i + 1] + 1] = 1;
    int32_t low = -1;
    for (int32_t c = 0; c <= 256; c++) {
        if (!cut[c]) continue;
        if (low >= 0) {            /* the piece low..c-1: the union of the covering targets */
            IVec *u = &k->merged;
            u->n = 0;
            int32_t accept = 0, covered = 0;
            for (Py_ssize_t i = 0; i < count; i++) {
                if (edges->v[3 * i] > low || edges->v[3 * i + 1] < c - 1) continue;
                int32_t part = reach(g, k, edges->v[3 * i + 2], final);   /* may move `keys` */
                int32_t *m = k->keys.v + 3 * part;
                covered = 1;
                accept |= m[2];
                for (int32_t j = 0; j < m[1]; j++) push(g, u, k->members.v[m[0] + j]);
            }
            if (covered) {
                sort_items(u->v, u->n, 1, int_order);
                Py_ssize_t distinct = 0;
                for (Py_ssize_t i = 0; i < u->n; i++)
                    if (!distinct || u->v[i] != u->v[distinct - 1]) u->v[distinct++] = u->v[i];
                push3(g, out, low, c - 1, intern(g, k, u->v, distinct, accept));
            }
        }
        low = c;
    }
}

typedef struct {
    IVec order, ids;               /* DFA state n's key is order[n - 1]; ids[key]: its number, -1 none */
    IVec moves;                    /* (source, low, high, target) */
    IVec edges, out;               /* a state's NFA edges and its moves (moves_of) */
    IVec live, number, pred_at, preds, stack;      /* trimming */
} Dfa;

static int32_t *id_of(Gram *g, Keys *k, Dfa *d, int32_t key) {
    while (d->ids.n < k->keys.n / 3) push(g, &d->ids, -1);
    return &d->ids.v[key];
}

/* The subset construction: states numbered breadth-first from 1 (0 is DEAD). */
static void determinize(Gram *g, Keys *k, Dfa *d, int32_t start, int32_t final, Py_ssize_t bound) {
    IVec *edges = &d->edges, *out = &d->out;
    for (Py_ssize_t s = 0; s < g->n_states; s++) { push(g, &k->reached, -1); push(g, &k->seen, 0); }
    int32_t empty = intern(g, k, NULL, 0, 0), first = reach(g, k, start, final);
    *id_of(g, k, d, empty) = 0;
    *id_of(g, k, d, first) = 1;
    push(g, &d->order, first);
    for (Py_ssize_t number = 1; number <= d->order.n; number++) {   /* order grows as it is read */
        moves_of(g, k, d->order.v[number - 1], final, edges, out);
        for (Py_ssize_t i = 0; i < out->n; i += 3) {
            int32_t *target = id_of(g, k, d, out->v[i + 2]);
            if (*target < 0) {
                if (d->order.n >= bound) longjmp(g->fail, DFA_NONE);
                *target = (int32_t)d->order.n + 1;
                push(g, &d->order, out->v[i + 2]);
            }
            if (*target) {
                push3(g, &d->moves, (int32_t)number, out->v[i], out->v[i + 1]);
                push(g, &d->moves, *target);
            }
        }
    }
}

/* ------------------------------------------------------------------ trimming and byte classes (_trimmed) */

/* (classed table bytes, class count, byte class bytes, accepting bytes, transitions
 * bytes, cells bytes) of the DFA, its states that reach no accepting state made DEAD
 * where `trim` says there may be some. The transitions (int32, 256 a state) spare numpy
 * a gather, the cells (gbnf_dfa._cells) its search for the table's non-DEAD cells. */
static PyObject *classed(Gram *g, Keys *k, Dfa *d) {
    Py_ssize_t count = d->order.n + 1, n_moves = d->moves.n / 4;
    IVec *live = &d->live, *number = &d->number, *pred_at = &d->pred_at, *preds = &d->preds, *stack = &d->stack;
    for (Py_ssize_t s = 0; s < count; s++) {
        push(g, live, s ? !g->trim || k->keys.v[3 * d->order.v[s - 1] + 2] : 0);
        push(g, pred_at, 0);
    }
    push(g, pred_at, 0);
    if (g->trim) {                 /* _live: back from the accepting states */
        for (Py_ssize_t i = 0; i < n_moves; i++) pred_at->v[d->moves.v[4 * i + 3] + 1]++;
        for (Py_ssize_t s = 0; s < count; s++) pred_at->v[s + 1] += pred_at->v[s];
        for (Py_ssize_t i = 0; i < n_moves; i++) push(g, preds, 0);
        for (Py_ssize_t i = 0; i < n_moves; i++) preds->v[pred_at->v[d->moves.v[4 * i + 3]]++] = d->moves.v[4 * i];
        for (Py_ssize_t s = count; s > 0; s--) pred_at->v[s] = pred_at->v[s - 1];
        pred_at->v[0] = 0;
        for (Py_ssize_t s = 0; s < count; s++) if (live->v[s]) push(g, stack, (int32_t)s);
        while (stack->n) {
            int32_t s = stack->v[--stack->n];
            for (int32_t i = pred_at->v[s]; i < pred_at->v[s + 1]; i++)
                if (!live->v[preds->v[i]]) { live->v[preds->v[i]] = 1; push(g, stack, preds->v[i]); }
        }
    }
    if (!live->v[1]) return Py_NewRef(Py_None);       /* an empty language */
    int32_t kept = 0;
    for (Py_ssize_t s = 0; s < count; s++) push(g, number, live->v[s] ? ++kept : 0);
    uint8_t cut[257] = {0};
    cut[0] = cut[256] = 1;
    for (Py_ssize_t i = 0; i < n_moves; i++) {
        int32_t *m = d->moves.v + 4 * i;
        if (live->v[m[0]] && live->v[m[3]]) cut[m[1]] = cut[m[2] + 1] = 1;
    }
    int piece_of[256], n_pieces = 0;        /* pieces: the byte runs between cuts */
    for (int c = 0; c < 256; c++) piece_of[c] = n_pieces += c && cut[c];
    n_pieces++;
    Py_ssize_t rows = kept + 1;
    PyObject *transitions = PyBytes_FromStringAndSize(NULL, rows * 256 * (Py_ssize_t)sizeof(int32_t));
    uint16_t *pieces = malloc(sizeof *pieces * (size_t)(rows * n_pieces));   /* the table by pieces */
    if (!transitions || !pieces) { Py_XDECREF(transitions); free(pieces); return PyErr_NoMemory(); }
    int32_t *all = (int32_t *)PyBytes_AS_STRING(transitions);
    uint64_t hashes[256] = {0};    /* per piece, of its column's non-DEAD cells */
    /* row by row (the moves come by source, as the rows do; row 0 is DEAD): its moves
     * written over zeros, by bytes and by pieces */
    for (Py_ssize_t s = 0, i = 0; s < count; s++) {
        int32_t r = number->v[s], *out = all + 256 * (Py_ssize_t)r, kept_row = !s || live->v[s];
        uint16_t *piece_row = pieces + (Py_ssize_t)r * n_pieces;
        if (kept_row) {
            memset(out, 0, 256 * sizeof *out);
            memset(piece_row, 0, (size_t)n_pieces * sizeof *piece_row);
        }
        for (; i < n_moves && d->moves.v[4 * i] == s; i++) {
            int32_t *m = d->moves.v + 4 * i, to = number->v[m[3]];
            if (!kept_row || !live->v[m[3]]) continue;
            for (int c = m[1]; c <= m[2]; c++) out[c] = to;
            for (int p = piece_of[m[1]]; p <= piece_of[m[2]]; p++) {
                piece_row[p] = (uint16_t)to;
                hashes[p] += ((uint64_t)r << 32 | (uint32_t)to) * 0x9E3779B97F4A7C15ull;
            }
        }
    }
    int piece_class[256], first_piece[256], n_classes = 0;
    for (int p = 0; p < n_pieces; p++) {      /* _equal_columns: by first appearance */
        int c = 0;
        for (; c < n_classes; c++) {
            int q = first_piece[c];
            if (hashes[q] != hashes[p]) continue;
            Py_ssize_t r = 0;
            while (r < rows && pieces[r * n_pieces + q] == pieces[r * n_pieces + p]) r++;
            if (r == rows) break;
        }
        if (c == n_classes) first_piece[n_classes++] = p;
        piece_class[p] = c;
    }
    Py_ssize_t most = rows * n_classes;     /* cells, at most */
    PyObject *table = PyBytes_FromStringAndSize(NULL, most * (Py_ssize_t)sizeof(int32_t));
    PyObject *byte_class = PyBytes_FromStringAndSize(NULL, 256);
    PyObject *accepting = PyBytes_FromStringAndSize(NULL, rows);
    PyObject *cells = PyBytes_FromStringAndSize(NULL, 2 * rows + 3 * most), *result = NULL;
    if (table && byte_class && accepting && cells) {
        /* the table, and its cells: per row their count (uint16), then the targets (uint16)
         * and classes (uint8); the classes first go to the end, the cells' count unknown */
        int32_t *t = (int32_t *)PyBytes_AS_STRING(table);
        uint8_t *per_row = (uint8_t *)PyBytes_AS_STRING(cells), *target = per_row + 2 * rows,
                *classes = target + 2 * most, *class = classes;
        for (Py_ssize_t r = 0; r < rows; r++) {
            uint8_t *first = class;
            for (int c = 0; c < n_classes; c++) {     /* without branches: cells come at random */
                uint16_t to = pieces[r * n_pieces + first_piece[c]];
                t[r * n_classes + c] = to;
                memcpy(target, &to, 2);
                *class = (uint8_t)c;
                target += 2 * (to != 0);
                class += to != 0;
            }
            memcpy(per_row + 2 * r, &(uint16_t){(uint16_t)(class - first)}, 2);
        }
        Py_ssize_t n_cells = class - classes;
        memmove(per_row + 2 * rows + 2 * n_cells, classes, (size_t)n_cells);
        if (_PyBytes_Resize(&cells, 2 * rows + 3 * n_cells) < 0) cells = NULL;
    }
    if (table && byte_class && accepting && cells) {
        for (int c = 0; c < 256; c++) PyBytes_AS_STRING(byte_class)[c] = (char)piece_class[piece_of[c]];
        char *flags = PyBytes_AS_STRING(accepting);
        flags[0] = 0;
        for (Py_ssize_t s = 1; s < count; s++)
            if (live->v[s]) flags[number->v[s]] = (char)k->keys.v[3 * d->order.v[s - 1] + 2];
        result = Py_BuildValue("(OiOOOO)", table, n_classes, byte_class, accepting, transitions, cells);
    }
    free(pieces);
    Py_XDECREF(cells);
    Py_XDECREF(transitions);
    Py_XDECREF(table);
    Py_XDECREF(byte_class);
    Py_XDECREF(accepting);
    return result;
}

/* ------------------------------------------------------------------ entry */

typedef struct { Gram g; Keys k; Dfa d; } Build;

static void free_build(Build *b) {
    IVec *vecs[] = {&b->g.bytes, &b->g.ints, &b->g.kids, &b->g.refs, &b->g.scratch, &b->g.automata,
                    &b->k.members, &b->k.keys, &b->k.table, &b->k.reached, &b->k.seen, &b->k.stack,
                    &b->k.found, &b->k.merged, &b->d.order, &b->d.ids, &b->d.moves, &b->d.edges,
                    &b->d.out, &b->d.live, &b->d.number, &b->d.pred_at, &b->d.preds, &b->d.stack};
    for (size_t i = 0; i < sizeof vecs / sizeof *vecs; i++) free(vecs[i]->v);
    for (Py_ssize_t r = 0; r < b->g.n_rules; r++) { free(b->g.rules[r].moves.v); free(b->g.rules[r].moves_eps.v); }
    while (b->g.chunks) {
        Chunk *next = b->g.chunks->next;
        free(b->g.chunks);
        b->g.chunks = next;
    }
    free(b->g.nodes);
    free(b->g.rules);
    free(b->g.names);
    free(b->g.states);
    free(b);
}

/* Parse and check the grammar, build its NFA and DFA: the classed DFA, or None. */
static PyObject *build_dfa(Build *b, Py_ssize_t bound) {
    Gram *g = &b->g;
    space(g, 1);
    while (!AT_END(g)) rule(g);
    if (!g->n_rules) python_route(g);
    for (Py_ssize_t i = 0; i < g->refs.n; i++) {
        Node *n = &g->nodes[g->refs.v[i]];
        int32_t r = g->names[name_slot(g, g->text + n->a, n->b)];
        if (!r) python_route(g);                     /* used but never defined */
        n->a = r - 1;
    }
    int32_t root = g->names[name_slot(g, "root", 4)] - 1;
    if (root < 0) python_route(g);
    for (int32_t r = 0; r < g->n_rules; r++) check_rule(g, r);
    if (g->rules[root].height > g->max_depth) return Py_NewRef(Py_None);
    int32_t start = new_state(g), final = new_state(g);
    build_rule(g, root, start, final);
    determinize(g, &b->k, &b->d, start, final, bound);
    return classed(g, &b->k, &b->d);
}

/* grammar_dfa(text, bound, most_nfa_states, max_rules, max_depth, character_utf8) */
static PyObject *kernel_grammar_dfa(PyObject *self, PyObject *args) {
    PyObject *text, *character_utf8;
    Py_ssize_t bound, most_states;
    int max_rules, max_depth;
    if (!PyArg_ParseTuple(args, "UnniiO", &text, &bound, &most_states, &max_rules, &max_depth, &character_utf8))
        return NULL;
    Build *b = calloc(1, sizeof *b);
    if (!b) return PyErr_NoMemory();
    b->g.text = PyUnicode_AsUTF8AndSize(text, &b->g.len);
    if (!b->g.text) {              /* lone surrogates: the Python route reads them */
        PyErr_Clear();
        free(b);
        Py_RETURN_NOTIMPLEMENTED;
    }
    b->g.max_rules = max_rules;
    b->g.max_depth = max_depth;
    b->g.most_states = most_states;
    b->g.character_utf8 = character_utf8;
    PyObject *result;
    switch (setjmp(b->g.fail)) {
    case 0: result = build_dfa(b, bound); break;
    case DFA_NONE: result = Py_NewRef(Py_None); break;
    case DFA_PYTHON: result = Py_NewRef(Py_NotImplemented); break;
    default: result = NULL;
    }
    free_build(b);
    return result;
}
