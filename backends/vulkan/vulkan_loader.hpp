// The Vulkan loader is opened at run time (dlopen of libvulkan.so.1), so that libsparq loads and its other
// backends work on machines without Vulkan; there the Vulkan backend reports BackendUnavailable.
// Every Vulkan function the backend calls is a pointer in namespace sparq::vulkan with the API's name.
#pragma once

#ifndef VK_NO_PROTOTYPES
#define VK_NO_PROTOTYPES
#endif
#include <vulkan/vulkan.h>

#include <string>

namespace sparq::vulkan {

// Functions callable before an instance exists.
#define SPARQ_VK_GLOBAL_FUNCTIONS(X)        \
  X(vkEnumerateInstanceVersion)             \
  X(vkEnumerateInstanceExtensionProperties) \
  X(vkEnumerateInstanceLayerProperties)     \
  X(vkCreateInstance)

// Functions loaded through vkGetInstanceProcAddr once the instance exists.
#define SPARQ_VK_INSTANCE_FUNCTIONS(X)        \
  X(vkDestroyInstance)                        \
  X(vkEnumeratePhysicalDevices)               \
  X(vkGetPhysicalDeviceProperties)            \
  X(vkGetPhysicalDeviceProperties2)           \
  X(vkGetPhysicalDeviceFeatures2)             \
  X(vkGetPhysicalDeviceMemoryProperties)      \
  X(vkGetPhysicalDeviceQueueFamilyProperties) \
  X(vkEnumerateDeviceExtensionProperties)     \
  X(vkCreateDevice)                           \
  X(vkDestroyDevice)                          \
  X(vkGetDeviceQueue)                         \
  X(vkDeviceWaitIdle)                         \
  X(vkAllocateCommandBuffers)                 \
  X(vkAllocateDescriptorSets)                 \
  X(vkAllocateMemory)                         \
  X(vkFreeMemory)                             \
  X(vkMapMemory)                              \
  X(vkBindBufferMemory)                       \
  X(vkGetBufferMemoryRequirements)            \
  X(vkCreateBuffer)                           \
  X(vkDestroyBuffer)                          \
  X(vkBeginCommandBuffer)                     \
  X(vkEndCommandBuffer)                       \
  X(vkResetCommandBuffer)                     \
  X(vkCmdBindDescriptorSets)                  \
  X(vkCmdBindPipeline)                        \
  X(vkCmdCopyBuffer)                          \
  X(vkCmdDispatch)                            \
  X(vkCmdFillBuffer)                          \
  X(vkCmdPipelineBarrier)                     \
  X(vkCmdPushConstants)                       \
  X(vkCmdResetQueryPool)                      \
  X(vkCmdUpdateBuffer)                        \
  X(vkCmdWriteTimestamp)                      \
  X(vkCreateCommandPool)                      \
  X(vkDestroyCommandPool)                     \
  X(vkCreateComputePipelines)                 \
  X(vkDestroyPipeline)                        \
  X(vkCreateDescriptorPool)                   \
  X(vkDestroyDescriptorPool)                  \
  X(vkResetDescriptorPool)                    \
  X(vkCreateDescriptorSetLayout)              \
  X(vkDestroyDescriptorSetLayout)             \
  X(vkUpdateDescriptorSets)                   \
  X(vkCreateFence)                            \
  X(vkDestroyFence)                           \
  X(vkResetFences)                            \
  X(vkWaitForFences)                          \
  X(vkCreatePipelineCache)                    \
  X(vkDestroyPipelineCache)                   \
  X(vkCreatePipelineLayout)                   \
  X(vkDestroyPipelineLayout)                  \
  X(vkCreateQueryPool)                        \
  X(vkDestroyQueryPool)                       \
  X(vkGetQueryPoolResults)                    \
  X(vkCreateShaderModule)                     \
  X(vkDestroyShaderModule)                    \
  X(vkQueueSubmit)

#define SPARQ_VK_DECLARE(name) extern PFN_##name name;
extern PFN_vkGetInstanceProcAddr vkGetInstanceProcAddr;
SPARQ_VK_GLOBAL_FUNCTIONS(SPARQ_VK_DECLARE)
SPARQ_VK_INSTANCE_FUNCTIONS(SPARQ_VK_DECLARE)
#undef SPARQ_VK_DECLARE

// Opens the loader and resolves the global functions (once; thread-safe). False with `why` when there is no
// usable Vulkan loader.
bool load_loader(std::string& why);
// Resolves the instance-level functions (and, through the loader's trampolines, the device ones).
bool load_instance_functions(VkInstance instance, std::string& why);

}  // namespace sparq::vulkan
