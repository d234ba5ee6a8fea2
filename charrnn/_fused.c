/* Optional compiled kernels for the recurrent loops of charrnn/cells.py.
 *
 * Each kernel runs a whole window of one layer, forward or backward, in C: per step, the
 * recurrent product with pre-packed weights (gemm below) and the step's elementwise work in
 * one pass over the batch.  cells.py holds the same loops in numpy, and those are the
 * reference: every kernel computes the numpy lines it replaces (same operations, same
 * order, no contraction into FMA outside the GEMM), so the results differ only by
 *   - the GEMM's summation order (it accumulates with FMA where the CPU has it, like BLAS);
 *   - the transcendental functions: float64 uses the C library's tanh (within an ulp, like
 *     numpy's); float32 uses tanh_f32 below, a branch-free version of Cephes' tanhf that the
 *     compiler vectorizes (max error 1.4e-7 relative, 1.33 ulp, over every float32), and
 *     computes the sigmoid gates as 1 / (1 + exp(-x)) (gate_f32) where numpy has
 *     0.5 tanh(x/2) + 0.5.
 *
 * Arrays are taken through the buffer protocol (no numpy headers): C-contiguous, all float32
 * or all float64, not overlapping where one is written, with the shapes each kernel's
 * ArgSpec lists.  Anything else raises ValueError.  The GIL is released while a kernel runs,
 * so that threads scoring or training separate parts of a batch run on separate cores.
 *
 * Build flags (setup.py): -O3 -ffp-contract=off -fno-trapping-math.  The last one only lets
 * GCC if-convert (and so vectorize) tanh_f32; results do not depend on it.  -ffast-math
 * would break tanh_f32's rounding trick and NaN handling, hence the #error.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(_MSC_VER) && !defined(__clang__)
#define restrict __restrict
#endif

#ifdef __FAST_MATH__
#error "charrnn/_fused.c needs IEEE arithmetic: do not compile it with -ffast-math"
#endif
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

/* On x86-64 Linux with GCC and glibc, every elementwise kernel is compiled three times from
 * one body (DEFINE_VARIANT below): for AVX-512 ("avx512", target avx512f: 16 float32 lanes),
 * AVX2 ("avx2": 8) and baseline x86-64 ("baseline", SSE2: 4), the same IEEE operations in
 * each.  When the module loads it takes the best one the CPU runs (__builtin_cpu_supports);
 * set_kernels switches between them, for tests.  Elsewhere (MSVC, clang, musl, other CPUs)
 * only the baseline is compiled. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) &&   \
    defined(__GLIBC__)
#define KERNEL_VARIANTS 1
#endif

/* The GEMM has hand-written AVX-512 and AVX2 + FMA micro-kernels on x86-64 (GCC or clang),
 * the best the CPU has chosen at load time; elsewhere, and on older x86 CPUs, a portable C
 * loop. */
#if defined(__GNUC__) && defined(__x86_64__)
#define HAVE_AVX2_GEMM 1
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma")))
#define AVX512 __attribute__((target("avx512f")))
#endif

/* ---- tanh ----------------------------------------------------------------------------- */

/* exp(y) (Cephes expf), branch-free: y clamped to [-87, 88], where 2^n stays a normal
 * float (NaN passes both tests and stays NaN); n = round(y / ln 2) by adding and subtracting
 * 1.5 * 2^23, 2^n built from n's bits. */
static inline float exp_f32(float y)
{
    union { float f; int32_t i; } k, scale;
    y = y > 88.0f ? 88.0f : y;
    y = y < -87.0f ? -87.0f : y;
    k.f = y * 1.44269504088896341f + 12582912.0f;
    float n = k.f - 12582912.0f;
    float r = y - n * 0.693359375f;
    r = r + n * 2.12194440e-4f; /* ln 2 = 0.693359375 - 2.12194440e-4, in two parts */
    float p = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r
                 + 4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f) * r * r
              + r + 1.0f;
    /* k.i - 0x4B400000 == n; shifted as unsigned (NaN makes it overflow) */
    scale.i = (int32_t)((uint32_t)(k.i - 0x4B400000 + 127) << 23);
    return p * scale.f;
}

/* Cephes tanhf: an odd polynomial below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1) above it, both
 * computed and one selected so that loops over it vectorize.  tanh(+-inf) = +-1 and NaN stays
 * NaN (it takes the polynomial branch). */
static inline float tanh_f32(float x)
{
    float ax = fabsf(x);
    float ax_clamped = ax < 10.0f ? ax : 10.0f; /* tanh(10) rounds to 1 */
    float z = x * x;
    float small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z
                    + 1.33314422036e-1f) * z - 3.33332819422e-1f) * z * x + x;
    float big = 1.0f - 2.0f / (exp_f32(ax_clamped + ax_clamped) + 1.0f);
    big = x < 0.0f ? -big : big;
    return ax >= 0.625f ? big : small;
}

static inline double tanh_f64(double x) { return tanh(x); }

/* A sigmoid gate from its pre-scaled input u = x / 2 (the 0.5 is folded into the weights):
 * sigmoid(x) = 0.5 tanh(u) + 0.5 = 1 / (1 + exp(-2u)).  float64 keeps the tanh form of the
 * numpy code; float32 takes the exp form: less work than tanh_f32 and no cancellation, so
 * within 2 ulp for |x| < 87 (the tanh form loses all relative precision as the gate
 * closes); beyond, exp is clamped and a closed gate reads 6e-39 instead of ~0. */
static inline float gate_f32(float u) { return 1.0f / (1.0f + exp_f32(-2.0f * u)); }
static inline double gate_f64(double u) { return tanh(u) * 0.5 + 0.5; }

/* ---- GEMM with pre-packed weights -------------------------------------------------------
 *
 * Every step of a recurrent loop multiplies a few rows (the batch) by the same weights:
 * c (M, N) = a (M, K) @ W.T, or c += a @ W.T, with W (N, K) fixed for the whole window.  A
 * general BLAS GEMM re-packs W on every call and is tuned for large M; here W is packed once
 * per window (charrnn.cells.pack_panels) into panels of PANEL = 16 columns of the product,
 *
 *     packed[p, k, j] = W[p * PANEL + j, k]    (zero where p * PANEL + j >= N),
 *
 * so that the inner loop reads one row of 16 contiguous weights per k.  A tile of MR rows of
 * `a` times one panel is summed in registers over all of K and then stored or added to c:
 * with AVX2, 6 rows of 2 x 8 floats (or 3 rows of 4 x 4 doubles), 12 vector accumulators;
 * with AVX-512, 8 rows times two panels side by side, 16 accumulators of 16 floats (one
 * panel for a last odd one), K in chunks of 256 beyond 384.  Panels are the outer loop: W
 * streams through the cache once per call while `a` (M x K) stays.
 *
 *              K                        PANEL
 *        +-----------+           +------------+
 *   MR { |  a rows   |  @  K {   |  panel p   |  =  MR x PANEL tile of c, in registers
 *        +-----------+           +------------+
 */

#define PANEL 16

/* The version of the functions this module offers; charrnn.cells ignores a build whose API
 * differs from the one it was written for (a stale build left by a failed rebuild). */
#define API 3

static Py_ssize_t panels(Py_ssize_t n) { return (n + PANEL - 1) / PANEL; }

/* Portable C: one row of `a` against one panel at a time. */
#define DEFINE_GEMM_C(real)                                                                 \
    static void gemm_c_##real(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,                     \
                              const real *restrict a, const real *restrict packed,          \
                              real *restrict c, int accumulate)                             \
    {                                                                                       \
        for (Py_ssize_t j0 = 0; j0 < N; j0 += PANEL) {                                      \
            const real *p = packed + (j0 / PANEL) * K * PANEL;                              \
            Py_ssize_t nr = N - j0 < PANEL ? N - j0 : PANEL;                                \
            for (Py_ssize_t i = 0; i < M; i++) {                                            \
                real sum[PANEL] = {0};                                                      \
                const real *ai = a + i * K;                                                 \
                for (Py_ssize_t k = 0; k < K; k++)                                          \
                    for (int j = 0; j < PANEL; j++)                                         \
                        sum[j] += ai[k] * p[k * PANEL + j];                                 \
                real *ci = c + i * N + j0;                                                  \
                for (Py_ssize_t j = 0; j < nr; j++)                                         \
                    ci[j] = accumulate ? ci[j] + sum[j] : sum[j];                           \
            }                                                                               \
        }                                                                                   \
    }
