/* Native XLA FFI handlers of the training-mode BatchNorm (+ ReLU) of damo_jax/models/batchnorm.py.
 *
 * Why: XLA:CPU runs BatchNorm's per-channel reductions and the element-wise passes around them as
 * many small fusions, one thread each; in the S@320 train step most of them run while the other
 * core idles (docs/bench_train.md §0zi, §0zj). These handlers run each BatchNorm's forward or
 * backward as one call on every core (an OpenMP team of OMP_NUM_THREADS, default: the cores; the
 * same libgomp team oneDNN uses), holding damo_exec_mu like the oneDNN convs, so one team runs at a
 * time.
 *
 * Same function as bn_train in batchnorm.py (flax's BatchNorm, use_fast_variance=False), at least
 * its float32 accuracy: per-channel statistics over the rows of x viewed as [M, C] (M = batch * H *
 * W), each thread merging float32 statistics of 16-row blocks (mean and sum of squared deviations
 * from it: no E[x^2] - E[x]^2 cancellation) into float64 by Chan's rule; the gradient sums in
 * float32 per 16 rows, float64 across them.
 *
 *   forward:  mean, var (biased), inv = 1 / sqrt(var + eps), y = (x - mean) * (inv * scale) + bias,
 *             z = relu(y) when act == 1 else y
 *   backward: g = dz masked by y > 0 (act == 1) else dz, xhat = (x - mean) * inv,
 *             dbias = sum g, dscale = sum g * xhat,
 *             dx = scale * inv / M * (M * g - dbias - xhat * dscale) + g_mean / M + (x - mean) * 2 g_var / M
 *   (g_mean, g_var: the cotangents of the mean / var outputs, which feed the running statistics.)
 *
 * The hot loops are compiled for AVX-512, AVX2 + FMA (x86-64-v3) and baseline x86-64 (GCC
 * target_clones, chosen when the library loads), so one cached library runs on either host kind.
 * The AVX2 clone names x86-64-v3, not "avx2": GCC's "avx2" target has no FMA, and without FMA the
 * float32 block sums round more (the one-channel case of tests/test_batchnorm_native.py: dscale
 * 4.8e-7 from the float64 reference against 2.6e-7 for XLA's formulation; with FMA within the
 * test's tighter bound). GCC before 12 has no x86-64-v3 clone and keeps "avx2".
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "xla_ffi.h"

#define BLOCK 16   /* rows per float32 partial sum */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#if __GNUC__ >= 12
#define CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#else
#define CLONES
#endif

/* Statistics of rows [r0, r1): per BLOCK-row block, float32 mean and sum of squared deviations from
 * it (the block is re-read from cache), merged into float64 (count, mean, m2) by Chan's rule. */
CLONES static void stats_rows(const float *restrict x, int64_t r0, int64_t r1, int64_t C, double *restrict mean,
                              double *restrict m2, double *count, float *restrict s, float *restrict q) {
  for (int64_t b0 = r0; b0 < r1; b0 += BLOCK) {
    int64_t b1 = b0 + BLOCK < r1 ? b0 + BLOCK : r1;
    float nb = (float)(b1 - b0);
    for (int64_t c = 0; c < C; ++c) { s[c] = 0.f; q[c] = 0.f; }
    for (int64_t r = b0; r < b1; ++r) {
      const float *xr = x + r * C;
      for (int64_t c = 0; c < C; ++c) s[c] += xr[c];
    }
    for (int64_t c = 0; c < C; ++c) s[c] /= nb;
    for (int64_t r = b0; r < b1; ++r) {
      const float *xr = x + r * C;
      for (int64_t c = 0; c < C; ++c) { float d = xr[c] - s[c]; q[c] += d * d; }
    }
    double na = *count, n = na + nb, wb = nb / n, wm = na * nb / n;
    for (int64_t c = 0; c < C; ++c) {
      double d = (double)s[c] - mean[c];
      mean[c] += d * wb;
      m2[c] += (double)q[c] + d * d * wm;
    }
    *count = n;
  }
}

