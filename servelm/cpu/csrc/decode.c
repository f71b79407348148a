/* servelm's CPU decode step: a Llama-family forward for a few tokens (one per sequence) in
 * one call, over weights as the linear methods store them (GGUF Q4_0 / Q4_1 / Q8_0 blocks as
 * in the file, dense bf16 / fp32) and the paged KV cache (read in place, never gathered).
 *
 * Why: at 135M parameters a decode token is ~100 MB of weights, 3-8 ms of memory traffic on
 * two cores, while PyTorch's per-op dispatch over 30 layers costs more than that. Here one call
 * runs every layer inside one OpenMP parallel region (the process's libgomp: torch's, loaded
 * first), threads splitting each matmul's output rows, a barrier between ops.
 *
 * Numerics: activations in fp32 throughout; weights decoded to fp32 in registers with ggml's
 * formulas (Q4_0 d * (q - 8), Q4_1 d * q + m, Q8_0 d * q); the KV cache holds the model dtype
 * (bf16 rounded to nearest even, as torch's cast). Sums run in a different order from the
 * PyTorch reference, so results agree to rounding, not bit for bit.
 *
 * Built at first use by servelm/cpu/native.py with -O3 -march=native -fopenmp; the SIMD paths
 * are written once over a vector layer (vf, SL_VL lanes: AVX-512's 16 or AVX2 + FMA's 8) and
 * compile where the CPU has either; portable C (auto-vectorised) elsewhere.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

enum { SL_F32 = 0, SL_BF16 = 1, SL_Q4_0 = 2, SL_Q4_1 = 3, SL_Q8_0 = 8 };

/* One weight matrix [n, k]: row r's bytes at data + r * row_bytes; its outputs land in
 * columns out_off .. out_off + n of the projection's output. The block formats are ggml's,
 * with each block's fp16 scale (and Q4_1 min) moved into arrays of their own at load, so a
 * row's scales convert 16 at a time and every block's codes are 16 (Q4) or 32 (Q8) aligned
 * bytes: data is [n, k / 2] Q4 codes (a block's element j < 16 in the low nibble of byte j,
 * 16 + j in its high nibble) or [n, k] int8 Q8 codes; d, m are fp16 [n, k / 32]. */
typedef struct {
    int32_t type, n, k, out_off;
    /* the block formats: inputs per scale (32 for GGUF; a multiple of 32 for the int4/int8
     * methods' groups) and the scales' dtype (SL_S_F16, SL_S_BF16, SL_S_F32) */
    int32_t group, scale_dtype;
    int64_t row_bytes;
    const uint8_t *data;
    const void *d, *m; /* Q4_0 / Q4_1 / Q8_0: scales [n, ceil(k / group)]; Q4_1: mins (or NULL) */
} sl_mat;

enum { SL_S_F16 = 0, SL_S_BF16 = 1, SL_S_F32 = 2 };

/* A projection's LoRA adapters (servelm/lora/layer.py's slots, read in place): a [slots,
 * nparts * rank, k] and b [slots, n, rank] in fp32 or bf16 (the scaling folded into b); part p
 * of the output is columns off[p] .. off[p + 1] and takes rank rows p * rank .. of a. a NULL:
 * the projection has none. */
typedef struct {
    const void *a, *b;
    int32_t rank, nparts, bf16, pad;
    int32_t off[4];
} sl_lora;

/* A projection: up to 3 matrices side by side (q|k|v or gate|up of different formats), and an
 * fp32 bias over all outputs (or NULL). */
typedef struct {
    int32_t nparts, n;
    sl_mat part[3];
    const float *bias;
    sl_lora lora;
} sl_proj;

typedef struct {
    const float *attn_norm, *ffn_norm, *q_norm, *k_norm; /* fp32; q/k norms NULL unless Qwen3 */
    sl_proj qkv, o, gate_up, down;
    void *k_cache, *v_cache; /* [blocks, block_size, n_kv_heads, head_dim] in the KV dtype */
} sl_layer;

typedef struct {
    int32_t hidden, n_heads, n_kv_heads, head_dim, inter, n_layers, vocab, block_size;
    int32_t kv_bf16, max_ctx, max_rows, lora_rank; /* lora_rank: the adapters' slot width, 0: none */
    float eps, scale;
    const float *cos_sin; /* [max_position, head_dim]: cos of the D/2 frequencies, then sin */
    const float *final_norm;
    sl_proj head;
    const sl_layer *layers;
} sl_model;

/* ---- scalars ------------------------------------------------------------------------------ */
static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            exp = 113;
            while (!(man & 1024)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 1023) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline float bf16_to_f32(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's cast */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 64); /* NaN */
    bits += 0x7fff + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

#define SL_INLINE static inline __attribute__((always_inline))
/* small loops over register arrays (accumulator tiles): unrolled early, so GCC keeps the arrays
 * in registers (left to its later unrolling it stored every accumulator each iteration) */
#if defined(__clang__)
#define SL_UNROLL _Pragma("unroll")
#else
#define SL_UNROLL _Pragma("GCC unroll 16")
#endif

/* ---- one vector of SL_VL floats: AVX-512 (16 lanes) or AVX2 + FMA (8 lanes) ---------------
 * The kernels below are written once over this layer; a 32-weight block is SL_NW = 32 / SL_VL
 * vectors. SL_VL 0: neither instruction set (the portable C below each SIMD block runs). */
#if defined(__AVX512F__)
#define SL_VL 16
typedef __m512 vf;
SL_INLINE vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
SL_INLINE void vf_store(float *p, vf v) { _mm512_storeu_ps(p, v); }
SL_INLINE vf vf_set1(float a) { return _mm512_set1_ps(a); }
SL_INLINE vf vf_zero(void) { return _mm512_setzero_ps(); }
SL_INLINE vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
SL_INLINE vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
SL_INLINE vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
SL_INLINE vf vf_div(vf a, vf b) { return _mm512_div_ps(a, b); }
SL_INLINE vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
SL_INLINE vf vf_min(vf a, vf b) { return _mm512_min_ps(a, b); }
SL_INLINE vf vf_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }   /* a * b + c */
SL_INLINE vf vf_fnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); } /* c - a * b */
SL_INLINE float vf_hsum(vf a) { return _mm512_reduce_add_ps(a); }
SL_INLINE float vf_hmax(vf a) { return _mm512_reduce_max_ps(a); }
/* SL_VL bf16 / fp16 / uint8 / int8 values, widened to fp32 */
SL_INLINE vf vf_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
        _mm256_loadu_si256((const __m256i *)p)), 16));
}
SL_INLINE vf vf_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
SL_INLINE __m512i vi_u8(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
SL_INLINE vf vf_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
/* low and high nibbles of SL_VL bytes */
SL_INLINE vf vf_nib_lo(const uint8_t *p) { return _mm512_cvtepi32_ps(_mm512_and_si512(vi_u8(p), _mm512_set1_epi32(15))); }
SL_INLINE vf vf_nib_hi(const uint8_t *p) { return _mm512_cvtepi32_ps(_mm512_srli_epi32(vi_u8(p), 4)); }
/* round to an integer (nearest, ties to even) and x * 2^n */
SL_INLINE vf vf_round(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
SL_INLINE vf vf_scale2(vf p, vf n) { return _mm512_scalef_ps(p, n); } /* underflows to 0 as expf */
#elif defined(__AVX2__) && defined(__FMA__)
#define SL_VL 8
typedef __m256 vf;
SL_INLINE vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
SL_INLINE void vf_store(float *p, vf v) { _mm256_storeu_ps(p, v); }
SL_INLINE vf vf_set1(float a) { return _mm256_set1_ps(a); }
SL_INLINE vf vf_zero(void) { return _mm256_setzero_ps(); }
SL_INLINE vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
SL_INLINE vf vf_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
SL_INLINE vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
SL_INLINE vf vf_div(vf a, vf b) { return _mm256_div_ps(a, b); }
SL_INLINE vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
SL_INLINE vf vf_min(vf a, vf b) { return _mm256_min_ps(a, b); }
SL_INLINE vf vf_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
SL_INLINE vf vf_fnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
SL_INLINE float vf_hsum(vf a) {
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
SL_INLINE float vf_hmax(vf a) {
    __m128 t = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    t = _mm_max_ps(t, _mm_movehl_ps(t, t));
    return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}
SL_INLINE vf vf_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
        _mm_loadu_si128((const __m128i *)p)), 16));
}
#if defined(__F16C__)
SL_INLINE vf vf_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
#define SL_VF16 1
#endif
SL_INLINE __m256i vi_u8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
SL_INLINE vf vf_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
SL_INLINE vf vf_nib_lo(const uint8_t *p) { return _mm256_cvtepi32_ps(_mm256_and_si256(vi_u8(p), _mm256_set1_epi32(15))); }
SL_INLINE vf vf_nib_hi(const uint8_t *p) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(vi_u8(p), 4)); }
SL_INLINE vf vf_round(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* p * 2^n for integral n in [-252, 254]: two exponent-field products (each factor a normal
 * float), so results below the normal range come out as denormals or 0, as with expf */
SL_INLINE vf vf_scale2(vf p, vf n) {
    const __m256i ni = _mm256_cvtps_epi32(n), h = _mm256_srai_epi32(ni, 1);
    const __m256i e1 = _mm256_slli_epi32(_mm256_add_epi32(h, _mm256_set1_epi32(127)), 23);
    const __m256i e2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, h), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e1)), _mm256_castsi256_ps(e2));
}
#else
#define SL_VL 0
#endif
#define SL_SIMD (SL_VL > 0)
#if SL_VL == 16
#define SL_VF16 1
#endif
#if SL_SIMD
#define SL_NW (32 / SL_VL) /* vectors in a 32-weight block */
#endif

