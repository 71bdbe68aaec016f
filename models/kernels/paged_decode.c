/* Paged attention on the CPU, float32 (over keys and values cached in float32, or in bfloat16 with -DCACHE_BF16,
   widened as they are read): each query token attends over its sequence's cached keys and values, read in place
   from the block pool (the PyTorch path copies them out first). Every token is computed so, prefill and
   decode alike: a sequence's new tokens are a run of queries, each seeing the tokens up to its own (the caller has
   written all their keys and values first).

   A query's result depends on its own context alone, bit for bit: not on the other queries of the batch, how a
   prompt is cut into chunks, or the number of threads. Its context is cut into parts of PART_TOKENS tokens at fixed
   places, each part is attended with the same arithmetic wherever it runs, and the parts are merged by one formula
   (as flash-decoding does; the parts also let threads share one long sequence). Queries of one sequence go in tiles
   that read each part's keys and values once for all of them; a query's arithmetic in a tile is its arithmetic
   alone, as every step below is per query.

   Compiled at start for one model: HEAD_DIM, KV_HEADS and GROUP (query heads per KV head) are -D flags, so that the
   inner loops have fixed lengths and vectorize fully. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define HEADS (KV_HEADS * GROUP)
#define TOKEN_STRIDE (KV_HEADS * HEAD_DIM)
#define PART_TOKENS 256 /* a multiple of VEC: a part's groups of VEC tokens begin at fixed places too */
#define TILE 8          /* queries of one sequence that read a part's keys and values together */

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

/* The next token's offset in the pool's keys or values, in elements. */
static inline int64_t next_offset(struct token_walk *w) {
    const int64_t slot = w->table[w->block] * w->block_size + w->offset;
    if (++w->offset == w->block_size) w->offset = 0, w->block++;
    return slot * TOKEN_STRIDE;
}

/* Chunk c of a cached head, widened to float32. */
static inline vec load_cached(const cache_t *head, int c) {
#ifdef CACHE_BF16
    typedef uint16_t halves __attribute__((vector_size(VEC * sizeof(uint16_t))));
    halves h = {0};
    memcpy(&h, head + c * VEC, sizeof(uint16_t) * (c == CHUNKS - 1 ? TAIL : VEC));
    return (vec)(__builtin_convertvector(h, lanes) << 16);
#else
    return load_chunk(head, c);
#endif
}

