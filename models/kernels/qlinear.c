/* Matrix products over quantized weights: out = x · Wᵀ + bias, with W in blocks of 32 inputs, each column's block
   holding unsigned integers u (8 or 4 bits) and a float scale d and offset m: w = d * u + m. That form holds
   llama.cpp's Q8_0 (u = q + 128, m = -128 d), Q4_0 (m = -8 d), Q4_1 and Q4_K (d and m per 32 inputs) exactly.
   Each row of x is quantized too, per block of 32 inputs, to int8 with its own scale (dx = max |x| / 127, as
   llama.cpp's Q8 activations), so that a block's product is an integer dot product:
       Σ w x = d dx Σ u q + m dx Σ q,
   summed over the blocks in float. The integer sums are exact on every path below (AVX-512 VNNI `vpdpbusd`,
   AVX-VNNI, AVX2 `vpmaddubsw`, plain C), so the paths of one build give the same bits (the float sums may round
   differently where the vector width differs), and each row's arithmetic depends on that row alone (batch
   invariance, as for `linear.c`).

   The weight is packed at load into panels of QCOLS columns, block by block: the 16 columns' scales, their
   offsets, then the integers, 4 inputs of the 16 columns after 4 inputs: one 64-byte load is one `vpdpbusd` over
   the panel. 4-bit blocks hold inputs 4g .. 4g + 3 in the low nibbles of group g and 16 + 4g .. in the high ones. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* Each row's float sums in one order whatever the tile around it: no reassociation (which -ffast-math allows, and
   which GCC applies differently to tiles of different sizes). */
#pragma GCC optimize("no-associative-math")

#define QCOLS 16
#define QBLOCK 32
#define HEADER (2 * QCOLS * sizeof(float))

typedef int32_t vi __attribute__((vector_size(QCOLS * sizeof(int32_t))));
typedef float vf __attribute__((vector_size(QCOLS * sizeof(float))));
typedef uint8_t vb __attribute__((vector_size(QCOLS * 4)));

/* Rows per tile: their int and float sums stay in registers (2 vectors a row, each 1 AVX-512 or 2 AVX2 ones). */
#if defined(__AVX512F__)
#define QROWS 8
#else
#define QROWS 2
#endif

int64_t qlinear_block_bytes(int bits) { return HEADER + QCOLS * QBLOCK * bits / 8; }

/* sums[c] += Σ_j u[4c + j] * q[j] for the 16 columns c of one group: u unsigned, q four signed bytes. With 8-bit
   u (up to 255) `vpmaddubsw` could saturate its 16-bit pairs, so the AVX2 path multiplies u - 128 and the caller
   adds 128 Σ q back (see `needs_offset`). */
static inline vi dot4(vi sums, vb u, int32_t q, int bits) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    (void)bits;
    return (vi)_mm512_dpbusd_epi32((__m512i)sums, (__m512i)u, _mm512_set1_epi32(q));
#elif defined(__AVXVNNI__)
    (void)bits;
    const __m256i x = _mm256_set1_epi32(q), *w = (const __m256i *)&u;
    __m256i *s = (__m256i *)&sums;
    s[0] = _mm256_dpbusd_avx_epi32(s[0], w[0], x);
    s[1] = _mm256_dpbusd_avx_epi32(s[1], w[1], x);
    return sums;
#elif defined(__AVX2__)
    const __m256i x = _mm256_set1_epi32(q), ones = _mm256_set1_epi16(1), *w = (const __m256i *)&u;
    __m256i *s = (__m256i *)&sums;
    for (int h = 0; h < 2; h++) {
        __m256i pairs;
        if (bits == 8) {
            const __m256i centred = _mm256_xor_si256(w[h], _mm256_set1_epi8((char)0x80));  /* u - 128, signed */
            pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(centred, centred), _mm256_sign_epi8(x, centred));
        } else {
            pairs = _mm256_maddubs_epi16(w[h], x);
        }
        s[h] = _mm256_add_epi32(s[h], _mm256_madd_epi16(pairs, ones));
    }
    return sums;
#else
    const int8_t *x = (const int8_t *)&q;
    for (int c = 0; c < QCOLS; c++)
        for (int j = 0; j < 4; j++) sums[c] += (int32_t)u[4 * c + j] * x[j];
    (void)bits;
    return sums;
#endif
}

const char *qlinear_path(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return "AVX-512 VNNI";
#elif defined(__AVXVNNI__)
    return "AVX-VNNI";
#elif defined(__AVX2__)
    return "AVX2";
#else
    return "plain C";
#endif
}

static const int needs_offset =
#if !(defined(__AVX512VNNI__) && defined(__AVX512BW__)) && !defined(__AVXVNNI__) && defined(__AVX2__)
    1;
#else
    0;
#endif

