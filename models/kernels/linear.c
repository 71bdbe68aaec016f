/* Matrix products for decode-sized batches on the CPU, float32: out = x · Wᵀ + bias, with W repacked at load
   into column panels, [ceil(n / PANEL), k, PANEL]. A panel is read front to back once per block of rows and
   stays in the L2 cache while the block's rows pass over it, ROWS at a time with the sums in registers; the
   next panel is prefetched meanwhile, since panels lie in separate pages where the hardware prefetcher stops.
   MKL's sgemm reaches about half the machine's peak for 64 rows and much less for 8; for thousands of rows
   (prefill) it is better, and the caller unpacks the weight for it. A few rows (as many sequences decoding) are
   bound by memory instead, and read several panels at once. */
#include <stdint.h>
#include <string.h>

#include "kernels.h"

/* Rows per tile: 12 rows of 2 vectors keep 24 sums in AVX-512's 32 registers, 6 rows 12 sums in AVX2's 16. Two
   rows of four panels side by side keep 16 sums: AVX-512 only. */
#if VEC == 16
#define ROWS 12
#define FEW_ROWS 4 /* up to this many rows a product is bound by memory and reads panels side by side (few_rows) */
#else
#define ROWS 6
#define FEW_ROWS 1 /* with 16 registers, more rows side by side were no faster than the tiles (or spilled) */
#endif
#define VECS 2
#define PANEL (VEC * VECS)
#define BLOCK_TILES 16 /* row tiles in a block of rows: 192 rows of 576 floats take 442 KB of L2 */
#define LINE_FLOATS 16 /* a 64-byte cache line */
#define STREAMS 4      /* panels read at once for one row (measured best of 2, 4 and 8), fewer for more rows */

static inline vec load(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

int linear_panel_width(void) { return PANEL; }

/* One row's sums for one panel into out[0 .. width), plus the bias when there is one. A matrix's last panel may
   be narrower than PANEL: neither its padding nor the bias (which is not padded) is touched past width. */
static inline void write_sums(const vec *sums, const float *bias, float *out, int64_t width) {
    if (width == PANEL) {
        for (int j = 0; j < VECS; j++) store(out + j * VEC, bias ? sums[j] + load(bias + j * VEC) : sums[j]);
        return;
    }
    float full[PANEL];
    for (int j = 0; j < VECS; j++) store(full + j * VEC, sums[j]);
    for (int64_t c = 0; c < width; c++) out[c] = full[c] + (bias ? bias[c] : 0);
}

/* `rows` (a constant once inlined) rows of x against one panel: out[rows, width] for the panel's first `width`
   columns. Prefetches `lines` cache lines from `next` on, spread evenly over the k steps. */
static inline __attribute__((always_inline)) void tile(const int rows, const float *x, int64_t k,
        const float *panel, const float *bias, float *out, int64_t out_stride, int64_t width, const float *next,
        const int64_t lines) {
    vec sums[ROWS][VECS] = {{{0}}};
    int64_t due = 0;  /* lines * (steps so far) - k * (lines prefetched): one more is due each time it reaches k */
    for (int64_t p = 0; p < k; p++) {
        const float *w = panel + p * PANEL;
        for (due += lines; due >= k; due -= k, next += LINE_FLOATS) __builtin_prefetch(next, 0, 3);
        vec ws[VECS];
        for (int j = 0; j < VECS; j++) ws[j] = load(w + j * VEC);
        for (int i = 0; i < rows; i++) {
            const float a = x[i * k + p];
            for (int j = 0; j < VECS; j++) sums[i][j] += ws[j] * a;
        }
    }
    for (int i = 0; i < rows; i++) write_sums(sums[i], bias, out + i * out_stride, width);
}

/* `rows` rows against `count` panels at once, q[0 .. count): each panel is a stretch of memory that the hardware
   prefetcher follows, and several such streams keep more of the memory's bandwidth busy than one (a product of
   a few rows is bound by memory). */
static inline __attribute__((always_inline)) void few_rows_panels(const int rows, const int count, const int64_t *q,
        const float *x, int64_t k, const float *packed, int64_t n, const float *bias, float *out) {
    vec sums[FEW_ROWS][STREAMS][VECS];
    const float *panels[STREAMS];
    for (int s = 0; s < count; s++) {
        panels[s] = packed + q[s] * k * PANEL;
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < VECS; j++) sums[i][s][j] = (vec){0};
    }
    for (int64_t p = 0; p < k; p++)
        for (int s = 0; s < count; s++)
            for (int j = 0; j < VECS; j++) {
                const vec w = load(panels[s] + p * PANEL + j * VEC);
                for (int i = 0; i < rows; i++) sums[i][s][j] += w * x[i * k + p];
            }
    for (int s = 0; s < count; s++)
        for (int i = 0; i < rows; i++)
            write_sums(sums[i][s], bias ? bias + q[s] * PANEL : NULL, out + i * n + q[s] * PANEL,
                       min64(n - q[s] * PANEL, PANEL));
}

