// Vulkan device layer: see vulkan_device.hpp.
#include "vulkan_device.hpp"

#include "backend.hpp"
#include "vulkan_debug.hpp"
#include "vulkan_registry.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>

// Vulkan create-info structs are brace-initialised with their sType only; the rest is zero on purpose.
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#endif

namespace sparq::vulkan {

using detail::fail;

namespace {

std::atomic<std::uint64_t> g_validation_messages{0};
std::atomic<bool> g_validation_enabled{false};
std::mutex g_features_mutex;
std::string g_features;

VKAPI_ATTR VkBool32 VKAPI_CALL debug_callback(VkDebugUtilsMessageSeverityFlagBitsEXT severity,
                                              VkDebugUtilsMessageTypeFlagsEXT,
                                              const VkDebugUtilsMessengerCallbackDataEXT* data, void*) {
  if (severity & (VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT)) {
    g_validation_messages.fetch_add(1);
    std::fprintf(stderr, "sparq vulkan validation %s: %s\n",
                 (severity & VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT) ? "error" : "warning",
                 data && data->pMessage ? data->pMessage : "(no message)");
  }
  return VK_FALSE;
}

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v && *v && std::strcmp(v, "0") != 0;
}

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

}  // namespace

std::uint64_t validation_message_count() { return g_validation_messages.load(); }
bool validation_enabled() { return g_validation_enabled.load(); }
std::string device_features() {
  std::lock_guard<std::mutex> lock(g_features_mutex);
  return g_features;
}

const char* result_name(VkResult r) {
  switch (r) {
#define SPARQ_VK_CASE(x) \
  case x: return #x;
    SPARQ_VK_CASE(VK_SUCCESS)
    SPARQ_VK_CASE(VK_NOT_READY)
    SPARQ_VK_CASE(VK_TIMEOUT)
    SPARQ_VK_CASE(VK_EVENT_SET)
    SPARQ_VK_CASE(VK_EVENT_RESET)
    SPARQ_VK_CASE(VK_INCOMPLETE)
    SPARQ_VK_CASE(VK_ERROR_OUT_OF_HOST_MEMORY)
    SPARQ_VK_CASE(VK_ERROR_OUT_OF_DEVICE_MEMORY)
    SPARQ_VK_CASE(VK_ERROR_INITIALIZATION_FAILED)
    SPARQ_VK_CASE(VK_ERROR_DEVICE_LOST)
    SPARQ_VK_CASE(VK_ERROR_MEMORY_MAP_FAILED)
    SPARQ_VK_CASE(VK_ERROR_LAYER_NOT_PRESENT)
    SPARQ_VK_CASE(VK_ERROR_EXTENSION_NOT_PRESENT)
    SPARQ_VK_CASE(VK_ERROR_FEATURE_NOT_PRESENT)
    SPARQ_VK_CASE(VK_ERROR_INCOMPATIBLE_DRIVER)
    SPARQ_VK_CASE(VK_ERROR_TOO_MANY_OBJECTS)
    SPARQ_VK_CASE(VK_ERROR_FORMAT_NOT_SUPPORTED)
    SPARQ_VK_CASE(VK_ERROR_FRAGMENTED_POOL)
    SPARQ_VK_CASE(VK_ERROR_UNKNOWN)
    SPARQ_VK_CASE(VK_ERROR_OUT_OF_POOL_MEMORY)
    SPARQ_VK_CASE(VK_ERROR_INVALID_EXTERNAL_HANDLE)
    SPARQ_VK_CASE(VK_ERROR_FRAGMENTATION)
    SPARQ_VK_CASE(VK_ERROR_INVALID_OPAQUE_CAPTURE_ADDRESS)
    SPARQ_VK_CASE(VK_PIPELINE_COMPILE_REQUIRED)
#undef SPARQ_VK_CASE
    default: return "VK_ERROR_(unnamed)";
  }
}

void check(VkResult result, const char* what) {
  if (result == VK_SUCCESS) return;
  Status status = (result == VK_ERROR_OUT_OF_DEVICE_MEMORY || result == VK_ERROR_OUT_OF_HOST_MEMORY)
                      ? Status::OutOfMemory
                      : Status::DeviceError;
  fail(status, std::string("vulkan: ") + what + " failed: " + result_name(result) + " (" +
                   std::to_string(static_cast<int>(result)) + ")");
}

