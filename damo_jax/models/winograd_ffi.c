/* Winograd F(2x2, 3x3) convolutions for x86-64 CPUs with AVX2 + FMA: the 3x3 stride-1 "same"
 * (padding 1) dense convs of CPU train graphs (forward, input gradient, kernel gradient) and of
 * folded inference graphs (forward), as native XLA FFI handlers beside the oneDNN ones
 * (onednn_ffi.c); which convs is model.conv3x3_impl (models/conv_grad.py), the call onednn.conv(...,
 * algo="winograd").
 *
 * Why: on a CPU whose best vector ISA is AVX2 (oneDNN 3.2 has no AVX2 Winograd), oneDNN's direct
 * 3x3 convs run at the two cores' FMA peak and are 55 % of the S@320 train step's convolution time
 * (docs/bench_train.md §0zm); the official PyTorch code runs the same oneDNN kernels. F(2x2, 3x3)
 * does the 3x3 conv's multiply-adds in 16 matrix products, 4/9 of the direct count: per S@320 conv
 * 1.2-1.8x less time than oneDNN with AVX2, 0.9-1.5x with the AVX-512 products (§0zn), at float32
 * accuracy (relative error ~5e-7 against XLA's conv).
 *
 * Algorithm (Lavin & Gray 2016), NHWC activations, HWIO weights, float32:
 *   each 2x2 output tile t of image n reads the 4x4 input patch d_t (zero outside the image);
 *   V_t = B^T d_t B, U = G g G^T (per input/output channel pair), M_t = sum_c U[c, k] V_t[c],
 *   y_t = A^T M_t A  -- the 16 entries xi of the 4x4 tile transform give 16 GEMMs
 *   M[xi] (tiles x K) = V[xi] (tiles x C) . U[xi] (C x K).
 *   input gradient: the same forward with g rotated 180 degrees and C / K swapped;
 *   kernel gradient: dU[xi] (C x K) = sum_t V[xi][t]^T (A dy_t A^T)[xi], dg = G^T dU G.
 * Tiles go in blocks of TB (a multiple of 6) whose transformed input and products stay in L2; each
 * thread (OpenMP, the libgomp team oneDNN uses; damo_exec_mu held like every other handler) takes
 * whole blocks. Kernel-gradient blocks are split statically and summed in thread order, so the
 * result does not depend on scheduling (it does on the thread count, as oneDNN's does).
 * Channel counts that are not multiples of 8 are zero-padded to the next one inside the buffers.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "xla_ffi.h"

extern pthread_mutex_t damo_exec_mu;   /* onednn_ffi.c: one OpenMP team at a time */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define WINO_X86 1
#define AVX2 __attribute__((target("avx2,fma")))
static int g_avx512 = 0;   /* damo_wino_set_avx512 */

/* 1 when this CPU runs the kernels below (AVX2 and FMA), else 0 (asked once: every handler call checks). */
int damo_wino_supported(void) {
  static int supported = -1;
  if (supported < 0) {
    __builtin_cpu_init();
    supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
  return supported;
}

/* Allow (1) or forbid (0) the AVX-512 GEMM kernels; returns whether they are used (the CPU must
 * have AVX-512F). Set once, before the first call (onednn.py, when it registers the handlers). */
int damo_wino_set_avx512(int allow) {
  __builtin_cpu_init();
  g_avx512 = allow && __builtin_cpu_supports("avx512f");
  return g_avx512;
}

#define PAD8(n) (((n) + 7) / 8 * 8)

/* Offset of (row, col) in a (R x Cols) matrix (Cols a multiple of 8) stored as column panels of 16
 * (the last one 8 wide when Cols % 16 == 8), each panel R rows of its width, contiguous: what the
 * GEMM kernels read row after row without striding across the whole matrix (a row stride of a
 * power of two KiB maps every row to the same few L1 sets). */
static inline int64_t panel_index(int64_t row, int64_t col, int64_t R, int64_t Cols) {
  const int64_t p = col / 16, width = p * 16 + 16 <= Cols ? 16 : 8;
  return p * 16 * R + row * width + col % 16;
}

/* C (6 x 16, row stride ldc) = A (6 x P, row stride lda) . B (P x 16, row stride ldb). Written out
 * accumulator by accumulator: with an array of __m256 in a loop gcc -O3 stores every accumulator to
 * the stack after each FMA (AVX2 has 16 registers). */
AVX2 static inline void gemm_6x16(int64_t P, const float *A, int64_t lda, const float *B, int64_t ldb, float *Cm,
                                  int64_t ldc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
#define ROW(r, x0, x1) { const __m256 a = _mm256_broadcast_ss(A + (r) * lda + p); \
                         x0 = _mm256_fmadd_ps(a, b0, x0); x1 = _mm256_fmadd_ps(a, b1, x1); }
  for (int64_t p = 0; p < P; ++p) {
    const __m256 b0 = _mm256_loadu_ps(B + p * ldb), b1 = _mm256_loadu_ps(B + p * ldb + 8);
    ROW(0, c00, c01) ROW(1, c10, c11) ROW(2, c20, c21) ROW(3, c30, c31) ROW(4, c40, c41) ROW(5, c50, c51)
  }
#undef ROW
  const __m256 out[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < 6; ++r) {
    _mm256_storeu_ps(Cm + r * ldc, out[r][0]);
    _mm256_storeu_ps(Cm + r * ldc + 8, out[r][1]);
  }
}