/* Panels [first, last) cut into `count` parts that are read side by side. */
static inline __attribute__((always_inline)) void few_rows_run(const int rows, const int count, const float *x,
        int64_t k, const float *packed, int64_t n, const float *bias, float *out, int64_t first, int64_t last) {
    const int64_t part = (last - first) / count;
    for (int64_t i = 0; i < part; i++) {
        int64_t q[STREAMS];
        for (int s = 0; s < count; s++) q[s] = first + s * part + i;
        few_rows_panels(rows, count, q, x, k, packed, n, bias, out);
    }
    for (int64_t q = first + count * part; q < last; q++) few_rows_panels(rows, 1, &q, x, k, packed, n, bias, out);
}

/* Up to FEW_ROWS rows: each thread takes a run of panels and reads parts of it side by side, as many as leave
   the sums in registers. */
static void few_rows(const float *x, int64_t m, int64_t k, const float *packed, int64_t n, const float *bias,
                     float *out, int num_threads) {
    const int64_t panels = (n + PANEL - 1) / PANEL;
    #pragma omp parallel num_threads(num_threads) if (m * n * k >= 1 << 18)
    {
        int64_t first, last;
        thread_share(panels, &first, &last);
        switch (m) {
#if FEW_ROWS == 4
            case 4: few_rows_run(4, STREAMS / 2, x, k, packed, n, bias, out, first, last); break;
            case 3: few_rows_run(3, STREAMS / 2, x, k, packed, n, bias, out, first, last); break;
            case 2: few_rows_run(2, STREAMS, x, k, packed, n, bias, out, first, last); break;
#endif
            default: few_rows_run(1, STREAMS, x, k, packed, n, bias, out, first, last); break;
        }
    }
}

/* x: [m, k]; packed: [ceil(n / PANEL), k, PANEL], zero-padded; bias: [n] or NULL; out: [m, n].
   Work items are (block of rows, panel, group of row tiles), in that order, and each thread takes one run of
   them: a run stays on one panel while it can, and on one block of rows (which stays in L2) over all panels. */
void linear(const float *x, int64_t m, int64_t k, const float *packed, int64_t n, const float *bias, float *out,
            int num_threads) {
    if (m == 0) return;
    if (m <= FEW_ROWS) {
        few_rows(x, m, k, packed, n, bias, out, num_threads);
        return;
    }
    const int64_t panels = (n + PANEL - 1) / PANEL, row_tiles = (m + ROWS - 1) / ROWS;
    /* Blocks of as many tiles as can be (a short last block would leave a thread idle under the static schedule):
       block b holds tiles [b * row_tiles / blocks, (b + 1) * row_tiles / blocks). */
    const int64_t blocks = (row_tiles + BLOCK_TILES - 1) / BLOCK_TILES, most_tiles = (row_tiles + blocks - 1) / blocks;
    const int64_t tiles_per_group = 4, groups = (most_tiles + tiles_per_group - 1) / tiles_per_group;
    #pragma omp parallel for schedule(static) num_threads(num_threads) if (m * n * k >= 1 << 18)
    for (int64_t item = 0; item < blocks * panels * groups; item++) {
        const int64_t q = item / groups % panels, group = item % groups, width = min64(n - q * PANEL, PANEL);
        const float *panel = packed + q * k * PANEL, *b = bias ? bias + q * PANEL : NULL;
        const int64_t block = item / (groups * panels), block_first = block * row_tiles / blocks;
        const int64_t block_tiles = (block + 1) * row_tiles / blocks - block_first;
        const int64_t first = block_first + group * tiles_per_group;
        /* The block's tiles on this panel share the fetching of the next one, each a stretch of its lines: a
           steady trickle of prefetches rather than bursts that fill the core's queue of misses. */
        const int64_t next_lines = q + 1 == panels ? 0 : k * PANEL / LINE_FLOATS;
        for (int64_t t = first; t < first + tiles_per_group && t < block_first + block_tiles; t++) {
            const int64_t r = t * ROWS, share = t - block_first;
            const int64_t from = share * next_lines / block_tiles, to = (share + 1) * next_lines / block_tiles;
            const float *next = panel + k * PANEL + from * LINE_FLOATS, *xr = x + r * k;
            const int64_t lines = to - from;
            float *o = out + r * n + q * PANEL;
#define TILE(R) case R: tile(R, xr, k, panel, b, o, n, width, next, lines); break;
            switch (min64(m - r, ROWS)) {
#if ROWS == 12
                TILE(12) TILE(11) TILE(10) TILE(9) TILE(8) TILE(7)
#endif
                TILE(6) TILE(5) TILE(4) TILE(3) TILE(2) TILE(1)
            }
        }
    }
}
