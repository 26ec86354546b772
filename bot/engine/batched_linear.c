/* y[rows][n] = x[rows][k] @ w[n][k]^T in fp32, for the handful of rows of a decode step.
 *
 * Why: at 16 rows torch's matmul (MKL) reaches 30-60 GFLOP/s on one AVX2 core, about half of what the
 * core can do, so a batched decode step cost far more than one row's. This kernel keeps 16 rows x 6
 * columns of the output in 12 of the 16 AVX registers and reads each weight once per 16 rows, straight
 * from the model's own [n][k] weight (no packed copy): 75-95 GFLOP/s on the same core.
 *
 * The columns are cut into chunks that the calling thread and `threads - 1` helper threads take in turn
 * (an atomic counter), so a core that is busy elsewhere (the event loop) only does fewer chunks. Between
 * calls a helper spins briefly, yielding its core, then sleeps on a condition variable.
 * Built at run time by bot/engine/batched_linear.py with -mavx2 -mfma -pthread; called only on CPUs
 * that have both.
 */
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 16         /* rows per pass over the weight: two 8-float registers per output column */
#define COLS 6          /* columns per pass: 12 accumulators, 2 inputs and 1 broadcast fit the 16 registers */
#define CHUNK_COLS 48   /* columns per unit of work shared between threads (8 passes) */
#define MAX_THREADS 64  /* the caller and up to 63 helpers */
#define SPINS 20000     /* idle checks (with a pause, yielding every 64) before a helper sleeps */

static void store_column(__m256 lo, __m256 hi, float* y, long col, long n, int rows) {
  float tmp[ROWS] __attribute__((aligned(32)));
  _mm256_store_ps(tmp, lo);
  _mm256_store_ps(tmp + 8, hi);
  for (int r = 0; r < rows; r++) y[r * n + col] = tmp[r];
}

/* Columns [first, last) of one block of up to ROWS rows; xt is the block transposed and zero-padded to
 * ROWS, [k][ROWS]. */
static void block(const float* xt, const float* w, float* y, long k, long n, int rows, long first, long last) {
  long col = first;
  for (; col + COLS <= last; col += COLS) {
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
  for (; col < last; col++) { /* the last few columns, one at a time */
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

/* The call being served. Its fields are written before `work` announces it and are read only by a
 * thread that claimed one of its chunks, so they stay put until every chunk is done. */
static struct {
  const float* xt; /* all row blocks transposed, one [k][ROWS] after the other */
  const float* w;
  float* y;
  long rows, k, n, chunks_per_block;
} job;
static _Atomic uint64_t work;  /* chunk count << 32 | next chunk to claim */
static atomic_long unfinished; /* chunks claimed or not, still to complete */
static atomic_int sleepers;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t woken = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t calls = PTHREAD_MUTEX_INITIALIZER; /* one call at a time: two engines may share a process */
static int helpers;            /* started so far; changed only under `calls` */

static int pending(uint64_t word) { return (uint32_t)word < (uint32_t)(word >> 32); }

/* Claim and compute chunks of the current call until none is left. */
static void take_chunks(void) {
  uint64_t word = atomic_load(&work);
  while (pending(word)) {
    if (!atomic_compare_exchange_weak(&work, &word, word + 1)) continue;
    long chunk = (long)(uint32_t)word, b = chunk / job.chunks_per_block;
    long first = (chunk % job.chunks_per_block) * CHUNK_COLS;
    long last = first + CHUNK_COLS < job.n ? first + CHUNK_COLS : job.n;
    int rows = job.rows - b * ROWS < ROWS ? (int)(job.rows - b * ROWS) : ROWS;
    block(job.xt + b * job.k * ROWS, job.w, job.y + b * ROWS * job.n, job.k, job.n, rows, first, last);
    atomic_fetch_sub(&unfinished, 1);
    word = atomic_load(&work);
  }
}

static void* helper(void* unused) {
  (void)unused;
  for (;;) {
    for (int spin = 0; spin < SPINS && !pending(atomic_load(&work)); spin++) {
      _mm_pause();
      if (spin % 64 == 63) sched_yield(); /* let the event loop's thread have the core if it wants it */
    }
    if (!pending(atomic_load(&work))) {
      pthread_mutex_lock(&lock);
      atomic_fetch_add(&sleepers, 1);
      while (!pending(atomic_load(&work))) pthread_cond_wait(&woken, &lock);
      atomic_fetch_sub(&sleepers, 1);
      pthread_mutex_unlock(&lock);
    }
    take_chunks();
  }
  return NULL;
}

/* A forked child has none of the parent's helpers, and its locks may have been taken mid-call. */
static void after_fork_in_child(void) {
  helpers = 0;
  atomic_store(&sleepers, 0);
  pthread_mutex_init(&lock, NULL);
  pthread_mutex_init(&calls, NULL);
  pthread_cond_init(&woken, NULL);
}

static void start_helpers(long wanted) {
  static int registered;
  if (!registered) registered = pthread_atfork(NULL, NULL, after_fork_in_child) == 0;
  for (; helpers < wanted && helpers < MAX_THREADS - 1; helpers++) {
    pthread_t thread;
    if (pthread_create(&thread, NULL, helper, NULL) != 0) return; /* fewer helpers: still correct */
    pthread_detach(thread);
  }
}

/* All arrays contiguous and row-major; `threads` counts the caller (helpers, once started, keep helping).
 * Returns 0, or -1 when the scratch block could not be allocated. The caller's own share of the chunks is
 * not fixed: were no helper ever to run, it would do them all. */
int batched_linear(const float* x, const float* w, float* y, long rows, long k, long n, long threads) {
  long blocks = (rows + ROWS - 1) / ROWS;
  size_t bytes = (size_t)blocks * k * ROWS * sizeof(float);
  float* xt = aligned_alloc(32, (bytes + 31) / 32 * 32);
  if (!xt) return -1;
  pthread_mutex_lock(&calls);
  if (rows % ROWS) memset(xt + (blocks - 1) * k * ROWS, 0, (size_t)k * ROWS * sizeof(float));
  for (long r = 0; r < rows; r++) {
    float* dst = xt + (r / ROWS) * k * ROWS + r % ROWS;
    for (long i = 0; i < k; i++) dst[i * ROWS] = x[r * k + i];
  }
  start_helpers(threads - 1);
  long per_block = (n + CHUNK_COLS - 1) / CHUNK_COLS, chunks = blocks * per_block;
  job.xt = xt, job.w = w, job.y = y, job.rows = rows, job.k = k, job.n = n, job.chunks_per_block = per_block;
  atomic_store(&unfinished, chunks);
  atomic_store(&work, (uint64_t)chunks << 32);
  if (atomic_load(&sleepers) > 0) {
    pthread_mutex_lock(&lock);
    pthread_cond_broadcast(&woken);
    pthread_mutex_unlock(&lock);
  }
  take_chunks();
  while (atomic_load(&unfinished) > 0) _mm_pause();
  pthread_mutex_unlock(&calls);
  free(xt);
  return 0;
}
