/* Optional compiled kernels for the per-step loops of charrnn/cells.py.
 *
 * Each kernel does, in one pass over the batch, the elementwise work of one time step that
 * cells.py otherwise does with a handful of numpy calls; the recurrent GEMM stays in numpy.
 * Every kernel computes exactly the numpy lines it replaces (same operations, same order,
 * no contraction into FMA), so the only differences from the numpy path are in the
 * transcendental functions:
 *   - float64 uses the C library's tanh (correctly rounded to within an ulp, like numpy's);
 *   - float32 uses tanh_f32 below, a branch-free version of Cephes' tanhf that the compiler
 *     vectorizes (max error 1.4e-7 relative, 1.33 ulp, over every float32), and computes the
 *     sigmoid gates as 1 / (1 + exp(-x)) (gate_f32) where numpy has 0.5 tanh(x/2) + 0.5.
 * The backward kernels have no transcendental functions: their results are bit-identical.
 *
 * Arrays are taken through the buffer protocol (no numpy headers): C-contiguous, all float32
 * or all float64, shapes (B, k*H) or (H,) as each kernel documents, not overlapping each
 * other.  Anything else raises ValueError.
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

#ifdef __FAST_MATH__
#error "charrnn/_fused.c needs IEEE arithmetic: do not compile it with -ffast-math"
#endif
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

/* On x86-64 Linux with GCC, every kernel is also compiled for AVX2 and the better version
 * is picked when the module loads (an ifunc): 8 float32 lanes instead of SSE2's 4. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define KERNEL __attribute__((target_clones("avx2", "default"))) static void
#else
#define KERNEL static void
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
    scale.i = (k.i - 0x4B400000 + 127) << 23; /* k.i - 0x4B400000 == n */
    return p * scale.f;
}

/* Cephes tanhf: an odd polynomial below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1) above it, both
 * computed and one selected so that loops over it vectorize.  tanh(+-inf) = +-1 and NaN stays
 * NaN (it takes the polynomial branch). */
static inline float tanh_f32(float x)
{
    float ax = fabsf(x);
    float ax_clamped = ax < 9.0f ? ax : 9.0f; /* tanh(9) rounds to 1 */
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

/* ---- kernels, one macro each, instantiated below for float and double -------------------
 * Comments give the numpy lines of cells.py that each kernel computes, for one step t. */

/* LSTM forward, after rec = hs[t] @ W_rec.T.  a: acts[t] (B, 4H), pre-activations with
 * the sigmoid gates' inner 0.5 already folded in; rec (B, 4H); c_prev: cs[t]; outputs c:
 * cs[t+1], tanh_c: tanh_c[t], h: hs[t+1], all (B, H).
 *   a = tanh(a + rec) * scale + shift   (scale, shift = 0.5, 0.5 on i, f, o; 1, 0 on g)
 *   c = f * c_prev + i * g;  tanh_c = tanh(c);  h = o * tanh_c                            */
#define DEFINE_LSTM_FWD(real, TANH, GATE)                                                   \
    KERNEL lstm_fwd_##real(Py_ssize_t B, Py_ssize_t H, real *restrict a,                    \
                           const real *restrict rec, const real *restrict c_prev,           \
                           real *restrict c, real *restrict tanh_c, real *restrict h)       \
    {                                                                                       \
        for (Py_ssize_t b = 0; b < B; b++) {                                                \
            real *ab = a + b * 4 * H;                                                       \
            const real *rb = rec + b * 4 * H;                                               \
            for (Py_ssize_t j = 0; j < 2 * H; j++) /* i, f */                               \
                ab[j] = GATE(ab[j] + rb[j]);                                                \
            for (Py_ssize_t j = 2 * H; j < 3 * H; j++) /* g */                              \
                ab[j] = TANH(ab[j] + rb[j]);                                                \
            for (Py_ssize_t j = 3 * H; j < 4 * H; j++) /* o */                              \
                ab[j] = GATE(ab[j] + rb[j]);                                                \
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
#define DEFINE_LSTM_BWD(real)                                                               \
    KERNEL lstm_bwd_##real(Py_ssize_t B, Py_ssize_t H, real *restrict dh,                   \
                           real *restrict dc, const real *restrict dh_in,                   \
                           const real *restrict a, const real *restrict c_prev,             \
                           const real *restrict tanh_c, real *restrict d)                   \
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
#define DEFINE_GRU_FWD(real, TANH, GATE)                                                    \
    KERNEL gru_fwd_##real(Py_ssize_t B, Py_ssize_t H, real *restrict a,                     \
                          const real *restrict rec, const real *restrict b_hn,              \
                          const real *restrict h_prev, real *restrict hn, real *restrict h) \
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

