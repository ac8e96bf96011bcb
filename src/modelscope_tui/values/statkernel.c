/* mscope's statistics kernel: min, max, zeros, NaN / Inf counts, mean, sum of squared deviations
 * and sum of squares of fp16 / bf16 / fp32 values in one pass over memory.
 *
 * Why it exists: numpy needs one pass per statistic (~1 ns per value per thread), which put
 * `mscope audit --stats` at 3.5x the time of merely touching the file's pages. This loop reads
 * each value once.
 *
 * Built by hatch_build.py into _native.so and loaded with ctypes (no Python C API, so one
 * build serves every Python version); values/kernels.py falls back to numpy when it is missing.
 *
 * Values go in blocks of BLOCK. The AVX2 loop reads a block once for min, max, zeros, the sum
 * and the sum of squares (float32 lanes of at most 64 terms, then float64); only a block whose
 * mean dominates its spread (a LayerNorm weight near 1.0) is widened into an L1 buffer and summed
 * again around its mean, so m2 = sum d^2 - (sum d)^2/n does not cancel. A block holding NaN or
 * Inf, or values too large or small for float32 squares, takes an exact float64 path. Blocks
 * merge with Chan's formula in float64. The portable loop takes the exact path for every block.
 *
 * A stale build is ignored by its source hash (native.c), so there is no version to bump.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define MSCOPE_X86 1
#include <immintrin.h>
#endif

#define BLOCK 2048

enum { KIND_F16 = 0, KIND_BF16 = 1, KIND_F32 = 2 };

typedef struct {
    int64_t n, finite, nan, inf, zeros;
    double mn, mx;          /* over the values that are not NaN; meaningless when n == nan */
    double mean, m2, sumsq; /* over the finite values */
} mscope_part;

static inline float bits_to_float(uint32_t b) {
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (man << 13));
    if (exp == 0) {
        float f = (float)man * 5.9604644775390625e-8f; /* man * 2^-24, exact */
        return sign ? -f : f;
    }
    return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

static inline float load_scalar(const uint8_t *src, int kind, int64_t i) {
    if (kind == KIND_F32) {
        float f;
        memcpy(&f, src + 4 * i, 4);
        return f;
    }
    uint16_t h;
    memcpy(&h, src + 2 * i, 2);
    return kind == KIND_F16 ? half_to_float(h) : bits_to_float((uint32_t)h << 16);
}

static void part_init(mscope_part *p) {
    memset(p, 0, sizeof *p);
    p->mn = INFINITY;
    p->mx = -INFINITY;
}

/* Chan et al.: fold a block's finite moments into the running ones. */
static inline void add_moments(mscope_part *p, int64_t nb, double mean, double m2, double sumsq) {
    if (nb == 0) return;
    int64_t total = p->finite + nb;
    double delta = mean - p->mean;
    p->mean += delta * (double)nb / (double)total;
    p->m2 += m2 + delta * delta * (double)p->finite * (double)nb / (double)total;
    p->finite = total;
    p->sumsq += sumsq;
}

/* Moments of the finite values of buf around K, in float64 (the second pass). */
static void centred(const float *buf, int64_t nb, int64_t finite, double k, mscope_part *p) {
    double sd = 0.0, sq = 0.0;
    for (int64_t i = 0; i < nb; i++) {
        double v = buf[i];
        if (!isfinite(v)) continue;
        double d = v - k;
        sd += d;
        sq += d * d;
    }
    double m2 = sq - sd * sd / (double)finite;
    double sumsq = sq + 2.0 * k * sd + (double)finite * k * k;
    add_moments(p, finite, k + sd / (double)finite, m2 > 0 ? m2 : 0.0, sumsq);
}

/* Any block, NaN and Inf included; everything in float64. */
static void block_exact(const float *buf, int64_t nb, mscope_part *p) {
    double s = 0.0;
    int64_t finite = 0;
    for (int64_t i = 0; i < nb; i++) {
        float v = buf[i];
        if (isnan(v)) {
            p->nan++;
            continue;
        }
        if (v == 0.0f) p->zeros++;
        if (v < p->mn) p->mn = v;
        if (v > p->mx) p->mx = v;
        if (isinf(v)) {
            p->inf++;
            continue;
        }
        s += v;
        finite++;
    }
    if (finite) centred(buf, nb, finite, s / (double)finite, p);
}

static void run_scalar(const uint8_t *src, int kind, int64_t n, mscope_part *p) {
    float buf[BLOCK];
    for (int64_t off = 0; off < n; off += BLOCK) {
        int64_t nb = n - off < BLOCK ? n - off : BLOCK;
        for (int64_t i = 0; i < nb; i++) buf[i] = load_scalar(src, kind, off + i);
        block_exact(buf, nb, p);
    }
}

