/* Native XLA FFI handlers for the oneDNN convolutions of damo_jax/models/onednn.py.
 *
 * Why: the ctypes handler runs Python on every conv call, so every call needs the GIL. While
 * another Python thread of the process runs bytecode (a data-loading thread, a web server, a GUI),
 * each call waits up to the interpreter's switch interval (5 ms) for the GIL, once per ctypes call:
 * an S@320 train step went 0.8 -> 7.5 s and a T@640 forward 53 -> 1014 ms beside one busy Python
 * thread (docs/bench_train.md §0r). These handlers need no Python in the steady state: Python
 * builds each conv shape's oneDNN primitives once (the "plan", through the make_plan callback,
 * which takes the GIL), and every later call only wraps XLA's buffers and executes.
 *
 * No headers beyond libc / pthreads and no link-time dependency: the XLA FFI structs of xla_ffi.h mirror
 * xla/ffi/api/c_api.h (api_version 0.1, as the ctypes mirror in onednn.py), and the four oneDNN
 * functions used per call are handed over as pointers by damo_onednn_init (from the libdnnl.so.3
 * that onednn.py loaded). Compiled on first use by onednn_native.py with the system C compiler.
 */
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "xla_ffi.h"

/* ---- oneDNN (dnnl.h subset, passed in by damo_onednn_init) ---- */
typedef struct { int arg; void *memory; } dnnl_exec_arg;
typedef int (*memory_create_fn)(void **mem, const void *md, void *engine, void *handle);
typedef int (*memory_destroy_fn)(void *mem);
typedef int (*primitive_execute_fn)(const void *prim, void *stream, int nargs, const dnnl_exec_arg *args);
typedef int (*stream_wait_fn)(void *stream);
enum { ARG_SRC = 1, ARG_DST = 17, ARG_WEIGHTS = 33, ARG_DIFF_SRC = 129, ARG_DIFF_DST = 145, ARG_DIFF_WEIGHTS = 161,
       ARG_SCRATCHPAD = 80 };

/* One conv shape's primitives; filled by Python (onednn._ConvPrimitives.plan, same field order). */
typedef struct {
  int64_t y_dims[4];      /* NHWC output shape */
  void *to_fwd, *fwd, *to_bwd, *bwd_data, *bwd_weights, *from_dw;       /* primitives */
  void *md_w_user, *md_src, *md_dst, *md_diff_dst_d, *md_diff_src, *md_src_w, *md_diff_dst_w;
  void *w_fwd, *w_bwd, *dw_int;                                          /* oneDNN-owned memories */
  /* scratchpad descriptors of to_fwd, fwd, to_bwd, bwd_data, bwd_weights, from_dw (NULL: none) and
   * the largest size: the primitives are built with scratchpad_mode = user (onednn.py
   * _user_scratchpad_attr: oneDNN's per-thread global scratchpad breaks when XLA executes a
   * primitive on another thread than the one that created it), and every call gets g_scratch. */
  void *md_sp[6];
  int64_t sp_bytes;
} plan_t;
enum { SP_TO_FWD, SP_FWD, SP_TO_BWD, SP_BWD_DATA, SP_BWD_WEIGHTS, SP_FROM_DW };

/* key: x dims (4), w dims (4), conf (6) -> plan; the callback returns NULL on failure. */
typedef plan_t *(*make_plan_fn)(const int64_t *key);

#define KEY_LEN 14
#define MAX_PLANS 4096
static struct { int64_t key[KEY_LEN]; plan_t *plan; } g_plans[MAX_PLANS];
static int g_num_plans = 0;
static pthread_mutex_t g_plans_mu = PTHREAD_MUTEX_INITIALIZER;
/* oneDNN calls are serialised (oneDNN itself uses every core through OpenMP); onednn.py's Python
 * path takes the same lock through damo_onednn_lock / damo_onednn_unlock, and so do the BatchNorm
 * handlers of batchnorm_ffi.c (they too use every core). */
pthread_mutex_t damo_exec_mu = PTHREAD_MUTEX_INITIALIZER;
#define g_exec_mu damo_exec_mu

static void *g_engine, *g_stream;
/* The scratchpad every primitive uses (2 MiB-aligned like oneDNN's own), grown to the largest plan
 * it met; only touched with g_exec_mu held, so no primitive runs on it while it is replaced. */
static void *g_scratch = NULL;
static size_t g_scratch_bytes = 0;
static memory_create_fn g_memory_create;
static memory_destroy_fn g_memory_destroy;
static primitive_execute_fn g_execute;
static stream_wait_fn g_stream_wait;
static make_plan_fn g_make_plan;
static volatile int64_t g_plan_calls = 0;   /* make_plan invocations (tests: no Python per call) */

