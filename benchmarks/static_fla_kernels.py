"""fla's installed gated-delta-rule forward kernels as plain `triton.JITFunction`s, so that the
ahead-of-time compile child (attncc/backends/triton/aot_child.py, which loads a file by path and
compiles the attribute named in its job) can compile them for a GPU that is not here.

fla wraps each kernel in `triton.heuristics` and an autotuner; those pick constexprs and launch
options at run time on a GPU. `benchmarks/static.py` passes what they would (the heuristics'
flags from the arguments fla passes, one autotune config named there), and this module strips the
wrappers. Attribute names are the kernels' own names (the cubin's function name).
"""

import triton
from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_kernel_h_blockdim64 as _h
from fla.ops.common.chunk_o import chunk_fwd_kernel_o as _o
from fla.ops.common.chunk_scaled_dot_kkt import chunk_scaled_dot_kkt_fwd_kernel as _kkt
from fla.ops.gated_delta_rule.wy_fast import recompute_w_u_fwd_kernel as _wu
from fla.ops.utils.solve_tril import merge_16x16_to_64x64_inverse_kernel as _tril


def _jit(kernel):
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


chunk_gated_delta_rule_fwd_kernel_h_blockdim64 = _jit(_h)
chunk_fwd_kernel_o = _jit(_o)
chunk_scaled_dot_kkt_fwd_kernel = _jit(_kkt)
merge_16x16_to_64x64_inverse_kernel = _jit(_tril)
recompute_w_u_fwd_kernel = _jit(_wu)
