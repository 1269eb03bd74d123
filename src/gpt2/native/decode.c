/* Few-row fp32 products for decoding on a CPU, streamed at close to the memory bandwidth.
 *
 * A decoding step multiplies a handful of rows (the batch) by every weight matrix once, so it is bound by how
 * fast the weights stream in from memory. BLAS kernels tuned for big products leave part of that bandwidth
 * unused at 1-8 rows; this kernel reads the weight in the exact order it computes, from a layout packed for it,
 * and prefetches ahead in software, which keeps the memory system busy while the cores multiply.
 *
 * Plain C: the compiler vectorises the inner loops for the machine it builds on (-O3 -march=native); the
 * fp32 arithmetic is the same as any BLAS (one multiply-add per weight and row), in a different order.
 */
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <string.h>

#define BN 32         /* output columns per block: the packed layout is [N / BN][K][BN] */
#define ROWS 8        /* rows per pass: 8 x 32 accumulators stay in vector registers */
#define PREFETCH 16   /* how many k-steps (of BN floats) ahead to prefetch: ~2 KB */

/* y[m][0:BN] = x[m] . w[:, 0:BN] + bias[0:BN] for m < M (M <= ROWS), w one packed block (K x BN). */
static inline void block(int M, const float *restrict x, const float *restrict w, const float *restrict bias,
                         float *restrict y, int K, int N) {
    float acc[ROWS][BN] = {{0}};
    for (int k = 0; k < K; k++) {
        __builtin_prefetch(w + (size_t)(k + PREFETCH) * BN, 0, 3);
        __builtin_prefetch(w + (size_t)(k + PREFETCH) * BN + 16, 0, 3);
        const float *wk = w + (size_t)k * BN;
        for (int m = 0; m < M; m++) {
            const float xm = x[(size_t)m * K + k];
#pragma omp simd
            for (int j = 0; j < BN; j++) acc[m][j] += xm * wk[j];
        }
    }
    for (int m = 0; m < M; m++)
        for (int j = 0; j < BN; j++) y[(size_t)m * N + j] = acc[m][j] + (bias ? bias[j] : 0.0f);
}

/* One specialised copy per row count, so that the compiler unrolls the row loop and keeps acc in registers. */
#define ROWS_CASE(R) case R: block(R, x, w, bias, y, K, N); break;

static void block_rows(int M, const float *x, const float *w, const float *bias, float *y, int K, int N) {
    switch (M) {
        ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) ROWS_CASE(5) ROWS_CASE(6) ROWS_CASE(7) ROWS_CASE(8)
    }
}

/* y (M, N) = x (M, K) . W (K, N) + bias (N, or NULL), with W packed as [N / BN][K][BN] (N a multiple of BN).
 * The column blocks are split evenly over the threads. Rows go ROWS at a time: a block read from memory for
 * the first ROWS rows is still in the core's cache for the next ones. */
void gpt2_linear(const float *x, const float *wp, const float *bias, float *y, int M, int K, int N) {
    const int blocks = N / BN;
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int first = (int)((long)blocks * t / nt), last = (int)((long)blocks * (t + 1) / nt);
        for (int b = first; b < last; b++) {
            const float *w = wp + (size_t)b * K * BN;
            for (int m0 = 0; m0 < M; m0 += ROWS) {
                const int rows = M - m0 < ROWS ? M - m0 : ROWS;
                block_rows(rows, x + (size_t)m0 * K, w, bias ? bias + (size_t)b * BN : NULL,
                           y + (size_t)m0 * N + (size_t)b * BN, K, N);
            }
        }
    }
}

int gpt2_block_columns(void) { return BN; }

#define ROW_PREFETCH 4  /* attention: cache rows (D floats) to prefetch ahead */

static inline void prefetch_row(const float *row, int D) {
    for (int d = 0; d < D; d += 16) __builtin_prefetch(row + d, 0, 3);
}

/* Attention for one (row, head) pair: write this step's key and value into slot `slot` of K and V (S_max, D),
 * then out = softmax(q . K[0..slot] * scale) V[0..slot], leaving out the slots with ok[s] == 0 (ok may be NULL). */
static inline void attend_one(int D, const float *restrict q, const float *restrict k_new,
                              const float *restrict v_new, float *restrict K, float *restrict V,
                              const unsigned char *ok, float *restrict out, int slot, float scale) {
    const int S = slot + 1;
    memcpy(K + (size_t)slot * D, k_new, sizeof(float) * D);
    memcpy(V + (size_t)slot * D, v_new, sizeof(float) * D);
    float p[S];  /* scores, then weights; S <= the context window */
    float best = -INFINITY;
    for (int s = 0; s < S; s++) {
        prefetch_row(K + (size_t)(s + ROW_PREFETCH) * D, D);
        if (ok && !ok[s]) continue;
        const float *k = K + (size_t)s * D;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int d = 0; d < D; d++) dot += q[d] * k[d];
        p[s] = dot * scale;
        best = p[s] > best ? p[s] : best;
    }
    float total = 0.0f;
    for (int s = 0; s < S; s++) {
        p[s] = (ok && !ok[s]) ? 0.0f : expf(p[s] - best);
        total += p[s];
    }
    float acc[D];
    for (int d = 0; d < D; d++) acc[d] = 0.0f;
    for (int s = 0; s < S; s++) {
        prefetch_row(V + (size_t)(s + ROW_PREFETCH) * D, D);
        if (p[s] == 0.0f) continue;
        const float *v = V + (size_t)s * D;
#pragma omp simd
        for (int d = 0; d < D; d++) acc[d] += p[s] * v[d];
    }
    for (int d = 0; d < D; d++) out[d] = acc[d] / total;
}

/* One decoding step of attention in one layer, for every row b and head h:
 *   K[b][h][slot] = k, V[b][h][slot] = v   (this step's key and value, taken from qkv)
 *   y[b][h] = softmax(q . K[b][h][0..slot] * scale) V[b][h][0..slot], slots with valid[b][s] == 0 left out
 * qkv (B, 3 * H * D): queries, keys, values side by side (the c_attn output); cache (2, B, H, S_max, D): keys,
 * then values; valid (B, S_max) bytes, or NULL when every slot is valid; y (B, H * D).
 * The (row, head) pairs are split over the threads; each streams its keys, then its values, prefetching ahead.
 * D = 64 (every GPT-2 size) gets its own copy, so that the compiler unrolls the head dimension fully. */
void gpt2_attend_step(const float *qkv, float *cache, const unsigned char *valid, float *y,
                      int B, int H, int D, int S_max, int slot, float scale) {
    const int C = H * D;
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        const int b = bh / H, h = bh % H;
        const float *q = qkv + (size_t)b * 3 * C + (size_t)h * D;
        float *K = cache + ((size_t)b * H + h) * S_max * D;
        float *V = cache + ((size_t)(B + b) * H + h) * S_max * D;
        const unsigned char *ok = valid ? valid + (size_t)b * S_max : NULL;
        float *out = y + (size_t)b * C + (size_t)h * D;
        if (D == 64)
            attend_one(64, q, q + C, q + 2 * C, K, V, ok, out, slot, scale);
        else
            attend_one(D, q, q + C, q + 2 * C, K, V, ok, out, slot, scale);
    }
}
