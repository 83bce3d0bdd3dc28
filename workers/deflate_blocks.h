/* Deflate blocks for the inflating thread of workers/png_unfilter.c: where a block that zlib would
 * accept may begin, and libdeflate inflating the blocks between two such places.
 *
 * Why: libdeflate inflates a text- and photo-dense screenshot's image data 1.6x faster than zlib-ng
 * (bench/RESULTS.md, eighteenth and thirtieth sessions), but only in one call, with no streaming
 * interface: so the rows' filters were undone only after the whole inflate, while zlib-ng, a chunk
 * at a time, let other threads follow it. Given the blocks from one block boundary to another as a
 * stream of their own, libdeflate inflates a part at a time too.
 *
 * How: a deflate stream's blocks begin at bit positions found only by decoding the block before;
 * but a dynamic-Huffman block begins with a header whose three codes must be valid and complete,
 * which few bit positions of compressed data pass (the thirtieth session's search found exactly the
 * 25 true block starts of a dense screenshot's stream, and nothing in 4.8 Mbit of random data). The
 * image data is cut at even places, and each part begins at the first such header after its cut.
 * A part is given to libdeflate as a stream of its own: a stored block holding the 32 KB before it
 * (its matches may reach that far back: deflate's window), its bits shifted to begin at a byte, and
 * a last, empty block. It must end exactly where that empty block begins, and the whole output's
 * Adler-32 must be the stream's: a header that only looked valid fails one or the other, and the
 * caller then inflates the stream whole. */
#ifndef WORKERS_DEFLATE_BLOCKS_H
#define WORKERS_DEFLATE_BLOCKS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define WINDOW 32768        /* how far back a match reaches */
#define STORED_HEAD 5       /* a stored block's header, from a byte: BFINAL 0 and BTYPE 00, LEN, NLEN */
#define FINAL_EMPTY 3       /* 10 bits: BFINAL 1, BTYPE 01 (fixed codes), end of block (seven 0s) */
#define BLOCK_UNKNOWN (-1)  /* a part's start not yet searched for */
#define NO_BLOCK (-2)       /* no block header between a part's cut and the next part's */
#define BLOCK_SEARCHING (-3) /* a helper is searching for it (block_search_ahead) */

/* libdeflate's calls, bound by bind_libdeflate (png_unfilter.c) */
struct libdeflate_decompressor;
typedef struct libdeflate_decompressor *(*ld_alloc_fn)(void);
typedef void (*ld_free_fn)(struct libdeflate_decompressor *);
typedef int (*ld_decompress_ex_fn)(struct libdeflate_decompressor *, const void *, size_t, void *, size_t,
                                   size_t *, size_t *);
typedef uint32_t (*ld_adler32_fn)(uint32_t, const void *, size_t);
static ld_alloc_fn ld_alloc;
static ld_free_fn ld_free;
static ld_decompress_ex_fn ld_decompress_ex;
static ld_adler32_fn ld_adler32;

/* Up to 57 bits of z from bit `pos` on, least significant first, as deflate packs them. */
static inline uint64_t peek_bits(const uint8_t *z, int64_t zlen, int64_t pos) {
    int64_t at = pos >> 3;
    uint64_t v = 0;
    if (at + 8 <= zlen)
        memcpy(&v, z + at, 8);
    else if (at < zlen)
        memcpy(&v, z + at, (size_t)(zlen - at));
    return v >> (pos & 7);
}

/* zlib's check of a literal/length or distance code's lengths (inftrees.c): not over-subscribed,
 * and complete unless it is a single code of one bit, or empty (distances only). */
static int code_ok(const uint8_t *len, int n, int distances) {
    int count[16] = {0}, max = 0;
    for (int i = 0; i < n; i++)
        count[len[i]]++;
    for (int l = 15; l >= 1 && !max; l--)
        max = count[l] ? l : 0;
    if (!max)
        return distances;   /* no codes at all */
    int left = 1;
    for (int l = 1; l <= 15; l++) {
        left = (left << 1) - count[l];
        if (left < 0)
            return 0;
    }
    return !left || max == 1;
}

/* Kraft sums of four code-length-code lengths (3 bits each, 0 for none): 128 >> length each. */
static uint16_t kraft4[4096];

static void init_kraft4(void) {
    for (int i = 0; i < 4096; i++) {
        uint16_t sum = 0;
        for (int f = 0; f < 4; f++)
            sum += (i >> (3 * f)) & 7 ? 128 >> ((i >> (3 * f)) & 7) : 0;
        kraft4[i] = sum;
    }
}

/* Whether a dynamic-Huffman block header that zlib accepts begins at bit pos of z[0, zlen): its
 * code-length code complete (kraft4, then the whole check), its literal/length and distance codes
 * valid, the end-of-block code present. block_candidates() has checked its first 13 bits. */