static inline void prefetch_token(const cache_t *token) {
    for (size_t byte = 0; byte < TOKEN_STRIDE * sizeof(cache_t); byte += 64)
        __builtin_prefetch((const char *)token + byte, 0, 3);
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

/* The scores of one query's heads for a group of VEC tokens (a zero key for those past the part's end), scaled:
   scores[h * PART_TOKENS + i] for token i of the group. The keys of a token are loaded once for the query heads
   that share them, and the VEC tokens' lanes are summed together. Prefetches the keys at `ahead` (NULL: none), one
   token's with each token scored: a steady trickle rather than a burst that fills the queue of misses. */
static inline void score_group(const float *query, const cache_t *const *keys, const cache_t *const *ahead,
                               float scale, const struct lane_sums *plan, float *scores) {
    vec q[HEADS][CHUNKS], products[HEADS][VEC];  /* per head and token, the lanes whose sum is the score */
    for (int h = 0; h < HEADS; h++)
        UNROLLED for (int c = 0; c < CHUNKS; c++) q[h][c] = load_chunk(query + h * HEAD_DIM, c);
    for (int i = 0; i < VEC; i++) {
        if (ahead && ahead[i]) prefetch_token(ahead[i]);
        UNROLLED for (int g = 0; g < KV_HEADS; g++) {
            vec kc[CHUNKS];
            UNROLLED for (int c = 0; c < CHUNKS; c++) kc[c] = load_cached(keys[i] + g * HEAD_DIM, c);
            UNROLLED for (int h = g * GROUP; h < (g + 1) * GROUP; h++) {
                vec sum = q[h][0] * kc[0];
                UNROLLED for (int c = 1; c < CHUNKS; c++) sum += q[h][c] * kc[c];
                products[h][i] = sum;
            }
        }
    }
    for (int h = 0; h < HEADS; h++) {
        const vec sums = sum_lanes(products[h], plan) * scale;
        memcpy(scores + h * PART_TOKENS, &sums, sizeof sums);
    }
}

/* Exact softmax of one row of scores, before normalizing: row[t] = e^(row[t] - top), total = their sum. */
static void exponentiate(float *row, int64_t len, float *top, float *total) {
    float best = -FLT_MAX, sum = 0;
    for (int64_t t = 0; t < len; t++) best = row[t] > best ? row[t] : best;
    for (int64_t t = 0; t < len; t++) row[t] = expf(row[t] - best);
    for (int64_t t = 0; t < len; t++) sum += row[t];
    *top = best;
    *total = sum;
}

/* acc[h] = sum over the part's first `len` tokens t of weights[h * PART_TOKENS + t] * value_t, t in order. */
static void weigh_values(const float *weights, const cache_t *values, const int64_t *offsets, int64_t len, float *acc) {
    vec sums[HEADS][CHUNKS] = {{{0}}};
    for (int64_t t = 0; t < AHEAD && t < len; t++) prefetch_token(values + offsets[t]);
    for (int64_t t = 0; t < len; t++) {
        const cache_t *v = values + offsets[t];
        if (t + AHEAD < len) prefetch_token(values + offsets[t + AHEAD]);
        UNROLLED for (int g = 0; g < KV_HEADS; g++)
            UNROLLED for (int c = 0; c < CHUNKS; c++) {
                const vec vc = load_cached(v + g * HEAD_DIM, c);
                UNROLLED for (int h = g * GROUP; h < (g + 1) * GROUP; h++)
                    sums[h][c] += weights[h * PART_TOKENS + t] * vc;
            }
    }
    for (int h = 0; h < HEADS; h++)
        UNROLLED for (int c = 0; c < CHUNKS; c++) store_chunk(acc + h * HEAD_DIM, c, sums[h][c]);
}

#define PART_SIZE (HEADS * HEAD_DIM + 2 * HEADS)  /* one part's acc, top and total, side by side */

/* One query's output from its parts: each part's sums rescaled to the largest top score of all parts. */
static void merge_parts(const float *parts_of_query, int64_t parts, float *out) {
    for (int h = 0; h < HEADS; h++) {
        float best = -FLT_MAX, denominator = 0, weights[parts];
        for (int64_t p = 0; p < parts; p++) {
            const float top = parts_of_query[p * PART_SIZE + HEADS * HEAD_DIM + h];
            best = top > best ? top : best;
        }
        for (int64_t p = 0; p < parts; p++) {
            const float *part = parts_of_query + p * PART_SIZE;
            weights[p] = expf(part[HEADS * HEAD_DIM + h] - best);
            denominator += weights[p] * part[HEADS * HEAD_DIM + HEADS + h];
        }
        for (int d = 0; d < HEAD_DIM; d++) {
            float sum = 0;
            for (int64_t p = 0; p < parts; p++) sum += weights[p] * parts_of_query[p * PART_SIZE + h * HEAD_DIM + d];
            out[h * HEAD_DIM + d] = sum / denominator;
        }
    }
}

static int64_t parts_of(int64_t len) { return (len + PART_TOKENS - 1) / PART_TOKENS; }

/* Where the results go. Query i's output: out + i * HEADS * HEAD_DIM. A query of several parts keeps them at
   parts + (slots[i] + part) * PART_SIZE until all are done, pending[i] counting those still to come. */
struct results { float *out, *parts; const int64_t *slots; int64_t *pending; };

/* A tile of `count` queries of one sequence, queries `query` on (of the batch), query j of the tile seeing the
   sequence's first `first_len + j` tokens, over part `part` of their contexts: for each query with tokens in the
   part, its sums before normalizing, acc[h] = sum over t of e^(score - top[h]) * value_t, total[h] = sum over t of
   e^(score - top[h]), top[h] the largest score of head h; merged into the query's output by the thread that
   computes its last part (or its only one, from this thread's stack). The keys of each group of VEC tokens are
   scored for every query of the tile while they are in the L1 cache, and the values are read from L2 after the
   first query. scores: [TILE][HEADS][PART_TOKENS] of scratch. */
static void attend_tile(const float *q, int64_t query, int64_t count, int64_t first_len, int64_t part,
                        const cache_t *keys, const cache_t *values, const int64_t *table, int64_t block_size, float scale,
                        const struct lane_sums *plan, float *scores, const struct results *r) {
    static const cache_t zero_token[TOKEN_STRIDE];
    const int64_t begin = part * PART_TOKENS, len = min64(PART_TOKENS, first_len + count - 1 - begin);
    const int64_t first = begin < first_len ? 0 : begin - first_len + 1;  /* the first query that sees the part */
    int64_t offsets[PART_TOKENS];  /* of the part's tokens in the pool's keys or values, in elements */
    struct token_walk walk = walk_from(table, block_size, begin);
    for (int64_t t = 0; t < len; t++) offsets[t] = next_offset(&walk);
    for (int64_t t = 0; t < AHEAD && t < len; t++) prefetch_token(keys + offsets[t]);
    for (int64_t group = 0; group < len; group += VEC) {
        const cache_t *k[VEC], *ahead[VEC];
        for (int i = 0; i < VEC; i++) {
            k[i] = group + i < len ? keys + offsets[group + i] : zero_token;
            ahead[i] = group + i + AHEAD < len ? keys + offsets[group + i + AHEAD] : NULL;
        }
        for (int64_t j = first; j < count; j++)
            if (first_len + j > begin + group)  /* query j sees some of the group */
                score_group(q + (query + j) * HEADS * HEAD_DIM, k, j == first ? ahead : NULL, scale, plan,
                            scores + j * HEADS * PART_TOKENS + group);
    }
    for (int64_t j = first; j < count; j++) {
        const int64_t i = query + j, seen = min64(PART_TOKENS, first_len + j - begin), parts = parts_of(first_len + j);
        float alone[PART_SIZE], *acc = parts == 1 ? alone : r->parts + (r->slots[i] + part) * PART_SIZE;
        float *rows = scores + j * HEADS * PART_TOKENS, *top = acc + HEADS * HEAD_DIM, *total = top + HEADS;
        for (int h = 0; h < HEADS; h++) exponentiate(rows + h * PART_TOKENS, seen, top + h, total + h);
        weigh_values(rows, values, offsets, seen, acc);
        if (parts == 1)
            merge_parts(alone, 1, r->out + i * HEADS * HEAD_DIM);
        else if (__atomic_sub_fetch(&r->pending[i], 1, __ATOMIC_ACQ_REL) == 0)  /* acquire: the other parts */
            merge_parts(r->parts + r->slots[i] * PART_SIZE, parts, r->out + i * HEADS * HEAD_DIM);
    }
}

/* What would make the batch read out of bounds, checked before any read: query runs that do not tile
   [0, queries) in order, or outrun their sequence's context; lengths and block ids outside the tables. */
static int batch_problem(const int64_t *block_tables, const int64_t *query_starts, const int64_t *context_lens,
                         int64_t seqs, int64_t queries, int64_t num_blocks, int64_t block_size, int64_t table_width) {
    if (query_starts[0] != 0 || query_starts[seqs] != queries) return BAD_QUERIES;
    for (int64_t s = 0; s < seqs; s++) {
        const int64_t count = query_starts[s + 1] - query_starts[s];
        const int problem = sequence_problem(context_lens[s], block_tables + s * table_width, table_width,
                                             block_size, num_blocks);
        if (problem != OK) return problem;
        if (count < 1 || count > context_lens[s]) return BAD_QUERIES;
    }
    return OK;
}

/* A tile of queries over one part of their contexts: one work item. */
struct tile { int64_t seq, query, count, part; };

/* The work items of the batch: the tiles of each sequence's queries, times the parts of the longest context in each
   tile. Writes them to `tiles` unless NULL; returns how many. */
static int64_t plan_tiles(const int64_t *query_starts, const int64_t *context_lens, int64_t seqs, struct tile *tiles) {
    int64_t items = 0;
    for (int64_t s = 0; s < seqs; s++) {
        const int64_t count = query_starts[s + 1] - query_starts[s], first_len = context_lens[s] - count + 1;
        for (int64_t j = 0; j < count; j += TILE) {
            const int64_t size = min64(TILE, count - j);
            for (int64_t p = 0; p < parts_of(first_len + j + size - 1); p++, items++)
                if (tiles != NULL) tiles[items] = (struct tile){s, query_starts[s] + j, size, p};
        }
    }
    return items;
}

/* A buffer of at least `bytes` for the calling thread, kept from call to call (NULL when out of memory): a fresh one
   of this size each call is a new memory mapping whose pages fault on first touch, which made a decode step of 64
   sequences a fifth slower. */
static void *workspace(size_t bytes) {
    static __thread void *buffer;
    static __thread size_t size;
    if (bytes > size) {
        free(buffer);
        buffer = malloc(bytes);
        size = buffer != NULL ? bytes : 0;
    }
    return buffer;
}

/* q, out: [queries, HEADS, HEAD_DIM]; cache: [2, num_blocks, block_size, KV_HEADS, HEAD_DIM] (keys, then values);
   block_tables: [seqs, table_width]; query_starts: [seqs + 1], sequence s's queries are q[query_starts[s] ..
   query_starts[s + 1]), the last of which sees its first context_lens[s] tokens ([seqs]) and each one before it one
   token fewer. Returns OK, or the first problem found (the output is then left unwritten). Inputs must be finite:
   -ffast-math assumes no inf or NaN. */
int paged_decode(const float *q, const cache_t *cache, const int64_t *block_tables, const int64_t *query_starts,
                 const int64_t *context_lens, float *out, int64_t seqs, int64_t queries, int64_t num_blocks,
                 int64_t block_size, int64_t table_width, float scale, int num_threads) {
    const int problem = batch_problem(block_tables, query_starts, context_lens, seqs, queries, num_blocks, block_size,
                                      table_width);
    if (problem != OK) return problem;
    /* One buffer: the work items, where each query's parts go (slots) and how many are to come (pending), the parts
       of the queries of several, each thread's scores. */
    const int64_t items = plan_tiles(query_starts, context_lens, seqs, NULL), scores_size = TILE * HEADS * PART_TOKENS;
    int64_t stored = 0;
    for (int64_t s = 0; s < seqs; s++)
        for (int64_t len = context_lens[s] - (query_starts[s + 1] - query_starts[s]) + 1; len <= context_lens[s]; len++)
            stored += parts_of(len) > 1 ? parts_of(len) : 0;
    char *buffer = workspace(sizeof(struct tile) * items + sizeof(int64_t) * (2 * queries + 1)
                             + sizeof(float) * (stored * PART_SIZE + num_threads * scores_size));
    if (buffer == NULL) return OUT_OF_MEMORY;
    struct tile *tiles = (struct tile *)buffer;
    int64_t *slots = (int64_t *)(tiles + items), *pending = slots + queries + 1;
    float *parts = (float *)(pending + queries), *scratch = parts + stored * PART_SIZE;
    plan_tiles(query_starts, context_lens, seqs, tiles);
    slots[0] = 0;
    for (int64_t s = 0; s < seqs; s++)
        for (int64_t i = query_starts[s]; i < query_starts[s + 1]; i++) {
            pending[i] = parts_of(context_lens[s] - (query_starts[s + 1] - 1 - i));
            slots[i + 1] = slots[i] + (pending[i] > 1 ? pending[i] : 0);
        }
    const struct lane_sums plan = plan_lane_sums();
    const struct results r = {out, parts, slots, pending};
    const cache_t *keys = cache, *values = cache + num_blocks * block_size * TOKEN_STRIDE;
    #pragma omp parallel for schedule(dynamic) num_threads(num_threads)
    for (int64_t i = 0; i < items; i++) {
        const struct tile w = tiles[i];
        const int64_t first_len = context_lens[w.seq] - (query_starts[w.seq + 1] - w.query) + 1;
        int thread = 0;
#ifdef _OPENMP
        thread = omp_get_thread_num();
#endif
        attend_tile(q, w.query, w.count, first_len, w.part, keys, values, block_tables + w.seq * table_width,
                    block_size, scale, &plan, scratch + thread * scores_size, &r);
    }
    return OK;
}
