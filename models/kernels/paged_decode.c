/* Paged attention for decoding on the CPU, float32: one new query token per sequence attends over its
   cached keys and values, read in place from the block pool (the PyTorch path copies them out first).
   Compiled at start for one model: HEAD_DIM, KV_HEADS and GROUP (query heads per KV head) are -D flags,
   so that the inner loops have fixed lengths and vectorize fully. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

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

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

static const float *cached_token(const float *pool, const int64_t *table, int64_t t, int64_t block_size) {
    return pool + (table[t / block_size] * block_size + t % block_size) * TOKEN_STRIDE;
}

/* Attention of one sequence's query heads `qs` over its cached tokens [begin, end), before normalizing:
   acc[h] = sum over t of e^(score - top[h]) * value_t, and total[h] = sum over t of e^(score - top[h]), with top[h]
   the largest score of head h (-FLT_MAX and zeros for an empty range). */
static int attend(const float *qs, const float *keys, const float *values, const int64_t *table, int64_t block_size,
                  int64_t begin, int64_t end, float scale, float *acc, float *top, float *total) {
    const int64_t len = end - begin;
    float *scores = malloc(sizeof(float) * (len > 0 ? len : 1) * HEADS);  /* [HEADS, len] */
    if (scores == NULL) return OUT_OF_MEMORY;
    for (int64_t t = 0; t < len; t++) {
        const float *k = cached_token(keys, table, begin + t, block_size);
        for (int h = 0; h < HEADS; h++) {
            const float *qh = qs + h * HEAD_DIM, *kh = k + h / GROUP * HEAD_DIM;
            float dot = 0;
            for (int d = 0; d < HEAD_DIM; d++) dot += qh[d] * kh[d];
            scores[h * len + t] = dot * scale;
        }
    }
    for (int h = 0; h < HEADS; h++) {  /* exact softmax: this pass needs every score of the row */
        float *row = scores + h * len, best = -FLT_MAX, sum = 0;
        for (int64_t t = 0; t < len; t++) best = row[t] > best ? row[t] : best;
        for (int64_t t = 0; t < len; t++) row[t] = expf(row[t] - best);
        for (int64_t t = 0; t < len; t++) sum += row[t];
        top[h] = best;
        total[h] = sum;
    }
    for (int i = 0; i < HEADS * HEAD_DIM; i++) acc[i] = 0;
    for (int64_t t = 0; t < len; t++) {
        const float *v = cached_token(values, table, begin + t, block_size);
        for (int h = 0; h < HEADS; h++) {
            const float p = scores[h * len + t], *vh = v + h / GROUP * HEAD_DIM;
            for (int d = 0; d < HEAD_DIM; d++) acc[h * HEAD_DIM + d] += p * vh[d];
        }
    }
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
            problem = attend(q + s * HEADS * HEAD_DIM, keys, values, table, block_size, begin, end, scale,
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
