// Run-time loading of the Vulkan loader: see vulkan_loader.hpp.
#include "vulkan_loader.hpp"

#include <dlfcn.h>

#include <mutex>

namespace sparq::vulkan {

PFN_vkGetInstanceProcAddr vkGetInstanceProcAddr = nullptr;
#define SPARQ_VK_DEFINE(name) PFN_##name name = nullptr;
SPARQ_VK_GLOBAL_FUNCTIONS(SPARQ_VK_DEFINE)
SPARQ_VK_INSTANCE_FUNCTIONS(SPARQ_VK_DEFINE)
#undef SPARQ_VK_DEFINE

bool load_loader(std::string& why) {
  static std::once_flag once;
  static bool ok = false;
  static std::string error;
  std::call_once(once, [] {
    void* lib = nullptr;
    for (const char* name : {"libvulkan.so.1", "libvulkan.so"}) {
      lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (lib) break;
    }
    if (!lib) {
      const char* e = dlerror();
      error = std::string("the Vulkan loader libvulkan.so.1 is not installed (") + (e ? e : "dlopen failed") +
              "; Debian/Ubuntu: libvulkan1)";
      return;
    }
    vkGetInstanceProcAddr = reinterpret_cast<PFN_vkGetInstanceProcAddr>(dlsym(lib, "vkGetInstanceProcAddr"));
    if (!vkGetInstanceProcAddr) {
      error = "libvulkan.so.1 has no vkGetInstanceProcAddr";
      return;
    }
#define SPARQ_VK_LOAD_GLOBAL(name) \
  name = reinterpret_cast<PFN_##name>(vkGetInstanceProcAddr(VK_NULL_HANDLE, #name));
    SPARQ_VK_GLOBAL_FUNCTIONS(SPARQ_VK_LOAD_GLOBAL)
#undef SPARQ_VK_LOAD_GLOBAL
    // vkEnumerateInstanceVersion is missing from Vulkan 1.0 loaders; the caller treats that as 1.0.
    if (!vkCreateInstance || !vkEnumerateInstanceExtensionProperties || !vkEnumerateInstanceLayerProperties) {
      error = "the Vulkan loader lacks the global functions";
      return;
    }
    ok = true;
  });
  if (!ok) why = error;
  return ok;
}

bool load_instance_functions(VkInstance instance, std::string& why) {
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  std::string missing;
#define SPARQ_VK_LOAD_INSTANCE(name)                                                  \
  name = reinterpret_cast<PFN_##name>(vkGetInstanceProcAddr(instance, #name)); \
  if (!name) missing += std::string(missing.empty() ? "" : ", ") + #name;
  SPARQ_VK_INSTANCE_FUNCTIONS(SPARQ_VK_LOAD_INSTANCE)
#undef SPARQ_VK_LOAD_INSTANCE
  if (!missing.empty()) {
    why = "the Vulkan loader does not provide " + missing;
    return false;
  }
  return true;
}

}  // namespace sparq::vulkan