std::string Features::describe() const {
  std::string s;
  auto flag = [&](const char* name, bool v) { s += std::string(s.empty() ? "" : " ") + name + "=" + (v ? "1" : "0"); };
  flag("shaderInt8", shader_int8);
  flag("shaderInt16", shader_int16);
  flag("shaderFloat16", shader_float16);
  flag("storageBuffer8BitAccess", storage_8bit);
  flag("storageBuffer16BitAccess", storage_16bit);
  flag("shaderIntegerDotProduct", integer_dot_product);
  flag("int8x4DotAccelerated", integer_dot_product_accelerated);
  s += " subgroupSize=" + std::to_string(subgroup_size);
  flag("cooperativeMatrixNV", cooperative_matrix);
  if (!cooperative_matrix_shapes.empty()) s += " (" + cooperative_matrix_shapes + ")";
  return s;
}

// ---------------------------------------------------------------------------------------------------------
// Device selection and creation

std::shared_ptr<Device> Device::get(int index) {
  // Devices live for the whole process (never destroyed: pipelines are compiled once, and nothing runs at
  // static-destruction time).
  static std::mutex mutex;
  static auto* cache = new std::map<std::pair<int, std::string>, std::shared_ptr<Device>>();
  std::lock_guard<std::mutex> lock(mutex);
  const char* env = std::getenv("SPARQ_VULKAN_DEVICE");
  auto key = std::make_pair(index, index < 0 && env ? std::string(env) : std::string());
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  std::shared_ptr<Device> d(new Device());
  try {
    d->init(index);
  } catch (const Error& e) {
    // Whatever stops the device from coming up makes the backend unavailable (so that Backend::Auto
    // moves on to the next backend); the message keeps the driver's reason.
    if (e.status() == Status::BackendUnavailable) throw;
    fail(Status::BackendUnavailable, e.what());
  }
  {
    std::lock_guard<std::mutex> flock(g_features_mutex);
    g_features = d->name() + ": " + d->features().describe();
  }
  (*cache)[key] = d;
  return d;
}

Device::~Device() {
  if (device_) {
    vkDeviceWaitIdle(device_);
    for (auto& [key, p] : pipelines_) vkDestroyPipeline(device_, p, nullptr);
    for (auto& [key, m] : modules_) vkDestroyShaderModule(device_, m, nullptr);
    if (pipeline_cache_) vkDestroyPipelineCache(device_, pipeline_cache_, nullptr);
    if (pipeline_layout_) vkDestroyPipelineLayout(device_, pipeline_layout_, nullptr);
    if (set_layout_) vkDestroyDescriptorSetLayout(device_, set_layout_, nullptr);
    vkDestroyDevice(device_, nullptr);
  }
  if (messenger_) {
    auto destroy = reinterpret_cast<PFN_vkDestroyDebugUtilsMessengerEXT>(
        vkGetInstanceProcAddr(instance_, "vkDestroyDebugUtilsMessengerEXT"));
    if (destroy) destroy(instance_, messenger_, nullptr);
  }
  if (instance_) vkDestroyInstance(instance_, nullptr);
}

