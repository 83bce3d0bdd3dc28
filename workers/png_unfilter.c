/* Undoes PNG row filters (8-bit RGB or RGBA) on several threads at once: a wavefront, or bands.
 *
 * Why: a row filtered with Up, Average or Paeth reads the row above, unfiltered, so libpng undoes
 * the filters one row after another on one thread, and workers/png_inflate.py could only cut the
 * image where the encoder happened to choose None or Sub. But a pixel reads only the pixels above
 * it, above-left of it and left of it: row r can run as soon as row r-1 is done up to the same
 * column. Here each thread takes the next row, and before each segment of it waits (spinning) until
 * the row above has got that far, so the threads run down the image a segment apart. Where the
 * encoder chose None or Sub often enough, the rows are taken in bands between such rows instead,
 * which never wait: a row filtered with Up is done at memory speed, and handing a segment over
 * between threads costs about as much.
 *
 * Called from Python (workers/png_unfilter.py), without the GIL, by every thread that helps with
 * one image, all with the same arguments. A thread takes runs of rows, in order, until none are
 * left, so the call is correct with any number of threads, one included, a helper that starts late
 * finds nothing left to do, and no thread waits on a row that no running thread holds.
 *
 * Built against Python's stable ABI (setup.py), so one build serves every Python from 3.11 on.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>   /* first, as Python asks */
#include <sched.h>
#include <stdint.h>
#include <string.h>

#define SEGMENT_PIXELS 128   /* per wait: whole pixels, so a segment never ends inside one */
#define SPINS 256            /* pause instructions before yielding the core while waiting */
/* bpp a constant in each copy, so that a pixel's loads and stores are single instructions */
#define INLINE static inline __attribute__((always_inline))