void damo_onednn_init(void *engine, void *stream, void *memory_create, void *memory_destroy,
                      void *execute, void *stream_wait, void *make_plan) {
  g_engine = engine; g_stream = stream;
  g_memory_create = (memory_create_fn)memory_create;
  g_memory_destroy = (memory_destroy_fn)memory_destroy;
  g_execute = (primitive_execute_fn)execute;
  g_stream_wait = (stream_wait_fn)stream_wait;
  g_make_plan = (make_plan_fn)make_plan;
}

void damo_onednn_lock(void) { pthread_mutex_lock(&g_exec_mu); }
void damo_onednn_unlock(void) { pthread_mutex_unlock(&g_exec_mu); }
int64_t damo_onednn_plan_calls(void) { return g_plan_calls; }

static plan_t *find_plan(const int64_t *key) {
  plan_t *plan = NULL;
  pthread_mutex_lock(&g_plans_mu);
  for (int i = 0; i < g_num_plans && !plan; ++i)
    if (!memcmp(g_plans[i].key, key, sizeof(int64_t) * KEY_LEN)) plan = g_plans[i].plan;
  pthread_mutex_unlock(&g_plans_mu);
  if (plan) return plan;
  /* miss: Python builds the primitives (takes the GIL; never called with g_exec_mu held) */
  __atomic_add_fetch(&g_plan_calls, 1, __ATOMIC_RELAXED);
  plan = g_make_plan(key);
  if (!plan) return NULL;
  pthread_mutex_lock(&g_plans_mu);
  int known = 0;
  for (int i = 0; i < g_num_plans && !known; ++i)
    if (!memcmp(g_plans[i].key, key, sizeof(int64_t) * KEY_LEN)) { plan = g_plans[i].plan; known = 1; }
  if (!known && g_num_plans < MAX_PLANS) {
    memcpy(g_plans[g_num_plans].key, key, sizeof(int64_t) * KEY_LEN);
    g_plans[g_num_plans].plan = plan;
    ++g_num_plans;
  }
  pthread_mutex_unlock(&g_plans_mu);
  return plan;   /* Python keeps every plan it handed out alive (onednn._PLANS) */
}

/* What one call needs: its buffers as float32 rank-4 arrays and the plan of its shape. */
static const char *prepare(ffi_call_frame *f, int nargs, int nrets, plan_t **plan, ffi_buffer **in,
                           ffi_buffer **out) {
  static const char conf_name[] = "conf";
  if (f->args.size != nargs || f->rets.size != nrets) return "damo_jax oneDNN conv: unexpected number of operands";
  for (int k = 0; k < nargs; ++k) in[k] = f->args.items[k];
  for (int k = 0; k < nrets; ++k) out[k] = f->rets.items[k];
  for (int k = 0; k < nargs + nrets; ++k) {
    ffi_buffer *b = k < nargs ? in[k] : out[k - nargs];
    if (b->dtype != FFI_F32 || b->rank != 4) return "damo_jax oneDNN conv: float32 rank-4 buffers expected";
  }
  int64_t key[KEY_LEN];
  int have_conf = 0;
  for (int64_t k = 0; k < f->attrs.size; ++k) {
    ffi_byte_span *name = f->attrs.names[k];
    if (f->attrs.types[k] == FFI_ATTR_ARRAY && name->len == 4 && !memcmp(name->ptr, conf_name, 4)) {
      ffi_array *arr = (ffi_array *)f->attrs.attrs[k];
      if (arr->dtype != FFI_S64 || arr->size != 6) break;
      memcpy(key + 8, arr->data, sizeof(int64_t) * 6);
      have_conf = 1;
    }
  }
  if (!have_conf) return "damo_jax oneDNN conv: attribute conf (int64[6]: sh, sw, pt, pb, pl, pr) missing";
  memcpy(key, in[0]->dims, sizeof(int64_t) * 4);
  memcpy(key + 4, in[1]->dims, sizeof(int64_t) * 4);
  *plan = find_plan(key);
  if (!*plan) return "damo_jax oneDNN conv: building the oneDNN primitives failed (the Python error is logged above)";
  return NULL;
}