/* C (6 x 8) = A (6 x P) . B (P x 8) */
AVX2 static inline void gemm_6x8(int64_t P, const float *A, int64_t lda, const float *B, int64_t ldb, float *Cm,
                                 int64_t ldc) {
  __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  for (int64_t p = 0; p < P; ++p) {
    const __m256 b = _mm256_loadu_ps(B + p * ldb);
    c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(A + p), b, c0);
    c1 = _mm256_fmadd_ps(_mm256_broadcast_ss(A + lda + p), b, c1);
    c2 = _mm256_fmadd_ps(_mm256_broadcast_ss(A + 2 * lda + p), b, c2);
    c3 = _mm256_fmadd_ps(_mm256_broadcast_ss(A + 3 * lda + p), b, c3);
    c4 = _mm256_fmadd_ps(_mm256_broadcast_ss(A + 4 * lda + p), b, c4);
    c5 = _mm256_fmadd_ps(_mm256_broadcast_ss(A + 5 * lda + p), b, c5);
  }
  _mm256_storeu_ps(Cm, c0); _mm256_storeu_ps(Cm + ldc, c1); _mm256_storeu_ps(Cm + 2 * ldc, c2);
  _mm256_storeu_ps(Cm + 3 * ldc, c3); _mm256_storeu_ps(Cm + 4 * ldc, c4); _mm256_storeu_ps(Cm + 5 * ldc, c5);
}

/* C (4 x 16) += A^T . B: A (P x 4 at column offset, row stride lda), B (P x 16, row stride ldb) */
AVX2 static inline void gemm_t_4x16(int64_t P, const float *A, int64_t lda, const float *B, int64_t ldb, float *Cm,
                                    int64_t ldc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  for (int64_t p = 0; p < P; ++p) {
    const float *a = A + p * lda;
    const __m256 b0 = _mm256_loadu_ps(B + p * ldb), b1 = _mm256_loadu_ps(B + p * ldb + 8);
    __m256 v;
    v = _mm256_broadcast_ss(a);     c00 = _mm256_fmadd_ps(v, b0, c00); c01 = _mm256_fmadd_ps(v, b1, c01);
    v = _mm256_broadcast_ss(a + 1); c10 = _mm256_fmadd_ps(v, b0, c10); c11 = _mm256_fmadd_ps(v, b1, c11);
    v = _mm256_broadcast_ss(a + 2); c20 = _mm256_fmadd_ps(v, b0, c20); c21 = _mm256_fmadd_ps(v, b1, c21);
    v = _mm256_broadcast_ss(a + 3); c30 = _mm256_fmadd_ps(v, b0, c30); c31 = _mm256_fmadd_ps(v, b1, c31);
  }
#define ACC(r, lo, hi) _mm256_storeu_ps(Cm + r * ldc, _mm256_add_ps(_mm256_loadu_ps(Cm + r * ldc), lo)); \
                       _mm256_storeu_ps(Cm + r * ldc + 8, _mm256_add_ps(_mm256_loadu_ps(Cm + r * ldc + 8), hi));
  ACC(0, c00, c01) ACC(1, c10, c11) ACC(2, c20, c21) ACC(3, c30, c31)
#undef ACC
}

