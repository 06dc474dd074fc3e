"""The CUDA backend (attncc/backends/cuda) without a GPU, and its GPU tier.

Without a GPU:
- registry and family: "cuda" is a registered backend, "auto" still picks Triton, the family is
  made for every spec without rendering, unsupported plans and signatures say why and name
  the Triton backend;
- nvcc: a representative set of specs (REPRESENTATIVE: causal, sliding window, cu_seqlens
  document, causal + softcap, a traced mask; fp16 and bf16, head dims 64 and 128, sm_80 and
  sm_90a) is rendered, compiled through the backend's own cache path, and its SASS read:
  tensor cores (sm_80: HMMA from mma.sync with ldmatrix (LDSM) operands; sm_90a: HGMMA from
  wgmma, WARPGROUP arrive/wait, FENCE.VIEW.ASYNC), loads (sm_80: cp.async, LDGSTS; sm_90a: K
  and V by TMA, UTMALDG, completing on mbarriers, SYNCS, Q by cp.async), no local-memory spill
  anywhere in the kernel;
- launch: `attncc build --backend cuda` of a manifest, then a new process with the fake CUDA
  driver (benchmarks/fake_cuda.py) loads those cubins and launches them with zero compiles,
  encoding K's and V's TMA tensor maps (their dims, byte strides and boxes are checked); a
  broadcast K (stride 0) asks for the cp.async cubin instead.

nvcc with CuTe takes 10-140 s per cubin on the 2-core CI machine, so nvcc's results are kept
in a cache that outlives the run (ATTNCC_TEST_CUDA_CACHE, default ~/.cache/attncc-test-cuda),
keyed by what nvcc is given: the rendered source, the headers, arch, defines, nvcc and
nvidia-cutlass versions and flags (`memo_nvcc`). attncc's own cache keys also hash attncc's
code, so any edit would miss them; this one misses only when a source really changes. A warm
run compiles nothing (11-30 s for the file); a cold one compiles the 7 cubins of
REPRESENTATIVE and the sm_90a cp.async variant (200 s wall, 124 s CPU on the 2 cores; 185 s
with TMA on sm_90a): CI should keep that directory. The tests that need
nvcc or the nvidia-cutlass headers skip, saying which, when they are missing.

GPU tier (marked `gpu`): every forward catalogue mask and score mod the CUDA kernel supports,
fp16 and bf16, head dims 64 and 128, odd lengths and GQA, against the fp64 reference.
Tolerances (max abs error against fp64 on inputs rounded to the dtype): fp16 o 2e-3, lse 1e-4
(p is rounded to fp16 before p @ v; statistics in fp32); bf16 o 2e-2, lse 1e-3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attncc
from attncc import cli, config
from attncc.backends import keys, registry
from attncc.backends.base import Unsupported
from attncc.backends.cuda import binary, render, toolchain
from benchmarks import sass

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("ATTNCC_TEST_CUDA_CACHE",
                            Path.home() / ".cache" / "attncc-test-cuda"))
CU_SEQLENS = torch.tensor([0, 13, 33, 40], dtype=torch.int32)


def traced_block_causal(b, h, q_idx, kv_idx):
    return (kv_idx // 16) <= (q_idx // 16)


def _missing_toolchain() -> str | None:
    try:
        toolchain.nvcc_path()
        toolchain.cutlass_include()
    except toolchain.ToolchainError as e:
        return str(e)
    return None


needs_nvcc = pytest.mark.skipif(_missing_toolchain() is not None,
                                reason=f"CUDA toolchain missing: {_missing_toolchain()}")

# (id, spec, dtype, head dim, arch): every spec kind once, both dtypes, both head dims, both
# archs; causal fp16 d64 sm_90 is also the manifest the launch test builds
REPRESENTATIVE = [
    ("causal", attncc.Attention(mask=attncc.causal()), "float16", 64, 90),
    ("causal", attncc.Attention(mask=attncc.causal()), "float16", 128, 80),
    ("sliding-window", attncc.Attention(mask=attncc.sliding_window(64)), "bfloat16", 64, 90),
    ("document-cu-seqlens", attncc.Attention(mask=attncc.document(cu_seqlens=CU_SEQLENS)),
     "float16", 64, 80),
    ("softcap", attncc.Attention(mask=attncc.causal(), score=attncc.softcap(30.0)),
     "bfloat16", 128, 90),
    ("traced", attncc.Attention(mask=traced_block_causal), "float16", 128, 90),
    ("traced", attncc.Attention(mask=traced_block_causal), "bfloat16", 64, 80),
]


def test_registered_and_auto_keeps_triton(monkeypatch):
    assert "cuda" in registry.names()
    assert registry.BACKENDS["cuda"].compiles
    assert registry.BACKENDS["cuda"].runs_on(torch.device("cpu")) is not None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert registry.resolve("auto", torch.device("cpu")).name == "triton"
    attn = attncc.compile(attncc.Attention(mask=attncc.causal()))
    assert attn.kernels.backend.name == "triton"  # what "auto" runs
    assert attn.families["cuda"].backend.name == "cuda"


def test_family_is_made_without_rendering():
    before = render.RENDERS[0]
    attn = attncc.compile(attncc.Attention(mask=attncc.sliding_window(77)))
    assert attn.families["cuda"].name.startswith("attn_fwd_cuda_")
    assert render.RENDERS[0] == before  # `attncc.compile` asks every backend: no render


def test_unsupported_plans_and_signatures_name_triton():
    doc = torch.tensor([0] * 5 + [1] * 7, dtype=torch.int32)
    block_map = attncc.compile(attncc.Attention(mask=attncc.document(doc))).families["cuda"]
    assert isinstance(block_map, Unsupported) and "backend='triton'" in str(block_map)
    reordered = attncc.compile(attncc.Attention(
        mask=attncc.neighbourhood_2d(8, 8, 3, 3), reorder=attncc.hilbert((8, 8))))
    assert isinstance(reordered.families["cuda"], Unsupported)
    family = attncc.compile(attncc.Attention(mask=attncc.causal())).families["cuda"]
    backend = family.backend
    for dqk, dv in ((32, 32), (256, 256), (64, 128)):
        with pytest.raises(Unsupported, match=rf"head dims {dqk}/{dv} .*backend='triton'"):
            backend.targets(family, "float16", dqk, dv, 90)
    with pytest.raises(ValueError, match="dtype float32 .*backend='triton'"):
        backend.targets(family, "float32", 64, 64, 90)
    with pytest.raises(Unsupported, match="no backward"):
        backend.targets(family, "float16", 64, 64, 90, backward=True)


def test_cpu_tensors_are_refused_before_any_compile():
    attn = attncc.compile(attncc.Attention(mask=attncc.causal()), backend="cuda")
    q = torch.randn(1, 2, 8, 64).half()
    with pytest.raises(ValueError, match="backend 'cuda': runs on CUDA tensors, got cpu"):
        attn(q, q, q)


def test_rendered_source_lays_out_the_pieces():
    spec = attncc.Attention(mask=attncc.prefix_lm(8) , score=attncc.softcap(20.0))
    family = attncc.compile(spec).families["cuda"]
    text = family.backend.render(family)[0].text
    assert "attncc_kv_range0(" in text and "attncc_kv_range1(" in text  # two pieces
    assert "if ((n >= n_begin0 && n < n_end0)) continue;" in text  # piece 1 skips piece 0's
    assert text.count("fwd.template tile<false>") == 2  # one full-tile loop per exact piece
    assert "attncc_score(qk * sm_scale" in text


def test_cli_explain_shows_the_cuda_source():
    run = subprocess.run([sys.executable, "-m", "attncc", "explain", "causal", "--source",
                          "--backend", "cuda", "--head-dims", "64"], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert "== CUDA source" in run.stdout and "ATTNCC_FORWARD<Traits> fwd(" in run.stdout


def test_launch_packs_tensor_maps_by_value_64_byte_aligned(monkeypatch):
    """cuLaunchKernel gets a pointer per argument; a tensor map's points at its 128 bytes on a
    64-byte boundary (CUtensorMap is alignas(64)), the others at their C values."""
    import ctypes

    from attncc.backends.cuda import driver

    seen = {}

    class Lib:
        def cuLaunchKernel(self, function, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
            seen["params"] = [(params[0], ctypes.c_int32.from_address(params[0]).value),
                              (params[1], ctypes.string_at(params[1], 128)),
                              (params[2], ctypes.c_float.from_address(params[2]).value)]
            return 0

    monkeypatch.setattr(driver, "_libcuda", lambda: Lib())
    tmap = bytes(range(128))
    driver.launch_kernel(driver.LoadedKernel("k", 1, 256, 0), (1, 1, 1), 0,
                         [("i32", 7), ("tmap", tmap), ("f32", 1.5)])
    (_, i), (address, m), (_, f) = seen["params"]
    assert i == 7 and m == tmap and address % 64 == 0 and f == 1.5


def test_tensor_map_allows_only_layouts_tma_can_describe():
    from attncc.backends.cuda import tensor_map

    k = torch.zeros(2, 3, 40, 72, dtype=torch.float16)
    assert tensor_map.allows(k[..., :64])  # row stride 144 bytes: a multiple of 16
    assert not tensor_map.allows(torch.zeros(2, 3, 40, 68, dtype=torch.float16)[..., :64])
    assert not tensor_map.allows(k[:1, ..., :64].expand(2, -1, -1, -1))  # batch stride 0
    assert not tensor_map.allows(k[..., 8:].contiguous()[..., :32])  # 32 dims: half a box
    assert not tensor_map.allows(k[..., :64].float())
    assert not tensor_map.allows(k.view(-1)[1:1 + 2 * 3 * 40 * 64].view(2, 3, 40, 64))  # 2 B off


def test_resource_usage_is_read_from_ptxas():
    log = ("ptxas info    : Function properties for k\n    32 bytes stack frame, 52 bytes "
           "spill stores, 40 bytes spill loads\nptxas info    : Used 255 registers, used 1 "
           "barriers")
    assert toolchain.resource_usage(log) == (255, 92, 32)


@pytest.fixture(scope="module")
def memo_nvcc(tmp_path_factory):
    """`toolchain.compile_cubin` through a cache of its results in CACHE, keyed by its inputs;
    attncc's cache goes to a fresh directory (this fixture's value), so every build below
    still runs attncc's whole build path (render, key, lock, store)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    compile_cubin = toolchain.compile_cubin

    def memo(source, headers, arch, defines):
        key = keys.digest(json.dumps([source, headers, arch, defines, toolchain.versions()],
                                     sort_keys=True))
        cubin, info = CACHE / f"{key}.cubin", CACHE / f"{key}.json"
        if cubin.exists() and info.exists():
            return toolchain.Cubin(cubin.read_bytes(), **json.loads(info.read_text()))
        built = compile_cubin(source, headers, arch, defines)
        for path, data in ((cubin, built.image), (info, json.dumps(
                {f: getattr(built, f) for f in ("registers", "spill_bytes", "stack_bytes",
                                                "log")}).encode())):
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            tmp.replace(path)  # atomic: a racing run reads the whole file or none
        return built

    root = tmp_path_factory.mktemp("cuda-cache")
    with pytest.MonkeyPatch.context() as mp, config.override(ATTNCC_CACHE_DIR=str(root)):
        mp.setattr(toolchain, "compile_cubin", memo)
        yield root


