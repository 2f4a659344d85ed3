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
#include <math.h>
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

/* [k0, k1): thread t's part of K items split into nt nearly equal runs */
static inline void cd_split(int64_t K, int t, int nt, int64_t *k0, int64_t *k1)
{
    const int64_t chunk = (K + nt - 1) / nt;
    *k0 = t * chunk < K ? t * chunk : K;
    *k1 = (t + 1) * chunk < K ? (t + 1) * chunk : K;
}

/* Whether a conv + pool pass gives each thread a run of filter blocks (all samples) rather than a run of
 * samples (all filters): when the blocks split evenly enough. Split by filters, thread t writes the pooled
 * maps of its filters, which for a Dense after a Flatten are the input features [k0, k1) cd_split gives that
 * same thread in the Dense's products and Adam step, and it reads back its own dL/dx of them in the
 * backward: no cache line of the 2-3 MB maps moves between cores (measured on the 2-core VM: writing 3 MB
 * another core wrote last took 2.2x as long as writing one's own). */
static inline int cd_by_filters(int64_t blocks, int nt)
{
    return nt > 1 && (blocks % nt == 0 || blocks >= 4 * (int64_t)nt);
}

/* Thread t's part of a conv + pool pass over `units` (pooled rows or samples) and F filters taken `block` at a
 * time: [*u0, *u1) of the units and filters [*fa, *fz), one of the two split (cd_by_filters), the other whole. */
static inline void cd_filter_run(int64_t F, int64_t block, int64_t units, int t, int nt, int64_t *u0,
                                 int64_t *u1, int64_t *fa, int64_t *fz)
{
    const int64_t blocks = (F + block - 1) / block;
    int64_t b0 = 0, b1 = blocks;
    *u0 = 0, *u1 = units;
    if (cd_by_filters(blocks, nt))
        cd_split(blocks, t, nt, &b0, &b1);
    else
        cd_split(units, t, nt, u0, u1);
    *fa = b0 * block;
    *fz = b1 * block < F ? b1 * block : F;
}

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

/* A Conv2D (no groups, no dilation) and the MaxPool2D after it, vectorized along the pooled output's width.
 *
 * Lanes of one vector are L neighbouring windows of one pooled row (n, a, b0 .. b0+L-1); for a fixed
 * filter f, window offset (k, l) and patch element q = (c, i, j) the L inputs they read are
 *   x[n, c, (a*sh + k)*csh + i, (b*sw + l)*csw + j] = x[n, c, row, (b + z)*S + e]   with S = sw*csw,
 * t = l*csw + j, phase e = t % S, shift z = t / S: a contiguous run once each input row is split into its
 * S phases. So the input rows are first copied into a small aligned buffer, one line per (row, phase,
 * shift) starting at lane 0 (zero past the input's end: those lanes are never stored): all of a sample's
 * rows at once when that takes at most CDL_SAMPLE_BYTES (an input row then serves every pooled row that
 * reads it), else the R = (ph-1)*csh + kh rows of each pooled row apart. Then every multiply-add is one
 * aligned vector load of L windows. This suits a first layer (few input channels, a short patch), where
 * vectorizing along the filters would leave a dot product of only C*kh*kw terms per output.
 * Threads take runs of filters (every sample) where the filters split evenly (cd_by_filters), else runs of
 * samples (every filter).
 *
 * forward: out[n, f, a, b] = max over (k, l) of bias[f] + sum_q w[f, q] * x[...] (q in (c, i, j) order),
 *          then max(out, 0) when relu is set (a NaN kept, as torch.relu);
 *          code[n, f, a, b] = k*pw + l of the first maximum in row-major window order (a NaN wins);
 *          out and code are (N, F, Po, Qo) through their strides / contiguous.
 * backward (a first layer: no dL/dx): with g = dy[n, f, a, b] (times [y > 0] when y, the forward's
 *          ReLU output, is given: ReLU's own backward) routed to its window's winner,
 *          dW[f, q] = sum over windows of g * x[winner's patch element q],  db[f] = sum of g;
 *          each thread sums its filters over every sample, or whole samples of every filter into
 *          accumulators of its own that are added up in thread order (deterministic for a given thread
 *          count; split by filters, the same sums as one thread's). Both return 0, or 1 when out of memory
 *          (nothing usable written: the caller runs the layers instead).
 */
#if defined(__AVX512F__)
#define CDL_BYTES 64
#else
#define CDL_BYTES 32
#endif
/* Filters the forward takes at once: 4 sums, maxima and winners stay in registers (with 8, AVX-512 on a
 * Zen 4 ran the tutorial's conv + pool 5-9% slower: spilled registers). */
#define CDL_FB 4

typedef float cdl_f32 __attribute__((vector_size(CDL_BYTES)));
typedef int32_t cdm_f32 __attribute__((vector_size(CDL_BYTES)));
typedef double cdl_f64 __attribute__((vector_size(CDL_BYTES)));
typedef int64_t cdm_f64 __attribute__((vector_size(CDL_BYTES)));
#if CDL_BYTES == 64
#include <immintrin.h>
#endif
/* The first cnt lanes of a vector to memory and back (zeros in the other lanes): single masked
 * instructions with AVX-512, element loops elsewhere. Codes are stored as bytes. */
