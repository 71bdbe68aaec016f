/* A whole Llama decoder layer on the CPU, float32, in one call: the same steps as `LlamaDecoderLayer.forward`, with
   the other kernels doing the heavy ones. It runs every step of the native backend, prefill and decode: each token
   is one row of the products and one query of `paged_decode` over its own sequence's cache, and every step here
   is a function of the token's row alone, so that a token's output does not depend on the batch around it. (From
   Python a one-token step ran ~14 operations per layer at a few microseconds of dispatch each, about a fifth of
   the step of a small model; the whole layer is one call, ~11 us of Python for its checks.) HEAD_DIM, KV_HEADS and
   GROUP are -D flags, as for `paged_decode.c`. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#define HEADS (KV_HEADS * GROUP)
#define Q_SIZE (HEADS * HEAD_DIM)
#define KV_SIZE (KV_HEADS * HEAD_DIM)
#define QKV_SIZE (Q_SIZE + 2 * KV_SIZE)
#define PARALLEL_ELEMENTS 65536 /* below this many elements an elementwise pass is not worth waking threads */

/* A linear layer's weight: float32 packed for `linear` (bits 32), bfloat16 for `bf16linear` (16), or quantized
   blocks for `qlinear` (8 or 4). */
struct matrix {
    const void *weight;
    const float *bias; /* NULL when absent */
    int64_t bits;
};

/* One layer's weights. */
struct llama_layer {
    const float *input_norm;
    struct matrix qkv, o;
    const float *post_norm;
    struct matrix gate_up, down;
    int64_t hidden, intermediate;
    float eps;
};

static int matmul(const struct matrix *w, const float *x, int64_t m, int64_t k, int64_t n, float *out,
                  int num_threads) {
    if (w->bits == 16) return bf16linear(x, m, k, w->weight, n, w->bias, out, num_threads);
    if (w->bits != 32) return qlinear(x, m, k, w->weight, (int)w->bits, n, w->bias, out, num_threads);
    linear(x, m, k, w->weight, n, w->bias, out, num_threads);
    return OK;
}

/* Rotate each (even, odd) pair of `heads` heads by its (cos, sin) in `rotation`, as a complex product. */
static void rotate(float *x, const float *rotation, int heads) {
    for (int h = 0; h < heads; h++)
        for (int i = 0; i < HEAD_DIM / 2; i++) {
            float *pair = x + h * HEAD_DIM + 2 * i;
            const float cosine = rotation[2 * i], sine = rotation[2 * i + 1], even = pair[0], odd = pair[1];
            pair[0] = even * cosine - odd * sine;
            pair[1] = even * sine + odd * cosine;
        }
}

static void add(float *out, const float *x, const float *y, int64_t n, int num_threads) {
    #pragma omp parallel for num_threads(num_threads) if (n >= PARALLEL_ELEMENTS)
    for (int64_t i = 0; i < n; i++) out[i] = x[i] + y[i];
}

/* gate_up: [rows, 2 * width], the gate's columns then the up projection's; act: [rows, width] = silu(gate) * up.
   Each row by one thread, start to end: its vectorized and scalar steps fall on the same columns whatever the rows
   (PyTorch's silu splits the elements between threads anywhere, and its vector and scalar exp round differently). */
void silu_mul(const float *gate_up, float *act, int64_t rows, int64_t width, int num_threads) {
    #pragma omp parallel for num_threads(num_threads) if (rows * width >= PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < width; i++) {
            const float gate = gate_up[r * 2 * width + i];
            act[r * width + i] = gate / (1.0f + expf(-gate)) * gate_up[r * 2 * width + width + i];
        }
}

/* The scratch floats `llama_layer_forward` needs for `tokens` tokens. */
int64_t llama_layer_scratch(int64_t tokens, int64_t hidden, int64_t intermediate) {
    return tokens * (hidden + QKV_SIZE + 2 * Q_SIZE + 3 * intermediate);
}

/* Rotate each token's q and k; q to its own rows, k and v into the cache at the token's slot. */
static void rotate_and_cache(float *qkv, const float *rotation, const int64_t *slots, float *q, cache_t *cache,
                             int64_t pool_slots, int64_t tokens, int num_threads) {
    #pragma omp parallel for num_threads(num_threads) if (tokens * QKV_SIZE >= PARALLEL_ELEMENTS)
    for (int64_t t = 0; t < tokens; t++) {
        float *row = qkv + t * QKV_SIZE;
        rotate(row, rotation + t * HEAD_DIM, HEADS + KV_HEADS);
        memcpy(q + t * Q_SIZE, row, sizeof(float) * Q_SIZE);
        cache_t *key = cache + slots[t] * KV_SIZE, *value = cache + (pool_slots + slots[t]) * KV_SIZE;
        for (int i = 0; i < KV_SIZE; i++) {
            key[i] = to_cache(row[Q_SIZE + i]);
            value[i] = to_cache(row[Q_SIZE + KV_SIZE + i]);
        }
    }
}

/* x, out: [tokens, hidden]; rotation: [tokens, HEAD_DIM / 2, 2], the (cos, sin) of each token's position; slots:
   [tokens], the cache slot of each token; cache, block_tables [seqs, table_width], query_starts [seqs + 1] and
   context_lens [seqs] as for `paged_decode`: sequence s's tokens are rows query_starts[s] .. query_starts[s + 1] of
   x, and the lengths count them. Returns OK, or the problem that stopped it: slots are checked before anything is
   written, the rest by `paged_decode` (after the new keys and values are written, all of them before any query
   reads the cache). */
int llama_layer_forward(const struct llama_layer *w, const float *x, float *out, int64_t tokens,
                        const float *rotation, cache_t *cache, const int64_t *slots, int64_t seqs,
                        const int64_t *query_starts, const int64_t *block_tables, const int64_t *context_lens,
                        int64_t num_blocks, int64_t block_size, int64_t table_width, float scale, float *scratch,
                        int num_threads) {
    const int64_t hidden = w->hidden, inter = w->intermediate, pool_slots = num_blocks * block_size;
    for (int64_t t = 0; t < tokens; t++)
        if (slots[t] < 0 || slots[t] >= pool_slots) return BAD_SLOT;
    float *normed = scratch, *qkv = normed + tokens * hidden, *q = qkv + tokens * QKV_SIZE, *attn = q + tokens * Q_SIZE;
    float *gate_up = attn + tokens * Q_SIZE, *act = gate_up + tokens * 2 * inter;

    int status;
    rms_norm(x, w->input_norm, normed, tokens, hidden, w->eps, num_threads);
    if ((status = matmul(&w->qkv, normed, tokens, hidden, QKV_SIZE, qkv, num_threads))) return status;
    rotate_and_cache(qkv, rotation, slots, q, cache, pool_slots, tokens, num_threads);
    status = paged_decode(q, cache, block_tables, query_starts, context_lens, attn, seqs, tokens, num_blocks,
                          block_size, table_width, scale, num_threads);
    if (status || (status = matmul(&w->o, attn, tokens, Q_SIZE, hidden, normed, num_threads))) return status;
    add(out, x, normed, tokens * hidden, num_threads);

    rms_norm(out, w->post_norm, normed, tokens, hidden, w->eps, num_threads);
    if ((status = matmul(&w->gate_up, normed, tokens, hidden, 2 * inter, gate_up, num_threads))) return status;
    silu_mul(gate_up, act, tokens, inter, num_threads);
    if ((status = matmul(&w->down, act, tokens, inter, hidden, normed, num_threads))) return status;
    add(out, out, normed, tokens * hidden, num_threads);
    return OK;
}
