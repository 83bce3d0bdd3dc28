/* GUI-Actor's regions (docs/gui-actor.md, section 5) of one attention map, in one pass of C: the
 * tokens above a fraction of the maximum, joined 4-connected into regions, each with its mean
 * score and score-weighted centre, the best first.
 *
 * Why C: workers/families/gui_actor.py's NumPy version makes ~40 NumPy calls. Back to back they
 * take 0.1-0.3 ms for a 1080p map, but a request's points are found right after a ~90 ms forward,
 * during which this thread slept, and then those calls take 0.5-0.9 ms (cold caches: the CI box and
 * the GPU hosts alike, bench/RESULTS.md, thirty-fifth session). One pass here touches a few KB
 * of code. The NumPy version stays as the fallback where this was not built, and as the test's
 * second opinion; both give the same regions, scores and points to the last bit:
 *   - the threshold is float32(float64(max) * ratio), as torch compares a float32 map with a
 *     Python float, and a token is selected when its score is strictly above it;
 *   - regions are numbered by their first token (row-major), as the reference's BFS seeds them;
 *   - sums are float64, added in ascending token order (np.bincount's order), each centre term
 *     ((column + 0.5) / n_w) * score as NumPy rounds it; setup.py compiles this file with
 *     -ffp-contract=off so that no compiler fuses a product into its sum;
 *   - the sort is by mean, descending, ties in region order (a stable sort).
 *
 * Built against Python's stable ABI (setup.py), as the PNG unfilterer is.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>   /* first, as Python asks */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    double total, sx, sy, mean;
    int64_t count, first_member;   /* first_member: where its tokens start in `sorted` */
    int64_t order;                 /* the region's number, for the stable sort's ties */
} region_t;

static int64_t find(int64_t *parent, int64_t i) {
    while (parent[i] != i) {
        parent[i] = parent[parent[i]];   /* halving: paths stay short */
        i = parent[i];
    }
    return i;
}

/* Joins two components under the smaller root, so that a root is its component's first token. */
static void join(int64_t *parent, int64_t a, int64_t b) {
    a = find(parent, a);
    b = find(parent, b);
    if (a < b)
        parent[b] = a;
    else if (b < a)
        parent[a] = b;
}

static int best_first(const void *x, const void *y) {
    const region_t *a = *(const region_t *const *)x, *b = *(const region_t *const *)y;
    if (a->mean != b->mean)
        return a->mean > b->mean ? -1 : 1;
    return (a->order > b->order) - (a->order < b->order);
}

/* The regions as a list of (mean, x, y, members) for the `first` best (all where first < 0);
 * None where the map holds a non-finite value. */
static PyObject *find_regions(const float *s, int64_t n_h, int64_t n_w, double ratio, int64_t first) {
    int64_t n = n_h * n_w;
    float top = s[0];
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(s[i]))
            Py_RETURN_NONE;
        if (s[i] > top)
            top = s[i];
    }
    float threshold = (float)((double)top * ratio);
    int64_t *parent = PyMem_Malloc((size_t)n * sizeof *parent);    /* union-find; -1: not selected */
    int64_t *region = PyMem_Malloc((size_t)n * sizeof *region);    /* a selected token's region */
    int64_t *sorted = PyMem_Malloc((size_t)n * sizeof *sorted);    /* tokens region by region */
    int64_t *filled = PyMem_Malloc((size_t)n * sizeof *filled);
    region_t *regions = PyMem_Malloc((size_t)n * sizeof *regions);
    region_t **ranked = PyMem_Malloc((size_t)n * sizeof *ranked);
    PyObject *out = NULL;
    if (!parent || !region || !sorted || !filled || !regions || !ranked) {
        PyErr_NoMemory();
        goto done;
    }
    for (int64_t i = 0; i < n; i++) {
        parent[i] = s[i] > threshold ? i : -1;
        if (parent[i] < 0)
            continue;
        if (i % n_w && parent[i - 1] >= 0)
            join(parent, i - 1, i);
        if (i >= n_w && parent[i - n_w] >= 0)
            join(parent, i - n_w, i);
    }
    /* In ascending token order a region's root (its first token) comes before its other tokens:
     * it is numbered when met, and every later token finds its root's number. */
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++) {
        if (parent[i] < 0)
            continue;
        int64_t root = find(parent, i), k;
        if (root == i) {
            k = count++;
            regions[k] = (region_t){.order = k};
        } else {
            k = region[root];
        }
        region[i] = k;
        double w = (double)s[i];
        regions[k].count++;
        regions[k].total += w;
        regions[k].sx += ((double)(i % n_w) + 0.5) / (double)n_w * w;
        regions[k].sy += ((double)(i / n_w) + 0.5) / (double)n_h * w;
    }
    int64_t offset = 0;
    for (int64_t k = 0; k < count; k++) {
        regions[k].mean = regions[k].total / (double)regions[k].count;
        regions[k].first_member = filled[k] = offset;
        offset += regions[k].count;
        ranked[k] = &regions[k];
    }
    for (int64_t i = 0; i < n; i++)   /* a counting sort: ascending within each region */
        if (parent[i] >= 0)
            sorted[filled[region[i]]++] = i;
    qsort(ranked, (size_t)count, sizeof *ranked, best_first);
    int64_t keep = first < 0 || first > count ? count : first;
    out = PyList_New(keep);
    for (int64_t r = 0; out && r < keep; r++) {
        const region_t *g = ranked[r];
        PyObject *tokens = PyTuple_New(g->count);
        for (int64_t j = 0; tokens && j < g->count; j++) {
            PyObject *t = PyLong_FromLongLong(sorted[g->first_member + j]);
            if (!t || PyTuple_SetItem(tokens, j, t) < 0)
                Py_CLEAR(tokens);
        }
        PyObject *item = tokens ? Py_BuildValue("(dddN)", g->mean, g->sx / g->total, g->sy / g->total, tokens)
                                : NULL;
        if (!item || PyList_SetItem(out, r, item) < 0)
            Py_CLEAR(out);
    }
done:
    PyMem_Free(parent);
    PyMem_Free(region);
    PyMem_Free(sorted);
    PyMem_Free(filled);
    PyMem_Free(regions);
    PyMem_Free(ranked);
    return out;
}

static PyObject *py_regions(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer map;
    long long n_h, n_w, first;
    double ratio;
    if (!PyArg_ParseTuple(args, "y*LLdL", &map, &n_h, &n_w, &ratio, &first))
        return NULL;
    PyObject *out = NULL;
    if (n_h < 1 || n_w < 1 || n_h > map.len / (Py_ssize_t)sizeof(float) / n_w
        || (Py_ssize_t)(n_h * n_w * (long long)sizeof(float)) != map.len)
        PyErr_Format(PyExc_ValueError, "scores has %zd bytes, grid is %lldx%lld float32", map.len, n_h, n_w);
    else
        out = find_regions((const float *)map.buf, n_h, n_w, ratio, first);
    PyBuffer_Release(&map);
    return out;
}

static PyMethodDef methods[] = {
    {"regions", py_regions, METH_VARARGS,
     "regions(scores: float32 buffer, n_h, n_w, ratio, first) -> [(mean, x, y, members)], best first; "
     "None if a score is not finite (first < 0: all)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_regions", NULL, 0, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__regions(void) { return PyModule_Create(&module); }
