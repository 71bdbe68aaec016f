/* Paged attention for decoding on the CPU, float32: one new query token per sequence attends over its
   cached keys and values, read in place from the block pool (the PyTorch path copies them out first).
   Compiled at start for one model: HEAD_DIM, KV_HEADS and GROUP (query heads per KV head) are -D flags,
   so that the inner loops have fixed lengths and vectorize fully. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define HEADS (KV_HEADS * GROUP)
#define TOKEN_STRIDE (KV_HEADS * HEAD_DIM)

/* What would make one sequence read out of bounds, checked before any read. */
static int sequence_problem(int64_t len, const int64_t *table, int64_t table_width, int64_t block_size,
                            int64_t num_blocks) {
    if (len < 1 || len > table_width * block_size) return BAD_LENGTH;
    for (int64_t b = 0; b < (len + block_size - 1) / block_size; b++)
        if (table[b] < 0 || table[b] >= num_blocks) return BAD_BLOCK;
    return OK;
}

#define LEVELS (VEC == 16 ? 4 : VEC == 8 ? 3 : 2) /* log2(VEC) */
#define CHUNKS ((HEAD_DIM + VEC - 1) / VEC) /* vectors per head; the last one holds TAIL floats of it */
#define TAIL (HEAD_DIM - (CHUNKS - 1) * VEC)
/* Tokens whose keys (or values) are prefetched ahead of the one in use: a sequence's blocks lie anywhere in the
   pool, and the hardware prefetcher stops at each page. Measured best of 8, 12, 16, 24 and 32. */
#define AHEAD 12
#define UNROLLED _Pragma("GCC unroll 16") /* loops of a few fixed steps over vectors, so they stay in registers */

typedef int32_t lanes __attribute__((vector_size(VEC * sizeof(int32_t))));

/* Chunk c of a head (zeros past the head's end), and back. */
static inline vec load_chunk(const float *head, int c) {
    vec v = {0};
    memcpy(&v, head + c * VEC, sizeof(float) * (c == CHUNKS - 1 ? TAIL : VEC));
    return v;
}

static inline void store_chunk(float *head, int c, vec v) {
    memcpy(head + c * VEC, &v, sizeof(float) * (c == CHUNKS - 1 ? TAIL : VEC));
}

/* A sequence's cached tokens in order, without a division per token. */
struct token_walk { const int64_t *table; int64_t block_size, block, offset; };

static struct token_walk walk_from(const int64_t *table, int64_t block_size, int64_t t) {
    return (struct token_walk){table, block_size, t / block_size, t % block_size};
}

/* The next token's offset in the pool's keys or values, in floats. */
static inline int64_t next_offset(struct token_walk *w) {
    const int64_t slot = w->table[w->block] * w->block_size + w->offset;
    if (++w->offset == w->block_size) w->offset = 0, w->block++;
    return slot * TOKEN_STRIDE;
}

static inline void prefetch_token(const float *token) {
    for (int line = 0; line < TOKEN_STRIDE; line += 16) __builtin_prefetch(token + line, 0, 3);
}

/* Sums of the lanes of VEC vectors at once, with shuffles (a transpose and add) where one vector's lanes would
   take LEVELS shuffles and adds of their own: each level pairs up the vectors and halves the lanes that each one
   gives to a vector of the pair, until one vector holds every sum, in bit-reversed order, which `order` undoes.
   The index vectors are built once per call and kept in registers (computed inside the loop, GCC did not fold
   them into constants: the kernel ran at half speed). */
struct lane_sums { lanes low[LEVELS], high[LEVELS], order; };

static struct lane_sums plan_lane_sums(void) {
    struct lane_sums plan;
    for (int level = 0, half = VEC / 2; level < LEVELS; level++, half /= 2)
        for (int j = 0; j < VEC; j++) {
            const int pair = j / (2 * half), within = j % (2 * half);
            plan.low[level][j] = (within < half ? 0 : VEC) + pair * 2 * half + within % half;
            plan.high[level][j] = plan.low[level][j] + half;
        }
    for (int j = 0; j < VEC; j++) {
        plan.order[j] = 0;
        for (int bit = 0; bit < LEVELS; bit++) plan.order[j] |= (j >> bit & 1) << (LEVELS - 1 - bit);
    }
    return plan;
}

