// The Vulkan device layer: instance, physical device choice, logical device and compute queue, buffers,
// the shared descriptor-set/pipeline layouts and the pipeline cache. One Device per physical device is
// shared by every Vulkan context of the process (pipelines are compiled once).
#pragma once

#include "vulkan_loader.hpp"

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace sparq::vulkan {

// Throws sparq::Error(DeviceError, or OutOfMemory for the out-of-memory results) naming the call and the
// VkResult when `result` is not VK_SUCCESS.
void check(VkResult result, const char* what);
const char* result_name(VkResult result);

struct Features {
  bool shader_int8 = false, shader_int16 = false, shader_float16 = false;
  bool storage_8bit = false, storage_16bit = false;
  bool integer_dot_product = false;          // shaderIntegerDotProduct enabled
  bool integer_dot_product_accelerated = false;  // 4x8-bit packed signed dot product is fast
  std::uint32_t subgroup_size = 0;
  // The cooperative-matrix (tensor core) kernels: VK_NV_cooperative_matrix with a subgroup-scope int8
  // 16x16x32 -> int32 shape and an fp16 16x16x16 -> fp32 shape (queried, never assumed), compute-stage
  // subgroups of 32 with vote and shuffle, shaderInt8, shaderFloat16 and vulkanMemoryModel (+DeviceScope). All enabled.
  bool cooperative_matrix = false;
  std::string cooperative_matrix_shapes;  // every shape the driver lists, for the feature report
  std::string describe() const;
};

struct Buffer {
  VkBuffer buffer = VK_NULL_HANDLE;
  VkDeviceMemory memory = VK_NULL_HANDLE;
  VkDeviceSize size = 0;
  void* mapped = nullptr;  // host-visible buffers only
};

// Number of storage-buffer bindings after the uniform parameter block (binding 0) in every kernel.
constexpr std::uint32_t kStorageBindings = 20;

class Device {
 public:
  // index < 0: SPARQ_VULKAN_DEVICE (index or name substring), else the first discrete GPU, else any.
  static std::shared_ptr<Device> get(int index);
  ~Device();
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  VkInstance instance() const { return instance_; }
  VkDevice device() const { return device_; }
  VkPhysicalDevice physical() const { return physical_; }
  VkQueue queue() const { return queue_; }
  std::uint32_t queue_family() const { return queue_family_; }
  const VkPhysicalDeviceProperties& properties() const { return props_; }
  const Features& features() const { return features_; }
  std::uint32_t timestamp_valid_bits() const { return timestamp_bits_; }
  std::string name() const { return props_.deviceName; }
  std::mutex& queue_mutex() { return queue_mutex_; }

  Buffer create_buffer(VkDeviceSize bytes, VkBufferUsageFlags usage, bool host_visible);
  void destroy_buffer(Buffer& buffer);

  VkDescriptorSetLayout set_layout() const { return set_layout_; }
  VkPipelineLayout pipeline_layout() const { return pipeline_layout_; }
  // The compute pipeline of a registry kernel with the given specialization constants (VkBool32/uint32
  // values for constant_id 0, 1, ...). Created on first use, then cached.
  VkPipeline pipeline(const std::string& kernel, const std::vector<std::uint32_t>& spec);
  static bool has_kernel(const std::string& kernel);

 private:
  Device() = default;
  void init(int index);
  void print_pipeline_statistics(VkPipeline p);
  void query_cooperative_matrix(const VkPhysicalDeviceSubgroupProperties& sg, const VkPhysicalDeviceVulkan12Features& f12);
  std::uint32_t memory_type(std::uint32_t bits, VkMemoryPropertyFlags want, VkMemoryPropertyFlags avoid) const;

  VkInstance instance_ = VK_NULL_HANDLE;
  VkDebugUtilsMessengerEXT messenger_ = VK_NULL_HANDLE;
  VkPhysicalDevice physical_ = VK_NULL_HANDLE;
  VkDevice device_ = VK_NULL_HANDLE;
  VkQueue queue_ = VK_NULL_HANDLE;
  std::uint32_t queue_family_ = 0;
  std::uint32_t timestamp_bits_ = 0;
  VkPhysicalDeviceProperties props_{};
  VkPhysicalDeviceMemoryProperties mem_props_{};
  Features features_;
  std::mutex queue_mutex_;

  VkDescriptorSetLayout set_layout_ = VK_NULL_HANDLE;
  VkPipelineLayout pipeline_layout_ = VK_NULL_HANDLE;
  VkPipelineCache pipeline_cache_ = VK_NULL_HANDLE;
  std::mutex pipeline_mutex_;
  bool pipeline_statistics_ = false;  // VK_KHR_pipeline_executable_properties on (SPARQ_VULKAN_VERBOSE)
  std::map<std::string, VkShaderModule> modules_;
  std::map<std::pair<std::string, std::vector<std::uint32_t>>, VkPipeline> pipelines_;
};

}  // namespace sparq::vulkan