/* z = act((x - mean) * a + bias [+ r]); ReLU as XLA's max(v, 0): NaN stays NaN */
CLONES static void norm_rows(const float *restrict x, const float *restrict res, float *restrict y, int64_t r0,
                             int64_t r1, int64_t C, const float *restrict mean, const float *restrict a,
                             const float *restrict bias, int relu) {
  for (int64_t r = r0; r < r1; ++r) {
    const float *xr = x + r * C, *rr = res ? res + r * C : NULL;
    float *yr = y + r * C;
    if (rr && relu)
      for (int64_t c = 0; c < C; ++c) { float v = (xr[c] - mean[c]) * a[c] + bias[c] + rr[c]; yr[c] = v < 0.f ? 0.f : v; }
    else if (rr)
      for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - mean[c]) * a[c] + bias[c] + rr[c];
    else if (relu)
      for (int64_t c = 0; c < C; ++c) { float v = (xr[c] - mean[c]) * a[c] + bias[c]; yr[c] = v < 0.f ? 0.f : v; }
    else
      for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - mean[c]) * a[c] + bias[c];
  }
}

/* g = dz where the ReLU passed (y > 0: recomputed from x, or z > 0 when z is given), else 0 */
/* the ReLU's gradient: dz where its input v > 0, else 0 (also for NaN: a select, as XLA's) */
static inline float relu_grad(float v, float dz) { return v > 0.f ? dz : 0.f; }

/* sum g and sum g * xhat over rows [r0, r1): float32 per BLOCK rows, float64 across blocks */
CLONES static void grad_sums(const float *restrict x, const float *restrict z, const float *restrict dz, int64_t r0,
                             int64_t r1, int64_t C, const float *restrict mean, const float *restrict inv,
                             const float *restrict a, const float *restrict bias, int relu, double *restrict sg,
                             double *restrict sgx, float *restrict s, float *restrict q) {
  for (int64_t b0 = r0; b0 < r1; b0 += BLOCK) {
    int64_t b1 = b0 + BLOCK < r1 ? b0 + BLOCK : r1;
    for (int64_t c = 0; c < C; ++c) { s[c] = 0.f; q[c] = 0.f; }
    for (int64_t r = b0; r < b1; ++r) {
      const float *xr = x + r * C, *gr = dz + r * C, *zr = z ? z + r * C : NULL;
      if (zr && relu)
        for (int64_t c = 0; c < C; ++c) {   /* written so that GCC vectorises the masked sums */
          float xc = xr[c] - mean[c], g = relu_grad(zr[c], gr[c]);
          float sc = s[c] + g, qc = q[c] + g * (xc * inv[c]);
          s[c] = sc; q[c] = qc;
        }
      else if (relu)
        for (int64_t c = 0; c < C; ++c) {
          float xc = xr[c] - mean[c], g = relu_grad(xc * a[c] + bias[c], gr[c]);
          float sc = s[c] + g, qc = q[c] + g * (xc * inv[c]);
          s[c] = sc; q[c] = qc;
        }
      else
        for (int64_t c = 0; c < C; ++c) { float xc = xr[c] - mean[c]; s[c] += gr[c]; q[c] += gr[c] * (xc * inv[c]); }
    }
    for (int64_t c = 0; c < C; ++c) { sg[c] += (double)s[c]; sgx[c] += (double)q[c]; }
  }
}

/* dx = k1 * g + k2 * (x - mean) + k0; dres = g when given */
CLONES static void grad_rows(const float *restrict x, const float *restrict z, const float *restrict dz,
                             float *restrict dx, float *restrict dres, int64_t r0, int64_t r1, int64_t C,
                             const float *restrict mean, const float *restrict a, const float *restrict bias,
                             int relu, const float *restrict k1, const float *restrict k2,
                             const float *restrict k0) {
  for (int64_t r = r0; r < r1; ++r) {
    const float *xr = x + r * C, *gr = dz + r * C, *zr = z ? z + r * C : NULL;
    float *dr = dx + r * C, *rr = dres ? dres + r * C : NULL;
    if (zr && relu)                       /* z and dres come together */
      for (int64_t c = 0; c < C; ++c) {
        float xc = xr[c] - mean[c], g = relu_grad(zr[c], gr[c]);
        dr[c] = k1[c] * g + k2[c] * xc + k0[c];
        rr[c] = g;
      }
    else if (relu)
      for (int64_t c = 0; c < C; ++c) {
        float xc = xr[c] - mean[c], g = relu_grad(xc * a[c] + bias[c], gr[c]);
        dr[c] = k1[c] * g + k2[c] * xc + k0[c];
      }
    else {
      for (int64_t c = 0; c < C; ++c) { float xc = xr[c] - mean[c]; dr[c] = k1[c] * gr[c] + k2[c] * xc + k0[c]; }
      if (rr) memcpy(rr, gr, sizeof(float) * C);
    }
  }
}

