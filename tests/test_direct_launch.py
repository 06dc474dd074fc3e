"""Prebuilt binaries launch without Triton's JIT (issue 6, "runtime use of prebuilt kernels").

On a CPU: kernels are built for sm_90 here, then `direct_launch_child.py` runs in a new process
with a fake CUDA driver. It checks that:
- forward and block-map launches load the cache entries into Triton's `CompiledKernel` (the
  stored cubin, byte for byte) with zero compiles;
- the arguments the launcher gets line up, in order and width, with the cubin's parameter list
  read from its PTX (unit strides dropped: they are constexprs of the contiguous variant);
- a launch that needs a variant nobody built raises under ATTNCC_OFFLINE=1, else compiles it
  once with one log line;
- a wrong constexpr or an integer too wide for i32 is refused before any launch.
The GPU test at the end runs the same path on a real GPU and checks the output.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attncc
from attncc import config
from attncc.backends.triton import build, prebuilt
from attncc.backends.triton.launch_spec import (ALIGNED, DEFAULT_VARIANT, UNIT_STRIDES, Variant,
                                         check_int_arguments, choose_variant)

HERE = Path(__file__).resolve().parent
PTX_PARAM = re.compile(r"\.param \.(u64|u32|f32|u8|u16)\b")
ARG_WIDTH = {"ptr": "u64", "int": "u32", "float": "f32"}
DOC = torch.tensor([0] * 13 + [1] * 20 + [2] * 7, dtype=torch.int32)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """sm_90 fp16 d32 binaries of a causal forward and of a document mask's forward and
    block-map kernels (the default variant, as `attncc build` makes them)."""
    root = tmp_path_factory.mktemp("direct-cache")
    with config.override(ATTNCC_CACHE_DIR=str(root)):
        causal = attncc.compile(attncc.Attention(mask=attncc.causal())).kernels.kernel
        document = attncc.compile(attncc.Attention(mask=attncc.document(DOC))).kernels.kernel
        targets = [t for fwd in (causal, document)
                   for t in build.build_targets(fwd, "float16", 32, 32, 90, backward=True)]
        entries = {(t.spec.name, t.kind, t.spec.schedule.block_m):
                   prebuilt.load_or_compile_target(t) for t in targets}
    return {"root": root, "entries": entries}


@pytest.fixture(scope="module")
def child(built) -> dict:
    env = dict(os.environ, ATTNCC_CACHE_DIR=str(built["root"]), TRITON_INTERPRET="0",
               TRITON_CACHE_DIR=str(built["root"] / "triton"), OMP_NUM_THREADS="1")
    env.pop("ATTNCC_OFFLINE", None)
    run = subprocess.run([sys.executable, "-m", "tests.direct_launch_child"], env=env,
                         cwd=HERE.parent, capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def ptx_parameters(entry: prebuilt.Prebuilt) -> list[str]:
    ptx = entry.artifact.ptx
    header = ptx[ptx.index(".entry"):ptx.index(")", ptx.index(".entry"))]
    return PTX_PARAM.findall(header)


def by_hash(built) -> dict[str, prebuilt.Prebuilt]:
    """Entries by the hash in their Triton metadata (what a launch reports)."""
    return {json.loads(e.entry.files["triton.json"].read_text())["hash"]: e
            for e in built["entries"].values()}


def test_prebuilt_binaries_launch_with_zero_compiles(built, child):
    record = child["prebuilt"]
    assert record["compiles"] == {"triton.compile": 0, "compile_in_child": 0}
    assert record["cache_builds"] == 0 and record["logged"] == []
    # each binary is loaded once per process, and it is the stored cubin
    entries = by_hash(built)
    cubins = {hashlib.sha256(e.artifact.cubin).hexdigest(): e for e in entries.values()}
    for load in record["loads"]:
        assert cubins[load["sha"]].artifact.shared_bytes == load["shared"]
        assert cubins[load["sha"]].artifact.name == load["name"]
    # causal twice (loaded once), then the document mask's block map before its forward
    kinds = [entries[launch["hash"]].entry.meta["kind"] for launch in record["launches"]]
    assert kinds == ["forward", "forward", "block_map", "forward"]
    assert len(record["loads"]) == 3
    names = [launch["name"] for launch in record["launches"]]
    assert names[0] == names[1] != names[3]


def test_another_spelling_of_a_spec_launches_its_binary_offline(built, child):
    """`causal() & causal()` has causal()'s canonical key: under ATTNCC_OFFLINE=1 it launches
    the stored causal binary (its symbol name read from the binary's metadata)."""
    record = child["respelt"]
    assert record["compiles"] == {"triton.compile": 0, "compile_in_child": 0}
    assert record["logged"] == []
    (launch,) = record["launches"]
    stored = by_hash(built)[launch["hash"]]
    assert stored.entry.meta["kind"] == "forward" and launch["name"] == stored.artifact.name
    assert record["name"].startswith("attn_fwd_causal_causal_")  # its own readable name ...
    assert stored.artifact.name != record["name"]  # ... not the binary's (built for causal())


def test_the_backward_kernels_launch_prebuilt_too(built, child):
    record = child["backward"]
    assert record["compiles"] == {"triton.compile": 0, "compile_in_child": 0}
    assert record["cache_builds"] == 0 and record["logged"] == []
    entries = by_hash(built)
    launched = [entries[launch["hash"]] for launch in record["launches"]]
    # causal: forward, dq, dk/dv; document: forward (its map is cached from before), the map
    # at the backward's tiles, dq, dk/dv
    assert [e.entry.meta["kind"] for e in launched] == [
        "forward", "dq", "dkdv", "forward", "block_map", "dq", "dkdv"]
    forward_map, backward_map = (e for e in entries.values()
                                 if e.entry.meta["kind"] == "block_map")
    assert launched[4].artifact.schedule.block_m == backward_map.artifact.schedule.block_m
    assert backward_map.artifact.schedule != forward_map.artifact.schedule


def test_launch_arguments_match_the_binarys_parameters(built, child):
    """Order and width of every non-constexpr argument against the PTX entry's parameters
    (Triton appends two scratch pointers of its own), for all four kinds of kernel."""
    entries = by_hash(built)
    launches = child["prebuilt"]["launches"] + child["backward"]["launches"]
    for launch in launches:
        params = ptx_parameters(entries[launch["hash"]])
        widths = [ARG_WIDTH[kind] for kind, _ in launch["args"]]
        assert widths + ["u64", "u64"] == params, launch["name"]
        assert launch["function"] == 2  # the handle load_binary returned
    forward = child["prebuilt"]["launches"][0]
    ints = [value for kind, value in forward["args"] if kind == "int"]
    # q/k/v/o [1, 2, 40, 32] contiguous: the unit head-dim strides are constexprs, not passed
    assert ints == [2560, 1280, 32] * 4 + [40, 40, 2, 2]
    assert forward["grid"][1:] == [2, 1] and forward["grid"][0] >= 1
    pointers = [misalign for kind, misalign in forward["args"] if kind == "ptr"]
    assert len(pointers) == 6 and set(pointers) == {0}  # Q K V O LSE VISITS, 16-byte aligned
    dq = child["backward"]["launches"][1]
    assert [v for kind, v in dq["args"] if kind == "int"][-4:] == [40, 40, 2, 2]


def test_a_missing_variant_raises_offline_else_compiles_once_with_a_log_line(child):
    error = child["offline_error"]
    assert error is not None and "ATTNCC_OFFLINE=1" in error and ".strided" in error
    strided = child["strided"]
    assert strided["compiles"] == {"triton.compile": 0, "compile_in_child": 1}
    assert len(strided["logged"]) == 1 and "not prebuilt" in strided["logged"][0]
    assert ".strided" in strided["logged"][0]
    ints = [value for kind, value in strided["launches"][0]["args"] if kind == "int"]
    assert ints[:4] == [2560, 1280, 1, 40]  # q's head-dim stride (40) is passed now
    assert len(strided["launches"]) == 2


def test_a_row_stride_that_is_no_multiple_of_16_gets_its_own_variant(built, child):
    """The default binary assumes every stride a multiple of 16 (so its loads are 16-byte
    vectors); a launch whose q rows are 40 elements apart must not run it: it compiles the
    ".oddstrides" variant once (a log line), with that stride passed, then reuses it."""
    odd = child["oddstrides"]
    assert odd["compiles"]["compile_in_child"] == child["strided"]["compiles"][
        "compile_in_child"] + 1
    assert len(odd["logged"]) == len(child["strided"]["logged"]) + 1
    assert ".oddstrides" in odd["logged"][-1] and ".strided" not in odd["logged"][-1]
    first, second = odd["launches"]
    assert first["hash"] == second["hash"] not in by_hash(built)
    ints = [value for kind, value in first["args"] if kind == "int"]
    assert ints[:6] == [3200, 1600, 40, 2560, 1280, 32]  # unit head-dim strides: constexprs


def test_a_launch_that_does_not_fit_the_binary_is_refused(child):
    constexpr, wide = child["refused"]
    assert "constexpr D_QK is 32 in the prebuilt binary, the launch passes 64" in constexpr
    assert "stride_qb = 2147483648 does not fit" in wide


def test_choose_variant_follows_alignment_strides_and_integer_range():
    t = torch.empty(64, dtype=torch.float16)
    base = {name: t for name in ALIGNED} | {name: 1 for name in UNIT_STRIDES}

    def choose(changes, **flags):
        return choose_variant(base | changes, ALIGNED, UNIT_STRIDES, **flags)

    assert choose({}) == DEFAULT_VARIANT
    assert not choose({"K": t[1:]}).contiguous  # 2 bytes past a 16-byte boundary
    assert not choose({"stride_vd": 3}).contiguous
    wide = choose({"stride_qb": 2**31}, write_lse=False, gather_rows=False)
    assert wide == Variant(write_lse=False, gather_rows=False, wide_ints=True)
    assert wide.suffix() == ".nolse.permuted.i64" and DEFAULT_VARIANT.suffix() == ""
    with pytest.raises(ValueError, match="argument Lq = -2147483649 does not fit"):
        check_int_arguments("k", [("Lq", "i32")], {"Lq": -2**31 - 1})
    check_int_arguments("k", [("Lq", "i64")], {"Lq": 2**40})  # a 64-bit argument takes it


def test_variants_are_separate_entries(built):
    causal = next(e for (name, kind, _), e in built["entries"].items()
                  if kind == "forward" and name.startswith("attn_fwd_causal"))
    assert causal.entry.meta["variant"] == {"write_lse": True, "gather_rows": True,
                                            "contiguous": True, "wide_ints": False,
                                            "divisible": True}
    assert "triton.json" in causal.entry.files
    with config.override(ATTNCC_CACHE_DIR=str(built["root"])):
        fwd = attncc.compile(attncc.Attention(mask=attncc.causal())).kernels.kernel
        keys = {prebuilt.artifact_key(fwd, "forward", 90, "float16", 32, 32, variant)
                for variant in (DEFAULT_VARIANT, Variant(contiguous=False),
                                Variant(wide_ints=True), Variant(divisible=False))}
    assert len(keys) == 4 and causal.entry.meta["key"] in keys


@pytest.mark.gpu
def test_on_a_gpu_built_kernels_run_with_zero_compiles_and_are_correct(tmp_path):
    """On a real GPU: precompile forward and backward for this GPU, then a new process with every
    compiler refused trains one step and matches the fp64 reference (fp16: o within 2e-3,
    dq/dk/dv within 2e-2)."""
    from tests.test_prebuilt import env_for
    script = (
        "import torch, triton, attncc\n"
        "from attncc.backends.triton import aot as triton_aot\n"
        "def refuse(*a, **k): raise AssertionError('a compiler was called')\n"
        "triton.compile = triton_aot.compile_in_child = refuse\n"
        "from attncc.backends.reference.forward import attention_reference\n"
        "attn = attncc.compile(attncc.Attention(mask=attncc.causal()))\n"
        "g = torch.Generator(device='cuda').manual_seed(0)\n"
        "q, k, v, do = (torch.randn(2, 4, 333, 64, device='cuda', generator=g)"
        ".half() for _ in range(4))\n"
        "q, k, v = (t.requires_grad_() for t in (q, k, v))\n"
        "o = attn(q, k, v)\n"
        "o.backward(do)\n"
        "q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))\n"
        "ref, _ = attention_reference(attn.spec, q64, k64, v64)\n"
        "ref.backward(do.double())\n"
        "errors = [float((a.detach().double() - b.detach()).abs().max()) for a, b in "
        "((o, ref), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad))]\n"
        "print(errors)\n")
    attn = attncc.compile(attncc.Attention(mask=attncc.causal()))
    with config.override(ATTNCC_CACHE_DIR=str(tmp_path)):
        attn.precompile("float16", 64, backward=True)
    run = subprocess.run([sys.executable, "-c", script], env=env_for(tmp_path), cwd=HERE.parent,
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    o_error, *grad_errors = json.loads(run.stdout.strip().splitlines()[-1])
    assert o_error < 2e-3 and max(grad_errors) < 2e-2, (o_error, grad_errors)


def test_build_targets_add_the_permuted_forward_and_the_backward_kernels():
    plain = attncc.compile(attncc.Attention(mask=attncc.causal())).kernels.kernel
    document = attncc.compile(attncc.Attention(mask=attncc.document(DOC))).kernels.kernel
    hilbert = attncc.compile(attncc.Attention(
        mask=attncc.neighbourhood_2d(8, 8, 3, 3), reorder=attncc.hilbert((8, 8)))).kernels.kernel

    def described(forward, **kw):
        return [(t.kind, t.variant, t.spec.schedule.block_m, t.spec.schedule.block_n)
                for t in build.build_targets(forward, "float16", 64, 64, 90, **kw)]

    assert described(plain) == [("forward", DEFAULT_VARIANT, 128, 64)]
    assert described(document) == [("forward", DEFAULT_VARIANT, 128, 64),
                                   ("block_map", DEFAULT_VARIANT, 128, 64)]
    assert [k for k, *_ in described(hilbert)][:2] == ["forward", "forward"]
    assert described(hilbert)[1][1] == Variant(gather_rows=False)
    # training: dq and dkdv, and the block map again at dk/dv's tiles (dq's, 128 x 64 on
    # sm_90, are the forward's: its map serves dq too)
    kinds = described(document, backward=True)
    assert [k for k, *_ in kinds] == ["forward", "block_map", "dq", "dkdv", "block_map"]
    assert kinds[2][2:] == kinds[1][2:] != kinds[3][2:] == kinds[4][2:]
    # sm_80: dq at 128 x 32, dk/dv at 32 x 128, a map at each
    tiles = [(t.kind, t.spec.schedule.block_m, t.spec.schedule.block_n)
             for t in build.build_targets(document, "float16", 64, 64, 80, backward=True)]
    assert tiles == [("forward", 128, 64), ("block_map", 128, 64), ("dq", 128, 32),
                     ("dkdv", 32, 128), ("block_map", 128, 32), ("block_map", 32, 128)]
