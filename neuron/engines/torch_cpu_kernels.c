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
 * cortex_panel_product: rows times float16 or float32 weights, each output a chain of fused
 * multiply-adds over k in order from zero (for float16, the sums fbgemm's kernels for three to
 * six rows make, bit for bit), so a row gets the same numbers in any batch. Only where the
 * compiler targets AVX2, F16C and FMA (cortex_has_panel_product).
 *
 * cortex_layer_attention_in and cortex_layer_attention_out: a decoder layer of float16 or
 * float32 weights but its attention, for any rows, each row alone (where cortex_panel_product
 * is built). */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define CORTEX_PANELS 1
#else
#define CORTEX_PANELS 0
#endif

/* One sequence's new token at one key/value head: attend the `group` query heads that share it
 * (queries and out: `group` heads of `dim`) to the first `length` cached keys and values. */
static void attend_group(int64_t dim, int64_t group, int64_t length, float scale,
                         const float *queries, const float *keys, const float *values,
                         float *out, float *scores);

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
    float *scores,             /* scratch: `scores_stride` floats per thread */
    int64_t scores_stride,     /* >= heads / kv_heads * (max position + 1) */
    int64_t threads)
{
    const int64_t group = heads / kv_heads;
    /* every (sequence, key/value head) on its own: the same numbers whichever thread runs it */
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int64_t task = 0; task < sequences * kv_heads; task++) {
        const int64_t s = task / kv_heads, g = task % kv_heads;
        const int64_t capacity = capacities[s], row = rows[s], position = positions[s];
        const int64_t offset = (layer * kv_heads + g) * capacity * dim;
        float *keys = k_caches[s] + offset, *values = v_caches[s] + offset;
        memcpy(keys + position * dim, k_new + row * qk_stride + g * dim,
               (size_t)dim * sizeof(float));
        memcpy(values + position * dim, v_new + row * v_stride + g * dim,
               (size_t)dim * sizeof(float));
        attend_group(dim, group, position + 1, scale, q + row * qk_stride + g * group * dim,
                     keys, values, out + (row * heads + g * group) * dim,
                     scores + (int64_t)omp_get_thread_num() * scores_stride);
    }
}

#if !CORTEX_PANELS
/* attend_group's steps without AVX2: plain loops (the compiler vectorizes what it can). */
static inline float dot(const float *a, const float *b, int64_t n) {
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < n; i++) total += a[i] * b[i];
    return total;
}

/* x[i] = exp(x[i] - shift) for n floats; returns their sum. */
static float exp_shifted(float *x, int64_t n, float shift) {
    float total = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - shift);
        total += x[i];
    }
    return total;
}

/* out = scale * sum over j < length of weights[j] * values[j] (values: rows of dim). */
static void weighted_sum(int64_t dim, int64_t length, const float *weights, const float *values,
                         float scale, float *out) {
    for (int64_t d = 0; d < dim; d++) out[d] = 0.0f;
    for (int64_t j = 0; j < length; j++) {
        const float weight = weights[j];
        const float *v = values + j * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; d++) out[d] += weight * v[d];
    }
#pragma omp simd
    for (int64_t d = 0; d < dim; d++) out[d] *= scale;
}
#endif

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

/* 1 where cortex_panel_product and the layer kernels were built (AVX2, F16C and FMA), else 0. */
int cortex_has_panel_product(void) { return CORTEX_PANELS; }

#if CORTEX_PANELS
/* Eight weights at element `index` of float16 (f32 = 0) or float32 (f32 = 1) panels, as floats.
 * The kernels below take f32 as a constant: each is compiled once per weight type. */
static inline __attribute__((always_inline)) __m256 load8(const void *weights, int64_t index,
                                                          const int f32) {
    if (f32) return _mm256_loadu_ps((const float *)weights + index);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)weights + index)));
}

/* out[o] = x . w[o] for o < 64 * panels; w as panels of 64 outputs, each four strips of 16
 * outputs one after another: [panels][4][k][16] (each strip one stream through memory). The
 * panels are shared out over `threads` OpenMP threads (torch's libgomp, the calling thread's
 * pool); each panel's sums are the same whoever computes it. */
