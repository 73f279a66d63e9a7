// The Vulkan backend: storage as device-local buffers (copies through a host-visible staging buffer),
// attention as up to four dispatches of the generated kernels (templates/glsl):
//   kmean (K smoothing vector) -> quant (Q and K to INT8 per group) -> attention_d{D}_{mask}[_idot|_coopmat]
// recorded in one command buffer, with timestamps around the whole and around the attention kernel. With a
// fused SpargeAttn stage 1 (AttentionProblem::predict) the quant passes also pool q and k for the prediction and
// the predictor's small passes run between them and the attention kernel, in the same command buffer.
#include "backend.hpp"
#include "vulkan_debug.hpp"
#include "vulkan_device.hpp"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>

// Vulkan create-info structs are brace-initialised with their sType only; the rest is zero on purpose.
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#endif

namespace sparq::detail {
// The Vulkan entry points are pointers in sparq::vulkan, loaded at run time (vulkan_loader.hpp).
using namespace sparq::vulkan;
namespace {

using vulkan::Buffer;
using vulkan::check;
using vulkan::Device;

// The uniform parameter block of every kernel (templates/glsl/common.glsl, ParamsBlock: same order).
struct VkParams {
  std::uint32_t B, Hq, Hkv, Nq, Nk, D, group_size;
  float scale;
  std::uint32_t q_off, q_sb, q_sh, q_st;
  std::uint32_t k_off, k_sb, k_sh, k_st;
  std::uint32_t v_off, v_sb, v_sh, v_st;
  std::uint32_t o_off, o_sb, o_sh, o_st;
  std::uint32_t lse_off, lse_sb, lse_sh, has_lse;
  std::uint32_t smooth_k, q_span, q_inner, k_span, k_inner, nqg, nkg;
  std::uint32_t mask_bq, mask_bk, mask_hm, mask_nqb, mask_nkb, mask_off, mask_off2;
  std::uint32_t pv_skip;
  std::uint32_t order_off, order_size;  // a fused token order (binding 18)
  std::uint32_t pool_kmu, pool_k, pool_q, pool_kf, pool_qf, pool_nkc, pool_nqc;  // stage-1 pooling (PoolLayout)
};
static_assert(sizeof(VkParams) % 4 == 0, "vkCmdUpdateBuffer needs a multiple of 4 bytes");

// The uniform parameter block of the SpargeAttn kernels (templates/glsl/sparge_common.glsl, SpgParamsBlock).
struct SpgParams {
  std::uint32_t B, Hq, Hkv, Nq, Nk, D, group_size;
  std::uint32_t q_off, q_sb, q_sh, q_st;
  std::uint32_t k_off, k_sb, k_sh, k_st;
  std::uint32_t bq, bk, nqb, nkb;
  std::uint32_t causal, sink, diagonal;
  float scale_log2, inv_nk, inv_bq, inv_tail_q, inv_bk, inv_tail_k;
  std::uint32_t counts_off, indices_off;
  std::uint32_t p_off, p_sb, p_sh, p_st, d_off, d_sb, d_sh, d_st, p_heads, p_tokens, p_order;
  std::uint32_t pool_kmu, pool_k, pool_q, pool_kf, pool_qf, pool_nkc, pool_nqc;  // as in VkParams
};
static_assert(sizeof(SpgParams) % 4 == 0, "vkCmdUpdateBuffer needs a multiple of 4 bytes");

constexpr int kTile = 64;  // query rows and keys per attention tile (= mask granularity)

class VulkanBackend;

struct VulkanStorage : Storage {
  std::shared_ptr<VulkanBackend> owner;
  Buffer buffer;
  ~VulkanStorage() override;
};

// One descriptor: a buffer range.
struct BindRange {
  VkBuffer buffer = VK_NULL_HANDLE;
  VkDeviceSize offset = 0, range = 0;
  bool operator<(const BindRange& o) const {
    return std::tie(buffer, offset, range) < std::tie(o.buffer, o.offset, o.range);
  }
};
using BindSet = std::array<BindRange, 1 + vulkan::kStorageBindings>;

class VulkanBackend final : public BackendImpl, public std::enable_shared_from_this<VulkanBackend> {
 public:
  explicit VulkanBackend(std::shared_ptr<Device> device) : dev_(std::move(device)) { init(); }
  ~VulkanBackend() override;

  Backend kind() const override { return Backend::Vulkan; }
  std::string device_name() const override { return dev_->name(); }
  std::array<int, 2> mask_granularity() const override { return {kTile, kTile}; }
  PVPrecision default_pv_precision() const override { return PVPrecision::Fp16; }
  bool supports_pv_skip() const override { return true; }
  // The token order is fused (GATHER specialization of kmean, quant and the attention kernels): rows are read
  // and the output written through it, so the runtime makes no permuted copies.
  bool reads_token_order() const override { return true; }

  std::shared_ptr<Storage> allocate(std::size_t bytes) override;
  std::shared_ptr<Storage> wrap_vulkan(uint64_t buffer, std::size_t offset, std::size_t bytes) override;
  VulkanHandles vulkan_handles() const override;
  void upload(Storage& dst, std::size_t offset, const void* src, std::size_t bytes) override;
  void download(const Storage& src, std::size_t offset, void* dst, std::size_t bytes) override;
  void attention(const AttentionProblem& p) override;
  bool sparge_predict(const SpargePredictProblem& sp) override;
  bool fuses_sparge_predict(const SpargePredictProblem& sp) const override { return sparge_fits(sp); }
  bool permute_tokens(const PermuteProblem& pp) override;
  void synchronize() override { wait(); }

  void release(Buffer& buffer);  // from ~VulkanStorage

 private:
  struct SpargeSetup;
  // SpargeAttn stage 1 (shared by sparge_predict and a fused attention): the problems it covers; its buffers
  // and parameter blocks (ensure()s: call before making any descriptor set of the call); the recording of its
  // passes after the pooling (the prediction's K mean; block statistics and selection).
  bool sparge_fits(const SpargePredictProblem& sp) const;
  void sparge_prepare(const SpargePredictProblem& sp, SpargeSetup& s);
  void sparge_record_params(const SpargeSetup& s);
  void sparge_record_kmean(const SpargeSetup& s, VkDescriptorSet set);
  void sparge_record_select(const SpargeSetup& s, VkDescriptorSet set);
  // Room for `n` more descriptor sets, so that making them cannot reset the pool under one made before.
  void reserve_descriptor_sets(std::size_t n);
  void init();
  void wait();
  void begin();
  void submit();
  void ensure(Buffer& b, VkDeviceSize bytes, bool host_visible = false);
  VkDescriptorSet descriptor_set(const BindSet& binds);
  void reset_descriptors();
  void copy(VkBuffer src, VkDeviceSize src_off, VkBuffer dst, VkDeviceSize dst_off, VkDeviceSize bytes);
  // Recorded into cmd_: transfer writes -> shader reads/writes; shader writes -> later shader reads/writes.
  void barrier_transfer_to_compute();
  void barrier_compute_to_compute();
  // The three timestamps of queries_ after the submitted work (waits for it), and milliseconds between two.
  std::array<std::uint64_t, 3> timestamps();
  double device_ms(std::uint64_t from, std::uint64_t to) const;

  std::shared_ptr<Device> dev_;
  VkDevice vk_ = VK_NULL_HANDLE;
  VkCommandPool pool_ = VK_NULL_HANDLE;
  VkCommandBuffer cmd_ = VK_NULL_HANDLE;
  VkFence fence_ = VK_NULL_HANDLE;
  VkQueryPool queries_ = VK_NULL_HANDLE;
  VkDescriptorPool dpool_ = VK_NULL_HANDLE;
  std::map<BindSet, VkDescriptorSet> dsets_;
  bool pending_ = false;

