// Suite "cuda": caller device memory (Context::wrap_cuda) and the caller's stream (Context::set_cuda_stream).
// The caller's side uses the CUDA driver API, opened at run time (libcuda.so.1), so this test needs neither
// the CUDA headers nor a second copy of the CUDA runtime; driver and runtime objects are interchangeable.
#include <doctest/doctest.h>
#include <sparq/sparq.hpp>

#include "harness.hpp"
#include "reference.hpp"

#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <vector>

using namespace sparq;

namespace {

using CUresult = int;
using CUdevice = int;
using CUcontext = void*;
using CUstream = void*;
using CUdeviceptr = unsigned long long;

struct Driver {
  CUresult (*cuInit)(unsigned) = nullptr;
  CUresult (*cuDeviceGet)(CUdevice*, int) = nullptr;
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice) = nullptr;
  CUresult (*cuCtxSetCurrent)(CUcontext) = nullptr;
  CUresult (*cuMemAlloc)(CUdeviceptr*, std::size_t) = nullptr;
  CUresult (*cuMemFree)(CUdeviceptr) = nullptr;
  CUresult (*cuStreamCreate)(CUstream*, unsigned) = nullptr;
  CUresult (*cuStreamDestroy)(CUstream) = nullptr;
  CUresult (*cuStreamSynchronize)(CUstream) = nullptr;

  bool load() {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) return false;
    auto get = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
      return fn != nullptr;
    };
    return get(cuInit, "cuInit") && get(cuDeviceGet, "cuDeviceGet") &&
           get(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain") && get(cuCtxSetCurrent, "cuCtxSetCurrent") &&
           get(cuMemAlloc, "cuMemAlloc_v2") && get(cuMemFree, "cuMemFree_v2") &&
           get(cuStreamCreate, "cuStreamCreate") && get(cuStreamDestroy, "cuStreamDestroy_v2") &&
           get(cuStreamSynchronize, "cuStreamSynchronize");
  }
};

}  // namespace

TEST_SUITE("cuda") {

TEST_CASE("wrapping CUDA memory or a stream is an error on other backends") {
  Context ref = Context::create(Backend::Reference);
  int dummy = 0;
  try {
    (void)ref.wrap_cuda(&dummy, sizeof dummy, DType::I32, {1});
    FAIL("expected NotSupported");
  } catch (const Error& e) {
    CHECK(e.status() == Status::NotSupported);
  }
  try {
    ref.set_cuda_stream(nullptr);
    FAIL("expected NotSupported");
  } catch (const Error& e) {
    CHECK(e.status() == Status::NotSupported);
  }
}

TEST_CASE("attention on caller device memory, on the caller's stream, equals attention on owned tensors") {
  Context ctx = [] {
    try {
      return Context::create(Backend::Cuda);
    } catch (const Error&) {
      return Context::create(Backend::Reference);
    }
  }();
  Driver cu;
  if (ctx.backend() != Backend::Cuda || !cu.load()) {
    MESSAGE("[cuda] SKIPPED: no CUDA device or driver");
    return;
  }
  test::Case c;
  c.B = 1, c.Hq = 4, c.Hkv = 2, c.Nq = 300, c.Nk = 257, c.D = 64, c.want_lse = false;
  test::Inputs in = test::make_inputs(c);
  test::Result owned = test::run_case(ctx, c, in);

  CUdevice dev = 0;
  CUcontext primary = nullptr;
  REQUIRE(cu.cuInit(0) == 0);
  REQUIRE(cu.cuDeviceGet(&dev, 0) == 0);
  REQUIRE(cu.cuDevicePrimaryCtxRetain(&primary, dev) == 0);
  REQUIRE(cu.cuCtxSetCurrent(primary) == 0);
  CUstream stream = nullptr;
  REQUIRE(cu.cuStreamCreate(&stream, 1 /* non-blocking: no implicit sync with the default stream */) == 0);

  const int64_t nq = int64_t(c.B) * c.Hq * c.Nq * c.D, nk = int64_t(c.B) * c.Hkv * c.Nk * c.D;
  const std::size_t bq = std::size_t(nq) * 2, bk = std::size_t(nk) * 2;
  CUdeviceptr q = 0, k = 0, v = 0, o = 0;
  REQUIRE(cu.cuMemAlloc(&q, bq) == 0);
  REQUIRE(cu.cuMemAlloc(&k, bk) == 0);
  REQUIRE(cu.cuMemAlloc(&v, bk) == 0);
  REQUIRE(cu.cuMemAlloc(&o, bq) == 0);
  auto ptr = [](CUdeviceptr p) { return reinterpret_cast<void*>(static_cast<uintptr_t>(p)); };
  Tensor tq = ctx.wrap_cuda(ptr(q), bq, DType::F16, {c.B, c.Hq, c.Nq, c.D});
  Tensor tk = ctx.wrap_cuda(ptr(k), bk, DType::F16, {c.B, c.Hkv, c.Nk, c.D});
  Tensor tv = ctx.wrap_cuda(ptr(v), bk, DType::F16, {c.B, c.Hkv, c.Nk, c.D});
  Tensor to = ctx.wrap_cuda(ptr(o), bq, DType::F16, {c.B, c.Hq, c.Nq, c.D});
  ctx.from_host(tq, in.q.data());
  ctx.from_host(tk, in.k.data());
  ctx.from_host(tv, in.v.data());

  ctx.set_cuda_stream(stream);
  AttentionOptions opt;
  opt.qk_granularity = c.qk_granularity;
  opt.pv_precision = c.pv_precision;
  attention(ctx, tq, tk, tv, to, opt);
  REQUIRE(cu.cuStreamSynchronize(stream) == 0);  // the caller's stream alone orders the work
  std::vector<uint16_t> got(static_cast<std::size_t>(nq));
  ctx.to_host(to, got.data());
  std::vector<float> got_f(got.size());
  for (std::size_t i = 0; i < got.size(); ++i) got_f[i] = sparq::reference::half_to_float(got[i]);
  CHECK(test::bitwise_equal(got_f, owned.out));

  try {
    (void)ctx.wrap_cuda(ptr(q), bq - 2, DType::F16, {c.B, c.Hq, c.Nq, c.D});
    FAIL("expected InvalidArgument");
  } catch (const Error& e) {
    CHECK(e.status() == Status::InvalidArgument);
  }
  int host = 0;
  try {
    (void)ctx.wrap_cuda(&host, sizeof host, DType::I32, {1});
    FAIL("expected InvalidArgument for host memory");
  } catch (const Error& e) {
    CHECK(e.status() == Status::InvalidArgument);
  }

  ctx.set_cuda_stream(nullptr);
  ctx.synchronize();
  for (CUdeviceptr p : {q, k, v, o}) cu.cuMemFree(p);
  cu.cuStreamDestroy(stream);
}

}  // TEST_SUITE
