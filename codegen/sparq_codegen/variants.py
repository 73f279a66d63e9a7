"""The one table of kernel variants.

Every generated kernel source is listed here, once. Meson asks this table (through generate.py --list) which
files will be produced, the generator renders them, and the registry templates turn the same list into the
lookup table the runtime searches. Adding a head dim is a Meson option (-Dhead_dims), never an edit here.
"""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Config:
    """What Meson asked for (from meson.options)."""
    backend: str                     # "cuda" or "vulkan"
    head_dims: tuple = (64, 128)
    cuda_archs: tuple = ("sm_90a",)  # e.g. sm_80, sm_89, sm_90a


@dataclass(frozen=True)
class Variant:
    backend: str          # "cuda" | "vulkan"
    kernel: str           # what it computes: "smooth_k", "attention", ...
    template: str         # path under templates/
    params: tuple = field(default_factory=tuple)  # ((name, value), ...) handed to the template

    @property
    def param(self):
        return dict(self.params)

    @property
    def name(self):
        """A name that is the key: kernel plus every parameter, e.g. attention_sm89_d128_lut."""
        parts = [self.kernel] + [_short(k, v) for k, v in self.params]
        return "_".join(p for p in parts if p)

    @property
    def output(self):
        suffix = {"cuda": ".cu", "vulkan": ".comp"}[self.backend]
        return self.name + suffix


def _short(key, value):
    if isinstance(value, bool):
        return key if value else ""
    if key == "head_dim":
        return f"d{value}"
    if key == "arch":
        return str(value).replace("_", "")
    return str(value)


def cuda_variants(cfg: Config):
    # mma.sync attention, one TU per (path, head dim, P·V precision). Tile: BLOCK_Q = 64 query rows (4 warps x
    # 16 rows; 3 CTAs of 168 registers per SM beat one 8-warp CTA by 5-12% on the H100), BLOCK_K = 64 keys per
    # cp.async stage (3 stages for FP8 P·V, 2 for FP16); the tile lives in backends/cuda/cuda_registry.hpp and
    # attention_kernel.cuh, which records the measurements. The sm89 path (FP8 e4m3 P·V, and
    # FP16/BF16 P·V on request) also serves sm_90a builds for FP16/BF16 P·V, head dims without a wgmma kernel and
    # SPARQ_CUDA_PATH=sm89; sm80 has FP16/BF16 P·V only.
    # Head dims must be powers of two >= 32 here (int8 k-steps of 32, swizzled power-of-two rows); others are
    # not generated and the backend reports them as not built. Preprocessing is arch-neutral
    # (backends/cuda/cuda_backend_kernels.cu), causal / masks / granularity / out dtype are runtime arguments.
    out = []
    paths = []
    if "sm_80" in cfg.cuda_archs:
        paths.append(("sm_80", ("fp16",)))
    if "sm_89" in cfg.cuda_archs or "sm_90a" in cfg.cuda_archs:
        paths.append(("sm_89", ("fp16", "fp8")))
    for arch, pvs in paths:
        for d in cfg.head_dims:
            if d < 32 or d & (d - 1):
                continue
            for pv in pvs:
                out.append(Variant("cuda", "attention", "cuda/attention.cu.j2",
                                   (("arch", arch), ("head_dim", d), ("pv", pv))))
    # The wgmma path (backends/cuda/attention_sm90a.cuh): FP8 e4m3 and FP16/BF16 P·V, head dims 64 and 128 (the
    # m64nD P·V accumulator of D = 256 would not fit the registers). Its arch parameter reads "sm_90" because the
    # registry stores the arch as the number after "sm_"; backends/cuda/meson.build compiles the "sm90" path for
    # compute_90a / sm_90a (the architecture-specific wgmma). Its FP16 variants fall back to the sm89 ones (a
    # bitmap walked as such, SPARQ_SM90_KERNEL other than "wide").
    if "sm_90a" in cfg.cuda_archs:
        for d in cfg.head_dims:
            if d in (64, 128):
                for pv in ("fp16", "fp8"):
                    out.append(Variant("cuda", "attention", "cuda/attention_sm90a.cu.j2",
                                       (("arch", "sm_90"), ("head_dim", d), ("pv", pv))))
    return out


