// The interface between the runtime (validation, dispatch) and the backends. Internal, not installed.
//
// The runtime validates every argument, resolves defaults and layouts, and hands a backend one flat
// AttentionProblem: sizes, canonical strides and options, nothing left to interpret.
#pragma once

#include <sparq/sparq.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sparq::detail {

// Memory of one backend. Reference storage is host memory; CUDA storage a device pointer; Vulkan a buffer.
struct Storage {
  virtual ~Storage() = default;
  std::size_t bytes = 0;
  Backend backend = Backend::Reference;
  bool owned = true;  // false when it wraps the caller's memory
  const void* owner = nullptr;  // the BackendImpl (context) it belongs to; set by Context
};

// Host memory: the reference backend's storage, and caller host memory it wraps.
struct HostStorage : Storage {
  std::unique_ptr<std::byte[]> owned_data;
  std::byte* data = nullptr;
};

// One tensor operand resolved to canonical [batch, head, token, channel] strides in elements
// (the channel stride is 1). The layout option has already been applied.
struct Operand {
  Storage* storage = nullptr;
  std::size_t offset_bytes = 0;
  DType dtype = DType::F16;
  int64_t stride_batch = 0, stride_head = 0, stride_token = 0;
};

enum class MaskLayout { None, Bitmap, Lut };

struct SpargePredictProblem;

// The one params struct. Sizes: B batches, Hq query heads, Hkv key/value heads (Hq % Hkv == 0),
// query head h reads key/value head h / (Hq / Hkv).
struct AttentionProblem {
  int batch = 0, heads_q = 0, heads_kv = 0, tokens_q = 0, tokens_k = 0, head_dim = 0;
  Operand q, k, v, out;
  bool causal = false;
  float scale = 0.0f;  // resolved (never 0)
  bool smooth_k = true;
  QKPrecision qk_precision = QKPrecision::Int8;
  QKGranularity qk_granularity = QKGranularity::PerBlock;
  PVPrecision pv_precision = PVPrecision::Fp16;  // resolved (never Auto)

  MaskLayout mask_layout = MaskLayout::None;
  int mask_block_q = 0, mask_block_k = 0;
  int mask_heads = 0;          // Hm: 1, Hkv or Hq; mask head for query head h: h / (Hq / Hm)
  int mask_blocks_q = 0, mask_blocks_k = 0;  // ceil(Nq / block_q), ceil(Nk / block_k)
  // Bitmap: U8 [B, Hm, nQB, nKB]; Lut: counts I32 [B, Hq, nQB], indices I32 [B, Hq, nQB, nKB].
  // Canonical contiguous strides are required for masks (checked by the runtime).
  Operand mask_bitmap, mask_counts, mask_indices;

  // SpargeAttn stage 2 (P·V skip): per query head threshold λ in log2 units; empty = never skip.
  // A warp/subgroup (the reference: each 16-row group) skips exp, row sum and P·V of a key tile when every
  // row's tile max is more than λ below its running max.
  std::vector<float> pv_threshold;
  // Optional statistics, filled by backends that support them (nullptr = not wanted).
  struct Stats {
    int64_t tiles_total = 0;     // (query block, key tile) pairs the dense problem has
    int64_t tiles_computed = 0;  // pairs the mask let through
    int64_t pv_skipped = 0;      // 16-row groups x key tiles whose P·V stage 2 skipped
    int64_t pv_total = 0;        // 16-row groups x key tiles visited
  };
  Stats* stats = nullptr;

  bool has_lse = false;
  Operand lse;  // F32 [B, Hq, Nq]: stride_batch, stride_head, stride_token

  // A token order fused into the reads and writes (SpargeAttn's Hilbert order; backends whose
  // reads_token_order() is true): when token_order.storage is set (I32 [token_order_size], size <= Nq == Nk),
  // the problem is attention over the reordered sequence: its token i is row order[i] of q, k and v (row i
  // beyond the order), and its output and LSE row i are written to row order[i]. The tensors stay in the
  // caller's order, so no permuted copies are made.
  Operand token_order;
  int64_t token_order_size = 0;
  // SpargeAttn stage 1 fused into this call (set only where fuses_sparge_predict() accepted it): the backend
  // predicts the block LUT in the passes that quantize q and k (no pass of its own over them) and writes it to
  // predict->counts / indices, which mask_counts / mask_indices also name (a Lut mask of predict's blocks),
  // before the attention kernel reads it. The same LUT, bit for bit, as sparge_predict() of the same problem.
  const SpargePredictProblem* predict = nullptr;

  int kv_group() const { return heads_q / heads_kv; }
};

// SpargeAttn stage 1 on a device (docs/SPARGE.md, "Exact arithmetic": the LUT must equal the host
// reference's bit for bit). Sizes and operands as in AttentionProblem; block sizes are multiples of the
// backend's mask granularity; per-head parameters resolved to Hq entries.
struct SpargePredictProblem {
  int batch = 0, heads_q = 0, heads_kv = 0, tokens_q = 0, tokens_k = 0, head_dim = 0;
  Operand q, k;  // fp16 / bf16, canonical [B, H, N, D] strides
  int block_q = 0, block_k = 0, blocks_q = 0, blocks_k = 0;
  bool causal = false, sink = false, diagonal = true;
  float scale_log2 = 0;  // scale·log2(e), rounded once on the host
  float inv_tokens_k = 0;                  // 1/Nk
  float inv_block_q = 0, inv_tail_q = 0;   // 1/block_q, 1/(tokens of the last query block)
  float inv_block_k = 0, inv_tail_k = 0;
  std::vector<float> simthreshd, cdfthreshd, topk;  // [Hq]
  std::vector<uint8_t> dense;                       // [Hq]
  Operand counts, indices;  // outputs: I32 [B, Hq, nQB] and [B, Hq, nQB, nKB] (contiguous)
  Operand token_order;      // as in AttentionProblem: q and k read in this order (storage null: as stored)
  int64_t token_order_size = 0;
};

