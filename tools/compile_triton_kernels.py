"""Compile the Triton kernels for a GPU architecture, no GPU needed: ``python tools/compile_triton_kernels.py 90``.

Every specialisation the resampling's launcher makes (float32 with residual and ReLU; bfloat16 with sizes of 1,
which Triton turns into constants; float16 with a unit channel stride), and the matrices' kernels, compiled to a
cubin. Prints, as JSON on its last line, each one's cubin size and whether its ``tl.dot`` uses tensor cores
(``mma``). Run by ``test_triton.py`` in a process without ``TRITON_INTERPRET``.
"""

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from timm_ssb.layers.native.triton.matrices_kernel import axis_matrices_kernel, matrices_backward_kernel
from timm_ssb.layers.native.triton.resample_kernel import separable_resample_kernel

SPECIALISATIONS = {
    'fp32, residual, relu': ('fp32', True, True, ()),
    'bf16, sizes of 1': ('bf16', False, False, ('channels', 'height', 'width', 'rows', 'cols')),
    'fp16, residual, unit channel stride': ('fp16', True, False, ('x_stride_c',)),
}


def compile_all(arch: int) -> dict:
    results = {}
    for name, (dtype, has_residual, relu, ones) in SPECIALISATIONS.items():
        constants = dict(
            HAS_RESIDUAL=has_residual,
            RELU=relu,
            DOT_PRECISION='ieee' if dtype == 'fp32' else 'tf32',
            BLOCK_H=16,
            BLOCK_W=64,
            BLOCK_Q=64,
            BLOCK_C=32,
            **dict.fromkeys(ones, 1),
        )
        pointers = {
            'x_ptr': dtype,
            'matrix_y_ptr': 'fp32',
            'matrix_x_ptr': 'fp32',
            'residual_ptr': dtype,
            'out_ptr': dtype,
        }
        signature = {
            n: 'constexpr' if n in constants else f'*{pointers[n]}' if n in pointers else 'i32'
            for n in separable_resample_kernel.arg_names
        }
        source = ASTSource(fn=separable_resample_kernel, signature=signature, constexprs=constants)
        compiled = triton.compile(source, target=GPUTarget('cuda', arch, 32))
        results[name] = {'cubin_bytes': len(compiled.asm['cubin']), 'tensor_cores': 'mma' in compiled.asm['ptx']}
    # The matrices' kernels, forward and backward (layer2 of a ResNet-D at 224 x 224: 28 -> 16); no matrix units.
    matrices = {
        'matrices': (axis_matrices_kernel, dict(BLOCK_EXTENDED=128, BLOCK_ACROSS=32, BLOCK_LENGTH=32, BLOCK_SIZE=16)),
        'matrices backward': (
            matrices_backward_kernel,
            dict(
                HAS_GRAD_DOWN_Y=True,
                HAS_GRAD_DOWN_X=False,
                HAS_GRAD_UP_Y=True,
                HAS_GRAD_UP_X=True,
                BLOCK_EXTENDED_Y=128,
                BLOCK_EXTENDED_X=128,
                BLOCK_H=32,
                BLOCK_W=32,
                BLOCK_SIZE=16,
            ),
        ),
    }
    floats = ('sigma_g', 'sigma_down', 'sigma_up')
    for name, (kernel, constants) in matrices.items():
        signature = {
            n: 'constexpr' if n in constants else 'fp32' if n in floats else '*fp32' if n.endswith('_ptr') else 'i32'
            for n in kernel.arg_names
        }
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constants), target=GPUTarget('cuda', arch, 32)
        )
        results[name] = {'cubin_bytes': len(compiled.asm['cubin']), 'tensor_cores': 'mma' in compiled.asm['ptx']}
    return results


if __name__ == '__main__':
    print(json.dumps(compile_all(int(sys.argv[1]))))
