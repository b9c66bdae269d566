/* Fused low-rank weight gradient + Adam for one nn.Linear weight W [R x C], and a one-pass product for
 * small batches.
 *
 * For a linear layer y = x W^T + b the weight gradient of a minibatch is a product of two thin factors,
 * dL/dW = Gy^T X (Gy = dL/dy [K x R], X = x [K x C], K = rows of the minibatch). PyTorch writes that
 * R x C gradient to memory, reads it back for the norm and again in Adam. Here it is computed tile by tile
 * and fed straight into Adam while the tile is in registers: one pass over W, exp_avg and exp_avg_sq.
 *
 *   g[r, c]  = (sum_k Gt[r, k] X[k, c]) / grad_scale           (Gt = Gy^T, [R x K], row-major)
 *   m        = lerp(m, g, 1 - beta1)                         (m + (1 - beta1) (g - m), one FMA)
 *   v        = v * beta2 + g * (g * (1 - beta2))              (one FMA)
 *   W        = W - step_size * m / (sqrt(v) / sqrt(bias_correction2) + eps)
 *
 * The Adam lines follow torch 2.13's fused CPU Adam operation by operation in float32 (lerp and addcmul as
 * single FMAs, everything else unfused: this file is compiled with -ffp-contract=off); for the same gradient
 * exp_avg, exp_avg_sq and the weights come out bit-identical (tests/test_kernels.py). Rows are split statically
 * over OpenMP threads (columns in L2-sized panels, the next tile prefetched while the current one computes); every
 * output element is computed by one thread in a fixed order: results do not depend on the thread count.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && !defined(CELLRL_GENERIC)
#include <immintrin.h>
#define CELLRL_AVX512 1
#endif

typedef struct {
    float beta1, beta2, omb1, omb2, step_size, bc2_sqrt, eps, grad_scale;
    int use_scale;
} adam_params;

int cellrl_kernel_isa(void) {
#ifdef CELLRL_AVX512
    return 512;
#else
    return 0;
#endif
}

#ifdef CELLRL_AVX512
#define RB 4  /* rows per tile */
#define VB 4  /* 16-float vectors per tile row: 64 columns */

static inline __mmask16 tail_mask(ptrdiff_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (left > 0 ? (__mmask16)((1u << left) - 1u) : (__mmask16)0);
}

static inline __m512 adam_vec(float *w, float *m, float *v, __m512 g, __mmask16 mk, const adam_params *a) {
    if (a->use_scale) g = _mm512_div_ps(g, _mm512_set1_ps(a->grad_scale));
    __m512 p = _mm512_maskz_loadu_ps(mk, w);
    __m512 m0 = _mm512_maskz_loadu_ps(mk, m);
    __m512 d = _mm512_sub_ps(g, m0);                       /* exp_avg.lerp_(grad, 1 - beta1) */
    __m512 mm = a->omb1 < 0.5f ? _mm512_fmadd_ps(_mm512_set1_ps(a->omb1), d, m0)
                               : _mm512_fnmadd_ps(d, _mm512_set1_ps(a->beta1), g);
    __m512 vv = _mm512_fmadd_ps(g, _mm512_mul_ps(g, _mm512_set1_ps(a->omb2)),   /* mul_(b2).addcmul_(g, g, 1-b2) */
                                _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, v), _mm512_set1_ps(a->beta2)));
    _mm512_mask_storeu_ps(m, mk, mm);
    _mm512_mask_storeu_ps(v, mk, vv);
    __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vv), _mm512_set1_ps(a->bc2_sqrt)),
                                 _mm512_set1_ps(a->eps));
    p = _mm512_sub_ps(p, _mm512_div_ps(_mm512_mul_ps(_mm512_set1_ps(a->step_size), mm), denom));
    _mm512_mask_storeu_ps(w, mk, p);
    return p;
}

/* Software prefetch (into L2) of the next tile's weight and Adam state while this tile computes, so the
 * compute-bound gradient product and the memory-bound Adam stream overlap. nseg row segments. */
typedef struct {
    const char *seg[3 * RB];
    ptrdiff_t nseg, bytes, next, per_call;
} prefetcher;

static inline void pf_step(prefetcher *pf) {
    for (ptrdiff_t i = 0; i < pf->per_call && pf->next < pf->nseg * pf->bytes; i++, pf->next += 64)
        _mm_prefetch(pf->seg[pf->next / pf->bytes] + pf->next % pf->bytes, _MM_HINT_T1);
}