// For every (src, dst) pair: dst[b, h, i] = src[b, h, order[i]] for i < order.size(), dst[b, h, i] =
// src[b, h, i] beyond: token rows of D elements of `elem_bytes` each (canonical strides). sparge_attention
// passes q, k and v as three pairs of one problem (heads may differ: GQA); src and dst never overlap.
struct PermuteProblem {
  struct Pair {
    int heads = 0;
    Operand src, dst;
  };
  int batch = 0, tokens = 0, head_dim = 0;
  std::size_t elem_bytes = 2;
  std::vector<Pair> pairs;
  const std::vector<int64_t>* order = nullptr;  // always set (host copy)
  // The same order as I32 [order->size()] in this backend's memory, cached by the runtime per grid and kept
  // alive until the work that reads it has finished: with it the backend needs neither an upload nor a
  // synchronization. storage == nullptr: not given (the backend copies *order to the device itself).
  Operand order_device;
};

// State the runtime keeps per context (SpargeAttn's Hilbert orders and scratch tensors, sparge_attention.cpp).
// Opaque to the backends.
struct RuntimeCache {
  virtual ~RuntimeCache() = default;
};

class BackendImpl {
 public:
  virtual ~BackendImpl() = default;
  virtual Backend kind() const = 0;
  virtual std::string device_name() const = 0;
  virtual std::array<int, 2> mask_granularity() const = 0;

  virtual std::shared_ptr<Storage> allocate(std::size_t bytes) = 0;
  virtual std::shared_ptr<Storage> wrap_host(void* data, std::size_t bytes);
  virtual std::shared_ptr<Storage> wrap_cuda(void* device_ptr, std::size_t bytes);
  virtual void set_cuda_stream(void* stream);
  // The storage spans bytes [0, offset + bytes) of the caller's VkBuffer.
  virtual std::shared_ptr<Storage> wrap_vulkan(uint64_t buffer, std::size_t offset, std::size_t bytes);
  virtual VulkanHandles vulkan_handles() const;
  // Byte copies between host memory and a storage.
  virtual void upload(Storage& dst, std::size_t offset, const void* src, std::size_t bytes) = 0;
  virtual void download(const Storage& src, std::size_t offset, void* dst, std::size_t bytes) = 0;

  // What PVPrecision::Auto means here: the fastest P·V precision within the accuracy budget.
  virtual PVPrecision default_pv_precision() const { return PVPrecision::Fp16; }
  // Whether attention() honours AttentionProblem::pv_threshold (the SpargeAttn stage-2 P·V skip).
  virtual bool supports_pv_skip() const { return false; }
  // Whether attention() and sparge_predict() honour a token order (AttentionProblem::token_order); where not,
  // the runtime permutes copies of the tensors.
  virtual bool reads_token_order() const { return false; }
  // Throws Error(NotSupported, "... not supported by the X backend ...") for what it cannot do.
  virtual void attention(const AttentionProblem& problem) = 0;

  // SpargeAttn on the device. Each returns false when this backend (or this problem size) has no device
  // version; the runtime then does the work on the host.
  virtual bool sparge_predict(const SpargePredictProblem&) { return false; }
  // Whether attention() can predict `sp`'s LUT in its own preprocessing (AttentionProblem::predict); where
  // not, the runtime calls sparge_predict() (or the host predictor) first.
  virtual bool fuses_sparge_predict(const SpargePredictProblem& sp) const {
    (void)sp;
    return false;
  }
  virtual bool permute_tokens(const PermuteProblem&) { return false; }

  virtual void synchronize() = 0;
  virtual void set_profiling(bool enabled) { profiling_ = enabled; }
  virtual Timing last_timing() const { return timing_; }

  // Used by the runtime only. Context::create drops it when the last copy of the Context goes away: it holds
  // tensors, and a Vulkan storage keeps its backend alive, so the backend's own destructor would never run.
  std::unique_ptr<RuntimeCache> runtime_cache;

 protected:
  bool profiling_ = false;
  Timing timing_;
};

// Factories; a backend that was not built, or finds no device, throws Error(BackendUnavailable, why).
std::shared_ptr<BackendImpl> make_reference_backend();
std::shared_ptr<BackendImpl> make_cuda_backend(int device);
std::shared_ptr<BackendImpl> make_vulkan_backend(int device);

// Shape helpers shared by the runtime and the backends.
std::string shape_string(const std::vector<int64_t>& v);
std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& shape);
// Checks a view's shape and strides (naming `what` in errors); returns the bytes it spans.
std::size_t checked_extent_bytes(DType dtype, const std::vector<int64_t>& shape, const std::vector<int64_t>& strides,
                                 const char* what);

// A [B, H, N, D] tensor of `layout` as an operand: its storage and its batch, head and token strides.
Operand operand(const Tensor& t, Layout layout);

// attention()'s validation: checks every argument and fills the problem without dispatching it.
AttentionProblem make_problem(Context& ctx, const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                              const AttentionOptions& options, const BlockMask* mask, Tensor* lse);

[[noreturn]] void fail(Status status, const std::string& message);
[[noreturn]] void not_supported(Backend backend, const std::string& what);

}  // namespace sparq::detail
