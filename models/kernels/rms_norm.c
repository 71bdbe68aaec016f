/* RMSNorm on the CPU, float32: out = weight * x / sqrt(mean(x^2) + eps) for each row of x. PyTorch runs
   this as six separate operations, each a pass over memory and ~10 us of dispatch: a tenth of the time
   of a one-token decode step of a small model. */
#include <math.h>
#include <stdint.h>

#include "kernels.h"

/* x, out: [rows, dim], contiguous; weight: [dim]. Rows go to separate threads once there are enough of them
   to pay for waking the threads (a prefill chunk, not a decode step). */
void rms_norm(const float *x, const float *weight, float *out, int64_t rows, int64_t dim, float eps,
              int num_threads) {
    #pragma omp parallel for num_threads(num_threads) if (rows * dim >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * dim;
        float squares = 0;
        for (int64_t i = 0; i < dim; i++) squares += row[i] * row[i];
        const float inverse_rms = 1.0f / sqrtf(squares / dim + eps);
        for (int64_t i = 0; i < dim; i++) out[r * dim + i] = weight[i] * (row[i] * inverse_rms);
    }
}