DEFINE_GEMM_C(float)
DEFINE_GEMM_C(double)

#ifdef HAVE_AVX2_GEMM
/* One tile row of c: store (or add) `lanes` vectors, or only the first nr values of them. */
AVX2 static void store_f32(float *c, __m256 v0, __m256 v1, Py_ssize_t nr, int accumulate)
{
    if (nr == PANEL) {
        if (accumulate) {
            v0 = _mm256_add_ps(_mm256_loadu_ps(c), v0);
            v1 = _mm256_add_ps(_mm256_loadu_ps(c + 8), v1);
        }
        _mm256_storeu_ps(c, v0);
        _mm256_storeu_ps(c + 8, v1);
        return;
    }
    float tmp[PANEL];
    _mm256_storeu_ps(tmp, v0);
    _mm256_storeu_ps(tmp + 8, v1);
    for (Py_ssize_t j = 0; j < nr; j++)
        c[j] = accumulate ? c[j] + tmp[j] : tmp[j];
}

AVX2 static void store_f64(double *c, __m256d v0, __m256d v1, __m256d v2, __m256d v3,
                           Py_ssize_t nr, int accumulate)
{
    double tmp[PANEL];
    _mm256_storeu_pd(tmp, v0);
    _mm256_storeu_pd(tmp + 4, v1);
    _mm256_storeu_pd(tmp + 8, v2);
    _mm256_storeu_pd(tmp + 12, v3);
    for (Py_ssize_t j = 0; j < nr; j++)
        c[j] = accumulate ? c[j] + tmp[j] : tmp[j];
}

/* float32 micro-kernels for 1..6 rows: named accumulators (x_r, y_r) keep the tile in
 * registers; rows past the tile's height are compiled out. */
#define F32_ROW_FMA(r)                                                                      \
    if (rows > r) {                                                                         \
        __m256 ar = _mm256_broadcast_ss(a + r * K + k);                                    \
        x##r = _mm256_fmadd_ps(ar, b0, x##r);                                               \
        y##r = _mm256_fmadd_ps(ar, b1, y##r);                                               \
    }
#define F32_ROW_STORE(r) \
    if (rows > r) store_f32(c + r * ldc, x##r, y##r, nr, accumulate);
#define DEFINE_MICRO_F32(ROWS)                                                              \
    AVX2 static void micro_f32_##ROWS(Py_ssize_t K, const float *restrict a,                \
                                      const float *restrict p, float *restrict c,           \
                                      Py_ssize_t ldc, Py_ssize_t nr, int accumulate)        \
    {                                                                                       \
        const int rows = ROWS;                                                              \
        __m256 x0 = _mm256_setzero_ps(), y0 = x0, x1 = x0, y1 = x0, x2 = x0, y2 = x0;       \
        __m256 x3 = x0, y3 = x0, x4 = x0, y4 = x0, x5 = x0, y5 = x0;                        \
        for (Py_ssize_t k = 0; k < K; k++) {                                                \
            __m256 b0 = _mm256_loadu_ps(p + k * PANEL);                                     \
            __m256 b1 = _mm256_loadu_ps(p + k * PANEL + 8);                                 \
            F32_ROW_FMA(0) F32_ROW_FMA(1) F32_ROW_FMA(2)                                    \
            F32_ROW_FMA(3) F32_ROW_FMA(4) F32_ROW_FMA(5)                                    \
        }                                                                                   \
        F32_ROW_STORE(0) F32_ROW_STORE(1) F32_ROW_STORE(2)                                  \
        F32_ROW_STORE(3) F32_ROW_STORE(4) F32_ROW_STORE(5)                                  \
    }
DEFINE_MICRO_F32(1)
DEFINE_MICRO_F32(2)
DEFINE_MICRO_F32(3)
DEFINE_MICRO_F32(4)
DEFINE_MICRO_F32(5)
DEFINE_MICRO_F32(6)

/* float64 micro-kernels for 1..3 rows, a row of the tile in four vectors (w, x, y, z). */
#define F64_ROW_FMA(r)                                                                      \
    if (rows > r) {                                                                         \
        __m256d ar = _mm256_broadcast_sd(a + r * K + k);                                   \
        w##r = _mm256_fmadd_pd(ar, b0, w##r);                                               \
        x##r = _mm256_fmadd_pd(ar, b1, x##r);                                               \
        y##r = _mm256_fmadd_pd(ar, b2, y##r);                                               \
        z##r = _mm256_fmadd_pd(ar, b3, z##r);                                               \
    }
#define F64_ROW_STORE(r) \
    if (rows > r) store_f64(c + r * ldc, w##r, x##r, y##r, z##r, nr, accumulate);
#define DEFINE_MICRO_F64(ROWS)                                                              \
    AVX2 static void micro_f64_##ROWS(Py_ssize_t K, const double *restrict a,               \
                                      const double *restrict p, double *restrict c,         \
                                      Py_ssize_t ldc, Py_ssize_t nr, int accumulate)        \
    {                                                                                       \
        const int rows = ROWS;                                                              \
        __m256d w0 = _mm256_setzero_pd(), x0 = w0, y0 = w0, z0 = w0;                        \
        __m256d w1 = w0, x1 = w0, y1 = w0, z1 = w0, w2 = w0, x2 = w0, y2 = w0, z2 = w0;     \
        for (Py_ssize_t k = 0; k < K; k++) {                                                \
            const double *pk = p + k * PANEL;                                               \
            __m256d b0 = _mm256_loadu_pd(pk), b1 = _mm256_loadu_pd(pk + 4);                 \
            __m256d b2 = _mm256_loadu_pd(pk + 8), b3 = _mm256_loadu_pd(pk + 12);            \
            F64_ROW_FMA(0) F64_ROW_FMA(1) F64_ROW_FMA(2)                                    \
        }                                                                                   \
        F64_ROW_STORE(0) F64_ROW_STORE(1) F64_ROW_STORE(2)                                  \
    }
DEFINE_MICRO_F64(1)
DEFINE_MICRO_F64(2)
DEFINE_MICRO_F64(3)

/* AVX-512 float32 micro-kernels for 1..8 rows, one vector (16 floats) per row. */
#define Z_ROW_FMA(r) \
    if (rows > r) z##r = _mm512_fmadd_ps(_mm512_set1_ps(a[r * K + k]), b, z##r);
#define Z_ROW_STORE(r)                                                                      \
    if (rows > r) {                                                                         \
        float *cr = c + r * ldc;                                                            \
        if (accumulate)                                                                     \
            z##r = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, cr), z##r);                    \
        _mm512_mask_storeu_ps(cr, mask, z##r);                                              \
    }
#define DEFINE_MICRO_Z(ROWS)                                                                \
    AVX512 static void micro_z_##ROWS(Py_ssize_t K, const float *restrict a,                \
                                      const float *restrict p, float *restrict c,           \
                                      Py_ssize_t ldc, Py_ssize_t nr, int accumulate)        \
    {                                                                                       \
        const int rows = ROWS;                                                              \
        const __mmask16 mask = (__mmask16)((1u << nr) - 1u);                               \
        __m512 z0 = _mm512_setzero_ps(), z1 = z0, z2 = z0, z3 = z0, z4 = z0, z5 = z0;       \
        __m512 z6 = z0, z7 = z0;                                                            \
        for (int r = 0; accumulate && r < rows; r++) /* c's tile, in cache by the end */    \
            _mm_prefetch((const char *)(c + r * ldc), _MM_HINT_T0);                         \
        for (Py_ssize_t k = 0; k < K; k++) {                                                \
            __m512 b = _mm512_loadu_ps(p + k * PANEL);                                      \
            Z_ROW_FMA(0) Z_ROW_FMA(1) Z_ROW_FMA(2) Z_ROW_FMA(3)                             \
            Z_ROW_FMA(4) Z_ROW_FMA(5) Z_ROW_FMA(6) Z_ROW_FMA(7)                             \
        }                                                                                   \
        Z_ROW_STORE(0) Z_ROW_STORE(1) Z_ROW_STORE(2) Z_ROW_STORE(3)                         \
        Z_ROW_STORE(4) Z_ROW_STORE(5) Z_ROW_STORE(6) Z_ROW_STORE(7)                         \
    }
/* one kernel per tile height, 1..8 rows (the AVX-512 GEMMs' MR) */
#define FOR_ROWS_1_TO_8(M) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8)
FOR_ROWS_1_TO_8(DEFINE_MICRO_Z)

