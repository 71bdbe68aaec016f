/* Matrix products over bfloat16 weights: out = x · Wᵀ + bias, with W rounded to bfloat16 at load and each row of x
   rounded to bfloat16 here (to nearest, ties to even, as PyTorch's conversion), products summed in float32. Half
   the bytes of float32 weights to read, and on CPUs with AVX-512 BF16 one `vdpbf16ps` does 32 multiply-adds.

   The weight is packed at load into panels of BCOLS columns: for each pair of inputs (2p, 2p + 1), the 16 columns'
   two weights side by side, [ceil(n / 16), ceil(k / 2), 16, 2], a zero input past an odd k. One 64-byte load is the
   panel's pair; a row's pair of activations is one 32-bit broadcast.

   Three paths. With AMX (Intel since Sapphire Rapids), tiles of 16 rows by 16 columns by 32 inputs: the panel's
   layout is AMX's for its second operand, 16 pairs of inputs a tile. Otherwise `vdpbf16ps` (AVX-512 BF16), or the
   same arithmetic in float32 (bfloat16 widens to float32 by a shift). The last two add each pair's odd product,
   then its even one, to the column's sum, each rounded once (a product of two bfloat16 values is exact in
   float32), so they agree bit for bit on normal numbers (`vdpbf16ps` flushes subnormal ones to zero); AMX sums in
   an order of its own. On every path each row's arithmetic depends on that row alone (batch invariance, as for
   `linear.c`): AMX computes a row of a tile from that row of activations only, and a partial tile's other rows
   are zeros. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#if defined(__AVX512BF16__) || defined(__AMX_BF16__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define AMX 0
#endif

/* Each row's sums in one order whatever the tile around it (see `qlinear.c`). */
#pragma GCC optimize("no-associative-math")

#define BCOLS 16
typedef float vf __attribute__((vector_size(BCOLS * sizeof(float))));
typedef uint32_t vu __attribute__((vector_size(BCOLS * sizeof(uint32_t))));

/* Rows per tile, their sums in registers: one vector a row (1 AVX-512 or 2 AVX2 ones). */
#if defined(__AVX512F__)
#define BROWS 12
#else
#define BROWS 4
#endif

#if AMX
/* Linux lends a process AMX's tile registers only once asked (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA);
   `bf16linear_path` asks, once, at load. */
static int amx_granted;

static void ask_for_amx(void) { amx_granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0; }

/* Tiles 0-7, each 16 rows of 64 bytes: 0-3 sums (row tile i, panel j in 2i + j), 4-5 activations, 6-7 weights. */
static void configure_tiles(void) {
    struct { uint8_t palette, start_row, reserved[14]; uint16_t bytes[16]; uint8_t rows[16]; } config = {.palette = 1};
    for (int t = 0; t < 8; t++) config.bytes[t] = 64, config.rows[t] = 16;
    _tile_loadconfig(&config);
}
#endif

const char *bf16linear_path(void) {
#if AMX
    ask_for_amx();
    if (amx_granted) return "AMX";
#endif
#if defined(__AVX512BF16__)
    return "AVX-512 BF16";
#else
    return "bfloat16 widened to float32";
#endif
}

static inline float from_bits(uint32_t bits) { float f; memcpy(&f, &bits, sizeof f); return f; }

/* sums[c] += w[c].odd * x.odd, then + w[c].even * x.even: w holds the 16 columns' pairs, x a pair of activations
   (even in the low half). */
static inline vf dot_pair(vf sums, vu w, uint32_t x) {
#if defined(__AVX512BF16__)
    return (vf)_mm512_dpbf16_ps((__m512)sums, (__m512bh)w, (__m512bh)_mm512_set1_epi32((int)x));
#else
    sums += (vf)(w & 0xFFFF0000u) * from_bits(x & 0xFFFF0000u);
    return sums + (vf)(w << 16) * from_bits(x << 16);
#endif
}

/* Rows [first, last) of x [m, k] as bfloat16 pairs: xb [m, pairs]. */
static void round_rows(const float *x, int64_t k, int64_t pairs, uint32_t *xb, int64_t first, int64_t last) {
    for (int64_t r = first; r < last; r++)
        for (int64_t p = 0; p < pairs; p++) {
            const float *v = x + r * k + 2 * p;
            xb[r * pairs + p] = to_bf16(v[0]) | (2 * p + 1 < k ? (uint32_t)to_bf16(v[1]) << 16 : 0);
        }
}

/* `rows` rows (from `row`) of xb against one panel; writes out[rows, width]. */
static inline __attribute__((always_inline)) void btile(const int rows, const uint32_t *xb, int64_t row,
        int64_t pairs, const uint16_t *panel, const float *bias, float *out, int64_t out_stride, int64_t width) {
    vf sums[BROWS] = {{0}};
    for (int64_t p = 0; p < pairs; p++) {
        vu w;
        memcpy(&w, panel + p * 2 * BCOLS, sizeof w);
        for (int i = 0; i < rows; i++) sums[i] = dot_pair(sums[i], w, xb[(row + i) * pairs + p]);
    }
    vf b = {0};
    if (bias) memcpy(&b, bias, sizeof(float) * width);
    for (int i = 0; i < rows; i++) {
        const vf row_out = sums[i] + b;
        if (width == BCOLS) memcpy(out + i * out_stride, &row_out, sizeof row_out);
        else for (int64_t c = 0; c < width; c++) out[i * out_stride + c] = row_out[c];
    }
}