/* nr (1..RB) rows starting at r, columns [cb, ce): gradient tiles + Adam. */
static inline __attribute__((always_inline)) void rows_update(
        int nr, ptrdiff_t r, float *W, float *M, float *V, const float *Gt, const float *X,
        ptrdiff_t K, ptrdiff_t C, const adam_params *a, ptrdiff_t cb, ptrdiff_t ce, prefetcher *pf) {
    for (ptrdiff_t c0 = cb; c0 < ce; c0 += 16 * VB) {
        __m512 acc[RB][VB];
        __mmask16 mk[VB];
        for (int u = 0; u < VB; u++) mk[u] = tail_mask(C - c0 - 16 * u);
        for (int i = 0; i < RB; i++)
            for (int u = 0; u < VB; u++) acc[i][u] = _mm512_setzero_ps();
        const float *xb = X + (c0 / (16 * VB)) * K * 16 * VB;   /* packed: [K x 64] block of columns c0.. */
        for (ptrdiff_t k = 0; k < K; k++) {
            pf_step(pf);
            const float *xk = xb + k * 16 * VB;
            __m512 xv[VB];
            for (int u = 0; u < VB; u++) xv[u] = _mm512_load_ps(xk + 16 * u);
            for (int i = 0; i < RB; i++) {
                if (i >= nr) break;
                __m512 gb = _mm512_set1_ps(Gt[(r + i) * K + k]);
                for (int u = 0; u < VB; u++) acc[i][u] = _mm512_fmadd_ps(gb, xv[u], acc[i][u]);
            }
        }
        for (int i = 0; i < RB; i++) {
            if (i >= nr) break;
            ptrdiff_t off = (r + i) * C + c0;
            for (int u = 0; u < VB; u++) {
                if (!mk[u]) break;
                adam_vec(W + off + 16 * u, M + off + 16 * u, V + off + 16 * u, acc[i][u], mk[u], a);
            }
        }
    }
}

/* Y[j, r + i] = X[j, :] . W[r + i, :] for nr rows of W, JB rows of X at a time. */
#define JB 4
static inline __attribute__((always_inline)) void rows_forward(
        int nr, ptrdiff_t r, const float *W, const float *X, ptrdiff_t K, ptrdiff_t R, ptrdiff_t C,
        float *Y) {
    for (ptrdiff_t j0 = 0; j0 < K; j0 += JB) {
        int nj = K - j0 < JB ? (int)(K - j0) : JB;
        __m512 s[JB][RB];
        for (int j = 0; j < JB; j++)
            for (int i = 0; i < RB; i++) s[j][i] = _mm512_setzero_ps();
        for (ptrdiff_t c = 0; c < C; c += 16) {
            __mmask16 mk = tail_mask(C - c);
            __m512 w[RB];
            for (int i = 0; i < RB; i++) {
                if (i >= nr) break;
                w[i] = _mm512_maskz_loadu_ps(mk, W + (r + i) * C + c);
            }
            for (int j = 0; j < JB; j++) {
                if (j >= nj) break;
                __m512 x = _mm512_maskz_loadu_ps(mk, X + (j0 + j) * C + c);
                for (int i = 0; i < RB; i++) {
                    if (i >= nr) break;
                    s[j][i] = _mm512_fmadd_ps(x, w[i], s[j][i]);
                }
            }
        }
        for (int j = 0; j < JB; j++) {
            if (j >= nj) break;
            for (int i = 0; i < RB; i++) {
                if (i >= nr) break;
                Y[(j0 + j) * R + r + i] = _mm512_reduce_add_ps(s[j][i]);
            }
        }
    }
}

/* Columns are processed in panels of PANEL (a multiple of 64): the packed input of one panel (64 x PANEL
 * floats) stays in L2 while the thread's row blocks stream through it. */
#define PANEL 1024

static void update_rows(ptrdiff_t b0, ptrdiff_t b1, ptrdiff_t R, float *W, float *M, float *V, const float *Gt,
                        const float *X, ptrdiff_t K, ptrdiff_t C, const adam_params *a) {
    for (ptrdiff_t p0 = 0; p0 < C; p0 += PANEL) {
        ptrdiff_t pe = p0 + PANEL < C ? p0 + PANEL : C;
        for (ptrdiff_t b = b0; b < b1; b++) {
            ptrdiff_t r = b * RB, nr = R - r < RB ? R - r : RB;
            /* next tile: the next row block in this panel, else the first one of the next panel */
            ptrdiff_t rn = b + 1 < b1 ? r + RB : b0 * RB, cn = b + 1 < b1 ? p0 : pe;
            ptrdiff_t cne = cn + PANEL < C ? cn + PANEL : C, nn = R - rn < RB ? R - rn : RB;
            prefetcher pf = {{0}, 0, 0, 0, 0};
            if (cn < C) {
                for (ptrdiff_t i = 0; i < nn; i++) {
                    pf.seg[pf.nseg++] = (const char *)(W + (rn + i) * C + cn);
                    pf.seg[pf.nseg++] = (const char *)(M + (rn + i) * C + cn);
                    pf.seg[pf.nseg++] = (const char *)(V + (rn + i) * C + cn);
                }
                pf.bytes = (cne - cn) * (ptrdiff_t)sizeof(float);
                ptrdiff_t calls = ((pe - p0 + 16 * VB - 1) / (16 * VB)) * K * (nr == RB ? 1 : nr);
                pf.per_call = ((pf.nseg * pf.bytes + 63) / 64 + calls - 1) / calls;
            }
            if (nr == RB) {
                rows_update(RB, r, W, M, V, Gt, X, K, C, a, p0, pe, &pf);
            } else {
                for (ptrdiff_t i = 0; i < nr; i++) rows_update(1, r + i, W, M, V, Gt, X, K, C, a, p0, pe, &pf);
            }
        }
    }
}