/* The same for two adjacent panels at once, 1..8 rows of 2 x 16 floats: 16 accumulators, so
 * that two FMA ports of 4 cycles' latency always have independent work (8 chains alone
 * leave no slack), and each broadcast of a[r, k] serves 32 columns.  The first panel is
 * whole; the second has nr columns.
 *
 * A long K goes in chunks (gemm_avx512_float), so that the two panels' part for a chunk
 * stays in the L1 cache while every row tile of the block passes it.  Between chunks a
 * tile's running sums wait in `tmp` (first: they start at zero; last: they go to c).  So
 * every element still sums its K products in order in one chain of FMAs, then adds c with
 * `accumulate`: the results are micro_z_*'s bit for bit. */
#define Z2_PREFETCH 16 /* rows of the panels ahead, asked for early: 3-7% on this Xeon */
#define Z2_ROW_FMA(r)                                                                       \
    if (rows > r) {                                                                         \
        __m512 ar = _mm512_set1_ps(a[r * lda + k]);                                         \
        z##r = _mm512_fmadd_ps(ar, b0, z##r);                                               \
        w##r = _mm512_fmadd_ps(ar, b1, w##r);                                               \
    }
#define Z2_ROW_LOAD(r)                                                                      \
    if (rows > r) {                                                                         \
        z##r = _mm512_loadu_ps(tmp + r * 2 * PANEL);                                        \
        w##r = _mm512_loadu_ps(tmp + r * 2 * PANEL + PANEL);                                \
    }