static inline int32_t load_acquire(const int32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void store_release(int32_t *p, int32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

static inline void pause_briefly(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Waits until *done >= need, or until another thread has failed; returns *done, or -1. */
static int32_t wait_for(const int32_t *done, int32_t need, const int32_t *failed) {
    unsigned spins = 0;
    int32_t have;
    while ((have = load_acquire(done)) < need) {
        if (load_acquire(failed))
            return -1;
        if (++spins < SPINS)
            pause_briefly();
        else
            sched_yield();   /* the thread we wait for may have lost its core */
    }
    return have;
}

/* A pixel's channels as 16-bit lanes (the first 3 or 4 of 8), in the compiler's portable vector
 * types: SSE2 on x86-64, NEON on arm64, with one source. */
typedef int16_t lanes __attribute__((vector_size(16)));
typedef uint8_t bytes8 __attribute__((vector_size(8)));

/* With `wide`, a 3-byte pixel is read with a 4-byte load and masked: the caller knows that a byte
 * follows it in the row. (A 3-byte copy through memory makes the load wait on narrower stores: RGB
 * Paeth rows took 4x as long as RGBA ones.) */
INLINE lanes pixel(const uint8_t *p, int bpp, int wide) {
    uint32_t v;
    if (bpp == 4 || wide) {
        memcpy(&v, p, 4);
        if (bpp == 3)
            v &= 0xffffffu;
    } else {
        v = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16;
    }
    bytes8 b = {0};
    memcpy(&b, &v, 4);
    return __builtin_convertvector(b, lanes);
}

INLINE lanes abs_lanes(lanes x) {
    lanes sign = x >> 15;
    return (x ^ sign) - sign;
}

/* Average (3) or Paeth (4) over bytes [a, b), a >= bpp: all of a pixel's channels at once, as
 * libpng's SIMD code does (a byte at a time, the chain from one pixel to the next is bpp times as
 * long: Paeth 3.5x slower). Sub stays a byte loop, which compilers vectorize well enough. */
INLINE void pixels_run(int type, const uint8_t *f, uint8_t *o, const uint8_t *up,
                       int64_t a, int64_t b, int bpp) {
    lanes left = pixel(o + a - bpp, bpp, 0), upleft = pixel(up + a - bpp, bpp, 0);
    for (int64_t i = a; i < b; i += bpp) {
        int wide = i + bpp < b;   /* not the segment's last pixel */
        lanes above = pixel(up + i, bpp, wide), pred;
        if (type == 3) {
            pred = (left + above) >> 1;
        } else {
            lanes pa = above - upleft, pb = left - upleft;
            lanes pc = abs_lanes(pa + pb);
            pa = abs_lanes(pa);
            pb = abs_lanes(pb);
            lanes not_a = (pa > pb) | (pa > pc);   /* lanes of all ones where true */
            lanes take_c = pb > pc;
            lanes b_or_c = (take_c & upleft) | (~take_c & above);
            pred = (not_a & b_or_c) | (~not_a & left);
        }
        lanes x = (pixel(f + i, bpp, wide) + pred) & 0xff;
        bytes8 out = __builtin_convertvector(x, bytes8);
        if (bpp == 4 || wide) {
            memcpy(o + i, &out, 4);   /* a 3-byte pixel's fourth byte is the next one's, written next */
        } else {
            o[i] = out[0];
            o[i + 1] = out[1];
            o[i + 2] = out[2];
        }
        left = x;
        upleft = above;
    }
}

/* Bytes [a, b) of one row: f its filtered bytes (after the filter type), o its output, up the
 * row above's output or NULL for the first row (which the filters read as zeros). */
INLINE void unfilter(int type, const uint8_t *f, uint8_t *o, const uint8_t *up,
                     int64_t a, int64_t b, const int bpp) {
    if (type == 0 || (type == 2 && !up)) {   /* None; Up on the first row */
        memcpy(o + a, f + a, (size_t)(b - a));
        return;
    }
    if (type == 2) {
        for (int64_t i = a; i < b; i++)
            o[i] = (uint8_t)(f[i] + up[i]);
        return;
    }
    if (!up && type >= 3)   /* a row of zeros above: Average adds half the left pixel, Paeth all of it */
        type = type == 4 ? 1 : 5;
    int64_t i = a;
    for (; i < b && i < bpp; i++)   /* the first pixel, whose left is zeros */
        o[i] = (uint8_t)(f[i] + (type == 1 || type == 5 ? 0 : type == 3 ? up[i] >> 1 : up[i]));
    if (i == b)
        return;
    if (type == 1)
        for (; i < b; i++)
            o[i] = (uint8_t)(f[i] + o[i - bpp]);
    else if (type == 3)
        pixels_run(3, f, o, up, i, b, bpp);
    else if (type == 4)
        pixels_run(4, f, o, up, i, b, bpp);
    else   /* 5: Average on the first row */
        for (; i < b; i++)
            o[i] = (uint8_t)(f[i] + (o[i - bpp] >> 1));
}

/* in: h rows of 1 + rowbytes bytes (filter type, filtered pixels), as inflated from the IDAT data;
 * out: h * rowbytes bytes; bpp: 3 or 4. The rows come in units of consecutive rows, ends[u] the row
 * after unit u (ascending, the last h): a thread takes the next unit and does its rows in order, so
 * only a unit's first row may wait, on the last row of the unit before, another thread's. Units of
 * one row make the wavefront; units cut where a row reads only itself (None, Sub) never wait.
 * done[h] (zeroed), next_unit and failed (zeroed) are shared by the threads of one image. Returns
 * 0, or -1 if a row's filter type is not 0-4 (rows after it are left unfinished) or bpp is not 3 or
 * 4. */
static int unfilter_rows(const uint8_t *in, uint8_t *out, int64_t h, int64_t rowbytes, int32_t bpp,
                         const int64_t *ends, int64_t units, int32_t *done, int64_t *next_unit,
                         int32_t *failed) {
    if (bpp != 3 && bpp != 4)
        return -1;
    const int64_t segment = (int64_t)SEGMENT_PIXELS * bpp;
    for (;;) {
        int64_t u = __atomic_fetch_add(next_unit, 1, __ATOMIC_RELAXED);
        if (u >= units)
            return load_acquire(failed) ? -1 : 0;
        int64_t first = u ? ends[u - 1] : 0, end = ends[u] < h ? ends[u] : h;
        for (int64_t r = first; r < end; r++) {
            const uint8_t *f = in + r * (rowbytes + 1);
            int type = *f++;
            uint8_t *o = out + r * rowbytes;
            const uint8_t *up = r ? o - rowbytes : NULL;
            if (type > 4) {
                store_release(failed, 1);
                return -1;
            }
            /* of the row above: all of it if this thread did it, or if this row does not read it */
            int32_t ready = (type <= 1 || !up || r > first) ? (int32_t)rowbytes : 0;
            int publish = r == end - 1;   /* only a unit's last row is read by another thread */
            for (int64_t a = 0; a < rowbytes;) {
                int64_t b = a + segment < rowbytes ? a + segment : rowbytes;
                if (ready < b && (ready = wait_for(&done[r - 1], (int32_t)b, failed)) < 0)
                    return -1;
                if (bpp == 3)
                    unfilter(type, f, o, up, a, b, 3);
                else
                    unfilter(type, f, o, up, a, b, 4);
                a = b;
                if (publish)
                    store_release(&done[r], (int32_t)a);
            }
        }
    }
}

/* unfilter_rows(rows, out, height, rowbytes, bpp, ends, done, shared) -> 0, or -1 (see above).
 * rows: the inflated image data; out: the pixels (writable); ends: int64 per unit; done: int32 per
 * row, zeroed; shared: 16 bytes, zeroed (the next unit to take as an int64, then whether a thread
 * failed as an int32), the same objects for every thread of one image. */
static PyObject *py_unfilter_rows(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer rows, out, ends, done, shared;
    long long h, rowbytes;
    int bpp, rc = -1;
    if (!PyArg_ParseTuple(args, "y*w*LLiy*w*w*", &rows, &out, &h, &rowbytes, &bpp, &ends, &done, &shared))
        return NULL;
    int64_t units = ends.len / (Py_ssize_t)sizeof(int64_t);
    int ok = h > 0 && rowbytes > 0 && rowbytes <= INT32_MAX && rows.len == h * (rowbytes + 1) &&
             out.len == h * rowbytes && units > 0 && ((const int64_t *)ends.buf)[units - 1] == h &&
             done.len >= h * (Py_ssize_t)sizeof(int32_t) && shared.len >= 16;
    for (int64_t u = 0; ok && u < units; u++) {   /* ascending, so every row is in one unit */
        int64_t e = ((const int64_t *)ends.buf)[u];
        ok = e > (u ? ((const int64_t *)ends.buf)[u - 1] : 0);
    }
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        rc = unfilter_rows(rows.buf, out.buf, h, rowbytes, bpp, ends.buf, units, done.buf,
                           (int64_t *)shared.buf, (int32_t *)((char *)shared.buf + 8));
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&rows);
    PyBuffer_Release(&out);
    PyBuffer_Release(&ends);
    PyBuffer_Release(&done);
    PyBuffer_Release(&shared);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes or row units do not match the image's shape");
        return NULL;
    }
    return PyLong_FromLong(rc);
}

static PyMethodDef methods[] = {
    {"unfilter_rows", py_unfilter_rows, METH_VARARGS,
     "Undo PNG row filters, as one of the threads working on one image (workers/png_unfilter.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_png_unfilter", NULL, 0, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__png_unfilter(void) { return PyModule_Create(&module); }
