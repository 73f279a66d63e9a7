// Context: backend choice, memory, copies. The backends themselves live in backends/.
#include "backend.hpp"

#include <cstdlib>
#include <cstring>

namespace sparq {
namespace detail {

std::shared_ptr<Storage> BackendImpl::wrap_host(void*, std::size_t) {
  not_supported(kind(), "wrapping host memory (use Context::from_host, or the reference backend)");
}
std::shared_ptr<Storage> BackendImpl::wrap_cuda(void*, std::size_t) {
  not_supported(kind(), "wrapping a CUDA device pointer");
}
void BackendImpl::set_cuda_stream(void*) { not_supported(kind(), "a CUDA stream"); }
std::shared_ptr<Storage> BackendImpl::wrap_vulkan(uint64_t, std::size_t, std::size_t) {
  not_supported(kind(), "wrapping a VkBuffer");
}
VulkanHandles BackendImpl::vulkan_handles() const { not_supported(kind(), "Vulkan handles"); }

#ifndef SPARQ_HAVE_CUDA
std::shared_ptr<BackendImpl> make_cuda_backend(int) {
  fail(Status::BackendUnavailable, "the cuda backend was not built (configure with -Dcuda=enabled and nvcc on PATH)");
}
#endif
#ifndef SPARQ_HAVE_VULKAN
std::shared_ptr<BackendImpl> make_vulkan_backend(int) {
  fail(Status::BackendUnavailable,
       "the vulkan backend was not built (configure with -Dvulkan=enabled; scripts/install-deps.sh installs what "
       "it needs)");
}
#endif

namespace {

std::shared_ptr<BackendImpl> make_backend(Backend backend, int device) {
  switch (backend) {
    case Backend::Cuda: return make_cuda_backend(device);
    case Backend::Vulkan: return make_vulkan_backend(device);
    case Backend::Reference: return make_reference_backend();
    case Backend::Auto: break;
  }
  // Auto: SPARQ_BACKEND may force one; otherwise the first that has a device.
  if (const char* forced = std::getenv("SPARQ_BACKEND"); forced && *forced) {
    std::string f = forced;
    if (f == "cuda") return make_cuda_backend(device);
    if (f == "vulkan") return make_vulkan_backend(device);
    if (f == "reference") return make_reference_backend();
    fail(Status::InvalidArgument, "SPARQ_BACKEND=" + f + ": expected cuda, vulkan or reference");
  }
  for (Backend b : {Backend::Cuda, Backend::Vulkan}) {
    try {
      return make_backend(b, device);
    } catch (const Error& e) {
      if (e.status() != Status::BackendUnavailable) throw;
    }
  }
  return make_reference_backend();
}

void copy_strided(std::byte* dst, const std::byte* src, const std::vector<int64_t>& shape,
                  const std::vector<int64_t>& strides, std::size_t elem, bool to_strided) {
  // Walks the view in row-major order; `dst`/`src` is contiguous on the other side.
  std::vector<int64_t> shape4(4, 1), strides4(4, 0);
  std::size_t off = 4 - shape.size();
  for (std::size_t i = 0; i < shape.size(); ++i) shape4[off + i] = shape[i], strides4[off + i] = strides[i];
  std::size_t linear = 0;
  for (int64_t a = 0; a < shape4[0]; ++a)
    for (int64_t b = 0; b < shape4[1]; ++b)
      for (int64_t c = 0; c < shape4[2]; ++c)
        for (int64_t d = 0; d < shape4[3]; ++d, ++linear) {
          std::size_t s = static_cast<std::size_t>(a * strides4[0] + b * strides4[1] + c * strides4[2] + d * strides4[3]);
          if (to_strided) std::memcpy(dst + s * elem, src + linear * elem, elem);
          else std::memcpy(dst + linear * elem, src + s * elem, elem);
        }
}

}  // namespace
}  // namespace detail

using detail::fail;

namespace {
// What the copies of one Context share: the backend, whose runtime cache is dropped when the last copy goes
// away (BackendImpl::runtime_cache: the backend cannot drop it itself while the cache's tensors keep it alive).
struct ContextState {
  std::shared_ptr<detail::BackendImpl> impl;
  ~ContextState() {
    if (impl) impl->runtime_cache.reset();  // null when the backend could not be made
  }
};
}  // namespace

Context Context::create(Backend backend, int device) {
  auto state = std::make_shared<ContextState>();
  state->impl = detail::make_backend(backend, device);
  Context ctx;
  ctx.impl_ = std::shared_ptr<detail::BackendImpl>(state, state->impl.get());  // aliasing: owns the state
  return ctx;
}

Backend Context::backend() const { return impl_->kind(); }
std::string Context::device_name() const { return impl_->device_name(); }
PVPrecision Context::default_pv_precision() const { return impl_->default_pv_precision(); }
std::array<int, 2> Context::mask_granularity() const { return impl_->mask_granularity(); }

Tensor Context::empty(DType dtype, std::vector<int64_t> shape) {
  std::vector<int64_t> strides = detail::contiguous_strides(shape);
  std::size_t bytes = detail::checked_extent_bytes(dtype, shape, strides, "Context::empty");
  Tensor t;
  t.storage_ = impl_->allocate(bytes);
  t.storage_->owner = impl_.get();
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  t.strides_ = std::move(strides);
  return t;
}

Tensor Context::from_host(DType dtype, std::vector<int64_t> shape, const void* data) {
  Tensor t = empty(dtype, std::move(shape));
  from_host(t, data);
  return t;
}

namespace {
void check_mine(const Context& ctx, const Tensor& t, const char* what) {
  if (!t.defined()) fail(Status::InvalidArgument, std::string(what) + ": the tensor is empty (default-constructed)");
  if (t.storage()->owner != &ctx.impl())
    fail(Status::InvalidArgument, std::string(what) + ": the tensor belongs to another context (" +
                                      to_string(t.storage()->backend) + "), not this " + to_string(ctx.backend()) +
                                      " context");
}
std::size_t span_bytes(const Tensor& t) {
  return detail::checked_extent_bytes(t.dtype(), t.shape(), t.strides(), "tensor");
}
}  // namespace

void Context::to_host(const Tensor& t, void* data) {
  check_mine(*this, t, "Context::to_host");
  if (!data) fail(Status::InvalidArgument, "Context::to_host: data is null");
  std::size_t span = span_bytes(t);
  if (t.is_contiguous()) {
    impl_->download(*t.storage(), t.offset_bytes(), data, span);
    return;
  }
  std::vector<std::byte> staged(span);
  impl_->download(*t.storage(), t.offset_bytes(), staged.data(), span);
  detail::copy_strided(static_cast<std::byte*>(data), staged.data(), t.shape(), t.strides(), dtype_size(t.dtype()),
                       false);
}

void Context::from_host(const Tensor& t, const void* data) {
  check_mine(*this, t, "Context::from_host");
  if (!data) fail(Status::InvalidArgument, "Context::from_host: data is null");
  std::size_t span = span_bytes(t);
  if (t.is_contiguous()) {
    impl_->upload(*t.storage(), t.offset_bytes(), data, span);
    return;
  }
  // Read-modify-write keeps the bytes between the view's elements (another view's data) intact.
  std::vector<std::byte> staged(span);
  impl_->download(*t.storage(), t.offset_bytes(), staged.data(), span);
  detail::copy_strided(staged.data(), static_cast<const std::byte*>(data), t.shape(), t.strides(),
                       dtype_size(t.dtype()), true);
  impl_->upload(*t.storage(), t.offset_bytes(), staged.data(), span);
}

Tensor Context::wrap_host(void* data, DType dtype, std::vector<int64_t> shape, std::vector<int64_t> strides) {
  if (!data) fail(Status::InvalidArgument, "Context::wrap_host: data is null");
  if (strides.empty()) strides = detail::contiguous_strides(shape);
  std::size_t bytes = detail::checked_extent_bytes(dtype, shape, strides, "Context::wrap_host");
  Tensor t;
  t.storage_ = impl_->wrap_host(data, bytes);
  t.storage_->owner = impl_.get();
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  t.strides_ = std::move(strides);
  return t;
}

Tensor Context::wrap_cuda(void* device_ptr, std::size_t bytes, DType dtype, std::vector<int64_t> shape,
                          std::vector<int64_t> strides) {
  if (!device_ptr) fail(Status::InvalidArgument, "Context::wrap_cuda: device_ptr is null");
  if (strides.empty()) strides = detail::contiguous_strides(shape);
  std::size_t span = detail::checked_extent_bytes(dtype, shape, strides, "Context::wrap_cuda");
  if (span > bytes)
    fail(Status::InvalidArgument, "Context::wrap_cuda: shape " + detail::shape_string(shape) + " spans " +
                                      std::to_string(span) + " bytes but bytes = " + std::to_string(bytes));
  Tensor t;
  t.storage_ = impl_->wrap_cuda(device_ptr, bytes);
  t.storage_->owner = impl_.get();
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  t.strides_ = std::move(strides);
  return t;
}

Tensor Context::wrap_vulkan(uint64_t buffer, std::size_t offset, std::size_t bytes, DType dtype,
                            std::vector<int64_t> shape, std::vector<int64_t> strides) {
  if (!buffer) fail(Status::InvalidArgument, "Context::wrap_vulkan: buffer is VK_NULL_HANDLE");
  if (strides.empty()) strides = detail::contiguous_strides(shape);
  std::size_t span = detail::checked_extent_bytes(dtype, shape, strides, "Context::wrap_vulkan");
  if (span > bytes)
    fail(Status::InvalidArgument, "Context::wrap_vulkan: shape " + detail::shape_string(shape) + " spans " +
                                      std::to_string(span) + " bytes but bytes = " + std::to_string(bytes));
  if (offset % dtype_size(dtype))
    fail(Status::InvalidArgument, "Context::wrap_vulkan: offset " + std::to_string(offset) +
                                      " is not a multiple of the element size " + std::to_string(dtype_size(dtype)));
  Tensor t;
  t.storage_ = impl_->wrap_vulkan(buffer, offset, bytes);
  t.storage_->owner = impl_.get();
  t.offset_bytes_ = offset;
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  t.strides_ = std::move(strides);
  return t;
}

VulkanHandles Context::vulkan_handles() const { return impl_->vulkan_handles(); }

void Context::set_cuda_stream(void* stream) { impl_->set_cuda_stream(stream); }
void Context::synchronize() { impl_->synchronize(); }
void Context::set_profiling(bool enabled) {
  profiling_ = enabled;
  impl_->set_profiling(enabled);
}
Timing Context::last_timing() const { return impl_->last_timing(); }

}  // namespace sparq