#define Z2_ROW_STORE(r)                                                                     \
    if (rows > r) {                                                                         \
        if (!last) {                                                                        \
            _mm512_storeu_ps(tmp + r * 2 * PANEL, z##r);                                    \
            _mm512_storeu_ps(tmp + r * 2 * PANEL + PANEL, w##r);                            \
        } else {                                                                            \
            float *cr = c + r * ldc;                                                        \
            if (accumulate) {                                                               \
                z##r = _mm512_add_ps(_mm512_loadu_ps(cr), z##r);                            \
                w##r = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, cr + PANEL), w##r);        \
            }                                                                               \
            _mm512_storeu_ps(cr, z##r);                                                     \
            _mm512_mask_storeu_ps(cr + PANEL, mask, w##r);                                  \
        }                                                                                   \
    }
#define DEFINE_MICRO_Z2(ROWS)                                                               \
    AVX512 static void micro_z2_##ROWS(Py_ssize_t Kc, const float *restrict a,              \
                                       Py_ssize_t lda, const float *restrict p,             \
                                       const float *restrict q, float *restrict c,          \
                                       Py_ssize_t ldc, Py_ssize_t nr, int accumulate,       \
                                       float *restrict tmp, int first, int last)            \
    {                                                                                       \
        const int rows = ROWS;                                                              \
        const __mmask16 mask = (__mmask16)((1u << nr) - 1u);                               \
        __m512 z0 = _mm512_setzero_ps(), z1 = z0, z2 = z0, z3 = z0, z4 = z0, z5 = z0;       \
        __m512 z6 = z0, z7 = z0, w0 = z0, w1 = z0, w2 = z0, w3 = z0, w4 = z0, w5 = z0;      \
        __m512 w6 = z0, w7 = z0;                                                            \
        if (!first) {                                                                       \
            Z2_ROW_LOAD(0) Z2_ROW_LOAD(1) Z2_ROW_LOAD(2) Z2_ROW_LOAD(3)                     \
            Z2_ROW_LOAD(4) Z2_ROW_LOAD(5) Z2_ROW_LOAD(6) Z2_ROW_LOAD(7)                     \
        }                                                                                   \
        for (int r = 0; last && accumulate && r < rows; r++) /* c's tile, in cache soon */  \
            _mm_prefetch((const char *)(c + r * ldc), _MM_HINT_T0);                         \
        for (Py_ssize_t k = 0; k < Kc; k++) {                                               \
            _mm_prefetch((const char *)(p + (k + Z2_PREFETCH) * PANEL), _MM_HINT_T0);       \
            _mm_prefetch((const char *)(q + (k + Z2_PREFETCH) * PANEL), _MM_HINT_T0);       \
            __m512 b0 = _mm512_loadu_ps(p + k * PANEL);                                     \
            __m512 b1 = _mm512_loadu_ps(q + k * PANEL);                                     \
            Z2_ROW_FMA(0) Z2_ROW_FMA(1) Z2_ROW_FMA(2) Z2_ROW_FMA(3)                         \
            Z2_ROW_FMA(4) Z2_ROW_FMA(5) Z2_ROW_FMA(6) Z2_ROW_FMA(7)                         \
        }                                                                                   \
        Z2_ROW_STORE(0) Z2_ROW_STORE(1) Z2_ROW_STORE(2) Z2_ROW_STORE(3)                     \
        Z2_ROW_STORE(4) Z2_ROW_STORE(5) Z2_ROW_STORE(6) Z2_ROW_STORE(7)                     \
    }
FOR_ROWS_1_TO_8(DEFINE_MICRO_Z2)
typedef void (*micro_z2_fn)(Py_ssize_t, const float *, Py_ssize_t, const float *,
                            const float *, float *, Py_ssize_t, Py_ssize_t, int, float *, int,
                            int);
static const micro_z2_fn MICRO_Z2[9] = {NULL,       micro_z2_1, micro_z2_2, micro_z2_3,
                                        micro_z2_4, micro_z2_5, micro_z2_6, micro_z2_7,
                                        micro_z2_8};

typedef void (*micro_f32_fn)(Py_ssize_t, const float *, const float *, float *, Py_ssize_t,
                             Py_ssize_t, int);
typedef void (*micro_f64_fn)(Py_ssize_t, const double *, const double *, double *,
                             Py_ssize_t, Py_ssize_t, int);
static const micro_f32_fn MICRO_F32[7] = {NULL,       micro_f32_1, micro_f32_2, micro_f32_3,
                                          micro_f32_4, micro_f32_5, micro_f32_6};
static const micro_f64_fn MICRO_F64[4] = {NULL, micro_f64_1, micro_f64_2, micro_f64_3};
static const micro_f32_fn MICRO_Z[9] = {NULL,      micro_z_1, micro_z_2, micro_z_3, micro_z_4,
                                        micro_z_5, micro_z_6, micro_z_7, micro_z_8};

/* The tile loops: MR rows at a time, the last tile of a panel possibly shorter.  A large M
 * (a whole window's rows) goes in blocks of rows that stay in the core's L2 cache while every
 * panel passes them; W then streams once per block.  A step's few rows are one block. */
#define BLOCK_BYTES (256 * 1024)
#define DEFINE_GEMM_TILES(name, real, MR, MICRO)                                            \
    static void gemm_##name(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const real *a,        \
                            const real *packed, real *c, int accumulate)                    \
    {                                                                                       \
        Py_ssize_t block = BLOCK_BYTES / ((K > 0 ? K : 1) * (Py_ssize_t)sizeof(real));      \
        block = block < MR ? MR : block - block % MR;                                       \
        for (Py_ssize_t i0 = 0; i0 < M; i0 += block) {                                      \
            Py_ssize_t i1 = M - i0 < block ? M : i0 + block;                                \
            for (Py_ssize_t j0 = 0; j0 < N; j0 += PANEL) {                                  \
                const real *p = packed + (j0 / PANEL) * K * PANEL;                          \
                Py_ssize_t nr = N - j0 < PANEL ? N - j0 : PANEL;                            \
                for (Py_ssize_t i = i0; i < i1; i += MR) {                                  \
                    Py_ssize_t mr = i1 - i < MR ? i1 - i : MR;                              \
                    MICRO[mr](K, a + i * K, p, c + i * N + j0, N, nr, accumulate);          \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
    }

/* AVX-512: two panels (32 columns) per tile while two remain, then one.  A K over KC_MAX
 * goes in chunks of KC (see micro_z2_*): for lstm-512's K = 512, a panel pair is 64 KB, more
 * than an L1 cache, and re-reading it from L2 for every row tile costs a fifth of the speed. */
#define KC 256
#define KC_MAX 384
#define Z2_TILE_ROWS (BLOCK_BYTES / ((KC_MAX + 1) * 4) + 8) /* a block's rows, K > KC_MAX */
AVX512 static void gemm_avx512_float(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const float *a,
                                     const float *packed, float *c, int accumulate)
{
    const Py_ssize_t MR = 8;
    const Py_ssize_t kc = K > KC_MAX ? KC : (K > 0 ? K : 1);
    float tmp[Z2_TILE_ROWS * 2 * PANEL]; /* the running sums of a block's rows, 32 columns */
    Py_ssize_t block = BLOCK_BYTES / ((K > 0 ? K : 1) * (Py_ssize_t)sizeof(float));
    block = block < MR ? MR : block - block % MR;
    for (Py_ssize_t i0 = 0; i0 < M; i0 += block) {
        Py_ssize_t i1 = M - i0 < block ? M : i0 + block;
        for (Py_ssize_t j0 = 0; j0 < N;) {
            const float *p = packed + (j0 / PANEL) * K * PANEL;
            if (N - j0 <= PANEL) { /* the last panel alone */
                for (Py_ssize_t i = i0; i < i1; i += MR) {
                    Py_ssize_t mr = i1 - i < MR ? i1 - i : MR;
                    MICRO_Z[mr](K, a + i * K, p, c + i * N + j0, N, N - j0, accumulate);
                }
                break;
            }
            Py_ssize_t nr = N - j0 - PANEL < PANEL ? N - j0 - PANEL : PANEL;
            const float *q = p + K * PANEL;
            for (Py_ssize_t k0 = 0; k0 < K || k0 == 0; k0 += kc) {
                Py_ssize_t klen = K - k0 < kc ? K - k0 : kc;
                int first = k0 == 0, last = k0 + klen >= K;
                for (Py_ssize_t i = i0; i < i1; i += MR) {
                    Py_ssize_t mr = i1 - i < MR ? i1 - i : MR;
                    MICRO_Z2[mr](klen, a + i * K + k0, K, p + k0 * PANEL, q + k0 * PANEL,
                                 c + i * N + j0, N, nr, accumulate, tmp + (i - i0) * 2 * PANEL,
                                 first, last);
                }
            }
            j0 += 2 * PANEL;
        }
    }
}
DEFINE_GEMM_TILES(avx2_float, float, 6, MICRO_F32)
DEFINE_GEMM_TILES(avx2_double, double, 3, MICRO_F64)
#endif /* HAVE_AVX2_GEMM */

/* Which micro-kernels gemm_float and gemm_double use; the best the CPU has, set when the
 * module loads (set_gemm changes it, for tests).  float64 has no AVX-512 kernel: it takes
 * the AVX2 one (every AVX-512 CPU has AVX2 and FMA). */
enum { GEMM_C, GEMM_AVX2, GEMM_AVX512 };
static const char *const GEMM_NAMES[] = {"c", "avx2+fma", "avx512"};
static int gemm_kind = GEMM_C;

/* c (M, N) = a (M, K) @ W.T, or c += a @ W.T with `accumulate`; packed = pack_panels(W). */
static void gemm_float(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const float *a,
                       const float *packed, float *c, int accumulate)
{
#ifdef HAVE_AVX2_GEMM
    if (gemm_kind == GEMM_AVX512) {
        gemm_avx512_float(M, N, K, a, packed, c, accumulate);
        return;
    }
    if (gemm_kind == GEMM_AVX2) {
        gemm_avx2_float(M, N, K, a, packed, c, accumulate);
        return;
    }
#endif
    gemm_c_float(M, N, K, a, packed, c, accumulate);
}

static void gemm_double(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const double *a,
                        const double *packed, double *c, int accumulate)
{
#ifdef HAVE_AVX2_GEMM
    if (gemm_kind != GEMM_C) {
        gemm_avx2_double(M, N, K, a, packed, c, accumulate);
        return;
    }
#endif
    gemm_c_double(M, N, K, a, packed, c, accumulate);
}

/* The best GEMM this CPU runs, or -1 for `name` where it cannot (name NULL: the best). */
static int gemm_available(const char *name)
{
    int best = GEMM_C;
#ifdef HAVE_AVX2_GEMM
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        best = GEMM_AVX2;
        if (__builtin_cpu_supports("avx512f"))
            best = GEMM_AVX512;
    }
#endif
    if (name == NULL)
        return best;
    for (int kind = GEMM_C; kind <= best; kind++)
        if (strcmp(name, GEMM_NAMES[kind]) == 0)
            return kind;
    return -1;
}

/* ---- one step's elementwise work, one macro each, instantiated for float and double -----
 * Comments give the numpy lines of cells.py that each computes for one step t; the window
 * loops below call them after (forward) or before (backward) the step's GEMM. */

/* LSTM forward.  a: acts[t] (B, 4H), the gate pre-activations x_t W_in + h_{t-1} W_rec with
 * the sigmoid gates' inner 0.5 folded in; c_prev: cs[t]; outputs c: cs[t+1],
 * tanh_c: tanh_c[t], h: hs[t+1], all (B, H).
 *   a = tanh(a) * scale + shift   (scale, shift = 0.5, 0.5 on i, f, o; 1, 0 on g)
 *   c = f * c_prev + i * g;  tanh_c = tanh(c);  h = o * tanh_c                            */
#define DEFINE_LSTM_FWD_STEP(V, TARGET, real, TANH, GATE)                                   \
    TARGET static void lstm_fwd_step_##real##_##V(Py_ssize_t B, Py_ssize_t H,               \
                                                  real *restrict a,                         \
                                                  const real *restrict c_prev,              \
                                                  real *restrict c, real *restrict tanh_c,  \
                                                  real *restrict h)                         \
    {                                                                                       \
        for (Py_ssize_t b = 0; b < B; b++) {                                                \
            real *ab = a + b * 4 * H;                                                       \
            for (Py_ssize_t j = 0; j < 2 * H; j++) /* i, f */                               \
                ab[j] = GATE(ab[j]);                                                        \
            for (Py_ssize_t j = 2 * H; j < 3 * H; j++) /* g */                              \
                ab[j] = TANH(ab[j]);                                                        \
            for (Py_ssize_t j = 3 * H; j < 4 * H; j++) /* o */                              \
                ab[j] = GATE(ab[j]);                                                        \
            const real *i = ab, *f = ab + H, *g = ab + 2 * H, *o = ab + 3 * H;              \
            const real *cp = c_prev + b * H;                                                \
            real *cb = c + b * H, *tb = tanh_c + b * H, *hb = h + b * H;                    \
            for (Py_ssize_t j = 0; j < H; j++) {                                            \
                real cj = f[j] * cp[j] + i[j] * g[j];                                       \
                real tj = TANH(cj);                                                         \
                cb[j] = cj;                                                                 \
                tb[j] = tj;                                                                 \
                hb[j] = o[j] * tj;                                                          \
            }                                                                               \
        }                                                                                   \
    }

/* LSTM backward, before dh = dpre[t] @ W_hh, straight from the forward pass's values (so
 * no window-level factors are needed).  dh, dc (B, H) in/out; dh_in: dhs[t]; a: acts[t]
 * (B, 4H) = (i, f, g, o); c_prev: cs[t], tanh_c: tanh_c[t] (B, H); output d: dpre[t].
 *   dh += dh_in;  dc += dh * o * (1 - tanh_c^2);
 *   d = [dc * g * i(1-i), dc * c_prev * f(1-f), dc * i * (1-g^2), dh * tanh_c * o(1-o)];
 *   dc *= f                                                                               */
#define DEFINE_LSTM_BWD_STEP(V, TARGET, real)                                               \
    TARGET static void lstm_bwd_step_##real##_##V(Py_ssize_t B, Py_ssize_t H,               \
                                                  real *restrict dh, real *restrict dc,     \
                                                  const real *restrict dh_in,               \
                                                  const real *restrict a,                   \
                                                  const real *restrict c_prev,              \
                                                  const real *restrict tanh_c,              \
                                                  real *restrict d)                         \
    {                                                                                       \
        const real one = 1;                                                                 \
        for (Py_ssize_t b = 0; b < B; b++) {                                                \
            const real *ab = a + b * 4 * H;                                                 \
            real *db = d + b * 4 * H;                                                       \
            for (Py_ssize_t j = 0; j < H; j++) {                                            \
                Py_ssize_t k = b * H + j;                                                   \
                real i = ab[j], f = ab[H + j], g = ab[2 * H + j], o = ab[3 * H + j];        \
                real tc = tanh_c[k];                                                        \
                real dhj = dh[k] + dh_in[k];                                                \
                real dcj = dc[k] + dhj * (o * (one - tc * tc));                             \
                db[j] = dcj * (g * ((one - i) * i));                                        \
                db[H + j] = dcj * (c_prev[k] * ((one - f) * f));                            \
                db[2 * H + j] = dcj * (i * (one - g * g));                                  \
                db[3 * H + j] = dhj * (tc * ((one - o) * o));                               \
                dh[k] = dhj;                                                                \
                dc[k] = dcj * f;                                                            \
            }                                                                               \
        }                                                                                   \
    }

/* GRU forward, after rec = hs[t] @ W_rec.T.  a: acts[t] (B, 3H), r and z pre-scaled by
 * 0.5; rec (B, 3H); b_hn (H,); h_prev: hs[t]; outputs hn: hn[t], h: hs[t+1] (B, H).
 *   rz = tanh(rz + rec_rz) * 0.5 + 0.5;  hn = rec_n + b_hn;  n = tanh(n + r * hn);
 *   h = n + z * (h_prev - n)                                                              */
#define DEFINE_GRU_FWD_STEP(V, TARGET, real, TANH, GATE)                                    \
    TARGET static void gru_fwd_step_##real##_##V(Py_ssize_t B, Py_ssize_t H,                \
                                                 real *restrict a,                          \
                                                 const real *restrict rec,                  \
                                                 const real *restrict b_hn,                 \
                                                 const real *restrict h_prev,               \
                                                 real *restrict hn, real *restrict h)       \
    {                                                                                       \
        for (Py_ssize_t b = 0; b < B; b++) {                                                \
            real *ab = a + b * 3 * H;                                                       \
            const real *rb = rec + b * 3 * H;                                               \
            for (Py_ssize_t j = 0; j < 2 * H; j++) /* r, z */                               \
                ab[j] = GATE(ab[j] + rb[j]);                                                \
            const real *r = ab, *z = ab + H, *rn = rb + 2 * H, *hp = h_prev + b * H;        \
            real *n = ab + 2 * H, *hnb = hn + b * H, *hb = h + b * H;                       \
            for (Py_ssize_t j = 0; j < H; j++) {                                            \
                real hnj = rn[j] + b_hn[j];                                                 \
                real nj = TANH(n[j] + r[j] * hnj);                                          \
                hnb[j] = hnj;                                                               \
                n[j] = nj;                                                                  \
                hb[j] = nj + (hp[j] - nj) * z[j];                                           \
            }                                                                               \
        }                                                                                   \
    }

/* GRU backward, before dh += drec[t] @ W_hh.  dh (B, H) in/out; dh_in: dhs[t]; acts:
 * acts[t] (B, 3H) holding r, z and f_n; f_z: f_z[t], f_r: f_r[t] (B, H); outputs dn:
 * dn_pre[t] (B, H), q: drec[t] (B, 3H).
 *   dh += dh_in;  dn = dh * f_n;  q = [dn * f_r, dh * f_z, dn * r];  dh *= z              */
#define DEFINE_GRU_BWD_STEP(V, TARGET, real)                                                \
    TARGET static void gru_bwd_step_##real##_##V(Py_ssize_t B, Py_ssize_t H,                \
                                                 real *restrict dh,                         \
                                                 const real *restrict dh_in,                \
                                                 const real *restrict acts,                 \
                                                 const real *restrict f_z,                  \
                                                 const real *restrict f_r,                  \
                                                 real *restrict dn, real *restrict q)       \
    {                                                                                       \
        for (Py_ssize_t b = 0; b < B; b++) {                                                \
            const real *r = acts + b * 3 * H, *z = r + H, *f_n = r + 2 * H;                 \
            real *qb = q + b * 3 * H;                                                       \
            for (Py_ssize_t j = 0; j < H; j++) {                                            \
                Py_ssize_t k = b * H + j;                                                   \
                real dhj = dh[k] + dh_in[k];                                                \
                real dnj = dhj * f_n[j];                                                    \
                dn[k] = dnj;                                                                \
                qb[j] = dnj * f_r[k];                                                       \
                qb[H + j] = dhj * f_z[k];                                                   \
                qb[2 * H + j] = dnj * r[j];                                                 \
                dh[k] = dhj * z[j];                                                         \
            }                                                                               \
        }                                                                                   \
    }