/* ---- matmul: y[s, out_off + r] = sum_j W[r, j] x[s, j], rows r0..r1 of one matrix ---------- */
/* x: [S, k] fp32 (row stride xs); xsum: [S, k / 32] sums of each 32-block of x (Q4 offsets:
 * a Q4_1 block is d * q + m, so its dot product is d * (q . x) + m * sum(x)).
 * The work is done in tiles of RB weight rows x SN activation rows: each weight block is
 * decoded into registers once and used SN times, and the RB * SN accumulators are independent
 * chains (one chain per row would wait on FMA latency every block). RB and SN are constants at
 * every call (always_inline), so the accumulators live in registers. */
#define SL_SCHUNK 8
#ifndef SL_PREFETCH
#define SL_PREFETCH 4096 /* bytes ahead in a row's codes: software prefetch into L1 (SmolLM2
                            * Q4_1 batch-1 step on the 2-core machine: 6.7 ms without, 6.0 at
                            * 512 bytes, 5.2 at 1 KiB, 4.8 at 4-8 KiB: the hardware prefetchers
                            * alone leave the GEMVs waiting on L3) */
#endif

/* n fp16 -> fp32 */
static inline void f16_row(const uint16_t *src, float *dst, int n) {
    int j = 0;
#if defined(SL_VF16)
    for (; j + SL_VL <= n; j += SL_VL) vf_store(dst + j, vf_f16(src + j));
#endif
    for (; j < n; j++) dst[j] = f16_to_f32(src[j]);
}

/* a . b over n floats: vector partial sums (a scalar chain of n dependent adds, as the plain
 * loop compiles without -ffast-math, cost as much as an 18-block row's GEMV) */
static inline float dot_f32(const float *a, const float *b, int n) {
    float t = 0.f;
    int j = 0;
#if SL_SIMD
    vf acc = vf_zero();
    for (; j + SL_VL <= n; j += SL_VL) acc = vf_fma(vf_load(a + j), vf_load(b + j), acc);
    t = vf_hsum(acc);
#endif
    for (; j < n; j++) t += a[j] * b[j];
    return t;
}

#if defined(SL_VF16)
/* a . b over n values, a fp16 (a row's Q4_1 mins, converted as they are read) */
static inline float dot_f16_f32(const uint16_t *a, const float *b, int n) {
    vf acc = vf_zero();
    int j = 0;
    for (; j + SL_VL <= n; j += SL_VL) acc = vf_fma(vf_f16(a + j), vf_load(b + j), acc);
    float t = vf_hsum(acc);
    for (; j < n; j++) t += f16_to_f32(a[j]) * b[j];
    return t;
}
#endif

/* One row's scales (or mins) for each of its nb 32-blocks: dst[b] = src[row, b * 32 / group] */
static inline void block_scales(const sl_mat *w, const void *src, int row, float *dst, int nb) {
    const int ng = (w->k + w->group - 1) / w->group;
    if (w->group == 32 && w->scale_dtype == SL_S_F16) {
        f16_row((const uint16_t *)src + (int64_t)row * nb, dst, nb);
        return;
    }
    const int per = w->group / 32;
    for (int b = 0; b < nb; b++) {
        const int64_t i = (int64_t)row * ng + b / per;
        dst[b] = w->scale_dtype == SL_S_F32 ? ((const float *)src)[i]
               : w->scale_dtype == SL_S_BF16 ? bf16_to_f32(((const uint16_t *)src)[i])
               : f16_to_f32(((const uint16_t *)src)[i]);
    }
}

#if SL_SIMD
/* One 32-weight block (w[u]: elements u * SL_VL .., as floats of the codes) times SN
 * activation rows, scaled by the block's dv, into acc[0..SN): with one row the dot product is
 * scaled (SL_NW + 1 ops); with several the weights are scaled once (exact: an fp16 or bf16
 * scale times a 4/8-bit code) and each row takes SL_NW FMAs. */
SL_INLINE void block_fma(vf *w, const vf dv, vf *acc, const int SN, const float *x,
                         const int64_t xs) {
    if (SN == 1) {
#if SL_NW >= 4
        /* two chains of SL_NW / 2 (AVX2: 2 deep, not 4): a block's latency, not the FMA ports,
         * bounded batch-1 GEMVs (Zen 3, one thread, Q4_1 rows in L2: 10.7 -> 8.0 cycles a
         * block and row at k = 4096; from DRAM 14.3 -> 12.3; medians of 3) */
        vf t0 = vf_mul(w[0], vf_load(x)), t1 = vf_mul(w[1], vf_load(x + SL_VL));
        SL_UNROLL for (int u = 2; u < SL_NW; u += 2) {
            t0 = vf_fma(w[u], vf_load(x + u * SL_VL), t0);
            t1 = vf_fma(w[u + 1], vf_load(x + (u + 1) * SL_VL), t1);
        }
        const vf t = vf_add(t0, t1);
#else
        vf t = vf_mul(w[0], vf_load(x));
        SL_UNROLL for (int u = 1; u < SL_NW; u++) t = vf_fma(w[u], vf_load(x + u * SL_VL), t);
#endif
        acc[0] = vf_fma(t, dv, acc[0]);
        return;
    }
    SL_UNROLL for (int u = 0; u < SL_NW; u++) w[u] = vf_mul(w[u], dv);
    SL_UNROLL for (int s = 0; s < SN; s++)
        SL_UNROLL for (int u = 0; u < SL_NW; u++) acc[s] = vf_fma(w[u], vf_load(x + s * xs + u * SL_VL), acc[s]);
}
#endif

