// sparq — sparse and quantized attention for CUDA, Vulkan and the CPU.
//
// The whole public C++ surface is in this header. The numerics every backend follows are described in
// docs/NUMERICS.md; the C API (sparq.h) mirrors this one.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace sparq {

enum class Backend { Auto, Cuda, Vulkan, Reference };
enum class DType { F16, BF16, F32, I8, U8, I32 };
// HND = [batch, heads, tokens, head_dim]; NHD = [batch, tokens, heads, head_dim].
enum class Layout { HND, NHD };
enum class QKPrecision { Int8, Fp16 };
// Groups of tokens that share one INT8 scale (see docs/NUMERICS.md for the exact groups).
enum class QKGranularity { PerBlock, PerWarp, PerThread };
// Auto: the fastest P·V precision the backend runs within the accuracy budget (fp8 where it has it).
enum class PVPrecision { Auto, Fp16, Fp8 };

enum class Status {
  Ok = 0,
  InvalidArgument = 1,
  NotSupported = 2,       // valid request, but this backend or this build cannot do it
  BackendUnavailable = 3, // no device / driver / the backend was not built
  OutOfMemory = 4,
  DeviceError = 5,        // the CUDA or Vulkan driver reported an error
  Internal = 6,
};

const char* to_string(Backend);
const char* to_string(DType);
const char* to_string(Status);
std::size_t dtype_size(DType);

// Every failure is reported as an Error carrying a Status and a message that names what was wrong.
class Error : public std::runtime_error {
 public:
  Error(Status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  Status status() const { return status_; }

 private:
  Status status_;
};

namespace detail {
struct Storage;
class BackendImpl;
}  // namespace detail

// A strided view of memory that belongs to one context (owned by it, or the caller's memory wrapped).
// Shapes have 1 to 4 dimensions; strides are in elements. Copying a Tensor copies the view, not the data.
class Tensor {
 public:
  Tensor() = default;
  bool defined() const { return storage_ != nullptr; }
  DType dtype() const { return dtype_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  const std::vector<int64_t>& shape() const { return shape_; }
  const std::vector<int64_t>& strides() const { return strides_; }
  int64_t numel() const;
  bool is_contiguous() const;
  // A view of the same memory with another shape and strides (elements); checked against the memory size.
  Tensor view(std::vector<int64_t> shape, std::vector<int64_t> strides) const;

  // For backends and tests.
  detail::Storage* storage() const { return storage_.get(); }
  std::size_t offset_bytes() const { return offset_bytes_; }

 private:
  friend class Context;
  std::shared_ptr<detail::Storage> storage_;
  std::size_t offset_bytes_ = 0;
  DType dtype_ = DType::F16;
  std::vector<int64_t> shape_, strides_;
};

// Which (query block, key block) tiles are computed. A mask carries its block size; kernels accept masks
// whose block size is a multiple of their tile (Context::mask_granularity()).
class BlockMask {
 public:
  enum class Kind { Bitmap, Lut };
  // bitmap: U8 [B, Hm, ceil(Nq/block_q), ceil(Nk/block_k)], Hm in {1, Hkv, Hq}; nonzero = compute.
  static BlockMask from_bitmap(Tensor bitmap, int block_q, int block_k);
  // counts: I32 [B, Hq, nQB]; indices: I32 [B, Hq, nQB, nKB], the first counts[..] entries ascending.
  // Contents are not validated on the host (they may live on the GPU): counts are clamped to [0, nKB] and
  // indices outside [0, nKB) are ignored, so a malformed LUT cannot make a kernel read out of bounds.
  static BlockMask from_lut(Tensor counts, Tensor indices, int block_q, int block_k);

  Kind kind() const { return kind_; }
  int block_q() const { return block_q_; }
  int block_k() const { return block_k_; }
  const Tensor& bitmap() const { return bitmap_; }
  const Tensor& counts() const { return counts_; }
  const Tensor& indices() const { return indices_; }