void Device::init(int index) {
  // --- instance
  std::string why;
  if (!load_loader(why)) fail(Status::BackendUnavailable, "vulkan: " + why);
  std::uint32_t loader_version = VK_API_VERSION_1_0;
  if (!vkEnumerateInstanceVersion || vkEnumerateInstanceVersion(&loader_version) != VK_SUCCESS)
    loader_version = VK_API_VERSION_1_0;
  if (loader_version < VK_API_VERSION_1_2)
    fail(Status::BackendUnavailable, "vulkan: the Vulkan loader supports only version " +
                                         std::to_string(VK_API_VERSION_MAJOR(loader_version)) + "." +
                                         std::to_string(VK_API_VERSION_MINOR(loader_version)) + "; sparq needs 1.2");
  const std::uint32_t api = loader_version >= VK_API_VERSION_1_3 ? VK_API_VERSION_1_3 : VK_API_VERSION_1_2;

  std::vector<const char*> layers, extensions;
  bool want_validation = env_flag("SPARQ_VULKAN_VALIDATION");
  bool have_debug_utils = false;
  {
    std::uint32_t n = 0;
    vkEnumerateInstanceExtensionProperties(nullptr, &n, nullptr);
    std::vector<VkExtensionProperties> ext(n);
    vkEnumerateInstanceExtensionProperties(nullptr, &n, ext.data());
    for (auto& e : ext)
      if (std::strcmp(e.extensionName, VK_EXT_DEBUG_UTILS_EXTENSION_NAME) == 0) have_debug_utils = true;
  }
  if (want_validation) {
    std::uint32_t n = 0;
    vkEnumerateInstanceLayerProperties(&n, nullptr);
    std::vector<VkLayerProperties> props(n);
    vkEnumerateInstanceLayerProperties(&n, props.data());
    bool found = false;
    for (auto& p : props)
      if (std::strcmp(p.layerName, "VK_LAYER_KHRONOS_validation") == 0) found = true;
    if (found) {
      layers.push_back("VK_LAYER_KHRONOS_validation");
      // The layer provides VK_EXT_debug_utils itself.
      have_debug_utils = true;
    } else {
      std::fprintf(stderr,
                   "sparq vulkan: SPARQ_VULKAN_VALIDATION is set but VK_LAYER_KHRONOS_validation is not installed "
                   "(Debian: vulkan-validationlayers); running without validation\n");
    }
  }
  bool use_messenger = !layers.empty() && have_debug_utils;
  if (use_messenger) extensions.push_back(VK_EXT_DEBUG_UTILS_EXTENSION_NAME);

  VkApplicationInfo app{VK_STRUCTURE_TYPE_APPLICATION_INFO};
  app.pApplicationName = "sparq";
  app.pEngineName = "sparq";
  app.apiVersion = api;
  VkDebugUtilsMessengerCreateInfoEXT messenger_info{VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT};
  messenger_info.messageSeverity =
      VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT;
  messenger_info.messageType = VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT |
                               VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT |
                               VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT;
  messenger_info.pfnUserCallback = debug_callback;
  VkInstanceCreateInfo ici{VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO};
  ici.pNext = use_messenger ? &messenger_info : nullptr;
  ici.pApplicationInfo = &app;
  ici.enabledLayerCount = static_cast<std::uint32_t>(layers.size());
  ici.ppEnabledLayerNames = layers.data();
  ici.enabledExtensionCount = static_cast<std::uint32_t>(extensions.size());
  ici.ppEnabledExtensionNames = extensions.data();
  VkResult r = vkCreateInstance(&ici, nullptr, &instance_);
  if (r != VK_SUCCESS)
    fail(Status::BackendUnavailable, std::string("vulkan: vkCreateInstance failed: ") + result_name(r) +
                                         " (no Vulkan driver installed?)");
  if (!load_instance_functions(instance_, why)) fail(Status::BackendUnavailable, "vulkan: " + why);
  if (use_messenger) {
    auto create = reinterpret_cast<PFN_vkCreateDebugUtilsMessengerEXT>(
        vkGetInstanceProcAddr(instance_, "vkCreateDebugUtilsMessengerEXT"));
    if (create) {
      check(create(instance_, &messenger_info, nullptr, &messenger_), "vkCreateDebugUtilsMessengerEXT");
      g_validation_enabled = true;
    }
  }

  // --- physical device
  std::uint32_t count = 0;
  r = vkEnumeratePhysicalDevices(instance_, &count, nullptr);
  if (r != VK_SUCCESS || count == 0)
    fail(Status::BackendUnavailable, std::string("vulkan: no Vulkan device found") +
                                         (r != VK_SUCCESS ? std::string(" (") + result_name(r) + ")" : ""));
  std::vector<VkPhysicalDevice> all(count);
  check(vkEnumeratePhysicalDevices(instance_, &count, all.data()), "vkEnumeratePhysicalDevices");
  std::vector<VkPhysicalDeviceProperties> props(count);
  std::string listing;
  for (std::uint32_t i = 0; i < count; ++i) {
    vkGetPhysicalDeviceProperties(all[i], &props[i]);
    listing += (i ? ", " : "") + std::to_string(i) + ": " + props[i].deviceName;
  }
  int chosen = -1;
  const char* env = std::getenv("SPARQ_VULKAN_DEVICE");
  if (index >= 0) {
    if (index >= static_cast<int>(count))
      fail(Status::BackendUnavailable, "vulkan: device " + std::to_string(index) + " does not exist; devices: " + listing);
    chosen = index;
  } else if (env && *env) {
    std::string want = env;
    bool numeric = std::all_of(want.begin(), want.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); });
    if (numeric) {
      chosen = std::atoi(want.c_str());
      if (chosen >= static_cast<int>(count))
        fail(Status::BackendUnavailable, "vulkan: SPARQ_VULKAN_DEVICE=" + want + " but there are only " +
                                             std::to_string(count) + " devices: " + listing);
    } else {
      for (std::uint32_t i = 0; i < count && chosen < 0; ++i)
        if (lower(props[i].deviceName).find(lower(want)) != std::string::npos) chosen = static_cast<int>(i);
      if (chosen < 0)
        fail(Status::BackendUnavailable, "vulkan: SPARQ_VULKAN_DEVICE=" + want + " matches no device; devices: " + listing);
    }
  } else {
    for (VkPhysicalDeviceType type : {VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU, VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU,
                                      VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU, VK_PHYSICAL_DEVICE_TYPE_CPU,
                                      VK_PHYSICAL_DEVICE_TYPE_OTHER})
      for (std::uint32_t i = 0; i < count && chosen < 0; ++i)
        if (props[i].deviceType == type && props[i].apiVersion >= VK_API_VERSION_1_2) chosen = static_cast<int>(i);
    if (chosen < 0) chosen = 0;
  }
  physical_ = all[chosen];
  props_ = props[chosen];
  if (props_.apiVersion < VK_API_VERSION_1_2)
    fail(Status::BackendUnavailable, std::string("vulkan: device ") + props_.deviceName + " supports Vulkan " +
                                         std::to_string(VK_API_VERSION_MAJOR(props_.apiVersion)) + "." +
                                         std::to_string(VK_API_VERSION_MINOR(props_.apiVersion)) + "; sparq needs 1.2");
  vkGetPhysicalDeviceMemoryProperties(physical_, &mem_props_);

  // --- queue
  std::uint32_t nq = 0;
  vkGetPhysicalDeviceQueueFamilyProperties(physical_, &nq, nullptr);
  std::vector<VkQueueFamilyProperties> qf(nq);
  vkGetPhysicalDeviceQueueFamilyProperties(physical_, &nq, qf.data());
  int family = -1;
  for (std::uint32_t i = 0; i < nq && family < 0; ++i)  // prefer a compute-only family, then any compute one
    if ((qf[i].queueFlags & VK_QUEUE_COMPUTE_BIT) && !(qf[i].queueFlags & VK_QUEUE_GRAPHICS_BIT) && qf[i].timestampValidBits)
      family = static_cast<int>(i);
  for (std::uint32_t i = 0; i < nq && family < 0; ++i)
    if (qf[i].queueFlags & VK_QUEUE_COMPUTE_BIT) family = static_cast<int>(i);
  if (family < 0) fail(Status::BackendUnavailable, std::string("vulkan: device ") + props_.deviceName + " has no compute queue");
  queue_family_ = static_cast<std::uint32_t>(family);
  timestamp_bits_ = props_.limits.timestampComputeAndGraphics || qf[family].timestampValidBits ? qf[family].timestampValidBits : 0;

  // --- features
  std::uint32_t next = 0;
  vkEnumerateDeviceExtensionProperties(physical_, nullptr, &next, nullptr);
  std::vector<VkExtensionProperties> dev_ext(next);
  vkEnumerateDeviceExtensionProperties(physical_, nullptr, &next, dev_ext.data());
  auto has_ext = [&](const char* name) {
    for (auto& e : dev_ext)
      if (std::strcmp(e.extensionName, name) == 0) return true;
    return false;
  };
  VkPhysicalDeviceShaderIntegerDotProductFeatures idot_f{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_INTEGER_DOT_PRODUCT_FEATURES};
  VkPhysicalDeviceVulkan12Features f12{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES};
  VkPhysicalDeviceVulkan11Features f11{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES};
  VkPhysicalDeviceFeatures2 f2{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2};
  bool idot_ext = has_ext(VK_KHR_SHADER_INTEGER_DOT_PRODUCT_EXTENSION_NAME);
  bool idot_core = api >= VK_API_VERSION_1_3 && props_.apiVersion >= VK_API_VERSION_1_3;
  f2.pNext = &f11;
  f11.pNext = &f12;
  if (idot_ext || idot_core) f12.pNext = &idot_f;
  const bool coop_ext = has_ext(VK_NV_COOPERATIVE_MATRIX_EXTENSION_NAME);
  VkPhysicalDeviceCooperativeMatrixFeaturesNV coop_f{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_NV};
  if (coop_ext) {
    coop_f.pNext = f2.pNext;
    f2.pNext = &coop_f;
  }
  vkGetPhysicalDeviceFeatures2(physical_, &f2);
  features_.shader_int8 = f12.shaderInt8;
  features_.shader_float16 = f12.shaderFloat16;
  features_.storage_8bit = f12.storageBuffer8BitAccess;
  features_.shader_int16 = f2.features.shaderInt16;
  features_.storage_16bit = f11.storageBuffer16BitAccess;
  features_.integer_dot_product = (idot_ext || idot_core) && idot_f.shaderIntegerDotProduct;
  {
    VkPhysicalDeviceShaderIntegerDotProductProperties idot_p{
        VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_INTEGER_DOT_PRODUCT_PROPERTIES};
    VkPhysicalDeviceSubgroupProperties sg{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES};
    VkPhysicalDeviceCooperativeMatrixPropertiesNV coop_p{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_PROPERTIES_NV};
    VkPhysicalDeviceProperties2 p2{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2};
    p2.pNext = &sg;
    if (features_.integer_dot_product) sg.pNext = &idot_p;
    if (coop_ext) {
      coop_p.pNext = p2.pNext;
      p2.pNext = &coop_p;
    }
    vkGetPhysicalDeviceProperties2(physical_, &p2);
    features_.subgroup_size = sg.subgroupSize;
    if (coop_ext && coop_f.cooperativeMatrix && (coop_p.cooperativeMatrixSupportedStages & VK_SHADER_STAGE_COMPUTE_BIT))
      query_cooperative_matrix(sg, f12);
    features_.integer_dot_product_accelerated = features_.integer_dot_product &&
                                                idot_p.integerDotProduct4x8BitPackedSignedAccelerated;
  }
  if (props_.limits.maxComputeSharedMemorySize < 28 * 1024)
    fail(Status::BackendUnavailable, std::string("vulkan: device ") + props_.deviceName + " has " +
                                         std::to_string(props_.limits.maxComputeSharedMemorySize) +
                                         " bytes of shared memory per workgroup; the sparq kernels need 28 KiB");
  if (!features_.storage_16bit)
    fail(Status::BackendUnavailable, std::string("vulkan: device ") + props_.deviceName +
                                         " lacks storageBuffer16BitAccess, which the sparq kernels need");
  // Every pipeline shares one set layout of kStorageBindings storage buffers.
  if (props_.limits.maxPerStageDescriptorStorageBuffers < kStorageBindings)
    fail(Status::BackendUnavailable, std::string("vulkan: device ") + props_.deviceName + " allows " +
                                         std::to_string(props_.limits.maxPerStageDescriptorStorageBuffers) +
                                         " storage buffers per shader stage; the sparq kernels bind " +
                                         std::to_string(kStorageBindings));

  // --- logical device: enable only what the kernels use
  VkPhysicalDeviceShaderIntegerDotProductFeatures idot_on{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_INTEGER_DOT_PRODUCT_FEATURES};
  idot_on.shaderIntegerDotProduct = VK_TRUE;
  VkPhysicalDeviceVulkan11Features f11_on{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES};
  f11_on.storageBuffer16BitAccess = VK_TRUE;
  if (features_.integer_dot_product) f11_on.pNext = &idot_on;
  std::vector<const char*> dev_extensions;
  if (features_.integer_dot_product && !idot_core) dev_extensions.push_back(VK_KHR_SHADER_INTEGER_DOT_PRODUCT_EXTENSION_NAME);
  // The cooperative-matrix kernels declare Int8, Float16 and the Vulkan memory model.
  VkPhysicalDeviceCooperativeMatrixFeaturesNV coop_on{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_NV};
  VkPhysicalDeviceVulkan12Features f12_on{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES};
  // SPARQ_VULKAN_VERBOSE: the driver's statistics of every pipeline (registers, shared memory, spills).
  VkPhysicalDevicePipelineExecutablePropertiesFeaturesKHR exec_on{
      VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PIPELINE_EXECUTABLE_PROPERTIES_FEATURES_KHR};
  if (env_flag("SPARQ_VULKAN_VERBOSE") && has_ext(VK_KHR_PIPELINE_EXECUTABLE_PROPERTIES_EXTENSION_NAME)) {
    exec_on.pipelineExecutableInfo = VK_TRUE;
    exec_on.pNext = f11_on.pNext;
    f11_on.pNext = &exec_on;
    dev_extensions.push_back(VK_KHR_PIPELINE_EXECUTABLE_PROPERTIES_EXTENSION_NAME);
    pipeline_statistics_ = true;
  }
  if (features_.cooperative_matrix) {
    coop_on.cooperativeMatrix = VK_TRUE;
    f12_on.shaderInt8 = VK_TRUE;
    f12_on.shaderFloat16 = VK_TRUE;
    f12_on.vulkanMemoryModel = VK_TRUE;
    f12_on.vulkanMemoryModelDeviceScope = VK_TRUE;  // the other kernels' atomics use Device scope
    f12_on.pNext = f11_on.pNext;
    coop_on.pNext = &f12_on;
    f11_on.pNext = &coop_on;
    dev_extensions.push_back(VK_NV_COOPERATIVE_MATRIX_EXTENSION_NAME);
  }
  float priority = 1.0f;
  VkDeviceQueueCreateInfo qci{VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO};
  qci.queueFamilyIndex = queue_family_;
  qci.queueCount = 1;
  qci.pQueuePriorities = &priority;
  VkDeviceCreateInfo dci{VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO};
  dci.pNext = &f11_on;
  dci.queueCreateInfoCount = 1;
  dci.pQueueCreateInfos = &qci;
  dci.enabledExtensionCount = static_cast<std::uint32_t>(dev_extensions.size());
  dci.ppEnabledExtensionNames = dev_extensions.data();
  check(vkCreateDevice(physical_, &dci, nullptr, &device_), "vkCreateDevice");
  vkGetDeviceQueue(device_, queue_family_, 0, &queue_);

  // --- the one descriptor-set layout: binding 0 the parameter block, 1..kStorageBindings storage buffers
  std::vector<VkDescriptorSetLayoutBinding> bindings(1 + kStorageBindings);
  for (std::uint32_t i = 0; i < bindings.size(); ++i) {
    bindings[i].binding = i;
    bindings[i].descriptorType = i == 0 ? VK_DESCRIPTOR_TYPE_UNIFORM_BUFFER : VK_DESCRIPTOR_TYPE_STORAGE_BUFFER;
    bindings[i].descriptorCount = 1;
    bindings[i].stageFlags = VK_SHADER_STAGE_COMPUTE_BIT;
  }
  VkDescriptorSetLayoutCreateInfo dslci{VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO};
  dslci.bindingCount = static_cast<std::uint32_t>(bindings.size());
  dslci.pBindings = bindings.data();
  check(vkCreateDescriptorSetLayout(device_, &dslci, nullptr, &set_layout_), "vkCreateDescriptorSetLayout");
  VkPushConstantRange pcr{VK_SHADER_STAGE_COMPUTE_BIT, 0, 16};
  VkPipelineLayoutCreateInfo plci{VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO};
  plci.setLayoutCount = 1;
  plci.pSetLayouts = &set_layout_;
  plci.pushConstantRangeCount = 1;
  plci.pPushConstantRanges = &pcr;
  check(vkCreatePipelineLayout(device_, &plci, nullptr, &pipeline_layout_), "vkCreatePipelineLayout");
  VkPipelineCacheCreateInfo pcci{VK_STRUCTURE_TYPE_PIPELINE_CACHE_CREATE_INFO};
  check(vkCreatePipelineCache(device_, &pcci, nullptr, &pipeline_cache_), "vkCreatePipelineCache");
}