/* Column panels [first, last) for every row, a tile of rows at a time. */
static void bpanels(const uint32_t *xb, int64_t m, int64_t pairs, const uint16_t *packed, int64_t n,
                    const float *bias, float *out, int64_t first, int64_t last) {
    for (int64_t p = first; p < last; p++)
        for (int64_t r = 0; r < m; r += BROWS) {
            const uint16_t *panel = packed + p * pairs * 2 * BCOLS;
            const float *b = bias ? bias + p * BCOLS : NULL;
            float *o = out + r * n + p * BCOLS;
            const int64_t width = min64(n - p * BCOLS, BCOLS);
#define BTILE(R) case R: btile(R, xb, r, pairs, panel, b, o, n, width); break;
            switch (min64(m - r, BROWS)) {
#if BROWS == 12
                BTILE(12) BTILE(11) BTILE(10) BTILE(9) BTILE(8) BTILE(7) BTILE(6) BTILE(5)
#endif
                BTILE(4) BTILE(3) BTILE(2) BTILE(1)
            }
        }
}

#if AMX
/* Sums of one or two tiles of 16 rows (from xb, `pairs` apart) against one or two panels, over all k, into
   sums[2i + j][16][16] for row tile i and panel j. */
static inline __attribute__((always_inline)) void amx_block(const int row_tiles, const int panel_count,
        const uint32_t *xb, int64_t pairs, const uint16_t *panel, float sums[4][16 * 16]) {
    const int64_t a_stride = pairs * sizeof(uint32_t), panel_size = pairs * 2 * BCOLS;
    _tile_zero(0);
    if (panel_count == 2) _tile_zero(1);
    if (row_tiles == 2) _tile_zero(2);
    if (row_tiles == 2 && panel_count == 2) _tile_zero(3);
    for (int64_t p = 0; p < pairs; p += 16) {
        _tile_loadd(4, xb + p, a_stride);
        _tile_loadd(6, panel + p * 2 * BCOLS, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (panel_count == 2) {
            _tile_loadd(7, panel + panel_size + p * 2 * BCOLS, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (row_tiles == 2) {
            _tile_loadd(5, xb + 16 * pairs + p, a_stride);
            _tile_dpbf16ps(2, 5, 6);
            if (panel_count == 2) _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, sums[0], 64);
    if (panel_count == 2) _tile_stored(1, sums[1], 64);
    if (row_tiles == 2) _tile_stored(2, sums[2], 64);
    if (row_tiles == 2 && panel_count == 2) _tile_stored(3, sums[3], 64);
}

/* Column panels [first, last), two at a time, for every row, 32 at a time; xb has its rows padded with zeros to
   a multiple of 32, and k is a multiple of 32. */
static void amx_panels(const uint32_t *xb, int64_t m, int64_t pairs, const uint16_t *packed, int64_t n,
                       const float *bias, float *out, int64_t first, int64_t last) {
    float sums[4][16 * 16];
    configure_tiles();
    for (int64_t p = first; p < last; p += 2)
        for (int64_t r = 0; r < m; r += 32) {
            const int two_rows = m - r > 16, two_panels = last - p > 1;
            const uint32_t *x = xb + r * pairs;
            const uint16_t *panel = packed + p * pairs * 2 * BCOLS;
            if (two_rows && two_panels) amx_block(2, 2, x, pairs, panel, sums);
            else if (two_rows) amx_block(2, 1, x, pairs, panel, sums);
            else if (two_panels) amx_block(1, 2, x, pairs, panel, sums);
            else amx_block(1, 1, x, pairs, panel, sums);
            for (int64_t i = r; i < min64(m, r + 32); i++)
                for (int64_t q = p; q < min64(last, p + 2); q++)
                    for (int64_t c = q * BCOLS; c < min64(n, (q + 1) * BCOLS); c++)
                        out[i * n + c] = sums[2 * ((i - r) / 16) + q - p][(i - r) % 16 * 16 + c % BCOLS]
                                         + (bias ? bias[c] : 0);
        }
    _tile_release();
}
#endif

/* x: [m, k]; packed: [ceil(n / 16), ceil(k / 2), 16, 2] bfloat16; bias: [n] or NULL; out: [m, n]. Threads round a
   share of the rows each, then take a run of panels each over all rows. Returns OK, or OUT_OF_MEMORY for the
   rounded rows. */
int bf16linear(const float *x, int64_t m, int64_t k, const uint16_t *packed, int64_t n, const float *bias,
               float *out, int num_threads) {
    if (m == 0) return OK;
    const int64_t pairs = (k + 1) / 2, panels = (n + BCOLS - 1) / BCOLS;
    const int64_t padded_rows = (m + 31) / 32 * 32;
    uint32_t *xb = calloc(padded_rows * (pairs ? pairs : 1), sizeof(uint32_t));  /* zeros: a partial tile's rows */
    if (xb == NULL) return OUT_OF_MEMORY;
    #pragma omp parallel num_threads(num_threads) if (m * n * k >= 1 << 18)
    {
        int64_t first, last;
        thread_share(m, &first, &last);
        round_rows(x, k, pairs, xb, first, last);
        #pragma omp barrier
        thread_share(panels, &first, &last);
#if AMX
        if (amx_granted && k % 32 == 0) amx_panels(xb, m, pairs, packed, n, bias, out, first, last);
        else
#endif
            bpanels(xb, m, pairs, packed, n, bias, out, first, last);
    }
    free(xb);
    return OK;
}