SL_INLINE void tile(const sl_mat *w, const int r, const int RB, const int s0, const int SN,
                    const float *x, const int xs, const float *xsum, const int nsum, float *y,
                    const int ys) {
    const int k = w->k, nb = k / 32;
    const uint8_t *rows[4];
    float out[4][SL_SCHUNK];
    SL_UNROLL for (int i = 0; i < RB; i++) {
        rows[i] = w->data + (int64_t)(r + i) * w->row_bytes;
        SL_UNROLL for (int s = 0; s < SN; s++) out[i][s] = 0.f;
    }
#if SL_SIMD
    vf acc[4][SL_SCHUNK];
    SL_UNROLL for (int i = 0; i < RB; i++)
        SL_UNROLL for (int s = 0; s < SN; s++) acc[i][s] = vf_zero();
#endif
    const int quant = w->type == SL_Q4_0 || w->type == SL_Q4_1 || w->type == SL_Q8_0;
    float dsc[4][quant ? nb : 1], mn[quant ? nb : 1];
    if (quant)
        for (int i = 0; i < RB; i++) {
            block_scales(w, w->d, r + i, dsc[i], nb);
            if (w->type == SL_Q8_0) continue;
            /* the offsets: sum over blocks of m * sum(x) (Q4_0: m = -8 d) */
            if (w->type == SL_Q4_0) {
                for (int s = 0; s < SN; s++) out[i][s] = -8.f * dot_f32(dsc[i], xsum + (s0 + s) * nsum, nb);
                continue;
            }
#if defined(SL_VF16)
            if (SN == 1 && w->group == 32 && w->scale_dtype == SL_S_F16) { /* from the fp16 mins */
                out[i][0] = dot_f16_f32((const uint16_t *)w->m + (int64_t)(r + i) * nb, xsum + s0 * nsum, nb);
                continue;
            }
#endif
            block_scales(w, w->m, r + i, mn, nb);
            for (int s = 0; s < SN; s++) out[i][s] = dot_f32(mn, xsum + (s0 + s) * nsum, nb);
        }
    if (w->type == SL_Q4_0 || w->type == SL_Q4_1) {
        for (int b = 0; b < nb; b++) {
            SL_UNROLL for (int i = 0; i < RB; i++) {
                const uint8_t *qs = rows[i] + b * 16;
#if SL_SIMD
                if ((b & 3) == 0) _mm_prefetch((const char *)(qs + SL_PREFETCH), _MM_HINT_T0);
                vf wv[SL_NW]; /* elements j < 16: low nibbles of bytes j; 16 + j: high nibbles */
                SL_UNROLL for (int u = 0; u < SL_NW / 2; u++) {
                    wv[u] = vf_nib_lo(qs + u * SL_VL);
                    wv[SL_NW / 2 + u] = vf_nib_hi(qs + u * SL_VL);
                }
                block_fma(wv, vf_set1(dsc[i][b]), acc[i], SN, x + (int64_t)s0 * xs + b * 32, xs);
#else
                SL_UNROLL for (int s = 0; s < SN; s++) {
                    const float *xp = x + (int64_t)(s0 + s) * xs + b * 32;
                    float t = 0.f;
                    for (int j = 0; j < 16; j++)
                        t += (float)(qs[j] & 15) * xp[j] + (float)(qs[j] >> 4) * xp[j + 16];
                    out[i][s] += dsc[i][b] * t;
                }
#endif
            }
        }
    } else if (w->type == SL_Q8_0) {
        for (int b = 0; b < nb; b++) {
            SL_UNROLL for (int i = 0; i < RB; i++) {
                const int8_t *qs = (const int8_t *)(rows[i] + b * 32);
#if SL_SIMD
                if ((b & 1) == 0) _mm_prefetch((const char *)(qs + SL_PREFETCH), _MM_HINT_T0);
                vf wv[SL_NW];
                SL_UNROLL for (int u = 0; u < SL_NW; u++) wv[u] = vf_i8(qs + u * SL_VL);
                block_fma(wv, vf_set1(dsc[i][b]), acc[i], SN, x + (int64_t)s0 * xs + b * 32, xs);
#else
                SL_UNROLL for (int s = 0; s < SN; s++) {
                    const float *xp = x + (int64_t)(s0 + s) * xs + b * 32;
                    float t = 0.f;
                    for (int j = 0; j < 32; j++) t += (float)qs[j] * xp[j];
                    out[i][s] += dsc[i][b] * t;
                }
#endif
            }
        }
    } else { /* dense bf16 / fp32 */
        int j = 0;
#if SL_SIMD
        for (; j + 32 <= k; j += 32) {
            SL_UNROLL for (int i = 0; i < RB; i++) {
                vf wv[SL_NW];
                _mm_prefetch((const char *)(rows[i] + (int64_t)j * (w->type == SL_BF16 ? 2 : 4) + SL_PREFETCH),
                             _MM_HINT_T0);
                SL_UNROLL for (int u = 0; u < SL_NW; u++)
                    wv[u] = w->type == SL_BF16 ? vf_bf16((const uint16_t *)rows[i] + j + u * SL_VL)
                                               : vf_load((const float *)rows[i] + j + u * SL_VL);
                SL_UNROLL for (int s = 0; s < SN; s++) {
                    const float *xp = x + (int64_t)(s0 + s) * xs + j;
                    SL_UNROLL for (int u = 0; u < SL_NW; u++) acc[i][s] = vf_fma(wv[u], vf_load(xp + u * SL_VL), acc[i][s]);
                }
            }
        }
#endif
        for (; j < k; j++)
            for (int i = 0; i < RB; i++) {
                const float wv = w->type == SL_BF16 ? bf16_to_f32(((const uint16_t *)rows[i])[j])
                                                    : ((const float *)rows[i])[j];
                for (int s = 0; s < SN; s++) out[i][s] += wv * x[(int64_t)(s0 + s) * xs + j];
            }
    }
    SL_UNROLL for (int i = 0; i < RB; i++)
        SL_UNROLL for (int s = 0; s < SN; s++) {
#if SL_SIMD
            out[i][s] += vf_hsum(acc[i][s]);
#endif
            y[(int64_t)(s0 + s) * ys + w->out_off + r + i] = out[i][s];
        }
}

/* rows r0..r1 of w for all S activation rows: tiles of RB rows x SN sequences */
#define SL_TILES(RB, SN) do { \
        int r = r0; \
        for (; r + (RB) <= r1; r += (RB)) tile(w, r, (RB), s0, (SN), x, xs, xsum, nsum, y, ys); \
        for (; r < r1; r++) tile(w, r, 1, s0, (SN), x, xs, xsum, nsum, y, ys); \
    } while (0)

/* ---- larger batches: decode each weight row once, then a register-tiled GEMM ---------------- */
/* Row r of w as fp32 (ggml's values: Q4_1 d * q + m, Q4_0 d * (q - 8), Q8_0 d * q) */
static void decode_row(const sl_mat *w, int r, float *dst) {
    const int k = w->k, nb = k / 32;
    const uint8_t *row = w->data + (int64_t)r * w->row_bytes;
    if (w->type == SL_F32) {
        memcpy(dst, row, sizeof(float) * (size_t)k);
        return;
    }
    if (w->type == SL_BF16) {
        for (int j = 0; j < k; j++) dst[j] = bf16_to_f32(((const uint16_t *)row)[j]);
        return;
    }
    float ds[nb], ms[nb];
    block_scales(w, w->d, r, ds, nb);
    if (w->type == SL_Q4_1)
        block_scales(w, w->m, r, ms, nb);
    else
        for (int b = 0; b < nb; b++) ms[b] = -8.f * ds[b];
    for (int b = 0; b < nb; b++) {
#if SL_SIMD
        const vf dv = vf_set1(ds[b]);
        if (w->type == SL_Q8_0) {
            const int8_t *qs = (const int8_t *)(row + b * 32);
            SL_UNROLL for (int u = 0; u < SL_NW; u++) vf_store(dst + b * 32 + u * SL_VL, vf_mul(dv, vf_i8(qs + u * SL_VL)));
        } else {
            const vf mv = vf_set1(ms[b]);
            const uint8_t *qs = row + b * 16;
            SL_UNROLL for (int u = 0; u < SL_NW / 2; u++) {
                vf_store(dst + b * 32 + u * SL_VL, vf_fma(dv, vf_nib_lo(qs + u * SL_VL), mv));
                vf_store(dst + b * 32 + 16 + u * SL_VL, vf_fma(dv, vf_nib_hi(qs + u * SL_VL), mv));
            }
        }
#else
        if (w->type == SL_Q8_0) {
            for (int j = 0; j < 32; j++) dst[b * 32 + j] = ds[b] * (float)((const int8_t *)row)[b * 32 + j];
        } else {
            const uint8_t *qs = row + b * 16;
            for (int j = 0; j < 16; j++) {
                dst[b * 32 + j] = ds[b] * (float)(qs[j] & 15) + ms[b];
                dst[b * 32 + 16 + j] = ds[b] * (float)(qs[j] >> 4) + ms[b];
            }
        }
#endif
    }
}

/* y[s, out_off + r + i] = wb[i] . x[s] for i < RB, s0 <= s < s0 + SN: RB x SN accumulators */
SL_INLINE void gemm_tile(const float *wb, const int k, const int RB, const int s0, const int SN,
                         const float *x, const int xs, float *y, const int ys, const int col) {
    float out[4][4];
    int j = 0;
#if SL_SIMD
    vf acc[4][4];
    SL_UNROLL for (int i = 0; i < RB; i++)
        SL_UNROLL for (int s = 0; s < SN; s++) acc[i][s] = vf_zero();
    for (; j + SL_VL <= k; j += SL_VL) {
        vf wv[4];
        SL_UNROLL for (int i = 0; i < RB; i++) wv[i] = vf_load(wb + (int64_t)i * k + j);
        SL_UNROLL for (int s = 0; s < SN; s++) {
            const vf xv = vf_load(x + (int64_t)(s0 + s) * xs + j);
            SL_UNROLL for (int i = 0; i < RB; i++) acc[i][s] = vf_fma(wv[i], xv, acc[i][s]);
        }
    }
    SL_UNROLL for (int i = 0; i < RB; i++)
        SL_UNROLL for (int s = 0; s < SN; s++) out[i][s] = vf_hsum(acc[i][s]);
#else
    for (int i = 0; i < RB; i++)
        for (int s = 0; s < SN; s++) out[i][s] = 0.f;
#endif
    for (; j < k; j++)
        for (int i = 0; i < RB; i++)
            for (int s = 0; s < SN; s++) out[i][s] += wb[(int64_t)i * k + j] * x[(int64_t)(s0 + s) * xs + j];
    for (int i = 0; i < RB; i++)
        for (int s = 0; s < SN; s++) y[(int64_t)(s0 + s) * ys + col + i] = out[i][s];
}

/* activation rows per tile: RB x SN accumulators, RB weight vectors and one of x in registers
 * (AVX2 takes the broadcast kernel below instead: 16 registers do not hold this tile) */