/* GRU backward, before drec[t] @ W_hh.  dh (B, H) in/out; dh_in: dhs[t]; acts: acts[t]
 * (B, 3H) holding r, z and f_n; f_z: f_z[t], f_r: f_r[t] (B, H); outputs dn: dn_pre[t]
 * (B, H), q: drec[t] (B, 3H).  The caller then adds drec[t] @ W_hh to dh.
 *   dh += dh_in;  dn = dh * f_n;  q = [dn * f_r, dh * f_z, dn * r];  dh *= z              */
#define DEFINE_GRU_BWD(real)                                                                \
    KERNEL gru_bwd_##real(Py_ssize_t B, Py_ssize_t H, real *restrict dh,                    \
                          const real *restrict dh_in, const real *restrict acts,            \
                          const real *restrict f_z, const real *restrict f_r,               \
                          real *restrict dn, real *restrict q)                              \
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

/* Vanilla RNN forward, after rec = hs[t] @ W_hh.T: h = tanh(x + rec), all (B, H). */
#define DEFINE_RNN_FWD(real, TANH)                                                          \
    KERNEL rnn_fwd_##real(Py_ssize_t B, Py_ssize_t H, const real *restrict x,               \
                          const real *restrict rec, real *restrict h)                       \
    {                                                                                       \
        for (Py_ssize_t k = 0; k < B * H; k++)                                              \
            h[k] = TANH(x[k] + rec[k]);                                                     \
    }

/* Vanilla RNN backward, before dh = dpre[t] @ W_hh: dh += dh_in; dpre *= dh, all (B, H). */
#define DEFINE_RNN_BWD(real)                                                                \
    KERNEL rnn_bwd_##real(Py_ssize_t B, Py_ssize_t H, real *restrict dh,                    \
                          const real *restrict dh_in, real *restrict dpre)                  \
    {                                                                                       \
        for (Py_ssize_t k = 0; k < B * H; k++) {                                            \
            real dhk = dh[k] + dh_in[k];                                                    \
            dh[k] = dhk;                                                                    \
            dpre[k] = dpre[k] * dhk;                                                        \
        }                                                                                   \
    }

DEFINE_LSTM_FWD(float, tanh_f32, gate_f32)
DEFINE_LSTM_FWD(double, tanh_f64, gate_f64)
DEFINE_LSTM_BWD(float)
DEFINE_LSTM_BWD(double)
DEFINE_GRU_FWD(float, tanh_f32, gate_f32)
DEFINE_GRU_FWD(double, tanh_f64, gate_f64)
DEFINE_GRU_BWD(float)
DEFINE_GRU_BWD(double)
DEFINE_RNN_FWD(float, tanh_f32)
DEFINE_RNN_FWD(double, tanh_f64)
DEFINE_RNN_BWD(float)
DEFINE_RNN_BWD(double)

/* ---- arguments -------------------------------------------------------------------------- */

#define MAX_ARGS 8

typedef struct {
    const char *name;
    int writable;
    int width; /* the array is (B, width * H); 0: a vector (H,) */
} ArgSpec;

typedef struct {
    Py_buffer view[MAX_ARGS];
    int held;
    int is_double;
    Py_ssize_t B, H;
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

/* Gets the buffers of `args` as `spec` describes, B and H from the first (B, width * H)
 * argument.  Returns 0, or -1 with ValueError (or TypeError for a wrong count) set. */
static int get_arrays(PyObject *args, const char *fname, const ArgSpec *spec, int n, Arrays *x)
{
    x->held = 0;
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
        if (k == 0) { /* spec[0] is always a (B, width * H) array */
            if (v->ndim != 2 || v->shape[1] % s->width != 0) {
                PyErr_Format(PyExc_ValueError, "%s(): %s must be (B, %d*H)", fname, s->name,
                             s->width);
                goto fail;
            }
            x->B = v->shape[0];
            x->H = v->shape[1] / s->width;
        }
        int ok = s->width == 0
                     ? v->ndim == 1 && v->shape[0] == x->H
                     : v->ndim == 2 && v->shape[0] == x->B && v->shape[1] == s->width * x->H;
        if (!ok) {
            PyErr_Format(PyExc_ValueError, "%s(): %s has the wrong shape for B=%zd, H=%zd",
                         fname, s->name, x->B, x->H);
            goto fail;
        }
    }
    x->is_double = code == 'd';
    return 0;
fail:
    release_arrays(x);
    return -1;
}

