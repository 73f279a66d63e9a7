// Suite "vulkan": tensors that wrap the caller's VkBuffers, created on the context's own device.
#include <doctest/doctest.h>
#include <sparq/sparq.hpp>

#include "harness.hpp"
#include "reference.hpp"

#ifdef SPARQ_HAVE_VULKAN
#include "vulkan_loader.hpp"  // the function pointers libsparq resolved from the loader
#endif

#include <cstring>
#include <vector>

using namespace sparq;

TEST_SUITE("vulkan") {

TEST_CASE("wrapping a VkBuffer is an error on other backends") {
  Context ref = Context::create(Backend::Reference);
  try {
    (void)ref.wrap_vulkan(1, 0, 64, DType::F16, {32});
    FAIL("expected NotSupported");
  } catch (const Error& e) {
    CHECK(e.status() == Status::NotSupported);
    CHECK(std::string(e.what()).find("VkBuffer") != std::string::npos);
  }
}

#ifdef SPARQ_HAVE_VULKAN
namespace {

struct CallerBuffer {
  VkDevice device = VK_NULL_HANDLE;
  VkBuffer buffer = VK_NULL_HANDLE;
  VkDeviceMemory memory = VK_NULL_HANDLE;
  CallerBuffer(const VulkanHandles& h, VkDeviceSize bytes) : device(static_cast<VkDevice>(h.device)) {
    using namespace sparq::vulkan;
    VkBufferCreateInfo bci{VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO};
    bci.size = bytes;
    bci.usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT;
    bci.sharingMode = VK_SHARING_MODE_EXCLUSIVE;
    REQUIRE(vkCreateBuffer(device, &bci, nullptr, &buffer) == VK_SUCCESS);
    VkMemoryRequirements req;
    vkGetBufferMemoryRequirements(device, buffer, &req);
    VkPhysicalDeviceMemoryProperties props;
    vkGetPhysicalDeviceMemoryProperties(static_cast<VkPhysicalDevice>(h.physical_device), &props);
    uint32_t type = UINT32_MAX;
    for (uint32_t i = 0; i < props.memoryTypeCount && type == UINT32_MAX; ++i)
      if ((req.memoryTypeBits >> i) & 1) type = i;
    REQUIRE(type != UINT32_MAX);
    VkMemoryAllocateInfo mai{VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO};
    mai.allocationSize = req.size;
    mai.memoryTypeIndex = type;
    REQUIRE(vkAllocateMemory(device, &mai, nullptr, &memory) == VK_SUCCESS);
    REQUIRE(vkBindBufferMemory(device, buffer, memory, 0) == VK_SUCCESS);
  }
  ~CallerBuffer() {
    sparq::vulkan::vkDestroyBuffer(device, buffer, nullptr);
    sparq::vulkan::vkFreeMemory(device, memory, nullptr);
  }
  uint64_t handle() const { return reinterpret_cast<uint64_t>(buffer); }
};

}  // namespace

TEST_CASE("attention on caller VkBuffers equals attention on owned tensors") {
  Context ctx = [] {
    try {
      return Context::create(Backend::Vulkan);
    } catch (const Error& e) {
      return Context::create(Backend::Reference);
    }
  }();
  if (ctx.backend() != Backend::Vulkan) {
    MESSAGE("[vulkan] SKIPPED: no Vulkan device");
    return;
  }
  test::Case c;
  c.B = 1, c.Hq = 2, c.Hkv = 1, c.Nq = 100, c.Nk = 130, c.D = 64, c.want_lse = false;
  test::Inputs in = test::make_inputs(c);
  test::Result owned = test::run_case(ctx, c, in);

  VulkanHandles h = ctx.vulkan_handles();
  REQUIRE(h.device != nullptr);
  const std::size_t pad = 256;  // tensors start at an offset inside the caller's buffers
  auto bytes = [](int64_t n) { return static_cast<std::size_t>(n) * 2; };
  int64_t nq = int64_t(c.B) * c.Hq * c.Nq * c.D, nk = int64_t(c.B) * c.Hkv * c.Nk * c.D;
  CallerBuffer bq(h, pad + bytes(nq)), bk(h, pad + bytes(nk)), bv(h, pad + bytes(nk)), bo(h, pad + bytes(nq));
  Tensor q = ctx.wrap_vulkan(bq.handle(), pad, bytes(nq), DType::F16, {c.B, c.Hq, c.Nq, c.D});
  Tensor k = ctx.wrap_vulkan(bk.handle(), pad, bytes(nk), DType::F16, {c.B, c.Hkv, c.Nk, c.D});
  Tensor v = ctx.wrap_vulkan(bv.handle(), pad, bytes(nk), DType::F16, {c.B, c.Hkv, c.Nk, c.D});
  Tensor out = ctx.wrap_vulkan(bo.handle(), pad, bytes(nq), DType::F16, {c.B, c.Hq, c.Nq, c.D});
  ctx.from_host(q, in.q.data());
  ctx.from_host(k, in.k.data());
  ctx.from_host(v, in.v.data());
  AttentionOptions o;
  o.qk_granularity = c.qk_granularity;
  o.pv_precision = c.pv_precision;
  attention(ctx, q, k, v, out, o);
  ctx.synchronize();
  std::vector<uint16_t> got(static_cast<std::size_t>(nq));
  ctx.to_host(out, got.data());
  std::vector<float> got_f(got.size());
  for (std::size_t i = 0; i < got.size(); ++i) got_f[i] = sparq::reference::half_to_float(got[i]);
  CHECK(test::bitwise_equal(got_f, owned.out));

  try {
    (void)ctx.wrap_vulkan(0, 0, 64, DType::F16, {32});
    FAIL("expected InvalidArgument");
  } catch (const Error& e) {
    CHECK(e.status() == Status::InvalidArgument);
  }
  try {
    (void)ctx.wrap_vulkan(bq.handle(), 0, 62, DType::F16, {32});
    FAIL("expected InvalidArgument");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("bytes") != std::string::npos);
  }
}
#endif

}  // TEST_SUITE