#define SL_GEMM_SN 4
#define SL_GEMM_S(RB) do { \
        int s0 = 0; \
        for (; s0 + SL_GEMM_SN <= S; s0 += SL_GEMM_SN) gemm_tile(wbuf, k, (RB), s0, SL_GEMM_SN, x, xs, y, ys, col); \
        switch (S - s0) { \
            case 3: gemm_tile(wbuf, k, (RB), s0, 3, x, xs, y, ys, col); break; \
            case 2: gemm_tile(wbuf, k, (RB), s0, 2, x, xs, y, ys, col); break; \
            case 1: gemm_tile(wbuf, k, (RB), s0, 1, x, xs, y, ys, col); break; \
            default: break; \
        } \
    } while (0)

#if SL_VL != 8
/* rows r0..r1 for S activation rows: 4 rows at a time decoded into wbuf [4, k] (L1), then a
 * 4 x 4 register-tiled product over all S: each weight is decoded once per step, and the
 * FMAs (16 per 8 loads) are what bounds it */
static void mat_rows_batched(const sl_mat *w, int r0, int r1, int S, const float *x, int xs,
                             float *y, int ys, float *wbuf) {
    const int k = w->k;
    for (int r = r0; r < r1; r += 4) {
        const int rb = r1 - r < 4 ? r1 - r : 4, col = w->out_off + r;
        for (int i = 0; i < rb; i++) decode_row(w, r + i, wbuf + (int64_t)i * k);
        switch (rb) {
            case 4: SL_GEMM_S(4); break;
            case 3: SL_GEMM_S(3); break;
            case 2: SL_GEMM_S(2); break;
            default: SL_GEMM_S(1); break;
        }
    }
}
#endif

#if SL_VL == 8
/* AVX2's batched product: y[s, col + i] = wb[i] . x[s] for MR weight rows (decoded, fp32, row
 * i at wb + i * k) and the 8 * NSV activation rows s0.. held by xp, their panel of x
 * transposed ([k, 8 * NSV], zeros past S). The MR x NSV accumulators hold each sequence in a
 * lane, so each input j is NSV loads of xp, MR broadcast weights and MR * NSV FMAs, with no
 * horizontal sums. Single-thread rates on the Zen 3 VM, fp32 rows in cache: a dot-product
 * tile (4 x 3) 29-30 GFLOP/s; this at 6 x 16, 42-44 over one [k, S] transpose, 52-78 over
 * panels (the FMA peak: 90). */
SL_INLINE void bcast_tile(const float *wb, const int k, const int MR, const float *xp,
                          const int s0, const int NSV, const int S, float *y, const int ys,
                          const int col) {
    __m256 acc[6][2];
    SL_UNROLL for (int i = 0; i < MR; i++)
        SL_UNROLL for (int v = 0; v < NSV; v++) acc[i][v] = _mm256_setzero_ps();
    for (int j = 0; j < k; j++) {
        const float *xr = xp + (int64_t)j * 8 * NSV;
        __m256 xv[2];
        SL_UNROLL for (int v = 0; v < NSV; v++) xv[v] = _mm256_loadu_ps(xr + 8 * v);
        SL_UNROLL for (int i = 0; i < MR; i++) {
            const __m256 wv = _mm256_broadcast_ss(wb + (int64_t)i * k + j);
            SL_UNROLL for (int v = 0; v < NSV; v++) acc[i][v] = _mm256_fmadd_ps(wv, xv[v], acc[i][v]);
        }
    }
    float o[6][16];
    SL_UNROLL for (int i = 0; i < MR; i++)
        SL_UNROLL for (int v = 0; v < NSV; v++) _mm256_storeu_ps(o[i] + 8 * v, acc[i][v]);
    const int ns = S - s0 < 8 * NSV ? S - s0 : 8 * NSV;
    for (int i = 0; i < MR; i++)
        for (int l = 0; l < ns; l++) y[(int64_t)(s0 + l) * ys + col + i] = o[i][l];
}

/* the tiles of decoded rows wbuf [nc, k] against one panel xp of x (16 sequences, or 8 where S
 * rounds up to an odd multiple of 8) */
#define SL_BCAST_PANEL(NSV) do { \
        for (int i = 0; i < nc; i += 6) { \
            const float *wb_ = wbuf + (int64_t)i * k; \
            const int col_ = w->out_off + rc + i; \
            switch (nc - i < 6 ? nc - i : 6) { \
                case 6: bcast_tile(wb_, k, 6, xp, s0, (NSV), S, y, ys, col_); break; \
                case 5: bcast_tile(wb_, k, 5, xp, s0, (NSV), S, y, ys, col_); break; \
                case 4: bcast_tile(wb_, k, 4, xp, s0, (NSV), S, y, ys, col_); break; \
                case 3: bcast_tile(wb_, k, 3, xp, s0, (NSV), S, y, ys, col_); break; \
                case 2: bcast_tile(wb_, k, 2, xp, s0, (NSV), S, y, ys, col_); break; \
                default: bcast_tile(wb_, k, 1, xp, s0, (NSV), S, y, ys, col_); break; \
            } \
        } \
    } while (0)

/* x [S, k] -> its panels (as SL_BCAST_ROWS reads them) in xt [sp * k], sp = S rounded up to
 * 8, zeros past S */
static void x_panels(const float *x, int xs, int S, int k, float *xt) {
    const int sp = (S + 7) / 8 * 8;
    for (int s0 = 0; s0 < sp; s0 += 16) {
        const int w = sp - s0 >= 16 ? 16 : 8;
        float *p = xt + (int64_t)s0 * k;
        for (int j = 0; j < k; j++)
            for (int l = 0; l < w; l++) p[(int64_t)j * w + l] = s0 + l < S ? x[(int64_t)(s0 + l) * xs + j] : 0.f;
    }
}

/* weight rows decoded at a time (fp32, SL_BCAST_NC * k floats: 110 KB at k = 576, 295 KB at
 * 1536, in L2) by the batched product below */
#define SL_BCAST_NC 48

/* rows r0..r1 for S activation rows (xt: x's panels, x_panels): SL_BCAST_NC rows at a time
 * decoded into wbuf, then for each panel of x the 6-row broadcast tiles over them. Panel outer,
 * rows inner: a panel (16 x k floats) stays in L1/L2 across the rows' tiles and x's panels are
 * read from L3 once per SL_BCAST_NC rows. (Rows outer, 6 at a time, swept all of a 512-token
 * prompt's panels, 1.2 MB at k = 576, per 6 rows: 105-110 GFLOP/s on 2 threads.) */
static void mat_rows_bcast(const sl_mat *w, int r0, int r1, int S, const float *xt, int sp,
                           float *y, int ys, float *wbuf) {
    const int k = w->k;
    for (int rc = r0; rc < r1; rc += SL_BCAST_NC) {
        const int nc = r1 - rc < SL_BCAST_NC ? r1 - rc : SL_BCAST_NC;
        for (int i = 0; i < nc; i++) decode_row(w, rc + i, wbuf + (int64_t)i * k);
        for (int s0 = 0; s0 < sp; s0 += 16) {
            const float *xp = xt + (int64_t)s0 * k;
            if (sp - s0 >= 16) SL_BCAST_PANEL(2);
            else SL_BCAST_PANEL(1);
        }
    }
}
#endif

/* from this many activation rows on, the batched path (the GEMV tiles would decode each weight
 * S / 8 times) */
#define SL_BATCHED_MIN_S 9

static void mat_rows(const sl_mat *w, int r0, int r1, int S, const float *x, int xs,
                     const float *xsum, int nsum, float *y, int ys) {
    for (int s0 = 0; s0 < S; s0 += SL_SCHUNK) {
        switch (S - s0 < SL_SCHUNK ? S - s0 : SL_SCHUNK) {
            case 1: SL_TILES(4, 1); break;
            case 2: SL_TILES(4, 2); break;
            case 3: SL_TILES(2, 3); break;
            case 4: SL_TILES(2, 4); break;
            case 5: SL_TILES(2, 5); break;
            case 6: SL_TILES(2, 6); break;
            case 7: SL_TILES(2, 7); break;
            default: SL_TILES(2, 8); break;
        }
    }
}

/* sums of each 32-block of x (the Q4 formats' offset term): xsum[s, b] */
static void block_sums(int S, int k, const float *x, int xs, float *xsum) {
    const int nb = k / 32;
    for (int s = 0; s < S; s++)
        for (int b = 0; b < nb; b++) {
            float t = 0.f;
            for (int j = 0; j < 32; j++) t += x[(int64_t)s * xs + b * 32 + j];
            xsum[s * nb + b] = t;
        }
}

/* floats of per-thread scratch a projection with k inputs needs for S rows: the block sums
 * (GEMV tiles), or decoded weight rows (SL_BCAST_NC with AVX2, else 4) and, with AVX2, x's
 * panels (batched) */