void Device::query_cooperative_matrix(const VkPhysicalDeviceSubgroupProperties& sg,
                                      const VkPhysicalDeviceVulkan12Features& f12) {
  auto list = reinterpret_cast<PFN_vkGetPhysicalDeviceCooperativeMatrixPropertiesNV>(
      vkGetInstanceProcAddr(instance_, "vkGetPhysicalDeviceCooperativeMatrixPropertiesNV"));
  if (!list) return;
  std::uint32_t n = 0;
  if (list(physical_, &n, nullptr) != VK_SUCCESS || n == 0) return;
  std::vector<VkCooperativeMatrixPropertiesNV> shapes(n, {VK_STRUCTURE_TYPE_COOPERATIVE_MATRIX_PROPERTIES_NV});
  if (list(physical_, &n, shapes.data()) != VK_SUCCESS) return;
  shapes.resize(n);
  auto type_name = [](VkComponentTypeNV t) -> const char* {
    switch (t) {
      case VK_COMPONENT_TYPE_FLOAT16_NV: return "f16";
      case VK_COMPONENT_TYPE_FLOAT32_NV: return "f32";
      case VK_COMPONENT_TYPE_FLOAT64_NV: return "f64";
      case VK_COMPONENT_TYPE_SINT8_NV: return "s8";
      case VK_COMPONENT_TYPE_SINT16_NV: return "s16";
      case VK_COMPONENT_TYPE_SINT32_NV: return "s32";
      case VK_COMPONENT_TYPE_SINT64_NV: return "s64";
      case VK_COMPONENT_TYPE_UINT8_NV: return "u8";
      case VK_COMPONENT_TYPE_UINT16_NV: return "u16";
      case VK_COMPONENT_TYPE_UINT32_NV: return "u32";
      case VK_COMPONENT_TYPE_UINT64_NV: return "u64";
      default: return "?";
    }
  };
  bool int8 = false, fp16 = false;
  std::string listing;
  for (const auto& s : shapes) {
    listing += std::string(listing.empty() ? "" : ", ") + std::to_string(s.MSize) + "x" + std::to_string(s.NSize) + "x" +
               std::to_string(s.KSize) + " " + type_name(s.AType) + "*" + type_name(s.BType) + "+" + type_name(s.CType) +
               (s.scope == VK_SCOPE_SUBGROUP_NV ? "" : " (not subgroup)");
    if (s.scope != VK_SCOPE_SUBGROUP_NV || s.MSize != 16 || s.NSize != 16) continue;
    if (s.KSize == 32 && s.AType == VK_COMPONENT_TYPE_SINT8_NV && s.BType == VK_COMPONENT_TYPE_SINT8_NV &&
        s.CType == VK_COMPONENT_TYPE_SINT32_NV && s.DType == VK_COMPONENT_TYPE_SINT32_NV)
      int8 = true;
    if (s.KSize == 16 && s.AType == VK_COMPONENT_TYPE_FLOAT16_NV && s.BType == VK_COMPONENT_TYPE_FLOAT16_NV &&
        s.CType == VK_COMPONENT_TYPE_FLOAT32_NV && s.DType == VK_COMPONENT_TYPE_FLOAT32_NV)
      fp16 = true;
  }
  features_.cooperative_matrix_shapes = listing;
  const VkSubgroupFeatureFlags ops =
      VK_SUBGROUP_FEATURE_BASIC_BIT | VK_SUBGROUP_FEATURE_VOTE_BIT | VK_SUBGROUP_FEATURE_SHUFFLE_BIT;
  features_.cooperative_matrix = int8 && fp16 && sg.subgroupSize == 32 && (sg.supportedOperations & ops) == ops &&
                                 (sg.supportedStages & VK_SHADER_STAGE_COMPUTE_BIT) && f12.shaderInt8 &&
                                 f12.shaderFloat16 && f12.vulkanMemoryModel && f12.vulkanMemoryModelDeviceScope;
}

