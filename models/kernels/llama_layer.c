/* A whole Llama decoder layer for a batch of one-token sequences on the CPU, float32, in one call: the same
   steps as `LlamaDecoderLayer.forward`, with the other kernels doing the heavy ones. Called from Python, a
   one-token step ran ~14 operations per layer at a few microseconds of dispatch each, about a fifth of the
   step of a small model; the whole layer is now one call (~11 us of Python for its checks). HEAD_DIM,
   KV_HEADS and GROUP are -D flags, as for `paged_decode.c`. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#define HEADS (KV_HEADS * GROUP)
#define Q_SIZE (HEADS * HEAD_DIM)
#define KV_SIZE (KV_HEADS * HEAD_DIM)
#define QKV_SIZE (Q_SIZE + 2 * KV_SIZE)
#define PARALLEL_ELEMENTS 65536 /* below this many elements an elementwise pass is not worth waking threads */

/* One layer's weights (the linear ones packed for `linear`, biases NULL when absent). */
struct llama_layer {
    const float *input_norm, *qkv, *qkv_bias, *o, *o_bias, *post_norm, *gate_up, *gate_up_bias, *down, *down_bias;
    int64_t hidden, intermediate;
    float eps;
};

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

/* gate_up: [rows, 2 * width], the gate's columns then the up projection's; act: [rows, width] = silu(gate) * up. */
static void silu_mul(const float *gate_up, float *act, int64_t rows, int64_t width, int num_threads) {
    #pragma omp parallel for num_threads(num_threads) if (rows * width >= PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < width; i++) {
            const float gate = gate_up[r * 2 * width + i];
            act[r * width + i] = gate / (1.0f + expf(-gate)) * gate_up[r * 2 * width + width + i];
        }
}

/* The scratch floats `llama_decode_layer` needs for `seqs` sequences. */
int64_t llama_layer_scratch(int64_t seqs, int64_t hidden, int64_t intermediate) {
    return seqs * (hidden + QKV_SIZE + 2 * Q_SIZE + 3 * intermediate);
}

/* x, out: [seqs, hidden]; rotation: [seqs, HEAD_DIM / 2, 2], the (cos, sin) of each sequence's position; cache,
   block_tables and context_lens as for `paged_decode` (the lengths count the new token); slots: [seqs], the cache
   slot of each new token. Returns OK, or the problem that stopped it: slots are checked before anything is
   written, block tables and lengths by `paged_decode` (after the new keys and values are written). */
int llama_decode_layer(const struct llama_layer *w, const float *x, float *out, int64_t seqs, const float *rotation,
                       float *cache, const int64_t *slots, const int64_t *block_tables, const int64_t *context_lens,
                       int64_t num_blocks, int64_t block_size, int64_t table_width, float scale, float *scratch,
                       int num_threads) {
    const int64_t hidden = w->hidden, inter = w->intermediate, pool_slots = num_blocks * block_size;
    for (int64_t s = 0; s < seqs; s++)
        if (slots[s] < 0 || slots[s] >= pool_slots) return BAD_SLOT;
    float *normed = scratch, *qkv = normed + seqs * hidden, *q = qkv + seqs * QKV_SIZE, *attn = q + seqs * Q_SIZE;
    float *gate_up = attn + seqs * Q_SIZE, *act = gate_up + seqs * 2 * inter;

    rms_norm(x, w->input_norm, normed, seqs, hidden, w->eps, num_threads);
    linear(normed, seqs, hidden, w->qkv, QKV_SIZE, w->qkv_bias, qkv, num_threads);
    for (int64_t s = 0; s < seqs; s++) {  /* rotate q and k; q to its own rows, k and v into the cache */
        float *row = qkv + s * QKV_SIZE;
        rotate(row, rotation + s * HEAD_DIM, HEADS + KV_HEADS);
        memcpy(q + s * Q_SIZE, row, sizeof(float) * Q_SIZE);
        memcpy(cache + slots[s] * KV_SIZE, row + Q_SIZE, sizeof(float) * KV_SIZE);
        memcpy(cache + (pool_slots + slots[s]) * KV_SIZE, row + Q_SIZE + KV_SIZE, sizeof(float) * KV_SIZE);
    }
    const int status = paged_decode(q, cache, block_tables, context_lens, attn, seqs, num_blocks, block_size,
                                    table_width, scale, num_threads);
    if (status != OK) return status;
    linear(attn, seqs, Q_SIZE, w->o, hidden, w->o_bias, normed, num_threads);
    add(out, x, normed, seqs * hidden, num_threads);

    rms_norm(out, w->post_norm, normed, seqs, hidden, w->eps, num_threads);
    linear(normed, seqs, hidden, w->gate_up, 2 * inter, w->gate_up_bias, gate_up, num_threads);
    silu_mul(gate_up, act, seqs, inter, num_threads);
    linear(act, seqs, inter, w->down, hidden, w->down_bias, normed, num_threads);
    add(out, out, normed, seqs * hidden, num_threads);
    return OK;
}
