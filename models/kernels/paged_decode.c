/* Paged attention for decoding on the CPU, float32: one new query token per sequence attends over its
   cached keys and values, read in place from the block pool (the PyTorch path copies them out first).
   Compiled at start for one model: HEAD_DIM, KV_HEADS and GROUP (query heads per KV head) are -D flags,
   so that the inner loops have fixed lengths and vectorize fully. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define HEADS (KV_HEADS * GROUP)
#define TOKEN_STRIDE (KV_HEADS * HEAD_DIM)

enum { OK, OUT_OF_MEMORY, BAD_LENGTH, BAD_BLOCK };

/* What would make one sequence read out of bounds, checked before any read. */
static int sequence_problem(int64_t len, const int64_t *table, int64_t table_width, int64_t block_size,
                            int64_t num_blocks) {
    if (len < 1 || len > table_width * block_size) return BAD_LENGTH;
    for (int64_t b = 0; b < (len + block_size - 1) / block_size; b++)
        if (table[b] < 0 || table[b] >= num_blocks) return BAD_BLOCK;
    return OK;
}

static const float *cached_token(const float *pool, const int64_t *table, int64_t t, int64_t block_size) {
    return pool + (table[t / block_size] * block_size + t % block_size) * TOKEN_STRIDE;
}

/* q, out: [seqs, HEADS, HEAD_DIM]; cache: [2, num_blocks, block_size, KV_HEADS, HEAD_DIM] (keys, then values);
   block_tables: [seqs, table_width]; context_lens: [seqs]. Returns OK, or the worst problem of any sequence
   (whose output is then left unwritten). Inputs must be finite: -ffast-math assumes no inf or NaN. */
int paged_decode(const float *q, const float *cache, const int64_t *block_tables, const int64_t *context_lens,
                 float *out, int64_t seqs, int64_t num_blocks, int64_t block_size, int64_t table_width,
                 float scale, int num_threads) {
    const float *keys = cache, *values = cache + num_blocks * block_size * TOKEN_STRIDE;
    int failure = OK;
    #pragma omp parallel for schedule(dynamic) num_threads(num_threads) reduction(max:failure)
    for (int64_t s = 0; s < seqs; s++) {
        const int64_t len = context_lens[s], *table = block_tables + s * table_width;
        int problem = sequence_problem(len, table, table_width, block_size, num_blocks);
        float *scores = problem ? NULL : malloc(sizeof(float) * len * HEADS);  /* [HEADS, len] */
        if (scores == NULL) {
            problem = problem ? problem : OUT_OF_MEMORY;
            failure = problem > failure ? problem : failure;
            continue;
        }
        const float *qs = q + s * HEADS * HEAD_DIM;
        for (int64_t t = 0; t < len; t++) {
            const float *k = cached_token(keys, table, t, block_size);
            for (int h = 0; h < HEADS; h++) {
                const float *qh = qs + h * HEAD_DIM, *kh = k + h / GROUP * HEAD_DIM;
                float dot = 0;
                for (int d = 0; d < HEAD_DIM; d++) dot += qh[d] * kh[d];
                scores[h * len + t] = dot * scale;
            }
        }
        float total[HEADS];
        for (int h = 0; h < HEADS; h++) {  /* exact softmax: this pass needs every score of the row */
            float *row = scores + h * len, top = row[0], sum = 0;
            for (int64_t t = 1; t < len; t++) top = row[t] > top ? row[t] : top;
            for (int64_t t = 0; t < len; t++) row[t] = expf(row[t] - top);
            for (int64_t t = 0; t < len; t++) sum += row[t];
            total[h] = sum;
        }
        float acc[HEADS * HEAD_DIM] = {0};
        for (int64_t t = 0; t < len; t++) {
            const float *v = cached_token(values, table, t, block_size);
            for (int h = 0; h < HEADS; h++) {
                const float p = scores[h * len + t], *vh = v + h / GROUP * HEAD_DIM;
                for (int d = 0; d < HEAD_DIM; d++) acc[h * HEAD_DIM + d] += p * vh[d];
            }
        }
        for (int i = 0; i < HEADS * HEAD_DIM; i++) out[s * HEADS * HEAD_DIM + i] = acc[i] / total[i / HEAD_DIM];
        free(scores);
    }
    return failure;
}