// ---------------------------------------------------------------------------------------------------------
// Memory

std::uint32_t Device::memory_type(std::uint32_t bits, VkMemoryPropertyFlags want, VkMemoryPropertyFlags avoid) const {
  for (int pass = 0; pass < 2; ++pass)
    for (std::uint32_t i = 0; i < mem_props_.memoryTypeCount; ++i) {
      if (!(bits & (1u << i))) continue;
      VkMemoryPropertyFlags f = mem_props_.memoryTypes[i].propertyFlags;
      if ((f & want) != want) continue;
      if (pass == 0 && (f & avoid)) continue;
      return i;
    }
  return UINT32_MAX;
}

Buffer Device::create_buffer(VkDeviceSize bytes, VkBufferUsageFlags usage, bool host_visible) {
  Buffer b;
  b.size = std::max<VkDeviceSize>(16, (bytes + 15) / 16 * 16);
  VkBufferCreateInfo bci{VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO};
  bci.size = b.size;
  bci.usage = usage;
  bci.sharingMode = VK_SHARING_MODE_EXCLUSIVE;
  check(vkCreateBuffer(device_, &bci, nullptr, &b.buffer), "vkCreateBuffer");
  VkMemoryRequirements req;
  vkGetBufferMemoryRequirements(device_, b.buffer, &req);
  std::uint32_t type;
  if (host_visible) {
    type = memory_type(req.memoryTypeBits,
                       VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT |
                           VK_MEMORY_PROPERTY_HOST_CACHED_BIT, 0);
    if (type == UINT32_MAX)
      type = memory_type(req.memoryTypeBits, VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT, 0);
  } else {
    type = memory_type(req.memoryTypeBits, VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT, VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT);
    if (type == UINT32_MAX) type = memory_type(req.memoryTypeBits, 0, 0);
  }
  if (type == UINT32_MAX) {
    vkDestroyBuffer(device_, b.buffer, nullptr);
    fail(Status::DeviceError, "vulkan: no suitable memory type for a buffer of " + std::to_string(bytes) + " bytes");
  }
  VkMemoryAllocateInfo mai{VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO};
  mai.allocationSize = req.size;
  mai.memoryTypeIndex = type;
  VkResult r = vkAllocateMemory(device_, &mai, nullptr, &b.memory);
  if (r != VK_SUCCESS) {
    vkDestroyBuffer(device_, b.buffer, nullptr);
    check(r, ("vkAllocateMemory(" + std::to_string(bytes) + " bytes)").c_str());
  }
  r = vkBindBufferMemory(device_, b.buffer, b.memory, 0);
  if (r == VK_SUCCESS && host_visible) r = vkMapMemory(device_, b.memory, 0, VK_WHOLE_SIZE, 0, &b.mapped);
  if (r != VK_SUCCESS) {
    vkDestroyBuffer(device_, b.buffer, nullptr);
    vkFreeMemory(device_, b.memory, nullptr);
    check(r, "vkBindBufferMemory/vkMapMemory");
  }
  return b;
}