#define DEFINE_LANE_IO(T, SUF, IT, STORE, LOAD, CSTORE, CLOAD)                                    \
static inline void cdl_put_##SUF(T *dst, int64_t stride, cdl_##SUF v, int64_t cnt)                     \
{                                                                                                      \
    if (STORE && stride == 1) { CDL_STORE_##SUF(dst, v, cnt); return; }                                \
    T tmp[sizeof v / sizeof(T)];                                                                       \
    memcpy(tmp, &v, sizeof v);                                                                         \
    for (int64_t e = 0; e < cnt; e++) dst[e * stride] = tmp[e];                                        \
}                                                                                                      \
static inline cdl_##SUF cdl_get_##SUF(const T *src, int64_t stride, int64_t cnt)                       \
{                                                                                                      \
    if (LOAD && stride == 1) return CDL_LOAD_##SUF(src, cnt);                                          \
    T tmp[sizeof(cdl_##SUF) / sizeof(T)] = {0};                                                        \
    for (int64_t e = 0; e < cnt; e++) tmp[e] = src[e * stride];                                        \
    cdl_##SUF v;                                                                                       \
    memcpy(&v, tmp, sizeof v);                                                                         \
    return v;                                                                                          \
}                                                                                                      \
static inline void cdl_put_code_##SUF(uint8_t *dst, cdm_##SUF v, int64_t cnt)                          \
{                                                                                                      \
    if (CSTORE) { CDL_CSTORE_##SUF(dst, v, cnt); return; }                                             \
    IT tmp[sizeof v / sizeof(IT)];                                                                     \
    memcpy(tmp, &v, sizeof v);                                                                         \
    for (int64_t e = 0; e < cnt; e++) dst[e] = (uint8_t)tmp[e];                                        \
}                                                                                                      \
static inline cdm_##SUF cdl_get_code_##SUF(const uint8_t *src, int64_t cnt)                            \
{                                                                                                      \
    if (CLOAD) return CDL_CLOAD_##SUF(src, cnt);                                                       \
    IT tmp[sizeof(cdm_##SUF) / sizeof(IT)] = {0};                                                      \
    for (int64_t e = 0; e < cnt; e++) tmp[e] = (IT)src[e];                                             \
    cdm_##SUF v;                                                                                       \
    memcpy(&v, tmp, sizeof v);                                                                         \
    return v;                                                                                          \
}
#if CDL_BYTES == 64
#define CDL_M16(cnt) ((__mmask16)((1u << (cnt)) - 1u))
#define CDL_M8(cnt) ((__mmask8)((1u << (cnt)) - 1u))
#define CDL_STORE_f32(d, v, cnt) _mm512_mask_storeu_ps((d), CDL_M16(cnt), (__m512)(v))
#define CDL_LOAD_f32(s, cnt) ((cdl_f32)_mm512_maskz_loadu_ps(CDL_M16(cnt), (s)))
#define CDL_CSTORE_f32(d, v, cnt) _mm512_mask_cvtepi32_storeu_epi8((d), CDL_M16(cnt), (__m512i)(v))
#define CDL_STORE_f64(d, v, cnt) _mm512_mask_storeu_pd((d), CDL_M8(cnt), (__m512d)(v))
#define CDL_LOAD_f64(s, cnt) ((cdl_f64)_mm512_maskz_loadu_pd(CDL_M8(cnt), (s)))
#define CDL_CSTORE_f64(d, v, cnt) _mm512_mask_cvtepi64_storeu_epi8((d), CDL_M8(cnt), (__m512i)(v))
#if defined(__AVX512BW__) && defined(__AVX512VL__)
#define CDL_CLOADS 1
#define CDL_CLOAD_f32(s, cnt) ((cdm_f32)_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(CDL_M16(cnt), (s))))
#define CDL_CLOAD_f64(s, cnt) ((cdm_f64)_mm512_cvtepu8_epi64(_mm_maskz_loadu_epi8(CDL_M16(cnt), (s))))
#else
#define CDL_CLOADS 0
#endif
DEFINE_LANE_IO(float, f32, int32_t, 1, 1, 1, CDL_CLOADS)
DEFINE_LANE_IO(double, f64, int64_t, 1, 1, 1, CDL_CLOADS)
#else
#define CDL_STORE_f32(d, v, cnt) ((void)0)
#define CDL_LOAD_f32(s, cnt) ((cdl_f32){0})
#define CDL_CSTORE_f32(d, v, cnt) ((void)0)
#define CDL_CLOAD_f32(s, cnt) ((cdm_f32){0})
#define CDL_STORE_f64(d, v, cnt) ((void)0)
#define CDL_LOAD_f64(s, cnt) ((cdl_f64){0})
#define CDL_CSTORE_f64(d, v, cnt) ((void)0)
#define CDL_CLOAD_f64(s, cnt) ((cdm_f64){0})
DEFINE_LANE_IO(float, f32, int32_t, 0, 0, 0, 0)
DEFINE_LANE_IO(double, f64, int64_t, 0, 0, 0, 0)
#endif
#ifndef CDL_CLOAD_f32
#define CDL_CLOAD_f32(s, cnt) ((cdm_f32){0})
#define CDL_CLOAD_f64(s, cnt) ((cdm_f64){0})
#endif
/* Two vectors' even elements, side by side, with GCC's generic shuffle; other compilers lay the rows out
 * element by element. */
#if defined(__GNUC__) && !defined(__clang__)
#define CDL_SHUFFLE 1
#define CDL_EVEN(lo, hi, idx) __builtin_shuffle((lo), (hi), (idx))
#else
#define CDL_SHUFFLE 0
#define CDL_EVEN(lo, hi, idx) (lo)
#endif
/* n clamped to [0, L]: how many lanes of a vector starting n columns before a row's end lie in the row */
static inline int64_t cdl_clamp(int64_t n, int64_t L) { return n < 0 ? 0 : (n < L ? n : L); }
#define CDL_QB 9  /* patch elements summed at once in the backward (accumulators in registers) */
#define CDL_BFB 1  /* filters the backward takes at once (2 spilled the 18 sums: 11% slower on a Zen 4) */
#define CDL_SAMPLE_BYTES (128 * 1024)  /* largest input layout built once per sample (else per pooled row) */
#define CDL_RC 32  /* pooled rows whose inputs the backward lays out together */
#define DEFINE_CONV_POOL_LANES(T, SUF, IT)                                                              \
enum { LANES_##SUF = CDL_BYTES / sizeof(T) };                                                                 \
static inline cdl_##SUF cdl_load_##SUF(const T *p) { cdl_##SUF v; memcpy(&v, p, sizeof v); return v; } \
/* the sum of a vector's lanes, pairwise */                                                            \
static inline T cdl_sum_##SUF(cdl_##SUF v)                                                             \
{                                                                                                      \
    T t[LANES_##SUF];                                                                                  \
    memcpy(t, &v, sizeof t);                                                                           \
    for (int w = LANES_##SUF / 2; w > 0; w /= 2)                                                       \
        for (int e = 0; e < w; e++) t[e] += t[e + w];                                                  \
    return t[0];                                                                                       \
}                                                                                                      \
typedef struct {                                                                                       \
    int64_t N, F, C, kh, kw, csh, csw, Po, Qo, ph, pw, sh, sw;                                         \
    int64_t R, S, Z, M, K, P;                                                                          \
} cdl_geom_##SUF;                                                                                      \
static void cdl_geom_init_##SUF(cdl_geom_##SUF *g)                                                     \
{                                                                                                      \
    const int64_t L = LANES_##SUF;                                                                     \
    g->R = (g->ph - 1) * g->csh + g->kh;                                                               \
    g->S = g->sw * g->csw;                                                                             \
    g->Z = ((g->pw - 1) * g->csw + g->kw - 1) / g->S + 1;                                              \
    g->M = (g->Qo + L - 1) / L * L;                                                                    \
    g->K = g->C * g->kh * g->kw;                                                                       \
    g->P = g->ph * g->pw;                                                                              \
}                                                                                                      \
/* Whether a whole sample's rows are laid out at once (at most CDL_SAMPLE_BYTES: each input row then serves \
   every pooled row that reads it); *gs is g with all those rows, *rowstep the buffer offset of one pooled  \
   row down in that layout. */                                                                         \
static int cdl_sample_layout_##SUF(const cdl_geom_##SUF *g, cdl_geom_##SUF *gs, int64_t *rowstep)      \
{                                                                                                      \
    *gs = *g;                                                                                          \
    gs->R = (g->Po - 1) * g->sh * g->csh + g->R;                                                       \
    *rowstep = g->sh * g->csh * g->S * g->Z * g->M;                                                    \
    return g->C * gs->R * g->S * g->Z * g->M * (int64_t)sizeof(T) <= CDL_SAMPLE_BYTES;                 \
}                                                                                                      \
/* buffer offsets of (window offset p, patch element q) at lane 0 of b0 = 0 */                         \
static int64_t *cdl_offsets_##SUF(const cdl_geom_##SUF *g)                                             \
{                                                                                                      \
    int64_t *off = (int64_t *)malloc(sizeof(int64_t) * (size_t)(g->P * g->K));                        \
    if (off == NULL) return NULL;                                                                      \
    for (int64_t k = 0; k < g->ph; k++)                                                                \
        for (int64_t l = 0; l < g->pw; l++)                                                            \
            for (int64_t c = 0; c < g->C; c++)                                                         \
                for (int64_t i = 0; i < g->kh; i++)                                                    \
                    for (int64_t j = 0; j < g->kw; j++) {                                              \
                        const int64_t t = l * g->csw + j, r = k * g->csh + i;                          \
                        off[(k * g->pw + l) * g->K + (c * g->kh + i) * g->kw + j] =                    \
                            (((c * g->R + r) * g->S + t % g->S) * g->Z + t / g->S) * g->M;             \
                    }                                                                                  \
    return off;                                                                                        \
}                                                                                                      \
/* the R input rows of pooled row a of sample n, by phase and shift: buf[c][r][e][z][m] */            \
static void cdl_rows_##SUF(const cdl_geom_##SUF *g, const T *x, int64_t xn, int64_t xc, int64_t xh,    \
                           int64_t xw, int64_t H, int64_t W, int64_t n, int64_t a, T *buf)             \
{                                                                                                      \
    const int64_t top = a * g->sh * g->csh, S = g->S, M = g->M, L = LANES_##SUF;                       \
    cdm_##SUF even;  /* lane l takes element 2l of two vectors side by side */                         \
    for (int l = 0; l < LANES_##SUF; l++) even[l] = (IT)(2 * l);                                       \
    (void)even;                                                                                        \
    for (int64_t c = 0; c < g->C; c++)                                                                 \
        for (int64_t r = 0; r < g->R; r++) {                                                           \
            const int64_t row = top + r;                                                               \
            const T *src = x + n * xn + c * xc + row * xh;                                             \
            for (int64_t e = 0; e < S; e++)                                                            \
                for (int64_t z = 0; z < g->Z; z++) {                                                   \
                    T *dst = buf + (((c * g->R + r) * S + e) * g->Z + z) * M;                          \
                    /* lane m reads column (m + z) * S + e: the lanes inside the row first */          \
                    const int64_t first = z * S + e;                                                   \
                    if (CDL_SHUFFLE && S == 2 && xw == 1 && row < H) {                                 \
                        /* the even elements of 2L columns in a row, from two masked loads */          \
                        for (int64_t b = 0; b < M; b += L) {                                           \
                            const int64_t c0 = first + 2 * b;                                          \
                            const cdl_##SUF lo = cdl_get_##SUF(src + c0, 1, cdl_clamp(W - c0, L));     \
                            const cdl_##SUF hi = cdl_get_##SUF(src + c0 + L, 1, cdl_clamp(W - c0 - L, L));\
                            const cdl_##SUF v = CDL_EVEN(lo, hi, even);                                \
                            memcpy(dst + b, &v, sizeof v);                                             \
                        }                                                                              \
                        continue;                                                                      \
                    }                                                                                  \
                    int64_t inside = row < H && first < W ? (W - first + S - 1) / S : 0, m = 0;        \
                    if (inside > M) inside = M;                                                        \
                    for (; m < inside; m++) dst[m] = src[(first + m * S) * xw];                        \
                    for (; m < M; m++) dst[m] = (T)0;                                                  \
                }                                                                                      \
        }                                                                                              \
}                                                                                                      \
int cd_conv_pool_fwd_##SUF(const T *x, const T *w, const T *bias, T *out, uint8_t *code,         \
                                 int64_t N, int64_t F, int64_t C, int64_t kh, int64_t kw, int64_t xn,  \
                                 int64_t xc, int64_t xh, int64_t xw, int64_t H, int64_t W,            \
                                 int64_t csh, int64_t csw, int64_t Po, int64_t Qo, int64_t ph,        \
                                 int64_t pw, int64_t sh, int64_t sw, int64_t on, int64_t oc,          \
                                 int64_t oh, int64_t ow, int relu, int threads)                        \
{                                                                                                      \
    const int64_t L = LANES_##SUF;                                                                     \
    cdl_geom_##SUF g = {N, F, C, kh, kw, csh, csw, Po, Qo, ph, pw, sh, sw, 0, 0, 0, 0, 0, 0};          \
    cdl_geom_init_##SUF(&g);                                                                           \
    cdl_geom_##SUF gs;  /* a whole sample's rows, or (not whole) the R rows of each pooled row apart */ \
    int64_t rowstep;                                                                                   \
    const int whole = cdl_sample_layout_##SUF(&g, &gs, &rowstep);                                      \
    int64_t *off = cdl_offsets_##SUF(whole ? &gs : &g);                                                \
    if (off == NULL) return 1;                                                                         \
    const int64_t K = g.K, P = g.P, bufsize = C * (whole ? gs.R : g.R) * g.S * g.Z * g.M;              \
    /* the weights and biases by blocks of CDL_FB filters, zero past the last filter */                \
    const int64_t Fp = (F + CDL_FB - 1) / CDL_FB * CDL_FB;                                             \
    T *wblk = (T *)calloc((size_t)(Fp * K + Fp), sizeof(T)), *zb = wblk + Fp * K;                      \
    if (wblk == NULL) { free(off); return 1; }                                                         \
    for (int64_t f = 0; f < F; f++) {                                                                  \
        for (int64_t q = 0; q < K; q++)                                                                \
            wblk[(f / CDL_FB * K + q) * CDL_FB + f % CDL_FB] = w[f * K + q];                           \
        zb[f] = bias != NULL ? bias[f] : (T)0;                                                         \
    }                                                                                                  \
    int failed = 0;                                                                                    \
    _Pragma("omp parallel num_threads(threads)")                                                       \
    {                                                                                                  \
        T *buf = (T *)aligned_alloc(CDL_BYTES, sizeof(T) * (size_t)bufsize);                           \
        if (buf == NULL) {                                                                             \
            _Pragma("omp atomic write")                                                                \
            failed = 1;                                                                                \
        }                                                                                              \
        int64_t laid = -1;  /* the sample whose rows buf holds (whole) */                              \
        int64_t r0, r1, fa, fz;  /* this thread's pooled rows and filters */                           \
        cd_filter_run(F, CDL_FB, N * Po, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1, &fa, &fz); \
        for (int64_t r = r0; r < r1 && buf != NULL && fa < fz; r++) {                                  \
            const int64_t n = r / Po, a = r % Po;                                                      \
            if (!whole) cdl_rows_##SUF(&g, x, xn, xc, xh, xw, H, W, n, a, buf);                        \
            else if (laid != n) { cdl_rows_##SUF(&gs, x, xn, xc, xh, xw, H, W, n, 0, buf); laid = n; }  \
            const T *rowbuf = whole ? buf + a * rowstep : buf;                                         \
            for (int64_t b0 = 0; b0 < Qo; b0 += L) {                                                   \
                const int64_t cnt = Qo - b0 < L ? Qo - b0 : L;                                         \
                const T *base = rowbuf + b0;                                                           \
                for (int64_t f0 = fa; f0 < fz; f0 += CDL_FB) {                                         \
                    const T *wb = wblk + f0 * K;  /* [q][filter of the block] */                       \
                    cdl_##SUF best[CDL_FB], s[CDL_FB];                                                 \
                    cdm_##SUF arg[CDL_FB];                                                             \
                    for (int u = 0; u < CDL_FB; u++) { best[u] = (cdl_##SUF){0}; arg[u] = (cdm_##SUF){0}; } \
                    for (int64_t p = 0; p < P; p++) {                                                  \
                        const int64_t *o = off + p * K;                                                \
                        for (int u = 0; u < CDL_FB; u++) s[u] = zb[f0 + u] - (cdl_##SUF){0};           \
                        for (int64_t q = 0; q < K; q++) {                                              \
                            const cdl_##SUF v = cdl_load_##SUF(base + o[q]);                           \
                            for (int u = 0; u < CDL_FB; u++) s[u] += wb[q * CDL_FB + u] * v;           \
                        }                                                                              \
                        for (int u = 0; u < CDL_FB; u++) {                                             \
                            if (p == 0) { best[u] = s[u]; continue; }                                  \
                            const cdm_##SUF m = (cdm_##SUF)((s[u] > best[u]) | (s[u] != s[u]));        \
                            best[u] = (cdl_##SUF)(((cdm_##SUF)s[u] & m) | ((cdm_##SUF)best[u] & ~m));  \
                            arg[u] = (m & (IT)p) | (~m & arg[u]);                                      \
                        }                                                                              \
                    }                                                                                  \
                    for (int u = 0; u < CDL_FB && f0 + u < F; u++) {                                  \
                        const int64_t f = f0 + u;                                                      \
                        if (relu) { /* max(v, 0), a NaN kept */                                        \
                            const cdm_##SUF keep = (cdm_##SUF)((best[u] > 0) | (best[u] != best[u]));  \
                            best[u] = (cdl_##SUF)((cdm_##SUF)best[u] & keep);                          \
                        }                                                                              \
                        cdl_put_##SUF(out + n * on + f * oc + a * oh + b0 * ow, ow, best[u], cnt);    \
                        cdl_put_code_##SUF(code + ((n * F + f) * Po + a) * Qo + b0, arg[u], cnt);      \
                    }                                                                                  \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
        free(buf);                                                                                     \
    }                                                                                                  \
    free(off);                                                                                         \
    free(wblk);                                                                                        \
    return failed;                                                                                     \
}                                                                                                      \
int cd_pool_conv_bwd_##SUF(const T *dy, const uint8_t *code, const T *y, const T *x, T *dw, T *db,  \
                                 int64_t N, int64_t F, int64_t C, int64_t kh, int64_t kw, int64_t xn,  \
                                 int64_t xc, int64_t xh, int64_t xw, int64_t H, int64_t W,            \
                                 int64_t csh, int64_t csw, int64_t Po, int64_t Qo, int64_t ph,        \
                                 int64_t pw, int64_t sh, int64_t sw, int64_t dn, int64_t dc,          \
                                 int64_t dh, int64_t dwd, int threads)                                 \
{                                                                                                      \
    const int64_t L = LANES_##SUF;                                                                     \
    cdl_geom_##SUF g = {N, F, C, kh, kw, csh, csw, Po, Qo, ph, pw, sh, sw, 0, 0, 0, 0, 0, 0};          \
    cdl_geom_init_##SUF(&g);                                                                           \
    cdl_geom_##SUF gs;  /* the input rows laid out as in the forward */                                \
    int64_t rowstep;                                                                                   \
    const int whole = cdl_sample_layout_##SUF(&g, &gs, &rowstep);                                      \
    const int64_t K = g.K, P = g.P, bufsize = C * (whole ? gs.R : g.R) * g.S * g.Z * g.M;              \
    /* patch elements in blocks of CDL_QB, the last block padded with element 0 (computed, not kept) */ \
    const int64_t Kp = (K + CDL_QB - 1) / CDL_QB * CDL_QB, acc = F * (K + 1);                          \
    int64_t *off0 = cdl_offsets_##SUF(whole ? &gs : &g), *off = (int64_t *)malloc(sizeof(int64_t) * (size_t)(P * Kp)); \
    int nt = threads > 0 ? threads : 1;                                                                \
    T *sums = (T *)calloc((size_t)(nt * acc), sizeof(T));  /* per thread: [f][q], then [f] (bias) */  \
    int failed = off0 == NULL || off == NULL || sums == NULL, used = 1;                                \
    if (!failed)                                                                                       \
        for (int64_t p = 0; p < P; p++)                                                                \
            for (int64_t q = 0; q < Kp; q++) off[p * Kp + q] = off0[p * K + (q < K ? q : 0)];          \
    if (!failed) {                                                                                     \
    _Pragma("omp parallel num_threads(nt)")                                                            \
    {                                                                                                  \
        const int t = omp_get_thread_num();                                                            \
        _Pragma("omp single")                                                                          \
        used = omp_get_num_threads();                                                                  \
        T *mine = sums + (int64_t)t * acc;                                                             \
        const int64_t per = CDL_RC / Po > 0 ? CDL_RC / Po : 1;  /* samples per chunk */                 \
        T *buf = (T *)aligned_alloc(CDL_BYTES, sizeof(T) * (size_t)(bufsize * (whole ? per : per * Po))); \
        if (buf == NULL) {                                                                             \
            _Pragma("omp atomic write")                                                                \
            failed = 1;                                                                                \
        }                                                                                              \
        /* whole samples per chunk, so that dy and the codes are read in memory order */               \
        int64_t n0, n1, fa, fz;  /* this thread's samples and filters */                               \
        cd_filter_run(F, CDL_BFB, N, t, omp_get_num_threads(), &n0, &n1, &fa, &fz);                    \
        const int64_t r0 = n0 * Po, r1 = n1 * Po, span = (CDL_RC / Po > 0 ? CDL_RC / Po : 1) * Po;     \
        for (int64_t c0 = r0; c0 < r1 && buf != NULL && fa < fz; c0 += span) {                        \
            const int64_t c1 = c0 + span < r1 ? c0 + span : r1;                                        \
            if (whole)                                                                                 \
                for (int64_t n = c0 / Po; n < c1 / Po; n++)                                            \
                    cdl_rows_##SUF(&gs, x, xn, xc, xh, xw, H, W, n, 0, buf + (n - c0 / Po) * bufsize); \
            else                                                                                       \
                for (int64_t r = c0; r < c1; r++)                                                      \
                    cdl_rows_##SUF(&g, x, xn, xc, xh, xw, H, W, r / Po, r % Po, buf + (r - c0) * bufsize); \
            for (int64_t f0 = fa; f0 < fz; f0 += CDL_BFB) {                                            \
                cdl_##SUF bsum[CDL_BFB];                                                               \
                for (int v = 0; v < CDL_BFB; v++) bsum[v] = (cdl_##SUF){0};                            \
                for (int64_t q0 = 0; q0 < Kp; q0 += CDL_QB) {                                          \
                    cdl_##SUF s[CDL_BFB][CDL_QB];                                                      \
                    for (int v = 0; v < CDL_BFB; v++)                                                  \
                        for (int u = 0; u < CDL_QB; u++) s[v][u] = (cdl_##SUF){0};                     \
                    for (int64_t r = c0; r < c1; r++) {                                                \
                        const int64_t n = r / Po, a = r % Po;                                          \
                        const T *rowbuf = whole ? buf + (n - c0 / Po) * bufsize + a * rowstep          \
                                                : buf + (r - c0) * bufsize;                            \
                        for (int64_t b0 = 0; b0 < Qo; b0 += L) {                                       \
                            const int64_t cnt = Qo - b0 < L ? Qo - b0 : L;                             \
                            cdl_##SUF gv[CDL_BFB];                                                     \
                            cdm_##SUF cv[CDL_BFB];                                                     \
                            for (int v = 0; v < CDL_BFB; v++) {                                        \
                                const int64_t f = f0 + v < F ? f0 + v : f0;                            \
                                gv[v] = cdl_get_##SUF(dy + n * dn + f * dc + a * dh + b0 * dwd, dwd, cnt); \
                                if (y != NULL) { /* through the ReLU: times [y > 0], as its backward */ \
                                    const cdl_##SUF yv = cdl_get_##SUF(y + ((n * F + f) * Po + a) * Qo + b0, 1, cnt); \
                                    const cdl_##SUF one = (cdl_##SUF){0} + (T)1;                       \
                                    gv[v] *= (cdl_##SUF)((cdm_##SUF)one & (cdm_##SUF)(yv > 0));        \
                                }                                                                      \
                                if (f0 + v >= F) gv[v] = (cdl_##SUF){0};  /* past the last filter */   \
                                cv[v] = cdl_get_code_##SUF(code + ((n * F + f) * Po + a) * Qo + b0, cnt); \
                                if (q0 == 0) bsum[v] += gv[v];                                         \
                            }                                                                          \
                            const T *base = rowbuf + b0;                                               \
                            for (int64_t p = 0; p < P; p++) {                                          \
                                cdl_##SUF gq[CDL_BFB];                                                 \
                                for (int v = 0; v < CDL_BFB; v++)                                      \
                                    gq[v] = (cdl_##SUF)((cdm_##SUF)gv[v] & (cdm_##SUF)(cv[v] == (IT)p)); \
                                const int64_t *o = off + p * Kp + q0;                                  \
                                for (int u = 0; u < CDL_QB; u++) {                                     \
                                    const cdl_##SUF in = cdl_load_##SUF(base + o[u]);                  \
                                    for (int v = 0; v < CDL_BFB; v++) s[v][u] += gq[v] * in;           \
                                }                                                                      \
                            }                                                                          \
                        }                                                                              \
                    }                                                                                  \
                    for (int v = 0; v < CDL_BFB && f0 + v < F; v++)                                    \
                        for (int u = 0; u < CDL_QB && q0 + u < K; u++)                                 \
                            mine[(f0 + v) * K + q0 + u] += cdl_sum_##SUF(s[v][u]);                     \
                }                                                                                      \
                for (int v = 0; v < CDL_BFB && f0 + v < F; v++) mine[F * K + f0 + v] += cdl_sum_##SUF(bsum[v]); \
            }                                                                                          \
        }                                                                                              \
        free(buf);                                                                                     \
    }                                                                                                  \
    }                                                                                                  \
    if (!failed)                                                                                       \
        for (int64_t i = 0; i < acc; i++) {                                                            \
            T v = 0;                                                                                   \
            for (int u = 0; u < used; u++) v += sums[(int64_t)u * acc + i];                            \
            if (i < F * K) dw[i] = v;                                                                  \
            else if (db != NULL) db[i - F * K] = v;                                                    \
        }                                                                                              \
    free(sums);                                                                                        \
    free(off);                                                                                         \
    free(off0);                                                                                        \
    return failed;                                                                                     \
}

DEFINE_CONV_POOL_LANES(float, f32, int32_t)
DEFINE_CONV_POOL_LANES(double, f64, int64_t)

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

/* The backward of a Dense layer with the Adam step on its weight done inside it (the training step uses it
 * when nobody reads the weight's gradient: no hook, clipping or gradient reduction in between).
 *
 * Thread t takes the same rows [k0, k1) of wt as the kernels above and walks them in blocks of `rows` rows.
 * For each block it computes, in this order, dx[:, block] = dy wt[block]^T with the weight as it was, the
 * block's weight gradient x[:, block]^T dy into a small per-thread scratch, and the Adam (or AdamW) update of
 * wt, mt, vt (and vmaxt with AMSGrad) on that block. The gradient never leaves the cache, and the weight and
 * moments are read from memory once a step instead of three times (backward, then the separate step).
 *
 * The update is the formula of torch.optim.Adam, in the order torch's fused CPU kernel computes it:
 *   mode 1 (L2):    g += weight_decay * w          mode 2 (decoupled): w -= lr * weight_decay * w
 *   m = m + (1 - beta1) (g - m);   v = beta2 v + (1 - beta2) g^2;   (AMSGrad: vmax = max(vmax, v), read vmax)
 *   w -= (lr / bias_correction1) m / (sqrt(v) / sqrt(bias_correction2) + eps)
 * hyper holds lr, beta1, beta2, eps, weight_decay, mode, bias_correction1, sqrt(bias_correction2) as doubles.
 * dx may be NULL (no input gradient wanted); scratch holds threads * rows * O elements. */
#define DEFINE_DENSE_ADAM(T, SUF)                                                                       \
static void cd_adam_rows_##SUF(T *restrict p, T *restrict m, T *restrict v, T *restrict vmax,           \
                               const T *restrict g, int64_t n, const double *h)                        \
{                                                                                                      \
    const T lr = (T)h[0], c1 = (T)(1.0 - h[1]), b2 = (T)h[2], c2 = (T)(1.0 - h[2]), eps = (T)h[3];     \
    const T wd = (T)h[4], lrwd = (T)(h[0] * h[4]), step = (T)(h[0] / h[6]), bc2s = (T)h[7];            \
    const int mode = (int)h[5];                                                                        \
    (void)lr;                                                                                          \
    for (int64_t i = 0; i < n; i++) {                                                                  \
        T gi = g[i], pi = p[i];                                                                        \
        if (mode == 1) gi += pi * wd;                                                                  \
        else if (mode == 2) pi = pi - lrwd * pi;                                                       \
        const T mi = m[i] + c1 * (gi - m[i]);                                                          \
        const T vi = v[i] * b2 + c2 * gi * gi;                                                         \
        m[i] = mi;                                                                                     \
        v[i] = vi;                                                                                     \
        T r = vi;                                                                                      \
        if (vmax != NULL) {                                                                            \
            r = (vi > vmax[i] || vi != vi) ? vi : vmax[i];                                             \
            vmax[i] = r;                                                                               \
        }                                                                                              \
        const T denom = cd_sqrt_##SUF(r) / bc2s + eps;                                                 \
        p[i] = pi - step * mi / denom;                                                                 \
    }                                                                                                  \
}                                                                                                      \
/* the same update on one contiguous parameter of n elements (the small ones a step has besides its Dense \
 * weights: one thread, no parallel region to wake) */                                                 \
void cd_adam_##SUF(T *p, T *m, T *v, T *vmax, const T *g, int64_t n, const double *hyper)             \
{                                                                                                      \
    cd_adam_rows_##SUF(p, m, v, vmax, g, n, hyper);                                                    \
}                                                                                                      \
void cd_dense_bwd_adam_##SUF(cd_gemm_fn gemm, const T *x, const T *dy, T *wt, T *mt, T *vt, T *vmaxt,  \
                             T *dx, T *scratch, int64_t N, int64_t K, int64_t O, int64_t ldx,          \
                             int64_t ldy, int dyt, int64_t rows, const double *hyper, int threads)     \
{                                                                                                      \
    _Pragma("omp parallel num_threads(threads)")                                                       \
    {                                                                                                  \
        const int t = omp_get_thread_num();                                                            \
        int64_t k0, k1;                                                                                \
        cd_split(K, t, omp_get_num_threads(), &k0, &k1);                                               \
        T *g = scratch + (int64_t)t * rows * O;                                                        \
        const T one = 1, zero = 0;                                                                     \
        for (int64_t kb = k0; kb < k1; kb += rows) {                                                   \
            const int64_t kk = k1 - kb < rows ? k1 - kb : rows;                                        \
            if (dx != NULL)                                                                            \
                gemm("T", dyt ? "T" : "N", &kk, &N, &O, &one, wt + kb * O, &O, dy, &ldy, &zero,        \
                     dx + kb, &K, 1, 1);                                                               \
            gemm(dyt ? "T" : "N", "T", &O, &kk, &N, &one, dy, &ldy, x + kb, &ldx, &zero, g, &O, 1, 1); \
            cd_adam_rows_##SUF(wt + kb * O, mt + kb * O, vt + kb * O,                                  \
                               vmaxt != NULL ? vmaxt + kb * O : NULL, g, kk * O, hyper);               \
        }                                                                                              \
    }                                                                                                  \
}

static inline float cd_sqrt_f32(float v) { return __builtin_sqrtf(v); }
static inline double cd_sqrt_f64(double v) { return __builtin_sqrt(v); }
DEFINE_DENSE_ADAM(float, f32)
DEFINE_DENSE_ADAM(double, f64)

/* Softmax cross-entropy on integer labels, value and gradient in one pass over the logits (N, K), rows of
 * stride ld, as losses.SoftmaxCrossEntropy computes them with torch operations:
 *   m_n = max_j z_nj,  r_n = log sum_j exp(z_nj - m_n);   logp_nj = (z_nj - m_n) - r_n
 *   loss  = -(1/D) sum_n [(1 - s) logp_n,y_n + (s/K) sum_j logp_nj]
 *   grad_nj = (exp(logp_nj) - s/K - (1 - s) [j = y_n]) / D
 * with D the mean's denominator and s the label smoothing (subtracting m_n first keeps the digits of a large
 * logit, as torch's log_softmax does). The loss is summed in double. One thread: a batch's
 * logits are a few kilobytes. Returns 0, or 1 + the first row whose label is outside [0, K) (nothing else is
 * then to be trusted). */
#define DEFINE_XENT(T, SUF, EXP, LOG)                                                                   \
int cd_softmax_xent_##SUF(const T *z, int64_t ld, const int64_t *labels, int64_t N, int64_t K, double denom,  \
                          double smoothing, T *grad, T *loss)                                           \
{                                                                                                      \
    double total = 0;                                                                                  \
    const T inv = (T)(1.0 / denom), off = (T)(smoothing / (double)K), hit = (T)(1.0 - smoothing);      \
    for (int64_t n = 0; n < N; n++) {                                                                  \
        const T *row = z + n * ld;                                                                     \
        T *g = grad + n * K;                                                                           \
        const int64_t y = labels[n];                                                                   \
        if (y < 0 || y >= K) return (int)(n < 0x7ffffffe ? n + 1 : 0x7fffffff);                        \
        T m = row[0];                                                                                  \
        for (int64_t j = 1; j < K; j++) m = (row[j] > m || row[j] != row[j]) ? row[j] : m;             \
        T sum = 0;                                                                                     \
        for (int64_t j = 0; j < K; j++) sum += EXP(row[j] - m);                                        \
        const T r = LOG(sum);                                                                          \
        double row_logp = 0;                                                                           \
        for (int64_t j = 0; j < K; j++) {                                                              \
            const T lp = (row[j] - m) - r;                                                             \
            row_logp += lp;                                                                            \
            g[j] = (EXP(lp) - off) * inv;                                                              \
        }                                                                                              \
        g[y] -= hit * inv;                                                                             \
        total += (double)hit * (double)((row[y] - m) - r) + (smoothing / (double)K) * row_logp;        \
    }                                                                                                  \
    *loss = (T)(-total / denom);                                                                       \
    return 0;                                                                                          \
}

DEFINE_XENT(float, f32, expf, logf)
DEFINE_XENT(double, f64, exp, log)

/* The health check's figures of a conv's output z and of the ReLU after it, r = max(z, 0) (a NaN kept), in
 * one pass that writes neither map (the probe otherwise runs the two layers and reads back both maps, 11 MB
 * each for the tutorial's CNN at batch 128):
 *   z[n, f, i, j] = bias[f] + sum over (c, k, l) of w[f, c, k, l] * x[n, c, i*sh + k, j*sw + l]
 * with x already padded (strides xn, xc, xh, xw) and w (F, C*kh*kw); no groups, no dilation.
 *   out[0..3] = sum of z, of z^2, of r, of r^2 (each row summed in T, the rows in double);
 *   umax (F, Ho, Wo), unless NULL: the largest r over the batch at each position (a NaN kept).
 * Threads take runs of filters; each sums a sample's map by column in T, the maps in double, and the
 * threads' sums are added in thread order. Returns 0, or 1 when out of memory (nothing usable written). */
#define DEFINE_CONV_STATS(T, SUF)                                                                       \
int cd_conv_stats_##SUF(const T *x, const T *w, const T *bias, int64_t N, int64_t F, int64_t C,         \
                        int64_t kh, int64_t kw, int64_t xn, int64_t xc, int64_t xh, int64_t xw,         \
                        int64_t Ho, int64_t Wo, int64_t sh, int64_t sw, double *out, T *umax,           \
                        int threads)                                                                    \
{                                                                                                      \
    const int nt = threads > 0 ? threads : 1;                                                          \
    /* a stride-1 conv over rows of unit stride: each tap's products for the whole map in one run, rows  \
       xh apart (the xh - Wo elements after each row are never read) */                                \
    const int flat = sh == 1 && sw == 1 && xw == 1;                                                    \
    const int64_t ld = flat ? xh : Wo, len = flat ? (Ho - 1) * xh + Wo : Wo;                           \
    double *part = (double *)calloc((size_t)(4 * nt), sizeof(double));                                 \
    if (part == NULL) return 1;                                                                        \
    int failed = 0, used = 1;                                                                          \
    _Pragma("omp parallel num_threads(nt)")                                                            \
    {                                                                                                  \
        const int t = omp_get_thread_num();                                                            \
        _Pragma("omp single")                                                                          \
        used = omp_get_num_threads();                                                                  \
        int64_t f0, f1;                                                                                \
        cd_split(F, t, omp_get_num_threads(), &f0, &f1);                                               \
        T *z = (T *)malloc(sizeof(T) * (size_t)(len > 0 ? len : 1));                                   \
        if (z == NULL) {                                                                               \
            _Pragma("omp atomic write")                                                                \
            failed = 1;                                                                                \
        }                                                                                              \
        double s1 = 0, s2 = 0, q1 = 0, q2 = 0;                                                         \
        for (int64_t f = f0; f < f1 && z != NULL && Ho > 0 && Wo > 0; f++) {                          \
            const T *wf = w + f * C * kh * kw, b = bias != NULL ? bias[f] : (T)0;                      \
            for (int64_t n = 0; n < N; n++)                                                            \
                for (int64_t i = 0; i < (flat ? 1 : Ho); i++) {  /* the whole map, or row i */         \
                    T *restrict zz = z;                                                                \
                    for (int64_t p = 0; p < len; p++) zz[p] = b;                                       \
                    for (int64_t c = 0; c < C; c++)                                                    \
                        for (int64_t k = 0; k < kh; k++)                                               \
                            for (int64_t l = 0; l < kw; l++) {                                         \
                                const T wv = wf[(c * kh + k) * kw + l];                                \
                                const T *restrict src = x + n * xn + c * xc + (i * sh + k) * xh + l * xw; \
                                if (flat)                                                              \
                                    for (int64_t p = 0; p < len; p++) zz[p] += wv * src[p];            \
                                else                                                                   \
                                    for (int64_t j = 0; j < Wo; j++) zz[j] += wv * src[j * sw * xw];   \
                            }                                                                          \
                    /* the figures, L columns at a time: sums by column over this pass's rows in T (a   \
                       sample's map at most), then added to the thread's doubles */                     \
                    for (int64_t j0 = 0; j0 < Wo; j0 += LANES_##SUF) {                                 \
                        const int64_t cnt = Wo - j0 < LANES_##SUF ? Wo - j0 : LANES_##SUF;             \
                        cdl_##SUF a1 = {0}, a2 = {0}, r1 = {0}, r2 = {0};                              \
                        for (int64_t r0 = 0; r0 < (flat ? Ho : 1); r0++) {                             \
                            const int64_t row = flat ? r0 : i;                                         \
                            const cdl_##SUF v = cdl_get_##SUF(z + (flat ? r0 * ld : 0) + j0, 1, cnt);  \
                            const cdm_##SUF keep = (cdm_##SUF)((v > 0) | (v != v));  /* the ReLU's */   \
                            const cdl_##SUF r = (cdl_##SUF)((cdm_##SUF)v & keep);                      \
                            a1 += v; a2 += v * v; r1 += r; r2 += r * r;                                \
                            if (umax == NULL) continue;                                                \
                            T *um = umax + (f * Ho + row) * Wo + j0;                                   \
                            if (n == 0) { cdl_put_##SUF(um, 1, r, cnt); continue; }                    \
                            const cdl_##SUF m = cdl_get_##SUF(um, 1, cnt);                             \
                            /* the larger, a NaN kept (either one's) */                                \
                            const cdm_##SUF take = (cdm_##SUF)(((r > m) | (r != r)) & (m == m));       \
                            cdl_put_##SUF(um, 1, (cdl_##SUF)(((cdm_##SUF)r & take) | ((cdm_##SUF)m & ~take)), cnt); \
                        }                                                                              \
                        s1 += (double)cdl_sum_##SUF(a1); s2 += (double)cdl_sum_##SUF(a2);              \
                        q1 += (double)cdl_sum_##SUF(r1); q2 += (double)cdl_sum_##SUF(r2);              \
                    }                                                                                  \
                }                                                                                      \
        }                                                                                              \
        part[4 * t] = s1; part[4 * t + 1] = s2; part[4 * t + 2] = q1; part[4 * t + 3] = q2;            \
        free(z);                                                                                       \
    }                                                                                                  \
    for (int e = 0; e < 4; e++) {                                                                      \
        double v = 0;                                                                                  \
        for (int u = 0; u < used; u++) v += part[4 * u + e];                                           \
        out[e] = v;                                                                                    \
    }                                                                                                  \
    free(part);                                                                                        \
    return failed;                                                                                     \
}

DEFINE_CONV_STATS(float, f32)
DEFINE_CONV_STATS(double, f64)

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
