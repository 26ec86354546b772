/* y[rows][n] = x[rows][k] @ w[n][k]^T in fp32, for the handful of rows of a decode step.
 *
 * Why: at 16 rows torch's matmul (MKL) reaches 30-60 GFLOP/s on one AVX2 core, about half of what the
 * core can do, so a batched decode step cost far more than one row's. This kernel keeps 16 rows x 6
 * columns of the output in the 12 of the 16 AVX registers and reads each weight once per 16 rows, straight
 * from the model's own [n][k] weight (no packed copy): 75-95 GFLOP/s on the same core.
 * Built at run time by bot/engine/batched_linear.py with -mavx2 -mfma; called only on CPUs that have both.
 */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 16 /* rows per pass over the weight: two 8-float registers per output column */
#define COLS 6  /* columns per pass: 12 accumulators, 2 inputs and 1 broadcast fit the 16 registers */

static void store_column(__m256 lo, __m256 hi, float* y, long col, long n, int rows) {
  float tmp[ROWS] __attribute__((aligned(32)));
  _mm256_store_ps(tmp, lo);
  _mm256_store_ps(tmp + 8, hi);
  for (int r = 0; r < rows; r++) y[r * n + col] = tmp[r];
}

/* One block of up to ROWS rows; xt is the block transposed and zero-padded to ROWS, [k][ROWS]. */
static void block(const float* xt, const float* w, float* y, long k, long n, int rows) {
  long col = 0;
  for (; col + COLS <= n; col += COLS) {
    const float *w0 = w + col * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k, *w4 = w3 + k, *w5 = w4 + k;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0;
    __m256 d0 = a0, d1 = a0, e0 = a0, e1 = a0, f0 = a0, f1 = a0;
    const float* xp = xt;
    for (long i = 0; i < k; i++, xp += ROWS) {
      __m256 x0 = _mm256_load_ps(xp), x1 = _mm256_load_ps(xp + 8), t;
      t = _mm256_broadcast_ss(w0 + i); a0 = _mm256_fmadd_ps(t, x0, a0); a1 = _mm256_fmadd_ps(t, x1, a1);
      t = _mm256_broadcast_ss(w1 + i); b0 = _mm256_fmadd_ps(t, x0, b0); b1 = _mm256_fmadd_ps(t, x1, b1);
      t = _mm256_broadcast_ss(w2 + i); c0 = _mm256_fmadd_ps(t, x0, c0); c1 = _mm256_fmadd_ps(t, x1, c1);
      t = _mm256_broadcast_ss(w3 + i); d0 = _mm256_fmadd_ps(t, x0, d0); d1 = _mm256_fmadd_ps(t, x1, d1);
      t = _mm256_broadcast_ss(w4 + i); e0 = _mm256_fmadd_ps(t, x0, e0); e1 = _mm256_fmadd_ps(t, x1, e1);
      t = _mm256_broadcast_ss(w5 + i); f0 = _mm256_fmadd_ps(t, x0, f0); f1 = _mm256_fmadd_ps(t, x1, f1);
    }
    store_column(a0, a1, y, col, n, rows);
    store_column(b0, b1, y, col + 1, n, rows);
    store_column(c0, c1, y, col + 2, n, rows);
    store_column(d0, d1, y, col + 3, n, rows);
    store_column(e0, e1, y, col + 4, n, rows);
    store_column(f0, f1, y, col + 5, n, rows);
  }
  for (; col < n; col++) { /* the last n % COLS columns, one at a time */
    const float* wc = w + col * k;
    __m256 lo = _mm256_setzero_ps(), hi = lo;
    for (long i = 0; i < k; i++) {
      __m256 t = _mm256_broadcast_ss(wc + i);
      lo = _mm256_fmadd_ps(t, _mm256_load_ps(xt + i * ROWS), lo);
      hi = _mm256_fmadd_ps(t, _mm256_load_ps(xt + i * ROWS + 8), hi);
    }
    store_column(lo, hi, y, col, n, rows);
  }
}

/* All arrays contiguous and row-major. Returns 0, or -1 when the scratch block could not be allocated. */
int batched_linear(const float* x, const float* w, float* y, long rows, long k, long n) {
  size_t bytes = (size_t)k * ROWS * sizeof(float);
  float* xt = aligned_alloc(32, (bytes + 31) / 32 * 32);
  if (!xt) return -1;
  for (long first = 0; first < rows; first += ROWS) {
    int count = rows - first < ROWS ? (int)(rows - first) : ROWS;
    if (count < ROWS) memset(xt, 0, bytes);
    for (int r = 0; r < count; r++)
      for (long i = 0; i < k; i++) xt[i * ROWS + r] = x[(first + r) * k + i];
    block(xt, w, y + first * n, k, n, count);
  }
  free(xt);
  return 0;
}