static inline int64_t proj_scratch(int S, int k) {
#if SL_VL == 8
    return (int64_t)S * (k / 32 + 1) + SL_BCAST_NC * (int64_t)k + 32 + (int64_t)((S + 7) / 8 * 8) * k;
#else
    return (int64_t)S * (k / 32 + 1) + 4 * (int64_t)k + 32;
#endif
}

/* This thread's share of a projection: every part's rows split evenly (in 8-row steps).
 * scratch: proj_scratch(S, k) floats of this thread's own. The bias is added by the same
 * thread. */
static void proj_thread(const sl_proj *p, int S, const float *x, int xs, float *y, int ys,
                        float *scratch, int tid, int nt) {
    const int k = p->part[0].k;
    const int batched = S >= SL_BATCHED_MIN_S;
    if (!batched) block_sums(S, k, x, xs, scratch);
    float *wbuf = scratch + (int64_t)S * (k / 32 + 1) + 16;
#if SL_VL == 8
    const int sp = (S + 7) / 8 * 8;
    float *xt = wbuf + SL_BCAST_NC * (int64_t)k + 16; /* x's panels: this thread's copy, for its rows */
    if (batched) x_panels(x, xs, S, k, xt);
#endif
    for (int i = 0; i < p->nparts; i++) {
        const sl_mat *w = &p->part[i];
        const int steps = (w->n + 7) / 8;
        const int a = (int)((int64_t)steps * tid / nt) * 8, bnd = (int)((int64_t)steps * (tid + 1) / nt) * 8;
        const int r1 = bnd < w->n ? bnd : w->n;
        if (a < r1) {
            if (batched)
#if SL_VL == 8
                mat_rows_bcast(w, a, r1, S, xt, sp, y, ys, wbuf);
#else
                mat_rows_batched(w, a, r1, S, x, xs, y, ys, wbuf);
#endif
            else
                mat_rows(w, a, r1, S, x, xs, scratch, k / 32, y, ys);
            if (p->bias)
                for (int s = 0; s < S; s++)
                    for (int r = a; r < r1; r++) y[(int64_t)s * ys + w->out_off + r] += p->bias[w->out_off + r];
        }
    }
}

/* Dequantize rows of a block matrix (for prompt-sized matmuls, which PyTorch's GEMM does):
 * out [n, k] in fp32 (bf16 = 0) or bf16 (bf16 = 1, rounded to nearest even). */
int sl_dequantize(const sl_mat *w, void *out, int bf16, int nt) {
    const int k = w->k, nb = k / 32;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int r = 0; r < w->n; r++) {
        float row[k], ds[nb], ms[nb];
        const uint8_t *q = w->data + (int64_t)r * w->row_bytes;
        block_scales(w, w->d, r, ds, nb);
        if (w->type == SL_Q4_1) block_scales(w, w->m, r, ms, nb);
        for (int b = 0; b < nb; b++) {
            const float d = ds[b];
            if (w->type == SL_Q8_0) {
                for (int j = 0; j < 32; j++) row[b * 32 + j] = d * (float)((const int8_t *)q)[b * 32 + j];
            } else {
                const float m = w->type == SL_Q4_1 ? ms[b] : 0.f;
                const uint8_t *qs = q + b * 16;
                for (int j = 0; j < 16; j++) {
                    if (w->type == SL_Q4_1) { /* ggml: d * q + m */
                        row[b * 32 + j] = d * (float)(qs[j] & 15) + m;
                        row[b * 32 + 16 + j] = d * (float)(qs[j] >> 4) + m;
                    } else { /* d * (q - 8) */
                        row[b * 32 + j] = d * (float)((qs[j] & 15) - 8);
                        row[b * 32 + 16 + j] = d * (float)((qs[j] >> 4) - 8);
                    }
                }
            }
        }
        if (bf16) {
            uint16_t *o = (uint16_t *)out + (int64_t)r * k;
            for (int j = 0; j < k; j++) o[j] = f32_to_bf16(row[j]);
        } else {
            memcpy((float *)out + (int64_t)r * k, row, sizeof(float) * (size_t)k);
        }
    }
    return 0;
}

/* ---- small ops ----------------------------------------------------------------------------- */
/* out = x / rms(x) * w over n values (out may be x): the sum of squares in vector partial
 * sums (a scalar chain of n dependent FMAs took 4 cycles a value) */
static void rms_norm_row(const float *x, const float *w, float *out, int n, float eps) {
    float ss = 0.f;
    int i = 0;
#if SL_SIMD
    vf a0 = vf_zero(), a1 = vf_zero();
    for (; i + 2 * SL_VL <= n; i += 2 * SL_VL) {
        const vf v0 = vf_load(x + i), v1 = vf_load(x + i + SL_VL);
        a0 = vf_fma(v0, v0, a0);
        a1 = vf_fma(v1, v1, a1);
    }
    for (; i + SL_VL <= n; i += SL_VL) {
        const vf v = vf_load(x + i);
        a0 = vf_fma(v, v, a0);
    }
    ss = vf_hsum(vf_add(a0, a1));
#endif
    for (; i < n; i++) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / (float)n + eps);
    i = 0;
#if SL_SIMD
    const vf rv = vf_set1(r);
    for (; i + SL_VL <= n; i += SL_VL) vf_store(out + i, vf_mul(vf_mul(vf_load(x + i), rv), vf_load(w + i)));
#endif
    for (; i < n; i++) out[i] = x[i] * r * w[i];
}

/* rotate_half style rotary embedding of one head row, in place */
static void rope_row(float *x, const float *cs, int d) {
    const int h = d / 2;
    for (int i = 0; i < h; i++) {
        const float c = cs[i], s = cs[h + i], a = x[i], b = x[i + h];
        x[i] = a * c - b * s;
        x[i + h] = b * c + a * s;
    }
}

static inline void kv_store(void *cache, int bf16, int64_t off, const float *src, int d) {
    if (bf16) {
        uint16_t *p = (uint16_t *)cache + off;
        for (int i = 0; i < d; i++) p[i] = f32_to_bf16(src[i]);
    } else {
        memcpy((float *)cache + off, src, sizeof(float) * (size_t)d);
    }
}

static inline float dot_kv(const float *q, const void *cache, int bf16, int64_t off, int d) {
#if SL_SIMD
    if (d % SL_VL == 0) {
        vf acc = vf_zero();
        for (int i = 0; i < d; i += SL_VL) {
            const vf kv = bf16 ? vf_bf16((const uint16_t *)cache + off + i)
                               : vf_load((const float *)cache + off + i);
            acc = vf_fma(vf_load(q + i), kv, acc);
        }
        return vf_hsum(acc);
    }
#endif
    float t = 0.f;
    if (bf16)
        for (int i = 0; i < d; i++) t += q[i] * bf16_to_f32(((const uint16_t *)cache)[off + i]);
    else
        for (int i = 0; i < d; i++) t += q[i] * ((const float *)cache)[off + i];
    return t;
}

static inline void axpy_kv(float *o, float a, const void *cache, int bf16, int64_t off, int d) {
#if SL_SIMD
    if (d % SL_VL == 0) {
        const vf av = vf_set1(a);
        for (int i = 0; i < d; i += SL_VL) {
            const vf kv = bf16 ? vf_bf16((const uint16_t *)cache + off + i)
                               : vf_load((const float *)cache + off + i);
            vf_store(o + i, vf_fma(av, kv, vf_load(o + i)));
        }
        return;
    }
#endif
    if (bf16)
        for (int i = 0; i < d; i++) o[i] += a * bf16_to_f32(((const uint16_t *)cache)[off + i]);
    else
        for (int i = 0; i < d; i++) o[i] += a * ((const float *)cache)[off + i];
}

static inline float silu(float v) { return v / (1.f + expf(-v)); }

#if SL_SIMD
/* e^x lane by lane: Cody-Waite reduction to r in [-ln2/2, ln2/2], Cephes' degree-6 polynomial
 * (about 1 ulp), scaled by 2^n (vf_scale2: underflows to 0 and overflows to inf as expf
 * does). The softmax and SiLU loops call it instead of expf one element at a time. */
SL_INLINE vf vf_exp(vf x) {
    x = vf_max(vf_min(x, vf_set1(88.72283935546875f)), vf_set1(-104.f));
    const vf n = vf_round(vf_mul(x, vf_set1(1.44269504088896341f)));
    vf r = vf_fnma(n, vf_set1(0.693359375f), x);
    r = vf_fnma(n, vf_set1(-2.12194440e-4f), r);
    vf p = vf_set1(1.9875691500e-4f);
    p = vf_fma(p, r, vf_set1(1.3981999507e-3f));
    p = vf_fma(p, r, vf_set1(8.3334519073e-3f));
    p = vf_fma(p, r, vf_set1(4.1665795894e-2f));
    p = vf_fma(p, r, vf_set1(1.6666665459e-1f));
    p = vf_fma(p, r, vf_set1(5.0000001201e-1f));
    p = vf_fma(p, vf_mul(r, r), vf_add(r, vf_set1(1.f)));
    return vf_scale2(p, n);
}
#endif