#ifdef MSCOPE_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 static inline __m256 load8(const uint8_t *src, int kind, int64_t i) {
    if (kind == KIND_F32) return _mm256_loadu_ps((const float *)(const void *)(src + 4 * i));
    __m128i h = _mm_loadu_si128((const __m128i *)(const void *)(src + 2 * i));
    if (kind == KIND_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

AVX2 static inline float hmin(__m256 v) {
    __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

AVX2 static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

AVX2 static inline double hsum_pd(__m256d v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

AVX2 static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

AVX2 static inline __attribute__((always_inline)) void widen_block(
    const uint8_t *src, const int kind, int64_t off, int64_t nb, float *buf) {
    int64_t i = 0;
    for (; i + 8 <= nb; i += 8) _mm256_store_ps(buf + i, load8(src, kind, off + i));
    for (; i < nb; i++) buf[i] = load_scalar(src, kind, off + i);
}

AVX2 static inline double lanes_pd(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256d t = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(a)), _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
    t = _mm256_add_pd(t, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(b)), _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1))));
    t = _mm256_add_pd(t, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(c)), _mm256_cvtps_pd(_mm256_extractf128_ps(c, 1))));
    t = _mm256_add_pd(t, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(d)), _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1))));
    return hsum_pd(t);
}

/* Deviations from K = the float32 block mean, summed in float32 (32 lanes of at most 64 terms:
 * relative error ~1e-7), then in float64. For blocks whose mean dominates their spread. */
AVX2 static inline __attribute__((always_inline)) void recentred(
    const float *buf, int64_t nb, float kf, mscope_part *p) {
    const __m256 vk = _mm256_set1_ps(kf), zero = _mm256_setzero_ps();
    __m256 sd[4] = {zero, zero, zero, zero}, sq[4] = {zero, zero, zero, zero};
    const int64_t n32 = nb & ~(int64_t)31;
    for (int64_t i = 0; i < n32; i += 32) {
        for (int j = 0; j < 4; j++) {
            __m256 d = _mm256_sub_ps(_mm256_load_ps(buf + i + 8 * j), vk);
            sd[j] = _mm256_add_ps(sd[j], d);
            sq[j] = _mm256_fmadd_ps(d, d, sq[j]);
        }
    }
    double sdv = lanes_pd(sd[0], sd[1], sd[2], sd[3]), sqv = lanes_pd(sq[0], sq[1], sq[2], sq[3]);
    double k = (double)kf;
    for (int64_t i = n32; i < nb; i++) {
        double d = (double)buf[i] - k;
        sdv += d;
        sqv += d * d;
    }
    double m2 = sqv - sdv * sdv / (double)nb;
    add_moments(p, nb, k + sdv / (double)nb, m2 > 0 ? m2 : 0.0, sqv + 2.0 * k * sdv + (double)nb * k * k);
}

/* always_inline with a constant kind: one specialised loop per dtype.
 *
 * One pass per block takes min, max, zeros, sum and sum of squares (float32 lanes of at most 64
 * terms, then float64). NaN and Inf stay in those sums, which sends such a block (and one whose
 * float32 squares overflow) the exact way; m2 = sumsq - sum^2/n is kept only where the mean does
 * not dominate the spread (mean^2 <= 1% of the mean square: it loses at most 1% of the digits),
 * else the block is widened into an L1 buffer and summed again around its mean. */