/* ---- module ------------------------------------------------------------------------------ */

/* The kernel's k-th array as a pointer to T. */
#define ARG(T, k) ((T *)x.view[k].buf)

#define WRAPPER(NAME, CALL_ARGS, ...)                                                  \
    static const ArgSpec NAME##_spec[] = {__VA_ARGS__};                                     \
    static PyObject *py_##NAME(PyObject *self, PyObject *args)                              \
    {                                                                                       \
        (void)self;                                                                         \
        Arrays x;                                                                           \
        int n = (int)(sizeof(NAME##_spec) / sizeof(ArgSpec));                               \
        if (get_arrays(args, #NAME, NAME##_spec, n, &x) < 0)                                \
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

#define ARGS6(T) (x.B, x.H, ARG(T, 0), ARG(T, 1), ARG(T, 2), ARG(T, 3), ARG(T, 4), ARG(T, 5))
#define ARGS7(T) \
    (x.B, x.H, ARG(T, 0), ARG(T, 1), ARG(T, 2), ARG(T, 3), ARG(T, 4), ARG(T, 5), ARG(T, 6))
#define ARGS3(T) (x.B, x.H, ARG(T, 0), ARG(T, 1), ARG(T, 2))

WRAPPER(lstm_fwd, ARGS6,
        {"a", 1, 4}, {"rec", 0, 4}, {"c_prev", 0, 1}, {"c", 1, 1}, {"tanh_c", 1, 1}, {"h", 1, 1})
WRAPPER(lstm_bwd, ARGS7,
        {"dh", 1, 1}, {"dc", 1, 1}, {"dh_in", 0, 1}, {"a", 0, 4}, {"c_prev", 0, 1},
        {"tanh_c", 0, 1}, {"d", 1, 4})
WRAPPER(gru_fwd, ARGS6,
        {"a", 1, 3}, {"rec", 0, 3}, {"b_hn", 0, 0}, {"h_prev", 0, 1}, {"hn", 1, 1}, {"h", 1, 1})
WRAPPER(gru_bwd, ARGS7,
        {"dh", 1, 1}, {"dh_in", 0, 1}, {"acts", 0, 3}, {"f_z", 0, 1}, {"f_r", 0, 1},
        {"dn", 1, 1}, {"q", 1, 3})
WRAPPER(rnn_fwd, ARGS3, {"x", 0, 1}, {"rec", 0, 1}, {"h", 1, 1})
WRAPPER(rnn_bwd, ARGS3, {"dh", 1, 1}, {"dh_in", 0, 1}, {"dpre", 1, 1})

static PyMethodDef methods[] = {
    {"lstm_fwd_step", py_lstm_fwd, METH_VARARGS,
     "lstm_fwd_step(a, rec, c_prev, c, tanh_c, h): one LSTM forward step after the GEMM."},
    {"lstm_bwd_step", py_lstm_bwd, METH_VARARGS,
     "lstm_bwd_step(dh, dc, dh_in, a, c_prev, tanh_c, d): one LSTM backward step before the "
     "GEMM, from the forward pass's activations."},
    {"gru_fwd_step", py_gru_fwd, METH_VARARGS,
     "gru_fwd_step(a, rec, b_hn, h_prev, hn, h): one GRU forward step after the GEMM."},
    {"gru_bwd_step", py_gru_bwd, METH_VARARGS,
     "gru_bwd_step(dh, dh_in, acts, f_z, f_r, dn, q): one GRU backward step before the GEMM."},
    {"rnn_fwd_step", py_rnn_fwd, METH_VARARGS,
     "rnn_fwd_step(x, rec, h): h = tanh(x + rec)."},
    {"rnn_bwd_step", py_rnn_bwd, METH_VARARGS,
     "rnn_bwd_step(dh, dh_in, dpre): dh += dh_in; dpre *= dh."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "_fused",
    "Per-step kernels for charrnn.cells (see charrnn/_fused.c); optional, numpy is the "
    "reference.",
    -1,
    methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
