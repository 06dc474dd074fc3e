"""The kernel families that `benchmarks.run`'s grid does not time yet (workloads.PENDING), as
small fixed cases for the one-shot GPU check (benchmarks/gpu_check.py): paged decode, gated
delta (L6) prefill, and the causal backward. Each case builds its inputs, a reference on batch
element 0 (fp32 on a GPU, fp64 on a CPU), and one callable per implementation; `run_case` checks
every output against the reference before timing it, as the harness does for forward cases,
and records a peer that cannot run as "unavailable" with the reason, never as a failure.

Peers: paged decode: SDPA (flash, efficient, cuDNN) on a contiguous copy of the cache (no page
table: an easier problem than attncc's); L6: flash-linear-attention's `chunk_gated_delta_rule`
when fla is installed; backward: SDPA (flash, efficient, cuDNN, `is_causal`) and FlexAttention
(torch.compile; it has no backward on a CPU), each timed as forward + backward.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import attncc
from benchmarks.harness import Timer, _failure, _no_tf32
from benchmarks.peers import Unavailable

Out = torch.Tensor | tuple[torch.Tensor, ...]

# max |out - ref| <= TOL[dtype] * max(|ref|, 1), per output tensor (gradients and recurrences
# accumulate more rounding than one forward: a bound relative to the largest value)
TOL = {"bfloat16": 5e-2, "float16": 1e-2, "float32": 1e-3}
SDPA_BACKENDS = (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-efficient", "EFFICIENT_ATTENTION"),
                 ("sdpa-cudnn", "CUDNN_ATTENTION"))


@dataclass
class FamilyCase:
    workload: str
    family: str
    about: str
    shape: dict[str, Any]
    dtype: str
    reference: Callable[[], Out]  # batch element 0, in the reference precision
    impls: dict[str, Callable[[], Callable[[], Out]]]  # name -> prepare() -> fn (full batch)
    params: dict[str, Any] = field(default_factory=dict)


def _first(out: Out) -> tuple[torch.Tensor, ...]:
    return tuple(t[:1] for t in (out if isinstance(out, tuple) else (out,)))


def compare(out: Out, ref: Out, dtype: str) -> tuple[bool, float | None]:
    """Batch element 0 of every output tensor against the reference's."""
    outs, refs = _first(out), (ref if isinstance(ref, tuple) else (ref,))
    worst = 0.0
    ok = len(outs) == len(refs)
    for o, r in zip(outs, refs):
        if o.shape != r.shape or not bool(torch.isfinite(o).all()):
            return False, None
        err = float((o.to(r.dtype) - r).abs().max())
        worst = max(worst, err)
        ok = ok and err <= TOL[dtype] * max(float(r.abs().max()), 1.0)
    return ok, worst


def _entry(prepare: Callable[[], Callable[[], Out]], ref: Out, dtype: str,
           timer: Timer | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"status": "ok", "ms": None, "max_err": None, "reason": None}
    try:
        fn = prepare()
        out = fn()
    except Exception as e:  # noqa: BLE001 - recorded in the entry, with its reason
        return entry | _failure(e, [])  # Unavailable, or SDPA's "No available kernel"
    ok, err = compare(out, ref, dtype)
    entry["max_err"] = err
    if not ok:
        what = "non-finite or misshapen output" if err is None else f"max |o - ref| = {err:.3g}"
        return entry | {"status": "wrong",
                        "reason": f"{what}: above {TOL[dtype]} x max(|ref|, 1); not timed"}
    del out
    if timer is not None:
        try:
            entry["ms"] = float(timer(fn))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory while timing
            failure = _failure(e, [])
            return entry | failure | {"reason": f"checked ok, then timing failed: "
                                      f"{failure['reason']}"}
    return entry


def run_case(case: FamilyCase, timer: Timer | None) -> dict[str, Any]:
    """The case's result in the harness's form: entries per implementation, speedup per peer."""
    start = time.perf_counter()
    with _no_tf32():
        ref = case.reference()
    entries: dict[str, dict[str, Any]] = {}
    interrupted = False
    for name, prep in case.impls.items():
        if interrupted:
            entries[name] = {"status": "error", "ms": None, "max_err": None,
                             "reason": "not run: the part's time limit came first"}
            continue
        try:
            entries[name] = _entry(prep, ref, case.dtype, timer)
        except KeyboardInterrupt:  # gpu_check.sh's time limit (SIGINT): keep what was measured
            interrupted = True
            entries[name] = {"status": "error", "ms": None, "max_err": None,
                             "reason": "interrupted at the part's time limit"}
    base = entries["attncc"]["ms"]
    speedup = {n: e["ms"] / base for n, e in entries.items()
               if n != "attncc" and base and e["ms"]}
    if case.shape.get("device") == "cuda":
        torch.cuda.empty_cache()
    return {"workload": case.workload, "family": case.family, "about": case.about,
            "shape": {k: v for k, v in case.shape.items() if k != "device"},
            "params": case.params, "entries": entries, "speedup": speedup,
            "seconds": round(time.perf_counter() - start, 3), "interrupted": interrupted}


