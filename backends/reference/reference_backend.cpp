// The CPU reference backend: host memory, and attention through the emulation of the quantized kernels.
#include "reference.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <thread>

namespace sparq {
namespace reference {

int thread_count() {
  static const int count = [] {
    if (const char* env = std::getenv("SPARQ_REFERENCE_THREADS"); env && *env) {
      int n = std::atoi(env);
      if (n > 0) return n;
    }
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }();
  return count;
}

void parallel_for(std::size_t count, const std::function<void(std::size_t)>& fn) {
  if (count == 0) return;
  const std::size_t workers = std::min<std::size_t>(count, static_cast<std::size_t>(thread_count()));
  if (workers <= 1) {
    for (std::size_t i = 0; i < count; ++i) fn(i);
    return;
  }
  std::atomic<std::size_t> next{0};
  std::atomic<bool> stop{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&] {
    for (;;) {
      if (stop.load(std::memory_order_relaxed)) return;
      const std::size_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= count) return;
      try {
        fn(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        stop = true;
      }
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  try {
    for (std::size_t t = 1; t < workers; ++t) threads.emplace_back(work);
  } catch (...) {
    // could not start a thread: the ones started and this one do the work
  }
  work();
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace reference

namespace detail {
namespace {

HostStorage& host(Storage& s) { return static_cast<HostStorage&>(s); }
const HostStorage& host(const Storage& s) { return static_cast<const HostStorage&>(s); }

void check_range(const Storage& s, std::size_t offset, std::size_t bytes, const char* what) {
  if (offset > s.bytes || bytes > s.bytes - offset)
    fail(Status::InvalidArgument, std::string("reference backend ") + what + ": " + std::to_string(bytes) +
                                      " bytes at offset " + std::to_string(offset) + " exceed the " +
                                      std::to_string(s.bytes) + " bytes of the memory");
}

class ReferenceBackend : public BackendImpl {
 public:
  Backend kind() const override { return Backend::Reference; }
  bool supports_pv_skip() const override { return true; }

  std::string device_name() const override {
    int n = reference::thread_count();
    return "CPU reference (" + std::to_string(n) + (n == 1 ? " thread)" : " threads)");
  }

  // Query blocks of 16 rows (a warp's rows), key blocks of whole 64-key tiles.
  std::array<int, 2> mask_granularity() const override { return {16, reference::kKeyTile}; }

  std::shared_ptr<Storage> allocate(std::size_t bytes) override {
    auto s = std::make_shared<HostStorage>();
    try {
      s->owned_data = std::make_unique<std::byte[]>(std::max<std::size_t>(bytes, 1));  // zero-initialised
    } catch (const std::bad_alloc&) {
      fail(Status::OutOfMemory, "reference backend: cannot allocate " + std::to_string(bytes) + " bytes");
    }
    s->data = s->owned_data.get();
    s->bytes = bytes;
    s->backend = Backend::Reference;
    s->owned = true;
    return s;
  }

  std::shared_ptr<Storage> wrap_host(void* data, std::size_t bytes) override {
    auto s = std::make_shared<HostStorage>();
    s->data = static_cast<std::byte*>(data);
    s->bytes = bytes;
    s->backend = Backend::Reference;
    s->owned = false;
    return s;
  }

  void upload(Storage& dst, std::size_t offset, const void* src, std::size_t bytes) override {
    check_range(dst, offset, bytes, "upload");
    if (bytes) std::memcpy(host(dst).data + offset, src, bytes);
  }

  void download(const Storage& src, std::size_t offset, void* dst, std::size_t bytes) override {
    check_range(src, offset, bytes, "download");
    if (bytes) std::memcpy(dst, host(src).data + offset, bytes);
  }

  void attention(const AttentionProblem& problem) override {
    auto start = std::chrono::steady_clock::now();
    try {
      reference::quantized_attention(problem);
    } catch (const std::bad_alloc&) {
      fail(Status::OutOfMemory, "reference backend: out of host memory during attention");
    }
    if (profiling_) {
      double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
      timing_.total_ms = ms;
      timing_.attention_ms = ms;
    }
  }

  // Row copies straight between the host buffers (the runtime's generic path would stage both tensors). One
  // thread: the copy is bound by memory, and waking workers costs more than it saves at the sizes the CPU
  // backend runs.
  bool permute_tokens(const PermuteProblem& pp) override {
    const std::size_t e = pp.elem_bytes, row = static_cast<std::size_t>(pp.head_dim) * e;
    const int64_t n = static_cast<int64_t>(pp.order->size());
    for (const PermuteProblem::Pair& t : pp.pairs) {
      const std::byte* src = host(*t.src.storage).data + t.src.offset_bytes;
      std::byte* dst = host(*t.dst.storage).data + t.dst.offset_bytes;
      for (int64_t b = 0; b < pp.batch; ++b)
        for (int64_t h = 0; h < t.heads; ++h) {
          const std::byte* s = src + static_cast<std::size_t>(b * t.src.stride_batch + h * t.src.stride_head) * e;
          std::byte* d = dst + static_cast<std::size_t>(b * t.dst.stride_batch + h * t.dst.stride_head) * e;
          for (int64_t i = 0; i < pp.tokens; ++i) {
            const int64_t j = i < n ? (*pp.order)[static_cast<std::size_t>(i)] : i;
            std::memcpy(d + static_cast<std::size_t>(i * t.dst.stride_token) * e,
                        s + static_cast<std::size_t>(j * t.src.stride_token) * e, row);
          }
        }
    }
    return true;
  }

  void synchronize() override {}
};

}  // namespace

std::shared_ptr<BackendImpl> make_reference_backend() { return std::make_shared<ReferenceBackend>(); }

}  // namespace detail
}  // namespace sparq