/* C (4 x 8) += A^T . B */
AVX2 static inline void gemm_t_4x8(int64_t P, const float *A, int64_t lda, const float *B, int64_t ldb, float *Cm,
                                   int64_t ldc) {
  __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
  for (int64_t p = 0; p < P; ++p) {
    const float *a = A + p * lda;
    const __m256 b = _mm256_loadu_ps(B + p * ldb);
    c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(a), b, c0);
    c1 = _mm256_fmadd_ps(_mm256_broadcast_ss(a + 1), b, c1);
    c2 = _mm256_fmadd_ps(_mm256_broadcast_ss(a + 2), b, c2);
    c3 = _mm256_fmadd_ps(_mm256_broadcast_ss(a + 3), b, c3);
  }
  _mm256_storeu_ps(Cm, _mm256_add_ps(_mm256_loadu_ps(Cm), c0));
  _mm256_storeu_ps(Cm + ldc, _mm256_add_ps(_mm256_loadu_ps(Cm + ldc), c1));
  _mm256_storeu_ps(Cm + 2 * ldc, _mm256_add_ps(_mm256_loadu_ps(Cm + 2 * ldc), c2));
  _mm256_storeu_ps(Cm + 3 * ldc, _mm256_add_ps(_mm256_loadu_ps(Cm + 3 * ldc), c3));
}

/* lanes [0, n) of 8 */
AVX2 static inline __m256i lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 8 ? n : 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* G g G^T of 3x3 taps g[a][b] (8 lanes each) -> u (16) */
AVX2 static inline void g_transform(__m256 g[3][3], __m256 u[16]) {
  const __m256 h = _mm256_set1_ps(.5f);
  __m256 t[4][3];
  for (int b = 0; b < 3; ++b) {         /* G rows: (1, 0, 0), (.5, .5, .5), (.5, -.5, .5), (0, 0, 1) */
    const __m256 e = _mm256_add_ps(g[0][b], g[2][b]);
    t[0][b] = g[0][b];
    t[1][b] = _mm256_mul_ps(h, _mm256_add_ps(e, g[1][b]));
    t[2][b] = _mm256_mul_ps(h, _mm256_sub_ps(e, g[1][b]));
    t[3][b] = g[2][b];
  }
  for (int a = 0; a < 4; ++a) {
    const __m256 e = _mm256_add_ps(t[a][0], t[a][2]);
    u[a * 4 + 0] = t[a][0];
    u[a * 4 + 1] = _mm256_mul_ps(h, _mm256_add_ps(e, t[a][1]));
    u[a * 4 + 2] = _mm256_mul_ps(h, _mm256_sub_ps(e, t[a][1]));
    u[a * 4 + 3] = t[a][2];
  }
}

/* w HWIO (3, 3, C, K) -> U (16, Cp, Kp) = G g G^T per (c, k), zero where c >= C or k >= K (Cp, Kp:
 * C, K rounded up to 8), each U[xi] in column panels (panel_index); flip: the input gradient's
 * kernel g'[a][b] = g[2-a][2-b] with C and K swapped, U (16, Kp, Cp). Every entry is written. */
AVX2 static void weight_transform(const float *w, float *U, int64_t C, int64_t K, int flip) {
  const int64_t CK = C * K, Cp = PAD8(C), Kp = PAD8(K), CKp = Cp * Kp;
  const __m256 z = _mm256_setzero_ps();
  if (!flip) {
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < Cp; ++c)
      for (int64_t k = 0; k < Kp; k += 8) {      /* 8 output channels, contiguous in w and in U */
        __m256 g[3][3], u[16];
        const __m256i m = lanes(K - k);
        for (int a = 0; a < 3; ++a)
          for (int b = 0; b < 3; ++b) {
            const float *src = w + (a * 3 + b) * CK + c * K + k;
            g[a][b] = c >= C ? z : K - k >= 8 ? _mm256_loadu_ps(src) : _mm256_maskload_ps(src, m);
          }
        g_transform(g, u);
        const int64_t dst = panel_index(c, k, Cp, Kp);
        for (int q = 0; q < 16; ++q) _mm256_storeu_ps(U + q * CKp + dst, u[q]);
      }
  } else {
    const __m256i step = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)K));
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < Kp; ++k)
      for (int64_t c = 0; c < Cp; c += 8) {      /* 8 input channels: a stride-K gather from w */
        __m256 g[3][3], u[16];
        const __m256 m = _mm256_castsi256_ps(k < K ? lanes(C - c) : _mm256_setzero_si256());
        const __m256i idx = _mm256_add_epi32(step, _mm256_set1_epi32((int)(c * K + (k < K ? k : 0))));
        for (int a = 0; a < 3; ++a)
          for (int b = 0; b < 3; ++b)
            g[a][b] = _mm256_mask_i32gather_ps(z, w + ((2 - a) * 3 + (2 - b)) * CK, idx, m, 4);
        g_transform(g, u);
        const int64_t dst = panel_index(k, c, Kp, Cp);
        for (int q = 0; q < 16; ++q) _mm256_storeu_ps(U + q * CKp + dst, u[q]);
      }
  }
}