@needs_nvcc
@pytest.mark.parametrize("case", REPRESENTATIVE,
                         ids=[f"{c[0]}-{c[2]}-d{c[3]}-sm{c[4]}" for c in REPRESENTATIVE])
def test_compiles_to_tensor_core_sass_without_spills(case, memo_nvcc):
    _, spec, dtype, d, arch = case
    family = attncc.compile(spec).families["cuda"]
    target, = family.backend.targets(family, dtype, d, d, arch)
    built = family.backend.build(target)
    info = built.info
    assert info["arch"] == arch and info["spill_bytes"] == 0 and info["stack_bytes"] == 0
    text = sass.disassemble(built.cubin, sass.cuobjdump_path())
    assert f"code for {toolchain.NVCC_ARCHS[arch]}\n" in text  # sm_80, or sm_90a for sm_90
    functions = sass.parse_functions(text)
    instrs = functions[target.kernel]
    report = sass.analyse(target.kernel, instrs)
    assert report.total.stl == 0 and report.total.ldl == 0  # no spill in the whole kernel
    assert report.main_loops, "no loop with a tensor-core instruction"
    for _, _, loop in report.main_loops:
        assert loop.stl == 0 and loop.ldl == 0
    mma = {op.split(".")[0] for op in report.total.mma}
    ops = {ins.base for ins in instrs}
    assert "LDGSTS" in ops  # cp.async global->shared (sm_90a: Q only)
    assert target.tma == (arch == 90)
    if arch == 90:  # wgmma for both products: Q K^T 64 x BLOCK_N, P V 64 x d
        # K and V by TMA (one UTMALDG per 64 head dims each), waited for on mbarriers
        assert {"UTMALDG", "SYNCS"} <= ops
        assert sum(ins.base == "UTMALDG" for ins in instrs) >= 2 * d // 64
        assert mma == {"HGMMA"}
        assert {f"HGMMA.64x{target.tiles.block_n}x16.F32", f"HGMMA.64x{d}x16.F32"} <= {
            op.split(".BF16")[0].split(".F16")[0] for op in report.total.mma}, report.total.mma
        assert {"WARPGROUP", "FENCE"} <= ops  # arrive/wait, smem writes -> async proxy
    else:  # mma.sync with ldmatrix operands
        assert mma == {"HMMA"} and "LDSM" in ops and "UTMALDG" not in ops


