// The C API: opaque handles over the C++ objects, every exception turned into a status code plus a
// thread-local message.
#include <sparq/sparq.h>

#include <sparq/sparge.hpp>

#include "backend.hpp"

#include <cstring>
#include <new>

struct sparq_context_s {
  sparq::Context ctx;
};
struct sparq_tensor_s {
  sparq::Tensor tensor;
};
struct sparq_hyperparams_s {
  sparq::HyperParams params;
};

namespace {

thread_local std::string last_error;

template <class F>
sparq_status guarded(F&& f) {
  try {
    f();
    last_error.clear();
    return SPARQ_OK;
  } catch (const sparq::Error& e) {
    last_error = e.what();
    return static_cast<sparq_status>(e.status());
  } catch (const std::bad_alloc&) {
    last_error = "out of host memory";
    return SPARQ_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    last_error = e.what();
    return SPARQ_INTERNAL;
  }
}

[[noreturn]] void bad(const std::string& message) { sparq::detail::fail(sparq::Status::InvalidArgument, message); }

void need(const void* p, const char* what) {
  if (!p) bad(std::string(what) + " is NULL");
}

std::vector<int64_t> dims(int rank, const int64_t* values, const char* what) {
  if (rank < 1 || rank > 4) bad(std::string("rank must be 1 to 4, got ") + std::to_string(rank));
  need(values, what);
  return std::vector<int64_t>(values, values + rank);
}

sparq::DType dtype(sparq_dtype d) {
  if (d < SPARQ_F16 || d > SPARQ_I32) bad("dtype " + std::to_string(static_cast<int>(d)) + " is not a sparq_dtype");
  return static_cast<sparq::DType>(d);
}

sparq::AttentionOptions attention_options(const sparq_attention_options& c) {
  if (c.layout < SPARQ_LAYOUT_HND || c.layout > SPARQ_LAYOUT_NHD) bad("options->layout is invalid");
  if (c.qk_precision < SPARQ_QK_INT8 || c.qk_precision > SPARQ_QK_FP16) bad("options->qk_precision is invalid");
  if (c.qk_granularity < SPARQ_QK_PER_BLOCK || c.qk_granularity > SPARQ_QK_PER_THREAD)
    bad("options->qk_granularity is invalid");
  if (c.pv_precision < SPARQ_PV_AUTO || c.pv_precision > SPARQ_PV_FP8) bad("options->pv_precision is invalid");
  sparq::AttentionOptions o;
  o.layout = static_cast<sparq::Layout>(c.layout);
  o.causal = c.causal != 0;
  o.scale = c.scale;
  o.smooth_k = c.smooth_k != 0;
  o.qk_precision = static_cast<sparq::QKPrecision>(c.qk_precision);
  o.qk_granularity = static_cast<sparq::QKGranularity>(c.qk_granularity);
  o.pv_precision = static_cast<sparq::PVPrecision>(c.pv_precision);
  return o;
}

sparq_sparge_params to_c(const sparq::SpargeParams& p) {
  return {p.simthreshd, p.cdfthreshd, p.topk, p.pvthreshd, p.dense ? 1 : 0};
}

sparq::SpargeParams from_c(const sparq_sparge_params& c) {
  sparq::SpargeParams p;
  p.simthreshd = c.simthreshd;
  p.cdfthreshd = c.cdfthreshd;
  p.topk = c.topk;
  p.pvthreshd = c.pvthreshd;
  p.dense = c.dense != 0;
  return p;
}

}  // namespace

