// CUDA backend, host side: device selection, memory, the caller's stream, the workspace of quantized operands,
// kernel choice from the generated registry, and timing. Kernels: cuda_backend_kernels.cu (preprocessing)
// and the generated attention_sm*_d*_*.cu (attention_kernel.cuh).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "backend.hpp"
#include "cuda_registry.hpp"
#include "preprocess.hpp"
#include "sparge_predictor.hpp"

namespace sparq::detail {
namespace {

std::string error_text(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")";
}

[[noreturn]] void cuda_fail(cudaError_t e, const std::string& what) {
  cudaGetLastError();  // clear a non-sticky error so the context stays usable
  fail(e == cudaErrorMemoryAllocation ? Status::OutOfMemory : Status::DeviceError,
       "CUDA backend: " + what + " failed: " + error_text(e));
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) cuda_fail(e, what);
}

// Makes `device` current for the lifetime of the guard (a context may be used from any thread).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

struct CudaStorage : Storage {
  void* ptr = nullptr;
  int device = 0;
  ~CudaStorage() override {
    if (owned && ptr) {
      int previous = device;
      cudaGetDevice(&previous);
      cudaSetDevice(device);
      cudaFree(ptr);
      cudaSetDevice(previous);
    }
  }
};

// Byte offsets of the workspace's parts, each 256-byte aligned.
struct WorkspaceLayout {
  std::size_t q8 = 0, k8 = 0, v8t = 0, q_scale = 0, k_scale = 0, v_scale = 0, q_km = 0, partial_sum = 0,
              partial_vmax = 0, k_mean = 0, v_copy = 0, total = 0;
};

std::size_t take(std::size_t& cursor, std::size_t bytes) {
  const std::size_t at = cursor;
  cursor += (bytes + 255) / 256 * 256;
  return at;
}

bool aligned16(const void* base, int64_t sb, int64_t sh, int64_t st) {
  return reinterpret_cast<std::uintptr_t>(base) % 16 == 0 && sb % 8 == 0 && sh % 8 == 0 && st % 8 == 0;
}

class CudaBackend final : public BackendImpl {
 public:
  explicit CudaBackend(int device) : device_(device) {
    DeviceGuard guard(device_);
    check(cudaGetDeviceProperties(&prop_, device_), "cudaGetDeviceProperties");
    arch_ = prop_.major * 10 + prop_.minor;
    // SPARQ_CUDA_PATH=sm80 / sm89 forces an older path on a newer GPU (to test that path anywhere); sm90a names
    // the wgmma path (the default on compute capability 9.0 where it was built).
    path_limit_ = arch_;
    if (const char* forced = std::getenv("SPARQ_CUDA_PATH"); forced && *forced) {
      const std::string f = forced;
      if (f != "sm80" && f != "sm89" && f != "sm90a")
        fail(Status::InvalidArgument, "SPARQ_CUDA_PATH=" + f + ": expected sm80, sm89 or sm90a");
      path_limit_ = std::min(arch_, std::stoi(f.substr(2, 2)));
    }
    for (cudaEvent_t& e : events_) check(cudaEventCreate(&e), "cudaEventCreate");
  }
  ~CudaBackend() override {
    int previous = device_;
    cudaGetDevice(&previous);
    cudaSetDevice(device_);
    if (workspace_) cudaFree(workspace_);
    if (sparge_ws_) cudaFree(sparge_ws_);
    for (cudaEvent_t e : events_)
      if (e) cudaEventDestroy(e);
    for (cudaEvent_t e : q_events_)
      if (e) cudaEventDestroy(e);
    if (q_stream_) cudaStreamDestroy(q_stream_);
    cudaSetDevice(previous);
  }

  Backend kind() const override { return Backend::Cuda; }
  std::string device_name() const override {
    return std::string(prop_.name) + " (sm_" + std::to_string(arch_) + ")";
  }
  std::array<int, 2> mask_granularity() const override { return {cuda::kAttentionBlockQ, cuda::kBlockK}; }
  // Auto: FP8 P·V where the mma.sync FP8 MMA is native (sm_89) and on the wgmma path (sm_90a: FP8 775 against
  // FP16 651 TOPS end-to-end, H100 B=4 H=32 N=16K D128); FP16 elsewhere. On Hopper the sm89 path's FP8 P·V
  // measured slower than FP16 (308 vs 361 TOPS end-to-end) and FP16 is the more accurate, so without the wgmma
  // kernels (not built, or SPARQ_CUDA_PATH=sm89) Auto stays FP16 there; Fp8 can still be asked for.
  bool supports_pv_skip() const override { return true; }
  bool reads_token_order() const override { return true; }
  PVPrecision default_pv_precision() const override {
    if (path_limit_ >= 89 && arch_ < 90 && has_fp8_path()) return PVPrecision::Fp8;
    return has_wgmma_path() ? PVPrecision::Fp8 : PVPrecision::Fp16;
  }