@needs_nvcc
def test_sm90_cp_async_variant_compiles_without_tma(memo_nvcc):
    """The sm_90a cubin for layouts a tensor map cannot describe (a broadcast K or V): K and V
    by cp.async, still wgmma, no spills."""
    # not causal fp16 d64: the launch test asks for that one offline and expects it missing
    family = attncc.compile(attncc.Attention(mask=attncc.sliding_window(64))).families["cuda"]
    target = family.kernel.target("bfloat16", 64, 64, 90, tma=False)
    assert not target.tma and target.defines()["ATTNCC_TRAITS"] == "attncc::Sm90Traits"
    built = family.backend.build(target)
    assert built.info["spill_bytes"] == 0 and not built.info["tma"]
    instrs = sass.parse_functions(sass.disassemble(built.cubin, sass.cuobjdump_path()))[
        target.kernel]
    ops = {ins.base for ins in instrs}
    assert {"HGMMA", "LDGSTS"} <= ops and "UTMALDG" not in ops
    assert sass.analyse(target.kernel, instrs).total.stl == 0


@needs_nvcc
def test_precompile_of_a_cuda_object_builds_its_cubin(memo_nvcc):
    attn = attncc.compile(attncc.Attention(mask=attncc.causal()), backend="cuda")
    built = attn.precompile("float16", 64, arch="sm_90")
    assert built.info["name"] == attn.families["cuda"].name and built.info["arch"] == 90
    assert built.info["dtype"] == "float16" and built.info["head_dim_qk"] == 64


