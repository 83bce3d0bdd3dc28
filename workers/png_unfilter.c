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
 * The calling thread may also inflate the image data itself (inflate_unfilter), a part at a time,
 * handing the rows out in units as they come: then the threads undo the filters while the data is
 * still inflating, instead of after it. The inflater is zlib-ng's, as imagecodecs built it (bound
 * by bind_zlibng from imagecodecs' own extension module, which exports it), a chunk at a time; or
 * libdeflate's (bind_libdeflate), faster alone but with no streaming interface, given a run of the
 * stream's blocks at a time as a stream of its own (deflate_blocks.h), while the other threads
 * first search ahead for where the runs begin (find_blocks).
 *
 * A thread that waits for another spins a while, then sleeps until a thread reports progress. It
 * never calls sched_yield: on Linux's EEVDF scheduler (6.6 on) that hands the core to whatever else
 * is runnable there, a nice 19 or SCHED_IDLE process included, for a whole tick (4 ms at 250 Hz),
 * and a 1.5 ms decode took 4.0 ms beside such processes (bench/RESULTS.md, nineteenth session).
 *
 * Built against Python's stable ABI (setup.py), so one build serves every Python from 3.11 on.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>   /* first, as Python asks */
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#if !defined(_WIN32)
#include <dlfcn.h>
#endif
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include "spin_wait.h"
#include "deflate_blocks.h"

#define SEGMENT_PIXELS 128   /* per wait: whole pixels, so a segment never ends inside one */
#define SPIN_NS 50000        /* a wait spins this long before it sleeps (most waits here are shorter,
                                and a sleeping thread's wake-up costs 10-100 us on a VM's idle core) */
#define NAP_NS 1000000       /* a sleep's longest: progress reported from Python wakes no one */
/* bpp a constant in each copy, so that a pixel's loads and stores are single instructions */
#define INLINE static inline __attribute__((always_inline))

