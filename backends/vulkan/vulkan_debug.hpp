// Diagnostics of the Vulkan backend that tests (and users chasing driver problems) can read.
#pragma once
#include <cstdint>
#include <string>

namespace sparq::vulkan {

#ifdef SPARQ_HAVE_VULKAN
// Number of messages of severity warning or error the Khronos validation layer (or the loader) reported
// through the debug-utils messenger since the process started. Validation is enabled when the environment
// variable SPARQ_VULKAN_VALIDATION=1 is set before the first Vulkan context is created.
std::uint64_t validation_message_count();

// True when the first Vulkan device was created with VK_LAYER_KHRONOS_validation and a messenger.
bool validation_enabled();

// A one-line description of the features the backend detected on the device of the last created
// Vulkan context (shaderInt8, 8/16-bit storage, float16, integer dot product, subgroup size, ...).
std::string device_features();
#else
// Built without Vulkan: nothing was created, so nothing was reported.
inline std::uint64_t validation_message_count() { return 0; }
inline bool validation_enabled() { return false; }
inline std::string device_features() { return "sparq was built without the Vulkan backend"; }
#endif

}  // namespace sparq::vulkan