/* Vanilla RNN forward: h = tanh(a), a: xproj[t] + hs[t] @ W_hh.T, all (B, H). */
#define DEFINE_RNN_FWD_STEP(V, TARGET, real, TANH)                                          \
    TARGET static void rnn_fwd_step_##real##_##V(Py_ssize_t n, const real *restrict a,      \
                                                 real *restrict h)                          \
    {                                                                                       \
        for (Py_ssize_t k = 0; k < n; k++)                                                  \
            h[k] = TANH(a[k]);                                                              \
    }

/* Vanilla RNN backward, before dh = dpre[t] @ W_hh: dh += dh_in; dpre *= dh, all (B, H). */
#define DEFINE_RNN_BWD_STEP(V, TARGET, real)                                                \
    TARGET static void rnn_bwd_step_##real##_##V(Py_ssize_t n, real *restrict dh,           \
                                                 const real *restrict dh_in,                \
                                                 real *restrict dpre)                       \
    {                                                                                       \
        for (Py_ssize_t k = 0; k < n; k++) {                                                \
            real dhk = dh[k] + dh_in[k];                                                    \
            dh[k] = dhk;                                                                    \
            dpre[k] = dpre[k] * dhk;                                                        \
        }                                                                                   \
    }

/* The kernels above, each for float and double, in one table per variant. */
#define STEP_KERNEL_FIELDS(real)                                                            \
    void (*lstm_fwd_step_##real)(Py_ssize_t, Py_ssize_t, real *, const real *, real *,      \
                                 real *, real *);                                           \
    void (*lstm_bwd_step_##real)(Py_ssize_t, Py_ssize_t, real *, real *, const real *,      \
                                 const real *, const real *, const real *, real *);         \
    void (*gru_fwd_step_##real)(Py_ssize_t, Py_ssize_t, real *, const real *, const real *, \
                                const real *, real *, real *);                              \
    void (*gru_bwd_step_##real)(Py_ssize_t, Py_ssize_t, real *, const real *, const real *, \
                                const real *, const real *, real *, real *);                \
    void (*rnn_fwd_step_##real)(Py_ssize_t, const real *, real *);                          \
    void (*rnn_bwd_step_##real)(Py_ssize_t, real *, const real *, real *);
typedef struct {
    const char *name;
    STEP_KERNEL_FIELDS(float)
    STEP_KERNEL_FIELDS(double)
} StepKernels;

#define STEP_KERNEL_TABLE(V, real)                                                          \
    .lstm_fwd_step_##real = lstm_fwd_step_##real##_##V,                                     \
    .lstm_bwd_step_##real = lstm_bwd_step_##real##_##V,                                     \
    .gru_fwd_step_##real = gru_fwd_step_##real##_##V,                                       \
    .gru_bwd_step_##real = gru_bwd_step_##real##_##V,                                       \
    .rnn_fwd_step_##real = rnn_fwd_step_##real##_##V,                                       \
    .rnn_bwd_step_##real = rnn_bwd_step_##real##_##V

/* Variant V of every elementwise kernel, compiled with the attribute TARGET, and its table
 * step_kernels_V. */
#define DEFINE_VARIANT(V, TARGET)                                                           \
    DEFINE_LSTM_FWD_STEP(V, TARGET, float, tanh_f32, gate_f32)                              \
    DEFINE_LSTM_FWD_STEP(V, TARGET, double, tanh_f64, gate_f64)                             \
    DEFINE_LSTM_BWD_STEP(V, TARGET, float)                                                  \
    DEFINE_LSTM_BWD_STEP(V, TARGET, double)                                                 \
    DEFINE_GRU_FWD_STEP(V, TARGET, float, tanh_f32, gate_f32)                               \
    DEFINE_GRU_FWD_STEP(V, TARGET, double, tanh_f64, gate_f64)                              \
    DEFINE_GRU_BWD_STEP(V, TARGET, float)                                                   \
    DEFINE_GRU_BWD_STEP(V, TARGET, double)                                                  \
    DEFINE_RNN_FWD_STEP(V, TARGET, float, tanh_f32)                                         \
    DEFINE_RNN_FWD_STEP(V, TARGET, double, tanh_f64)                                        \
    DEFINE_RNN_BWD_STEP(V, TARGET, float)                                                   \
    DEFINE_RNN_BWD_STEP(V, TARGET, double)                                                  \
    static const StepKernels step_kernels_##V = {                                           \
        .name = #V, STEP_KERNEL_TABLE(V, float), STEP_KERNEL_TABLE(V, double)};

DEFINE_VARIANT(baseline, )
#ifdef KERNEL_VARIANTS
DEFINE_VARIANT(avx2, __attribute__((target("avx2"))))
DEFINE_VARIANT(avx512, __attribute__((target("avx512f"))))
#endif

/* The variants compiled here, best first; and the one the kernels below call, the best the
 * CPU runs, set when the module loads (set_kernels changes it, for tests). */
static const StepKernels *const VARIANTS[] = {
#ifdef KERNEL_VARIANTS
    &step_kernels_avx512,
    &step_kernels_avx2,
#endif
    &step_kernels_baseline,
};
#define NUM_VARIANTS ((int)(sizeof(VARIANTS) / sizeof(VARIANTS[0])))
static const StepKernels *step_kernels = &step_kernels_baseline;

/* Whether this CPU runs the variant. */
static int variant_runs(const StepKernels *v)
{
#ifdef KERNEL_VARIANTS
    __builtin_cpu_init();
    if (v == &step_kernels_avx512)
        return __builtin_cpu_supports("avx512f");
    if (v == &step_kernels_avx2)
        return __builtin_cpu_supports("avx2");
#endif
    return v == &step_kernels_baseline;
}

/* ---- whole windows: the loops of cells.py ------------------------------------------------
 * Shapes: T steps, B batch, H hidden, G = gates * H; hs, cs (T+1, B, H) with the initial
 * state in [0]; packed = pack_panels(W_rec) (forward: W_rec (G, H), K = H) or
 * pack_panels(W_hh.T) (backward: W_hh.T (H, G), K = G). */

/* lstm_forward: for t: acts[t] += hs[t] @ W_rec.T; then the step. */
#define DEFINE_LSTM_FORWARD(real)                                                           \
    static void lstm_forward_##real(Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, real *acts,   \
                                    const real *packed, real *hs, real *cs, real *tanh_c)   \
    {                                                                                       \
        Py_ssize_t BH = B * H, BG = 4 * BH;                                                 \
        const StepKernels *kernels = step_kernels;                                          \
        for (Py_ssize_t t = 0; t < T; t++) {                                                \
            gemm_##real(B, 4 * H, H, hs + t * BH, packed, acts + t * BG, 1);                \
            kernels->lstm_fwd_step_##real(B, H, acts + t * BG, cs + t * BH,                 \
                                          cs + (t + 1) * BH, tanh_c + t * BH,               \
                                          hs + (t + 1) * BH);                               \
        }                                                                                   \
    }