/* dU (16, Cp, Kp), row-major -> dw (3, 3, C, K): dg = G^T dU G. */
AVX2 static void weight_grad_transform(const float *dU, float *dw, int64_t C, int64_t K) {
  const int64_t CK = C * K, Kp = PAD8(K), CKp = PAD8(C) * Kp;
  const __m256 h = _mm256_set1_ps(.5f);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < K; k += 8) {
      __m256 u[4][4], t[3][4];
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b) u[a][b] = _mm256_loadu_ps(dU + (a * 4 + b) * CKp + c * Kp + k);
      for (int b = 0; b < 4; ++b) {       /* G^T rows: (1, .5, .5, 0), (0, .5, -.5, 0), (0, .5, .5, 1) */
        const __m256 e = _mm256_mul_ps(h, _mm256_add_ps(u[1][b], u[2][b]));
        t[0][b] = _mm256_add_ps(u[0][b], e);
        t[1][b] = _mm256_mul_ps(h, _mm256_sub_ps(u[1][b], u[2][b]));
        t[2][b] = _mm256_add_ps(e, u[3][b]);
      }
      const __m256i m = lanes(K - k);
      for (int a = 0; a < 3; ++a) {
        const __m256 e = _mm256_mul_ps(h, _mm256_add_ps(t[a][1], t[a][2]));
        const __m256 r[3] = {_mm256_add_ps(t[a][0], e), _mm256_mul_ps(h, _mm256_sub_ps(t[a][1], t[a][2])),
                             _mm256_add_ps(e, t[a][3])};
        for (int b = 0; b < 3; ++b) {
          float *o = dw + (a * 3 + b) * CK + c * K + k;
          if (K - k >= 8) _mm256_storeu_ps(o, r[b]); else _mm256_maskstore_ps(o, m, r[b]);
        }
      }
    }
}

/* AVX-512 GEMM kernels: where the CPU has AVX-512 and damo_wino_set_avx512(1) allowed them (onednn.py
 * does so when oneDNN itself runs AVX-512 here, so ONEDNN_MAX_CPU_ISA caps both). */
#define AVX512 __attribute__((target("avx512f")))

/* C (6 x 32) = A (6 x P) . [B0 | B1] (two 16-wide column panels, row stride 16) */
AVX512 static inline void gemm_6x32_avx512(int64_t P, const float *A, int64_t lda, const float *B0, const float *B1,
                                           float *Cm, int64_t ldc) {
  __m512 c[6][2];
  for (int r = 0; r < 6; ++r) c[r][0] = c[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    const __m512 b0 = _mm512_loadu_ps(B0 + p * 16), b1 = _mm512_loadu_ps(B1 + p * 16);
    for (int r = 0; r < 6; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + p]);
      c[r][0] = _mm512_fmadd_ps(a, b0, c[r][0]);
      c[r][1] = _mm512_fmadd_ps(a, b1, c[r][1]);
    }
  }
  for (int r = 0; r < 6; ++r) {
    _mm512_storeu_ps(Cm + r * ldc, c[r][0]);
    _mm512_storeu_ps(Cm + r * ldc + 16, c[r][1]);
  }
}

/* C (8 x 32) += A^T . B: A (P x 8 at column offset, row stride lda), B (P x 32, row stride ldb);
 * 16 named accumulators (an array of them is kept on the stack inside the loop by gcc -O3). */
AVX512 static inline void gemm_t_8x32_avx512(int64_t P, const float *A, int64_t lda, const float *B, int64_t ldb,
                                             float *Cm, int64_t ldc) {
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00, c60 = c00, c61 = c00, c70 = c00, c71 = c00;
#define ROW(r, x0, x1) { const __m512 v = _mm512_set1_ps(a[r]); \
                         x0 = _mm512_fmadd_ps(v, b0, x0); x1 = _mm512_fmadd_ps(v, b1, x1); }
  for (int64_t p = 0; p < P; ++p) {
    const float *a = A + p * lda;
    const __m512 b0 = _mm512_loadu_ps(B + p * ldb), b1 = _mm512_loadu_ps(B + p * ldb + 16);
    ROW(0, c00, c01) ROW(1, c10, c11) ROW(2, c20, c21) ROW(3, c30, c31)
    ROW(4, c40, c41) ROW(5, c50, c51) ROW(6, c60, c61) ROW(7, c70, c71)
  }