/* in[VEC] (overwritten) -> a vector of the sums of each one's lanes. */
static inline vec sum_lanes(vec *in, const struct lane_sums *plan) {
    UNROLLED for (int level = 0, count = VEC / 2; level < LEVELS; level++, count /= 2)
        UNROLLED for (int i = 0; i < count; i++)
            in[i] = __builtin_shuffle(in[2 * i], in[2 * i + 1], plan->low[level])
                    + __builtin_shuffle(in[2 * i], in[2 * i + 1], plan->high[level]);
    return __builtin_shuffle(in[0], plan->order);
}

/* Attention of one sequence's query heads `qs` over its cached tokens [begin, end), before normalizing:
   acc[h] = sum over t of e^(score - top[h]) * value_t, and total[h] = sum over t of e^(score - top[h]), with top[h]
   the largest score of head h (-FLT_MAX and zeros for an empty range). Each token's keys and values are loaded
   once for all query heads, and the scores of VEC tokens are summed together. */
static int attend(const float *qs, const float *keys, const float *values, const int64_t *table, int64_t block_size,
                  int64_t begin, int64_t end, float scale, const struct lane_sums *plan, float *acc, float *top,
                  float *total) {
    const int64_t len = end - begin, padded = (len + VEC - 1) / VEC * VEC;
    float *scores = malloc(sizeof(float) * (padded > 0 ? padded : 1) * HEADS);  /* [HEADS, padded] */
    if (scores == NULL) return OUT_OF_MEMORY;
    vec q[HEADS][CHUNKS];
    for (int h = 0; h < HEADS; h++)
        UNROLLED for (int c = 0; c < CHUNKS; c++) q[h][c] = load_chunk(qs + h * HEAD_DIM, c);
    struct token_walk walk = walk_from(table, block_size, begin), ahead = walk;
    for (int64_t t = 0; t < AHEAD && t < len; t++) prefetch_token(keys + next_offset(&ahead));
    for (int64_t first = 0; first < len; first += VEC) {
        vec products[HEADS][VEC];  /* per head and token, the lanes whose sum is the score */
        for (int i = 0; i < VEC; i++) {
            const float *k = first + i < len ? keys + next_offset(&walk) : NULL;
            if (first + i + AHEAD < len) prefetch_token(keys + next_offset(&ahead));
            UNROLLED for (int g = 0; g < KV_HEADS; g++) {
                vec kc[CHUNKS];
                UNROLLED for (int c = 0; c < CHUNKS; c++) kc[c] = k ? load_chunk(k + g * HEAD_DIM, c) : (vec){0};
                UNROLLED for (int h = g * GROUP; h < (g + 1) * GROUP; h++) {
                    vec sum = q[h][0] * kc[0];
                    UNROLLED for (int c = 1; c < CHUNKS; c++) sum += q[h][c] * kc[c];
                    products[h][i] = sum;
                }
            }
        }
        for (int h = 0; h < HEADS; h++) {
            const vec sums = sum_lanes(products[h], plan) * scale;
            memcpy(scores + h * padded + first, &sums, sizeof sums);
        }
    }
    for (int h = 0; h < HEADS; h++) {  /* exact softmax: this pass needs every score of the row */
        float *row = scores + h * padded, best = -FLT_MAX, sum = 0;
        for (int64_t t = 0; t < len; t++) best = row[t] > best ? row[t] : best;
        for (int64_t t = 0; t < len; t++) row[t] = expf(row[t] - best);
        for (int64_t t = 0; t < len; t++) sum += row[t];
        top[h] = best;
        total[h] = sum;
    }
    vec sums[HEADS][CHUNKS] = {{{0}}};
    walk = ahead = walk_from(table, block_size, begin);
    for (int64_t t = 0; t < AHEAD && t < len; t++) prefetch_token(values + next_offset(&ahead));
    for (int64_t t = 0; t < len; t++) {
        const float *v = values + next_offset(&walk);
        if (t + AHEAD < len) prefetch_token(values + next_offset(&ahead));
        UNROLLED for (int g = 0; g < KV_HEADS; g++)
            UNROLLED for (int c = 0; c < CHUNKS; c++) {
                const vec vc = load_chunk(v + g * HEAD_DIM, c);
                UNROLLED for (int h = g * GROUP; h < (g + 1) * GROUP; h++) sums[h][c] += scores[h * padded + t] * vc;
            }
    }
    for (int h = 0; h < HEADS; h++)
        UNROLLED for (int c = 0; c < CHUNKS; c++) store_chunk(acc + h * HEAD_DIM, c, sums[h][c]);
    free(scores);
    return OK;
}

