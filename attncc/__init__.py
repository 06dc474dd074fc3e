"""attncc: describe an attention variant once, get a fused Triton kernel for it.

    spec = attncc.Attention(mask=attncc.causal() & attncc.sliding_window(1024),
                            score=attncc.softcap(50.0))
    attn = attncc.compile(spec)
    out, lse = attn(q, k, v, return_lse=True)
"""

from attncc.api import Attention, compile, explain
from attncc.ir.nodes import Capture, Mask, Normaliser, Param, Schedule, ScoreMod
from attncc.ir.reorder import (AutoReorder, Hilbert2D, Hilbert3D, Morton2D, SegmentSort,
                               TileMajor, UserPermutation)
from attncc.ir.spec import AttentionSpec
from attncc.ir.trace import TraceError
from attncc.ir.verify import VerifyError, verify
from attncc.ir.linear import LinearState
from attncc.ops.softmax.compiled import CompiledAttention
from attncc import fx, nn  # torch modules, the SDPA graph pass
from attncc import dist  # context parallelism over torch.distributed
from attncc.ops.softmax import custom_op as torch_ops  # the custom ops (importing registers them)
from attncc.ops.linear import custom_op as torch_ops_linear  # noqa: F401
from attncc.ops.serving import custom_op as torch_ops_serving  # noqa: F401
from attncc.ops.serving import stream as serving_stream  # append_stream (README)
from attncc.fx import compile_backend, replace_sdpa
from attncc.ops.linear.compiled import CompiledLinearAttention
from attncc.library.linear import hybrid, recurrent_state
from attncc.ops.linear.hybrid import CompiledHybrid
from attncc.library.masks import (bidirectional_window, bigbird, bigbird_random_blocks, block_causal,
                          block_topk, causal, chunked, criss_cross, dilated_window, document,
                          document_inputs, full, global_tokens, hilberta, neighbourhood_2d,
                          neighbourhood_3d, per_head_classes, prefix_lm, sinks_window,
                          sliding_window, strided_heads, tree)
from attncc.library.memories import paged, per_head_lengths, persistent, ragged, streaming_heads
from attncc.library.reorders import auto, hilbert, morton, permutation, segment_sort, tiles
from attncc.library.scores import (alibi, bias, calibration, head_bias, log_count, relative_bias, scale,
                           sink, softcap)
from attncc.ops.serving.compiled import ServePlan, ServingAttention

__all__ = [
    "ServePlan", "ServingAttention", "paged", "per_head_lengths", "persistent", "ragged",
    "streaming_heads",
    "compile_backend", "dist", "fx", "nn", "replace_sdpa", "torch_ops",
    "Attention", "AttentionSpec", "CompiledHybrid", "CompiledLinearAttention", "LinearState",
    "hybrid", "recurrent_state",
    "AutoReorder", "auto", "hilbert", "morton", "permutation",
    "segment_sort", "tiles", "Capture", "CompiledAttention", "Hilbert2D", "Hilbert3D",
    "Mask", "Morton2D", "Normaliser", "Param", "Schedule", "ScoreMod", "SegmentSort", "TileMajor",
    "TraceError", "UserPermutation", "VerifyError", "alibi", "bias", "bidirectional_window",
    "bigbird", "bigbird_random_blocks", "block_causal", "block_topk", "calibration", "causal",
    "chunked", "compile", "criss_cross", "dilated_window", "document", "document_inputs",
    "explain", "full", "global_tokens", "head_bias", "hilberta", "log_count", "neighbourhood_2d",
    "neighbourhood_3d", "per_head_classes", "prefix_lm", "relative_bias", "scale", "sink",
    "sinks_window", "sliding_window", "softcap", "strided_heads", "tree", "verify",
]