#undef ROW
  const __m512 out[8][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31},
                            {c40, c41}, {c50, c51}, {c60, c61}, {c70, c71}};
  for (int r = 0; r < 8; ++r) {
    _mm512_storeu_ps(Cm + r * ldc, _mm512_add_ps(_mm512_loadu_ps(Cm + r * ldc), out[r][0]));
    _mm512_storeu_ps(Cm + r * ldc + 16, _mm512_add_ps(_mm512_loadu_ps(Cm + r * ldc + 16), out[r][1]));
  }
}

typedef struct { int64_t N, H, W, th, tw, nt; } tiling_t;

static tiling_t tiling(int64_t N, int64_t H, int64_t W) {
  tiling_t t = {N, H, W, (H + 1) / 2, (W + 1) / 2, 0};
  t.nt = N * t.th * t.tw;
  return t;
}

/* Tiles per block: the block's transformed input and products (16 x TB x (C + K) floats) within
 * ~1 MiB (L2), a multiple of 6 (the GEMM rows), at least 4 blocks per thread where the tiles allow. */
static int64_t block_tiles(const tiling_t *t, int64_t C, int64_t K, int threads) {
  int64_t tb = ((int64_t)1 << 20) / (64 * (C + K));
  int64_t per = t->nt / (4 * (int64_t)threads);
  if (per < tb) tb = per;
  tb = tb / 6 * 6;
  if (tb > 96) tb = 96;
  if (tb < 6) tb = 6;
  return tb;
}

/* Pointers to the size x size pixels of tile tt's patch in x (N, H, W, C), its top-left pixel at
 * (2 * tile row + offset, 2 * tile column + offset); NULL outside the image. */
static void tile_pixels(const float *x, const tiling_t *tl, int64_t tt, int64_t C, int offset, int size,
                        const float **px) {
  const int64_t img = tt / (tl->th * tl->tw), r = tt % (tl->th * tl->tw);
  const int64_t i0 = 2 * (r / tl->tw) + offset, j0 = 2 * (r % tl->tw) + offset;
  for (int a = 0; a < size; ++a)
    for (int b = 0; b < size; ++b) {
      const int64_t i = i0 + a, j = j0 + b;
      px[a * size + b] = (i >= 0 && i < tl->H && j >= 0 && j < tl->W) ? x + ((img * tl->H + i) * tl->W + j) * C : NULL;
    }
}

/* 8 channels [c, c + 8) of a pixel (zero for a NULL pixel, masked by m past the C channels) */
AVX2 static inline __m256 load_channels(const float *p, int64_t c, int64_t C, __m256i m) {
  return !p ? _mm256_setzero_ps() : C - c >= 8 ? _mm256_loadu_ps(p + c) : _mm256_maskload_ps(p + c, m);
}

/* Zero row t of each of the 16 (TB, width) matrices at M (stride st between them). */
static void zero_row(float *M, int64_t st, int64_t t, int64_t width) {
  for (int q = 0; q < 16; ++q) memset(M + q * st + t * width, 0, sizeof(float) * width);
}

/* V (16, TB, Cp) of the tiles [t0, t0 + n) (rows n..TB and channels C..Cp zero): B^T d B of each
 * 4x4 input patch of x (N, H, W, C). */
AVX2 static void input_transform(const float *x, const tiling_t *tl, int64_t C, int64_t t0, int64_t n, int64_t TB,
                                 float *V) {
  const int64_t Cp = PAD8(C), st = TB * Cp;
  for (int64_t t = 0; t < TB; ++t) {
    if (t >= n) {
      zero_row(V, st, t, Cp);
      continue;
    }
    const float *px[16];
    tile_pixels(x, tl, t0 + t, C, -1, 4, px);
    for (int64_t c = 0; c < Cp; c += 8) {
      __m256 d[4][4], s[4][4];
      const __m256i m = lanes(C - c);
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b) d[a][b] = load_channels(px[a * 4 + b], c, C, m);
      for (int b = 0; b < 4; ++b) {      /* B^T rows: (1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1) */
        s[0][b] = _mm256_sub_ps(d[0][b], d[2][b]);
        s[1][b] = _mm256_add_ps(d[1][b], d[2][b]);
        s[2][b] = _mm256_sub_ps(d[2][b], d[1][b]);
        s[3][b] = _mm256_sub_ps(d[1][b], d[3][b]);
      }
      for (int a = 0; a < 4; ++a) {
        float *o = V + (a * 4) * st + t * Cp + c;
        _mm256_storeu_ps(o, _mm256_sub_ps(s[a][0], s[a][2]));
        _mm256_storeu_ps(o + st, _mm256_add_ps(s[a][1], s[a][2]));
        _mm256_storeu_ps(o + 2 * st, _mm256_sub_ps(s[a][2], s[a][1]));
        _mm256_storeu_ps(o + 3 * st, _mm256_sub_ps(s[a][1], s[a][3]));
      }
    }
  }
}