static inline __attribute__((always_inline)) void gemv(
    int64_t panels, int64_t k, const float *x, const void *weights, float *out, int64_t threads,
    const int f32) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        const int64_t w0 = p * k * 64, w1 = w0 + 16 * k, w2 = w1 + 16 * k, w3 = w2 + 16 * k;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
               a7 = a0;
        for (int64_t i = 0; i < k; i++) {
            const __m256 xi = _mm256_set1_ps(x[i]);
            const int64_t at = i * 16;
            a0 = _mm256_fmadd_ps(xi, load8(weights, w0 + at, f32), a0);
            a1 = _mm256_fmadd_ps(xi, load8(weights, w0 + at + 8, f32), a1);
            a2 = _mm256_fmadd_ps(xi, load8(weights, w1 + at, f32), a2);
            a3 = _mm256_fmadd_ps(xi, load8(weights, w1 + at + 8, f32), a3);
            a4 = _mm256_fmadd_ps(xi, load8(weights, w2 + at, f32), a4);
            a5 = _mm256_fmadd_ps(xi, load8(weights, w2 + at + 8, f32), a5);
            a6 = _mm256_fmadd_ps(xi, load8(weights, w3 + at, f32), a6);
            a7 = _mm256_fmadd_ps(xi, load8(weights, w3 + at + 8, f32), a7);
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

/* Rows [0, R) of x times one strip of 16 outputs (its first weight at element `w`), into out:
 * one chain of fused multiply-adds per output and row, as in gemv. */
static inline __attribute__((always_inline)) void rows_times_16(
    const int R, int64_t k, const float *x, const void *weights, int64_t w, float *out,
    int64_t out_stride, const int f32) {
    __m256 acc[6][2];
    for (int r = 0; r < R; r++) {
        acc[r][0] = _mm256_setzero_ps();
        acc[r][1] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < k; i++) {
        const __m256 w0 = load8(weights, w + i * 16, f32);
        const __m256 w1 = load8(weights, w + i * 16 + 8, f32);
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

/* out = x W^T for `rows` rows x ([rows][k], contiguous) and the panels of gemv; out is
 * [rows][64 * panels]. Rows go six at a time, 16 outputs at a time; every output's sum is the
 * same chain whatever the rows around it. */
static inline __attribute__((always_inline)) void gemm(
    int64_t rows, int64_t panels, int64_t k, const float *x, const void *weights, float *out,
    int64_t threads, const int f32) {
    const int64_t n = panels * 64;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        for (int64_t sub = 0; sub < 4; sub++) {
            const int64_t w = (p * 4 + sub) * k * 16;
            for (int64_t first = 0; first < rows; first += 6) {
                const float *xr = x + first * k;
                float *o = out + first * n + p * 64 + sub * 16;
                switch (rows - first < 6 ? rows - first : 6) {
                    case 1: rows_times_16(1, k, xr, weights, w, o, n, f32); break;
                    case 2: rows_times_16(2, k, xr, weights, w, o, n, f32); break;
                    case 3: rows_times_16(3, k, xr, weights, w, o, n, f32); break;
                    case 4: rows_times_16(4, k, xr, weights, w, o, n, f32); break;
                    case 5: rows_times_16(5, k, xr, weights, w, o, n, f32); break;
                    default: rows_times_16(6, k, xr, weights, w, o, n, f32); break;
                }
            }
        }
    }
}

/* The products of `rows` rows: a row at a time through gemv for one or two rows (it reads the
 * weights fastest), six at a time otherwise; the same sums either way. out: [rows][64 * panels].
 * float32 (f32 = 1) or float16 (0) panels. */
void cortex_panel_product(int64_t rows, int64_t panels, int64_t k, const float *x,
                          const void *weights, int64_t f32, float *out, int64_t threads) {
    if (rows <= 2) {
        for (int64_t r = 0; r < rows; r++) {
            if (f32) gemv(panels, k, x + r * k, weights, out + r * panels * 64, threads, 1);
            else gemv(panels, k, x + r * k, weights, out + r * panels * 64, threads, 0);
        }
    } else if (f32) {
        gemm(rows, panels, k, x, weights, out, threads, 1);
    } else {
        gemm(rows, panels, k, x, weights, out, threads, 0);
    }
}

/* exp(x) for eight floats: Cephes' polynomial (as in avx_mathfun), within about 2 ulp of expf;
 * arguments below -88.38 give 0 and above 88.38 infinity. */
static inline __m256 exp8(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
    x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
    const __m256 n = _mm256_floor_ps(
        _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, one));
    const __m256i power = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(power));
}

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8)
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    float total = sum8(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

/* x[i] = exp(x[i] - shift) for n floats; returns their sum. */
static float exp_shifted(float *x, int64_t n, float shift) {
    const __m256 by = _mm256_set1_ps(shift);
    __m256 sum = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), by));
        _mm256_storeu_ps(x + i, e);
        sum = _mm256_add_ps(sum, e);
    }
    if (i < n) {  /* the tail in a buffer whose other lanes give exp(-inf) = 0 */
        float tail[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY,
                         -INFINITY, -INFINITY, -INFINITY, -INFINITY};
        memcpy(tail, x + i, (size_t)(n - i) * sizeof(float));
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(tail), by));
        _mm256_storeu_ps(tail, e);
        memcpy(x + i, tail, (size_t)(n - i) * sizeof(float));
        sum = _mm256_add_ps(sum, e);
    }
    return sum8(sum);
}

