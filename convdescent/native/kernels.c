/* Native CPU kernels for convdescent's hot loops, compiled on first use (see native/__init__.py).
 *
 * Each kernel is the same formula as the torch-op version in the layer it serves, written as one pass
 * over memory. Tensors arrive as data pointers plus element strides, so any layout is read in place.
 * Every kernel exists for float and double (suffixes f32 and f64).
 *
 * Max pooling over (ph, pw) windows with strides (sh, sw), no padding:
 *   forward:  out[n, c, i, j] = max_{k, l} x[n, c, i*sh + k, j*sw + l]
 *             code[n, i, j, c] = k*pw + l of the first maximum in row-major window order; a NaN wins (the
 *             last NaN of a window, as in torch)
 *   backward: dx[n, c, p, q] = sum over windows (i, j) whose code points at (p, q) of dy[n, c, i, j]
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif

#define BLOCK 256

#define DEFINE_MAXPOOL(T, SUF)                                                                          \
void cd_maxpool_fwd_##SUF(const T *x, T *out, uint8_t *code, int64_t N, int64_t C, int64_t Ho,         \
                          int64_t Wo, int64_t xn, int64_t xc, int64_t xh, int64_t xw, int64_t on,      \
                          int64_t oc, int64_t oh, int64_t ow, int64_t ph, int64_t pw, int64_t sh,      \
                          int64_t sw, int threads)                                                     \
{                                                                                                      \
    const int64_t rows = N * Ho;                                                                       \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                  \
    for (int64_t r = 0; r < rows; r++) {                                                               \
        const int64_t n = r / Ho, i = r % Ho;                                                          \
        T best[BLOCK];                                                                                 \
        int32_t arg[BLOCK];                                                                            \
        for (int64_t j = 0; j < Wo; j++) {                                                             \
            const T *win = x + n * xn + i * sh * xh + j * sw * xw;                                     \
            T *o = out + n * on + i * oh + j * ow;                                                     \
            uint8_t *cd = code + (r * Wo + j) * C;                                                     \
            for (int64_t c0 = 0; c0 < C; c0 += BLOCK) {                                                \
                const int64_t cb = C - c0 < BLOCK ? C - c0 : BLOCK;                                    \
                const T *v0 = win + c0 * xc;                                                           \
                for (int64_t c = 0; c < cb; c++) { best[c] = v0[c * xc]; arg[c] = 0; }                 \
                for (int64_t k = 0; k < ph; k++) {                                                     \
                    for (int64_t l = 0; l < pw; l++) {                                                 \
                        if (k == 0 && l == 0) continue;                                                \
                        const T *v = v0 + k * xh + l * xw;                                             \
                        const int32_t here = (int32_t)(k * pw + l);                                    \
                        if (xc == 1) {                                                                 \
                            for (int64_t c = 0; c < cb; c++) {                                         \
                                const T a = v[c], b = best[c];                                         \
                                const int take = (a > b) | (a != a);                                \
                                best[c] = take ? a : b;                                                \
                                arg[c] = take ? here : arg[c];                                         \
                            }                                                                          \
                        } else {                                                                       \
                            for (int64_t c = 0; c < cb; c++) {                                         \
                                const T a = v[c * xc], b = best[c];                                    \
                                const int take = (a > b) | (a != a);                                \
                                best[c] = take ? a : b;                                                \
                                arg[c] = take ? here : arg[c];                                         \
                            }                                                                          \
                        }                                                                              \
                    }                                                                                  \
                }                                                                                      \
                if (oc == 1) {                                                                         \
                    for (int64_t c = 0; c < cb; c++) o[c0 + c] = best[c];                              \
                } else {                                                                               \
                    for (int64_t c = 0; c < cb; c++) o[(c0 + c) * oc] = best[c];                       \
                }                                                                                      \
                for (int64_t c = 0; c < cb; c++) cd[c0 + c] = (uint8_t)arg[c];                         \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
}                                                                                                      \
                                                                                                       \
/* dx is (N, H, W, C) contiguous (channels last); dy is read through its strides. */                   \
void cd_maxpool_bwd_##SUF(const T *dy, const uint8_t *code, T *dx, int64_t N, int64_t C, int64_t H,    \
                          int64_t W, int64_t Ho, int64_t Wo, int64_t dn, int64_t dc, int64_t dh,       \
                          int64_t dw, int64_t ph, int64_t pw, int64_t sh, int64_t sw, int threads)     \
{                                                                                                      \
    if (ph == sh && pw == sw) {                                                                        \
        /* Windows tile the map without overlap: write every covered element once, zero the rest. A    \
           dy that is not channels-last has its row of windows transposed into a small buffer first,   \
           so the channel loops below run over contiguous memory. */                                   \
        const int64_t rows = N * Ho;                                                                   \
        _Pragma("omp parallel num_threads(threads)")                                                   \
        {                                                                                              \
            T *buf = dc != 1 ? (T *)malloc(sizeof(T) * (size_t)(Wo * C)) : NULL;                       \
            _Pragma("omp for schedule(static)")                                                        \
            for (int64_t r = 0; r < rows; r++) {                                                       \
                const int64_t n = r / Ho, i = r % Ho;                                                  \
                const T *grow = dy + n * dn + i * dh;                                                  \
                int64_t gj = dw, gc = dc;                                                              \
                if (buf != NULL) {                                                                     \
                    for (int64_t c = 0; c < C; c++)                                                    \
                        for (int64_t j = 0; j < Wo; j++) buf[j * C + c] = grow[c * dc + j * dw];       \
                    grow = buf; gj = C; gc = 1;                                                        \
                }                                                                                      \
                for (int64_t k = 0; k < ph; k++) {                                                     \
                    T *drow = dx + ((n * H + i * sh + k) * W) * C;                                     \
                    for (int64_t j = 0; j < Wo; j++) {                                                 \
                        const T *g = grow + j * gj;                                                    \
                        const uint8_t *cd = code + (r * Wo + j) * C;                                   \
                        for (int64_t l = 0; l < pw; l++) {                                             \
                            T *d = drow + (j * sw + l) * C;                                            \
                            const uint8_t here = (uint8_t)(k * pw + l);                                \
                            if (gc == 1) {                                                             \
                                for (int64_t c = 0; c < C; c++) d[c] = cd[c] == here ? g[c] : (T)0;    \
                            } else {                                                                   \
                                for (int64_t c = 0; c < C; c++)                                        \
                                    d[c] = cd[c] == here ? g[c * gc] : (T)0;                           \
                            }                                                                          \
                        }                                                                              \
                    }                                                                                  \
                    if (Wo * sw < W)                                                                   \
                        memset(drow + Wo * sw * C, 0, (size_t)((W - Wo * sw) * C) * sizeof(T));        \
                }                                                                                      \
            }                                                                                          \
            free(buf);                                                                                 \
        }                                                                                              \
        if (Ho * sh < H) { /* rows below the last window */                                            \
            for (int64_t n = 0; n < N; n++)                                                            \
                memset(dx + (n * H + Ho * sh) * W * C, 0, (size_t)((H - Ho * sh) * W * C) * sizeof(T)); \
        }                                                                                              \
        return;                                                                                        \
    }                                                                                                  \
    /* Overlapping or gapped windows: zero, then add each window's gradient to its winner. Windows of  \
       one example overlap, so the work is split by example. */                                        \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                  \
    for (int64_t n = 0; n < N; n++) {                                                                  \
        T *dn_ = dx + n * H * W * C;                                                                   \
        memset(dn_, 0, (size_t)(H * W * C) * sizeof(T));                                               \
        for (int64_t i = 0; i < Ho; i++) {                                                             \
            for (int64_t j = 0; j < Wo; j++) {                                                         \
                const T *g = dy + n * dn + i * dh + j * dw;                                            \
                const uint8_t *cd = code + ((n * Ho + i) * Wo + j) * C;                                \
                T *base = dn_ + (i * sh * W + j * sw) * C;                                             \
                for (int64_t c = 0; c < C; c++) {                                                      \
                    const int64_t k = cd[c] / pw, l = cd[c] % pw;                                      \
                    base[(k * W + l) * C + c] += g[c * dc];                                            \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
}

DEFINE_MAXPOOL(float, f32)
DEFINE_MAXPOOL(double, f64)

/* im2col for Conv2D: cols[c, k, l, n, i, j] = x[n, c, i*sh + k, j*sw + l] (x already padded), cols
 * contiguous, x read through its strides. One pass instead of one strided copy per kernel offset. */
#define DEFINE_IM2COL(T, SUF)                                                                           \
void cd_im2col_##SUF(const T *x, T *cols, int64_t N, int64_t C, int64_t Ho, int64_t Wo, int64_t kh,    \
                     int64_t kw, int64_t sh, int64_t sw, int64_t xn, int64_t xc, int64_t xh,           \
                     int64_t xw, int threads)                                                          \
{                                                                                                      \
    const int64_t blocks = C * kh * kw * N;                                                            \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                  \
    for (int64_t b = 0; b < blocks; b++) {                                                             \
        const int64_t n = b % N, l = (b / N) % kw, k = (b / (N * kw)) % kh, c = b / (N * kw * kh);     \
        T *dst = cols + b * Ho * Wo;                                                                   \
        const T *src = x + n * xn + c * xc + k * xh + l * xw;                                          \
        const int64_t step = sw * xw;                                                                  \
        for (int64_t i = 0; i < Ho; i++) {                                                             \
            const T *s = src + i * sh * xh;                                                            \
            T *d = dst + i * Wo;                                                                       \
            if (step == 1) {                                                                           \
                memcpy(d, s, (size_t)Wo * sizeof(T));                                                  \
            } else {                                                                                   \
                for (int64_t j = 0; j < Wo; j++) d[j] = s[j * step];                                   \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
}

DEFINE_IM2COL(float, f32)
DEFINE_IM2COL(double, f64)

/* Conv2D followed by MaxPool2D, forward, without writing the convolution's output: for each pooling
 * window the conv outputs of its positions are computed from the input's patches, and only their maximum
 * and the winner's code are written (the same values and codes as cd_maxpool_fwd on the conv output, up to
 * the rounding of the dot products).
 *   conv[n, f, i, j] = bias[f] + sum_q x[n, c, i*csh + k, j*csw + l] * wt[q, f],   q = (c, k, l)
 *   out[n, f, a, b]  = max over the window's (k, l) of conv[n, f, a*sh + k, b*sw + l]
 * The patches are read straight from x (already padded, any strides; C*kh*kw = K): for the small patches
 * this kernel serves, im2col's columns were 9x the input's size to write and read back (measured: 0.55 ->
 * 0.29 ms at batch 32, 2.3 -> 1.8 ms at batch 128, im2col included). wt is (K, F) contiguous, bias F
 * values or NULL, code (N, Po, Qo, F). Returns 0, or 1 when out of memory (nothing written). */
/* The filters are taken 4 vector registers at a time (32 floats or 16 doubles), the accumulators held in
   GNU C vector variables so that they stay in registers across the patch loop; a last partial block runs
   the same formula with scalars. */
/* Offsets of a patch's entries (c, k, l) in the input, c*xc + k*xh + l*xw, for kernels that read patches
 * straight from the (padded) input instead of from im2col's columns; NULL when out of memory. */
static int64_t *cd_patch_offsets(int64_t C, int64_t kh, int64_t kw, int64_t xc, int64_t xh, int64_t xw)
{
    int64_t *q = (int64_t *)malloc(sizeof(int64_t) * (size_t)(C * kh * kw > 0 ? C * kh * kw : 1));
    if (q != NULL)
        for (int64_t c = 0; c < C; c++)
            for (int64_t k = 0; k < kh; k++)
                for (int64_t l = 0; l < kw; l++) q[(c * kh + k) * kw + l] = c * xc + k * xh + l * xw;
    return q;
}

#define DEFINE_CONV_POOL(T, SUF, IT)                                                                    \
typedef T cdv_##SUF __attribute__((vector_size(32)));                                                  \
typedef IT cdi_##SUF __attribute__((vector_size(32)));                                                 \
static inline cdv_##SUF cd_load_##SUF(const T *p) { cdv_##SUF v; memcpy(&v, p, sizeof v); return v; }  \
static inline cdv_##SUF cd_take_##SUF(cdi_##SUF m, cdv_##SUF a, cdv_##SUF b)                           \
{ return (cdv_##SUF)(((cdi_##SUF)a & m) | ((cdi_##SUF)b & ~m)); }                                      \
int cd_conv_pool_fwd_##SUF(const T *x, const T *wt, const T *bias, T *out, uint8_t *code, int64_t N,    \
                           int64_t F, int64_t C, int64_t kh, int64_t kw, int64_t xn, int64_t xc,       \
                           int64_t xh, int64_t xw, int64_t csh, int64_t csw, int64_t Ho, int64_t Wo,   \
                           int64_t Po, int64_t Qo, int64_t ph, int64_t pw, int64_t sh, int64_t sw,     \
                           int64_t on, int64_t oc, int64_t oh, int64_t ow, int threads)                \
{                                                                                                      \
    enum { L = 32 / sizeof(T), FB = 4 * (32 / sizeof(T)) };                                            \
    const int64_t K = C * kh * kw, rows = N * Po, ry = csh * xh, rx = csw * xw;                        \
    int64_t *qoff = cd_patch_offsets(C, kh, kw, xc, xh, xw);                                           \
    if (qoff == NULL) return 1;                                                                        \
    (void)Ho; (void)Wo;                                                                                \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                  \
    for (int64_t r = 0; r < rows; r++) {                                                               \
        const int64_t n = r / Po, a = r % Po;                                                          \
        T vals[FB];                                                                                    \
        IT args[FB];                                                                                   \
        for (int64_t b = 0; b < Qo; b++) {                                                             \
            T *o = out + n * on + a * oh + b * ow;                                                     \
            uint8_t *cd = code + (r * Qo + b) * F;                                                     \
            for (int64_t f0 = 0; f0 < F; f0 += FB) {                                                   \
                const int64_t fb = F - f0 < FB ? F - f0 : FB;                                          \
                if (fb == FB) {                                                                        \
                    cdv_##SUF b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};                                  \
                    cdi_##SUF g0 = {0}, g1 = {0}, g2 = {0}, g3 = {0};                                  \
                    cdv_##SUF z0 = {0}, z1 = {0}, z2 = {0}, z3 = {0};                                  \
                    if (bias != NULL) {                                                                \
                        z0 = cd_load_##SUF(bias + f0); z1 = cd_load_##SUF(bias + f0 + L);              \
                        z2 = cd_load_##SUF(bias + f0 + 2 * L); z3 = cd_load_##SUF(bias + f0 + 3 * L);  \
                    }                                                                                  \
                    for (int64_t k = 0; k < ph; k++) {                                                 \
                        for (int64_t l = 0; l < pw; l++) {                                             \
                            const int64_t p = n * xn + (a * sh + k) * ry + (b * sw + l) * rx;          \
                            cdv_##SUF s0 = z0, s1 = z1, s2 = z2, s3 = z3;                              \
                            for (int64_t q = 0; q < K; q++) {                                          \
                                const T v = x[qoff[q] + p];                                            \
                                const T *wq = wt + q * F + f0;                                         \
                                s0 += v * cd_load_##SUF(wq);                                           \
                                s1 += v * cd_load_##SUF(wq + L);                                       \
                                s2 += v * cd_load_##SUF(wq + 2 * L);                                   \
                                s3 += v * cd_load_##SUF(wq + 3 * L);                                   \
                            }                                                                          \
                            const IT here = (IT)(k * pw + l);                                          \
                            if (here == 0) {                                                           \
                                b0 = s0; b1 = s1; b2 = s2; b3 = s3;                                    \
                            } else {                                                                   \
                                cdi_##SUF m;                                                           \
                                m = (cdi_##SUF)((s0 > b0) | (s0 != s0));                               \
                                b0 = cd_take_##SUF(m, s0, b0); g0 = (m & here) | (~m & g0);            \
                                m = (cdi_##SUF)((s1 > b1) | (s1 != s1));                               \
                                b1 = cd_take_##SUF(m, s1, b1); g1 = (m & here) | (~m & g1);            \
                                m = (cdi_##SUF)((s2 > b2) | (s2 != s2));                               \
                                b2 = cd_take_##SUF(m, s2, b2); g2 = (m & here) | (~m & g2);            \
                                m = (cdi_##SUF)((s3 > b3) | (s3 != s3));                               \
                                b3 = cd_take_##SUF(m, s3, b3); g3 = (m & here) | (~m & g3);            \
                            }                                                                          \
                        }                                                                              \
                    }                                                                                  \
                    memcpy(vals, &b0, sizeof b0); memcpy(vals + L, &b1, sizeof b1);                    \
                    memcpy(vals + 2 * L, &b2, sizeof b2); memcpy(vals + 3 * L, &b3, sizeof b3);        \
                    memcpy(args, &g0, sizeof g0); memcpy(args + L, &g1, sizeof g1);                    \
                    memcpy(args + 2 * L, &g2, sizeof g2); memcpy(args + 3 * L, &g3, sizeof g3);        \
                } else {                                                                               \
                    for (int64_t k = 0; k < ph; k++) {                                                 \
                        for (int64_t l = 0; l < pw; l++) {                                             \
                            const int64_t p = n * xn + (a * sh + k) * ry + (b * sw + l) * rx;          \
                            const IT here = (IT)(k * pw + l);                                          \
                            for (int64_t f = 0; f < fb; f++) {                                         \
                                T s = bias != NULL ? bias[f0 + f] : (T)0;                              \
                                for (int64_t q = 0; q < K; q++) s += x[qoff[q] + p] * wt[q * F + f0 + f];  \
                                if (here == 0 || s > vals[f] || s != s) { vals[f] = s; args[f] = here; } \
                            }                                                                          \
                        }                                                                              \
                    }                                                                                  \
                }                                                                                      \
                for (int64_t f = 0; f < fb; f++) o[(f0 + f) * oc] = vals[f];                           \
                for (int64_t f = 0; f < fb; f++) cd[f0 + f] = (uint8_t)args[f];                        \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
    free(qoff);                                                                                        \
    return 0;                                                                                          \
}

DEFINE_CONV_POOL(float, f32, int32_t)
DEFINE_CONV_POOL(double, f64, int64_t)

/* MaxPool2D's backward and the weight and bias gradients of the Conv2D before it, in one pass, for a conv
 * whose input needs no gradient (the first layer). Returns 0, or 1 when scratch memory ran out (nothing
 * usable written). The pool's backward would write the conv's whole
 * output gradient, zero except at each window's winner, for the conv to read twice (dW = cols^T delta and
 * db = sum delta); here each window's gradient goes straight to its winner's patch:
 *   dWt[q, f] = sum over windows (n, a, b) of dy[n, f, a, b] * (patch q of the winner of f, read from x)
 *   db[f]     = sum over windows (n, a, b) of dy[n, f, a, b]
 * which is the same sum (windows that overlap simply add). dy and the padded input x are read through their
 * strides, as in the forward; dWt (K, F) and db (F) are overwritten. Per row of windows, the gradient routed to each
 * window offset is laid out first (buffer gk), then the patch loop accumulates in vector registers. */
#define DEFINE_POOL_CONV_BWD(T, SUF)                                                                    \
int cd_pool_conv_bwd_##SUF(const T *dy, const uint8_t *code, const T *x, T *dwt, T *db, int64_t N,     \
                            int64_t F, int64_t C, int64_t kh, int64_t kw, int64_t xn, int64_t xc,      \
                            int64_t xh, int64_t xw, int64_t csh, int64_t csw, int64_t Po, int64_t Qo,  \
                            int64_t ph, int64_t pw, int64_t sh, int64_t sw, int64_t dn, int64_t dc,    \
                            int64_t dh, int64_t dw, int threads)                                       \
{                                                                                                      \
    enum { L = 32 / sizeof(T), FB = 4 * (32 / sizeof(T)) };                                            \
    const int64_t K = C * kh * kw, rows = N * Po, P = ph * pw, ry = csh * xh, rx = csw * xw;           \
    int failed = 0;                                                                                    \
    int64_t *qoff = cd_patch_offsets(C, kh, kw, xc, xh, xw);                                           \
    if (qoff == NULL) return 1;                                                                        \
    memset(dwt, 0, sizeof(T) * (size_t)(K * F));                                                       \
    if (db != NULL) memset(db, 0, sizeof(T) * (size_t)F);                                              \
    _Pragma("omp parallel num_threads(threads)")                                                       \
    {                                                                                                  \
        T *accw = (T *)calloc((size_t)(K * F), sizeof(T));                                             \
        T *accb = (T *)calloc((size_t)F, sizeof(T));                                                   \
        T *gk = (T *)malloc(sizeof(T) * (size_t)(Qo * P * F));  /* [b][offset][f] */                   \
        int64_t *pos = (int64_t *)malloc(sizeof(int64_t) * (size_t)(Qo * P));                          \
        int ok = accw != NULL && accb != NULL && gk != NULL && pos != NULL;                            \
        _Pragma("omp for schedule(static)")                                                            \
        for (int64_t r = 0; r < rows; r++) {                                                           \
            if (!ok) continue;                                                                         \
            const int64_t n = r / Po, a = r % Po;                                                      \
            for (int64_t b = 0; b < Qo; b++) {                                                         \
                const uint8_t *cd = code + (r * Qo + b) * F;                                           \
                const T *g = dy + n * dn + a * dh + b * dw;                                            \
                T *row = gk + b * P * F;                                                               \
                memset(row, 0, sizeof(T) * (size_t)(P * F));                                           \
                for (int64_t f = 0; f < F; f++) {                                                      \
                    const T v = g[f * dc];                                                             \
                    row[cd[f] * F + f] = v;                                                            \
                    accb[f] += v;                                                                      \
                }                                                                                      \
                for (int64_t k = 0; k < ph; k++)                                                       \
                    for (int64_t l = 0; l < pw; l++)                                                   \
                        pos[b * P + k * pw + l] = n * xn + (a * sh + k) * ry + (b * sw + l) * rx;      \
            }                                                                                          \
            for (int64_t q = 0; q < K; q++) {                                                          \
                const T *cq = x + qoff[q];                                                             \
                int64_t f0 = 0;                                                                        \
                for (; f0 + FB <= F; f0 += FB) {                                                       \
                    cdv_##SUF s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};                                  \
                    for (int64_t e = 0; e < Qo * P; e++) {                                             \
                        const T v = cq[pos[e]];                                                        \
                        const T *w = gk + e * F + f0;                                                  \
                        s0 += v * cd_load_##SUF(w);                                                    \
                        s1 += v * cd_load_##SUF(w + L);                                                \
                        s2 += v * cd_load_##SUF(w + 2 * L);                                            \
                        s3 += v * cd_load_##SUF(w + 3 * L);                                            \
                    }                                                                                  \
                    T *o = accw + q * F + f0;                                                          \
                    T tmp[FB];                                                                         \
                    memcpy(tmp, &s0, sizeof s0); memcpy(tmp + L, &s1, sizeof s1);                      \
                    memcpy(tmp + 2 * L, &s2, sizeof s2); memcpy(tmp + 3 * L, &s3, sizeof s3);          \
                    for (int64_t f = 0; f < FB; f++) o[f] += tmp[f];                                   \
                }                                                                                      \
                for (; f0 < F; f0++) {                                                                 \
                    T s = 0;                                                                           \
                    for (int64_t e = 0; e < Qo * P; e++) s += cq[pos[e]] * gk[e * F + f0];             \
                    accw[q * F + f0] += s;                                                             \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
        _Pragma("omp critical")                                                                        \
        {                                                                                              \
            if (ok) {                                                                                  \
                for (int64_t i = 0; i < K * F; i++) dwt[i] += accw[i];                                 \
                if (db != NULL) for (int64_t f = 0; f < F; f++) db[f] += accb[f];                      \
            } else {                                                                                   \
                failed = 1; /* out of memory: the caller runs the two backwards instead */             \
            }                                                                                          \
        }                                                                                              \
        free(accw); free(accb); free(gk); free(pos);                                                   \
    }                                                                                                  \
    free(qoff);                                                                                        \
    return failed;                                                                                     \
}

DEFINE_POOL_CONV_BWD(float, f32)
DEFINE_POOL_CONV_BWD(double, f64)

/* Dense (fully connected) products with a fixed split of the input features over threads.
 *
 *   forward: y (N, O) = bias + x (N, K) wt (K, O)
 *   dW:      dwt (K, O) = x^T dy
 *   dx:      dx (N, K) = dy wt^T
 * where wt is the weight stored as (in, out) rows (Dense keeps its weight column-major). Thread t of T always
 * handles the same rows [t*ceil(K/T), (t+1)*ceil(K/T)) of wt and of dwt, which is also the half (or T-th) of
 * the flattened weight that torch's fused Adam step gives thread t. So the weight, its gradient and Adam's
 * moments never move between cores: with torch's own products each thread reads parts of the weight that
 * the other core's Adam step just wrote, which cost 1.2-1.6 ms a batch-32 step whenever the two cores did
 * not share a cache (measured). The forward sums the threads' partial products of its N x O result at
 * the end (small). The multiplications themselves are the BLAS ?gemm_ that torch links (Fortran calling
 * convention, column-major), called by each thread on its slice; every integer argument is passed as a
 * pointer to a 64-bit value, which reads correctly whether that BLAS takes 32-bit or 64-bit integers
 * (little-endian), and Python checks the results once against torch before using it.
 * x has rows of stride ldx (its columns contiguous); dy is (N, O) with row stride ldy, or, when dyt is 1,
 * stored transposed: element (n, o) at dy[o * ldy + n]. */
typedef void (*cd_gemm_fn)(const char *, const char *, const int64_t *, const int64_t *, const int64_t *,
                           const void *, const void *, const int64_t *, const void *, const int64_t *,
                           const void *, void *, const int64_t *, size_t, size_t);

static inline void cd_split(int64_t K, int t, int nt, int64_t *k0, int64_t *k1)
{
    const int64_t chunk = (K + nt - 1) / nt;
    *k0 = t * chunk < K ? t * chunk : K;
    *k1 = (t + 1) * chunk < K ? (t + 1) * chunk : K;
}

#define DEFINE_DENSE(T, SUF)                                                                            \
void cd_dense_fwd_##SUF(cd_gemm_fn gemm, const T *x, const T *wt, const T *bias, T *y, T *scratch,     \
                        int64_t N, int64_t K, int64_t O, int64_t ldx, int threads)                     \
{                                                                                                      \
    _Pragma("omp parallel num_threads(threads)")                                                       \
    {                                                                                                  \
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();                                \
        int64_t k0, k1;                                                                                \
        cd_split(K, t, nt, &k0, &k1);                                                                  \
        T *part = scratch + (int64_t)t * N * O;                                                        \
        const int64_t kk = k1 - k0;                                                                    \
        const T one = 1, zero = 0;                                                                     \
        if (kk > 0)                                                                                    \
            gemm("N", "N", &O, &N, &kk, &one, wt + k0 * O, &O, x + k0, &ldx, &zero, part, &O, 1, 1);   \
        else                                                                                           \
            memset(part, 0, sizeof(T) * (size_t)(N * O));                                             \
        _Pragma("omp barrier")                                                                         \
        _Pragma("omp for schedule(static)")                                                            \
        for (int64_t i = 0; i < N * O; i++) {                                                          \
            T s = bias != NULL ? bias[i % O] : (T)0;                                                   \
            for (int u = 0; u < nt; u++) s += scratch[(int64_t)u * N * O + i];                         \
            y[i] = s;                                                                                  \
        }                                                                                              \
    }                                                                                                  \
}                                                                                                      \
void cd_dense_dw_##SUF(cd_gemm_fn gemm, const T *x, const T *dy, T *dwt, int64_t N, int64_t K,         \
                       int64_t O, int64_t ldx, int64_t ldy, int dyt, int threads)                      \
{                                                                                                      \
    _Pragma("omp parallel num_threads(threads)")                                                       \
    {                                                                                                  \
        int64_t k0, k1;                                                                                \
        cd_split(K, omp_get_thread_num(), omp_get_num_threads(), &k0, &k1);                            \
        const int64_t kk = k1 - k0;                                                                    \
        const T one = 1, zero = 0;                                                                     \
        /* column-major: dwt[k0:k1]^T (O, kk) = op(dy) (O, N) x[:, k0:k1] (N, kk) */                   \
        if (kk > 0)                                                                                    \
            gemm(dyt ? "T" : "N", "T", &O, &kk, &N, &one, dy, &ldy, x + k0, &ldx, &zero,               \
                 dwt + k0 * O, &O, 1, 1);                                                              \
    }                                                                                                  \
}                                                                                                      \
void cd_dense_dx_##SUF(cd_gemm_fn gemm, const T *wt, const T *dy, T *dx, int64_t N, int64_t K,         \
                       int64_t O, int64_t ldy, int dyt, int threads)                                   \
{                                                                                                      \
    _Pragma("omp parallel num_threads(threads)")                                                       \
    {                                                                                                  \
        int64_t k0, k1;                                                                                \
        cd_split(K, omp_get_thread_num(), omp_get_num_threads(), &k0, &k1);                            \
        const int64_t kk = k1 - k0;                                                                    \
        const T one = 1, zero = 0;                                                                     \
        /* column-major: dx[:, k0:k1]^T (kk, N) = wt[k0:k1] (kk, O) op(dy)^T (O, N) */                 \
        if (kk > 0)                                                                                    \
            gemm("T", dyt ? "T" : "N", &kk, &N, &O, &one, wt + k0 * O, &O, dy, &ldy, &zero,            \
                 dx + k0, &K, 1, 1);                                                                   \
    }                                                                                                  \
}

DEFINE_DENSE(float, f32)
DEFINE_DENSE(double, f64)

/* Subnormal floats: flush-to-zero for the threads that run a training step.
 *
 * The floating-point control register (MXCSR on x86, FPCR on AArch64) is per thread, and torch's
 * set_flush_denormal sets only the calling thread's; the OpenMP workers that run half of every parallel
 * operation keep theirs. cd_flush_subnormals(1, n) runs one parallel region of n threads (the team every
 * torch operation and kernel here uses, as the library shares torch's runtime) in which each thread saves
 * its own flush bits and sets them; cd_flush_subnormals(0, n) restores each thread's saved bits. On x86 the
 * bits are FTZ (results below the smallest normal become 0) and DAZ (such inputs are read as 0); on AArch64
 * FZ, which does both. Returns 0 where the architecture is not one of these (nothing is changed).
 * cd_flush_state(n, out) writes each team thread's current flush bits (nonzero: flushing) into out[n]. */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define CD_FLUSH_BITS 0x8040u
static inline unsigned cd_fp_get(void) { return _mm_getcsr(); }
static inline void cd_fp_set(unsigned v) { _mm_setcsr(v); }
#elif defined(__aarch64__)
#define CD_FLUSH_BITS (1u << 24)
static inline unsigned cd_fp_get(void)
{
    uint64_t v;
    __asm__ volatile("mrs %0, fpcr" : "=r"(v));
    return (unsigned)v;
}
static inline void cd_fp_set(unsigned v)
{
    uint64_t w = v;
    __asm__ volatile("msr fpcr, %0" : : "r"(w));
}
#else
#define CD_FLUSH_BITS 0u
static inline unsigned cd_fp_get(void) { return 0; }
static inline void cd_fp_set(unsigned v) { (void)v; }
#endif

static _Thread_local unsigned cd_saved_bits;
static _Thread_local int cd_saved;

int cd_flush_subnormals(int on, int threads)
{
    if (!CD_FLUSH_BITS)
        return 0;
    _Pragma("omp parallel num_threads(threads)")
    {
        const unsigned v = cd_fp_get();
        if (on) {
            cd_saved_bits = v & CD_FLUSH_BITS;
            cd_saved = 1;
            cd_fp_set(v | CD_FLUSH_BITS);
        } else if (cd_saved) {
            cd_fp_set((v & ~CD_FLUSH_BITS) | cd_saved_bits);
            cd_saved = 0;
        }
    }
    return 1;
}

void cd_flush_state(int threads, int32_t *out)
{
    for (int i = 0; i < threads; i++)
        out[i] = -1;
    _Pragma("omp parallel num_threads(threads)")
    {
        const int t = omp_get_thread_num();
        if (t < threads)
            out[t] = (int32_t)(cd_fp_get() & CD_FLUSH_BITS);
    }
}
