// The generated table of embedded SPIR-V kernels (sparq_registry_vulkan.cpp in the build directory).
#pragma once
#include <cstddef>
#include <cstdint>

namespace sparq::vulkan {

struct SpirvKernel {
  const char* name;        // the variant's name from codegen/sparq_codegen/variants.py
  const std::uint32_t* code;
  std::size_t size_bytes;
};

extern const SpirvKernel kSpirvKernels[];
extern const std::size_t kSpirvKernelCount;

}  // namespace sparq::vulkan