 private:
  Kind kind_ = Kind::Bitmap;
  int block_q_ = 0, block_k_ = 0;
  Tensor bitmap_, counts_, indices_;
};

struct AttentionOptions {
  Layout layout = Layout::HND;
  bool causal = false;          // bottom-right aligned: query i sees keys j <= i + (Nk - Nq)
  float scale = 0.0f;           // softmax scale; 0 means 1/sqrt(head_dim)
  bool smooth_k = true;         // subtract the per-channel token mean of K before quantizing
  QKPrecision qk_precision = QKPrecision::Int8;
  QKGranularity qk_granularity = QKGranularity::PerBlock;
  PVPrecision pv_precision = PVPrecision::Auto;
};

// The Vulkan objects a Vulkan context runs on (VkInstance, VkPhysicalDevice, VkDevice, VkQueue as opaque
// pointers, so this header needs no Vulkan headers). An app creates its buffers on `device` (with
// VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | TRANSFER_SRC | TRANSFER_DST) and wraps them with Context::wrap_vulkan.
struct VulkanHandles {
  void* instance = nullptr;
  void* physical_device = nullptr;
  void* device = nullptr;
  void* queue = nullptr;
  uint32_t queue_family = 0;
};

// Device time of the last attention() call, measured when Context::set_profiling(true).
struct Timing {
  double total_ms = 0;       // everything from fp16/bf16 q, k, v to out (end-to-end)
  double attention_ms = 0;   // the attention kernel alone (kernel-only)
};

class Context {
 public:
  // Auto picks CUDA if a CUDA GPU is present, else Vulkan, else the CPU reference.
  // device: index among the backend's devices; -1 = the backend's default (SPARQ_VULKAN_DEVICE may name one).
  static Context create(Backend backend = Backend::Auto, int device = -1);

  Backend backend() const;
  std::string device_name() const;
  // What PVPrecision::Auto means on this context (Fp16 or Fp8).
  PVPrecision default_pv_precision() const;
  // Mask block sizes must be multiples of these (the kernel tile): {block_q, block_k}.
  std::array<int, 2> mask_granularity() const;

  Tensor empty(DType dtype, std::vector<int64_t> shape);  // contiguous, uninitialised
  Tensor from_host(DType dtype, std::vector<int64_t> shape, const void* data);
  // Copies a tensor (any strides) into contiguous host memory of numel() elements.
  void to_host(const Tensor& tensor, void* data);
  void from_host(const Tensor& tensor, const void* data);  // contiguous host data into any strides
  // Wrap caller memory: host memory (Reference backend), a CUDA device pointer (Cuda backend).
  Tensor wrap_host(void* data, DType dtype, std::vector<int64_t> shape, std::vector<int64_t> strides = {});
  Tensor wrap_cuda(void* device_ptr, std::size_t bytes, DType dtype, std::vector<int64_t> shape,
                   std::vector<int64_t> strides = {});
  // A VkBuffer (its handle value) of this context's device (see vulkan_handles()), from byte `offset`, with
  // `bytes` usable bytes. The caller keeps the buffer alive and finishes its own writes to it before sparq
  // reads it; sparq's work on it is complete after Context::synchronize().
  Tensor wrap_vulkan(uint64_t buffer, std::size_t offset, std::size_t bytes, DType dtype, std::vector<int64_t> shape,
                     std::vector<int64_t> strides = {});
  VulkanHandles vulkan_handles() const;
  // CUDA: the stream (a cudaStream_t) all work of this context is ordered on; nullptr = default stream.
  void set_cuda_stream(void* stream);

  void synchronize();
  void set_profiling(bool enabled);
  Timing last_timing() const;

  detail::BackendImpl& impl() const { return *impl_; }

 private:
  std::shared_ptr<detail::BackendImpl> impl_;
  bool profiling_ = false;
};

// out = softmax(scale · q·kᵀ [masked]) · v.
// q: [B, Hq, Nq, D] (HND) or [B, Nq, Hq, D] (NHD); k, v: the same with Hkv heads and Nk tokens; Hq a
// multiple of Hkv. F16 or BF16, head_dim contiguous. out: like q (F16 or BF16). lse: F32 [B, Hq, Nq],
// natural log. On error nothing is written.
void attention(Context& ctx, const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
               const AttentionOptions& options = {}, const BlockMask* mask = nullptr, Tensor* lse = nullptr);

// The version of the library, "major.minor.patch".
const char* version();

}  // namespace sparq
