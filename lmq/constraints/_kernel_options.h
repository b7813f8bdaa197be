/* A list of options as its minimal byte DFA, compiled: byte_dfa.options' automaton, cell
 * for cell (the cold compile of `X in [...]`: a Python loop per state there; here 12 µs
 * for 16 sentences of about 140 bytes, against 0.28 ms).
 *
 * The options' trie (words sorted, so a node's children come in byte order and every
 * node after its parent), its nodes merged from the leaves up, two being equal when both
 * accept alike and have the same (byte, merged child) edges: for an acyclic automaton
 * that is minimization. The merged nodes are numbered breadth-first from the root in
 * byte order (1 on; 0 is DEAD) and the bytes classed by their columns as byte_dfa does.
 * Anything past the trie's bound goes back to Python, which names the error. */

typedef struct {
    int32_t first, last, next;     /* first and last child, next sibling (-1: none) */
    int32_t merged;                /* its merged node (the class of equal languages) */
    uint8_t byte, accepting;       /* the byte of the edge into it; whether a word ends here */
} TrieNode;

typedef struct {
    TrieNode *nodes;
    int32_t n_nodes;
    int32_t *slots;                /* open addressing: a merged node's representative + 1 */
    uint32_t *hashes;              /* per node, of its signature */
    int32_t mask;
} Trie;

/* The node's signature: whether it accepts and its (byte, merged child) edges. */
static uint32_t signature_hash(const Trie *t, int32_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ t->nodes[n].accepting;
    for (int32_t c = t->nodes[n].first; c >= 0; c = t->nodes[c].next)
        h = (h ^ ((uint64_t)t->nodes[c].byte << 32 | (uint32_t)t->nodes[c].merged)) * 0xFF51AFD7ED558CCDull;
    return (uint32_t)(h ^ h >> 29);
}

static int same_signature(const Trie *t, int32_t a, int32_t b) {
    if (t->nodes[a].accepting != t->nodes[b].accepting) return 0;
    int32_t x = t->nodes[a].first, y = t->nodes[b].first;
    for (; x >= 0 && y >= 0; x = t->nodes[x].next, y = t->nodes[y].next)
        if (t->nodes[x].byte != t->nodes[y].byte || t->nodes[x].merged != t->nodes[y].merged) return 0;
    return x < 0 && y < 0;
}

/* The merged node of node n (its children merged already): an equal one's, else n's own,
 * numbered by its representative. */
static int32_t merge(Trie *t, int32_t n) {
    uint32_t h = t->hashes[n] = signature_hash(t, n);
    for (int32_t i = (int32_t)(h & (uint32_t)t->mask);; i = (i + 1) & t->mask) {
        int32_t r = t->slots[i] - 1;
        if (r < 0) {
            t->slots[i] = n + 1;
            return n;
        }
        if (t->hashes[r] == h && same_signature(t, r, n)) return r;
    }
}

/* The trie of sorted distinct `words` (n of them), or -1 when it would pass `most` nodes:
 * each word's prefix in common with the one before is measured once, first to count the
 * nodes (byte_dfa._radix_tree's count), then to branch there. */
static int32_t build_trie(Trie *t, PyObject *const *words, Py_ssize_t n, Py_ssize_t most) {
    Py_ssize_t *common = malloc(sizeof *common * (size_t)n), total = 1, longest = 0;
    if (!common) return -2;
    for (Py_ssize_t w = 0; w < n; w++) {
        const char *s = PyBytes_AS_STRING(words[w]), *p = w ? PyBytes_AS_STRING(words[w - 1]) : "";
        Py_ssize_t len = PyBytes_GET_SIZE(words[w]), p_len = w ? PyBytes_GET_SIZE(words[w - 1]) : 0, c = 0;
        while (c < len && c < p_len && s[c] == p[c]) c++;
        common[w] = c;
        total += len - c;
        if (total > most) { free(common); return -1; }
        if (len > longest) longest = len;
    }
    t->nodes = malloc(sizeof *t->nodes * (size_t)total);
    int32_t *path = malloc(sizeof *path * (size_t)(longest + 1));
    if (!t->nodes || !path) { free(path); free(common); return -2; }
    t->nodes[0] = (TrieNode){-1, -1, -1, 0, 0, 0};
    t->n_nodes = 1;
    path[0] = 0;
    for (Py_ssize_t w = 0; w < n; w++) {
        const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(words[w]);
        Py_ssize_t len = PyBytes_GET_SIZE(words[w]);
        for (Py_ssize_t d = common[w]; d < len; d++) {   /* the new branch, children last */
            int32_t parent = path[d], child = t->n_nodes++;
            t->nodes[child] = (TrieNode){-1, -1, -1, 0, s[d], 0};
            if (t->nodes[parent].last >= 0) t->nodes[t->nodes[parent].last].next = child;
            else t->nodes[parent].first = child;
            t->nodes[parent].last = child;
            path[d + 1] = child;
        }
        t->nodes[path[len]].accepting = 1;
    }
    free(path);
    free(common);
    return 0;
}

/* options_dfa(words, most_trie_nodes) -> (table, classes, byte_class, accepting), or
 * NotImplemented past the bound; `words` sorted and distinct (a list of bytes, at least
 * one); byte_class in int32s (257 classes when all 256 bytes act apart). */
