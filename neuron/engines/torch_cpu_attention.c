/* One decode step of grouped-query attention on a CPU, for every sequence that brings one new
 * token, at one layer: write each sequence's new key and value into its cache, then attend its
 * query to the cache up to and including them. Called through ctypes by
 * neuron/engines/torch_cpu_attention.py, which documents the layout and why this exists.
 *
 * Each sequence is computed alone, by the same code, whatever the others: its numbers do not
 * depend on its batch. Single-threaded; the caller releases the GIL (ctypes does). */
#include <math.h>
#include <stdint.h>

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
