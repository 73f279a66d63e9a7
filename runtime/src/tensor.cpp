// Tensor views, block masks, names of enums.
#include "backend.hpp"

#include <sstream>

namespace sparq {

const char* version() { return "0.1.0"; }

const char* to_string(Backend b) {
  switch (b) {
    case Backend::Auto: return "auto";
    case Backend::Cuda: return "cuda";
    case Backend::Vulkan: return "vulkan";
    case Backend::Reference: return "reference";
  }
  return "?";
}

const char* to_string(DType d) {
  switch (d) {
    case DType::F16: return "f16";
    case DType::BF16: return "bf16";
    case DType::F32: return "f32";
    case DType::I8: return "i8";
    case DType::U8: return "u8";
    case DType::I32: return "i32";
  }
  return "?";
}

const char* to_string(Status s) {
  switch (s) {
    case Status::Ok: return "ok";
    case Status::InvalidArgument: return "invalid argument";
    case Status::NotSupported: return "not supported";
    case Status::BackendUnavailable: return "backend unavailable";
    case Status::OutOfMemory: return "out of memory";
    case Status::DeviceError: return "device error";
    case Status::Internal: return "internal error";
  }
  return "?";
}

std::size_t dtype_size(DType d) {
  switch (d) {
    case DType::F16: case DType::BF16: return 2;
    case DType::F32: case DType::I32: return 4;
    case DType::I8: case DType::U8: return 1;
  }
  return 0;
}

namespace detail {

[[noreturn]] void fail(Status status, const std::string& message) { throw Error(status, message); }

[[noreturn]] void not_supported(Backend backend, const std::string& what) {
  fail(Status::NotSupported, what + " is not supported by the " + to_string(backend) + " backend");
}

std::string shape_string(const std::vector<int64_t>& v) {
  std::ostringstream s;
  s << '[';
  for (std::size_t i = 0; i < v.size(); ++i) s << (i ? ", " : "") << v[i];
  s << ']';
  return s.str();
}

std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> strides(shape.size(), 1);
  for (int i = static_cast<int>(shape.size()) - 2; i >= 0; --i) strides[i] = strides[i + 1] * shape[i + 1];
  return strides;
}

// Checks shape/strides and returns the number of bytes the view spans from its first element.
std::size_t checked_extent_bytes(DType dtype, const std::vector<int64_t>& shape, const std::vector<int64_t>& strides,
                                 const char* what) {
  if (shape.empty() || shape.size() > 4)
    fail(Status::InvalidArgument, std::string(what) + ": rank must be 1 to 4, got " + std::to_string(shape.size()));
  if (strides.size() != shape.size())
    fail(Status::InvalidArgument, std::string(what) + ": strides " + shape_string(strides) +
                                      " must have one entry per dimension of shape " + shape_string(shape));
  std::size_t last = 0;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] <= 0 || shape[i] > (int64_t(1) << 31))
      fail(Status::InvalidArgument, std::string(what) + ": shape " + shape_string(shape) +
                                        " must have every dimension in [1, 2^31]");
    if (strides[i] < 0)
      fail(Status::InvalidArgument, std::string(what) + ": strides " + shape_string(strides) + " must be >= 0");
    last += static_cast<std::size_t>(shape[i] - 1) * static_cast<std::size_t>(strides[i]);
  }
  return (last + 1) * dtype_size(dtype);
}

}  // namespace detail

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t s : shape_) n *= s;
  return shape_.empty() ? 0 : n;
}

bool Tensor::is_contiguous() const { return strides_ == detail::contiguous_strides(shape_); }

Tensor Tensor::view(std::vector<int64_t> shape, std::vector<int64_t> strides) const {
  if (!defined()) detail::fail(Status::InvalidArgument, "Tensor::view: the tensor is empty (default-constructed)");
  if (strides.empty()) strides = detail::contiguous_strides(shape);
  std::size_t bytes = detail::checked_extent_bytes(dtype_, shape, strides, "Tensor::view");
  if (offset_bytes_ + bytes > storage_->bytes)
    detail::fail(Status::InvalidArgument, "Tensor::view: shape " + detail::shape_string(shape) + " with strides " +
                                              detail::shape_string(strides) + " spans " + std::to_string(bytes) +
                                              " bytes, more than the " +
                                              std::to_string(storage_->bytes - offset_bytes_) + " bytes of memory");
  Tensor t = *this;
  t.shape_ = std::move(shape);
  t.strides_ = std::move(strides);
  return t;
}

BlockMask BlockMask::from_bitmap(Tensor bitmap, int block_q, int block_k) {
  BlockMask m;
  m.kind_ = Kind::Bitmap;
  m.bitmap_ = std::move(bitmap);
  m.block_q_ = block_q;
  m.block_k_ = block_k;
  return m;
}

BlockMask BlockMask::from_lut(Tensor counts, Tensor indices, int block_q, int block_k) {
  BlockMask m;
  m.kind_ = Kind::Lut;
  m.counts_ = std::move(counts);
  m.indices_ = std::move(indices);
  m.block_q_ = block_q;
  m.block_k_ = block_k;
  return m;
}

}  // namespace sparq
