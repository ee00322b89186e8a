/* The subset of XLA's FFI C API (xla/ffi/api/c_api.h, api_version 0.1) that damo_jax's native
 * handlers use (onednn_ffi.c, batchnorm_ffi.c): no XLA headers are needed to build them. The ctypes
 * mirror in onednn.py has the same layout. */
#ifndef DAMO_JAX_XLA_FFI_H
#define DAMO_JAX_XLA_FFI_H
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

typedef struct { size_t struct_size; int type; void *next; } ffi_ext_base;
typedef struct { size_t struct_size; void *extension_start; int major_version; int minor_version; } ffi_api_version;
typedef struct { size_t struct_size; ffi_api_version api_version; uint32_t traits; int64_t state_type_id; } ffi_metadata;
typedef struct { ffi_ext_base extension_base; ffi_metadata *metadata; } ffi_metadata_ext;
typedef struct { size_t struct_size; void *extension_start; int dtype; void *data; int64_t rank; int64_t *dims; } ffi_buffer;
typedef struct { size_t struct_size; void *extension_start; int64_t size; int *types; ffi_buffer **items; } ffi_list;
typedef struct { const char *ptr; size_t len; } ffi_byte_span;
typedef struct { int dtype; size_t size; int64_t *data; } ffi_array;
typedef struct { size_t struct_size; void *extension_start; int64_t size; int *types; ffi_byte_span **names; void **attrs; } ffi_attrs;
typedef struct { size_t struct_size; void *extension_start; void *api; void *ctx; int stage; ffi_list args; ffi_list rets; ffi_attrs attrs; void *future; } ffi_call_frame;
typedef struct { size_t struct_size; void *extension_start; const char *message; int errc; } ffi_error_create_args;
typedef void *(*ffi_error_create_fn)(ffi_error_create_args *);

enum { FFI_F32 = 11, FFI_S64 = 5, FFI_ATTR_ARRAY = 1, FFI_EXTENSION_METADATA = 1, FFI_STAGE_EXECUTE = 3,
       FFI_ERROR_INTERNAL = 13, FFI_API_ERROR_CREATE_OFFSET = 48 };


static inline void *ffi_error(ffi_call_frame *frame, const char *message) {
  ffi_error_create_fn create = *(ffi_error_create_fn *)((char *)frame->api + FFI_API_ERROR_CREATE_OFFSET);
  ffi_error_create_args args = {sizeof(ffi_error_create_args), NULL, message, FFI_ERROR_INTERNAL};
  return create(&args);
}

/* The metadata stage (XLA asks which API version a handler speaks): fills it in and returns 1. */
static inline int ffi_metadata_stage(ffi_call_frame *f) {
  if (f->extension_start && ((ffi_ext_base *)f->extension_start)->type == FFI_EXTENSION_METADATA) {
    ffi_metadata *meta = ((ffi_metadata_ext *)f->extension_start)->metadata;
    meta->api_version.major_version = 0;
    meta->api_version.minor_version = 1;
    meta->traits = 0;
    return 1;
  }
  return 0;
}

/* Every native handler that runs OpenMP / oneDNN work holds this while it runs (one team at a time
 * on the cores; defined in onednn_ffi.c). */
extern pthread_mutex_t damo_exec_mu;
#endif