/* out[i] = silu(g[i]) * u[i], n elements */
static void silu_mul(const float *g, const float *u, float *out, int64_t n) {
    int64_t i = 0;
#if SL_SIMD
    for (; i + SL_VL <= n; i += SL_VL) {
        const vf gv = vf_load(g + i);
        const vf e = vf_exp(vf_sub(vf_zero(), gv));
        const vf sv = vf_div(gv, vf_add(vf_set1(1.f), e));
        vf_store(out + i, vf_mul(sv, vf_load(u + i)));
    }
#endif
    for (; i < n; i++) out[i] = silu(g[i]) * u[i];
}

/* sc[0..n) <- softmax(sc) */
static void softmax_row(float *sc, int n) {
    float mx = -INFINITY, sum = 0.f;
    int t = 0;
#if SL_SIMD
    vf mv = vf_set1(-INFINITY);
    for (; t + SL_VL <= n; t += SL_VL) mv = vf_max(mv, vf_load(sc + t));
    mx = vf_hmax(mv);
#endif
    for (; t < n; t++) mx = sc[t] > mx ? sc[t] : mx;
    t = 0;
#if SL_SIMD
    const vf mxv = vf_set1(mx);
    vf sv = vf_zero();
    for (; t + SL_VL <= n; t += SL_VL) {
        const vf e = vf_exp(vf_sub(vf_load(sc + t), mxv));
        vf_store(sc + t, e);
        sv = vf_add(sv, e);
    }
    sum = vf_hsum(sv);
#endif
    for (; t < n; t++) { sc[t] = expf(sc[t] - mx); sum += sc[t]; }
    const float inv = 1.f / sum;
    t = 0;
#if SL_SIMD
    const vf iv = vf_set1(inv);
    for (; t + SL_VL <= n; t += SL_VL) vf_store(sc + t, vf_mul(vf_load(sc + t), iv));
#endif
    for (; t < n; t++) sc[t] *= inv;
}

/* Decode attention of one sequence's kv head g for its G = H / KVH query heads: q [G, D] ->
 * out [G, D], reading the ctx cached tokens through the block table (paged, in place: block
 * i of the sequence holds its tokens i * bsz ..; a token's row for kv head g is D values at
 * ((block * bsz + t) * kvh + g) * D). scores: a scratch of G * ctx floats. */

/* the cached tokens block by block: off is token t's row offset (no division per token) */
#define SL_FOR_TOKENS(t, off, ...) do { \
        for (int b0_ = 0; b0_ < ctx; b0_ += bsz) { \
            const int n_ = ctx - b0_ < bsz ? ctx - b0_ : bsz; \
            const int64_t base_ = ((int64_t)bt[b0_ / bsz] * bsz * kvh + g) * D, step_ = (int64_t)kvh * D; \
            for (int i_ = 0; i_ < n_; i_++) { \
                const int t = b0_ + i_; \
                const int64_t off = base_ + i_ * step_; \
                __VA_ARGS__ \
            } \
        } \
    } while (0)

#if SL_SIMD
SL_INLINE vf kv_vec(const void *cache, const int bf16, const int64_t i) {
    return bf16 ? vf_bf16((const uint16_t *)cache + i) : vf_load((const float *)cache + i);
}

/* attend() for compile-time G query heads per KV head and NV = head_dim / SL_VL vectors.
 * Scores: each cached K row is widened once for the G heads. With AVX-512 the scaled queries
 * stay in registers; AVX2's 16 registers hold the K row and the queries come from L1.
 * Outputs: the V rows in passes of PW vectors, the G x PW accumulators in registers (one pass
 * with AVX-512; AVX2 takes a slice of every V row per pass so the accumulators fit). */
SL_INLINE void attend_fixed(const float *q, float *out, const void *kc, const void *vc,
                            const int bf16, const int32_t *bt, const int ctx, const int bsz,
                            const int kvh, const int g, const int G, const int NV, const int PW,
                            const float scale, float *scores) {
    const int D = NV * SL_VL;
    float qs[8 * 128]; /* the scaled queries, G x D (G <= 8, D <= 128) */
    for (int i = 0; i < G * D; i++) qs[i] = q[i] * scale;
#if SL_VL == 16
    vf qv[8][8];
    SL_UNROLL for (int h = 0; h < G; h++)
        SL_UNROLL for (int v = 0; v < NV; v++) qv[h][v] = vf_load(qs + h * D + v * SL_VL);
#define SL_QV(h, v) qv[h][v]
#else
#define SL_QV(h, v) vf_load(qs + (h) * D + (v) * SL_VL)
#endif
    SL_FOR_TOKENS(t, off, {
        vf kv[16];
        SL_UNROLL for (int v = 0; v < NV; v++) kv[v] = kv_vec(kc, bf16, off + v * SL_VL);
        SL_UNROLL for (int h = 0; h < G; h++) {
            vf acc = vf_mul(SL_QV(h, 0), kv[0]);
            SL_UNROLL for (int v = 1; v < NV; v++) acc = vf_fma(SL_QV(h, v), kv[v], acc);
            scores[h * ctx + t] = vf_hsum(acc);
        }
    });
#undef SL_QV
    for (int h = 0; h < G; h++) softmax_row(scores + h * ctx, ctx);
    for (int v0 = 0; v0 < NV; v0 += PW) {
        vf o[8][16];
        SL_UNROLL for (int h = 0; h < G; h++)
            SL_UNROLL for (int u = 0; u < PW; u++) o[h][u] = vf_zero();
        SL_FOR_TOKENS(t, off, {
            SL_UNROLL for (int u = 0; u < PW; u++) {
                const vf vv = kv_vec(vc, bf16, off + (v0 + u) * SL_VL);
                SL_UNROLL for (int h = 0; h < G; h++) o[h][u] = vf_fma(vf_set1(scores[h * ctx + t]), vv, o[h][u]);
            }
        });
        SL_UNROLL for (int h = 0; h < G; h++)
            SL_UNROLL for (int u = 0; u < PW; u++) vf_store(out + h * D + (v0 + u) * SL_VL, o[h][u]);
    }
}
#endif

static void attend(const float *q, float *out, const void *kc, const void *vc, int bf16,
                   const int32_t *bt, int ctx, int bsz, int kvh, int g, int G, int D,
                   float scale, float *scores) {
#if SL_SIMD
#define SL_ATT(GG, NN, PW) attend_fixed(q, out, kc, vc, bf16, bt, ctx, bsz, kvh, g, GG, NN, PW, scale, scores)
    /* the shapes of common models (SmolLM2 3 x 64; Llama-3 4 x 128; Qwen 7 x 128, ...) */
#if SL_VL == 16
    if (D == 64 && G == 1) { SL_ATT(1, 4, 4); return; }
    if (D == 64 && G == 3) { SL_ATT(3, 4, 4); return; }
    if (D == 64 && G == 4) { SL_ATT(4, 4, 4); return; }
    if (D == 128 && G == 1) { SL_ATT(1, 8, 8); return; }
    if (D == 128 && G == 2) { SL_ATT(2, 8, 8); return; }
    if (D == 128 && G == 4) { SL_ATT(4, 8, 8); return; }
#else /* PW: G x PW accumulators and a V slice within 16 registers */
    if (D == 64 && G == 1) { SL_ATT(1, 8, 8); return; }
    if (D == 64 && G == 3) { SL_ATT(3, 8, 4); return; }
    if (D == 64 && G == 4) { SL_ATT(4, 8, 2); return; }
    if (D == 128 && G == 1) { SL_ATT(1, 16, 8); return; }
    if (D == 128 && G == 2) { SL_ATT(2, 16, 4); return; }
    if (D == 128 && G == 4) { SL_ATT(4, 16, 2); return; }
#endif
#undef SL_ATT
    if (D % SL_VL == 0 && D <= 128 && G <= 8) {
        /* each cached K and V row read and widened once for the G query heads that share it */
        const int nv = D / SL_VL;
        SL_FOR_TOKENS(t, off, {
            vf kv[16];
            for (int v = 0; v < nv; v++) kv[v] = kv_vec(kc, bf16, off + v * SL_VL);
            for (int h = 0; h < G; h++) {
                vf acc = vf_mul(vf_load(q + h * D), kv[0]);
                for (int v = 1; v < nv; v++) acc = vf_fma(vf_load(q + h * D + v * SL_VL), kv[v], acc);
                scores[h * ctx + t] = vf_hsum(acc) * scale;
            }
        });
        for (int h = 0; h < G; h++) {
            softmax_row(scores + h * ctx, ctx);
            memset(out + h * D, 0, sizeof(float) * (size_t)D);
        }
        SL_FOR_TOKENS(t, off, {
            vf vv[16];
            for (int v = 0; v < nv; v++) vv[v] = kv_vec(vc, bf16, off + v * SL_VL);
            for (int h = 0; h < G; h++) {
                const vf pv = vf_set1(scores[h * ctx + t]);
                for (int v = 0; v < nv; v++) {
                    float *o = out + h * D + v * SL_VL;
                    vf_store(o, vf_fma(pv, vv[v], vf_load(o)));
                }
            }
        });
        return;
    }
#endif
    SL_FOR_TOKENS(t, off, {
        for (int h = 0; h < G; h++) scores[h * ctx + t] = dot_kv(q + h * D, kc, bf16, off, D) * scale;
    });
    for (int h = 0; h < G; h++) {
        softmax_row(scores + h * ctx, ctx);
        memset(out + h * D, 0, sizeof(float) * (size_t)D);
    }
    SL_FOR_TOKENS(t, off, {
        for (int h = 0; h < G; h++) axpy_kv(out + h * D, scores[h * ctx + t], vc, bf16, off, D);
    });
}
#undef SL_FOR_TOKENS

