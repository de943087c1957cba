/* The torch engine's CPU kernels, called through ctypes by neuron/engines/torch_cpu_kernels.py,
 * which documents the layouts and why they exist. ctypes releases the GIL during a call.
 *
 * cortex_decode_attention: one decode step of grouped-query attention at one layer, for every
 * sequence that brings one new token: write its new key and value into its cache, then attend
 * its query to the cache up to and including them. Each sequence is computed alone, by the same
 * code, whatever the others: its numbers do not depend on its batch.
 *
 * cortex_rms_norm: RMSNorm of each row, computed alone.
 *
 * cortex_fp16_gemv (one row) and cortex_fp16_gemm (any number): rows times float16 weights,
 * each output a chain of fused multiply-adds over k in order from zero: the sums fbgemm's
 * float16 kernels for three to six rows make, bit for bit, so a row gets the same numbers in
 * any batch. Only where the compiler targets AVX2, F16C and FMA (cortex_has_fp16_gemv). */
#include <math.h>
#include <stdint.h>
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define CORTEX_FP16_GEMV 1
#else
#define CORTEX_FP16_GEMV 0
#endif

void cortex_decode_attention(
    int64_t sequences, int64_t heads, int64_t kv_heads, int64_t dim, int64_t layer, float scale,
    const float *q, const float *k_new, int64_t qk_stride, /* floats from one token to the next */
    const float *v_new, int64_t v_stride,
    const int64_t *rows,       /* per sequence: its token's row in q, k_new, v_new and out */
    float *const *k_caches,    /* per sequence: its cache's keys, [layers, kv_heads, capacity, dim] */
    float *const *v_caches,
    const int64_t *capacities, /* per sequence */
    const int64_t *positions,  /* per sequence: where the new token goes (its cached length) */
    float *out,                /* [tokens, heads, dim] */
    float *scores)             /* scratch: heads / kv_heads * (max position + 1) floats */
{
    const int64_t group = heads / kv_heads;
    for (int64_t s = 0; s < sequences; s++) {
        const int64_t capacity = capacities[s], position = positions[s], length = position + 1;
        const int64_t row = rows[s];
        float *k_layer = k_caches[s] + layer * kv_heads * capacity * dim;
        float *v_layer = v_caches[s] + layer * kv_heads * capacity * dim;
        for (int64_t g = 0; g < kv_heads; g++) {
            float *keys = k_layer + g * capacity * dim;
            float *values = v_layer + g * capacity * dim;
            const float *key = k_new + row * qk_stride + g * dim;
            const float *value = v_new + row * v_stride + g * dim;
            for (int64_t d = 0; d < dim; d++) {
                keys[position * dim + d] = key[d];
                values[position * dim + d] = value[d];
            }
            for (int64_t h = 0; h < group; h++) {
                const int64_t head = g * group + h;
                const float *query = q + row * qk_stride + head * dim;
                float *score = scores + h * length;
                float best = -INFINITY;
                for (int64_t j = 0; j < length; j++) {
                    const float *k = keys + j * dim;
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < dim; d++) dot += query[d] * k[d];
                    dot *= scale;
                    score[j] = dot;
                    best = dot > best ? dot : best;
                }
                float total = 0.0f;
                for (int64_t j = 0; j < length; j++) {
                    score[j] = expf(score[j] - best);
                    total += score[j];
                }
                float *o = out + (row * heads + head) * dim;
                for (int64_t d = 0; d < dim; d++) o[d] = 0.0f;
                for (int64_t j = 0; j < length; j++) {
                    const float weight = score[j];
                    const float *v = values + j * dim;
#pragma omp simd
                    for (int64_t d = 0; d < dim; d++) o[d] += weight * v[d];
                }
                const float inverse = 1.0f / total;
#pragma omp simd
                for (int64_t d = 0; d < dim; d++) o[d] *= inverse;
            }
        }
    }
}

/* out[r] = weight * x[r] / sqrt(mean(x[r]^2) + eps) for rows of n floats (contiguous). */
void cortex_rms_norm(int64_t rows, int64_t n, const float *x, const float *weight, float eps,
                     float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *o = out + r * n;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < n; i++) squares += xr[i] * xr[i];
        const float scale = 1.0f / sqrtf(squares / (float)n + eps);
#pragma omp simd
        for (int64_t i = 0; i < n; i++) o[i] = weight[i] * (xr[i] * scale);
    }
}

/* 1 where cortex_fp16_gemv was built (AVX2, F16C and FMA), else 0. */
int cortex_has_fp16_gemv(void) { return CORTEX_FP16_GEMV; }