/* one thread below ~64 KiB of input (the team's wake-up would cost more than it saves) */
static int team_size(int64_t elements) { return elements < 16384 ? 1 : omp_get_max_threads(); }

/* x [M, C] (+ res [M, C] or NULL) -> z = act(BN(x) + res), mean, var, inv; 0 or -1 (out of memory) */
int damo_bn_forward(const float *x, const float *res, const float *scale, const float *bias, float eps, int relu,
                    int64_t M, int64_t C, float *z, float *mean_out, float *var_out, float *inv_out) {
  int nt = team_size(M * C);
  double *acc = calloc((size_t)nt * (2 * C + 1), sizeof(double));    /* per thread: mean, m2, count */
  float *tmp = malloc(sizeof(float) * ((size_t)nt * 2 * C + C));      /* per thread: 2 rows; a */
  if (!acc || !tmp) { free(acc); free(tmp); return -1; }
  float *a = tmp + (size_t)nt * 2 * C;
#pragma omp parallel num_threads(nt)
  {
    int t = omp_get_thread_num(), n = omp_get_num_threads();
    int64_t r0 = M * t / n, r1 = M * (t + 1) / n;
    double *mu = acc + (size_t)t * (2 * C + 1), *m2 = mu + C, *cnt = m2 + C;
    stats_rows(x, r0, r1, C, mu, m2, cnt, tmp + (size_t)t * 2 * C, tmp + (size_t)t * 2 * C + C);
#pragma omp barrier
#pragma omp single
    {
      double *m0 = acc, *q0 = acc + C, *n0 = acc + 2 * C;
      for (int k = 1; k < n; ++k) {
        double *mk = acc + (size_t)k * (2 * C + 1), *qk = mk + C, nk = mk[2 * C], na = *n0, nn = na + nk;
        if (nk == 0) continue;
        for (int64_t c = 0; c < C; ++c) {
          double d = mk[c] - m0[c];
          m0[c] += d * nk / nn;
          q0[c] += qk[c] + d * d * na * nk / nn;
        }
        *n0 = nn;
      }
      for (int64_t c = 0; c < C; ++c) {
        mean_out[c] = M > 0 ? (float)m0[c] : NAN;
        var_out[c] = M > 0 ? (float)(q0[c] / (double)M) : NAN;
        inv_out[c] = 1.0f / sqrtf(var_out[c] + eps);
        a[c] = inv_out[c] * scale[c];
      }
    } /* implicit barrier: every thread sees mean_out and a */
    norm_rows(x, res, z, r0, r1, C, mean_out, a, bias, relu);
  }
  free(acc); free(tmp);
  return 0;
}

/* (x, z or NULL, mean, inv, scale, bias, dz, g_mean, g_var) -> dx, dscale, dbias (+ dres = g when z is
 * given: the ReLU mask then comes from z, as z > 0 iff BN(x) + res > 0); 0 or -1 (out of memory) */