static PyObject *kernel_options_dfa(PyObject *self, PyObject *args) {
    PyObject *list;
    Py_ssize_t most;
    if (!PyArg_ParseTuple(args, "O!n", &PyList_Type, &list, &most)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(list);
    for (Py_ssize_t w = 0; w < n; w++)
        if (!PyBytes_Check(PyList_GET_ITEM(list, w))) return PyErr_Format(PyExc_TypeError, "options must be bytes");
    Trie t = {0};
    int built = build_trie(&t, PySequence_Fast_ITEMS(list), n, most);
    if (built == -1) Py_RETURN_NOTIMPLEMENTED;
    int32_t size = 1;
    while (size < 2 * t.n_nodes) size *= 2;
    t.mask = size - 1;
    t.slots = calloc((size_t)size, sizeof *t.slots);
    t.hashes = malloc(sizeof *t.hashes * (size_t)t.n_nodes);
    /* per merged node in breadth-first order: its representative; per representative: its number */
    int32_t *order = malloc(sizeof *order * (size_t)t.n_nodes), *number = calloc((size_t)t.n_nodes, sizeof *number);
    /* the moves (source number, byte, target number), by source; then per byte, in order */
    int32_t *moves = malloc(sizeof *moves * 3 * (size_t)t.n_nodes);
    int32_t *by_byte = malloc(sizeof *by_byte * (size_t)t.n_nodes), start[257] = {0};
    PyObject *result = NULL;
    if (built < 0 || !t.slots || !t.hashes || !order || !number || !moves || !by_byte) {
        PyErr_NoMemory();
        goto done;
    }
    for (int32_t v = t.n_nodes - 1; v >= 0; v--) t.nodes[v].merged = merge(&t, v);   /* children first */
    int32_t count = 0, n_moves = 0;
    order[count++] = t.nodes[0].merged;
    number[t.nodes[0].merged] = 1;
    for (int32_t i = 0; i < count; i++) {                    /* `order` grows as it is read */
        for (int32_t c = t.nodes[order[i]].first; c >= 0; c = t.nodes[c].next) {
            int32_t target = t.nodes[c].merged;
            if (!number[target]) {
                order[count++] = target;
                number[target] = count;
            }
            int32_t *m = moves + 3 * n_moves++;
            m[0] = i + 1;
            m[1] = t.nodes[c].byte;
            m[2] = number[target];
        }
    }
    for (int32_t i = 0; i < n_moves; i++) start[moves[3 * i + 1] + 1]++;
    for (int b = 0; b < 256; b++) start[b + 1] += start[b];
    int32_t fill[256];
    memcpy(fill, start, sizeof fill);
    for (int32_t i = 0; i < n_moves; i++) by_byte[fill[moves[3 * i + 1]]++] = i;
    /* classes by first appearance in byte order, 0 for the bytes no state reads: bytes
     * with the same (source, target) moves act alike */
    int32_t byte_class[256] = {0};
    int first_byte[257], n_classes = 1;
    for (int b = 0; b < 256; b++) {
        if (start[b] == start[b + 1]) continue;
        int c = 1;
        for (; c < n_classes; c++) {
            int a = first_byte[c];
            int32_t k = start[b + 1] - start[b];
            if (start[a + 1] - start[a] != k) continue;
            int32_t j = 0;
            for (; j < k; j++) {
                const int32_t *x = moves + 3 * by_byte[start[a] + j], *y = moves + 3 * by_byte[start[b] + j];
                if (x[0] != y[0] || x[2] != y[2]) break;
            }
            if (j == k) break;
        }
        if (c == n_classes) first_byte[n_classes++] = b;
        byte_class[b] = c;
    }
    Py_ssize_t rows = (Py_ssize_t)count + 1;
    PyObject *table = PyBytes_FromStringAndSize(NULL, rows * n_classes * (Py_ssize_t)sizeof(int32_t));
    PyObject *classes = PyBytes_FromStringAndSize(NULL, sizeof byte_class), *accepting = PyBytes_FromStringAndSize(NULL, rows);
    if (table && classes && accepting) {
        int32_t *cells = (int32_t *)PyBytes_AS_STRING(table);
        memset(cells, 0, (size_t)(rows * n_classes) * sizeof *cells);
        for (int32_t i = 0; i < n_moves; i++)
            cells[(Py_ssize_t)moves[3 * i] * n_classes + byte_class[moves[3 * i + 1]]] = moves[3 * i + 2];
        memcpy(PyBytes_AS_STRING(classes), byte_class, sizeof byte_class);
        char *flags = PyBytes_AS_STRING(accepting);
        flags[0] = 0;
        for (int32_t i = 0; i < count; i++) flags[i + 1] = (char)t.nodes[order[i]].accepting;
        result = Py_BuildValue("(OiOO)", table, n_classes, classes, accepting);
    }
    Py_XDECREF(table);
    Py_XDECREF(classes);
    Py_XDECREF(accepting);
done:
    free(t.nodes);
    free(t.slots);
    free(t.hashes);
    free(order);
    free(number);
    free(moves);
    free(by_byte);
    return result;
}