  std::shared_ptr<Storage> allocate(std::size_t bytes) override {
    DeviceGuard guard(device_);
    auto s = std::make_shared<CudaStorage>();
    s->backend = Backend::Cuda;
    s->bytes = bytes;
    s->device = device_;
    if (bytes) {
      const cudaError_t e = cudaMalloc(&s->ptr, bytes);
      if (e != cudaSuccess) cuda_fail(e, "cudaMalloc of " + std::to_string(bytes) + " bytes");
    }
    return s;
  }

  std::shared_ptr<Storage> wrap_cuda(void* device_ptr, std::size_t bytes) override {
    DeviceGuard guard(device_);
    cudaPointerAttributes attributes{};
    const cudaError_t e = cudaPointerGetAttributes(&attributes, device_ptr);
    if (e != cudaSuccess) {
      cudaGetLastError();
      fail(Status::InvalidArgument, "Context::wrap_cuda: the pointer is not CUDA memory: " + error_text(e));
    }
    if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged)
      fail(Status::InvalidArgument, "Context::wrap_cuda: the pointer is not device or managed memory");
    if (attributes.type == cudaMemoryTypeDevice && attributes.device != device_)
      fail(Status::InvalidArgument, "Context::wrap_cuda: the pointer belongs to CUDA device " +
                                        std::to_string(attributes.device) + ", the context uses device " +
                                        std::to_string(device_));
    auto s = std::make_shared<CudaStorage>();
    s->backend = Backend::Cuda;
    s->bytes = bytes;
    s->owned = false;
    s->device = device_;
    s->ptr = device_ptr;
    return s;
  }

  void set_cuda_stream(void* stream) override { stream_ = static_cast<cudaStream_t>(stream); }