int damo_bn_backward(const float *x, const float *z, const float *mean, const float *inv, const float *scale,
                     const float *bias, const float *dz, const float *g_mean, const float *g_var, int relu,
                     int64_t M, int64_t C, float *dx, float *dscale, float *dbias, float *dres) {
  int nt = team_size(M * C);
  double *acc = calloc((size_t)nt * 2 * C, sizeof(double));
  float *a = malloc(sizeof(float) * ((size_t)nt * 2 * C + 4 * C));   /* a, k1, k2, k0; per thread: 2 rows */
  if (!acc || !a) { free(acc); free(a); return -1; }
  float *k1 = a + C, *k2 = a + 2 * C, *k0 = a + 3 * C, *rows = a + 4 * C;
  for (int64_t c = 0; c < C; ++c) a[c] = inv[c] * scale[c];
#pragma omp parallel num_threads(nt)
  {
    int t = omp_get_thread_num(), n = omp_get_num_threads();
    int64_t r0 = M * t / n, r1 = M * (t + 1) / n;
    double *sg = acc + (size_t)t * 2 * C, *sgx = sg + C;
    float *gt = rows + (size_t)t * 2 * C;
    grad_sums(x, z, dz, r0, r1, C, mean, inv, a, bias, relu, sg, sgx, gt, gt + C);
#pragma omp barrier
#pragma omp single
    {
      for (int k = 1; k < n; ++k)
        for (int64_t c = 0; c < 2 * C; ++c) acc[c] += acc[(size_t)k * 2 * C + c];
      float fm = (float)M;
      for (int64_t c = 0; c < C; ++c) {
        dbias[c] = (float)acc[c];
        dscale[c] = (float)acc[C + c];
        float f = scale[c] * inv[c] / fm;
        k1[c] = scale[c] * inv[c];
        k2[c] = -f * dscale[c] * inv[c] + 2.0f * g_var[c] / fm;
        k0[c] = -f * dbias[c] + g_mean[c] / fm;
      }
    }
    grad_rows(x, z, dz, dx, dres, r0, r1, C, mean, a, bias, relu, k1, k2, k0);
  }
  free(acc); free(a);
  return 0;
}

/* ---- FFI ---- */
static int64_t numel(const ffi_buffer *b) {
  int64_t n = 1;
  for (int64_t k = 0; k < b->rank; ++k) n *= b->dims[k];
  return n;
}

static int is_vec(const ffi_buffer *b, int64_t C) {
  return b->dtype == FFI_F32 && b->rank == 1 && b->dims[0] == C;
}

/* attribute "act" (int64[1]): 0 identity, 1 relu; -1 when missing or malformed */
static int act_attr(ffi_call_frame *f) {
  for (int64_t k = 0; k < f->attrs.size; ++k) {
    ffi_byte_span *name = f->attrs.names[k];
    if (f->attrs.types[k] == FFI_ATTR_ARRAY && name->len == 3 && !memcmp(name->ptr, "act", 3)) {
      ffi_array *arr = (ffi_array *)f->attrs.attrs[k];
      if (arr->dtype != FFI_S64 || arr->size != 1 || arr->data[0] < 0 || arr->data[0] > 1) return -1;
      return (int)arr->data[0];
    }
  }
  return -1;
}

/* damo_bn_fwd: args x [..., C], scale [C], bias [C], eps [] -> z [..., C], mean, var, inv [C];
 * damo_bn_add_fwd: the same plus res [..., C] as the last arg (z = act(BN(x) + res)). */
static void *forward_handler(ffi_call_frame *f, int with_res) {
  if (ffi_metadata_stage(f)) return NULL;
  if (f->stage != FFI_STAGE_EXECUTE) return NULL;
  if (f->args.size != 4 + with_res || f->rets.size != 4)
    return ffi_error(f, "damo_jax BatchNorm: unexpected number of operands");
  ffi_buffer *x = f->args.items[0], *z = f->rets.items[0], *res = with_res ? f->args.items[4] : NULL;
  if (x->dtype != FFI_F32 || x->rank < 1 || z->dtype != FFI_F32 || numel(z) != numel(x)
      || (res && (res->dtype != FFI_F32 || numel(res) != numel(x))))
    return ffi_error(f, "damo_jax BatchNorm: float32 x, z (and res) of one shape expected");
  int64_t C = x->dims[x->rank - 1], M = C ? numel(x) / C : 0;
  ffi_buffer *eps = f->args.items[3];
  if (!is_vec(f->args.items[1], C) || !is_vec(f->args.items[2], C) || eps->dtype != FFI_F32 || numel(eps) != 1
      || !is_vec(f->rets.items[1], C) || !is_vec(f->rets.items[2], C) || !is_vec(f->rets.items[3], C))
    return ffi_error(f, "damo_jax BatchNorm: scale, bias, mean, var, inv must be float32 [C], eps a float32 scalar");
  int act = act_attr(f);
  if (act < 0) return ffi_error(f, "damo_jax BatchNorm: attribute act (int64[1]: 0 or 1) missing");
  pthread_mutex_lock(&damo_exec_mu);
  int rc = damo_bn_forward(x->data, res ? res->data : NULL, f->args.items[1]->data, f->args.items[2]->data,
                           *(float *)eps->data, act, M, C, z->data, f->rets.items[1]->data, f->rets.items[2]->data,
                           f->rets.items[3]->data);
  pthread_mutex_unlock(&damo_exec_mu);
  return rc ? ffi_error(f, "damo_jax BatchNorm: out of memory") : NULL;
}