static void *handler(ffi_call_frame *f, int kind) {
  if (ffi_metadata_stage(f)) return NULL;
  if (f->stage != FFI_STAGE_EXECUTE) return NULL;
  /* kind 0: fwd (x, w) -> y; 1: bwd (x, w, g) -> dx, dw; 2: bwd_weights (x, w, g) -> dw */
  plan_t *p;
  ffi_buffer *in[3], *out[2];
  const char *err = prepare(f, kind == 0 ? 2 : 3, kind == 1 ? 2 : 1, &p, in, out);
  if (err) return ffi_error(f, err);
  ffi_buffer *dw = kind == 1 ? out[1] : out[0];
  const int64_t *y = kind == 0 ? out[0]->dims : in[2]->dims;
  if (memcmp(y, p->y_dims, sizeof(int64_t) * 4) || (kind != 0 && memcmp(dw->dims, in[1]->dims, sizeof(int64_t) * 4))
      || (kind == 1 && memcmp(out[0]->dims, in[0]->dims, sizeof(int64_t) * 4))) {
    char msg[192];
    snprintf(msg, sizeof msg, "damo_jax oneDNN conv: output shape (%lld, %lld, %lld, %lld) or gradient shapes "
             "do not match the convolution's output (%lld, %lld, %lld, %lld)", (long long)y[0], (long long)y[1],
             (long long)y[2], (long long)y[3], (long long)p->y_dims[0], (long long)p->y_dims[1],
             (long long)p->y_dims[2], (long long)p->y_dims[3]);
    return ffi_error(f, msg);
  }

  void *mems[16];
  int nmem = 0, status = 0;
  const char *what = "memory";
#define WRAP(md, ptr) (status = status ? status : g_memory_create(&mems[nmem], (md), g_engine, (ptr)), \
                       status ? NULL : mems[nmem++])
  /* args, then the primitive's scratchpad (if it has one) over g_scratch */
#define RUN(prim, sp, ...) do { if (!status) { \
    dnnl_exec_arg a_[] = {__VA_ARGS__, {ARG_SCRATCHPAD, NULL}}; \
    int n_ = (int)(sizeof(a_) / sizeof(a_[0])) - 1; \
    if (p->md_sp[sp]) { void *s_ = WRAP(p->md_sp[sp], g_scratch); a_[n_++].memory = s_; } \
    if (!status) { what = "execute"; status = g_execute((prim), g_stream, n_, a_); } } } while (0)
  pthread_mutex_lock(&g_exec_mu);
  if ((size_t)p->sp_bytes > g_scratch_bytes) {
    size_t bytes = ((size_t)p->sp_bytes + ((size_t)1 << 21) - 1) & ~(((size_t)1 << 21) - 1);
    void *grown = NULL;
    if (posix_memalign(&grown, (size_t)1 << 21, bytes)) {
      pthread_mutex_unlock(&g_exec_mu);
      return ffi_error(f, "damo_jax oneDNN conv: allocating the scratchpad failed (out of memory)");
    }
    free(g_scratch);
    g_scratch = grown;
    g_scratch_bytes = bytes;
  }
  if (kind == 0) {
    void *w = WRAP(p->md_w_user, in[1]->data);
    void *x = WRAP(p->md_src, in[0]->data);
    void *y = WRAP(p->md_dst, out[0]->data);
    RUN(p->to_fwd, SP_TO_FWD, {ARG_SRC, w}, {ARG_DST, p->w_fwd});
    RUN(p->fwd, SP_FWD, {ARG_SRC, x}, {ARG_WEIGHTS, p->w_fwd}, {ARG_DST, y});
  } else {
    if (kind == 1) {
      void *w = WRAP(p->md_w_user, in[1]->data);
      void *g = WRAP(p->md_diff_dst_d, in[2]->data);
      void *dx = WRAP(p->md_diff_src, out[0]->data);
      RUN(p->to_bwd, SP_TO_BWD, {ARG_SRC, w}, {ARG_DST, p->w_bwd});
      RUN(p->bwd_data, SP_BWD_DATA, {ARG_DIFF_DST, g}, {ARG_WEIGHTS, p->w_bwd}, {ARG_DIFF_SRC, dx});
    }
    void *x = WRAP(p->md_src_w, in[0]->data);
    void *gw = WRAP(p->md_diff_dst_w, in[2]->data);
    void *dwu = WRAP(p->md_w_user, dw->data);
    RUN(p->bwd_weights, SP_BWD_WEIGHTS, {ARG_SRC, x}, {ARG_DIFF_DST, gw}, {ARG_DIFF_WEIGHTS, p->dw_int});
    RUN(p->from_dw, SP_FROM_DW, {ARG_SRC, p->dw_int}, {ARG_DST, dwu});
  }
  if (!status) { what = "stream_wait"; status = g_stream_wait(g_stream); }
  for (int k = 0; k < nmem; ++k) g_memory_destroy(mems[k]);
  pthread_mutex_unlock(&g_exec_mu);
#undef WRAP
#undef RUN
  if (status) {
    char msg[128];
    snprintf(msg, sizeof msg, "damo_jax oneDNN conv: %s failed with status %d", what, status);
    return ffi_error(f, msg);
  }
  return NULL;
}

void *damo_onednn_conv_fwd(ffi_call_frame *f) { return handler(f, 0); }
void *damo_onednn_conv_bwd(ffi_call_frame *f) { return handler(f, 1); }
void *damo_onednn_conv_bwd_weights(ffi_call_frame *f) { return handler(f, 2); }