/* lstm_backward: for t from T-1 down: the step, then dh = dpre[t] @ W_hh. */
#define DEFINE_LSTM_BACKWARD(real)                                                          \
    static void lstm_backward_##real(Py_ssize_t T, Py_ssize_t B, Py_ssize_t H,              \
                                     const real *dhs, const real *acts, const real *cs,     \
                                     const real *tanh_c, const real *packed, real *dh,      \
                                     real *dc, real *dpre)                                  \
    {                                                                                       \
        Py_ssize_t BH = B * H, BG = 4 * BH;                                                 \
        const StepKernels *kernels = step_kernels;                                          \
        for (Py_ssize_t t = T - 1; t >= 0; t--) {                                           \
            kernels->lstm_bwd_step_##real(B, H, dh, dc, dhs + t * BH, acts + t * BG,        \
                                          cs + t * BH, tanh_c + t * BH, dpre + t * BG);     \
            gemm_##real(B, H, 4 * H, dpre + t * BG, packed, dh, 0);                         \
        }                                                                                   \
    }

/* gru_forward: for t: rec = hs[t] @ W_rec.T; then the step. */
#define DEFINE_GRU_FORWARD(real)                                                            \
    static void gru_forward_##real(Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, real *acts,    \
                                   const real *packed, const real *b_hn, real *hs,          \
                                   real *hn, real *rec)                                     \
    {                                                                                       \
        Py_ssize_t BH = B * H, BG = 3 * BH;                                                 \
        const StepKernels *kernels = step_kernels;                                          \
        for (Py_ssize_t t = 0; t < T; t++) {                                                \
            gemm_##real(B, 3 * H, H, hs + t * BH, packed, rec, 0);                          \
            kernels->gru_fwd_step_##real(B, H, acts + t * BG, rec, b_hn, hs + t * BH,       \
                                         hn + t * BH, hs + (t + 1) * BH);                   \
        }                                                                                   \
    }

/* gru_backward: for t from T-1 down: the step, then dh += drec[t] @ W_hh. */
#define DEFINE_GRU_BACKWARD(real)                                                           \
    static void gru_backward_##real(Py_ssize_t T, Py_ssize_t B, Py_ssize_t H,               \
                                    const real *dhs, const real *acts, const real *f_z,     \
                                    const real *f_r, const real *packed, real *dh,          \
                                    real *dn, real *drec)                                   \
    {                                                                                       \
        Py_ssize_t BH = B * H, BG = 3 * BH;                                                 \
        const StepKernels *kernels = step_kernels;                                          \
        for (Py_ssize_t t = T - 1; t >= 0; t--) {                                           \
            kernels->gru_bwd_step_##real(B, H, dh, dhs + t * BH, acts + t * BG,             \
                                         f_z + t * BH, f_r + t * BH, dn + t * BH,           \
                                         drec + t * BG);                                    \
            gemm_##real(B, H, 3 * H, drec + t * BG, packed, dh, 1);                         \
        }                                                                                   \
    }

/* rnn_forward: for t: xproj[t] += hs[t] @ W_hh.T; hs[t+1] = tanh(xproj[t]). */
#define DEFINE_RNN_FORWARD(real)                                                            \
    static void rnn_forward_##real(Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, real *xproj,   \
                                   const real *packed, real *hs)                            \
    {                                                                                       \
        Py_ssize_t BH = B * H;                                                              \
        const StepKernels *kernels = step_kernels;                                          \
        for (Py_ssize_t t = 0; t < T; t++) {                                                \
            gemm_##real(B, H, H, hs + t * BH, packed, xproj + t * BH, 1);                   \
            kernels->rnn_fwd_step_##real(BH, xproj + t * BH, hs + (t + 1) * BH);            \
        }                                                                                   \
    }

/* rnn_backward: dpre holds tanh' = 1 - h^2; for t from T-1 down: the step, then
 * dh = dpre[t] @ W_hh. */
#define DEFINE_RNN_BACKWARD(real)                                                           \
    static void rnn_backward_##real(Py_ssize_t T, Py_ssize_t B, Py_ssize_t H,               \
                                    const real *dhs, const real *packed, real *dh,          \
                                    real *dpre)                                             \
    {                                                                                       \
        Py_ssize_t BH = B * H;                                                              \
        const StepKernels *kernels = step_kernels;                                          \
        for (Py_ssize_t t = T - 1; t >= 0; t--) {                                           \
            kernels->rnn_bwd_step_##real(BH, dh, dhs + t * BH, dpre + t * BH);              \
            gemm_##real(B, H, H, dpre + t * BH, packed, dh, 0);                             \
        }                                                                                   \
    }

DEFINE_LSTM_FORWARD(float)
DEFINE_LSTM_FORWARD(double)
DEFINE_LSTM_BACKWARD(float)
DEFINE_LSTM_BACKWARD(double)
DEFINE_GRU_FORWARD(float)
DEFINE_GRU_FORWARD(double)
DEFINE_GRU_BACKWARD(float)
DEFINE_GRU_BACKWARD(double)
DEFINE_RNN_FORWARD(float)
DEFINE_RNN_FORWARD(double)
DEFINE_RNN_BACKWARD(float)
DEFINE_RNN_BACKWARD(double)

/* ---- arguments ---------------------------------------------------------------------------
 *
 * Each kernel lists its arrays with their dimensions as letters: T steps, S = T + 1 steps,
 * B batch, H hidden, G = gates * H, g = panels(G), h = panels(H), P = PANEL; and for the
 * GEMM N columns, n = panels(N).  The first array to use a letter fixes its size; every
 * later use must agree. */

#define MAX_ARGS 8

typedef struct {
    const char *name;
    int writable;
    const char *dims;
} ArgSpec;

typedef struct {
    Py_buffer view[MAX_ARGS];
    int held;
    int is_double;
    Py_ssize_t T, B, H, N;
} Arrays;