static inline vb load_bytes(const uint8_t *p) { vb v; memcpy(&v, p, sizeof v); return v; }
static inline vf load_floats(const uint8_t *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline int32_t load_quad(const int8_t *p) { int32_t v; memcpy(&v, p, sizeof v); return v; }

/* One row's activations quantized: q [k] int8; per block: the scale, the integer sum of q, and scale * sum. */
struct qrows { int8_t *q; float *scale, *scaled_sum; int32_t *sum; };

/* Quantize rows [first, last) of x [m, k] per block of 32. */
static void quantize_rows(const float *x, int64_t k, struct qrows a, int64_t first, int64_t last) {
    const int64_t blocks = k / QBLOCK;
    for (int64_t r = first; r < last; r++)
        for (int64_t b = 0; b < blocks; b++) {
            const float *v = x + r * k + b * QBLOCK;
            float amax = 0;
            for (int i = 0; i < QBLOCK; i++) amax = fmaxf(amax, fabsf(v[i]));
            const float scale = amax / 127, inverse = amax > 0 ? 127 / amax : 0;
            int32_t sum = 0;
            for (int i = 0; i < QBLOCK; i++) {
                const int8_t q = (int8_t)lrintf(v[i] * inverse);
                a.q[r * k + b * QBLOCK + i] = q;
                sum += q;
            }
            a.scale[r * blocks + b] = scale;
            a.sum[r * blocks + b] = sum;
            a.scaled_sum[r * blocks + b] = scale * (float)sum;
        }
}

/* `rows` rows (from `row`) of the activations against one panel; writes out[rows, width]. */
static inline __attribute__((always_inline)) void qtile(const int rows, const int bits, struct qrows a, int64_t row,
        int64_t k, const uint8_t *panel, const float *bias, float *out, int64_t out_stride, int64_t width) {
    const int64_t blocks = k / QBLOCK, block_bytes = qlinear_block_bytes(bits);
    vf acc[QROWS] = {{0}};
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *block = panel + b * block_bytes, *u = block + HEADER;
        vi sums[QROWS] = {{0}};
        if (bits == 8) {
            for (int g = 0; g < 8; g++) {
                const vb w = load_bytes(u + g * sizeof(vb));
                for (int i = 0; i < rows; i++)
                    sums[i] = dot4(sums[i], w, load_quad(a.q + (row + i) * k + b * QBLOCK + 4 * g), 8);
            }
        } else {
            for (int g = 0; g < 4; g++) {
                const vb packed = load_bytes(u + g * sizeof(vb)), low = packed & 15, high = packed >> 4;
                for (int i = 0; i < rows; i++) {
                    const int8_t *q = a.q + (row + i) * k + b * QBLOCK + 4 * g;
                    sums[i] = dot4(dot4(sums[i], low, load_quad(q), 4), high, load_quad(q + 16), 4);
                }
            }
        }
        const vf d = load_floats(block), m = load_floats(block + HEADER / 2);
        for (int i = 0; i < rows; i++) {
            const int64_t at = (row + i) * blocks + b;
            if (bits == 8 && needs_offset) sums[i] += 128 * a.sum[at];
            acc[i] += d * (__builtin_convertvector(sums[i], vf) * a.scale[at]) + m * a.scaled_sum[at];
        }
    }
    const vf b = width == QCOLS && bias ? load_floats((const uint8_t *)bias) : (vf){0};
    for (int i = 0; i < rows; i++) {
        float *o = out + i * out_stride;
        if (width == QCOLS) {  /* one store: a copy loop here became a call to memcpy per row, 11% of a step */
            const vf sums = acc[i] + b;
            memcpy(o, &sums, sizeof sums);
        } else {
            for (int64_t c = 0; c < width; c++) o[c] = acc[i][c] + (bias ? bias[c] : 0);
        }
    }
}

/* Columns panels [first, last) for every row, a tile of rows at a time. */
static void qpanels(const int bits, struct qrows a, int64_t m, int64_t k, const uint8_t *packed, int64_t n,
                    const float *bias, float *out, int64_t first, int64_t last) {
    const int64_t panel_bytes = k / QBLOCK * qlinear_block_bytes(bits);
    for (int64_t p = first; p < last; p++)
        for (int64_t r = 0; r < m; r += QROWS) {
            const uint8_t *panel = packed + p * panel_bytes;
            const float *b = bias ? bias + p * QCOLS : NULL;
            float *o = out + r * n + p * QCOLS;
            const int64_t width = min64(n - p * QCOLS, QCOLS);
#define QTILE(R) case R: qtile(R, bits, a, r, k, panel, b, o, n, width); break;
            switch (min64(m - r, QROWS)) {
#if QROWS == 8
                QTILE(8) QTILE(7) QTILE(6) QTILE(5) QTILE(4) QTILE(3)
#endif
                QTILE(2) QTILE(1)
            }
        }
}

/* x: [m, k], k a multiple of 32; packed: [ceil(n / 16), k / 32, qlinear_block_bytes(bits)]; bias: [n] or NULL;
   out: [m, n]. Threads quantize a share of the rows each, then take a run of panels each over all rows. Returns
   OK, or OUT_OF_MEMORY for the activations' work space. */
int qlinear(const float *x, int64_t m, int64_t k, const uint8_t *packed, int bits, int64_t n, const float *bias,
            float *out, int num_threads) {
    if (m == 0) return OK;
    const int64_t blocks = k / QBLOCK;
    struct qrows a = {malloc(m * k), malloc(m * blocks * sizeof(float)), malloc(m * blocks * sizeof(float)),
                      malloc(m * blocks * sizeof(int32_t))};
    int status = OK;
    if (!a.q || !a.scale || !a.scaled_sum || !a.sum) {
        status = OUT_OF_MEMORY;
        goto done;
    }
    const int64_t panels = (n + QCOLS - 1) / QCOLS;
    #pragma omp parallel num_threads(num_threads) if (m * n * k >= 1 << 18)
    {
        int64_t first, last;
        thread_share(m, &first, &last);
        quantize_rows(x, k, a, first, last);
        #pragma omp barrier
        thread_share(panels, &first, &last);
        if (bits == 8) qpanels(8, a, m, k, packed, n, bias, out, first, last);
        else qpanels(4, a, m, k, packed, n, bias, out, first, last);
    }
done:
    free(a.q);
    free(a.scale);
    free(a.scaled_sum);
    free(a.sum);
    return status;
}