  void upload(Storage& dst, std::size_t offset, const void* src, std::size_t bytes) override {
    if (!bytes) return;
    DeviceGuard guard(device_);
    auto* d = static_cast<char*>(device_pointer(dst)) + offset;
    check(cudaMemcpyAsync(d, src, bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync (upload)");
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (upload)");
  }

  void download(const Storage& src, std::size_t offset, void* dst, std::size_t bytes) override {
    if (!bytes) return;
    DeviceGuard guard(device_);
    const auto* s = static_cast<const char*>(device_pointer(src)) + offset;
    check(cudaMemcpyAsync(dst, s, bytes, cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync (download)");
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (download)");
  }

  void synchronize() override {
    DeviceGuard guard(device_);
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

  void attention(const AttentionProblem& p) override;
  bool sparge_predict(const SpargePredictProblem& sp) override;
  bool fuses_sparge_predict(const SpargePredictProblem& sp) const override;
  bool permute_tokens(const PermuteProblem& pp) override;

 private:
  static void* device_pointer(const Storage& s) {
    if (s.backend != Backend::Cuda)
      fail(Status::InvalidArgument, "CUDA backend: a tensor of another backend was passed");
    return static_cast<const CudaStorage&>(s).ptr;
  }
  static const char* operand_pointer(const Operand& op) {
    return static_cast<const char*>(device_pointer(*op.storage)) + op.offset_bytes;
  }
  bool has_fp8_path() const {
    for (std::size_t i = 0; i < cuda::kAttentionKernelCount; ++i)
      if (cuda::kAttentionKernels[i].pv_fp8) return true;
    return false;
  }
  // The sm90a (wgmma) kernels run on compute capability 9.0 only (architecture-specific code).
  bool runs(const cuda::AttentionKernel& k) const {
    return k.arch <= path_limit_ && (k.arch != 90 || arch_ == 90);
  }
  bool has_wgmma_path() const {
    for (std::size_t i = 0; i < cuda::kAttentionKernelCount; ++i)
      if (cuda::kAttentionKernels[i].arch == 90 && runs(cuda::kAttentionKernels[i])) return true;
    return false;
  }
  const cuda::AttentionKernel& choose_kernel(const AttentionProblem& p) const;
  void reserve_workspace(std::size_t bytes);
  // Device parameters of a stage-1 problem, in the SpargeAttn workspace (the per-head parameters uploaded).
  cuda::SpargePredictParams prepare_sparge(const SpargePredictProblem& sp);
  // Grow-only device memory of the SpargeAttn kernels (separate from the attention workspace, which a later
  // attention() call may reallocate while the LUT it consumes stays in caller-visible tensors).
  void* reserve_sparge(std::size_t bytes);

  int device_ = 0;
  int arch_ = 0;
  int path_limit_ = 0;  // the newest kernel path used: arch_, or lower when SPARQ_CUDA_PATH says so
  cudaDeviceProp prop_{};
  cudaStream_t stream_ = nullptr;
  void* workspace_ = nullptr;
  std::size_t workspace_bytes_ = 0;
  cudaEvent_t events_[3] = {nullptr, nullptr, nullptr};
  // The Q pass's own stream, for short sequences (attention(), made on first use): fork and join events.
  cudaStream_t q_stream_ = nullptr;
  cudaEvent_t q_events_[2] = {nullptr, nullptr};
  void* sparge_ws_ = nullptr;
  std::size_t sparge_ws_bytes_ = 0;
};

const cuda::AttentionKernel& CudaBackend::choose_kernel(const AttentionProblem& p) const {
  const bool fp8 = p.pv_precision == PVPrecision::Fp8;
  if (fp8 && path_limit_ < 89)
    fail(Status::NotSupported, "FP8 P·V needs compute capability 8.9 or newer; " + device_name() +
                                   " runs FP16 P·V (pv_precision Fp16 or Auto)");
  // The newest path the device runs, among those built.
  int best_arch = 0;
  for (std::size_t i = 0; i < cuda::kAttentionKernelCount; ++i) {
    const auto& k = cuda::kAttentionKernels[i];
    if (runs(k) && k.head_dim == p.head_dim && k.pv_fp8 == fp8) best_arch = std::max(best_arch, k.arch);
  }
  for (std::size_t i = 0; i < cuda::kAttentionKernelCount; ++i) {
    const auto& k = cuda::kAttentionKernels[i];
    if (k.arch == best_arch && k.head_dim == p.head_dim && k.pv_fp8 == fp8) return k;
  }
  std::string built;
  for (std::size_t i = 0; i < cuda::kAttentionKernelCount; ++i)
    built += std::string(built.empty() ? "" : ", ") + cuda::kAttentionKernels[i].name;
  fail(Status::NotSupported,
       "the CUDA backend has no attention kernel for head_dim " + std::to_string(p.head_dim) + " with " +
           (fp8 ? "FP8" : "FP16") + " P·V on " + device_name() +
           " (built: " + (built.empty() ? "none" : built) +
           "); rebuild with -Dhead_dims=... including it (powers of two 32..256) and -Dcuda_archs=... for this GPU");
}

void CudaBackend::reserve_workspace(std::size_t bytes) {
  if (bytes <= workspace_bytes_) return;
  if (workspace_) {
    // cudaFree waits for the work in flight that may still read the old workspace.
    check(cudaFree(workspace_), "cudaFree (workspace)");
    workspace_ = nullptr;
    workspace_bytes_ = 0;
  }
  const std::size_t grown = bytes + bytes / 16;  // some slack so that slightly larger calls do not reallocate
  const cudaError_t e = cudaMalloc(&workspace_, grown);
  if (e != cudaSuccess) {
    workspace_ = nullptr;
    cuda_fail(e, "cudaMalloc of the " + std::to_string(grown) + "-byte workspace");
  }
  workspace_bytes_ = grown;
}

void* CudaBackend::reserve_sparge(std::size_t bytes) {
  if (bytes > sparge_ws_bytes_) {
    if (sparge_ws_) check(cudaFree(sparge_ws_), "cudaFree (SpargeAttn workspace)");
    sparge_ws_ = nullptr;
    sparge_ws_bytes_ = 0;
    const cudaError_t e = cudaMalloc(&sparge_ws_, bytes);
    if (e != cudaSuccess) cuda_fail(e, "cudaMalloc of the " + std::to_string(bytes) + "-byte SpargeAttn workspace");
    sparge_ws_bytes_ = bytes;
  }
  return sparge_ws_;
}

bool CudaBackend::fuses_sparge_predict(const SpargePredictProblem& sp) const {
  return cuda::sparge_supported(sp.head_dim, sp.blocks_k, sp.block_q, sp.block_k) && sp.heads_q <= 65535 &&
         sp.batch <= 65535;
}

cuda::SpargePredictParams CudaBackend::prepare_sparge(const SpargePredictProblem& sp) {
  cuda::SpargePredictParams c;
  auto view = [&sp](const Operand& op) {
    cuda::SpargeView v;
    v.data = operand_pointer(op);
    v.stride_b = op.stride_batch;
    v.stride_h = op.stride_head;
    v.stride_t = op.stride_token;
    if (sp.token_order.storage) {
      v.rows = reinterpret_cast<const int32_t*>(operand_pointer(sp.token_order));
      v.rows_size = static_cast<int>(sp.token_order_size);
    }
    return v;
  };
  c.q = view(sp.q);
  c.k = view(sp.k);
  c.in_bf16 = sp.q.dtype == DType::BF16;
  c.batch = sp.batch, c.heads_q = sp.heads_q, c.heads_kv = sp.heads_kv;
  c.tokens_q = sp.tokens_q, c.tokens_k = sp.tokens_k, c.head_dim = sp.head_dim;
  c.block_q = sp.block_q, c.block_k = sp.block_k, c.blocks_q = sp.blocks_q, c.blocks_k = sp.blocks_k;
  c.causal = sp.causal, c.sink = sp.sink, c.diagonal = sp.diagonal;
  c.scale_log2 = sp.scale_log2, c.inv_tokens_k = sp.inv_tokens_k;
  c.inv_block_q = sp.inv_block_q, c.inv_tail_q = sp.inv_tail_q, c.inv_block_k = sp.inv_block_k, c.inv_tail_k = sp.inv_tail_k;
  c.counts = reinterpret_cast<int32_t*>(const_cast<char*>(operand_pointer(sp.counts)));
  c.indices = reinterpret_cast<int32_t*>(const_cast<char*>(operand_pointer(sp.indices)));
  const std::size_t head_bytes = std::size_t(sp.heads_q) * 4 * sizeof(float);
  const std::size_t head_at = (cuda::sparge_workspace_bytes(c) + 255) / 256 * 256;
  char* ws = static_cast<char*>(reserve_sparge(head_at + head_bytes));
  c.workspace = ws;
  c.head = reinterpret_cast<const float*>(ws + head_at);
  std::vector<float> head(std::size_t(sp.heads_q) * 4);
  for (int h = 0; h < sp.heads_q; ++h) {
    head[std::size_t(h) * 4 + 0] = sp.simthreshd[std::size_t(h)];
    head[std::size_t(h) * 4 + 1] = sp.cdfthreshd[std::size_t(h)];
    head[std::size_t(h) * 4 + 2] = sp.topk[std::size_t(h)];
    head[std::size_t(h) * 4 + 3] = sp.dense[std::size_t(h)] ? 1.0f : 0.0f;
  }
  // Pageable memory: the copy is staged before cudaMemcpyAsync returns, so `head` may go.
  check(cudaMemcpyAsync(ws + head_at, head.data(), head_bytes, cudaMemcpyHostToDevice, stream_),
        "cudaMemcpyAsync (SpargeAttn head parameters)");
  return c;
}

// Stage 1 without attention: the same passes as inside attention() (the K statistics and quantization passes,
// which here only sum and pool, and the selection), so that there is one implementation of the pooling.
bool CudaBackend::sparge_predict(const SpargePredictProblem& sp) {
  if (!fuses_sparge_predict(sp)) return false;
  DeviceGuard guard(device_);
  const cuda::SpargePredictParams c = prepare_sparge(sp);
  cuda::PreprocessParams pre;
  auto view = [](const cuda::SpargeView& s) {
    cuda::InputView v;
    v.data = s.data;
    v.stride_b = s.stride_b, v.stride_h = s.stride_h, v.stride_t = s.stride_t;
    v.aligned16 = aligned16(v.data, v.stride_b, v.stride_h, v.stride_t);
    v.rows = s.rows;
    v.rows_size = s.rows_size;
    return v;
  };
  pre.q = view(c.q);
  pre.k = view(c.k);
  pre.in_bf16 = c.in_bf16;
  pre.batch = sp.batch, pre.heads_q = sp.heads_q, pre.heads_kv = sp.heads_kv;
  pre.tokens_q = sp.tokens_q, pre.tokens_k = sp.tokens_k, pre.head_dim = sp.head_dim;
  pre.smooth_k = false;  // no K statistics, no quantized writes (q8, k8 null): raw K sums and pooling only
  pre.fp8_v = false;
  pre.splits = cuda::stats_splits(sp.tokens_k);
  pre.pool = cuda::sparge_pool_chunks(c);
  if (profiling_) check(cudaEventRecord(events_[0], stream_), "cudaEventRecord");
  if (const int e = cuda::launch_preprocess(pre, stream_); e != 0)
    cuda_fail(static_cast<cudaError_t>(e), "launching the SpargeAttn pooling passes");
  if (const int e = cuda::launch_sparge_select(c, stream_); e != 0)
    cuda_fail(static_cast<cudaError_t>(e), "launching the SpargeAttn selection");
  if (profiling_) {
    check(cudaEventRecord(events_[2], stream_), "cudaEventRecord");
    check(cudaEventSynchronize(events_[2]), "cudaEventSynchronize (the predictor failed)");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, events_[0], events_[2]), "cudaEventElapsedTime");
    timing_.total_ms = ms;
    timing_.attention_ms = 0;
  }
  return true;
}

bool CudaBackend::permute_tokens(const PermuteProblem& pp) {
  if (pp.elem_bytes != 2 || pp.batch > 65535) return false;
  for (const PermuteProblem::Pair& t : pp.pairs)
    if (t.heads > 65535) return false;
  DeviceGuard guard(device_);
  const std::size_t n = pp.order->size();
  // The runtime's cached device copy of the order stays valid while the launches run; an order given by hand
  // is uploaded into the SpargeAttn workspace, which the next call may reuse: that path finishes before returning.
  const bool upload = pp.order_device.storage == nullptr;
  const int32_t* order = nullptr;
  if (upload) {
    std::vector<int32_t> host(n);
    for (std::size_t i = 0; i < n; ++i) host[i] = static_cast<int32_t>((*pp.order)[i]);
    char* ws = static_cast<char*>(reserve_sparge(std::max<std::size_t>(n, 1) * sizeof(int32_t)));
    if (n) check(cudaMemcpyAsync(ws, host.data(), n * sizeof(int32_t), cudaMemcpyHostToDevice, stream_),
                 "cudaMemcpyAsync (token order)");
    order = reinterpret_cast<const int32_t*>(ws);
  } else {
    order = reinterpret_cast<const int32_t*>(operand_pointer(pp.order_device));
  }
  for (const PermuteProblem::Pair& t : pp.pairs) {
    cuda::PermuteParams c;
    c.src.data = operand_pointer(t.src);
    c.src.stride_b = t.src.stride_batch, c.src.stride_h = t.src.stride_head, c.src.stride_t = t.src.stride_token;
    c.dst = const_cast<char*>(operand_pointer(t.dst));
    c.dst_stride_b = t.dst.stride_batch, c.dst_stride_h = t.dst.stride_head, c.dst_stride_t = t.dst.stride_token;
    c.batch = pp.batch, c.heads = t.heads, c.tokens = pp.tokens, c.head_dim = pp.head_dim;
    c.order = order;
    c.order_size = static_cast<int>(n);
    if (const int e = cuda::launch_permute(c, stream_); e != 0)
      cuda_fail(static_cast<cudaError_t>(e), "launching the token permutation");
  }
  if (upload) check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (token permutation)");
  return true;
}

void CudaBackend::attention(const AttentionProblem& p) {
  if (p.qk_precision != QKPrecision::Int8) not_supported(Backend::Cuda, "fp16 Q·Kᵀ");
  if (p.mask_layout != MaskLayout::None &&
      (p.mask_block_q % cuda::kAttentionBlockQ != 0 || p.mask_block_k % cuda::kBlockK != 0))
    fail(Status::InvalidArgument, "CUDA backend: mask block size must be a multiple of 64x64");
  const cuda::AttentionKernel& kernel = choose_kernel(p);
  DeviceGuard guard(device_);
  if (p.batch == 0 || p.heads_q == 0 || p.tokens_q == 0) {
    timing_ = Timing{};
    return;  // nothing to write
  }

  const bool fp8 = kernel.pv_fp8;
  const bool in_bf16 = p.q.dtype == DType::BF16;
  const int B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, Nq = p.tokens_q, Nk = p.tokens_k, D = p.head_dim;
  const int gran = static_cast<int>(p.qk_granularity);
  const bool want_q_km = p.has_lse && p.smooth_k;

  // V for FP16 P·V is read in place when its rows allow 16-byte copies, else copied to the workspace.
  const char* v_ptr = operand_pointer(p.v);
  // A fused token order (backend.hpp): the preprocessing reads q, k, v through it and the epilogue writes
  // through it. FP16 P·V reads V in the kernel, so V is then copied in token order to the workspace first.
  const int32_t* token_order =
      p.token_order.storage ? reinterpret_cast<const int32_t*>(operand_pointer(p.token_order)) : nullptr;
  const int token_order_size = token_order ? static_cast<int>(p.token_order_size) : 0;
  const bool v_in_place =
      fp8 || (!token_order && aligned16(v_ptr, p.v.stride_batch, p.v.stride_head, p.v.stride_token));

  cuda::PreprocessParams pre;
  auto view = [&](const Operand& op) {
    cuda::InputView v;
    v.data = operand_pointer(op);
    v.stride_b = op.stride_batch;
    v.stride_h = op.stride_head;
    v.stride_t = op.stride_token;
    v.aligned16 = aligned16(v.data, v.stride_b, v.stride_h, v.stride_t);
    v.rows = token_order;
    v.rows_size = token_order_size;
    return v;
  };
  pre.q = view(p.q);
  pre.k = view(p.k);
  pre.v = view(p.v);
  pre.in_bf16 = in_bf16;
  pre.batch = B;
  pre.heads_q = Hq;
  pre.heads_kv = Hkv;
  pre.tokens_q = Nq;
  pre.tokens_k = Nk;
  pre.head_dim = D;
  pre.granularity = gran;
  pre.smooth_k = p.smooth_k;
  pre.want_q_km = want_q_km;
  pre.fp8_v = fp8;
  pre.scale = p.scale;
  pre.q_groups = cuda::q_scale_groups(Nq, gran);
  pre.k_groups = cuda::k_scale_groups(Nk, gran);
  pre.vt_stride = (Nk + cuda::kBlockK - 1) / cuda::kBlockK * cuda::kBlockK;
  pre.splits = cuda::stats_splits(Nk);

  const std::size_t q_elems = std::size_t(B) * Hq * Nq, kv_rows = std::size_t(B) * Hkv;
  WorkspaceLayout w;
  std::size_t cursor = 0;
  w.q8 = take(cursor, q_elems * D);
  w.k8 = take(cursor, kv_rows * Nk * D);
  w.q_scale = take(cursor, std::size_t(B) * Hq * pre.q_groups * sizeof(float));
  // One K tile's groups of padding: the wide sm90a kernel reads the scales of a 128-key step's second tile even
  // where it lies past the last key (and uses none of them).
  w.k_scale = take(cursor, (kv_rows * pre.k_groups + 8) * sizeof(float));
  if (fp8) {
    w.v8t = take(cursor, kv_rows * D * pre.vt_stride);
    w.v_scale = take(cursor, kv_rows * D * sizeof(float));
  }
  if (want_q_km) w.q_km = take(cursor, q_elems * sizeof(float));
  w.partial_sum = take(cursor, kv_rows * pre.splits * D * sizeof(float));
  w.partial_vmax = take(cursor, kv_rows * pre.splits * D * sizeof(float));
  w.k_mean = take(cursor, kv_rows * D * sizeof(float));
  if (!v_in_place) w.v_copy = take(cursor, kv_rows * Nk * D * 2);
  // A bitmap mask is walked as a LUT made on the device (cuda::launch_bitmap_to_lut: one index load per block
  // instead of a scan) while that LUT costs at most 1/8 of q + k + v (the workspace stays within 0.75x of them);
  // larger ones (64-row blocks at very long sequences) are walked as bitmaps, with no extra memory.
  // SPARQ_CUDA_BITMAP_LUT=0 walks every bitmap as it is (both paths stay testable).
  const int64_t mask_rows = p.mask_layout == MaskLayout::Bitmap ? int64_t(B) * p.mask_heads * p.mask_blocks_q : 0;
  const std::size_t lut_bytes = std::size_t(mask_rows) * (std::size_t(p.mask_blocks_k) + 1) * sizeof(int32_t);
  const std::size_t qkv_bytes =
      2 * std::size_t(D) * (std::size_t(B) * Hq * Nq + 2 * std::size_t(B) * Hkv * Nk);
  const char* bitmap_lut_env = std::getenv("SPARQ_CUDA_BITMAP_LUT");
  const bool bitmap = mask_rows > 0 && lut_bytes <= qkv_bytes / 8 &&
                      !(bitmap_lut_env && std::string(bitmap_lut_env) == "0");
  std::size_t lut_counts_at = 0, lut_indices_at = 0;
  if (bitmap) {
    lut_counts_at = take(cursor, std::size_t(mask_rows) * sizeof(int32_t));
    lut_indices_at = take(cursor, std::size_t(mask_rows) * std::size_t(p.mask_blocks_k) * sizeof(int32_t));
  }
  const bool stage2 = !p.pv_threshold.empty();
  std::size_t pv_threshold_at = 0, pv_counters_at = 0;
  if (stage2) {
    if (p.pv_threshold.size() != static_cast<std::size_t>(Hq))
      fail(Status::Internal, "CUDA backend: " + std::to_string(p.pv_threshold.size()) + " P·V thresholds for " +
                                 std::to_string(Hq) + " query heads");
    pv_threshold_at = take(cursor, std::size_t(Hq) * sizeof(float));
    pv_counters_at = take(cursor, 2 * sizeof(unsigned long long));
  }
  w.total = cursor;
  reserve_workspace(w.total);
  char* ws = static_cast<char*>(workspace_);

  pre.q8 = reinterpret_cast<int8_t*>(ws + w.q8);
  pre.k8 = reinterpret_cast<int8_t*>(ws + w.k8);
  pre.q_scale = reinterpret_cast<float*>(ws + w.q_scale);
  pre.k_scale = reinterpret_cast<float*>(ws + w.k_scale);
  if (fp8) {
    pre.v8t = reinterpret_cast<uint8_t*>(ws + w.v8t);
    pre.v_scale = reinterpret_cast<float*>(ws + w.v_scale);
  }
  if (want_q_km) pre.q_km = reinterpret_cast<float*>(ws + w.q_km);
  pre.partial_sum = reinterpret_cast<float*>(ws + w.partial_sum);
  pre.partial_vmax = reinterpret_cast<float*>(ws + w.partial_vmax);
  pre.k_mean = reinterpret_cast<float*>(ws + w.k_mean);

  cuda::AttentionParams a;
  a.q8 = pre.q8;
  a.k8 = pre.k8;
  a.q_scale = pre.q_scale;
  a.k_scale = pre.k_scale;
  a.v8t = pre.v8t;
  a.v_scale = pre.v_scale;
  a.q_km = pre.q_km;
  if (!fp8) {
    if (v_in_place) {
      a.v = v_ptr;
      a.v_stride_b = p.v.stride_batch;
      a.v_stride_h = p.v.stride_head;
      a.v_stride_t = p.v.stride_token;
    } else {
      a.v = ws + w.v_copy;
      a.v_stride_t = D;
      a.v_stride_h = int64_t(Nk) * D;
      a.v_stride_b = int64_t(Hkv) * Nk * D;
    }
  }
  a.out = const_cast<char*>(operand_pointer(p.out));
  a.o_stride_b = p.out.stride_batch;
  a.o_stride_h = p.out.stride_head;
  a.o_stride_t = p.out.stride_token;
  a.out_bf16 = p.out.dtype == DType::BF16;
  a.out_rows = token_order;
  a.out_rows_size = token_order_size;
  a.in_bf16 = in_bf16;
  if (p.has_lse) {
    a.lse = reinterpret_cast<float*>(const_cast<char*>(operand_pointer(p.lse)));
    a.l_stride_b = p.lse.stride_batch;
    a.l_stride_h = p.lse.stride_head;
    a.l_stride_t = p.lse.stride_token;
  }
  a.batch = B;
  a.heads_q = Hq;
  a.heads_kv = Hkv;
  a.tokens_q = Nq;
  a.tokens_k = Nk;
  a.kv_group = p.kv_group();
  a.q_groups = pre.q_groups;
  a.k_groups = pre.k_groups;
  a.vt_stride = pre.vt_stride;
  a.granularity = gran;
  a.causal = p.causal;
  if (p.mask_layout != MaskLayout::None) {
    a.mask_mode = static_cast<int>(cuda::MaskMode::Lut);
    a.mask_heads = p.mask_heads;
    a.mask_blocks_q = p.mask_blocks_q;
    a.mask_blocks_k = p.mask_blocks_k;
    a.mask_block_q = p.mask_block_q;
    a.mask_tiles_k = p.mask_block_k / cuda::kBlockK;
    if (p.mask_layout == MaskLayout::Lut) {
      a.mask_counts = reinterpret_cast<const int32_t*>(operand_pointer(p.mask_counts));
      a.mask_indices = reinterpret_cast<const int32_t*>(operand_pointer(p.mask_indices));
    } else if (bitmap) {
      a.mask_counts = reinterpret_cast<const int32_t*>(ws + lut_counts_at);
      a.mask_indices = reinterpret_cast<const int32_t*>(ws + lut_indices_at);
    } else {
      a.mask_mode = static_cast<int>(cuda::MaskMode::Bitmap);
      a.mask_bitmap = reinterpret_cast<const uint8_t*>(operand_pointer(p.mask_bitmap));
    }
  }

  if (stage2) {
    a.pv_threshold = reinterpret_cast<const float*>(ws + pv_threshold_at);
    check(cudaMemcpyAsync(ws + pv_threshold_at, p.pv_threshold.data(), std::size_t(Hq) * sizeof(float),
                          cudaMemcpyHostToDevice, stream_),
          "cudaMemcpyAsync (P·V thresholds)");
    if (p.stats) {
      a.pv_counters = reinterpret_cast<unsigned long long*>(ws + pv_counters_at);
      check(cudaMemsetAsync(a.pv_counters, 0, 2 * sizeof(unsigned long long), stream_), "cudaMemsetAsync");
    }
  }

  // Stage 1 fused (AttentionProblem::predict): the preprocessing also sums raw K and pools Q and K as it
  // quantizes them, and the selection after it writes the LUT that the mask fields name.
  std::optional<cuda::SpargePredictParams> predict;
  if (p.predict) {
    if (!fuses_sparge_predict(*p.predict) || p.mask_layout != MaskLayout::Lut || Nk == 0)
      fail(Status::Internal, "CUDA backend: a fused SpargeAttn prediction it did not accept");
    predict = prepare_sparge(*p.predict);
    pre.pool = cuda::sparge_pool_chunks(*predict);
  }

  if (profiling_) check(cudaEventRecord(events_[0], stream_), "cudaEventRecord");
  if (!v_in_place && Nk > 0 && token_order) {
    cuda::PermuteParams c;  // V rows in token order, contiguous
    c.src.data = v_ptr;
    c.src.stride_b = p.v.stride_batch, c.src.stride_h = p.v.stride_head, c.src.stride_t = p.v.stride_token;
    c.dst = ws + w.v_copy;
    c.dst_stride_t = D, c.dst_stride_h = int64_t(Nk) * D, c.dst_stride_b = int64_t(Hkv) * Nk * D;
    c.batch = B, c.heads = Hkv, c.tokens = Nk, c.head_dim = D;
    c.order = token_order;
    c.order_size = token_order_size;
    if (const int e = cuda::launch_permute(c, stream_); e != 0)
      cuda_fail(static_cast<cudaError_t>(e), "launching the V copy in token order");
  } else if (!v_in_place && Nk > 0) {
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < Hkv; ++h)
        check(cudaMemcpy2DAsync(ws + w.v_copy + ((std::size_t(b) * Hkv + h) * Nk) * D * 2, std::size_t(D) * 2,
                                v_ptr + 2 * (b * p.v.stride_batch + h * p.v.stride_head),
                                std::size_t(p.v.stride_token) * 2, std::size_t(D) * 2, Nk, cudaMemcpyDeviceToDevice,
                                stream_),
              "cudaMemcpy2DAsync (V rows to 16-byte aligned workspace)");
  }
  // With no keys there is nothing to quantize: the kernel writes O = 0 and LSE = -inf.
  // The K/V statistics pass has fewer than two CTAs per SM on short sequences (one split of up to 1024 keys per
  // head), so the Q pass, which does not depend on it unless it needs the K mean, runs beside it on its own stream.
  // SPARQ_CUDA_Q_BESIDE=0 keeps one stream (both orders stay testable).
  const char* q_beside_env = std::getenv("SPARQ_CUDA_Q_BESIDE");
  const bool q_beside = Nk > 0 && !want_q_km && !predict &&
                        int64_t(pre.splits) * B * Hkv < 2 * int64_t(prop_.multiProcessorCount) &&
                        !(q_beside_env && std::string(q_beside_env) == "0");
  if (q_beside) {
    if (!q_stream_) {
      check(cudaStreamCreateWithFlags(&q_stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
      for (cudaEvent_t& e : q_events_) check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
    }
    check(cudaEventRecord(q_events_[0], stream_), "cudaEventRecord (fork)");
    check(cudaStreamWaitEvent(q_stream_, q_events_[0], 0), "cudaStreamWaitEvent (fork)");
  }
  if (Nk > 0) {
    if (const int e = cuda::launch_preprocess(pre, stream_, q_beside ? q_stream_ : nullptr); e != 0)
      cuda_fail(static_cast<cudaError_t>(e), "launching the preprocessing kernels");
  }
  if (q_beside) {
    check(cudaEventRecord(q_events_[1], q_stream_), "cudaEventRecord (join)");
    check(cudaStreamWaitEvent(stream_, q_events_[1], 0), "cudaStreamWaitEvent (join)");
  }
  if (predict) {
    if (const int e = cuda::launch_sparge_select(*predict, stream_); e != 0)
      cuda_fail(static_cast<cudaError_t>(e), "launching the SpargeAttn selection");
  }
  if (bitmap) {
    if (const int e = cuda::launch_bitmap_to_lut(reinterpret_cast<const uint8_t*>(operand_pointer(p.mask_bitmap)),
                                                 mask_rows, p.mask_blocks_k, const_cast<int32_t*>(a.mask_counts),
                                                 const_cast<int32_t*>(a.mask_indices), stream_);
        e != 0)
      cuda_fail(static_cast<cudaError_t>(e), "launching the bitmap-to-LUT kernel");
  }
  if (profiling_) check(cudaEventRecord(events_[1], stream_), "cudaEventRecord");
  if (const int e = kernel.launch(a, stream_); e != 0) {
    if (e == cuda::kLaunchNeedsMoreSharedMemory)
      fail(Status::NotSupported, std::string("the CUDA kernel ") + kernel.name +
                                     " needs more shared memory per block than " + device_name() + " offers");
    cuda_fail(static_cast<cudaError_t>(e), std::string("launching ") + kernel.name);
  }
  if (profiling_) {
    check(cudaEventRecord(events_[2], stream_), "cudaEventRecord");
    check(cudaEventSynchronize(events_[2]), "cudaEventSynchronize (a kernel failed)");
    float total = 0, attention = 0;
    check(cudaEventElapsedTime(&total, events_[0], events_[2]), "cudaEventElapsedTime");
    check(cudaEventElapsedTime(&attention, events_[1], events_[2]), "cudaEventElapsedTime");
    timing_.total_ms = total;
    timing_.attention_ms = attention;
  }
  if (a.pv_counters) {
    unsigned long long counters[2] = {0, 0};
    check(cudaMemcpyAsync(counters, a.pv_counters, sizeof counters, cudaMemcpyDeviceToHost, stream_),
          "cudaMemcpyAsync (stage-2 statistics)");
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (stage-2 statistics)");
    p.stats->pv_skipped += static_cast<int64_t>(counters[0]);
    p.stats->pv_total += static_cast<int64_t>(counters[1]);
  }
}

}  // namespace

std::shared_ptr<BackendImpl> make_cuda_backend(int device) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    fail(Status::BackendUnavailable, "no usable CUDA driver or device: " + error_text(e));
  }
  if (count == 0) fail(Status::BackendUnavailable, "no CUDA device found");
  if (device < 0) device = 0;
  if (device >= count)
    fail(Status::InvalidArgument,
         "CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(count) + " devices)");
  cudaDeviceProp prop{};
  if (const cudaError_t pe = cudaGetDeviceProperties(&prop, device); pe != cudaSuccess)
    fail(Status::BackendUnavailable, "cudaGetDeviceProperties failed: " + error_text(pe));
  if (prop.major < 8)
    fail(Status::BackendUnavailable, std::string("CUDA device ") + prop.name + " has compute capability " +
                                         std::to_string(prop.major) + "." + std::to_string(prop.minor) +
                                         "; the CUDA backend needs 8.0 or newer");
  return std::make_shared<CudaBackend>(device);
}

}  // namespace sparq::detail
