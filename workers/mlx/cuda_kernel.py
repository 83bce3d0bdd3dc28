"""Our CUDA kernels written as `mx.fast.cuda_kernel` bodies, built by NVRTC once per machine and kept
on disk (MLX CUDA backend only).

Why: with `mx.fast.cuda_kernel`, MLX 0.32.4 compiles a kernel with NVRTC in every process and keeps
the build nowhere: 1.4-1.8 s per kernel on an H200, 4.6-5.0 s for the head's three tilings, so that
~11 s of a 2B model's 14 s load went to the same seven builds at every worker start and every
reload after an eviction (bench/RESULTS.md, fortieth session).

How: `Kernel` writes the kernel that `mx.fast.cuda_kernel` would from the same body (the inputs,
then the outputs, as pointers; each template argument a constant; `x_shape` for an input `x` whose
shape the body reads), builds it with workers/mlx/nvrtc.py for this GPU, keeps the cubin in the
kernel cache folder, and runs it with `mx.fast.precompiled_cuda_kernel`. The shapes come in as int
scalars after the outputs. In place of MLX's device headers, which its wheel does not ship, a short
prelude gives the fixed-width integers and 16-bit floats converted by the same instructions as
cuda_bf16.h's and cuda_fp16.h's: so the text compiles wherever NVRTC runs, with or without a CUDA
toolkit. Each kernel is still checked against its MLX-ops path at load (its module's `load`).
"""
from __future__ import annotations

import functools
import hashlib
import threading

import mlx.core as mx

from workers.mlx import nvrtc
from workers.mlx.cuda_driver import Driver

# bf16 and fp16 hold their bits; converting from float rounds to nearest even (`cvt.rn`, what
# __float2bfloat16_rn and __float2half_rn compile to; the same arithmetic without the instruction
# before sm_80, as cuda_bf16.h does there), converting to float is exact.
PRELUDE = r"""
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;

__device__ __forceinline__ unsigned short bf16_bits(float x) {
#if __CUDA_ARCH__ >= 800
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
#else
    const unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}

struct __align__(2) bf16 {
    unsigned short bits;
    bf16() = default;
    __device__ explicit bf16(float x) : bits(bf16_bits(x)) {}
    __device__ explicit operator float() const { return __uint_as_float((unsigned int)bits << 16); }
};

struct __align__(2) fp16 {
    unsigned short bits;
    fp16() = default;
    __device__ explicit fp16(float x) { asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(x)); }
    __device__ explicit operator float() const {
        float r;
        asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(bits));
        return r;
    }
};
"""

C_TYPES = {
    mx.float32: "float", mx.bfloat16: "bf16", mx.float16: "fp16", mx.bool_: "bool",
    mx.int8: "int8_t", mx.uint8: "uint8_t", mx.int16: "int16_t", mx.uint16: "uint16_t",
    mx.int32: "int32_t", mx.uint32: "uint32_t", mx.int64: "int64_t", mx.uint64: "uint64_t",
}


@functools.cache
def arch() -> str:
    """This GPU's NVRTC target, e.g. "sm_90" (what MLX builds its own kernels for)."""
    major, minor = Driver().compute_capability()
    return f"sm_{major}{minor}"


def _constant(name: str, value) -> str:
    if isinstance(value, mx.Dtype):
        return f"    using {name} = {C_TYPES[value]};\n"
    if isinstance(value, bool):
        return f"    constexpr bool {name} = {'true' if value else 'false'};\n"
    return f"    constexpr int {name} = {int(value)};\n"


class Kernel:
    """`mx.fast.cuda_kernel(name=..., input_names=..., output_names=..., source=..., header=...)`,
    called the same way, with its builds kept on disk. Each new set of template arguments, input
    dtypes or input ranks is one more build."""

    def __init__(self, name: str, input_names: list[str], output_names: list[str], source: str, header: str = ""):
        if any(f"{n}_strides" in source or f"{n}_ndim" in source for n in input_names):
            raise ValueError(f"kernel {name}: only an input's shape can be read, not its strides or rank")
        self.name, self.input_names, self.output_names = name, list(input_names), list(output_names)
        self.source, self.header = source, header
        self.shaped = [f"{n}_shape" in source for n in input_names]     # as MLX decides it
        self._built: dict[tuple, tuple[str, bytes]] = {}
        self._lock = threading.Lock()

    def text(self, template, input_dtypes, input_ndims, output_dtypes) -> str:
        """The kernel's CUDA C++ for these arguments, named KNAME."""
        params = []
        for name, dtype in zip(self.input_names, input_dtypes):
            params.append(f"const {C_TYPES[dtype]}* {name}")
        params += [f"{C_TYPES[d]}* {name}" for name, d in zip(self.output_names, output_dtypes)]
        body = ""
        for name, ndim, shaped in zip(self.input_names, input_ndims, self.shaped):
            if shaped and ndim:
                dims = [f"{name}_shape_{i}" for i in range(ndim)]
                params += [f"int {d}" for d in dims]
                body += f"    const int {name}_shape[{ndim}] = {{{', '.join(dims)}}};\n"
        body += "".join(_constant(name, value) for name, value in template)
        return (f"{PRELUDE}\n{self.header}\n"
                f"extern \"C\" __global__ void KNAME(\n    " + ",\n    ".join(params) + ") {\n"
                f"{body}\n{self.source}\n}}\n")

    def _build(self, key) -> tuple[str, bytes]:
        with self._lock:
            if key not in self._built:
                text = self.text(*key)
                kname = f"{self.name}_{hashlib.sha256(text.encode()).hexdigest()[:16]}"
                cubin, _ = nvrtc.cached_cubin(text.replace("KNAME", kname), arch())
                self._built[key] = kname, cubin
            return self._built[key]

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=(),
                 init_value: float | None = None) -> list[mx.array]:
        template = tuple(template)
        key = (template, tuple(x.dtype for x in inputs),
               tuple(x.ndim if s else 0 for x, s in zip(inputs, self.shaped)), tuple(output_dtypes))
        kname, cubin = self._built.get(key) or self._build(key)
        scalars = [d for x, s in zip(inputs, self.shaped) if s for d in x.shape]
        return mx.fast.precompiled_cuda_kernel(
            name=kname, compiled_source=cubin, inputs=inputs, output_shapes=output_shapes,
            output_dtypes=output_dtypes, scalars=scalars, grid=grid, threadgroup=threadgroup,
            init_value=init_value, ensure_row_contiguous=True)