/* Z (16, TB, Kp) of the tiles [t0, t0 + n) (rows n..TB and channels K..Kp zero): A g A^T of each 2x2
 * tile of the output gradient g (N, H, W, K) (zero outside the image). */
AVX2 static void grad_transform(const float *g, const tiling_t *tl, int64_t K, int64_t t0, int64_t n, int64_t TB,
                                float *Z) {
  const int64_t Kp = PAD8(K), st = TB * Kp;
  const __m256 z = _mm256_setzero_ps();
  for (int64_t t = 0; t < TB; ++t) {
    if (t >= n) {
      zero_row(Z, st, t, Kp);
      continue;
    }
    const float *pg[4];
    tile_pixels(g, tl, t0 + t, K, 0, 2, pg);
    for (int64_t k = 0; k < Kp; k += 8) {
      __m256 e[2][2], s[4][2];
      const __m256i m = lanes(K - k);
      for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b) e[a][b] = load_channels(pg[a * 2 + b], k, K, m);
      for (int b = 0; b < 2; ++b) {      /* A rows: (1, 0), (1, 1), (1, -1), (0, -1) */
        s[0][b] = e[0][b];
        s[1][b] = _mm256_add_ps(e[0][b], e[1][b]);
        s[2][b] = _mm256_sub_ps(e[0][b], e[1][b]);
        s[3][b] = _mm256_sub_ps(z, e[1][b]);
      }
      for (int a = 0; a < 4; ++a) {
        float *o = Z + (a * 4) * st + t * Kp + k;
        _mm256_storeu_ps(o, s[a][0]);
        _mm256_storeu_ps(o + st, _mm256_add_ps(s[a][0], s[a][1]));
        _mm256_storeu_ps(o + 2 * st, _mm256_sub_ps(s[a][0], s[a][1]));
        _mm256_storeu_ps(o + 3 * st, _mm256_sub_ps(z, s[a][1]));
      }
    }
  }
}

/* y (N, H, W, K) of the tiles [t0, t0 + n) from M (16, TB, Kp): A^T M A, the 2x2 outputs inside the
 * image, channels [0, K). */
AVX2 static void output_transform(const float *M, const tiling_t *tl, int64_t K, int64_t t0, int64_t n, int64_t TB,
                                  float *y) {
  const int64_t Kp = PAD8(K), st = TB * Kp;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t tt = t0 + t, img = tt / (tl->th * tl->tw), r = tt % (tl->th * tl->tw);
    const int64_t i0 = 2 * (r / tl->tw), j0 = 2 * (r % tl->tw);
    for (int64_t k = 0; k < Kp; k += 8) {
      __m256 m[4][4], u[2][4];
      const int full = K - k >= 8;
      const __m256i mask = lanes(K - k);
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b) m[a][b] = _mm256_loadu_ps(M + (a * 4 + b) * st + t * Kp + k);
      for (int b = 0; b < 4; ++b) {      /* A^T rows: (1, 1, 1, 0), (0, 1, -1, -1) */
        u[0][b] = _mm256_add_ps(_mm256_add_ps(m[0][b], m[1][b]), m[2][b]);
        u[1][b] = _mm256_sub_ps(_mm256_sub_ps(m[1][b], m[2][b]), m[3][b]);
      }
      for (int a = 0; a < 2 && i0 + a < tl->H; ++a) {
        float *o = y + ((img * tl->H + i0 + a) * tl->W + j0) * K + k;
        const __m256 y0 = _mm256_add_ps(_mm256_add_ps(u[a][0], u[a][1]), u[a][2]);
        const __m256 y1 = _mm256_sub_ps(_mm256_sub_ps(u[a][1], u[a][2]), u[a][3]);
        if (full) _mm256_storeu_ps(o, y0); else _mm256_maskstore_ps(o, mask, y0);
        if (j0 + 1 < tl->W) {
          if (full) _mm256_storeu_ps(o + K, y1); else _mm256_maskstore_ps(o + K, mask, y1);
        }
      }
    }
  }
}

/* Work buffers, grown to the largest conv met and kept (no allocation or page faults per call);
 * only touched with damo_exec_mu held. */
typedef struct { void *p; size_t bytes; } buf_t;
static buf_t g_u, g_work, g_acc;

static float *grow(buf_t *b, size_t bytes) {
  if (bytes > b->bytes) {
    void *p = NULL;
    bytes = (bytes + 4095) & ~(size_t)4095;
    if (posix_memalign(&p, 4096, bytes)) return NULL;
    free(b->p);
    b->p = p;
    b->bytes = bytes;
  }
  return b->p;
}

