/* What the kernels call of each other, the status codes they return (see `models/native.py`) and the vector type
   they share. */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum { OK, OUT_OF_MEMORY, BAD_LENGTH, BAD_BLOCK, BAD_SLOT, BAD_QUERIES };

/* The widest float vectors of the target, for GCC's vector extensions: VEC floats each. */
#if defined(__AVX512F__)
#define VEC 16
#elif defined(__AVX__)
#define VEC 8
#else
#define VEC 4
#endif
typedef float vec __attribute__((vector_size(VEC * sizeof(float))));

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* bfloat16 (the top half of a float32) to nearest with ties to even, as PyTorch rounds; inputs are finite
   (-ffast-math assumes no NaN). */
static inline uint16_t to_bf16(float f) {
    uint32_t bits;
    __builtin_memcpy(&bits, &f, sizeof bits);
    return (uint16_t)((bits + 0x7FFF + (bits >> 16 & 1)) >> 16);
}

/* The KV cache's element: float32, or bfloat16 with -DCACHE_BF16 (half the bytes to hold and to read; rounded when
   written, widened exactly when read). */
#ifdef CACHE_BF16
typedef uint16_t cache_t;
static inline cache_t to_cache(float f) { return to_bf16(f); }
#else
typedef float cache_t;
static inline cache_t to_cache(float f) { return f; }
#endif

/* The calling thread's share [*first, *last) of `count` items in order, split evenly over its team (all of them
   outside a parallel region, or without OpenMP). */
static inline void thread_share(int64_t count, int64_t *first, int64_t *last) {
    int64_t thread = 0, threads = 1;
#ifdef _OPENMP
    thread = omp_get_thread_num();
    threads = omp_get_num_threads();
#endif
    *first = count * thread / threads;
    *last = count * (thread + 1) / threads;
}

void linear(const float *x, int64_t m, int64_t k, const float *packed, int64_t n, const float *bias, float *out,
            int num_threads);
int qlinear(const float *x, int64_t m, int64_t k, const uint8_t *packed, int bits, int64_t n, const float *bias,
            float *out, int num_threads);
int bf16linear(const float *x, int64_t m, int64_t k, const uint16_t *packed, int64_t n, const float *bias,
               float *out, int num_threads);
void rms_norm(const float *x, const float *weight, float *out, int64_t rows, int64_t dim, float eps,
              int num_threads);
int paged_decode(const float *q, const cache_t *cache, const int64_t *block_tables, const int64_t *query_starts,
                 const int64_t *context_lens, float *out, int64_t seqs, int64_t queries, int64_t num_blocks,
                 int64_t block_size, int64_t table_width, float scale, int num_threads);
void silu_mul(const float *gate_up, float *act, int64_t rows, int64_t width, int num_threads);