static inline double sl_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* profiling: thread 0 adds the time since its last mark to accumulator i */
#define MARK(i) do { if (prof && tid == 0) { const double now_ = sl_now(); prof[i] += now_ - t_last; t_last = now_; } } while (0)



/* ---- LoRA ------------------------------------------------------------------------------------ */
static inline float lora_w(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* The shrink, t[s, j] = a[slot(s), j, :] . x[s, :] for rows with an adapter (slot >= 0), this
 * thread's share of the (row, j) items; reads x only, so it runs beside the base projection. */
static void lora_shrink_thread(const sl_lora *lo, const int32_t *slots, int S, int k,
                               const float *x, int xs, float *t, int tid, int nt) {
    const int PR = lo->nparts * lo->rank;
    const int64_t items = (int64_t)S * PR, a0 = items * tid / nt, a1 = items * (tid + 1) / nt;
    for (int64_t w = a0; w < a1; w++) {
        const int s = (int)(w / PR), j = (int)(w % PR);
        if (slots[s] < 0) continue;
        const int64_t base = ((int64_t)slots[s] * PR + j) * k;
        const float *xr = x + (int64_t)s * xs;
        float acc = 0.f;
        if (lo->bf16) {
            const uint16_t *ar = (const uint16_t *)lo->a + base;
            for (int i = 0; i < k; i++) acc += bf16_to_f32(ar[i]) * xr[i];
        } else {
            const float *ar = (const float *)lo->a + base;
            for (int i = 0; i < k; i++) acc += ar[i] * xr[i];
        }
        t[(int64_t)s * PR + j] = acc;
    }
}

/* The expand, y[s, c] += t[s, p * rank ..] . b[slot(s), c, :] for c in part p, over this
 * thread's share of the output columns (after a barrier: t complete, y written). */
static void lora_expand_thread(const sl_lora *lo, const int32_t *slots, int S, int n,
                               const float *t, float *y, int ys, int tid, int nt) {
    const int R = lo->rank, PR = lo->nparts * R;
    const int c0 = (int)((int64_t)n * tid / nt), c1 = (int)((int64_t)n * (tid + 1) / nt);
    for (int s = 0; s < S; s++) {
        if (slots[s] < 0) continue;
        const float *ts = t + (int64_t)s * PR;
        for (int p = 0; p < lo->nparts; p++) {
            const int lo_c = lo->off[p] > c0 ? lo->off[p] : c0;
            const int hi_c = lo->off[p + 1] < c1 ? lo->off[p + 1] : c1;
            for (int c = lo_c; c < hi_c; c++) {
                const int64_t base = ((int64_t)slots[s] * n + c) * R;
                float acc = 0.f;
                for (int r = 0; r < R; r++) acc += ts[p * R + r] * lora_w(lo->b, lo->bf16, base + r);
                y[(int64_t)s * ys + c] += acc;
            }
        }
    }
}

/* ---- the step ------------------------------------------------------------------------------ */
/* Scratch layout (floats), sized by sl_scratch_floats for max_rows sequences and nt threads. */
typedef struct {
    float *resid, *xn, *qkv, *attn, *h, *gu, *act;
    float *lora_t; /* [max_rows, 3 * lora_rank]: the LoRA shrink's output */
    float *xsum;   /* per thread: max_rows * max(k) / 32 */
    float *scores; /* per thread: G * max_ctx */
    int64_t xsum_stride, scores_stride;
} sl_bufs;

static int64_t layout(const sl_model *m, int nt, float *base, sl_bufs *b) {
    const int64_t R = m->max_rows, H = m->hidden, D = m->head_dim;
    const int64_t nqkv = (int64_t)(m->n_heads + 2 * m->n_kv_heads) * D;
    int64_t kmax = H; /* the widest matmul input: hidden, intermediate or the heads' outputs */
    if (m->inter > kmax) kmax = m->inter;
    if ((int64_t)m->n_heads * D > kmax) kmax = (int64_t)m->n_heads * D;
    const int64_t G = m->n_heads / m->n_kv_heads;
    int64_t o = 0;
#define TAKE(field, count) do { if (b) b->field = base + o; o += (count); } while (0)
    TAKE(resid, R * H);
    TAKE(xn, R * H);
    TAKE(qkv, R * nqkv);
    TAKE(attn, R * m->n_heads * D);
    TAKE(h, R * H);
    TAKE(gu, R * 2 * m->inter);
    TAKE(act, R * m->inter);
    TAKE(lora_t, R * 3 * (int64_t)m->lora_rank);
    TAKE(xsum, (int64_t)nt * proj_scratch((int)R, (int)kmax));
    TAKE(scores, (int64_t)nt * G * m->max_ctx);
#undef TAKE
    if (b) {
        b->xsum_stride = proj_scratch((int)R, (int)kmax);
        b->scores_stride = G * m->max_ctx;
    }
    return o;
}

int64_t sl_scratch_floats(const sl_model *m, int nt) { return layout(m, nt, 0, 0); }

/* after a projection's proj_thread: its adapters' shrink (beside it), a barrier, their expand
 * into its output and a barrier; without adapters the barrier alone */
#define LORA(P, X, XS, Y, YS) do { \
        const sl_proj *p_ = (P); \
        if (lora_slots && p_->lora.a) { \
            lora_shrink_thread(&p_->lora, lora_slots, S, p_->part[0].k, (X), (XS), B.lora_t, tid, nth); \
            _Pragma("omp barrier") \
            lora_expand_thread(&p_->lora, lora_slots, S, p_->n, B.lora_t, (Y), (YS), tid, nth); \
        } \
        _Pragma("omp barrier") \
    } while (0)

/* attention of sequence s, kv head g of layer L in the step below */
#define ATTEND(s, g) attend(B.qkv + (int64_t)(s) * nqkv + (g) * G * D, \
                            B.attn + ((int64_t)(s) * NH + (g) * G) * D, L->k_cache, L->v_cache, \
                            m->kv_bf16, block_tables + (int64_t)(s) * bt_stride, seq_lens[s], \
                            m->block_size, KVH, (g), G, D, m->scale, scores)

/* S sequences, one new token each. x: [S, hidden] fp32 embeddings; positions [S]; slots [S]
 * (cache slot of each new token); block_tables [S, bt_stride]; seq_lens [S] (context after
 * this token). Writes logits [S, vocab] (if non-NULL) and their argmax [S]. prof (if
 * non-NULL): 11 accumulators of seconds per phase (norm, qkv, rope+kv write, attention, o,
 * norm, gate_up, silu*mul, down, final norm, head), timed on thread 0 from barrier to barrier.
 * lora_slots (NULL: none): [S] each sequence's LoRA slot (-1: the base model), for the
 * projections with adapters (sl_proj.lora).
 * Returns 0, or -1 on bad sizes. */
