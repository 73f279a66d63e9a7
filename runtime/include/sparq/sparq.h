/* sparq C API: the C++ API of sparq.hpp with opaque handles and status codes.
 * Every function returns a sparq_status; on failure sparq_last_error() (thread-local) says what was wrong. */
#ifndef SPARQ_H
#define SPARQ_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  SPARQ_OK = 0,
  SPARQ_INVALID_ARGUMENT = 1,
  SPARQ_NOT_SUPPORTED = 2,
  SPARQ_BACKEND_UNAVAILABLE = 3,
  SPARQ_OUT_OF_MEMORY = 4,
  SPARQ_DEVICE_ERROR = 5,
  SPARQ_INTERNAL = 6
} sparq_status;

typedef enum { SPARQ_BACKEND_AUTO = 0, SPARQ_BACKEND_CUDA, SPARQ_BACKEND_VULKAN, SPARQ_BACKEND_REFERENCE } sparq_backend;
typedef enum { SPARQ_F16 = 0, SPARQ_BF16, SPARQ_F32, SPARQ_I8, SPARQ_U8, SPARQ_I32 } sparq_dtype;
typedef enum { SPARQ_LAYOUT_HND = 0, SPARQ_LAYOUT_NHD } sparq_layout;
typedef enum { SPARQ_QK_INT8 = 0, SPARQ_QK_FP16 } sparq_qk_precision;
typedef enum { SPARQ_QK_PER_BLOCK = 0, SPARQ_QK_PER_WARP, SPARQ_QK_PER_THREAD } sparq_qk_granularity;
typedef enum { SPARQ_PV_AUTO = 0, SPARQ_PV_FP16, SPARQ_PV_FP8 } sparq_pv_precision;
typedef enum { SPARQ_MASK_BITMAP = 0, SPARQ_MASK_LUT } sparq_mask_kind;

typedef struct sparq_context_s* sparq_context;
typedef struct sparq_tensor_s* sparq_tensor;

typedef struct {
  sparq_layout layout;
  int causal;                 /* bottom-right aligned */
  float scale;                /* 0 = 1/sqrt(head_dim) */
  int smooth_k;
  sparq_qk_precision qk_precision;
  sparq_qk_granularity qk_granularity;
  sparq_pv_precision pv_precision;
} sparq_attention_options;

/* The defaults of sparq::AttentionOptions. */
sparq_attention_options sparq_default_options(void);

typedef struct {
  sparq_mask_kind kind;
  int block_q, block_k;
  sparq_tensor bitmap;   /* kind == SPARQ_MASK_BITMAP: U8 [B, Hm, nQB, nKB] */
  sparq_tensor counts;   /* kind == SPARQ_MASK_LUT: I32 [B, Hq, nQB] */
  sparq_tensor indices;  /* kind == SPARQ_MASK_LUT: I32 [B, Hq, nQB, nKB] */
} sparq_block_mask;

const char* sparq_last_error(void);
const char* sparq_status_string(sparq_status status);
const char* sparq_version(void);

sparq_status sparq_context_create(sparq_backend backend, int device, sparq_context* out);
void sparq_context_destroy(sparq_context ctx);
sparq_status sparq_context_backend(sparq_context ctx, sparq_backend* out);
/* Copies the device name into buf (always NUL-terminated, truncated to size). */
sparq_status sparq_context_device_name(sparq_context ctx, char* buf, size_t size);
sparq_status sparq_context_synchronize(sparq_context ctx);
sparq_status sparq_context_set_cuda_stream(sparq_context ctx, void* stream);

/* shape and strides have `rank` entries (1..4); strides may be NULL for contiguous. */
sparq_status sparq_tensor_create(sparq_context ctx, sparq_dtype dtype, int rank, const int64_t* shape,
                                 sparq_tensor* out);
sparq_status sparq_tensor_wrap_host(sparq_context ctx, void* data, sparq_dtype dtype, int rank,
                                    const int64_t* shape, const int64_t* strides, sparq_tensor* out);
sparq_status sparq_tensor_wrap_cuda(sparq_context ctx, void* device_ptr, size_t bytes, sparq_dtype dtype,
                                    int rank, const int64_t* shape, const int64_t* strides, sparq_tensor* out);
void sparq_tensor_destroy(sparq_tensor tensor);
/* Contiguous host data of numel elements to / from the tensor. */
sparq_status sparq_tensor_upload(sparq_context ctx, sparq_tensor tensor, const void* data);
sparq_status sparq_tensor_download(sparq_context ctx, sparq_tensor tensor, void* data);

/* mask and lse may be NULL; options NULL means the defaults. */
sparq_status sparq_attention(sparq_context ctx, sparq_tensor q, sparq_tensor k, sparq_tensor v, sparq_tensor out,
                             const sparq_attention_options* options, const sparq_block_mask* mask,
                             sparq_tensor lse);

/* ---- SpargeAttn (sparge.hpp) ---- */
typedef struct {
  float simthreshd;  /* theta */
  float cdfthreshd;  /* tau */
  float topk;        /* > 0: keep this fraction of key blocks instead of tau */
  float pvthreshd;   /* lambda, log2 units; INFINITY = no stage 2 */
  int dense;
} sparq_sparge_params;

typedef struct {
  sparq_attention_options attention;
  int block_q, block_k;
  int attention_sink, diagonal;
  int hilbert_t, hilbert_h, hilbert_w; /* all 0 = no Hilbert order */
} sparq_sparge_options;

typedef struct {
  double block_sparsity, pv_skip_fraction;
} sparq_sparge_stats;

sparq_sparge_params sparq_default_sparge_params(void);
sparq_sparge_options sparq_default_sparge_options(void);
/* per_head: num_params = Hq entries, or 1 for all heads. options and stats may be NULL. */
sparq_status sparq_sparge_attention(sparq_context ctx, sparq_tensor q, sparq_tensor k, sparq_tensor v,
                                    sparq_tensor out, const sparq_sparge_options* options,
                                    const sparq_sparge_params* per_head, int num_params, sparq_sparge_stats* stats);

typedef struct sparq_hyperparams_s* sparq_hyperparams;
sparq_status sparq_hyperparams_load(const char* path, sparq_hyperparams* out);
void sparq_hyperparams_destroy(sparq_hyperparams hp);
/* Copies the layer's per-head parameters into params (capacity entries); *count receives the head count.
 * heads > 0 makes a different head count an error. */
sparq_status sparq_hyperparams_layer(sparq_hyperparams hp, const char* layer, int heads, sparq_sparge_params* params,
                                     int capacity, int* count);

#ifdef __cplusplus
}
#endif

#endif /* SPARQ_H */