static int block_header_at(const uint8_t *z, int64_t zlen, int64_t pos) {
    static const uint8_t order[19] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};
    uint64_t v = peek_bits(z, zlen, pos);
    int hlit = 257 + (int)((v >> 3) & 31), hdist = 1 + (int)((v >> 8) & 31), hclen = 4 + (int)((v >> 13) & 15);
    if (hlit > 286 || hdist > 30)   /* as zlib; and lens below holds no more */
        return 0;
    uint64_t c = peek_bits(z, zlen, pos + 17) & ((UINT64_C(1) << (3 * hclen)) - 1);
    if (kraft4[c & 4095] + kraft4[(c >> 12) & 4095] + kraft4[(c >> 24) & 4095] + kraft4[(c >> 36) & 4095] +
        kraft4[(c >> 48) & 4095] != 128)
        return 0;
    pos += 17;
    uint8_t cl[19] = {0};
    for (int i = 0; i < hclen; i++)
        cl[order[i]] = (uint8_t)((c >> (3 * i)) & 7);
    pos += 3 * hclen;
    /* the code-length code as a table of its 7-bit reversed codes: symbol | length << 8 */
    uint16_t table[128];
    int next[8] = {0}, count[8] = {0}, code = 0;
    for (int i = 0; i < 19; i++)
        count[cl[i]]++;
    count[0] = 0;
    for (int l = 1; l < 8; l++)
        next[l] = code = (code + count[l - 1]) << 1;
    for (int s = 0; s < 19; s++) {
        int l = cl[s];
        if (!l)
            continue;
        int r = 0, k = next[l]++;
        for (int b = 0; b < l; b++)
            r |= ((k >> b) & 1) << (l - 1 - b);
        for (int f = r; f < 128; f += 1 << l)
            table[f] = (uint16_t)(s | l << 8);
    }
    uint8_t lens[286 + 30];
    int n = hlit + hdist, i = 0;
    const int64_t bits = zlen * 8;
    while (i < n) {
        if (pos >= bits)
            return 0;
        uint64_t w = peek_bits(z, zlen, pos);
        int e = table[w & 127], s = e & 255, l = e >> 8, rep;
        uint8_t fill;
        w >>= l;
        pos += l;
        if (s < 16) {
            lens[i++] = (uint8_t)s;
            continue;
        }
        if (s == 16) {
            if (!i)
                return 0;
            fill = lens[i - 1], rep = 3 + (int)(w & 3), pos += 2;
        } else if (s == 17) {
            fill = 0, rep = 3 + (int)(w & 7), pos += 3;
        } else {
            fill = 0, rep = 11 + (int)(w & 127), pos += 7;
        }
        if (i + rep > n)
            return 0;
        memset(lens + i, fill, (size_t)rep);
        i += rep;
    }
    return pos <= bits && lens[256] && code_ok(lens, hlit, 0) && code_ok(lens + hlit, hdist, 1);
}

/* Of the 64 bit positions from base (a byte's first bit: peek_bits then gives 64 bits, not 57),
 * those where a block's first 13 bits may begin, as a bit mask:
 * BFINAL 0 unless `final` (only the last part may begin with the last block), BTYPE 2 (bits 1-2: 0,
 * 1), HLIT and HDIST at most 29 (not all of their upper 4 bits set). Seven in eight positions fail
 * the first two tests: this takes 64 at a time. */
static inline uint64_t block_candidates(const uint8_t *z, int64_t zlen, int64_t base, int final) {
    unsigned __int128 w = (unsigned __int128)peek_bits(z, zlen, base + 64) << 64 | peek_bits(z, zlen, base);
    uint64_t b[13];
    for (int i = 0; i < 13; i++)
        b[i] = (uint64_t)(w >> i);
    return (final ? ~UINT64_C(0) : ~b[0]) & ~b[1] & b[2] & ~(b[4] & b[5] & b[6] & b[7]) &
           ~(b[9] & b[10] & b[11] & b[12]);
}

/* Part k's start in `plan` (int64s: the parts, then each part's cut and start): the first block
 * header in [its cut, the next part's cut), or NO_BLOCK. Searched for by a helper ahead of need
 * (block_search_ahead), or else by the inflating thread when it needs it, even while a helper still
 * searches (both find the same), then published. */
static int64_t block_start(int64_t *plan, int64_t k, const uint8_t *z, int64_t zlen) {
    const int64_t parts = plan[0];
    int64_t *p = plan + 1 + 2 * k, s = __atomic_load_n(&p[1], __ATOMIC_ACQUIRE);
    if (s >= 0 || s == NO_BLOCK)
        return s;
    s = NO_BLOCK;
    int64_t end = k + 1 < parts ? p[2] : zlen * 8 - 17;
    for (int64_t base = p[0] & ~7; base < end && s == NO_BLOCK; base += 64)   /* from a byte: block_candidates */
        for (uint64_t m = block_candidates(z, zlen, base, k + 1 == parts); m && s == NO_BLOCK; m &= m - 1) {
            int64_t pos = base + __builtin_ctzll(m);
            if (pos >= p[0] && pos < end && block_header_at(z, zlen, pos))
                s = pos;
        }
    __atomic_store_n(&p[1], s, __ATOMIC_RELEASE);
    return s;
}

