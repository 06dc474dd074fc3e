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
from attncc import config, prebuilt
from attncc.backends.launch_spec import (DEFAULT_VARIANT, ForwardVariant, check_int_arguments,
                                         forward_variant)

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
        causal = attncc.compile(attncc.Attention(mask=attncc.causal())).triton
        document = attncc.compile(attncc.Attention(mask=attncc.document(DOC))).triton
        entries = {(fwd.name, kind): prebuilt.load_or_compile(fwd, kind, "float16", 32, 32, 90)
                   for fwd in (causal, document) for kind in prebuilt.kinds(fwd)}
    return {"root": root, "entries": entries}


@pytest.fixture(scope="module")
def child(built) -> dict:
    env = dict(os.environ, ATTNCC_CACHE_DIR=str(built["root"]), TRITON_INTERPRET="0",
               TRITON_CACHE_DIR=str(built["root"] / "triton"), OMP_NUM_THREADS="1")
    env.pop("ATTNCC_OFFLINE", None)
    run = subprocess.run([sys.executable, str(HERE / "direct_launch_child.py")], env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def ptx_parameters(entry: prebuilt.Prebuilt) -> list[str]:
    ptx = entry.artifact.ptx
    header = ptx[ptx.index(".entry"):ptx.index(")", ptx.index(".entry"))]
    return PTX_PARAM.findall(header)


def test_prebuilt_binaries_launch_with_zero_compiles(built, child):
    record = child["prebuilt"]
    assert record["compiles"] == {"triton.compile": 0, "compile_in_child": 0}
    assert record["cache_builds"] == 0 and record["logged"] == []
    # each binary is loaded once per process, and it is the stored cubin
    by_name = {name: entry for (name, kind), entry in built["entries"].items()
               if kind == "forward"}
    by_name |= {entry.artifact.name: entry for (_, kind), entry in built["entries"].items()
                if kind == "block_map"}
    assert sorted(load["name"] for load in record["loads"]) == sorted(by_name)
    for load in record["loads"]:
        art = by_name[load["name"]].artifact
        assert load["sha"] == hashlib.sha256(art.cubin).hexdigest()
        assert load["shared"] == art.shared_bytes
    # causal twice, then the document mask's block map before its forward
    names = [launch["name"] for launch in record["launches"]]
    causal, document = (f for f, kind in built["entries"] if kind == "forward")
    block_map = next(e.artifact.name for (_, kind), e in built["entries"].items()
                     if kind == "block_map")
    assert names == [causal, causal, block_map, document]


def test_launch_arguments_match_the_binarys_parameters(built, child):
    """Order and width of every non-constexpr argument against the PTX entry's parameters
    (Triton appends two scratch pointers of its own)."""
    entries = {e.artifact.name: e for e in built["entries"].values()}
    for launch in child["prebuilt"]["launches"]:
        params = ptx_parameters(entries[launch["name"]])
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


def test_a_launch_that_does_not_fit_the_binary_is_refused(child):
    constexpr, wide = child["refused"]
    assert "constexpr D_QK is 32 in the prebuilt binary, the launch passes 64" in constexpr
    assert "stride_qb = 2147483648 does not fit" in wide


def test_forward_variant_follows_alignment_strides_and_integer_range():
    t = torch.empty(64, dtype=torch.float16)
    aligned = {name: t for name in ("Q", "K", "V", "O", "LSE", "VISITS")}
    unit = {f"stride_{x}d": 1 for x in "qkvo"}
    assert forward_variant(aligned, unit, write_lse=True, gather_rows=True) == DEFAULT_VARIANT
    shifted = aligned | {"K": t[1:]}  # 2 bytes past a 16-byte boundary
    assert not forward_variant(shifted, unit, write_lse=True, gather_rows=True).contiguous
    assert not forward_variant(aligned, unit | {"stride_vd": 3}, write_lse=True,
                               gather_rows=True).contiguous
    wide = forward_variant(aligned, unit | {"stride_qb": 2**31}, write_lse=False,
                           gather_rows=False)
    assert wide == ForwardVariant(write_lse=False, gather_rows=False, wide_ints=True)
    assert wide.suffix() == ".nolse.permuted.i64" and DEFAULT_VARIANT.suffix() == ""
    with pytest.raises(ValueError, match="argument Lq = -2147483649 does not fit"):
        check_int_arguments("k", [("Lq", "i32")], {"Lq": -2**31 - 1})
    check_int_arguments("k", [("Lq", "i64")], {"Lq": 2**40})  # a 64-bit argument takes it


def test_variants_are_separate_entries(built):
    causal = next(e for (f, kind), e in built["entries"].items()
                  if kind == "forward" and f.startswith("attn_fwd_causal"))
    assert causal.entry.meta["variant"] == {"write_lse": True, "gather_rows": True,
                                            "contiguous": True, "wide_ints": False}
    assert "triton.json" in causal.entry.files
    with config.override(ATTNCC_CACHE_DIR=str(built["root"])):
        fwd = attncc.compile(attncc.Attention(mask=attncc.causal())).triton
        keys = {prebuilt.artifact_key(fwd, "forward", 90, "float16", 32, 32, variant)
                for variant in (DEFAULT_VARIANT, ForwardVariant(contiguous=False),
                                ForwardVariant(wide_ints=True))}
    assert len(keys) == 3


@pytest.mark.gpu
def test_on_a_gpu_a_built_kernel_runs_with_zero_compiles_and_is_correct(tmp_path):
    """On a real GPU: precompile for this GPU, then a new process with every compiler refused
    launches the binary and matches the fp64 reference (fp16 tolerance 2e-3)."""
    from tests.test_prebuilt import env_for
    script = (
        "import torch, triton, attncc\n"
        "from attncc.backends import triton_aot\n"
        "def refuse(*a, **k): raise AssertionError('a compiler was called')\n"
        "triton.compile = triton_aot.compile_in_child = refuse\n"
        "from attncc.backends.reference import attention_reference\n"
        "attn = attncc.compile(attncc.Attention(mask=attncc.causal()))\n"
        "q, k, v = (torch.randn(2, 4, 333, 64, device='cuda', dtype=torch.float16)"
        " for _ in range(3))\n"
        "o = attn(q, k, v)\n"
        "ref, _ = attention_reference(attn.spec, q.double(), k.double(), v.double())\n"
        "print(float((o.double() - ref).abs().max()))\n")
    attn = attncc.compile(attncc.Attention(mask=attncc.causal()))
    with config.override(ATTNCC_CACHE_DIR=str(tmp_path)):
        attn.precompile("float16", 64)
    run = subprocess.run([sys.executable, "-c", script], env=env_for(tmp_path), cwd=HERE.parent,
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    assert float(run.stdout.strip().splitlines()[-1]) < 2e-3


def test_build_targets_add_the_permuted_forward_for_a_reordered_spec():
    plain = attncc.compile(attncc.Attention(mask=attncc.causal())).triton
    document = attncc.compile(attncc.Attention(mask=attncc.document(DOC))).triton
    hilbert = attncc.compile(attncc.Attention(
        mask=attncc.neighbourhood_2d(8, 8, 3, 3), reorder=attncc.hilbert((8, 8)))).triton
    assert prebuilt.build_targets(plain) == [("forward", DEFAULT_VARIANT)]
    assert prebuilt.build_targets(document) == [("forward", DEFAULT_VARIANT),
                                                ("block_map", DEFAULT_VARIANT)]
    assert prebuilt.build_targets(hilbert)[:2] == [
        ("forward", DEFAULT_VARIANT), ("forward", ForwardVariant(gather_rows=False))]