/* out = scale * sum over j < length of weights[j] * values[j] (values: rows of dim). */
static void weighted_sum(int64_t dim, int64_t length, const float *weights, const float *values,
                         float scale, float *out) {
    const __m256 by = _mm256_set1_ps(scale);
    int64_t d0 = 0;
    for (; d0 + 32 <= dim; d0 += 32) {  /* 32 outputs in registers over every position */
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t j = 0; j < length; j++) {
            const __m256 w = _mm256_broadcast_ss(weights + j);
            const float *v = values + j * dim + d0;
            a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v), a0);
            a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8), a1);
            a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 16), a2);
            a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 24), a3);
        }
        _mm256_storeu_ps(out + d0, _mm256_mul_ps(a0, by));
        _mm256_storeu_ps(out + d0 + 8, _mm256_mul_ps(a1, by));
        _mm256_storeu_ps(out + d0 + 16, _mm256_mul_ps(a2, by));
        _mm256_storeu_ps(out + d0 + 24, _mm256_mul_ps(a3, by));
    }
    for (; d0 + 8 <= dim; d0 += 8) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t j = 0; j < length; j++)
            a = _mm256_fmadd_ps(_mm256_broadcast_ss(weights + j),
                                _mm256_loadu_ps(values + j * dim + d0), a);
        _mm256_storeu_ps(out + d0, _mm256_mul_ps(a, by));
    }
    for (; d0 < dim; d0++) {
        float a = 0.0f;
        for (int64_t j = 0; j < length; j++) a += weights[j] * values[j * dim + d0];
        out[d0] = a * scale;
    }
}

/* out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i] for n floats. */
static void silu_times(int64_t n, const float *gate, const float *up, float *out) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, g))));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
    }
    if (i < n) {
        float g8[8] = {0}, u8[8] = {0};
        memcpy(g8, gate + i, (size_t)(n - i) * sizeof(float));
        memcpy(u8, up + i, (size_t)(n - i) * sizeof(float));
        const __m256 g = _mm256_loadu_ps(g8);
        const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, g))));
        _mm256_storeu_ps(g8, _mm256_mul_ps(s, _mm256_loadu_ps(u8)));
        memcpy(out + i, g8, (size_t)(n - i) * sizeof(float));
    }
}

/* One decoder layer's weights (panels of cortex_panel_product, all float16 or all float32)
 * and shape. */
typedef struct {
    int64_t hidden, heads, kv_heads, dim, intermediate;
    int64_t qkv_panels, o_panels, gate_up_panels, down_panels;
    int64_t float32; /* 1: float32 panels, 0: float16 */
    double eps;
    const float *input_norm, *post_norm; /* [hidden] */
    const float *q_norm, *k_norm;        /* [dim], NULL without per-head norms (Qwen3 has them) */
    const float *qkv_bias;               /* [(heads + 2 kv_heads) dim], NULL without (Qwen2) */
    const void *qkv, *o, *gate_up, *down;
} cortex_layer;

/* Rotate-half RoPE of one head in place: x cos + (-x2, x1) sin, with the sine's first half
 * negated in the table (signed_sin). */