static void release_arrays(Arrays *x)
{
    while (x->held > 0)
        PyBuffer_Release(&x->view[--x->held]);
}

/* 'f' or 'd' for a native float32 or float64 buffer format, else 0. */
static char float_code(const char *format)
{
    if (format == NULL)
        return 0;
    if (format[0] == '@' || format[0] == '=')
        format++;
    if ((format[0] == 'f' || format[0] == 'd') && format[1] == '\0')
        return format[0];
    return 0;
}

/* Whether size n fits dimension letter d, fixing T, B or H on first use. */
static int dim_fits(char d, Py_ssize_t n, int gates, Arrays *x)
{
    Py_ssize_t *known, value;
    switch (d) {
    case 'T': known = &x->T; value = n; break;
    case 'S': known = &x->T; value = n - 1; break;
    case 'B': known = &x->B; value = n; break;
    case 'H': known = &x->H; value = n; break;
    case 'G':
        if (n % gates != 0)
            return 0;
        known = &x->H;
        value = n / gates;
        break;
    case 'N': known = &x->N; value = n; break;
    case 'n': return x->N >= 0 && n == panels(x->N);
    case 'g': return x->H >= 0 && n == panels(gates * x->H);
    case 'h': return x->H >= 0 && n == panels(x->H);
    case 'P': return n == PANEL;
    default: return 0;
    }
    if (value < 0)
        return 0;
    if (*known < 0)
        *known = value;
    return *known == value;
}

static int overlap(const Py_buffer *a, const Py_buffer *b)
{
    const char *a0 = a->buf, *b0 = b->buf;
    return a->len > 0 && b->len > 0 && a0 < b0 + b->len && b0 < a0 + a->len;
}

/* Gets the buffers of `args` as `spec` describes.  Returns 0, or -1 with ValueError (or
 * TypeError for a wrong count) set. */
static int get_arrays(PyObject *args, const char *fname, const ArgSpec *spec, int n,
                      int gates, Arrays *x)
{
    x->held = 0;
    x->T = x->B = x->H = x->N = -1;
    if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) != n) {
        PyErr_Format(PyExc_TypeError, "%s() takes %d arrays", fname, n);
        return -1;
    }
    char code = 0;
    for (int k = 0; k < n; k++) {
        const ArgSpec *s = &spec[k];
        Py_buffer *v = &x->view[k];
        int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (s->writable ? PyBUF_WRITABLE : 0);
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(args, k), v, flags) < 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s(): %s must be a %sC-contiguous float32 or "
                         "float64 array", fname, s->name, s->writable ? "writable " : "");
            goto fail;
        }
        x->held++;
        char c = float_code(v->format);
        if (c == 0 || v->itemsize != (c == 'f' ? 4 : 8) || (code != 0 && c != code)) {
            PyErr_Format(PyExc_ValueError, "%s(): %s must be float32 or float64, like the "
                         "other arrays", fname, s->name);
            goto fail;
        }
        code = c;
        int ok = v->ndim == (int)strlen(s->dims);
        for (int d = 0; ok && d < v->ndim; d++)
            ok = dim_fits(s->dims[d], v->shape[d], gates, x);
        if (!ok) {
            PyErr_Format(PyExc_ValueError, "%s(): %s has the wrong shape (its dimensions "
                         "are %s; T=%zd, B=%zd, H=%zd so far)", fname, s->name, s->dims,
                         x->T, x->B, x->H);
            goto fail;
        }
        for (int j = 0; j < k; j++) {
            if ((s->writable || spec[j].writable) && overlap(v, &x->view[j])) {
                PyErr_Format(PyExc_ValueError, "%s(): %s overlaps %s", fname, s->name,
                             spec[j].name);
                goto fail;
            }
        }
    }
    x->is_double = code == 'd';
    return 0;
fail:
    release_arrays(x);
    return -1;
}

/* ---- module ------------------------------------------------------------------------------ */

/* The kernel's k-th array as a pointer to R. */
#define ARG(R, k) ((R *)x.view[k].buf)