int sl_decode(const sl_model *m, int S, const float *x, const int64_t *positions,
              const int64_t *slots, const int32_t *block_tables, int bt_stride,
              const int32_t *seq_lens, float *logits, int64_t *argmax, float *scratch, int nt,
              double *prof, const int32_t *lora_slots) {
    if (S < 1 || S > m->max_rows || nt < 1) return -1;
    for (int s = 0; s < S; s++)
        if (seq_lens[s] < 1 || seq_lens[s] > m->max_ctx) return -1;
    sl_bufs B;
    layout(m, nt, scratch, &B);
    const int H = m->hidden, D = m->head_dim, NH = m->n_heads, KVH = m->n_kv_heads;
    const int G = NH / KVH, I = m->inter, nqkv = (NH + 2 * KVH) * D;
    memcpy(B.resid, x, sizeof(float) * (size_t)S * H);
#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        float *xsum = B.xsum + tid * B.xsum_stride;
        float *scores = B.scores + tid * B.scores_stride;
        double t_last = prof ? sl_now() : 0.;
        for (int l = 0; l < m->n_layers; l++) {
            const sl_layer *L = &m->layers[l];
            for (int s = tid; s < S; s += nth) {
                if (l > 0)
                    for (int i = 0; i < H; i++) B.resid[s * H + i] += B.h[s * H + i];
                rms_norm_row(B.resid + s * H, L->attn_norm, B.xn + s * H, H, m->eps);
            }
#pragma omp barrier
            MARK(0);
            proj_thread(&L->qkv, S, B.xn, H, B.qkv, nqkv, xsum, tid, nth);
            LORA(&L->qkv, B.xn, H, B.qkv, nqkv);
            MARK(1);
            for (int s = tid; s < S; s += nth) {
                float *q = B.qkv + (int64_t)s * nqkv, *k = q + NH * D, *v = k + KVH * D;
                if (L->q_norm) {
                    for (int h = 0; h < NH; h++) rms_norm_row(q + h * D, L->q_norm, q + h * D, D, m->eps);
                    for (int h = 0; h < KVH; h++) rms_norm_row(k + h * D, L->k_norm, k + h * D, D, m->eps);
                }
                const float *cs = m->cos_sin + positions[s] * D;
                for (int h = 0; h < NH; h++) rope_row(q + h * D, cs, D);
                for (int h = 0; h < KVH; h++) rope_row(k + h * D, cs, D);
                kv_store(L->k_cache, m->kv_bf16, slots[s] * KVH * D, k, KVH * D);
                kv_store(L->v_cache, m->kv_bf16, slots[s] * KVH * D, v, KVH * D);
            }
#pragma omp barrier
            MARK(2);
            /* work items: (sequence, kv head) pairs; with enough sequences a thread takes all
             * kv heads of its sequences in a row, so each cached token row (every kv head, one
             * contiguous run) comes from memory once and from L2 for the next heads (64
             * sequences at 512 tokens of context: attention 83 -> 72 ms a step) */
            if (S >= 2 * nth) {
                for (int s = tid; s < S; s += nth)
                    for (int g = 0; g < KVH; g++) ATTEND(s, g);
            } else {
                for (int w = tid; w < S * KVH; w += nth) ATTEND(w / KVH, w % KVH);
            }
#pragma omp barrier
            MARK(3);
            proj_thread(&L->o, S, B.attn, NH * D, B.h, H, xsum, tid, nth);
            LORA(&L->o, B.attn, NH * D, B.h, H);
            MARK(4);
            for (int s = tid; s < S; s += nth) {
                for (int i = 0; i < H; i++) B.resid[s * H + i] += B.h[s * H + i];
                rms_norm_row(B.resid + s * H, L->ffn_norm, B.xn + s * H, H, m->eps);
            }
#pragma omp barrier
            MARK(5);
            proj_thread(&L->gate_up, S, B.xn, H, B.gu, 2 * I, xsum, tid, nth);
            LORA(&L->gate_up, B.xn, H, B.gu, 2 * I);
            MARK(6);
            {   /* silu(gate) * up, split over all S * I elements */
                const int64_t total = (int64_t)S * I, a = total * tid / nth, e = total * (tid + 1) / nth;
                for (int64_t s = a / I; s * I < e; s++) { /* this thread's part of row s */
                    const int64_t lo = s * I > a ? s * I : a, hi = (s + 1) * I < e ? (s + 1) * I : e;
                    silu_mul(B.gu + s * 2 * I + (lo - s * I), B.gu + s * 2 * I + I + (lo - s * I),
                             B.act + lo, hi - lo);
                }
            }
#pragma omp barrier
            MARK(7);
            proj_thread(&L->down, S, B.act, I, B.h, H, xsum, tid, nth);
            LORA(&L->down, B.act, I, B.h, H);
            MARK(8);
        }
        for (int s = tid; s < S; s += nth) {
            for (int i = 0; i < H; i++) B.resid[s * H + i] += B.h[s * H + i];
            rms_norm_row(B.resid + s * H, m->final_norm, B.xn + s * H, H, m->eps);
        }
#pragma omp barrier
        MARK(9);
        if (logits) proj_thread(&m->head, S, B.xn, H, logits, m->vocab, xsum, tid, nth);
#pragma omp barrier
        MARK(10);
    }
    if (logits && argmax)
        for (int s = 0; s < S; s++) { /* first maximum, as torch.argmax */
            const float *row = logits + (int64_t)s * m->vocab;
            int64_t best = 0;
            for (int64_t j = 1; j < m->vocab; j++)
                if (row[j] > row[best]) best = j;
            argmax[s] = best;
        }
    return 0;
}

/* ---- the prompt path's elementwise ops over PyTorch tensors (rows split over nt threads) ---- */
/* out [M, I] = silu(gu[m, :I]) * gu[m, I:] for gu [M, 2I] fp32 (a gate_up projection's output) */
int sl_silu_mul(const float *gu, float *out, int64_t M, int64_t I, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t m = 0; m < M; m++) silu_mul(gu + m * 2 * I, gu + m * 2 * I + I, out + m * I, I);
    return 0;
}

/* out [M, n] = RMSNorm(r) * w with r = x + res (written to res_out), or r = x where res is
 * NULL; fp32 rows */
int sl_rms_norm(const float *x, const float *res, float *res_out, const float *w, float *out,
                int64_t M, int n, float eps, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * n;
        if (res) {
            float *r = res_out + m * n;
            const float *a = res + m * n;
            for (int i = 0; i < n; i++) r[i] = xr[i] + a[i];
            xr = r;
        }
        rms_norm_row(xr, w, out + m * n, n, eps);
    }
    return 0;
}

/* Rotary embedding (rotate_half) of a prompt's q [T, H, D] and k [T, KVH, D] (rows qs and ks
 * floats apart, heads D apart: views of the qkv projection's output) into qo [T, H, D] and
 * ko [T, KVH, D], at positions pos [T], from cos_sin [max_position, D] (cos | sin): the
 * PyTorch expression's x * cos + rotate_half(x) * sin, rounded as it rounds (no contraction
 * into FMAs: the same bits as layers/rotary.py) */
__attribute__((optimize("fp-contract=off")))
int sl_rope(const float *q, const float *k, int64_t qs, int64_t ks, float *qo, float *ko,
            const int64_t *pos, const float *cos_sin, int64_t T, int H, int KVH, int D, int nt) {
    const int h2 = D / 2;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *cs = cos_sin + pos[t] * D;
        for (int j = 0; j < H + KVH; j++) {
            const float *x = j < H ? q + t * qs + (int64_t)j * D : k + t * ks + (int64_t)(j - H) * D;
            float *o = j < H ? qo + (t * H + j) * D : ko + (t * KVH + j - H) * D;
            for (int i = 0; i < h2; i++) {
                const float c = cs[i], sn = cs[h2 + i], a = x[i], b = x[i + h2];
                o[i] = a * c + (-b) * sn;
                o[i + h2] = b * c + a * sn;
            }
        }
    }
    return 0;
}

/* ---- single kernels, for tests against their PyTorch references ---------------------------- */
/* y [S, n] = x [S, k] @ W^T (+ bias) for one projection, on nt threads. */
int64_t sl_linear_scratch(int S, int k) { return proj_scratch(S, k); }

int sl_linear(const sl_proj *p, int S, const float *x, float *y, float *xsum, int nt) {
    /* xsum: nt * sl_linear_scratch(S, k) floats */
    const int k = p->part[0].k;
#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num();
        proj_thread(p, S, x, k, y, p->n, xsum + (int64_t)tid * proj_scratch(S, k), tid,
                    omp_get_num_threads());
    }
    return 0;
}

/* Paged attention of S query rows, one query token each: q [S, H, D] -> out [S, H, D] over
 * caches as in sl_layer; row s sees the first seq_lens[s] tokens of its block table (row s of
 * block_tables, bt_stride apart). Decode: one row per sequence. A prompt's causal attention:
 * its query rows with bt_stride 0 (one table) and seq_lens = positions + 1. Work items are
 * dealt round-robin (causal rows grow, so blocks of them would leave threads idle). */
int sl_attention(const float *q, float *out, const void *kc, const void *vc, int bf16,
                 const int32_t *block_tables, int bt_stride, const int32_t *seq_lens, int S,
                 int H, int KVH, int D, int bsz, float scale, float *scores, int max_ctx, int nt) {
    const int G = H / KVH;
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int w = 0; w < S * KVH; w++) {
        const int s = w / KVH, g = w % KVH;
        attend(q + ((int64_t)s * H + g * G) * D, out + ((int64_t)s * H + g * G) * D, kc, vc, bf16,
               block_tables + (int64_t)s * bt_stride, seq_lens[s], bsz, KVH, g, G, D, scale,
               scores + (int64_t)omp_get_thread_num() * G * max_ctx);
    }
    return 0;
}
