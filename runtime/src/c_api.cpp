// The C API: opaque handles over the C++ objects, every exception turned into a status code plus a
// thread-local message.
#include <sparq/sparq.h>

#include "backend.hpp"

#include <cstring>
#include <new>

struct sparq_context_s {
  sparq::Context ctx;
};
struct sparq_tensor_s {
  sparq::Tensor tensor;
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
    sparq::AttentionOptions o;
    if (options) {
      if (options->layout < SPARQ_LAYOUT_HND || options->layout > SPARQ_LAYOUT_NHD) bad("options->layout is invalid");
      if (options->qk_precision < SPARQ_QK_INT8 || options->qk_precision > SPARQ_QK_FP16)
        bad("options->qk_precision is invalid");
      if (options->qk_granularity < SPARQ_QK_PER_BLOCK || options->qk_granularity > SPARQ_QK_PER_THREAD)
        bad("options->qk_granularity is invalid");
      if (options->pv_precision < SPARQ_PV_AUTO || options->pv_precision > SPARQ_PV_FP8)
        bad("options->pv_precision is invalid");
      o.layout = static_cast<sparq::Layout>(options->layout);
      o.causal = options->causal != 0;
      o.scale = options->scale;
      o.smooth_k = options->smooth_k != 0;
      o.qk_precision = static_cast<sparq::QKPrecision>(options->qk_precision);
      o.qk_granularity = static_cast<sparq::QKGranularity>(options->qk_granularity);
      o.pv_precision = static_cast<sparq::PVPrecision>(options->pv_precision);
    }
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

}  // extern "C"