static inline void rope(float *x, int64_t dim, const float *cos, const float *signed_sin) {
    const int64_t half = dim / 2;
    for (int64_t d = 0; d < half; d++) {
        const float a = x[d], b = x[d + half];
        x[d] = a * cos[d] + b * signed_sin[d];
        x[d + half] = b * cos[d + half] + a * signed_sin[d + half];
    }
}

/* The layer up to attention, for `rows` rows of x ([rows][hidden]): the input norm, the q, k, v
 * product (and bias), Qwen3's per-head norms and RoPE of q and k (cos and signed_sin:
 * [rows][dim]). qkv: [rows][64 * qkv_panels], q heads, then k, then v. normed: scratch,
 * [rows][hidden]. Every row alone: its numbers do not depend on the others. */
void cortex_layer_attention_in(const cortex_layer *layer, int64_t rows, const float *x,
                               const float *cos, const float *signed_sin, float *normed,
                               float *qkv, int64_t threads) {
    const int64_t dim = layer->dim, width = 64 * layer->qkv_panels;
    const int64_t rotated = layer->heads + layer->kv_heads;
    const int64_t outputs = (rotated + layer->kv_heads) * dim;
    cortex_rms_norm(rows, layer->hidden, x, layer->input_norm, (float)layer->eps, normed);
    cortex_panel_product(rows, layer->qkv_panels, layer->hidden, normed, layer->qkv,
                         layer->float32, qkv, threads);
    for (int64_t r = 0; r < rows; r++) {
        float *row = qkv + r * width;
        if (layer->qkv_bias != NULL)
            for (int64_t i = 0; i < outputs; i++) row[i] += layer->qkv_bias[i];
        if (layer->q_norm != NULL && layer->k_norm != NULL) {
            cortex_rms_norm(layer->heads, dim, row, layer->q_norm, (float)layer->eps, row);
            cortex_rms_norm(layer->kv_heads, dim, row + layer->heads * dim, layer->k_norm,
                            (float)layer->eps, row + layer->heads * dim);
        }
        for (int64_t h = 0; h < rotated; h++)
            rope(row + h * dim, dim, cos + r * dim, signed_sin + r * dim);
    }
}

/* The layer from attention on, in place on x ([rows][hidden]): x += attended Wo, then
 * x += down(silu(gate(n)) * up(n)) with n the post-attention norm of x. attended:
 * [rows][heads * dim]. Scratch: normed [rows][hidden], wide [rows][64 * max(o, gate_up, down
 * panels)], act [rows][intermediate]. Every row alone. */
void cortex_layer_attention_out(const cortex_layer *layer, int64_t rows, float *x,
                                const float *attended, float *normed, float *wide, float *act,
                                int64_t threads) {
    const int64_t hidden = layer->hidden, inner = layer->intermediate;
    const int64_t o_width = 64 * layer->o_panels, up_width = 64 * layer->gate_up_panels;
    const int64_t down_width = 64 * layer->down_panels;
    cortex_panel_product(rows, layer->o_panels, layer->heads * layer->dim, attended, layer->o,
                         layer->float32, wide, threads);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < hidden; i++) x[r * hidden + i] += wide[r * o_width + i];
    cortex_rms_norm(rows, hidden, x, layer->post_norm, (float)layer->eps, normed);
    cortex_panel_product(rows, layer->gate_up_panels, hidden, normed, layer->gate_up,
                         layer->float32, wide, threads);
    for (int64_t r = 0; r < rows; r++)
        silu_times(inner, wide + r * up_width, wide + r * up_width + inner, act + r * inner);
    cortex_panel_product(rows, layer->down_panels, inner, act, layer->down, layer->float32,
                         wide, threads);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < hidden; i++) x[r * hidden + i] += wide[r * down_width + i];
}
#endif

static void attend_group(int64_t dim, int64_t group, int64_t length, float scale,
                         const float *queries, const float *keys, const float *values,
                         float *out, float *scores) {
    for (int64_t h = 0; h < group; h++) {
        const float *query = queries + h * dim;
        float *score = scores + h * length;
        float best = -INFINITY;
        for (int64_t j = 0; j < length; j++) {
            const float d = dot(query, keys + j * dim, dim) * scale;
            score[j] = d;
            best = d > best ? d : best;
        }
        const float total = exp_shifted(score, length, best); /* softmax, its maximum subtracted */
        weighted_sum(dim, length, score, values, 1.0f / total, out + h * dim);
    }
}