void Device::destroy_buffer(Buffer& b) {
  if (b.buffer) vkDestroyBuffer(device_, b.buffer, nullptr);
  if (b.memory) vkFreeMemory(device_, b.memory, nullptr);  // unmaps implicitly
  b = Buffer{};
}

// ---------------------------------------------------------------------------------------------------------
// Pipelines

void Device::print_pipeline_statistics(VkPipeline p) {
  auto get_proc = reinterpret_cast<PFN_vkGetDeviceProcAddr>(vkGetInstanceProcAddr(instance_, "vkGetDeviceProcAddr"));
  if (!get_proc) return;
  auto props = reinterpret_cast<PFN_vkGetPipelineExecutablePropertiesKHR>(
      get_proc(device_, "vkGetPipelineExecutablePropertiesKHR"));
  auto stats = reinterpret_cast<PFN_vkGetPipelineExecutableStatisticsKHR>(
      get_proc(device_, "vkGetPipelineExecutableStatisticsKHR"));
  if (!props || !stats) return;
  VkPipelineInfoKHR pi{VK_STRUCTURE_TYPE_PIPELINE_INFO_KHR};
  pi.pipeline = p;
  std::uint32_t n = 0;
  if (props(device_, &pi, &n, nullptr) != VK_SUCCESS) return;
  for (std::uint32_t e = 0; e < n; ++e) {
    VkPipelineExecutableInfoKHR ei{VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_INFO_KHR};
    ei.pipeline = p;
    ei.executableIndex = e;
    std::uint32_t m = 0;
    if (stats(device_, &ei, &m, nullptr) != VK_SUCCESS) continue;
    std::vector<VkPipelineExecutableStatisticKHR> st(m, {VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_STATISTIC_KHR});
    if (stats(device_, &ei, &m, st.data()) != VK_SUCCESS) continue;
    std::string line;
    for (std::uint32_t k = 0; k < m; ++k) {
      line += std::string(k ? ", " : "") + st[k].name + "=";
      switch (st[k].format) {
        case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_BOOL32_KHR: line += st[k].value.b32 ? "true" : "false"; break;
        case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_INT64_KHR: line += std::to_string(st[k].value.i64); break;
        case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_UINT64_KHR: line += std::to_string(st[k].value.u64); break;
        default: line += std::to_string(st[k].value.f64); break;
      }
    }
    std::fprintf(stderr, "sparq vulkan:   statistics: %s\n", line.c_str());
  }
}