#define PART_SIZE (HEADS * HEAD_DIM + 2 * HEADS)  /* one part's acc, top and total, side by side */

/* One sequence's output from its parts: each part's sums rescaled to the largest top score of all parts. */
static void merge_parts(const float *parts_of_seq, int64_t parts, float *out) {
    for (int h = 0; h < HEADS; h++) {
        float best = -FLT_MAX, denominator = 0, weights[parts];
        for (int64_t p = 0; p < parts; p++) {
            const float top = parts_of_seq[p * PART_SIZE + HEADS * HEAD_DIM + h];
            best = top > best ? top : best;
        }
        for (int64_t p = 0; p < parts; p++) {
            const float *part = parts_of_seq + p * PART_SIZE;
            const float total = part[HEADS * HEAD_DIM + HEADS + h];
            weights[p] = total > 0 ? expf(part[HEADS * HEAD_DIM + h] - best) : 0;  /* empty parts weigh nothing */
            denominator += weights[p] * total;
        }
        for (int d = 0; d < HEAD_DIM; d++) {
            float sum = 0;
            for (int64_t p = 0; p < parts; p++) sum += weights[p] * parts_of_seq[p * PART_SIZE + h * HEAD_DIM + d];
            out[h * HEAD_DIM + d] = sum / denominator;
        }
    }
}

/* q, out: [seqs, HEADS, HEAD_DIM]; cache: [2, num_blocks, block_size, KV_HEADS, HEAD_DIM] (keys, then values);
   block_tables: [seqs, table_width]; context_lens: [seqs]. Returns OK, or the worst problem of any sequence
   (the output is then left unwritten). Inputs must be finite: -ffast-math assumes no inf or NaN.
   With fewer sequences than threads, each sequence's tokens are cut into parts that threads attend over
   apart, then merged (as flash-decoding does), so that one long sequence does not leave cores idle. */
int paged_decode(const float *q, const float *cache, const int64_t *block_tables, const int64_t *context_lens,
                 float *out, int64_t seqs, int64_t num_blocks, int64_t block_size, int64_t table_width,
                 float scale, int num_threads) {
    const float *keys = cache, *values = cache + num_blocks * block_size * TOKEN_STRIDE;
    const int64_t parts = seqs >= num_threads ? 1 : (num_threads + seqs - 1) / seqs;
    float *partial = parts > 1 ? malloc(sizeof(float) * seqs * parts * PART_SIZE) : NULL;
    if (parts > 1 && partial == NULL) return OUT_OF_MEMORY;
    const struct lane_sums plan = plan_lane_sums();
    int failure = OK;
    #pragma omp parallel for schedule(dynamic) num_threads(num_threads) reduction(max:failure)
    for (int64_t item = 0; item < seqs * parts; item++) {
        const int64_t s = item / parts, part = item % parts;
        const int64_t len = context_lens[s], *table = block_tables + s * table_width;
        int problem = sequence_problem(len, table, table_width, block_size, num_blocks);
        if (problem == OK) {
            const int64_t chunk = (len + parts - 1) / parts;
            const int64_t begin = min64(part * chunk, len), end = min64(begin + chunk, len);
            float local[PART_SIZE], *result = parts > 1 ? partial + item * PART_SIZE : local;
            float *acc = result, *top = acc + HEADS * HEAD_DIM, *total = top + HEADS;
            problem = attend(q + s * HEADS * HEAD_DIM, keys, values, table, block_size, begin, end, scale, &plan,
                             acc, top, total);
            for (int i = 0; problem == OK && parts == 1 && i < HEADS * HEAD_DIM; i++)
                out[s * HEADS * HEAD_DIM + i] = acc[i] / total[i / HEAD_DIM];
        }
        failure = problem > failure ? problem : failure;
    }
    for (int64_t s = 0; parts > 1 && failure == OK && s < seqs; s++)
        merge_parts(partial + s * parts * PART_SIZE, parts, out + s * HEADS * HEAD_DIM);
    free(partial);
    return failure;
}