static inline int64_t load_acquire64(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

/* What the threads of one image share (`shared`, 40 bytes, zeroed by the caller but for
 * `published` and `sealed` where the units are all known at the start). */
typedef struct {
    int64_t next_unit;   /* the next unit a thread takes */
    int64_t published;   /* units whose rows are inflated and whose end is known */
    int64_t failed;      /* a row had a bad filter type, or the data did not inflate */
    int64_t sealed;      /* no more units will be published */
    int32_t progress;    /* bumped to wake sleeping threads (a futex word) */
    int32_t sleepers;    /* threads asleep, or about to check once more and sleep */
} shared_state;

/* Progress that another thread may wait for is stored sequentially consistent, and then the
 * sleepers are counted: a waiter counts itself in before it checks a last time, so either it sees
 * the store or the store's thread sees it and wakes it (report_progress, NAP). */
static inline void store_progress(int32_t *p, int32_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline void store_progress64(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }

static void report_progress(shared_state *st) {
    if (!__atomic_load_n(&st->sleepers, __ATOMIC_SEQ_CST))
        return;
    __atomic_fetch_add(&st->progress, 1, __ATOMIC_SEQ_CST);
#if defined(__linux__)
    syscall(SYS_futex, &st->progress, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
#endif
}

/* One wait for another thread: `spins` pauses so far, `since` when the clock was first read. */
typedef struct {
    unsigned spins;
    int64_t since;
} patience;

/* Pauses once and returns 0 while the wait is young; 1 once it has spun SPIN_NS: then sleep. */
static int spun_out(patience *p) {
    if (++p->spins % 64 == 0) {   /* the clock every 64 pauses: a pause takes 10-140 cycles */
        int64_t t = now_ns();
        if (!p->since)
            p->since = t;
        else if (t - p->since >= SPIN_NS)
            return 1;
    }
    pause_briefly();
    return 0;
}

/* The sleep of a wait that has spun out: count in, then check `ready` once more; asleep until a
 * thread reports progress, or NAP_NS. Elsewhere than Linux, a yield of the core instead. */
#define NAP(st, ready)                                                                       \
    do {                                                                                      \
        int32_t seen_ = __atomic_load_n(&(st)->progress, __ATOMIC_SEQ_CST);                   \
        __atomic_fetch_add(&(st)->sleepers, 1, __ATOMIC_SEQ_CST);                             \
        if (!(ready))                                                                         \
            sleep_on(st, seen_);                                                              \
        __atomic_fetch_sub(&(st)->sleepers, 1, __ATOMIC_SEQ_CST);                             \
    } while (0)

static void sleep_on(shared_state *st, int32_t seen) {
#if defined(__linux__)
    struct timespec most = {0, NAP_NS};
    syscall(SYS_futex, &st->progress, FUTEX_WAIT_PRIVATE, seen, &most, NULL, 0);
#else
    (void)st;
    (void)seen;
    sched_yield();
#endif
}

/* Waits until *done >= need, or until another thread has failed; returns *done, or -1. */
static int32_t wait_for(const int32_t *done, int32_t need, shared_state *st) {
    patience p = {0, 0};
    int32_t have;
    while ((have = __atomic_load_n(done, __ATOMIC_SEQ_CST)) < need) {
        if (load_acquire64(&st->failed))
            return -1;
        if (spun_out(&p))
            NAP(st, __atomic_load_n(done, __ATOMIC_SEQ_CST) >= need ||
                    __atomic_load_n(&st->failed, __ATOMIC_SEQ_CST));
    }
    return have;
}

/* Waits until unit u is published: 1; 0 when no unit u will come (all taken), -1 on a failure. */
static int wait_for_unit(shared_state *st, int64_t u) {
    patience p = {0, 0};
    while (u >= __atomic_load_n(&st->published, __ATOMIC_SEQ_CST)) {
        if (load_acquire64(&st->failed))
            return -1;
        if (load_acquire64(&st->sealed) && u >= load_acquire64(&st->published))
            return 0;
        if (spun_out(&p))
            NAP(st, u < __atomic_load_n(&st->published, __ATOMIC_SEQ_CST) ||
                    __atomic_load_n(&st->failed, __ATOMIC_SEQ_CST) ||
                    __atomic_load_n(&st->sealed, __ATOMIC_SEQ_CST));
    }
    return 1;
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

/* Average's (3) or Paeth's (4) prediction of a pixel from its left, above and upper-left ones. */
INLINE lanes predict(int type, lanes left, lanes above, lanes upleft) {
    if (type == 3)
        return (left + above) >> 1;
    lanes pa = above - upleft, pb = left - upleft;
    lanes pc = abs_lanes(pa + pb);
    pa = abs_lanes(pa);
    pb = abs_lanes(pb);
    lanes not_a = (pa > pb) | (pa > pc);   /* lanes of all ones where true */
    lanes take_c = pb > pc;
    lanes b_or_c = (take_c & upleft) | (~take_c & above);
    return (not_a & b_or_c) | (~not_a & left);
}

/* Stores pixel x at o; with `wide` as pixel() takes it. */
INLINE void put(uint8_t *o, lanes x, int bpp, int wide) {
    bytes8 out = __builtin_convertvector(x, bytes8);
    if (bpp == 4 || wide) {
        memcpy(o, &out, 4);   /* a 3-byte pixel's fourth byte is the next one's, written next */
    } else {
        o[0] = out[0];
        o[1] = out[1];
        o[2] = out[2];
    }
}

/* Average (3) or Paeth (4) over bytes [a, b), a >= bpp: all of a pixel's channels at once, as
 * libpng's SIMD code does (a byte at a time, the chain from one pixel to the next is bpp times as
 * long: Paeth 3.5x slower). Sub stays a byte loop, which compilers vectorize well enough. */
INLINE void pixels_run(int type, const uint8_t *f, uint8_t *o, const uint8_t *up,
                       int64_t a, int64_t b, int bpp) {
    lanes left = pixel(o + a - bpp, bpp, 0), upleft = pixel(up + a - bpp, bpp, 0);
    for (int64_t i = a; i < b; i += bpp) {
        int wide = i + bpp < b;   /* not the segment's last pixel */
        lanes above = pixel(up + i, bpp, wide);
        lanes x = (pixel(f + i, bpp, wide) + predict(type, left, above, upleft)) & 0xff;
        put(o + i, x, bpp, wide);
        left = x;
        upleft = above;
    }
}

/* Two whole rows filtered alike with Average or Paeth, the second (f1, o1) right below the first
 * (f0, o0; up: the row above it, done). Each pixel's prediction waits for the pixel to its left,
 * so one row is a chain of dependent steps; here the second row's pixel follows the first's, its
 * above and upper-left taken from registers, and the processor overlaps the two chains (on the CI
 * box: rows of Paeth 1.33x as fast, of Average 1.32x; three or four rows at once, no faster). */
INLINE void pixels_pair(int type, const uint8_t *f0, uint8_t *o0, const uint8_t *f1, uint8_t *o1,
                        const uint8_t *up, int64_t rowbytes, int bpp) {
    lanes zero = {0}, left0 = zero, upleft0 = zero, left1 = zero, upleft1 = zero;
    for (int64_t i = 0; i < rowbytes; i += bpp) {   /* left of the first pixel: zeros, as PNG says */
        int wide = i + bpp < rowbytes;
        lanes above0 = pixel(up + i, bpp, wide);
        lanes x0 = (pixel(f0 + i, bpp, wide) + predict(type, left0, above0, upleft0)) & 0xff;
        lanes x1 = (pixel(f1 + i, bpp, wide) + predict(type, left1, x0, upleft1)) & 0xff;
        put(o0 + i, x0, bpp, wide);
        put(o1 + i, x1, bpp, wide);
        left0 = x0;
        upleft0 = above0;
        left1 = x1;
        upleft1 = x0;
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
 * after unit u (ascending, the last h), published as they become known (st->published; all at once
 * where the data was inflated before): a thread takes the next unit and does its rows in order, so
 * only a unit's first row may wait, on the last row of the unit before, another thread's. Units of
 * one row make the wavefront; units cut where a row reads only itself (None, Sub) never wait.
 * done[h] (zeroed) and st are shared by the threads of one image. Returns 0, or -1 if a row's
 * filter type is not 0-4 (rows after it are left unfinished), bpp is not 3 or 4, or the data failed
 * to inflate. */
static int unfilter_rows(const uint8_t *in, uint8_t *out, int64_t h, int64_t rowbytes, int32_t bpp,
                         const int64_t *ends, int32_t *done, shared_state *st) {
    if (bpp != 3 && bpp != 4) {
        store_progress64(&st->failed, 1);
        report_progress(st);
        return -1;
    }
    const int64_t segment = (int64_t)SEGMENT_PIXELS * bpp;
    for (;;) {
        int64_t u = __atomic_fetch_add(&st->next_unit, 1, __ATOMIC_RELAXED);
        int ready_unit = wait_for_unit(st, u);
        if (ready_unit <= 0)
            return ready_unit < 0 || load_acquire64(&st->failed) ? -1 : 0;
        int64_t first = u ? ends[u - 1] : 0, end = ends[u] < h ? ends[u] : h;
        for (int64_t r = first; r < end; r++) {
            const uint8_t *f = in + r * (rowbytes + 1);
            int type = *f++;
            uint8_t *o = out + r * rowbytes;
            const uint8_t *up = r ? o - rowbytes : NULL;
            if (type > 4) {
                store_progress64(&st->failed, 1);
                report_progress(st);
                return -1;
            }
            /* this row and the next, both Average or both Paeth, where neither waits for another
             * thread nor is read by one (the unit's last row publishes its progress) */
            if (type >= 3 && up && r > first && r + 2 < end && f[rowbytes] == type) {
                if (bpp == 3)
                    pixels_pair(type, f, o, f + rowbytes + 1, o + rowbytes, up, rowbytes, 3);
                else
                    pixels_pair(type, f, o, f + rowbytes + 1, o + rowbytes, up, rowbytes, 4);
                r++;
                continue;
            }
            /* of the row above: all of it if this thread did it, or if this row does not read it */
            int32_t ready = (type <= 1 || !up || r > first) ? (int32_t)rowbytes : 0;
            int publish = r == end - 1;   /* only a unit's last row is read by another thread */
            for (int64_t a = 0; a < rowbytes;) {
                int64_t b = a + segment < rowbytes ? a + segment : rowbytes;
                if (ready < b && (ready = wait_for(&done[r - 1], (int32_t)b, st)) < 0)
                    return -1;
                if (bpp == 3)
                    unfilter(type, f, o, up, a, b, 3);
                else
                    unfilter(type, f, o, up, a, b, 4);
                a = b;
                if (publish) {
                    store_progress(&done[r], (int32_t)a);
                    report_progress(st);
                }
            }
        }
    }
}

/* zlib-ng's native API (zlib-ng.h, 2.x): the stream, and the three calls used. */
typedef struct {
    const uint8_t *next_in;
    uint32_t avail_in;
    size_t total_in;
    uint8_t *next_out;
    uint32_t avail_out;
    size_t total_out;
    const char *msg;
    void *state;
    void *(*zalloc)(void *, unsigned, unsigned);
    void (*zfree)(void *, void *);
    void *opaque;
    int data_type;
    uint32_t adler;
    unsigned long reserved;
} zng_stream;
enum { Z_OK = 0, Z_STREAM_END = 1, Z_NO_FLUSH = 0 };
static int32_t (*zng_inflateInit2)(zng_stream *, int32_t);
static int32_t (*zng_inflate)(zng_stream *, int32_t);
static int32_t (*zng_inflateEnd)(zng_stream *);

/* Rows [from, to) have just been inflated: cut them into units and publish those. A unit closes at
 * a row that reads only itself once it has at least umin rows; where umax rows pass without one,
 * they go out as single rows (a wavefront stretch). *start is the open unit's first row. */
static void publish_units(const uint8_t *in, int64_t stride, int64_t from, int64_t to, int64_t h,
                          int64_t umin, int64_t umax, int64_t *start, int64_t *ends, shared_state *st) {
    int64_t n = st->published;   /* only this thread writes it */
    for (int64_t r = from > 1 ? from : 1; r < to; r++) {
        if (in[r * stride] <= 1 && r - *start >= umin) {
            ends[n++] = r;
            *start = r;
        } else if (r - *start >= umax) {
            for (int64_t k = *start + 1; k <= r; k++)
                ends[n++] = k;
            *start = r;
        }
    }
    if (to == h)
        ends[n++] = h;
    store_progress64(&st->published, n);
    report_progress(st);
}

/* Inflates the zlib stream `z` into `in` (h rows of stride bytes), chunk bytes at a time, publishing
 * each chunk's rows in units; the image data must inflate to exactly h rows. 0, or -1 (then
 * st->failed is set, so no thread waits for more). */
static int inflate_rows(const uint8_t *z, int64_t zlen, uint8_t *in, int64_t h, int64_t stride,
                        int64_t chunk, int64_t umin, int64_t umax, int64_t *ends, shared_state *st) {
    zng_stream s;
    memset(&s, 0, sizeof s);
    int ok = zlen <= UINT32_MAX && zng_inflateInit2(&s, 15) == Z_OK;
    const int64_t size = h * stride;
    int64_t rows_in = 0, start = 0;
    s.next_in = z;
    s.avail_in = (uint32_t)zlen;
    while (ok) {
        int64_t have = (int64_t)s.total_out, left = size - have;
        uint32_t before_in = s.avail_in;
        s.next_out = in + have;
        s.avail_out = (uint32_t)(left < chunk ? left : chunk);
        int32_t rc = zng_inflate(&s, Z_NO_FLUSH);
        int64_t rows = (int64_t)s.total_out / stride;
        if (rc == Z_STREAM_END) {
            ok = (int64_t)s.total_out == size;   /* bytes after the stream are ignored, as libpng does */
            if (ok)
                publish_units(in, stride, rows_in, h, h, umin, umax, &start, ends, st);
            break;
        }
        /* Z_BUF_ERROR (no progress: input short, or more data than the image), or corrupt data */
        ok = rc == Z_OK && ((int64_t)s.total_out > have || s.avail_in < before_in);
        if (ok && rows > rows_in && rows < h) {
            publish_units(in, stride, rows_in, rows, h, umin, umax, &start, ends, st);
            rows_in = rows;
        }
    }
    zng_inflateEnd(&s);
    if (!ok)
        store_progress64(&st->failed, 1);
    store_progress64(&st->sealed, 1);
    report_progress(st);
    return ok ? 0 : -1;
}

/* inflate_rows with libdeflate (deflate_blocks.h): the stream's blocks a part at a time, as `plan`
 * cuts them (plan[0] parts, then each part's cut and start: part 0's its first block, after the
 * zlib header; the others' found here or by the helpers, block_start). Each part's rows are
 * published once the next part is inflated, as that part's inflate writes its window back over
 * the last 32 KB before it; the last part's after the Adler-32 of all of them checked out. */
static int inflate_rows_blocks(const uint8_t *z, int64_t zlen, uint8_t *in, int64_t h, int64_t stride,
                               int64_t *plan, int64_t umin, int64_t umax, int64_t *ends, shared_state *st) {
    const int64_t parts = plan[0], size = h * stride;
    struct libdeflate_decompressor *d = ld_alloc();
    uint8_t *scratch = malloc((size_t)(STORED_HEAD + WINDOW + zlen + 8));
    int64_t offset = 0, rows_in = 0, unit_start = 0, start = plan[2];
    uint32_t adler = 1;
    int ok = d && scratch && zlen >= 6;
    for (int64_t k = 0; ok;) {
        int64_t stop = -1, next = parts;
        for (int64_t j = k + 1; j < parts && stop < 0; j++)
            if ((stop = block_start(plan, j, z, zlen)) >= 0)
                next = j;
            else
                stop = -1;
        if (stop >= 0 && stop <= start) {   /* starts ascend, parts' cuts do */
            ok = 0;
            break;
        }
        const int64_t wlen = offset < WINDOW ? offset : WINDOW;
        int64_t n = inflate_blocks(d, scratch, z, zlen, start, stop, in + offset, wlen, size - offset);
        ok = n >= 0 && !load_acquire64(&st->failed);
        if (!ok)
            break;
        adler = ld_adler32(adler, in + offset, (size_t)n);
        offset += n;
        if (stop < 0)
            break;
        int64_t rows = (offset - WINDOW) / stride;   /* whole rows the next part leaves alone */
        if (rows > rows_in && rows < h) {
            publish_units(in, stride, rows_in, rows, h, umin, umax, &unit_start, ends, st);
            rows_in = rows;
        }
        start = stop, k = next;
    }
    if (ok) {
        const uint8_t *t = z + zlen - 4;
        ok = offset == size && adler == ((uint32_t)t[0] << 24 | (uint32_t)t[1] << 16 | (uint32_t)t[2] << 8 | t[3]);
    }
    if (ok)
        publish_units(in, stride, rows_in, h, h, umin, umax, &unit_start, ends, st);
    free(scratch);
    if (d)
        ld_free(d);
    if (!ok)
        store_progress64(&st->failed, 1);
    store_progress64(&st->sealed, 1);
    report_progress(st);
    return ok ? 0 : -1;
}

/* The buffers' sizes against the image's shape. */
static int shapes_fit(const Py_buffer *rows, const Py_buffer *out, long long h, long long rowbytes,
                      const Py_buffer *ends, const Py_buffer *done, const Py_buffer *shared) {
    return h > 0 && rowbytes > 0 && rowbytes <= INT32_MAX && rows->len == h * (rowbytes + 1) &&
           out->len == h * rowbytes && ends->len >= (Py_ssize_t)sizeof(int64_t) &&
           done->len >= h * (Py_ssize_t)sizeof(int32_t) && shared->len >= (Py_ssize_t)sizeof(shared_state);
}

/* Releases a call's n buffers; its answer: rc, or where the buffers did not fit (!ok), the error. */
static PyObject *release_and_answer(int ok, int rc, Py_buffer *const *views, int n) {
    for (int i = 0; i < n; i++)
        PyBuffer_Release(views[i]);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes or row units do not match the image's shape");
        return NULL;
    }
    return PyLong_FromLong(rc);
}

/* A plan for inflate_rows_blocks against its stream: 1..MAX_BLOCK_PARTS parts, cuts ascending
 * inside the stream's bits, part 0's start its cut, the others' starts unknown or found. */
#define MAX_BLOCK_PARTS 64
static int plan_fits(const Py_buffer *plan, const Py_buffer *z) {
    const int64_t *p = plan->buf;
    int64_t parts = plan->len >= (Py_ssize_t)(3 * sizeof(int64_t)) ? p[0] : 0;
    int ok = parts >= 1 && parts <= MAX_BLOCK_PARTS && plan->len == (Py_ssize_t)((1 + 2 * parts) * sizeof(int64_t)) &&
             p[1] == 16 && p[2] == 16;
    for (int64_t k = 1; ok && k < parts; k++) {
        int64_t start = __atomic_load_n(&p[2 + 2 * k], __ATOMIC_ACQUIRE);   /* helpers may be writing it */
        ok = p[1 + 2 * k] > p[2 * k - 1] && p[1 + 2 * k] < z->len * 8 &&
             (start == BLOCK_UNKNOWN || start == NO_BLOCK || start == BLOCK_SEARCHING ||
              (start >= p[1 + 2 * k] && start < z->len * 8));
    }
    return ok;
}

/* find_blocks(z, plan) -> None: part starts of plan (inflate_rows_blocks') searched for ahead of
 * the inflating thread that needs them, parts taken in turn; by helper threads before they wait for
 * rows to unfilter. plan[0] is read, the starts written (atomically, each found once or twice). */
static PyObject *py_find_blocks(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer z, plan;
    if (!PyArg_ParseTuple(args, "y*w*", &z, &plan))
        return NULL;
    int ok = plan_fits(&plan, &z);
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        block_search_ahead(plan.buf, z.buf, z.len);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&z);
    PyBuffer_Release(&plan);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "plan does not fit the stream");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* unfilter_rows(rows, out, height, rowbytes, bpp, ends, done, shared) -> 0, or -1 (see above).
 * rows: the inflated image data (or the buffer inflate_unfilter inflates into); out: the pixels
 * (writable); ends: int64 per unit (capacity h where inflate_unfilter publishes them); done: int32
 * per row, zeroed; shared: a shared_state, the same objects for every thread of one image. Where it
 * is sealed at the call, the published units are checked to cover the image. */
static PyObject *py_unfilter_rows(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer rows, out, ends, done, shared;
    long long h, rowbytes;
    int bpp, rc = -1;
    if (!PyArg_ParseTuple(args, "y*w*LLiy*w*w*", &rows, &out, &h, &rowbytes, &bpp, &ends, &done, &shared))
        return NULL;
    int ok = shapes_fit(&rows, &out, h, rowbytes, &ends, &done, &shared);
    shared_state *st = shared.buf;
    int run = ok && !load_acquire64(&st->failed);   /* else the data failed to inflate already */
    if (run && load_acquire64(&st->sealed)) {   /* all units known: ascending, covering every row */
        int64_t units = load_acquire64(&st->published);
        const int64_t *e = ends.buf;
        ok = units > 0 && units <= ends.len / (Py_ssize_t)sizeof(int64_t) && e[units - 1] == h;
        for (int64_t u = 0; ok && u < units; u++)
            ok = e[u] > (u ? e[u - 1] : 0);
    }
    if (run && ok) {
        Py_BEGIN_ALLOW_THREADS
        rc = unfilter_rows(rows.buf, out.buf, h, rowbytes, bpp, ends.buf, done.buf, st);
        Py_END_ALLOW_THREADS
    }
    return release_and_answer(ok, rc, (Py_buffer *const[]){&rows, &out, &ends, &done, &shared}, 5);
}

/* inflate_unfilter(z, rows, out, height, rowbytes, bpp, ends, done, shared, chunk, umin, umax)
 * -> 0, or -1: inflates the zlib stream z into rows, publishing units (ends, capacity h) as it goes,
 * then helps undo the filters as unfilter_rows does; other threads call unfilter_rows with the same
 * buffers meanwhile, or not at all. shared: zeroed. */
static PyObject *py_inflate_unfilter(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer z, rows, out, ends, done, shared, plan = {0};
    long long h, rowbytes, chunk, umin, umax;
    int bpp, rc = -1;
    const int blocks = PyTuple_Size(args) > 12;   /* a plan: libdeflate's runs of blocks */
    if (!(blocks ? ld_decompress_ex != NULL : zng_inflate != NULL)) {
        PyErr_SetString(PyExc_RuntimeError, blocks ? "libdeflate is not bound: call bind_libdeflate first"
                                                   : "no inflater bound: call bind_zlibng first");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*w*w*LLiw*w*w*LLL|w*", &z, &rows, &out, &h, &rowbytes, &bpp, &ends,
                          &done, &shared, &chunk, &umin, &umax, &plan))
        return NULL;
    int ok = shapes_fit(&rows, &out, h, rowbytes, &ends, &done, &shared) &&
             ends.len >= h * (Py_ssize_t)sizeof(int64_t) && chunk > 0 && chunk <= UINT32_MAX &&
             umin >= 1 && umax >= umin && (!blocks || plan_fits(&plan, &z));
    if (ok) {
        shared_state *st = shared.buf;
        Py_BEGIN_ALLOW_THREADS
        rc = blocks ? inflate_rows_blocks(z.buf, z.len, rows.buf, h, rowbytes + 1, plan.buf, umin, umax, ends.buf, st)
                    : inflate_rows(z.buf, z.len, rows.buf, h, rowbytes + 1, chunk, umin, umax, ends.buf, st);
        int unfiltered = unfilter_rows(rows.buf, out.buf, h, rowbytes, bpp, ends.buf, done.buf, st);
        rc = rc ? rc : unfiltered;
        Py_END_ALLOW_THREADS
    }
    if (blocks)
        PyBuffer_Release(&plan);
    return release_and_answer(ok, rc, (Py_buffer *const[]){&z, &rows, &out, &ends, &done, &shared}, 6);
}

/* seal(shared, units) -> None: the threads of one image that started before its rows were
 * inflated (unfilter_rows, waiting on shared) learn that `units` units are published, all there will
 * be, or with units < 0 that the rows failed to inflate; the sleeping ones are woken now (a wait
 * that sleeps on its own wakes within NAP_NS). */
static PyObject *py_seal(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer shared;
    long long units;
    if (!PyArg_ParseTuple(args, "w*L", &shared, &units))
        return NULL;
    int ok = shared.len >= (Py_ssize_t)sizeof(shared_state);
    if (ok) {
        shared_state *st = shared.buf;
        if (units < 0)
            store_progress64(&st->failed, 1);
        else
            store_progress64(&st->published, units);
        store_progress64(&st->sealed, 1);
        report_progress(st);
    }
    PyBuffer_Release(&shared);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "shared is not a shared_state");
        return NULL;
    }
    Py_RETURN_NONE;
}

#if defined(_WIN32)
static void *dlsym(void *lib, const char *name) {   /* never called: loaded_library gives no library */
    (void)lib;
    (void)name;
    return NULL;
}
#endif

/* The handle of the library at the path in args (one str), which must be loaded already (the
 * bind_ calls find imagecodecs' inflaters in its own modules); NULL with an OSError raised where it
 * is not, or where there is no dlopen. */
static void *loaded_library(PyObject *args, const char **path) {
    if (!PyArg_ParseTuple(args, "s", path))
        return NULL;
#if defined(_WIN32)
    PyErr_SetString(PyExc_OSError, "inflaters are bound only where dlopen is");
    return NULL;
#else
    void *lib = dlopen(*path, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    if (!lib)
        PyErr_Format(PyExc_OSError, "%s is not loaded", *path);
    return lib;
#endif
}

/* bind_zlibng(path) -> zlib-ng's version: finds zlib-ng's inflate in the extension module at path
 * (imagecodecs._zlibng, already loaded), which exports it. Raises where it does not, or where it is
 * not zlib-ng 2.x, whose stream layout this file declares. */
static PyObject *py_bind_zlibng(PyObject *self, PyObject *args) {
    (void)self;
    const char *path;
    void *lib = loaded_library(args, &path);
    if (!lib)
        return NULL;
    const char *(*version)(void) = (const char *(*)(void))dlsym(lib, "zlibng_version");
    void *init = dlsym(lib, "zng_inflateInit2"), *step = dlsym(lib, "zng_inflate"),
         *end = dlsym(lib, "zng_inflateEnd");
    const char *v = version ? version() : NULL;
    if (!v || !init || !step || !end || strncmp(v, "2.", 2) != 0) {
        PyErr_Format(PyExc_OSError, "%s exports no zlib-ng 2.x inflate", path);
        return NULL;
    }
    zng_inflateInit2 = (int32_t (*)(zng_stream *, int32_t))init;
    zng_inflateEnd = (int32_t (*)(zng_stream *))end;
    zng_inflate = (int32_t (*)(zng_stream *, int32_t))step;   /* the others are set before */
    return PyUnicode_FromString(v);   /* the handle stays open: the functions stay in use */
}

/* bind_libdeflate(path) -> None: finds libdeflate through the extension module at path
 * (imagecodecs._deflate, already loaded, which links it: dlsym searches what a library links too).
 * Raises where it is not found. */
static PyObject *py_bind_libdeflate(PyObject *self, PyObject *args) {
    (void)self;
    const char *path;
    void *lib = loaded_library(args, &path);
    if (!lib)
        return NULL;
    void *alloc = dlsym(lib, "libdeflate_alloc_decompressor"), *release = dlsym(lib, "libdeflate_free_decompressor"),
         *inflate = dlsym(lib, "libdeflate_deflate_decompress_ex"), *adler = dlsym(lib, "libdeflate_adler32");
    if (!alloc || !release || !inflate || !adler) {
        PyErr_Format(PyExc_OSError, "%s links no libdeflate", path);
        return NULL;
    }
    if (!kraft4[1])
        init_kraft4();   /* under the GIL, before any thread searches */
    ld_alloc = (ld_alloc_fn)alloc;
    ld_free = (ld_free_fn)release;
    ld_adler32 = (ld_adler32_fn)adler;
    ld_decompress_ex = (ld_decompress_ex_fn)inflate;   /* the handle stays open: the calls stay in use */
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"unfilter_rows", py_unfilter_rows, METH_VARARGS,
     "Undo PNG row filters, as one of the threads working on one image (workers/png_unfilter.py)."},
    {"inflate_unfilter", py_inflate_unfilter, METH_VARARGS,
     "Inflate a PNG's image data and undo its row filters, with other threads following the inflate."},
    {"seal", py_seal, METH_VARARGS,
     "Publish an image's units, all of them (or a failure), to the threads already waiting for them."},
    {"find_blocks", py_find_blocks, METH_VARARGS,
     "Search ahead for where the parts of inflate_unfilter's plan begin (deflate_blocks.h)."},
    {"bind_libdeflate", py_bind_libdeflate, METH_VARARGS,
     "Find libdeflate through an already loaded library that links it, for inflate_unfilter's plans."},
    {"bind_zlibng", py_bind_zlibng, METH_VARARGS,
     "Find zlib-ng's inflate in an already loaded library that exports it; its version."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_png_unfilter", NULL, 0, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__png_unfilter(void) { return PyModule_Create(&module); }