def _ref_dtype(device: str) -> torch.dtype:
    return torch.float32 if device == "cuda" else torch.float64


def _sdpa(backend_name: str, device: str, call: Callable[[], Out]) -> Callable[[], Out]:
    """`call` under one SDPA backend (a CPU has only the math backend: the others are
    unavailable there, as in the harness)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        raise Unavailable(f"torch {torch.__version__} has no SDPBackend.{backend_name}")
    if device != "cuda":
        raise Unavailable("no CUDA")

    def fn() -> Out:
        with sdpa_kernel(backend):
            return call()
    return fn


# ---- paged decode ------------------------------------------------------------------------------

def decode_case(device: str, dry_run: bool) -> FamilyCase:
    """One decode step (Lq = 1) over a paged KV cache, causal (the query is the last token)."""
    B, Hq, Hkv, D, P, L = (2, 4, 2, 16, 16, 40) if dry_run else (32, 32, 8, 128, 16, 4096)
    dtype = "float32" if dry_run else "bfloat16"  # interpreter: no bf16 dots
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    pages = -(-L // P)
    kc, vc = (torch.randn(B * pages, P, Hkv, D, generator=g).to(device, dt) for _ in range(2))
    table = torch.randperm(B * pages, generator=g).view(B, pages).int().to(device)
    kv_len = torch.full((B,), L, dtype=torch.int32, device=device)
    q = torch.randn(B, Hq, 1, D, generator=g).to(device, dt)

    def contiguous(cache: torch.Tensor) -> torch.Tensor:  # [B, Hkv, L, D] in page-table order
        return cache[table.long()].reshape(B, pages * P, Hkv, D)[:, :L].transpose(1, 2)

    k, v = contiguous(kc).contiguous(), contiguous(vc).contiguous()

    def reference() -> torch.Tensor:
        rd = _ref_dtype(device)
        k0, v0 = (t[:1].to(rd).repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))
        s = q[:1].to(rd) @ k0.transpose(-1, -2) / D ** 0.5
        return torch.softmax(s, dim=-1) @ v0

    def prep_attncc() -> Callable[[], Out]:
        attn = attncc.compile(attncc.Attention(mask=attncc.causal(), memory=attncc.paged(P)))
        plan = attn.plan(batch=B, num_heads=Hq, num_kv_heads=Hkv, head_dim=D,
                         max_pages=pages, dtype=q.dtype, device=device)

        def fn() -> Out:
            attn.run(plan, q, kc, vc, page_table=table, kv_len=kv_len)
            return plan.o.view(B, Hq, 1, D)
        return fn

    def sdpa(backend_name: str) -> Callable[[], Callable[[], Out]]:
        # one query at the end of the sequence sees every key: no mask (is_causal would align
        # the query with key 0)
        return lambda: _sdpa(backend_name, device, lambda: F.scaled_dot_product_attention(
            q, k, v, enable_gqa=True))

    def flex() -> Callable[[], Out]:
        raise Unavailable("not carried: FlexAttention's paged decode needs its PagedAttention "
                          "block-mask conversion")

    impls = {"attncc": prep_attncc, **{n: sdpa(b) for n, b in SDPA_BACKENDS}, "flex": flex}
    return FamilyCase("decode-paged", "decode",
                      "paged decode, causal, Lq = 1; SDPA on a contiguous copy of the cache",
                      {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "page": P, "kv_len": L,
                       "dtype": dtype, "device": device}, dtype, reference, impls)


# ---- gated delta (L6) --------------------------------------------------------------------------

def l6_case(device: str, dry_run: bool) -> FamilyCase:
    """Gated delta rule prefill (L6, chunked kernel), no initial state."""
    B, H, L, D = (1, 2, 64, 16) if dry_run else (2, 16, 16384, 128)
    dtype = "float32" if dry_run else "bfloat16"
    dt = getattr(torch, dtype)
    g_ = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D, generator=g_).to(device, dt)
    k = F.normalize(torch.randn(B, H, L, D, generator=g_), dim=-1).to(device, dt)
    v = torch.randn(B, H, L, D, generator=g_).to(device, dt)
    g = F.logsigmoid(torch.randn(B, H, L, generator=g_) + 3).to(device)  # fp32 log gates
    beta = torch.rand(B, H, L, generator=g_).to(device)
    attn = attncc.compile(attncc.Attention(
        memory=attncc.recurrent_state(update="delta", decay="scalar")))

    def reference() -> torch.Tensor:
        rd = _ref_dtype(device)
        return attn(*(t[:1].to(rd) for t in (q, k, v)), g=g[:1].to(rd), beta=beta[:1].to(rd),
                    backend="reference")

    def prep_attncc() -> Callable[[], Out]:
        return lambda: attn(q, k, v, g=g, beta=beta, backend="triton")

    def prep_fla() -> Callable[[], Out]:
        if importlib.util.find_spec("fla") is None:
            raise Unavailable("flash-linear-attention (fla-core) is not installed")
        if device != "cuda":
            raise Unavailable("dry run: fla's Triton kernels are not run under the interpreter")
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        except ImportError as e:
            raise Unavailable(f"flash-linear-attention does not import: {e}") from None
        bthd = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
        gb, bb = g.transpose(1, 2).contiguous(), beta.transpose(1, 2).to(dt).contiguous()

        def fn() -> Out:
            o, _ = chunk_gated_delta_rule(*bthd, gb, bb, output_final_state=False)
            return o.transpose(1, 2)
        return fn

    return FamilyCase("linear-L6-gated-delta", "linear",
                      "gated delta rule (L6) prefill, chunked; fla chunk_gated_delta_rule",
                      {"B": B, "H": H, "L": L, "D": D, "dtype": dtype, "device": device},
                      dtype, reference, {"attncc": prep_attncc, "fla": prep_fla},
                      {"gates": "g = logsigmoid(N(3, 1)) fp32, beta ~ U(0, 1) fp32"})


# ---- backward ----------------------------------------------------------------------------------

def backward_case(device: str, dry_run: bool) -> FamilyCase:
    """Causal attention, forward + backward (dq, dk, dv) per call."""
    B, H, L, D = (1, 1, 64, 16) if dry_run else (4, 16, 4096, 128)
    dtype = "float16" if dry_run else "bfloat16"
    dt = getattr(torch, dtype)
    g_ = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, H, L, D, generator=g_).to(device, dt) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)

    def grads(o: torch.Tensor) -> Out:
        return torch.autograd.grad(o, (q, k, v), do)

    def reference() -> Out:
        rd = _ref_dtype(device)
        q0, k0, v0 = (t.detach()[:1].to(rd).requires_grad_(True) for t in (q, k, v))
        s = (q0 @ k0.transpose(-1, -2)) / D ** 0.5
        s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=device).tril(), -torch.inf)
        o = torch.softmax(s, dim=-1) @ v0
        return torch.autograd.grad(o, (q0, k0, v0), do[:1].to(rd))

    def prep_attncc() -> Callable[[], Out]:
        attn = attncc.compile(attncc.Attention(mask=attncc.causal()))
        return lambda: grads(attn(q, k, v, backend="triton"))

    def sdpa(backend_name: str) -> Callable[[], Callable[[], Out]]:
        return lambda: _sdpa(backend_name, device, lambda: grads(
            F.scaled_dot_product_attention(q, k, v, is_causal=True)))

    def prep_flex() -> Callable[[], Out]:
        from benchmarks.peers import _compiled_flex
        try:
            from torch.nn.attention.flex_attention import create_block_mask
        except ImportError as e:
            raise Unavailable(f"torch {torch.__version__} has no FlexAttention: {e}") from None
        if device != "cuda":
            raise Unavailable("FlexAttention has no backward on a CPU")
        mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, L, L, device=device)
        flex = _compiled_flex()
        return lambda: grads(flex(q, k, v, block_mask=mask))

    impls = {"attncc": prep_attncc, **{n: sdpa(b) for n, b in SDPA_BACKENDS}, "flex": prep_flex}
    return FamilyCase("backward-causal", "backward",
                      "causal, forward + backward (dq, dk, dv) per call",
                      {"B": B, "H": H, "L": L, "D": D, "dtype": dtype, "device": device},
                      dtype, reference, impls)


FAMILIES: dict[str, Callable[[str, bool], FamilyCase]] = {
    "decode": decode_case, "linear": l6_case, "backward": backward_case}


def run_family(name: str, device: str, dry_run: bool,
               timer: Timer | None) -> Sequence[dict[str, Any]]:
    return [run_case(FAMILIES[name](device, dry_run), timer)]