AVX2 static inline __attribute__((always_inline)) void run_avx2_kind(
    const uint8_t *src, const int kind, int64_t n, mscope_part *p) {
    float buf[BLOCK] __attribute__((aligned(32)));
    const __m256 zero = _mm256_setzero_ps();
    const __m256 inf = _mm256_set1_ps(INFINITY), ninf = _mm256_set1_ps(-INFINITY);
    for (int64_t off = 0; off < n; off += BLOCK) {
        const int64_t nb = n - off < BLOCK ? n - off : BLOCK;
        const int64_t nv = nb & ~(int64_t)31;
        __m256 vmin0 = inf, vmin1 = inf, vmax0 = ninf, vmax1 = ninf;
        __m256 s0 = zero, s1 = zero, s2 = zero, s3 = zero, q0 = zero, q1 = zero, q2 = zero, q3 = zero;
        __m256i vzero = _mm256_setzero_si256();
        for (int64_t i = 0; i < nv; i += 32) {
            __m256 a = load8(src, kind, off + i), b = load8(src, kind, off + i + 8);
            __m256 c = load8(src, kind, off + i + 16), d = load8(src, kind, off + i + 24);
            vmin0 = _mm256_min_ps(vmin0, _mm256_min_ps(a, b));
            vmin1 = _mm256_min_ps(vmin1, _mm256_min_ps(c, d));
            vmax0 = _mm256_max_ps(vmax0, _mm256_max_ps(a, b));
            vmax1 = _mm256_max_ps(vmax1, _mm256_max_ps(c, d));
            s0 = _mm256_add_ps(s0, a);
            s1 = _mm256_add_ps(s1, b);
            s2 = _mm256_add_ps(s2, c);
            s3 = _mm256_add_ps(s3, d);
            q0 = _mm256_fmadd_ps(a, a, q0);
            q1 = _mm256_fmadd_ps(b, b, q1);
            q2 = _mm256_fmadd_ps(c, c, q2);
            q3 = _mm256_fmadd_ps(d, d, q3);
            /* an all-ones mask is -1: subtracting it counts */
            __m256i za = _mm256_castps_si256(_mm256_cmp_ps(a, zero, _CMP_EQ_OQ));
            __m256i zb = _mm256_castps_si256(_mm256_cmp_ps(b, zero, _CMP_EQ_OQ));
            __m256i zc = _mm256_castps_si256(_mm256_cmp_ps(c, zero, _CMP_EQ_OQ));
            __m256i zd = _mm256_castps_si256(_mm256_cmp_ps(d, zero, _CMP_EQ_OQ));
            vzero = _mm256_sub_epi32(vzero, _mm256_add_epi32(_mm256_add_epi32(za, zb), _mm256_add_epi32(zc, zd)));
        }
        float mn = hmin(_mm256_min_ps(vmin0, vmin1)), mx = hmax(_mm256_max_ps(vmax0, vmax1));
        double sum = lanes_pd(s0, s1, s2, s3), sumsq = lanes_pd(q0, q1, q2, q3);
        __m128i z4 = _mm_add_epi32(_mm256_castsi256_si128(vzero), _mm256_extracti128_si256(vzero, 1));
        z4 = _mm_add_epi32(z4, _mm_unpackhi_epi64(z4, z4));
        int64_t zeros = _mm_cvtsi128_si32(_mm_add_epi32(z4, _mm_shuffle_epi32(z4, 1)));
        int bad = 0;
        for (int64_t i = nv; i < nb; i++) {
            float v = load_scalar(src, kind, off + i);
            if (!isfinite(v)) bad = 1;
            if (v < mn) mn = v;
            if (v > mx) mx = v;
            if (v == 0.0f) zeros++;
            sum += v;
            sumsq += (double)v * v;
        }
        if (bad || !isfinite(sum) || !isfinite(sumsq)) {
            widen_block(src, kind, off, nb, buf);
            block_exact(buf, nb, p);
            continue;
        }
        p->zeros += zeros;
        if (mn < p->mn) p->mn = mn;
        if (mx > p->mx) p->mx = mx;
        float amax = -mn > mx ? -mn : mx;
        if (amax == 0.0f) {
            add_moments(p, nb, 0.0, 0.0, 0.0);
            continue;
        }
        double mean = sum / (double)nb;
        if (amax < 0x1p-30f) { /* float32 squares lost digits to underflow: float64 throughout */
            widen_block(src, kind, off, nb, buf);
            centred(buf, nb, nb, mean, p);
            continue;
        }
        if (mean * mean * (double)nb > 0.01 * sumsq) {
            widen_block(src, kind, off, nb, buf);
            recentred(buf, nb, (float)mean, p);
            continue;
        }
        double m2 = sumsq - sum * mean;
        add_moments(p, nb, mean, m2 > 0 ? m2 : 0.0, sumsq);
    }
}

AVX2 static void run_avx2(const uint8_t *src, int kind, int64_t n, mscope_part *p) {
    switch (kind) {
    case KIND_F16: run_avx2_kind(src, KIND_F16, n, p); break;
    case KIND_BF16: run_avx2_kind(src, KIND_BF16, n, p); break;
    default: run_avx2_kind(src, KIND_F32, n, p); break;
    }
}

static int have_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                 __builtin_cpu_supports("f16c");
    }
    return cached;
}
#endif

/* Which loop mscope_stats takes: 2 AVX2 + F16C + FMA, 1 portable C. */
int mscope_kernel_isa(void) {
#ifdef MSCOPE_X86
    if (have_avx2()) return 2;
#endif
    return 1;
}

/* Statistics of n values of `kind` at data (any alignment) into *out. 0, or -1 for a bad kind.
 * `portable`: take the portable loop even where AVX2 is there (tests compare the two). */
int mscope_stats(const void *data, int64_t n, int kind, int portable, mscope_part *out) {
    if (kind != KIND_F16 && kind != KIND_BF16 && kind != KIND_F32) return -1;
    part_init(out);
    out->n = n;
    if (n <= 0) return 0;
#ifdef MSCOPE_X86
    if (!portable && have_avx2()) {
        run_avx2((const uint8_t *)data, kind, n, out);
        return 0;
    }
#endif
    (void)portable;
    run_scalar((const uint8_t *)data, kind, n, out);
    return 0;
}