#define WRAPPER(NAME, GATES, CALL_ARGS, ...)                                                \
    static const ArgSpec NAME##_spec[] = {__VA_ARGS__};                                     \
    static PyObject *py_##NAME(PyObject *self, PyObject *args)                              \
    {                                                                                       \
        (void)self;                                                                         \
        Arrays x;                                                                           \
        int n = (int)(sizeof(NAME##_spec) / sizeof(ArgSpec));                               \
        if (get_arrays(args, #NAME, NAME##_spec, n, GATES, &x) < 0)                         \
            return NULL;                                                                    \
        Py_BEGIN_ALLOW_THREADS                                                              \
        if (x.is_double)                                                                    \
            NAME##_double CALL_ARGS(double);                                                \
        else                                                                                \
            NAME##_float CALL_ARGS(float);                                                  \
        Py_END_ALLOW_THREADS                                                                \
        release_arrays(&x);                                                                 \
        Py_RETURN_NONE;                                                                     \
    }

#define ARGS3(R) (x.T, x.B, x.H, ARG(R, 0), ARG(R, 1), ARG(R, 2))
#define ARGS4(R) (x.T, x.B, x.H, ARG(R, 0), ARG(R, 1), ARG(R, 2), ARG(R, 3))
#define ARGS5(R) (x.T, x.B, x.H, ARG(R, 0), ARG(R, 1), ARG(R, 2), ARG(R, 3), ARG(R, 4))
#define ARGS6(R) \
    (x.T, x.B, x.H, ARG(R, 0), ARG(R, 1), ARG(R, 2), ARG(R, 3), ARG(R, 4), ARG(R, 5))
#define ARGS8(R)                                                                            \
    (x.T, x.B, x.H, ARG(R, 0), ARG(R, 1), ARG(R, 2), ARG(R, 3), ARG(R, 4), ARG(R, 5),        \
     ARG(R, 6), ARG(R, 7))

WRAPPER(lstm_forward, 4, ARGS5,
        {"acts", 1, "TBG"}, {"packed", 0, "gHP"}, {"hs", 1, "SBH"}, {"cs", 1, "SBH"},
        {"tanh_c", 1, "TBH"})
WRAPPER(lstm_backward, 4, ARGS8,
        {"dhs", 0, "TBH"}, {"acts", 0, "TBG"}, {"cs", 0, "SBH"}, {"tanh_c", 0, "TBH"},
        {"packed", 0, "hGP"}, {"dh", 1, "BH"}, {"dc", 1, "BH"}, {"dpre", 1, "TBG"})
WRAPPER(gru_forward, 3, ARGS6,
        {"acts", 1, "TBG"}, {"packed", 0, "gHP"}, {"b_hn", 0, "H"}, {"hs", 1, "SBH"},
        {"hn", 1, "TBH"}, {"rec", 1, "BG"})
WRAPPER(gru_backward, 3, ARGS8,
        {"dhs", 0, "TBH"}, {"acts", 0, "TBG"}, {"f_z", 0, "TBH"}, {"f_r", 0, "TBH"},
        {"packed", 0, "hGP"}, {"dh", 1, "BH"}, {"dn", 1, "TBH"}, {"drec", 1, "TBG"})
WRAPPER(rnn_forward, 1, ARGS3, {"xproj", 1, "TBG"}, {"packed", 0, "gHP"}, {"hs", 1, "SBH"})
WRAPPER(rnn_backward, 1, ARGS4,
        {"dhs", 0, "TBH"}, {"packed", 0, "hGP"}, {"dh", 1, "BH"}, {"dpre", 1, "TBG"})

/* One step's elementwise work alone, for generation (charrnn.model.Stepper), where the
 * recurrent product of a single row is numpy's: lstm_step(a, c_prev, c, tanh_c, h) and
 * rnn_step(a, h) take the pre-activations with that product already added, gru_step(a, rec,
 * b_hn, h_prev, hn, h) takes it apart, as the window loops above do. */
#define lstm_step_float step_kernels->lstm_fwd_step_float
#define lstm_step_double step_kernels->lstm_fwd_step_double
#define gru_step_float step_kernels->gru_fwd_step_float
#define gru_step_double step_kernels->gru_fwd_step_double
#define DEFINE_RNN_STEP(real)                                                               \
    static void rnn_step_##real(Py_ssize_t B, Py_ssize_t H, const real *a, real *h)         \
    {                                                                                       \
        step_kernels->rnn_fwd_step_##real(B * H, a, h);                                     \
    }
DEFINE_RNN_STEP(float)
DEFINE_RNN_STEP(double)
#define STEP_ARGS2(R) (x.B, x.H, ARG(R, 0), ARG(R, 1))
#define STEP_ARGS5(R) (x.B, x.H, ARG(R, 0), ARG(R, 1), ARG(R, 2), ARG(R, 3), ARG(R, 4))
#define STEP_ARGS6(R) \
    (x.B, x.H, ARG(R, 0), ARG(R, 1), ARG(R, 2), ARG(R, 3), ARG(R, 4), ARG(R, 5))
WRAPPER(lstm_step, 4, STEP_ARGS5,
        {"a", 1, "BG"}, {"c_prev", 0, "BH"}, {"c", 1, "BH"}, {"tanh_c", 1, "BH"}, {"h", 1, "BH"})
WRAPPER(gru_step, 3, STEP_ARGS6,
        {"a", 1, "BG"}, {"rec", 0, "BG"}, {"b_hn", 0, "H"}, {"h_prev", 0, "BH"},
        {"hn", 1, "BH"}, {"h", 1, "BH"})
WRAPPER(rnn_step, 1, STEP_ARGS2, {"a", 0, "BG"}, {"h", 1, "BH"})

/* gemm(a (M, K), packed (panels(N), K, PANEL), c (M, N), accumulate): the arrays checked in
 * the order a, c, packed, so that N is known when packed's shape is; M as B, K as H. */
static const ArgSpec gemm_spec[] = {{"a", 0, "BH"}, {"c", 1, "BN"}, {"packed", 0, "nHP"}};

static PyObject *py_gemm(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *a, *packed, *c;
    int accumulate;
    if (!PyArg_ParseTuple(args, "OOOp:gemm", &a, &packed, &c, &accumulate))
        return NULL;
    PyObject *arrays = PyTuple_Pack(3, a, c, packed);
    if (arrays == NULL)
        return NULL;
    Arrays x;
    int failed = get_arrays(arrays, "gemm", gemm_spec, 3, 1, &x);
    Py_DECREF(arrays);
    if (failed)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (x.is_double)
        gemm_double(x.B, x.N, x.H, ARG(double, 0), ARG(double, 2), ARG(double, 1), accumulate);
    else
        gemm_float(x.B, x.N, x.H, ARG(float, 0), ARG(float, 2), ARG(float, 1), accumulate);
    Py_END_ALLOW_THREADS
    release_arrays(&x);
    Py_RETURN_NONE;
}

/* set_gemm(name): "avx512", "avx2+fma" or "c" (the portable loop); for tests. */
static PyObject *py_set_gemm(PyObject *self, PyObject *args)
{
    (void)self;
    const char *name;
    if (!PyArg_ParseTuple(args, "s:set_gemm", &name))
        return NULL;
    int kind = gemm_available(name);
    if (kind < 0) {
        PyErr_Format(PyExc_ValueError, "set_gemm(): %s is not available here", name);
        return NULL;
    }
    gemm_kind = kind;
    Py_RETURN_NONE;
}

/* gemm_name(): the GEMM in use. */
static PyObject *py_gemm_name(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyUnicode_FromString(GEMM_NAMES[gemm_kind]);
}

/* gemm_variants(): the GEMMs this CPU runs, best first. */
static PyObject *py_gemm_variants(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    int best = gemm_available(NULL);
    PyObject *names = PyTuple_New(best + 1);
    for (int kind = best; names != NULL && kind >= GEMM_C; kind--) {
        PyObject *name = PyUnicode_FromString(GEMM_NAMES[kind]);
        if (name == NULL) {
            Py_CLEAR(names);
            break;
        }
        PyTuple_SET_ITEM(names, best - kind, name);
    }
    return names;
}

/* set_kernels(name): the "avx512", "avx2" or "baseline" variant of the elementwise kernels;
 * for tests. */
static PyObject *py_set_kernels(PyObject *self, PyObject *args)
{
    (void)self;
    const char *name;
    if (!PyArg_ParseTuple(args, "s:set_kernels", &name))
        return NULL;
    for (int k = 0; k < NUM_VARIANTS; k++) {
        if (strcmp(name, VARIANTS[k]->name) == 0 && variant_runs(VARIANTS[k])) {
            step_kernels = VARIANTS[k];
            Py_RETURN_NONE;
        }
    }
    PyErr_Format(PyExc_ValueError, "set_kernels(): %s is not available here", name);
    return NULL;
}

/* kernels_name(): the variant of the elementwise kernels in use. */
static PyObject *py_kernels_name(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyUnicode_FromString(step_kernels->name);
}

/* kernel_variants(): the variants of the elementwise kernels compiled here that this CPU
 * runs, best first. */
static PyObject *py_kernel_variants(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    PyObject *names = PyList_New(0);
    for (int k = 0; names != NULL && k < NUM_VARIANTS; k++) {
        if (!variant_runs(VARIANTS[k]))
            continue;
        PyObject *name = PyUnicode_FromString(VARIANTS[k]->name);
        if (name == NULL || PyList_Append(names, name) < 0)
            Py_CLEAR(names);
        Py_XDECREF(name);
    }
    if (names == NULL)
        return NULL;
    PyObject *tuple = PyList_AsTuple(names);
    Py_DECREF(names);
    return tuple;
}

static PyMethodDef methods[] = {
    {"lstm_forward", py_lstm_forward, METH_VARARGS,
     "lstm_forward(acts, packed, hs, cs, tanh_c): the LSTM forward loop of a window."},
    {"lstm_backward", py_lstm_backward, METH_VARARGS,
     "lstm_backward(dhs, acts, cs, tanh_c, packed, dh, dc, dpre): the LSTM backward loop."},
    {"gru_forward", py_gru_forward, METH_VARARGS,
     "gru_forward(acts, packed, b_hn, hs, hn, rec): the GRU forward loop of a window."},
    {"gru_backward", py_gru_backward, METH_VARARGS,
     "gru_backward(dhs, acts, f_z, f_r, packed, dh, dn, drec): the GRU backward loop."},
    {"rnn_forward", py_rnn_forward, METH_VARARGS,
     "rnn_forward(xproj, packed, hs): the tanh RNN forward loop of a window."},
    {"rnn_backward", py_rnn_backward, METH_VARARGS,
     "rnn_backward(dhs, packed, dh, dpre): the tanh RNN backward loop of a window."},
    {"lstm_step", py_lstm_step, METH_VARARGS,
     "lstm_step(a, c_prev, c, tanh_c, h): one LSTM step's elementwise work."},
    {"gru_step", py_gru_step, METH_VARARGS,
     "gru_step(a, rec, b_hn, h_prev, hn, h): one GRU step's elementwise work."},
    {"rnn_step", py_rnn_step, METH_VARARGS, "rnn_step(a, h): h = tanh(a)."},
    {"gemm", py_gemm, METH_VARARGS,
     "gemm(a, packed, c, accumulate): c = a @ W.T, or c += a @ W.T, packed = pack_panels(W)."},
    {"set_gemm", py_set_gemm, METH_VARARGS,
     "set_gemm(name): the \"avx512\" or \"avx2+fma\" micro-kernels or the portable \"c\" "
     "loop."},
    {"gemm_name", py_gemm_name, METH_NOARGS, "gemm_name(): the GEMM in use."},
    {"gemm_variants", py_gemm_variants, METH_NOARGS,
     "gemm_variants(): the GEMMs this CPU runs, best first."},
    {"set_kernels", py_set_kernels, METH_VARARGS,
     "set_kernels(name): the \"avx512\", \"avx2\" or \"baseline\" variant of the "
     "elementwise kernels."},
    {"kernels_name", py_kernels_name, METH_NOARGS,
     "kernels_name(): the variant of the elementwise kernels in use."},
    {"kernel_variants", py_kernel_variants, METH_NOARGS,
     "kernel_variants(): the variants of the elementwise kernels this CPU runs, best "
     "first."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "_fused",
    "Recurrent loops for charrnn.cells (see charrnn/_fused.c); optional, numpy is the "
    "reference.",
    -1,
    methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fused(void)
{
    gemm_kind = gemm_available(NULL);
    for (int k = NUM_VARIANTS - 1; k >= 0; k--) /* the best one this CPU runs */
        if (variant_runs(VARIANTS[k]))
            step_kernels = VARIANTS[k];
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "PANEL", PANEL) < 0 ||
        PyModule_AddIntConstant(m, "API", API) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