extern "C" {

const char* sparq_last_error(void) { return last_error.c_str(); }
const char* sparq_version(void) { return sparq::version(); }

const char* sparq_status_string(sparq_status status) {
  if (status < SPARQ_OK || status > SPARQ_INTERNAL) return "unknown status";
  return sparq::to_string(static_cast<sparq::Status>(status));
}

sparq_attention_options sparq_default_options(void) {
  sparq::AttentionOptions o;
  sparq_attention_options c;
  c.layout = static_cast<sparq_layout>(o.layout);
  c.causal = o.causal;
  c.scale = o.scale;
  c.smooth_k = o.smooth_k;
  c.qk_precision = static_cast<sparq_qk_precision>(o.qk_precision);
  c.qk_granularity = static_cast<sparq_qk_granularity>(o.qk_granularity);
  c.pv_precision = static_cast<sparq_pv_precision>(o.pv_precision);
  return c;
}

sparq_status sparq_context_create(sparq_backend backend, int device, sparq_context* out) {
  return guarded([&] {
    need(out, "out");
    *out = nullptr;
    if (backend < SPARQ_BACKEND_AUTO || backend > SPARQ_BACKEND_REFERENCE)
      bad("backend " + std::to_string(static_cast<int>(backend)) + " is not a sparq_backend");
    *out = new sparq_context_s{sparq::Context::create(static_cast<sparq::Backend>(backend), device)};
  });
}

void sparq_context_destroy(sparq_context ctx) { delete ctx; }

sparq_status sparq_context_backend(sparq_context ctx, sparq_backend* out) {
  return guarded([&] {
    need(ctx, "ctx");
    need(out, "out");
    *out = static_cast<sparq_backend>(ctx->ctx.backend());
  });
}

sparq_status sparq_context_device_name(sparq_context ctx, char* buf, size_t size) {
  return guarded([&] {
    need(ctx, "ctx");
    need(buf, "buf");
    if (size == 0) bad("size is 0");
    std::string name = ctx->ctx.device_name();
    std::size_t n = std::min(size - 1, name.size());
    std::memcpy(buf, name.data(), n);
    buf[n] = '\0';
  });
}

sparq_status sparq_context_synchronize(sparq_context ctx) {
  return guarded([&] {
    need(ctx, "ctx");
    ctx->ctx.synchronize();
  });
}

sparq_status sparq_context_set_cuda_stream(sparq_context ctx, void* stream) {
  return guarded([&] {
    need(ctx, "ctx");
    ctx->ctx.set_cuda_stream(stream);
  });
}

sparq_status sparq_tensor_create(sparq_context ctx, sparq_dtype dt, int rank, const int64_t* shape,
                                 sparq_tensor* out) {
  return guarded([&] {
    need(ctx, "ctx");
    need(out, "out");
    *out = nullptr;
    *out = new sparq_tensor_s{ctx->ctx.empty(dtype(dt), dims(rank, shape, "shape"))};
  });
}

sparq_status sparq_tensor_wrap_host(sparq_context ctx, void* data, sparq_dtype dt, int rank, const int64_t* shape,
                                    const int64_t* strides, sparq_tensor* out) {
  return guarded([&] {
    need(ctx, "ctx");
    need(out, "out");
    *out = nullptr;
    std::vector<int64_t> st = strides ? dims(rank, strides, "strides") : std::vector<int64_t>{};
    *out = new sparq_tensor_s{ctx->ctx.wrap_host(data, dtype(dt), dims(rank, shape, "shape"), st)};
  });
}

sparq_status sparq_tensor_wrap_cuda(sparq_context ctx, void* device_ptr, size_t bytes, sparq_dtype dt, int rank,
                                    const int64_t* shape, const int64_t* strides, sparq_tensor* out) {
  return guarded([&] {
    need(ctx, "ctx");
    need(out, "out");
    *out = nullptr;
    std::vector<int64_t> st = strides ? dims(rank, strides, "strides") : std::vector<int64_t>{};
    *out = new sparq_tensor_s{ctx->ctx.wrap_cuda(device_ptr, bytes, dtype(dt), dims(rank, shape, "shape"), st)};
  });
}

void sparq_tensor_destroy(sparq_tensor tensor) { delete tensor; }

sparq_status sparq_tensor_upload(sparq_context ctx, sparq_tensor tensor, const void* data) {
  return guarded([&] {
    need(ctx, "ctx");
    need(tensor, "tensor");
    ctx->ctx.from_host(tensor->tensor, data);
  });
}

sparq_status sparq_tensor_download(sparq_context ctx, sparq_tensor tensor, void* data) {
  return guarded([&] {
    need(ctx, "ctx");
    need(tensor, "tensor");
    ctx->ctx.to_host(tensor->tensor, data);
  });
}

sparq_status sparq_attention(sparq_context ctx, sparq_tensor q, sparq_tensor k, sparq_tensor v, sparq_tensor out,
                             const sparq_attention_options* options, const sparq_block_mask* mask,
                             sparq_tensor lse) {
  return guarded([&] {
    need(ctx, "ctx");
    need(q, "q");
    need(k, "k");
    need(v, "v");
    need(out, "out");
    sparq::AttentionOptions o = options ? attention_options(*options) : sparq::AttentionOptions{};
    sparq::BlockMask m;
    if (mask) {
      if (mask->kind == SPARQ_MASK_BITMAP) {
        need(mask->bitmap, "mask->bitmap");
        m = sparq::BlockMask::from_bitmap(mask->bitmap->tensor, mask->block_q, mask->block_k);
      } else if (mask->kind == SPARQ_MASK_LUT) {
        need(mask->counts, "mask->counts");
        need(mask->indices, "mask->indices");
        m = sparq::BlockMask::from_lut(mask->counts->tensor, mask->indices->tensor, mask->block_q, mask->block_k);
      } else {
        bad("mask->kind is neither SPARQ_MASK_BITMAP nor SPARQ_MASK_LUT");
      }
    }
    sparq::attention(ctx->ctx, q->tensor, k->tensor, v->tensor, out->tensor, o, mask ? &m : nullptr,
                     lse ? &lse->tensor : nullptr);
  });
}

sparq_sparge_params sparq_default_sparge_params(void) { return to_c(sparq::SpargeParams{}); }

sparq_sparge_options sparq_default_sparge_options(void) {
  sparq::SpargeOptions o;
  sparq_sparge_options c;
  c.attention = sparq_default_options();
  c.block_q = o.block_q;
  c.block_k = o.block_k;
  c.attention_sink = o.attention_sink;
  c.diagonal = o.diagonal;
  c.hilbert_t = c.hilbert_h = c.hilbert_w = 0;
  return c;
}

sparq_status sparq_sparge_attention(sparq_context ctx, sparq_tensor q, sparq_tensor k, sparq_tensor v,
                                    sparq_tensor out, const sparq_sparge_options* options,
                                    const sparq_sparge_params* per_head, int num_params, sparq_sparge_stats* stats) {
  return guarded([&] {
    need(ctx, "ctx");
    need(q, "q");
    need(k, "k");
    need(v, "v");
    need(out, "out");
    need(per_head, "per_head");
    if (num_params < 1) bad("num_params must be >= 1, got " + std::to_string(num_params));
    sparq_sparge_options c = options ? *options : sparq_default_sparge_options();
    sparq::SpargeOptions o;
    o.attention = attention_options(c.attention);
    o.block_q = c.block_q;
    o.block_k = c.block_k;
    o.attention_sink = c.attention_sink != 0;
    o.diagonal = c.diagonal != 0;
    if (c.hilbert_t || c.hilbert_h || c.hilbert_w) o.hilbert = sparq::TokenGrid{c.hilbert_t, c.hilbert_h, c.hilbert_w};
    std::vector<sparq::SpargeParams> params;
    for (int i = 0; i < num_params; ++i) params.push_back(from_c(per_head[i]));
    sparq::SpargeStats s;
    sparq::sparge_attention(ctx->ctx, q->tensor, k->tensor, v->tensor, out->tensor, o, params, stats ? &s : nullptr);
    if (stats) *stats = {s.block_sparsity, s.pv_skip_fraction};
  });
}

sparq_status sparq_hyperparams_load(const char* path, sparq_hyperparams* out) {
  return guarded([&] {
    need(path, "path");
    need(out, "out");
    *out = nullptr;
    *out = new sparq_hyperparams_s{sparq::HyperParams::load(path)};
  });
}

void sparq_hyperparams_destroy(sparq_hyperparams hp) { delete hp; }

sparq_status sparq_hyperparams_layer(sparq_hyperparams hp, const char* layer, int heads, sparq_sparge_params* params,
                                     int capacity, int* count) {
  return guarded([&] {
    need(hp, "hp");
    need(layer, "layer");
    need(count, "count");
    const std::vector<sparq::SpargeParams>& found = hp->params.layer(layer, heads);
    *count = static_cast<int>(found.size());
    if (static_cast<int>(found.size()) > capacity)
      bad("layer " + std::string(layer) + " has " + std::to_string(found.size()) + " heads, more than capacity " +
          std::to_string(capacity));
    need(params, "params");
    for (std::size_t i = 0; i < found.size(); ++i) params[i] = to_c(found[i]);
  });
}

}  // extern "C"
