"""Compiles the Triton kernels ahead of time for NVIDIA GPUs, without a GPU: Triton's code generator and its bundled
ptxas, with the launch options the package uses. Run as a script by tests/ops/test_triton_ops.py (the test process runs
the kernels in the interpreter, which never generates code, so it cannot catch what only the compiler rejects).

    python tests/ops/compile_triton_kernels.py          # prints one JSON line per kernel, target and dtype
"""

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before Triton defines the kernels
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 default, stated to silence its warning

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hf_performer import ops_triton  # noqa: E402

M, D, C = 128, 64, 32  # the benchmark shape: 128 features, head dim 64, the kernels' chunk tile
TILE = ops_triton.MAX_COLUMNS
KERNELS = {
    "forward": (ops_triton._forward_kernel, dict(BLOCK_C=C, BLOCK_M=M, BLOCK_D=TILE)),
    "dq": (ops_triton._dq_kernel, dict(BLOCK_C=C, BLOCK_M=TILE, BLOCK_D=D)),
    "dk": (ops_triton._dk_kernel, dict(BLOCK_C=C, BLOCK_M=TILE, BLOCK_D=D)),
    "dv": (ops_triton._dv_kernel, dict(BLOCK_C=C, BLOCK_M=M, BLOCK_D=TILE)),
}


def compile_kernel(fn, blocks: dict, dtype: str, arch: int):
    signature, constants = {}, {}
    for name in fn.arg_names:
        if name in blocks:
            signature[name], constants[name] = "constexpr", blocks[name]
        elif name == "DTYPE":
            signature[name], constants[name] = "constexpr", tl.float64 if dtype == "fp64" else tl.float32
        elif name in ("N", "M", "D"):
            signature[name] = "i32"
        else:
            signature[name] = "*" + dtype
    return triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", arch, 32),
                          options=dict(ops_triton.LAUNCH))


# Feature counts beyond the benchmark's, for the kernels whose tiles span all m features (forward, dv): 266 is the
# default for d_head = 64 (int(d ln d)), 200 another power-of-two tile; the rows check ops_triton.shared_memory_bytes.
WIDE = [(266, "fp32"), (200, "fp64")]


def row(name, fn, blocks, dtype, arch, features=M):
    try:
        kernel = compile_kernel(fn, blocks, dtype, arch)
        return dict(kernel=name, arch=arch, dtype=dtype, features=features, ok=True, shared=kernel.metadata.shared,
                    cubin_bytes=len(kernel.asm["cubin"]))
    except Exception as error:  # report every failure, not only the first
        return dict(kernel=name, arch=arch, dtype=dtype, features=features, ok=False,
                    error=f"{type(error).__name__}: {str(error)[-500:]}")


def main():
    for arch in (80, 90):
        for dtype in ("fp32", "fp64"):
            for name, (fn, blocks) in KERNELS.items():
                print(json.dumps(row(name, fn, blocks, dtype, arch)), flush=True)
    for features, dtype in WIDE:
        tile = ops_triton._block(features)
        for name in ("forward", "dv"):
            fn, blocks = KERNELS[name]
            print(json.dumps(row(name, fn, dict(blocks, BLOCK_M=tile), dtype, 90, features)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