def vulkan_variants(cfg: Config):
    """The scalar Vulkan path (GLSL, runs on any Vulkan 1.2 device with 16-bit storage, incl. Mesa lavapipe).

    - ``kmean``: per (batch, kv head) channel mean of K over tokens (the smoothing vector). Not per head dim.
    - ``quant``: Q and K quantization to INT8 per NUMERICS.md group (one workgroup per span of tokens that
      holds whole groups), K smoothing, Q's scale folded with scale·log2(e), the LSE correction scale·q·km,
      and the fp16/bf16 smoothed K for qk_precision=Fp16; optionally the SpargeAttn stage-1 pooling of the
      same rows (specialization constants). Not per head dim (head dim is a runtime value).
    - ``attention_d{D}_{mask}[_idot]``: the fused attention kernel, per head dim, mask layout and flavour.
      Tile choice: a workgroup of 128 threads owns a 64-query-row tile (two threads per row, each holding
      half of the row's fp32 output accumulator and computing half of the 64 keys of a tile), K tiles of
      64 keys (= BK of the numerics contract, so the online-softmax steps match the reference) with the INT8
      K tile and the fp16/bf16 V tile staged in shared memory (about 26 KiB, within lavapipe's 32 KiB).
      Mask blocks must therefore be multiples of 64x64. Causal, input/output dtype and the fp16 Q·Kᵀ path
      are specialization constants and sizes/strides/tails are runtime parameters, so they cost no build
      variants: 2 + 6·len(head_dims) SPIR-V modules (+ 3 per head dim for the cooperative-matrix path).
    - ``attention_d{D}_{mask}_coopmat``: the cooperative-matrix (tensor core) kernel, GL_NV_cooperative_matrix:
      int8 16x16x32 and fp16 16x16x16 matrices, 4 subgroups of 32 per 64-row tile, Q8/K8/V tiles and the S/P
      tile in shared memory (attention_coopmat.comp.j2 says why NV and how). Head dims that are multiples of
      32 up to 128 (shared memory: 45 KiB at D = 128, the H100's limit is 48). The runtime picks it when the
      device lists both shapes, for fp16 inputs with INT8 Q·Kᵀ; everything else runs the kernels above.
    """
    out = [Variant("vulkan", "kmean", "glsl/kmean.comp.j2"),
           Variant("vulkan", "quant", "glsl/quant.comp.j2")]
    # SpargeAttn stage 1 on the device (docs/SPARGE.md): the pooling of Q, raw K and smoothed K runs in quant
    # (templates/glsl/sparge_pool.glsl); then the prediction's K mean, the block statistics from the pooled
    # chunks, the map and selection per query block row, and the token permutation of the Hilbert order.
    # Head dim and dtype are runtime values / specialization constants: one module each.
    out += [Variant("vulkan", "sparge_kmean", "glsl/sparge_kmean.comp.j2"),
            Variant("vulkan", "sparge_finalize", "glsl/sparge_finalize.comp.j2"),
            Variant("vulkan", "sparge_select", "glsl/sparge_select.comp.j2"),
            Variant("vulkan", "sparge_permute", "glsl/sparge_permute.comp.j2")]
    # V in a fused token order, copied once per attention call for the attention kernels (order_v.comp.j2).
    out.append(Variant("vulkan", "order_v", "glsl/order_v.comp.j2"))
    # Two flavours per (head dim, mask): "idot" = the fast one for GPUs: Q·Kᵀ through the packed 4x8-bit dot
    # product (SPV_KHR_integer_dot_product, emitted with GL_EXT_spirv_intrinsics because glslang 12 lacks
    # GL_EXT_integer_dot_product) and unrolled inner loops; without idot = the portable one: plain integer
    # math and rolled inner loops (what CPU implementations such as lavapipe compile quickly). The runtime
    # picks idot on GPUs with shaderIntegerDotProduct (SPARQ_VULKAN_KERNELS=portable|fast overrides).
    for d in cfg.head_dims:
        for mask in ("none", "bitmap", "lut"):
            for idot in (False, True):
                out.append(Variant("vulkan", "attention", "glsl/attention.comp.j2",
                                   (("head_dim", d), ("mask", mask), ("idot", idot))))
            if d % 32 == 0 and d <= 128:
                out.append(Variant("vulkan", "attention", "glsl/attention_coopmat.comp.j2",
                                   (("head_dim", d), ("mask", mask), ("coopmat", True))))
    return out


def variants(cfg: Config):
    table = {"cuda": cuda_variants, "vulkan": vulkan_variants}
    if cfg.backend not in table:
        raise ValueError(f"unknown backend {cfg.backend!r}; expected one of {sorted(table)}")
    found = table[cfg.backend](cfg)
    names = [v.name for v in found]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"variant table lists these twice: {sorted(dupes)}")
    return found


REGISTRY_TEMPLATE = {"cuda": "registry/registry_cuda.cpp.j2", "vulkan": "registry/registry_vulkan.cpp.j2"}
REGISTRY_OUTPUT = {"cuda": "sparq_registry_cuda.cpp", "vulkan": "sparq_registry_vulkan.cpp"}