/* A helper's search ahead: the starts of parts no thread has taken yet, from the last part back (the
 * inflating thread needs them from the first on). */
static void block_search_ahead(int64_t *plan, const uint8_t *z, int64_t zlen) {
    for (int64_t k = plan[0] - 1; k >= 1; k--) {
        int64_t unknown = BLOCK_UNKNOWN;
        if (__atomic_compare_exchange_n(&plan[2 + 2 * k], &unknown, BLOCK_SEARCHING, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            block_start(plan, k, z, zlen);
    }
}

/* Bits [start, start + n) of z to dst from its bit 0, then zero bits to dst's next byte. */
static void copy_bits(uint8_t *dst, const uint8_t *z, int64_t zlen, int64_t start, int64_t n) {
    const int64_t a = start >> 3, bytes = (n + 7) >> 3;
    const int s = (int)(start & 7);
    int64_t j = 0;
    if (!s) {
        memcpy(dst, z + a, (size_t)bytes);
    } else {
        for (; j + 8 < bytes && a + j + 9 <= zlen; j += 8) {   /* 8 bytes a step, from 9 */
            uint64_t lo, out;
            memcpy(&lo, z + a + j, 8);
            out = lo >> s | (uint64_t)z[a + j + 8] << (64 - s);
            memcpy(dst + j, &out, 8);
        }
        for (; j < bytes; j++)
            dst[j] = (uint8_t)(z[a + j] >> s | (a + j + 1 < zlen ? z[a + j + 1] << (8 - s) : 0));
    }
    if (n & 7)
        dst[bytes - 1] &= (uint8_t)((1 << (n & 7)) - 1);
}

/* Inflates z's blocks from bit `start` to bit `stop` (where the next part begins), or with stop < 0
 * through the stream's last block, into out, where the `wlen` bytes before out are the output just
 * before them (up to WINDOW: all a match may reach). `scratch` holds the stream libdeflate is given
 * (at least STORED_HEAD + WINDOW + zlen + 8 bytes). The bytes written from out on, or -1: where
 * libdeflate fails, the blocks do not end exactly at stop, there is more output than `room`, or the
 * last block does not end where z's last 4 bytes (its Adler-32) begin. libdeflate writes the window
 * back over itself: its bytes do not change, but no other thread may read them meanwhile. */
static int64_t inflate_blocks(struct libdeflate_decompressor *d, uint8_t *scratch, const uint8_t *z, int64_t zlen,
                              int64_t start, int64_t stop, uint8_t *out, int64_t wlen, int64_t room) {
    const int last = stop < 0;
    const int64_t bits = (last ? zlen * 8 : stop) - start, head = wlen ? STORED_HEAD + wlen : 0;
    const int64_t len = head + (bits + (last ? 0 : 10) + 7) / 8;
    if (wlen) {
        const uint8_t stored[STORED_HEAD] = {0, (uint8_t)wlen, (uint8_t)(wlen >> 8), (uint8_t)~wlen,
                                             (uint8_t)(~wlen >> 8)};
        memcpy(scratch, stored, STORED_HEAD);
        memcpy(scratch + STORED_HEAD, out - wlen, (size_t)wlen);
    }
    copy_bits(scratch + head, z, zlen, start, bits);
    if (!last) {   /* right after the part's last bit, into zeroed bytes */
        const int64_t at = head * 8 + bits;
        scratch[head + ((bits + 7) >> 3)] = scratch[head + ((bits + 7) >> 3) + 1] = 0;
        const uint32_t v = (uint32_t)FINAL_EMPTY << (at & 7);
        scratch[at >> 3] |= (uint8_t)v;
        scratch[(at >> 3) + 1] |= (uint8_t)(v >> 8);
    }
    size_t used = 0, n = 0;
    if (ld_decompress_ex(d, scratch, (size_t)len, out - wlen, (size_t)(wlen + room), &used, &n) != 0 ||
        n < (size_t)wlen)
        return -1;
    if (!last && (int64_t)used != len)   /* ended before our empty block: stop was no block boundary */
        return -1;
    if (last) {
        /* the last block ended in byte u of the part's bits: in z, byte a + u, or where the part did
         * not begin on a byte, possibly a + u + 1; the Adler-32 follows at the next byte */
        const int64_t a = start >> 3, u = (int64_t)used - head;
        if (zlen - 4 != a + u && !((start & 7) && zlen - 4 == a + u + 1))
            return -1;
    }
    return (int64_t)n - wlen;
}

#endif