#if CORTEX_FP16_GEMV
/* out[o] = x . w[o] for o < 64 * panels; w as float16 panels of 64 outputs, [panels][k][64].
 * The panels are shared out over `threads` OpenMP threads (torch's libgomp, the calling thread's
 * pool); each panel's sums are the same whoever computes it. */
void cortex_fp16_gemv(int64_t panels, int64_t k, const float *x, const uint16_t *weights,
                      float *out, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        const uint16_t *w = weights + p * k * 64;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
               a7 = a0;
        for (int64_t i = 0; i < k; i++) {
            const __m256 xi = _mm256_set1_ps(x[i]);
            const __m128i *row = (const __m128i *)(w + i * 64);
            a0 = _mm256_fmadd_ps(xi, _mm256_cvtph_ps(_mm_loadu_si128(row + 0)), a0);
            a1 = _mm256_fmadd_ps(xi, _mm256_cvtph_ps(_mm_loadu_si128(row + 1)), a1);
            a2 = _mm256_fmadd_ps(xi, _mm256_cvtph_ps(_mm_loadu_si128(row + 2)), a2);
            a3 = _mm256_fmadd_ps(xi, _mm256_cvtph_ps(_mm_loadu_si128(row + 3)), a3);
            a4 = _mm256_fmadd_ps(xi, _mm256_cvtph_ps(_mm_loadu_si128(row + 4)), a4);
            a5 = _mm256_fmadd_ps(xi, _mm256_cvtph_ps(_mm_loadu_si128(row + 5)), a5);
            a6 = _mm256_fmadd_ps(xi, _mm256_cvtph_ps(_mm_loadu_si128(row + 6)), a6);
            a7 = _mm256_fmadd_ps(xi, _mm256_cvtph_ps(_mm_loadu_si128(row + 7)), a7);
        }
        float *o = out + p * 64;
        _mm256_storeu_ps(o + 0, a0);
        _mm256_storeu_ps(o + 8, a1);
        _mm256_storeu_ps(o + 16, a2);
        _mm256_storeu_ps(o + 24, a3);
        _mm256_storeu_ps(o + 32, a4);
        _mm256_storeu_ps(o + 40, a5);
        _mm256_storeu_ps(o + 48, a6);
        _mm256_storeu_ps(o + 56, a7);
    }
}

/* Rows [0, R) of x times 16 outputs of a panel (w: the panel's first weight of them), into out:
 * one chain of fused multiply-adds per output and row, as in cortex_fp16_gemv. */
static inline __attribute__((always_inline)) void rows_times_16(
    const int R, int64_t k, const float *x, const uint16_t *w, float *out, int64_t out_stride) {
    __m256 acc[6][2];
    for (int r = 0; r < R; r++) {
        acc[r][0] = _mm256_setzero_ps();
        acc[r][1] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < k; i++) {
        const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i * 64)));
        const __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i * 64 + 8)));
        for (int r = 0; r < R; r++) {
            const __m256 xr = _mm256_broadcast_ss(x + r * k + i);
            acc[r][0] = _mm256_fmadd_ps(xr, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(xr, w1, acc[r][1]);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(out + r * out_stride, acc[r][0]);
        _mm256_storeu_ps(out + r * out_stride + 8, acc[r][1]);
    }
}

/* out = x W^T for `rows` rows x ([rows][k], contiguous) and the panels of cortex_fp16_gemv;
 * out is [rows][64 * panels]. Rows go six at a time, 16 outputs at a time; every output's sum is
 * the same chain whatever the rows around it. */
void cortex_fp16_gemm(int64_t rows, int64_t panels, int64_t k, const float *x,
                      const uint16_t *weights, float *out, int64_t threads) {
    const int64_t n = panels * 64;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        for (int64_t sub = 0; sub < 4; sub++) {
            const uint16_t *w = weights + p * k * 64 + sub * 16;
            for (int64_t first = 0; first < rows; first += 6) {
                const float *xr = x + first * k;
                float *o = out + first * n + p * 64 + sub * 16;
                switch (rows - first < 6 ? rows - first : 6) {
                    case 1: rows_times_16(1, k, xr, w, o, n); break;
                    case 2: rows_times_16(2, k, xr, w, o, n); break;
                    case 3: rows_times_16(3, k, xr, w, o, n); break;
                    case 4: rows_times_16(4, k, xr, w, o, n); break;
                    case 5: rows_times_16(5, k, xr, w, o, n); break;
                    default: rows_times_16(6, k, xr, w, o, n); break;
                }
            }
        }
    }
}
#endif