bool Device::has_kernel(const std::string& kernel) {
  for (std::size_t i = 0; i < kSpirvKernelCount; ++i)
    if (kernel == kSpirvKernels[i].name) return true;
  return false;
}

VkPipeline Device::pipeline(const std::string& kernel, const std::vector<std::uint32_t>& spec) {
  std::lock_guard<std::mutex> lock(pipeline_mutex_);
  auto key = std::make_pair(kernel, spec);
  auto it = pipelines_.find(key);
  if (it != pipelines_.end()) return it->second;

  VkShaderModule module = VK_NULL_HANDLE;
  auto mit = modules_.find(kernel);
  if (mit != modules_.end()) {
    module = mit->second;
  } else {
    const SpirvKernel* found = nullptr;
    for (std::size_t i = 0; i < kSpirvKernelCount; ++i)
      if (kernel == kSpirvKernels[i].name) found = &kSpirvKernels[i];
    if (!found) fail(Status::Internal, "vulkan: kernel " + kernel + " is not in the generated registry");
    VkShaderModuleCreateInfo smci{VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO};
    smci.codeSize = found->size_bytes;
    smci.pCode = found->code;
    check(vkCreateShaderModule(device_, &smci, nullptr, &module), ("vkCreateShaderModule(" + kernel + ")").c_str());
    modules_[kernel] = module;
  }
  std::vector<VkSpecializationMapEntry> entries(spec.size());
  for (std::uint32_t i = 0; i < spec.size(); ++i) entries[i] = {i, i * 4u, 4u};
  VkSpecializationInfo si{static_cast<std::uint32_t>(entries.size()), entries.data(), spec.size() * 4u, spec.data()};
  VkComputePipelineCreateInfo cpci{VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO};
  cpci.stage.sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO;
  cpci.stage.stage = VK_SHADER_STAGE_COMPUTE_BIT;
  cpci.stage.module = module;
  cpci.stage.pName = "main";
  cpci.stage.pSpecializationInfo = spec.empty() ? nullptr : &si;
  cpci.layout = pipeline_layout_;
  if (pipeline_statistics_) cpci.flags |= VK_PIPELINE_CREATE_CAPTURE_STATISTICS_BIT_KHR;
  VkPipeline p = VK_NULL_HANDLE;
  auto t0 = std::chrono::steady_clock::now();
  check(vkCreateComputePipelines(device_, pipeline_cache_, 1, &cpci, nullptr, &p),
        ("vkCreateComputePipelines(" + kernel + ")").c_str());
  if (env_flag("SPARQ_VULKAN_VERBOSE")) {
    std::string sp;
    for (auto v : spec) sp += std::to_string(v);
    std::fprintf(stderr, "sparq vulkan: pipeline %s [%s] created in %.1f ms\n", kernel.c_str(), sp.c_str(),
                 std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    if (pipeline_statistics_) print_pipeline_statistics(p);
  }
  pipelines_[key] = p;
  return p;
}

}  // namespace sparq::vulkan