  Buffer staging_, params_, dummy_;
  // Scratch of the preprocessing passes (grow-only).
  Buffer q8_, k8_, qscale_, kscale_, kmean_, qkm_, k16_;
  Buffer v_ord_;  // V in a fused token order (order_v.comp.j2), [B, Hkv, Nk, D]
  Buffer pv_thr_, pv_stats_;  // SpargeAttn stage 2: thresholds [Hq], counters [total, skipped]
  // SpargeAttn stage 1 (sparge_common.glsl's buffers; spg_pool_: the pooled chunks, sparge_pool.glsl) and the
  // token permutation's order.
  Buffer spg_params_, spg_pool_, spg_kmean_, spg_ksim_, spg_qmean_, spg_qsim_, spg_head_, spg_order_;
};

constexpr std::uint32_t kMaxSets = 256;

VulkanStorage::~VulkanStorage() {
  if (owner && owned) owner->release(buffer);  // a wrapped buffer stays the caller's
}

VulkanBackend::~VulkanBackend() {
  if (!vk_) return;
  vkDeviceWaitIdle(vk_);
  for (Buffer* b : {&staging_, &params_, &dummy_, &q8_, &k8_, &qscale_, &kscale_, &kmean_, &qkm_, &k16_, &v_ord_, &pv_thr_, &pv_stats_,
                    &spg_params_, &spg_pool_, &spg_kmean_, &spg_ksim_, &spg_qmean_, &spg_qsim_, &spg_head_,
                    &spg_order_})
    dev_->destroy_buffer(*b);
  if (dpool_) vkDestroyDescriptorPool(vk_, dpool_, nullptr);
  if (queries_) vkDestroyQueryPool(vk_, queries_, nullptr);
  if (fence_) vkDestroyFence(vk_, fence_, nullptr);
  if (pool_) vkDestroyCommandPool(vk_, pool_, nullptr);
}

void VulkanBackend::init() {
  vk_ = dev_->device();
  VkCommandPoolCreateInfo cpci{VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO};
  cpci.flags = VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT;
  cpci.queueFamilyIndex = dev_->queue_family();
  check(vkCreateCommandPool(vk_, &cpci, nullptr, &pool_), "vkCreateCommandPool");
  VkCommandBufferAllocateInfo cbai{VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO};
  cbai.commandPool = pool_;
  cbai.level = VK_COMMAND_BUFFER_LEVEL_PRIMARY;
  cbai.commandBufferCount = 1;
  check(vkAllocateCommandBuffers(vk_, &cbai, &cmd_), "vkAllocateCommandBuffers");
  VkFenceCreateInfo fci{VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
  check(vkCreateFence(vk_, &fci, nullptr, &fence_), "vkCreateFence");
  if (dev_->timestamp_valid_bits()) {
    VkQueryPoolCreateInfo qpci{VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO};
    qpci.queryType = VK_QUERY_TYPE_TIMESTAMP;
    qpci.queryCount = 3;
    check(vkCreateQueryPool(vk_, &qpci, nullptr, &queries_), "vkCreateQueryPool");
  }
  std::array<VkDescriptorPoolSize, 2> sizes{{{VK_DESCRIPTOR_TYPE_UNIFORM_BUFFER, kMaxSets},
                                             {VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, kMaxSets * vulkan::kStorageBindings}}};
  VkDescriptorPoolCreateInfo dpci{VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO};
  dpci.maxSets = kMaxSets;
  dpci.poolSizeCount = static_cast<std::uint32_t>(sizes.size());
  dpci.pPoolSizes = sizes.data();
  check(vkCreateDescriptorPool(vk_, &dpci, nullptr, &dpool_), "vkCreateDescriptorPool");
  params_ = dev_->create_buffer(sizeof(VkParams), VK_BUFFER_USAGE_UNIFORM_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT,
                                false);
  dummy_ = dev_->create_buffer(256, VK_BUFFER_USAGE_STORAGE_BUFFER_BIT, false);
  spg_params_ = dev_->create_buffer(sizeof(SpgParams),
                                    VK_BUFFER_USAGE_UNIFORM_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT, false);
}

void VulkanBackend::wait() {
  if (!pending_) return;
  pending_ = false;
  check(vkWaitForFences(vk_, 1, &fence_, VK_TRUE, UINT64_MAX), "vkWaitForFences");
  check(vkResetFences(vk_, 1, &fence_), "vkResetFences");
}

void VulkanBackend::begin() {
  wait();
  check(vkResetCommandBuffer(cmd_, 0), "vkResetCommandBuffer");
  VkCommandBufferBeginInfo bi{VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO};
  bi.flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT;
  check(vkBeginCommandBuffer(cmd_, &bi), "vkBeginCommandBuffer");
  // Make everything earlier submissions (and the host) wrote visible to this one.
  VkMemoryBarrier mb{VK_STRUCTURE_TYPE_MEMORY_BARRIER};
  mb.srcAccessMask = VK_ACCESS_MEMORY_WRITE_BIT | VK_ACCESS_HOST_WRITE_BIT;
  mb.dstAccessMask = VK_ACCESS_MEMORY_READ_BIT | VK_ACCESS_MEMORY_WRITE_BIT;
  vkCmdPipelineBarrier(cmd_, VK_PIPELINE_STAGE_ALL_COMMANDS_BIT | VK_PIPELINE_STAGE_HOST_BIT,
                       VK_PIPELINE_STAGE_ALL_COMMANDS_BIT, 0, 1, &mb, 0, nullptr, 0, nullptr);
}

void VulkanBackend::submit() {
  // Results become visible to the host after the fence wait.
  VkMemoryBarrier mb{VK_STRUCTURE_TYPE_MEMORY_BARRIER};
  mb.srcAccessMask = VK_ACCESS_MEMORY_WRITE_BIT;
  mb.dstAccessMask = VK_ACCESS_HOST_READ_BIT;
  vkCmdPipelineBarrier(cmd_, VK_PIPELINE_STAGE_ALL_COMMANDS_BIT, VK_PIPELINE_STAGE_HOST_BIT, 0, 1, &mb, 0, nullptr, 0,
                       nullptr);
  check(vkEndCommandBuffer(cmd_), "vkEndCommandBuffer");
  VkSubmitInfo si{VK_STRUCTURE_TYPE_SUBMIT_INFO};
  si.commandBufferCount = 1;
  si.pCommandBuffers = &cmd_;
  {
    std::lock_guard<std::mutex> lock(dev_->queue_mutex());
    check(vkQueueSubmit(dev_->queue(), 1, &si, fence_), "vkQueueSubmit");
  }
  pending_ = true;
}

void VulkanBackend::release(Buffer& buffer) {
  try {
    wait();
  } catch (...) {
    // A failed wait (device lost) must not escape a destructor; the buffer is freed regardless.
  }
  reset_descriptors();
  dev_->destroy_buffer(buffer);
}

std::array<std::uint64_t, 3> VulkanBackend::timestamps() {
  wait();
  std::array<std::uint64_t, 3> ts{};
  check(vkGetQueryPoolResults(vk_, queries_, 0, 3, sizeof(ts), ts.data(), sizeof(std::uint64_t),
                              VK_QUERY_RESULT_64_BIT | VK_QUERY_RESULT_WAIT_BIT),
        "vkGetQueryPoolResults");
  return ts;
}

double VulkanBackend::device_ms(std::uint64_t from, std::uint64_t to) const {
  const std::uint32_t bits = dev_->timestamp_valid_bits();
  const std::uint64_t mask = bits >= 64 ? ~std::uint64_t(0) : ((std::uint64_t(1) << bits) - 1);
  return double((to - from) & mask) * dev_->properties().limits.timestampPeriod * 1e-6;
}

void VulkanBackend::barrier_transfer_to_compute() {
  VkMemoryBarrier mb{VK_STRUCTURE_TYPE_MEMORY_BARRIER};
  mb.srcAccessMask = VK_ACCESS_TRANSFER_WRITE_BIT;
  mb.dstAccessMask = VK_ACCESS_UNIFORM_READ_BIT | VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT;
  vkCmdPipelineBarrier(cmd_, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, 0, 1, &mb, 0, nullptr,
                       0, nullptr);
}

void VulkanBackend::barrier_compute_to_compute() {
  VkMemoryBarrier mb{VK_STRUCTURE_TYPE_MEMORY_BARRIER};
  mb.srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT;
  mb.dstAccessMask = VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT;
  vkCmdPipelineBarrier(cmd_, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, 0, 1, &mb, 0,
                       nullptr, 0, nullptr);
}

void VulkanBackend::reset_descriptors() {
  if (dsets_.empty()) return;
  vkResetDescriptorPool(vk_, dpool_, 0);
  dsets_.clear();
}

void VulkanBackend::ensure(Buffer& b, VkDeviceSize bytes, bool host_visible) {
  if (b.buffer && b.size >= bytes) return;
  wait();
  reset_descriptors();
  dev_->destroy_buffer(b);
  VkDeviceSize size = std::max<VkDeviceSize>(bytes, 256);
  VkBufferUsageFlags usage = host_visible ? VK_BUFFER_USAGE_TRANSFER_SRC_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT
                                          : VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT |
                                                VK_BUFFER_USAGE_TRANSFER_DST_BIT;
  b = dev_->create_buffer(size, usage, host_visible);
}

VkDescriptorSet VulkanBackend::descriptor_set(const BindSet& binds) {
  auto it = dsets_.find(binds);
  if (it != dsets_.end()) return it->second;
  if (dsets_.size() >= kMaxSets) {
    wait();
    reset_descriptors();
  }
  VkDescriptorSetLayout layout = dev_->set_layout();
  VkDescriptorSetAllocateInfo ai{VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO};
  ai.descriptorPool = dpool_;
  ai.descriptorSetCount = 1;
  ai.pSetLayouts = &layout;
  VkDescriptorSet set = VK_NULL_HANDLE;
  check(vkAllocateDescriptorSets(vk_, &ai, &set), "vkAllocateDescriptorSets");
  std::array<VkDescriptorBufferInfo, 1 + vulkan::kStorageBindings> infos;
  std::array<VkWriteDescriptorSet, 1 + vulkan::kStorageBindings> writes;
  for (std::size_t i = 0; i < binds.size(); ++i) {
    infos[i] = {binds[i].buffer, binds[i].offset, binds[i].range};
    writes[i] = VkWriteDescriptorSet{VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET};
    writes[i].dstSet = set;
    writes[i].dstBinding = static_cast<std::uint32_t>(i);
    writes[i].descriptorCount = 1;
    writes[i].descriptorType = i == 0 ? VK_DESCRIPTOR_TYPE_UNIFORM_BUFFER : VK_DESCRIPTOR_TYPE_STORAGE_BUFFER;
    writes[i].pBufferInfo = &infos[i];
  }
  vkUpdateDescriptorSets(vk_, static_cast<std::uint32_t>(writes.size()), writes.data(), 0, nullptr);
  dsets_[binds] = set;
  return set;
}

// ---------------------------------------------------------------------------------------------------------
// Memory

std::shared_ptr<Storage> VulkanBackend::allocate(std::size_t bytes) {
  auto s = std::make_shared<VulkanStorage>();
  s->buffer = dev_->create_buffer(bytes, VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT |
                                             VK_BUFFER_USAGE_TRANSFER_DST_BIT,
                                  false);
  s->owner = shared_from_this();
  s->bytes = bytes;
  s->backend = Backend::Vulkan;
  return s;
}

std::shared_ptr<Storage> VulkanBackend::wrap_vulkan(uint64_t buffer, std::size_t offset, std::size_t bytes) {
  auto s = std::make_shared<VulkanStorage>();
  s->buffer.buffer = reinterpret_cast<VkBuffer>(static_cast<uintptr_t>(buffer));
  s->buffer.size = offset + bytes;
  s->owner = shared_from_this();
  s->owned = false;
  s->bytes = offset + bytes;
  s->backend = Backend::Vulkan;
  return s;
}

VulkanHandles VulkanBackend::vulkan_handles() const {
  VulkanHandles h;
  h.instance = dev_->instance();
  h.physical_device = dev_->physical();
  h.device = dev_->device();
  h.queue = dev_->queue();
  h.queue_family = dev_->queue_family();
  return h;
}

void VulkanBackend::copy(VkBuffer src, VkDeviceSize src_off, VkBuffer dst, VkDeviceSize dst_off, VkDeviceSize bytes) {
  begin();
  VkBufferCopy region{src_off, dst_off, bytes};
  vkCmdCopyBuffer(cmd_, src, dst, 1, &region);
  submit();
  wait();
}

constexpr std::size_t kStagingChunk = std::size_t(64) << 20;

void VulkanBackend::upload(Storage& dst, std::size_t offset, const void* src, std::size_t bytes) {
  auto& d = static_cast<VulkanStorage&>(dst);
  if (offset + bytes > d.bytes) fail(Status::Internal, "vulkan: upload out of the buffer's range");
  for (std::size_t done = 0; done < bytes;) {
    std::size_t n = std::min(kStagingChunk, bytes - done);
    ensure(staging_, std::min(kStagingChunk, bytes), true);
    wait();
    std::memcpy(staging_.mapped, static_cast<const std::byte*>(src) + done, n);
    copy(staging_.buffer, 0, d.buffer.buffer, offset + done, n);
    done += n;
  }
}

void VulkanBackend::download(const Storage& src, std::size_t offset, void* dst, std::size_t bytes) {
  auto& s = static_cast<const VulkanStorage&>(src);
  if (offset + bytes > s.bytes) fail(Status::Internal, "vulkan: download out of the buffer's range");
  for (std::size_t done = 0; done < bytes;) {
    std::size_t n = std::min(kStagingChunk, bytes - done);
    ensure(staging_, std::min(kStagingChunk, bytes), true);
    copy(s.buffer.buffer, offset + done, staging_.buffer, 0, n);
    std::memcpy(static_cast<std::byte*>(dst) + done, staging_.mapped, n);
    done += n;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Attention

std::uint32_t u32(int64_t v, const char* what) {
  if (v < 0 || v > int64_t(UINT32_MAX))
    not_supported(Backend::Vulkan, std::string(what) + " = " + std::to_string(v) + " (beyond 32-bit indexing)");
  return static_cast<std::uint32_t>(v);
}

// Binds [offset, offset + extent) of an operand's buffer: the descriptor starts at the offset rounded down to
// the device's alignment; returns the operand's first element relative to the descriptor.
struct OperandBinding {
  BindRange range;
  std::uint32_t first = 0;
};

}  // namespace

namespace {

OperandBinding bind_operand(const Device& dev, const Operand& op, std::size_t elem, int64_t last_index,
                            const char* name) {
  auto* s = static_cast<VulkanStorage*>(op.storage);
  if (op.offset_bytes % elem) fail(Status::InvalidArgument, std::string("vulkan: ") + name + " is not aligned to its element size");
  // 16: the kernels read aligned rows as uvec4 relative to the descriptor's start.
  VkDeviceSize align = std::max<VkDeviceSize>(16, dev.properties().limits.minStorageBufferOffsetAlignment);
  VkDeviceSize lo = op.offset_bytes / align * align;
  VkDeviceSize hi = op.offset_bytes + static_cast<VkDeviceSize>(last_index + 1) * elem;
  hi = std::min<VkDeviceSize>((hi + 3) / 4 * 4, s->buffer.size);
  OperandBinding b;
  b.range = {s->buffer.buffer, lo, hi - lo};
  if (hi - lo > dev.properties().limits.maxStorageBufferRange)
    not_supported(Backend::Vulkan, std::string(name) + " spans " + std::to_string(hi - lo) +
                                       " bytes, more than this device's maxStorageBufferRange " +
                                       std::to_string(dev.properties().limits.maxStorageBufferRange));
  b.first = u32(static_cast<int64_t>((op.offset_bytes - lo) / elem), name);
  return b;
}

int64_t last_index(const Operand& op, int batch, int heads, int tokens, int dim) {
  return int64_t(batch - 1) * op.stride_batch + int64_t(heads - 1) * op.stride_head +
         int64_t(tokens - 1) * op.stride_token + (dim - 1);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// SpargeAttn stage 1 (docs/SPARGE.md): the block predictor, on the device, in the same arithmetic as the host
// reference. Passes, per call (templates/glsl):
//   1. quant with POOL = 2 (pooling only): raw K, 64-token chunk sums (sparge_pool.glsl);
//   2. sparge_kmean: the prediction's own K mean from them (specified to the bit; not the kernel's smoothing
//      vector), needed before smoothed K can be pooled;
//   3. quant with POOL = 1: Q, and K − km, chunk sums of v and v·(1/‖v‖) and chunk flags;
//   4. sparge_finalize: block means and self-similarities from the chunks;
//   5. sparge_select: the LUT, one workgroup per 1, 2 or 4 query block rows.
// sparge_predict runs the pooling passes with QUANT off; a fused attention() (AttentionProblem::predict) runs
// its own quantization passes with POOL = 1 as pass 3, so q and k are read by the prediction only in the raw K
// pass: one pooling implementation for both, which the LUT-equality tests exercise through either.

namespace {
constexpr int kSpargeMaxKeyBlocks = 1024;  // SLOTS of sparge_select (1 row of 1024 key blocks per workgroup)
constexpr int kSpargeMaxDim = 256;         // one finalize thread per channel slot, at most 256
constexpr int kSpargeChunk = 64;           // tokens per pooled chunk (blocks are multiples of it)
constexpr int64_t kSpargeMaxBlock = int64_t(1) << 22;  // chunk trees: 2^16 leaves (sparge_kmean TREE_LEVELS)

// The smallest power of two >= n (1 for n <= 1): the leaves of a tree sum over n values.
std::uint32_t spg_slots(int64_t n) {
  std::uint32_t s = 1;
  while (s < n) s <<= 1;
  return s;
}

// Regions of the pooling buffer (sparge_pool.glsl), in 4-byte elements: the prediction's K mean [B, Hkv, DP],
// chunk rows of K and Q [B, H, chunks, 2, DP], chunk flags of K and Q [B, H, chunks].
struct PoolLayout {
  std::uint32_t kmu = 0, k = 0, q = 0, kf = 0, qf = 0, nkc = 0, nqc = 0;
  VkDeviceSize bytes = 0;
};
PoolLayout pool_layout(const SpargePredictProblem& sp, std::uint32_t DP) {
  PoolLayout l;
  const VkDeviceSize B = sp.batch, Hq = sp.heads_q, Hkv = sp.heads_kv;
  l.nkc = std::uint32_t((sp.tokens_k + kSpargeChunk - 1) / kSpargeChunk);
  l.nqc = std::uint32_t((sp.tokens_q + kSpargeChunk - 1) / kSpargeChunk);
  VkDeviceSize at = B * Hkv * DP;
  const VkDeviceSize k = at;
  at += B * Hkv * l.nkc * 2 * DP;
  const VkDeviceSize q = at;
  at += B * Hq * l.nqc * 2 * DP;
  const VkDeviceSize kf = at;
  at += B * Hkv * l.nkc;
  const VkDeviceSize qf = at;
  at += B * Hq * l.nqc;
  l.bytes = at * 4;
  if (l.bytes <= UINT32_MAX)  // else sparge_fits refuses the problem (beyond any maxStorageBufferRange)
    l.k = std::uint32_t(k), l.q = std::uint32_t(q), l.kf = std::uint32_t(kf), l.qf = std::uint32_t(qf);
  return l;
}
template <class Params>
void set_pool_fields(Params& prm, const PoolLayout& l) {
  prm.pool_kmu = l.kmu, prm.pool_k = l.k, prm.pool_q = l.q, prm.pool_kf = l.kf, prm.pool_qf = l.qf;
  prm.pool_nkc = l.nkc, prm.pool_nqc = l.nqc;
}

// Whether the pooling may read an operand's rows as aligned 16-byte words (quant's VEC).
VkBool32 rows_aligned(std::uint32_t first, const Operand& op, int D) {
  return VkBool32(first % 8 == 0 && op.stride_batch % 8 == 0 && op.stride_head % 8 == 0 &&
                  op.stride_token % 8 == 0 && D % 8 == 0);
}
}  // namespace

struct VulkanBackend::SpargeSetup {
  std::uint32_t DP = 0;  // channel slots of the trees over channels (tree_slots(D))
  PoolLayout pool;
  SpgParams prm{};
  std::vector<float> head;  // [Hq][4]: θ, τ, top-k, dense
  BindSet binds;            // the set of sparge_kmean, sparge_finalize and sparge_select
  std::uint32_t select_rows = 1;
};

bool VulkanBackend::sparge_fits(const SpargePredictProblem& sp) const {
  const auto& limits = dev_->properties().limits;
  const int D = sp.head_dim;
  // The pooled chunks are 64 tokens: block sizes must be multiples of 64 (the runtime's blocks are multiples of
  // the 64x64 mask tile).
  const std::uint32_t DP = spg_slots(D);
  const std::uint32_t G = DP / 8;
  // quant's shared memory with the pooling (sparge_pool.glsl: part_n, part_s, part_u, inv_norm, flags; quant's own)
  const std::uint32_t quant_shared = (64 * (G + 1) + 16 * DP + 64 + 1 + 16) * 4;
  const PoolLayout pool = pool_layout(sp, DP);
  const VkDeviceSize kv_blocks = VkDeviceSize(sp.batch) * sp.heads_kv * sp.blocks_k;
  const VkDeviceSize q_blocks = VkDeviceSize(sp.batch) * sp.heads_q * sp.blocks_q;
  return D <= kSpargeMaxDim && DP >= 8 && sp.blocks_k <= kSpargeMaxKeyBlocks && sp.heads_q <= 4096 &&
         sp.block_q <= kSpargeMaxBlock && sp.block_k <= kSpargeMaxBlock && sp.block_q % kSpargeChunk == 0 &&
         sp.block_k % kSpargeChunk == 0 && quant_shared <= limits.maxComputeSharedMemorySize &&
         std::max({std::uint32_t(sp.blocks_q), std::uint32_t(sp.blocks_k), pool.nqc, pool.nkc}) <=
             limits.maxComputeWorkGroupCount[0] &&
         std::uint32_t(sp.heads_q) <= limits.maxComputeWorkGroupCount[1] &&
         std::uint32_t(sp.batch) <= limits.maxComputeWorkGroupCount[2] && pool.bytes <= limits.maxStorageBufferRange &&
         std::max(kv_blocks, q_blocks) * DP * 4 <= limits.maxStorageBufferRange;
}

void VulkanBackend::sparge_prepare(const SpargePredictProblem& sp, SpargeSetup& s) {
  const int B = sp.batch, Hq = sp.heads_q, Hkv = sp.heads_kv, nqb = sp.blocks_q, nkb = sp.blocks_k;
  s.DP = spg_slots(sp.head_dim);
  s.pool = pool_layout(sp, s.DP);
  SpgParams& prm = s.prm;
  prm = SpgParams{};
  prm.B = B, prm.Hq = Hq, prm.Hkv = Hkv, prm.Nq = sp.tokens_q, prm.Nk = sp.tokens_k, prm.D = sp.head_dim;
  prm.group_size = Hq / Hkv;
  prm.bq = sp.block_q, prm.bk = sp.block_k, prm.nqb = nqb, prm.nkb = nkb;
  prm.causal = sp.causal, prm.sink = sp.sink, prm.diagonal = sp.diagonal;
  prm.scale_log2 = sp.scale_log2, prm.inv_nk = sp.inv_tokens_k;
  prm.inv_bq = sp.inv_block_q, prm.inv_tail_q = sp.inv_tail_q, prm.inv_bk = sp.inv_block_k, prm.inv_tail_k = sp.inv_tail_k;
  set_pool_fields(prm, s.pool);

  s.binds.fill(BindRange{dummy_.buffer, 0, dummy_.size});
  s.binds[0] = {spg_params_.buffer, 0, sizeof(SpgParams)};
  const int64_t rows = int64_t(B) * Hq * nqb;
  OperandBinding counts = bind_operand(*dev_, sp.counts, 4, rows - 1, "LUT counts");
  OperandBinding indices = bind_operand(*dev_, sp.indices, 4, rows * nkb - 1, "LUT indices");
  s.binds[10] = counts.range, s.binds[11] = indices.range;
  prm.counts_off = counts.first, prm.indices_off = indices.first;

  // block rows of DP floats (padding channels +0), so that sparge_select reads them as aligned vec4
  const VkDeviceSize kv_blocks = VkDeviceSize(B) * Hkv * nkb, q_blocks = VkDeviceSize(B) * Hq * nqb;
  ensure(spg_pool_, s.pool.bytes);
  ensure(spg_kmean_, kv_blocks * s.DP * 4);
  ensure(spg_ksim_, kv_blocks * 4);
  ensure(spg_qmean_, q_blocks * s.DP * 4);
  ensure(spg_qsim_, q_blocks * 4);
  ensure(spg_head_, VkDeviceSize(Hq) * 16);
  auto whole = [](const Buffer& b) { return BindRange{b.buffer, 0, b.size}; };
  s.binds[5] = whole(spg_kmean_), s.binds[6] = whole(spg_ksim_), s.binds[7] = whole(spg_qmean_);
  s.binds[8] = whole(spg_qsim_), s.binds[9] = whole(spg_head_), s.binds[19] = whole(spg_pool_);
  s.head.assign(std::size_t(Hq) * 4, 0.0f);
  for (int h = 0; h < Hq; ++h) {
    s.head[std::size_t(h) * 4 + 0] = sp.simthreshd[std::size_t(h)];
    s.head[std::size_t(h) * 4 + 1] = sp.cdfthreshd[std::size_t(h)];
    s.head[std::size_t(h) * 4 + 2] = sp.topk[std::size_t(h)];
    s.head[std::size_t(h) * 4 + 3] = sp.dense[std::size_t(h)] ? 1.0f : 0.0f;
  }
  // query block rows per select workgroup: as many as fit its 1024 shared slots
  s.select_rows = nkb <= 256 ? 4 : nkb <= 512 ? 2 : 1;
}

void VulkanBackend::sparge_record_params(const SpargeSetup& s) {
  vkCmdUpdateBuffer(cmd_, spg_params_.buffer, 0, sizeof(SpgParams), &s.prm);
  vkCmdUpdateBuffer(cmd_, spg_head_.buffer, 0, VkDeviceSize(s.head.size()) * 4, s.head.data());
}

void VulkanBackend::sparge_record_kmean(const SpargeSetup& s, VkDescriptorSet set) {
  vkCmdBindDescriptorSets(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, dev_->pipeline_layout(), 0, 1, &set, 0, nullptr);
  vkCmdBindPipeline(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, dev_->pipeline("sparge_kmean", {}));
  vkCmdDispatch(cmd_, (s.DP + 31) / 32, s.prm.Hkv, s.prm.B);
}

void VulkanBackend::sparge_record_select(const SpargeSetup& s, VkDescriptorSet set) {
  vkCmdBindDescriptorSets(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, dev_->pipeline_layout(), 0, 1, &set, 0, nullptr);
  // sparge_finalize's chunk counter: log2(chunk leaves of the largest block) + 1 levels
  std::uint32_t levels = 1;
  while ((1u << (levels - 1)) < std::max(spg_slots(s.prm.bq), spg_slots(s.prm.bk)) / kSpargeChunk) ++levels;
  vkCmdBindPipeline(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, dev_->pipeline("sparge_finalize", {s.DP, levels}));
  for (std::uint32_t which : {0u, 1u}) {  // Q blocks, smoothed K blocks
    vkCmdPushConstants(cmd_, dev_->pipeline_layout(), VK_SHADER_STAGE_COMPUTE_BIT, 0, 4, &which);
    vkCmdDispatch(cmd_, which ? s.prm.nkb : s.prm.nqb, which ? s.prm.Hkv : s.prm.Hq, s.prm.B);
  }
  barrier_compute_to_compute();
  vkCmdBindPipeline(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, dev_->pipeline("sparge_select", {s.DP}));
  vkCmdPushConstants(cmd_, dev_->pipeline_layout(), VK_SHADER_STAGE_COMPUTE_BIT, 0, 4, &s.select_rows);
  vkCmdDispatch(cmd_, (s.prm.nqb + s.select_rows - 1) / s.select_rows, s.prm.Hq, s.prm.B);
}

void VulkanBackend::reserve_descriptor_sets(std::size_t n) {
  if (dsets_.size() + n > kMaxSets) {
    wait();
    reset_descriptors();
  }
}

bool VulkanBackend::sparge_predict(const SpargePredictProblem& sp) {
  if (!sparge_fits(sp)) return false;
  const int B = sp.batch, Hq = sp.heads_q, Hkv = sp.heads_kv, D = sp.head_dim;
  SpargeSetup s;
  sparge_prepare(sp, s);
  // The pooling passes are quant's with QUANT off: their own parameter block (only what they read), q and k
  // (through the token order), and the pooling buffer. Spans of 64 tokens: one chunk per workgroup.
  VkParams prm{};
  prm.B = B, prm.Hq = Hq, prm.Hkv = Hkv, prm.Nq = sp.tokens_q, prm.Nk = sp.tokens_k, prm.D = D;
  prm.group_size = Hq / Hkv;
  prm.q_span = prm.k_span = kSpargeChunk, prm.q_inner = prm.k_inner = 1;
  set_pool_fields(prm, s.pool);
  BindSet binds;
  binds.fill(BindRange{dummy_.buffer, 0, dummy_.size});
  binds[0] = {params_.buffer, 0, sizeof(VkParams)};
  OperandBinding q = bind_operand(*dev_, sp.q, 2, last_index(sp.q, B, Hq, sp.tokens_q, D), "q");
  OperandBinding k = bind_operand(*dev_, sp.k, 2, last_index(sp.k, B, Hkv, sp.tokens_k, D), "k");
  binds[1] = q.range, binds[2] = k.range, binds[19] = s.binds[19];
  prm.q_off = q.first, prm.q_sb = u32(sp.q.stride_batch, "stride"), prm.q_sh = u32(sp.q.stride_head, "stride");
  prm.q_st = u32(sp.q.stride_token, "stride");
  prm.k_off = k.first, prm.k_sb = u32(sp.k.stride_batch, "stride"), prm.k_sh = u32(sp.k.stride_head, "stride");
  prm.k_st = u32(sp.k.stride_token, "stride");
  // A fused token order (SpargePredictProblem::token_order): the pooling reads q and k rows through it.
  const bool gather = sp.token_order.storage != nullptr && sp.token_order_size > 0;
  if (gather) {
    if (sp.token_order.dtype != DType::I32 || sp.token_order_size > std::min(sp.tokens_q, sp.tokens_k))
      fail(Status::Internal, "vulkan: a token order must be I32 with at most min(Nq, Nk) entries");
    OperandBinding o = bind_operand(*dev_, sp.token_order, 4, sp.token_order_size - 1, "token order");
    binds[18] = o.range;
    prm.order_off = o.first;
    prm.order_size = u32(sp.token_order_size, "token order size");
  }

  // quant's specialization: dtype, fp16 Q·Kᵀ (off), order, POOL, QUANT (off), DP, 16-byte row loads.
  const VkBool32 in_bf16 = sp.q.dtype == DType::BF16, b_gather = gather;
  VkPipeline pool_raw = dev_->pipeline("quant", {in_bf16, 0, b_gather, 2, 0, s.DP, rows_aligned(k.first, sp.k, D)});
  VkPipeline pool_q = dev_->pipeline("quant", {in_bf16, 0, b_gather, 1, 0, s.DP, rows_aligned(q.first, sp.q, D)});
  VkPipeline pool_k = dev_->pipeline("quant", {in_bf16, 0, b_gather, 1, 0, s.DP, rows_aligned(k.first, sp.k, D)});
  reserve_descriptor_sets(2);
  VkDescriptorSet pool_set = descriptor_set(binds), spg_set = descriptor_set(s.binds);
  begin();
  vkCmdUpdateBuffer(cmd_, params_.buffer, 0, sizeof(VkParams), &prm);
  sparge_record_params(s);
  barrier_transfer_to_compute();
  const bool timed = profiling_ && queries_;
  if (timed) {
    vkCmdResetQueryPool(cmd_, queries_, 0, 3);
    vkCmdWriteTimestamp(cmd_, VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT, queries_, 0);
    vkCmdWriteTimestamp(cmd_, VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT, queries_, 1);  // unused; every query is read
  }
  auto pool_pass = [&](VkPipeline pipeline, std::uint32_t which) {
    vkCmdBindPipeline(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, pipeline);
    vkCmdPushConstants(cmd_, dev_->pipeline_layout(), VK_SHADER_STAGE_COMPUTE_BIT, 0, 4, &which);
    vkCmdDispatch(cmd_, which ? s.pool.nkc : s.pool.nqc, which ? Hkv : Hq, B);
  };
  // The Q pass needs nothing before it: it runs beside the raw K pass; smoothed K needs the K mean.
  vkCmdBindDescriptorSets(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, dev_->pipeline_layout(), 0, 1, &pool_set, 0, nullptr);
  pool_pass(pool_raw, 1);
  pool_pass(pool_q, 0);
  barrier_compute_to_compute();
  sparge_record_kmean(s, spg_set);
  barrier_compute_to_compute();
  vkCmdBindDescriptorSets(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, dev_->pipeline_layout(), 0, 1, &pool_set, 0, nullptr);
  pool_pass(pool_k, 1);
  barrier_compute_to_compute();
  sparge_record_select(s, spg_set);
  if (timed) vkCmdWriteTimestamp(cmd_, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, queries_, 2);
  submit();
  if (timed) {
    const std::array<std::uint64_t, 3> ts = timestamps();
    timing_.total_ms = device_ms(ts[0], ts[2]);
    timing_.attention_ms = 0;
  }
  return true;
}

void VulkanBackend::attention(const AttentionProblem& p) {
  if (p.pv_precision == PVPrecision::Fp8) not_supported(Backend::Vulkan, "fp8 P·V");
  if (p.batch <= 0 || p.heads_q <= 0 || p.tokens_q <= 0) return;  // nothing to compute
  const bool int8 = p.qk_precision == QKPrecision::Int8;
  const bool in_bf16 = p.q.dtype == DType::BF16;
  const bool out_bf16 = p.out.dtype == DType::BF16;
  const int D = p.head_dim;
  const char* mask = p.mask_layout == MaskLayout::None ? "none" : p.mask_layout == MaskLayout::Bitmap ? "bitmap" : "lut";
  // Three flavours of the attention kernel: "coopmat" (cooperative matrices, i.e. the GPU's matrix units,
  // through VK_NV_cooperative_matrix: INT8 Q·Kᵀ with fp16 inputs), "fast" (packed 4x8-bit dot product,
  // unrolled inner loops) for GPUs with shaderIntegerDotProduct, "portable" (plain integer math, rolled inner
  // loops: compiles in a second on CPU implementations such as lavapipe, where the unrolled one takes many).
  // The best one the device and the problem allow is picked; SPARQ_VULKAN_KERNELS=portable, =fast or =coopmat
  // overrides the choice (fast needs shaderIntegerDotProduct; coopmat falls back to the automatic choice for
  // what it does not cover: bf16 inputs, fp16 Q·Kᵀ, head dims that are not a multiple of 32 or above 128).
  const bool gpu = dev_->properties().deviceType != VK_PHYSICAL_DEVICE_TYPE_CPU;
  bool idot = dev_->features().integer_dot_product && gpu;
  const std::string coop_kernel = "attention_d" + std::to_string(D) + "_" + mask + "_coopmat";
  const std::uint32_t coop_shared = (2 * 64u * (D / 16 + 1) + 64u * (D / 8 + 1) + 64u * 9) * 16 + 3 * 256;  // the kernel's
  const bool coop_ok = dev_->features().cooperative_matrix && int8 && !in_bf16 && D % 32 == 0 && D <= 128 &&
                       Device::has_kernel(coop_kernel) &&
                       coop_shared <= dev_->properties().limits.maxComputeSharedMemorySize;
  bool coop = coop_ok;
  if (const char* flavour = std::getenv("SPARQ_VULKAN_KERNELS"); flavour && *flavour) {
    if (std::strcmp(flavour, "portable") == 0) idot = false, coop = false;
    else if (std::strcmp(flavour, "fast") == 0) idot = dev_->features().integer_dot_product, coop = false;
    else if (std::strcmp(flavour, "coopmat") == 0) coop = coop_ok;  // = the automatic choice, spelt out
  }
  std::string kernel = coop ? coop_kernel : "attention_d" + std::to_string(D) + "_" + mask + (idot ? "_idot" : "");
  if (!Device::has_kernel(kernel))
    not_supported(Backend::Vulkan, "head_dim " + std::to_string(D) +
                                       " (no kernel was generated for it; reconfigure with -Dhead_dims=...," +
                                       std::to_string(D) + ")");
  const auto& limits = dev_->properties().limits;
  const int Nk = p.tokens_k;
  const bool smooth = p.smooth_k && Nk > 0;

  // Quantization groups (NUMERICS.md): group of token t = (t / span)·inner + t % inner.
  std::uint32_t q_span = 128, q_inner = 1, k_span = 64, k_inner = 1;
  if (int8 && p.qk_granularity == QKGranularity::PerWarp) q_span = 16;
  if (int8 && p.qk_granularity == QKGranularity::PerThread) q_span = 16, q_inner = 8, k_inner = 8;
  const std::uint32_t q_spans = (p.tokens_q + q_span - 1) / q_span, k_spans = (Nk + k_span - 1) / k_span;

  VkParams prm{};
  prm.B = p.batch, prm.Hq = p.heads_q, prm.Hkv = p.heads_kv, prm.Nq = p.tokens_q, prm.Nk = Nk, prm.D = D;
  prm.group_size = p.kv_group();
  prm.scale = p.scale;
  prm.q_span = q_span, prm.q_inner = q_inner, prm.k_span = k_span, prm.k_inner = k_inner;
  prm.nqg = q_spans * q_inner, prm.nkg = k_spans * k_inner;
  prm.smooth_k = smooth ? 1 : 0;
  prm.has_lse = p.has_lse ? 1 : 0;

  BindSet binds;
  auto dummy = BindRange{dummy_.buffer, 0, dummy_.size};
  binds.fill(dummy);
  binds[0] = {params_.buffer, 0, sizeof(VkParams)};
  auto bind_attn_operand = [&](int slot, const Operand& op, int heads, int tokens, std::uint32_t& off,
                               std::uint32_t& sb, std::uint32_t& sh, std::uint32_t& st, const char* name) {
    OperandBinding b = bind_operand(*dev_, op, 2, last_index(op, p.batch, heads, tokens, D), name);
    binds[slot] = b.range;
    off = b.first;
    sb = u32(op.stride_batch, "stride"), sh = u32(op.stride_head, "stride"), st = u32(op.stride_token, "stride");
  };
  bind_attn_operand(1, p.q, p.heads_q, p.tokens_q, prm.q_off, prm.q_sb, prm.q_sh, prm.q_st, "q");
  if (Nk > 0) {
    bind_attn_operand(2, p.k, p.heads_kv, Nk, prm.k_off, prm.k_sb, prm.k_sh, prm.k_st, "k");
    bind_attn_operand(3, p.v, p.heads_kv, Nk, prm.v_off, prm.v_sb, prm.v_sh, prm.v_st, "v");
  }
  bind_attn_operand(4, p.out, p.heads_q, p.tokens_q, prm.o_off, prm.o_sb, prm.o_sh, prm.o_st, "out");
  if (p.has_lse) {
    Operand l = p.lse;
    OperandBinding b = bind_operand(*dev_, l, 4,
                                    int64_t(p.batch - 1) * l.stride_batch + int64_t(p.heads_q - 1) * l.stride_head +
                                        (p.tokens_q - 1),
                                    "lse");
    binds[5] = b.range;
    prm.lse_off = b.first, prm.lse_sb = u32(l.stride_batch, "stride"), prm.lse_sh = u32(l.stride_head, "stride");
  }
  if (p.mask_layout != MaskLayout::None) {
    prm.mask_bq = p.mask_block_q / kTile, prm.mask_bk = p.mask_block_k / kTile;
    prm.mask_nqb = p.mask_blocks_q, prm.mask_nkb = p.mask_blocks_k;
    prm.mask_hm = p.mask_layout == MaskLayout::Bitmap ? p.mask_heads : p.heads_q;
    int64_t rows = int64_t(p.batch) * prm.mask_hm * p.mask_blocks_q;
    if (p.mask_layout == MaskLayout::Bitmap) {
      OperandBinding b = bind_operand(*dev_, p.mask_bitmap, 1, rows * p.mask_blocks_k - 1, "mask bitmap");
      binds[12] = b.range;
      prm.mask_off = b.first;
    } else {
      OperandBinding c = bind_operand(*dev_, p.mask_counts, 4, rows - 1, "mask counts");
      OperandBinding i = bind_operand(*dev_, p.mask_indices, 4, rows * p.mask_blocks_k - 1, "mask indices");
      binds[13] = c.range, binds[14] = i.range;
      prm.mask_off = c.first, prm.mask_off2 = i.first;
    }
  }

  // Scratch.
  // + 64 rows: the cooperative-matrix kernel reads Q in whole 64-row tiles, also past the last row.
  const VkDeviceSize q8_bytes = (VkDeviceSize(p.batch) * p.heads_q * p.tokens_q + 64) * D;
  const VkDeviceSize k8_bytes = VkDeviceSize(p.batch) * p.heads_kv * std::max(Nk, 1) * D;
  for (VkDeviceSize bytes : {q8_bytes, k8_bytes * 2})
    if (bytes > limits.maxStorageBufferRange)
      not_supported(Backend::Vulkan, "this problem size: its scratch of " + std::to_string(bytes) +
                                         " bytes is more than this device's maxStorageBufferRange " +
                                         std::to_string(limits.maxStorageBufferRange));
  if (int8) {
    ensure(q8_, q8_bytes);
    ensure(k8_, k8_bytes);
    ensure(qscale_, VkDeviceSize(p.batch) * p.heads_q * prm.nqg * 4);
    ensure(kscale_, VkDeviceSize(p.batch) * p.heads_kv * std::max<std::uint32_t>(prm.nkg, 1) * 4);
  } else {
    ensure(k16_, k8_bytes * 2);
  }
  ensure(kmean_, VkDeviceSize(p.batch) * p.heads_kv * D * 4);
  ensure(qkm_, VkDeviceSize(p.batch) * p.heads_q * p.tokens_q * 4);
  auto whole = [](const Buffer& b) { return BindRange{b.buffer, 0, b.size}; };
  if (int8) {
    binds[6] = whole(q8_), binds[7] = whole(k8_), binds[8] = whole(qscale_), binds[9] = whole(kscale_);
  } else {
    binds[15] = whole(k16_);
  }
  binds[10] = whole(kmean_);
  binds[11] = whole(qkm_);
  const bool pv_skip = !p.pv_threshold.empty();
  if (pv_skip) {
    if (p.pv_threshold.size() != std::size_t(p.heads_q) || p.heads_q > 16384)
      fail(Status::Internal, "vulkan: pv_threshold must hold one value per query head (at most 16384)");
    ensure(pv_thr_, VkDeviceSize(p.heads_q) * 4);
    ensure(pv_stats_, 16);
    binds[16] = whole(pv_thr_), binds[17] = whole(pv_stats_);
    prm.pv_skip = 1;
  }
  // A fused token order (backend.hpp, AttentionProblem::token_order): kmean and quant read K and Q rows
  // through it, the attention kernel V rows (from a copy in token order, below, unless SPARQ_VULKAN_ORDER_V=0;
  // and fp16 Q·Kᵀ's Q rows) and writes O and LSE rows through it.
  // The preprocessed Q8, K8, K16 and scales are in token order, so the kernels' tiles are those of a copy.
  const bool gather = p.token_order.storage != nullptr && p.token_order_size > 0;
  if (gather) {
    if (p.token_order.dtype != DType::I32 || p.token_order_size > std::min(p.tokens_q, Nk))
      fail(Status::Internal, "vulkan: a token order must be I32 with at most min(Nq, Nk) entries");
    OperandBinding o = bind_operand(*dev_, p.token_order, 4, p.token_order_size - 1, "token order");
    binds[18] = o.range;
    prm.order_off = o.first;
    prm.order_size = u32(p.token_order_size, "token order size");
  }
  // With a token order, V is copied in it once (order_v, beside the quant passes) and the attention kernel reads
  // that copy with plain indexing (V_ORDERED) instead of V rows through the order in every tile: H100 (NVIDIA
  // Vulkan), B4 H32 N16K D128 SpargeAttn (sparq-sparge-bench): sparge_kernel_ms 12.6 -> 8.9 (= the kernel on
  // permuted copies), the copy about 0.35 ms, sparge_wall_ms 15.9 -> 12.6-12.8. The same bits, the same results.
  // SPARQ_VULKAN_ORDER_V=0: the gathered reads.
  const std::uint32_t v_quads = Nk > 0 ? std::uint32_t(D / 8) : 0;
  const std::uint64_t v_groups = (std::uint64_t(Nk) * v_quads + 255) / 256;
  bool order_v = gather && Nk > 0 && D % 8 == 0 && v_groups <= limits.maxComputeWorkGroupCount[0];
  if (const char* e = std::getenv("SPARQ_VULKAN_ORDER_V"); e && std::strcmp(e, "0") == 0) order_v = false;
  if (order_v) {
    ensure(v_ord_, k8_bytes * 2);  // [B, Hkv, Nk, D] 16-bit, within maxStorageBufferRange (checked above)
    binds[20] = whole(v_ord_);
  }
  // A fused SpargeAttn stage 1 (AttentionProblem::predict): the quant passes pool q and k as they quantize them
  // (POOL = 1; the quantized outputs do not depend on it), between them run the predictor's raw K pass and K
  // mean, after them its block statistics and selection, which writes the LUT the attention kernel reads.
  const SpargePredictProblem* sp = p.predict;
  SpargeSetup spg;
  if (sp) {
    if (p.mask_layout != MaskLayout::Lut || sp->counts.storage != p.mask_counts.storage ||
        sp->counts.offset_bytes != p.mask_counts.offset_bytes || sp->indices.storage != p.mask_indices.storage ||
        sp->indices.offset_bytes != p.mask_indices.offset_bytes || sp->q.storage != p.q.storage ||
        sp->q.offset_bytes != p.q.offset_bytes || sp->k.storage != p.k.storage ||
        sp->k.offset_bytes != p.k.offset_bytes || sp->token_order.storage != p.token_order.storage ||
        !sparge_fits(*sp))
      fail(Status::Internal, "vulkan: a fused prediction must be one fuses_sparge_predict() accepted, of this "
                             "problem's q and k, into its LUT mask");
    sparge_prepare(*sp, spg);  // ensure()s: before any descriptor set is made
    binds[19] = spg.binds[19];
    set_pool_fields(prm, spg.pool);
  }

  // Grid limits.
  const std::uint32_t q_tiles = (p.tokens_q + kTile - 1) / kTile;
  for (auto [x, name] : {std::pair<std::uint32_t, const char*>{q_tiles, "query tiles"}, {q_spans, "query spans"},
                         {k_spans, "key spans"}})
    if (x > limits.maxComputeWorkGroupCount[0]) not_supported(Backend::Vulkan, std::string("this many ") + name);
  if (std::uint32_t(p.heads_q) > limits.maxComputeWorkGroupCount[1] ||
      std::uint32_t(p.batch) > limits.maxComputeWorkGroupCount[2])
    not_supported(Backend::Vulkan, "this many heads or batches (workgroup count limit)");

  const VkBool32 b_in = in_bf16, b_out = out_bf16, b_fp16 = !int8, b_causal = p.causal, b_gather = gather;
  VkPipeline kmean = smooth ? dev_->pipeline("kmean", {b_in, b_gather}) : VK_NULL_HANDLE;
  // quant: dtype, fp16 Q·Kᵀ, order, then (stage 1) POOL, QUANT, DP and 16-byte row loads for the pooling.
  const std::uint32_t pool = sp ? 1 : 0, DP = sp ? spg.DP : 8;
  const VkBool32 q_vec = sp && rows_aligned(prm.q_off, p.q, D), k_vec = sp && rows_aligned(prm.k_off, p.k, D);
  // FUSE: the quantization takes its group maxima (2: and with one chunk per span its values) from the rows the
  // pooling loaded: INT8, whole chunks per span, 1 or 8 groups per span.
  auto fuse = [&](std::uint32_t span, std::uint32_t inner) -> std::uint32_t {
    if (!sp || !int8 || span % kSpargeChunk != 0 || (inner != 1 && inner != 8)) return 0;
    return span == kSpargeChunk ? 2 : 1;
  };
  VkPipeline quant_q = dev_->pipeline("quant", {b_in, b_fp16, b_gather, pool, 1, DP, q_vec, fuse(q_span, q_inner)});
  VkPipeline quant_k = dev_->pipeline("quant", {b_in, b_fp16, b_gather, pool, 1, DP, k_vec, fuse(k_span, k_inner)});
  VkPipeline pool_raw =
      sp ? dev_->pipeline("quant", {b_in, 0, b_gather, 2, 0, DP, k_vec}) : VK_NULL_HANDLE;
  const VkBool32 b_v_ordered = order_v;
  VkPipeline attn = dev_->pipeline(kernel, {b_in, b_out, b_fp16, b_causal, b_gather, b_v_ordered});
  VkPipeline order_v_pipe = order_v ? dev_->pipeline("order_v", {}) : VK_NULL_HANDLE;

  // Record.
  reserve_descriptor_sets(2);
  VkDescriptorSet set = descriptor_set(binds);
  VkDescriptorSet spg_set = sp ? descriptor_set(spg.binds) : VK_NULL_HANDLE;
  begin();
  vkCmdUpdateBuffer(cmd_, params_.buffer, 0, sizeof(VkParams), &prm);
  if (sp) sparge_record_params(spg);
  if (pv_skip) {
    vkCmdUpdateBuffer(cmd_, pv_thr_.buffer, 0, VkDeviceSize(p.heads_q) * 4, p.pv_threshold.data());
    vkCmdFillBuffer(cmd_, pv_stats_.buffer, 0, 16, 0u);
  }
  barrier_transfer_to_compute();
  const bool timed = profiling_ && queries_;
  if (timed) {
    vkCmdResetQueryPool(cmd_, queries_, 0, 3);
    vkCmdWriteTimestamp(cmd_, VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT, queries_, 0);
  }
  vkCmdBindDescriptorSets(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, dev_->pipeline_layout(), 0, 1, &set, 0, nullptr);
  auto quant_pass = [&](VkPipeline pipeline, std::uint32_t which, std::uint32_t spans) {
    vkCmdBindPipeline(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, pipeline);
    vkCmdPushConstants(cmd_, dev_->pipeline_layout(), VK_SHADER_STAGE_COMPUTE_BIT, 0, 4, &which);
    vkCmdDispatch(cmd_, spans, which ? p.heads_kv : p.heads_q, p.batch);
  };
  auto smoothing_mean = [&] {
    vkCmdBindPipeline(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, kmean);
    vkCmdDispatch(cmd_, (D + 15) / 16, p.heads_kv, p.batch);
  };
  if (sp) {
    // Stage 1's raw K chunks, then the smoothing mean beside the prediction's K mean (which pooling smoothed K
    // needs). The smoothing mean side by side with the raw pass instead: H100, B4 H32 N16K D128, 0.85 ms more.
    quant_pass(pool_raw, 1, spg.pool.nkc);
    barrier_compute_to_compute();
    if (smooth) smoothing_mean();
    sparge_record_kmean(spg, spg_set);
    barrier_compute_to_compute();
    vkCmdBindDescriptorSets(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, dev_->pipeline_layout(), 0, 1, &set, 0, nullptr);
  } else if (smooth) {
    smoothing_mean();
    barrier_compute_to_compute();
  }
  // The Q pass also runs for the pooling alone (fp16 Q·Kᵀ without LSE needs nothing else from it).
  bool q_pass = int8 || (smooth && p.has_lse) || sp;
  bool k_pass = Nk > 0;
  if (q_pass) quant_pass(quant_q, 0, q_spans);
  if (k_pass) quant_pass(quant_k, 1, k_spans);
  if (order_v) {  // V in token order, independent of the quant passes: beside them (H100: the same time beside
                  // sparge_finalize or beside the first pass)
    vkCmdBindPipeline(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, order_v_pipe);
    vkCmdDispatch(cmd_, std::uint32_t(v_groups), p.heads_kv, p.batch);
  }
  if (q_pass || k_pass || order_v) barrier_compute_to_compute();
  if (sp) {  // block statistics and selection: the LUT (= the mask the attention kernel reads)
    sparge_record_select(spg, spg_set);
    barrier_compute_to_compute();
    vkCmdBindDescriptorSets(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, dev_->pipeline_layout(), 0, 1, &set, 0, nullptr);
  }
  if (timed) vkCmdWriteTimestamp(cmd_, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, queries_, 1);
  vkCmdBindPipeline(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, attn);
  vkCmdDispatch(cmd_, q_tiles, p.heads_q, p.batch);
  if (timed) vkCmdWriteTimestamp(cmd_, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, queries_, 2);
  submit();
  if (const char* verbose = std::getenv("SPARQ_VULKAN_VERBOSE"); verbose && *verbose && std::strcmp(verbose, "0")) {
    auto t0 = std::chrono::steady_clock::now();
    wait();
    std::fprintf(stderr, "sparq vulkan: %s B=%d Hq=%d Nq=%d Nk=%d took %.1f ms (host wait)\n", kernel.c_str(), p.batch,
                 p.heads_q, p.tokens_q, Nk,
                 std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }

  if (pv_skip && p.stats) {
    wait();
    ensure(staging_, 16, true);
    copy(pv_stats_.buffer, 0, staging_.buffer, 0, 16);
    std::uint32_t counts[2];
    std::memcpy(counts, staging_.mapped, sizeof(counts));
    p.stats->pv_total += counts[0];
    p.stats->pv_skipped += counts[1];
  }
  if (timed) {
    const std::array<std::uint64_t, 3> ts = timestamps();
    timing_.total_ms = device_ms(ts[0], ts[2]);
    timing_.attention_ms = device_ms(ts[1], ts[2]);
  }
}

// ---------------------------------------------------------------------------------------------------------
// SpargeAttn: token permutation (templates/glsl/sparge_permute.comp.j2)

bool VulkanBackend::permute_tokens(const PermuteProblem& pp) {
  const auto& limits = dev_->properties().limits;
  if (pp.elem_bytes != 2 || std::uint32_t(pp.tokens) > limits.maxComputeWorkGroupCount[0] ||
      std::uint32_t(pp.batch) > limits.maxComputeWorkGroupCount[2] || pp.order->size() > std::size_t(INT32_MAX))
    return false;
  for (const PermuteProblem::Pair& t : pp.pairs)
    if (std::uint32_t(t.heads) > limits.maxComputeWorkGroupCount[1]) return false;
  const int B = pp.batch, N = pp.tokens, D = pp.head_dim;
  if (B == 0 || N == 0 || D == 0 || pp.pairs.empty()) return true;
  const std::size_t n = pp.order->size();
  // The order: the runtime's cached copy, bound in place when it starts at a descriptor boundary (the kernel
  // reads it from element 0); otherwise uploaded through the staging buffer.
  BindRange order_range;
  bool staged = true;
  if (pp.order_device.storage && n > 0) {
    OperandBinding o = bind_operand(*dev_, pp.order_device, 4, int64_t(n) - 1, "order");
    if (o.first == 0) order_range = o.range, staged = false;
  }
  const VkDeviceSize order_bytes = std::max<VkDeviceSize>(4, VkDeviceSize(n) * 4);
  if (staged) {
    // ensure() may drop every descriptor set: before any is made
    ensure(spg_order_, order_bytes);
    ensure(staging_, order_bytes, true);
    order_range = {spg_order_.buffer, 0, spg_order_.size};
  }
  // One set per pair, all made before recording (a full pool is reset only here, never under a set in use).
  reserve_descriptor_sets(pp.pairs.size());
  std::vector<SpgParams> prms(pp.pairs.size());
  std::vector<VkDescriptorSet> sets(pp.pairs.size());
  for (std::size_t i = 0; i < pp.pairs.size(); ++i) {
    const PermuteProblem::Pair& t = pp.pairs[i];
    SpgParams& prm = prms[i];
    prm = SpgParams{};
    prm.D = D;
    BindSet binds;
    binds.fill(BindRange{dummy_.buffer, 0, dummy_.size});
    binds[0] = {spg_params_.buffer, 0, sizeof(SpgParams)};
    OperandBinding src = bind_operand(*dev_, t.src, 2, last_index(t.src, B, t.heads, N, D), "src");
    OperandBinding dst = bind_operand(*dev_, t.dst, 2, last_index(t.dst, B, t.heads, N, D), "dst");
    binds[1] = src.range, binds[12] = dst.range, binds[13] = order_range;
    prm.p_off = src.first, prm.p_sb = u32(t.src.stride_batch, "stride"), prm.p_sh = u32(t.src.stride_head, "stride");
    prm.p_st = u32(t.src.stride_token, "stride");
    prm.d_off = dst.first, prm.d_sb = u32(t.dst.stride_batch, "stride"), prm.d_sh = u32(t.dst.stride_head, "stride");
    prm.d_st = u32(t.dst.stride_token, "stride");
    prm.p_heads = t.heads, prm.p_tokens = N, prm.p_order = static_cast<std::uint32_t>(n);
    sets[i] = descriptor_set(binds);
  }
  VkPipeline permute = dev_->pipeline("sparge_permute", {});
  begin();  // waits for earlier work, so the staging buffer is free
  if (staged) {
    auto* out = static_cast<std::int32_t*>(staging_.mapped);
    for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<std::int32_t>((*pp.order)[i]);
    VkBufferCopy region{0, 0, order_bytes};
    vkCmdCopyBuffer(cmd_, staging_.buffer, spg_order_.buffer, 1, &region);
  }
  vkCmdBindPipeline(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, permute);
  // All pairs in one submission. The parameter block is one buffer: before it is rewritten for the next pair,
  // the previous dispatch must have read it (and, in general, written its rows).
  for (std::size_t i = 0; i < pp.pairs.size(); ++i) {
    if (i > 0) {
      VkMemoryBarrier mb{VK_STRUCTURE_TYPE_MEMORY_BARRIER};
      mb.srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT;
      mb.dstAccessMask = VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_WRITE_BIT;
      vkCmdPipelineBarrier(cmd_, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT,
                           VK_PIPELINE_STAGE_TRANSFER_BIT | VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, 0, 1, &mb, 0, nullptr,
                           0, nullptr);
    }
    vkCmdUpdateBuffer(cmd_, spg_params_.buffer, 0, sizeof(SpgParams), &prms[i]);
    barrier_transfer_to_compute();
    vkCmdBindDescriptorSets(cmd_, VK_PIPELINE_BIND_POINT_COMPUTE, dev_->pipeline_layout(), 0, 1, &sets[i], 0, nullptr);
    vkCmdDispatch(cmd_, N, pp.pairs[i].heads, B);
  }
  submit();
  return true;
}

std::shared_ptr<BackendImpl> make_vulkan_backend(int device) {
  return std::make_shared<VulkanBackend>(Device::get(device));
}

}  // namespace sparq::detail