/* floats of one thread's V / M (or V / Z) block buffers, a multiple of 16 (64-byte rows) */
static int64_t thread_floats(int64_t TB, int64_t C, int64_t K) { return (16 * TB * (C + K) + 15) / 16 * 16; }

/* y = conv3x3(x, U) (padding 1, stride 1): x (N, H, W, C), U (16, Cp, Kp), y (N, H, W, K). 0, or -1
 * when the work buffers cannot be allocated. */
AVX2 static int forward(const float *x, const float *U, float *y, int64_t N, int64_t H, int64_t W, int64_t C0,
                        int64_t K0) {
  const tiling_t tl = tiling(N, H, W);
  const int threads = omp_get_max_threads();
  const int64_t C = PAD8(C0), K = PAD8(K0);      /* the buffers' channel strides */
  const int64_t TB = block_tiles(&tl, C, K, threads), nb = (tl.nt + TB - 1) / TB, per = thread_floats(TB, C, K);
  float *work = grow(&g_work, sizeof(float) * per * threads);
  if (!work) return -1;
#pragma omp parallel
  {
    float *V = work + per * omp_get_thread_num(), *M = V + 16 * TB * C;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t t0 = b * TB, n = tl.nt - t0 < TB ? tl.nt - t0 : TB;
      input_transform(x, &tl, C0, t0, n, TB, V);
      for (int q = 0; q < 16; ++q) {
        const float *Vq = V + q * TB * C, *Uq = U + q * C * K;     /* Uq: column panels */
        float *Mq = M + q * TB * K;
        int64_t k = 0;
        if (g_avx512)
          for (; k + 32 <= K; k += 32)
            for (int64_t r = 0; r < TB; r += 6)
              gemm_6x32_avx512(C, Vq + r * C, C, Uq + k * C, Uq + (k + 16) * C, Mq + r * K + k, K);
        for (; k + 16 <= K; k += 16)
          for (int64_t r = 0; r < TB; r += 6) gemm_6x16(C, Vq + r * C, C, Uq + k * C, 16, Mq + r * K + k, K);
        for (; k < K; k += 8)
          for (int64_t r = 0; r < TB; r += 6) gemm_6x8(C, Vq + r * C, C, Uq + k * C, 8, Mq + r * K + k, K);
      }
      output_transform(M, &tl, K0, t0, n, TB, y);
    }
  }
  return 0;
}

/* dw (3, 3, C, K) = kernel gradient of conv3x3(x, .) at output gradient g (N, H, W, K). */
AVX2 static int kernel_grad(const float *x, const float *g, float *dw, int64_t N, int64_t H, int64_t W, int64_t C0,
                            int64_t K0) {
  const tiling_t tl = tiling(N, H, W);
  const int threads = omp_get_max_threads();
  const int64_t C = PAD8(C0), K = PAD8(K0);      /* the buffers' channel strides */
  const int64_t TB = block_tiles(&tl, C, K, threads), nb = (tl.nt + TB - 1) / TB, CK16 = 16 * C * K;
  const int64_t per = thread_floats(TB, C, K);
  float *work = grow(&g_work, sizeof(float) * per * threads), *acc = grow(&g_acc, sizeof(float) * CK16 * threads);
  if (!work || !acc) return -1;
#pragma omp parallel
  {
    const int th = omp_get_thread_num();
    float *V = work + per * th, *Z = V + 16 * TB * C, *dU = acc + CK16 * th;
    memset(dU, 0, sizeof(float) * CK16);
    /* static: each thread sums a fixed contiguous range of blocks, in order */
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t t0 = b * TB, n = tl.nt - t0 < TB ? tl.nt - t0 : TB;
      input_transform(x, &tl, C0, t0, n, TB, V);
      grad_transform(g, &tl, K0, t0, n, TB, Z);
      for (int q = 0; q < 16; ++q) {
        const float *Vq = V + q * TB * C, *Zq = Z + q * TB * K;
        float *dUq = dU + q * C * K;
        /* columns [0, k32) in 32-wide AVX-512 blocks (8 rows each), the rest 16 / 8 wide (4 rows) */
        const int64_t k32 = g_avx512 ? K / 32 * 32 : 0;
        for (int64_t c = 0; c < C; c += 8)
          for (int64_t k = 0; k < k32; k += 32) gemm_t_8x32_avx512(TB, Vq + c, C, Zq + k, K, dUq + c * K + k, K);
        for (int64_t c = 0; c < C; c += 4) {
          int64_t k = k32;
          for (; k + 16 <= K; k += 16) gemm_t_4x16(TB, Vq + c, C, Zq + k, K, dUq + c * K + k, K);
          for (; k < K; k += 8) gemm_t_4x8(TB, Vq + c, C, Zq + k, K, dUq + c * K + k, K);
        }
      }
    }
    /* the team's partial sums (the team may be smaller than omp_get_max_threads()), added in
     * thread order: deterministic for a thread count */
    const int team = omp_get_num_threads();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < CK16; ++i) {
      float sum = acc[i];
      for (int t = 1; t < team; ++t) sum += acc[CK16 * t + i];
      acc[i] = sum;
    }
  }
  weight_grad_transform(acc, dw, C0, K0);
  return 0;
}

