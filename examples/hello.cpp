// The smallest useful sparq program (the README's example): attention on whatever backend is available.
#include <sparq/sparq.hpp>

#include <cstdint>
#include <cstdio>
#include <vector>

int main() {
  try {
    sparq::Context ctx = sparq::Context::create();  // CUDA GPU, else Vulkan, else the CPU reference
    const int64_t B = 1, H = 8, N = 512, D = 64;
    std::vector<uint16_t> ones(B * H * N * D, 0x3C00);  // fp16 1.0
    sparq::Tensor q = ctx.from_host(sparq::DType::F16, {B, H, N, D}, ones.data());
    sparq::Tensor k = ctx.from_host(sparq::DType::F16, {B, H, N, D}, ones.data());
    sparq::Tensor v = ctx.from_host(sparq::DType::F16, {B, H, N, D}, ones.data());
    sparq::Tensor out = ctx.empty(sparq::DType::F16, {B, H, N, D});
    sparq::AttentionOptions options;
    options.causal = true;
    sparq::attention(ctx, q, k, v, out, options);
    std::vector<uint16_t> o(out.numel());
    ctx.to_host(out, o.data());
    std::printf("%s on %s: out[0] = 0x%04x (fp16 1.0 = 0x3c00)\n", sparq::to_string(ctx.backend()),
                ctx.device_name().c_str(), o[0]);
    return o[0] == 0x3C00 ? 0 : 1;
  } catch (const sparq::Error& e) {
    std::fprintf(stderr, "sparq error: %s\n", e.what());
    return 1;
  }
}