@needs_nvcc
def test_without_nvcc_a_stored_cubin_is_found_and_a_missing_one_is_an_error(memo_nvcc,
                                                                             monkeypatch):
    family = attncc.compile(attncc.Attention(mask=attncc.causal())).families["cuda"]
    stored, = family.backend.targets(family, "float16", 64, 64, 90)
    key = binary.load_or_build(stored).entry.meta["key"]  # made with nvcc (memo_nvcc)
    monkeypatch.setenv("ATTNCC_NVCC", "/nonexistent/nvcc")
    monkeypatch.setattr(toolchain, "cutlass_version", lambda: "missing")
    found = binary.load_or_build(stored)
    assert not found.built and found.entry.meta["key"] == key
    missing, = family.backend.targets(family, "bfloat16", 128, 128, 80)
    with pytest.raises(binary.NotPrebuiltError, match="cannot be compiled here: nvcc: "
                                                      "/nonexistent/nvcc"):
        binary.load_or_build(missing)


@needs_nvcc
def test_build_then_a_new_process_launches_with_zero_compiles(memo_nvcc, tmp_path, capsys):
    manifest = tmp_path / "manifest.toml"
    manifest.write_text('[[kernel]]\nname = "tiny-causal"\nmask = "causal"\n'
                        'dtypes = ["float16"]\nhead_dims = [64, 256]\n')
    # `attncc build` in this process, so its nvcc calls go through memo_nvcc
    status = cli.main(["build", str(manifest), "--arch", "sm_90", "--backend", "cuda",
                       "--jobs", "1"])
    run = capsys.readouterr()
    assert status == 0, run.out + run.err
    assert "1 not supported by cuda" in run.out  # head dim 256: skipped, said why
    assert "head dims 256/256" in run.err
    cache_root = memo_nvcc
    env = dict(os.environ, ATTNCC_CACHE_DIR=str(cache_root))
    child = subprocess.run([sys.executable, "-m", "tests.cuda_launch_child"], cwd=ROOT,
                           capture_output=True, text=True, check=False,
                           env=dict(env, TRITON_INTERPRET="0", OMP_NUM_THREADS="1"))
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout.strip().splitlines()[-1])
    assert out["compiles"] == 0 and out["cache_builds"] == 0 and out["renders"] == 0
    # one load of the stored cubin, byte for byte, then two launches of it
    family = attncc.compile(attncc.Attention(mask=attncc.causal())).families["cuda"]
    target, = family.backend.targets(family, "float16", 64, 64, 90)
    with config.override(ATTNCC_CACHE_DIR=str(cache_root)):
        built = binary.load_or_build(target)
    import hashlib
    assert [x["sha"] for x in out["loads"]] == [hashlib.sha256(built.cubin).hexdigest()]
    assert out["loads"][0]["name"] == target.kernel
    first, second = out["launches"]
    B, H, L = 2, 4, 200
    assert first["grid"] == [-(-L // 128), B * H, 1] and first["threads"] == 256
    assert target.tma and out["loads"][0]["shared"] == first["smem"]
    assert first["smem"] == binary.smem_bytes(target) == 2 * 64 * (128 + 2 * 32) + 1024
    kinds = [k for k, _ in first["args"]]
    assert kinds == ["ptr"] * 5 + ["i64"] * 12 + ["i32"] * 4 + ["f32"] + ["tmap"] * 2
    assert first["args"][17:21] == [["i32", L], ["i32", L], ["i32", H], ["i32", 2]]
    assert second["args"][4] == ["ptr", 0]  # no lse asked for: a null pointer
    # K's and V's tensor maps, encoded per launch: (d, Lk, Hkv, B) with byte strides of a
    # contiguous [2, 2, 200, 64] fp16 tensor, boxes of 64 dims x BLOCK_N keys, 128-byte swizzle
    assert first["args"][22:] == [["tmap", 0], ["tmap", 1]]
    assert second["args"][22:] == [["tmap", 2], ["tmap", 3]]
    maps = out["tensor_maps"]
    assert len(maps) == 4
    for m in maps:
        assert m == {"data_type": 6, "address": 0, "dims": [64, L, 2, B],
                     "strides": [64 * 2, L * 64 * 2, 2 * L * 64 * 2],
                     "box": [64, target.tiles.block_n, 1, 1], "swizzle": 3, "l2_promotion": 2}
    assert "not in the cache" in out["broadcast_error"] and target.entry_name().removesuffix(
        ".tma") + ")" in out["broadcast_error"], out["broadcast_error"]
    assert "K/V by TMA" not in out["broadcast_error"]
    assert out["offline_error"] and "attncc build MANIFEST --arch sm_90 --backend cuda" in (
        out["offline_error"])
    assert "backend 'cuda'" in out["layout_error"] and "contiguous head dim" in (
        out["layout_error"])


# ---- GPU tier ------------------------------------------------------------------------------

GPU_TOL = {torch.float16: (2e-3, 1e-4), torch.bfloat16: (2e-2, 1e-3)}


def _gpu_cases():
    from tests.catalog_cases import masks, scores

    B, Hq, Lq, Lk = 2, 4, 257, 300
    cases = [(f"mask-{m}", attncc.Attention(mask=mask))
             for m, mask in masks(B, Hq, Lq, Lk).items()]
    cases += [(f"score-{s}", attncc.Attention(mask=attncc.causal(), score=score))
              for s, score in scores(B, Hq, Lq, Lk).items()]
    return cases


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:divide by zero")
@pytest.mark.parametrize("dtype,d", [(torch.float16, 128), (torch.bfloat16, 64)])
def test_gpu_forward_catalogue_against_fp64(dtype, d):
    from attncc.backends.reference.forward import attention_reference

    B, Hq, Hkv, Lq, Lk = 2, 4, 2, 257, 300
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, Lq, d, generator=g).to(dtype).cuda()
    k = torch.randn(B, Hkv, Lk, d, generator=g).to(dtype).cuda()
    v = torch.randn(B, Hkv, Lk, d, generator=g).to(dtype).cuda()
    ran, failures = 0, []
    for name, spec in _gpu_cases():
        attn = attncc.compile(spec)
        if isinstance(attn.families["cuda"], Unsupported):
            continue  # block maps and reorders: said so by test_unsupported_...
        ran += 1
        o, lse = attn(q, k, v, return_lse=True, backend="cuda")
        ro, rl = attention_reference(spec, q.double().cpu(), k.double().cpu(),
                                     v.double().cpu(), q_chunk=64, kv_chunk=64)
        o_tol, lse_tol = GPU_TOL[dtype]
        try:
            torch.testing.assert_close(o.double().cpu(), ro, atol=o_tol, rtol=o_tol)
            torch.testing.assert_close(lse.double().cpu(), rl, atol=lse_tol, rtol=lse_tol)
        except AssertionError as e:
            failures.append(f"{name}: {str(e).splitlines()[0]}")
    assert ran >= 10 and not failures, failures


@pytest.mark.gpu
def test_gpu_non_finite_value_reaches_only_rows_that_see_its_key():
    """docs/semantics.md "Non-finite inputs": a nan in v_j poisons exactly the rows the mask
    lets see key j (the masked tile's probe), whatever the tiling."""
    B, H, L, d = 1, 2, 300, 64
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, L, d, generator=g).half().cuda() for _ in range(3))
    j = 150
    v[:, :, j, 3] = float("nan")
    attn = attncc.compile(attncc.Attention(mask=attncc.causal()))
    o = attn(q, k, v, backend="cuda")
    assert torch.isfinite(o[:, :, :j]).all()  # rows before j never see key j
    assert torch.isnan(o[:, :, j:, 3]).all()