#else  /* not x86-64: never chosen (damo_wino_supported() == 0) */
int damo_wino_supported(void) { return 0; }
int damo_wino_set_avx512(int allow) { (void)allow; return 0; }
#endif

/* ---- XLA FFI handlers: fwd (x, w) -> y; bwd (x, w, g) -> dx, dw; bwd_weights (x, w, g) -> dw ---- */
static void *handler(ffi_call_frame *f, int kind) {
  if (ffi_metadata_stage(f)) return NULL;
  if (f->stage != FFI_STAGE_EXECUTE) return NULL;
  const int nargs = kind == 0 ? 2 : 3, nrets = kind == 1 ? 2 : 1;
  if (f->args.size != nargs || f->rets.size != nrets) return ffi_error(f, "damo_jax Winograd conv: unexpected number of operands");
  ffi_buffer *in[3], *out[2];
  for (int k = 0; k < nargs; ++k) in[k] = f->args.items[k];
  for (int k = 0; k < nrets; ++k) out[k] = f->rets.items[k];
  for (int k = 0; k < nargs + nrets; ++k) {
    ffi_buffer *b = k < nargs ? in[k] : out[k - nargs];
    if (b->dtype != FFI_F32 || b->rank != 4) return ffi_error(f, "damo_jax Winograd conv: float32 rank-4 buffers expected");
  }
  const int64_t *xd = in[0]->dims, *wd = in[1]->dims;
  const int64_t N = xd[0], H = xd[1], W = xd[2], C = xd[3], K = wd[3];
  const int64_t *yd = kind == 0 ? out[0]->dims : in[2]->dims;
  if (wd[0] != 3 || wd[1] != 3 || wd[2] != C || C < 1 || K < 1 || yd[0] != N || yd[1] != H || yd[2] != W || yd[3] != K
      || (kind == 1 && memcmp(out[0]->dims, xd, sizeof(int64_t) * 4))
      || (kind != 0 && memcmp(out[nrets - 1]->dims, wd, sizeof(int64_t) * 4)))
    return ffi_error(f, "damo_jax Winograd conv: shapes are not those of a 3x3 stride-1 padding-1 conv");
#ifdef WINO_X86
  if (!damo_wino_supported()) return ffi_error(f, "damo_jax Winograd conv: this CPU has no AVX2 + FMA");
  int status = 0;
  pthread_mutex_lock(&damo_exec_mu);
  if (kind == 0 || kind == 1) {
    /* forward: U of w; input gradient: U of the flipped w, then the forward of g */
    const int64_t ci = kind == 0 ? C : K, co = kind == 0 ? K : C;
    float *U = grow(&g_u, sizeof(float) * 16 * PAD8(C) * PAD8(K));
    if (!U) status = -1;
    else {
      weight_transform((const float *)in[1]->data, U, C, K, kind == 1);
      status = forward((const float *)in[kind == 0 ? 0 : 2]->data, U, (float *)out[0]->data, N, H, W, ci, co);
    }
  }
  if (!status && kind != 0)
    status = kernel_grad((const float *)in[0]->data, (const float *)in[2]->data, (float *)out[nrets - 1]->data,
                         N, H, W, C, K);
  pthread_mutex_unlock(&damo_exec_mu);
  if (status) return ffi_error(f, "damo_jax Winograd conv: allocating the work buffers failed (out of memory)");
  return NULL;
#else
  return ffi_error(f, "damo_jax Winograd conv: not built for this CPU (x86-64 with AVX2 + FMA only)");
#endif
}

void *damo_wino_conv_fwd(ffi_call_frame *f) { return handler(f, 0); }
void *damo_wino_conv_bwd(ffi_call_frame *f) { return handler(f, 1); }
void *damo_wino_conv_bwd_weights(ffi_call_frame *f) { return handler(f, 2); }