/* damo_bn_bwd: args x, mean, inv, scale, bias, dz, g_mean, g_var -> dx, dscale, dbias;
 * damo_bn_add_bwd: args x, z, mean, inv, scale, dz, g_mean, g_var -> dx, dscale, dbias, dres
 * (x, z, dz, dx, dres [..., C]; the rest [C]). */
static void *backward_handler(ffi_call_frame *f, int with_res) {
  if (ffi_metadata_stage(f)) return NULL;
  if (f->stage != FFI_STAGE_EXECUTE) return NULL;
  if (f->args.size != 8 || f->rets.size != 3 + with_res)
    return ffi_error(f, "damo_jax BatchNorm: unexpected number of operands");
  ffi_buffer *x = f->args.items[0], *dz = f->args.items[5], *dx = f->rets.items[0];
  ffi_buffer *z = with_res ? f->args.items[1] : NULL, *dres = with_res ? f->rets.items[3] : NULL;
  int64_t n = numel(x);
  if (x->dtype != FFI_F32 || x->rank < 1 || dz->dtype != FFI_F32 || dx->dtype != FFI_F32 || numel(dz) != n
      || numel(dx) != n || (z && (z->dtype != FFI_F32 || numel(z) != n))
      || (dres && (dres->dtype != FFI_F32 || numel(dres) != n)))
    return ffi_error(f, "damo_jax BatchNorm: float32 x, dz, dx (and z, dres) of one shape expected");
  int64_t C = x->dims[x->rank - 1], M = C ? n / C : 0;
  for (int k = with_res ? 2 : 1; k < 8; ++k)
    if (k != 5 && !is_vec(f->args.items[k], C))
      return ffi_error(f, "damo_jax BatchNorm: mean, inv, scale, bias, g_mean, g_var must be float32 [C]");
  if (!is_vec(f->rets.items[1], C) || !is_vec(f->rets.items[2], C))
    return ffi_error(f, "damo_jax BatchNorm: dscale, dbias must be float32 [C]");
  int act = act_attr(f);
  if (act < 0) return ffi_error(f, "damo_jax BatchNorm: attribute act (int64[1]: 0 or 1) missing");
  void *a[8];
  for (int k = 0; k < 8; ++k) a[k] = f->args.items[k]->data;
  pthread_mutex_lock(&damo_exec_mu);
  int rc = with_res
      ? damo_bn_backward(a[0], a[1], a[2], a[3], a[4], a[4] /* bias: unused with z */, a[5], a[6], a[7], act, M, C,
                         dx->data, f->rets.items[1]->data, f->rets.items[2]->data, dres->data)
      : damo_bn_backward(a[0], NULL, a[1], a[2], a[3], a[4], a[5], a[6], a[7], act, M, C, dx->data,
                         f->rets.items[1]->data, f->rets.items[2]->data, NULL);
  pthread_mutex_unlock(&damo_exec_mu);
  return rc ? ffi_error(f, "damo_jax BatchNorm: out of memory") : NULL;
}

void *damo_bn_fwd(ffi_call_frame *f) { return forward_handler(f, 0); }
void *damo_bn_add_fwd(ffi_call_frame *f) { return forward_handler(f, 1); }
void *damo_bn_bwd(ffi_call_frame *f) { return backward_handler(f, 0); }
void *damo_bn_add_bwd(ffi_call_frame *f) { return backward_handler(f, 1); }