static void forward_block(ptrdiff_t r, ptrdiff_t R, const float *W, const float *X, ptrdiff_t K, ptrdiff_t C,
                          float *Y) {
    if (R - r >= RB) {
        rows_forward(RB, r, W, X, K, R, C, Y);
    } else {
        for (ptrdiff_t q = r; q < R; q++) rows_forward(1, q, W, X, K, R, C, Y);
    }
}
#else  /* generic C: the same arithmetic, one element at a time */
#define RB 4
static void update_rows(ptrdiff_t b0, ptrdiff_t b1, ptrdiff_t R, float *W, float *M, float *V, const float *Gt,
                        const float *X, ptrdiff_t K, ptrdiff_t C, const adam_params *a) {
    ptrdiff_t r1 = b1 * RB < R ? b1 * RB : R;
    for (ptrdiff_t q = b0 * RB; q < r1; q++)
        for (ptrdiff_t c = 0; c < C; c++) {
            float g = 0.0f;
            for (ptrdiff_t k = 0; k < K; k++) g = fmaf(Gt[q * K + k], X[k * C + c], g);
            if (a->use_scale) g = g / a->grad_scale;
            ptrdiff_t o = q * C + c;
            float m = a->omb1 < 0.5f ? fmaf(a->omb1, g - M[o], M[o]) : g - (g - M[o]) * a->beta1;
            float v = fmaf(g, g * a->omb2, V[o] * a->beta2);
            M[o] = m;
            V[o] = v;
            float denom = sqrtf(v) / a->bc2_sqrt + a->eps;
            W[o] = W[o] - a->step_size * m / denom;
        }
}

static void forward_block(ptrdiff_t r, ptrdiff_t R, const float *W, const float *X, ptrdiff_t K, ptrdiff_t C,
                          float *Y) {
    ptrdiff_t r1 = r + RB < R ? r + RB : R;
    for (ptrdiff_t q = r; q < r1; q++)
        for (ptrdiff_t j = 0; j < K; j++) {
            float s = 0.0f;
            for (ptrdiff_t c = 0; c < C; c++) s = fmaf(X[j * C + c], W[q * C + c], s);
            Y[j * R + q] = s;
        }
}
#endif

/* Y [K x R] = X [K x C] W^T for a few rows of X (inference): one pass over W, rows split over threads. */
void cellrl_linear_forward(const float *W, const float *X, int64_t K, int64_t R, int64_t C, float *Y, int threads) {
    ptrdiff_t nblocks = (R + RB - 1) / RB;
#ifdef _OPENMP
    #pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
#endif
    for (ptrdiff_t b = 0; b < nblocks; b++)
        forward_block(b * RB, R, W, X, K, C, Y);
    (void)threads;
}

/* Update W, M, V in place. All arrays contiguous float32. */
int cellrl_lowrank_adam(float *W, float *M, float *V, const float *Gt, const float *X, int64_t K, int64_t R,
                         int64_t C, float beta1, float beta2, float omb1, float omb2, float step_size,
                         float bc2_sqrt, float eps, float grad_scale, int use_scale, int threads) {
    adam_params a = {beta1, beta2, omb1, omb2, step_size, bc2_sqrt, eps, grad_scale, use_scale};
    ptrdiff_t nblocks = (R + RB - 1) / RB;
#ifdef CELLRL_AVX512
    /* X packed by blocks of 64 columns, [C/64][K][64], zero-padded: every gradient tile reads 16 KB of
     * contiguous, aligned memory instead of K rows 4*C bytes apart. */
    ptrdiff_t ncb = (C + 16 * VB - 1) / (16 * VB);
    float *Xp = (float *)aligned_alloc(64, (size_t)(ncb * K * 16 * VB) * sizeof(float));
    if (!Xp) return -1;
    for (ptrdiff_t cb = 0; cb < ncb; cb++)
        for (ptrdiff_t k = 0; k < K; k++)
            for (ptrdiff_t q = 0; q < 16 * VB; q++) {
                ptrdiff_t c = cb * 16 * VB + q;
                Xp[(cb * K + k) * 16 * VB + q] = c < C ? X[k * C + c] : 0.0f;
            }
    X = Xp;
#endif
#ifdef _OPENMP
    #pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        ptrdiff_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        update_rows(nblocks * t / nt, nblocks * (t + 1) / nt, R, W, M, V, Gt, X, K, C, &a);
    }
#else
    update_rows(0, nblocks, R, W, M, V, Gt, X, K, C, &a);
#endif
    (void)threads;
#ifdef CELLRL_AVX512
    free(Xp);
#endif
    return 0;
}
