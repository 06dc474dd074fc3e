"""The `attncc` command line: build, explain, cache, bench, and manifest validation.

Commands that compile run as `python -m attncc ...` subprocesses with their own cache dir; the
cheap ones (help, argument errors, cache info/clean) call `attncc.cli.main` in-process. One
kernel is compiled in this module (causal, fp16, head dim 16, sm_90).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attncc
from attncc.backends import cache
from attncc.cli import main
from attncc.manifest import ManifestError, load_manifest

REPO = Path(__file__).resolve().parents[1]
GOOD = 'name = "ok"\nmask = "causal"\ndtypes = ["float16"]\nhead_dims = [16]\n'
BAD = {  # entry name -> (TOML body, the field its error names, words the error must contain)
    "bad-import": ('spec = "no_such_module_xyz.attention:spec"', "spec",
                   "cannot import 'no_such_module_xyz.attention:spec'"),
    "bad-attr": ('spec = "attncc.library.masks:no_such_spec"', "spec", "has no attribute 'no_such_spec'"),
    "bad-catalogue": ('mask = "causl"', "mask", "unknown catalogue mask 'causl'; did you mean "
                                                "'causal'?"),
    "bad-head-dim": ('mask = "causal"\nhead_dims = [300]', "head_dims",
                     "head dim 300 is not supported (1..256)"),
    "bad-arch": ('mask = "causal"\narchs = ["sm_75"]', "archs", "unknown arch 'sm_75'"),
    "bad-dtype": ('mask = "causal"\ndtypes = ["float8"]', "dtypes", "unknown dtype 'float8'"),
    "bad-backward": ('mask = "causal"\nbackward = "yes"', "backward",
                     "expected true or false, got 'yes'"),
}


def env_for(root: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, ATTNCC_CACHE_DIR=str(root), TRITON_CACHE_DIR=str(root / "triton"),
               OMP_NUM_THREADS="1")
    env.pop("ATTNCC_OFFLINE", None)
    env.update(extra)
    return env


def attncc_cli(*args: str, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attncc", *args], env=env_for(root), cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def write_manifest(path: Path, entries: dict[str, str]) -> Path:
    path.write_text("\n".join(f'[[kernel]]\nname = "{name}"\n{body}\n'
                              for name, body in entries.items()))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`attncc build --out DIR` of a manifest with one good entry and every kind of bad one."""
    tmp = tmp_path_factory.mktemp("cli")
    manifest = tmp / "manifest.toml"
    manifest.write_text(f"[[kernel]]\n{GOOD}\n" + "\n".join(
        f'[[kernel]]\nname = "{name}"\n{body}\n' for name, (body, _, _) in BAD.items()))
    root = tmp / "cache"
    run = subprocess.run(
        [sys.executable, "-m", "attncc", "build", str(manifest), "--arch", "sm_90", "--jobs",
         "2", "--out", str(root)], env=env_for(tmp / "not-this-one"), cwd=REPO,
        capture_output=True, text=True, timeout=300)
    return root, run


def kernel_name() -> str:
    return attncc.compile(attncc.Attention(mask=attncc.causal())).name


def test_help_for_every_command(capsys):
    run = subprocess.run([sys.executable, "-m", "attncc", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and all(c in run.stdout for c in ("build", "explain", "cache",
                                                                 "bench"))
    script = Path(sys.executable).parent / "attncc"
    if script.exists():  # the console script, when the package is installed
        run = subprocess.run([str(script), "cache", "--help"], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0 and "usage: attncc cache" in run.stdout
    for argv in (["build"], ["explain"], ["cache"], ["cache", "ls"], ["cache", "info"],
                 ["cache", "verify"], ["cache", "clean"], ["bench"]):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--help"])
        assert exit_.value.code == 0
        assert f"usage: attncc {' '.join(argv)}" in capsys.readouterr().out


def test_bad_entries_are_one_line_each_and_the_good_one_builds(built):
    root, run = built
    assert run.returncode == 1, run.stderr
    assert re.search(r"1 built, 0 cached, 0 failed, 7 bad entries \(1 kernels\)", run.stdout)
    assert not (root.parent / "not-this-one").exists()  # --out chose the cache dir
    errors = [line for line in run.stderr.splitlines() if line.startswith("attncc build: error")]
    assert len(errors) == len(BAD), run.stderr
    for name, (_, field, words) in BAD.items():
        (line,) = [e for e in errors if f"kernel {name!r}:" in e]
        assert f"field {field!r}: " in line and words in line, line
    assert re.search(r"^\[1/1\] ok sm90 fp16 d16 built \d+\.\ds$", run.stderr, re.MULTILINE)
    listing = attncc_cli("cache", "ls", root=root)
    assert listing.returncode == 0
    (row,) = [r for r in listing.stdout.splitlines() if f"{kernel_name()}.sm90.fp16.d16-" in r]
    assert re.search(r"forward\s+sm_90 fp16 d16\s+\d+\.\d KiB", row), row
    (source,) = [r for r in listing.stdout.splitlines() if " source " in r]
    assert "compiled for sm_90" in source


def test_backward_true_builds_the_gradient_kernels_too(tmp_path):
    manifest = write_manifest(tmp_path / "m.toml", {
        "train": 'mask = "causal"\ndtypes = ["float16"]\nhead_dims = [16]\nbackward = true'})
    run = attncc_cli("build", str(manifest), "--arch", "sm_90", "--jobs", "2",
                     root=tmp_path / "cache")
    assert run.returncode == 0, run.stderr
    assert re.search(r"3 built, 0 cached, 0 failed, 0 bad entries \(3 kernels\)", run.stdout)
    for label in ("train sm90", "train/dq sm90", "train/dkdv sm90"):
        assert re.search(rf"\] {re.escape(label)} fp16 d16 built", run.stderr), run.stderr
    kinds = sorted(e.meta.get("kind", "source") for e in cache.list_entries(tmp_path / "cache"))
    assert kinds == ["backward", "dkdv", "dq", "forward", "source"]  # + the two sources
    listing = attncc_cli("cache", "ls", root=tmp_path / "cache")  # a backward source lists too
    assert listing.returncode == 0, listing.stderr
    assert len(re.findall(r" source +compiled for sm_90", listing.stdout)) == 2, listing.stdout


def test_cache_info_verify_clean(built, tmp_path, capsys):
    root = tmp_path / "cache"
    shutil.copytree(built[0], root)
    assert main(["cache", "--dir", str(root), "info"]) == 0
    info = capsys.readouterr().out
    assert "entries   2: 1 sources, 1 compiled kernels, 0 corrupt" in info
    assert "targets   sm_90: 1" in info and f"triton {__import__('triton').__version__}" in info
    assert main(["cache", "verify", "--dir", str(root)]) == 0
    assert "2 entries ok, 0 bad" in capsys.readouterr().out

    (entry,) = [e for e in cache.list_entries(root) if e.meta.get("kind") == "forward"]
    cubin = bytearray(entry.files["kernel.cubin"].read_bytes())
    cubin[100] ^= 0xFF
    entry.files["kernel.cubin"].write_bytes(bytes(cubin))
    run = attncc_cli("cache", "verify", root=root)
    assert run.returncode == 1
    assert f"BAD {entry.path.name}: kernel.cubin does not match its size or sha256" in run.stdout
    assert "1 entries ok, 1 bad" in run.stdout and entry.path.name in run.stderr
    assert main(["cache", "ls", "--dir", str(root)]) == 0
    assert re.search(rf"{entry.path.name}\s+CORRUPT", capsys.readouterr().out)

    assert main(["cache", "clean", "--dir", str(root), "--older-than", "9999"]) == 0
    assert "removed 0 entries older than 9999 days" in capsys.readouterr().out
    assert len(cache.inspect_all(root)) == 2
    assert main(["cache", "clean", "--dir", str(root), "--older-than", "0"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert list((root / "kernels").iterdir()) == [] and (root / "locks").is_dir()
    assert main(["cache", "ls", "--dir", str(root)]) == 0
    assert "(no entries in" in capsys.readouterr().out


def test_command_line_errors_are_one_line(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.toml", {"ok": 'mask = "causal"'})
    for argv, words in (
            (["build", str(manifest), "--arch", "sm_75"],
             "--arch: unknown arch 'sm_75' (supported: sm_80, sm_86, sm_89, sm_90)"),
            (["build", str(tmp_path / "missing.toml")], "cannot read it"),
            (["build", str(manifest), "--jobs", "0"], "--jobs: expected >= 1"),
            (["explain", "causal", "--shape", "64"], "--shape: expected two ints"),
            (["cache", "--dir", str(tmp_path), "clean", "--older-than", "-1"], "DAYS >= 0")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and words in err, (argv, err)
    (tmp_path / "bad.toml").write_text("[[kernel]\nname = ")
    assert main(["build", str(tmp_path / "bad.toml")]) == 2
    assert "not valid TOML" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_bench_refuses_without_a_gpu(tmp_path):
    run = attncc_cli("bench", str(REPO / "examples" / "manifest.toml"), root=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip() == ("attncc bench: no CUDA GPU here; refusing to print "
                                  "meaningless numbers (--smoke checks the entries on the CPU "
                                  "without timing them)")
    assert run.stdout == ""


def test_explain_prints_the_passes_tiles_and_source(tmp_path):
    run = attncc_cli("explain", "sliding_window(64)", "--score", "softcap(30.0)", "--shape",
                     "256,256", "--arch", "sm_90", "--source", root=tmp_path)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for section in ("== input", "== choose-reorder", "== canonicalize", "== classify-tiles",
                    "== choose-tile-source", "== tile map Lq=256 Lk=256 tiles 64x64",
                    "== tiles per signature", "== triton source"):
        assert section in out, section
    assert re.search(r"^float16 d128/128 sm90: block_m=128, block_n=64", out, re.MULTILINE)
    assert re.search(r"^bfloat16 d128/128 sm90: ", out, re.MULTILINE)
    name = attncc.compile(attncc.Attention(mask=attncc.sliding_window(64),
                                           score=attncc.softcap(30.0))).name
    assert "@triton.jit" in out and f"def {name}(" in out


def test_explain_a_manifest(tmp_path, capsys):
    (tmp_path / "mymodel_attn.py").write_text(textwrap.dedent("""
        import attncc

        def spec():
            return attncc.Attention(mask=attncc.chunked(128), score=attncc.alibi())
    """))
    manifest = write_manifest(tmp_path / "m.toml", {
        "llama": 'mask = "causal"\nhead_dims = [64, [192, 128]]\nshapes = [[1, 8, 2, 256]]',
        "mine": 'spec = "mymodel_attn:spec"\ndtypes = ["bf16"]',
        "broken": 'mask = "causal"\nscore = "softcapp"',
    })
    assert main(["explain", str(manifest), "--arch", "sm_80"]) == 1
    out, err = capsys.readouterr()
    assert "### llama" in out and "### mine" in out and "### broken" not in out
    assert "== tile map Lq=256 Lk=256" in out  # the entry's first shape
    assert "float16 d64/64 sm80: " in out and "float16 d192/128 sm80: " in out
    assert "bfloat16 d128/128 sm80: " in out and "chunk" in out
    assert "kernel 'broken': field 'score': unknown catalogue score 'softcapp'" in err


def test_manifest_entries(tmp_path):
    manifest = write_manifest(tmp_path / "m.toml", {
        "doc": 'mask = "document"\nmask_args = {doc = [0, 0, 1, 1]}\ndtypes = ["fp16", "bf16"]',
        "grid": 'mask = "neighbourhood_2d"\nmask_args = [8, 8, 3, 3]\nreorder = "hilbert"\n'
                'reorder_args = {grid = [8, 8]}\narchs = ["sm_80", "sm90"]',
        "dup": 'mask = "causal"',
        "typo": 'mask = "causal"\nhead_dim = [64]',
        "both": 'mask = "causal"\nspec = "x:y"',
        "args": 'mask = "sliding_window"\nmask_args = {width = 3}',
        "shape": 'mask = "causal"\nshapes = [[1, 6, 4, 128]]',
    })
    manifest.write_text(manifest.read_text() + '[[kernel]]\nname = "dup"\nmask = "full"\n')
    m = load_manifest(manifest)
    doc, grid, dup = m.kernels
    assert doc.dtypes == ("float16", "bfloat16") and doc.head_dims == ((128, 128),)
    assert doc.spec.captures[0].tensor.tolist() == [0, 0, 1, 1]
    assert grid.archs == (80, 90) and type(grid.spec.reorder).__name__ == "Hilbert2D"
    assert dup.archs is None and dup.shapes == ()
    assert len(m.errors) == 5 and all("\n" not in e for e in m.errors)
    expected = {"typo": "field 'head_dim': unknown field", "both": "field 'mask': give either",
                "args": "field 'mask_args': sliding_window() takes no argument 'width' (it "
                        "takes: window)",
                "shape": "field 'shapes': expected [B, Hq, Hkv, L]",
                "dup": "field 'name': duplicate name 'dup'"}
    for name, words in expected.items():
        assert any(f"kernel {name!r}: {words}" in e for e in m.errors), (name, m.errors)
    (tmp_path / "empty.toml").write_text("title = 'no kernels'\n")
    with pytest.raises(ManifestError, match=r"expected one or more \[\[kernel\]\] tables"):
        load_manifest(tmp_path / "empty.toml")


def test_the_example_manifest_is_valid():
    m = load_manifest(REPO / "examples" / "manifest.toml")
    assert m.errors == ()
    assert [k.name for k in m.kernels] == ["llama-causal", "gemma2-local", "gemma2-global",
                                           "dit-hilberta", "dit-na2d-7x7"]


# --- bad input: one line on stderr, a non-zero exit status, no traceback ----------------------

def one_error_line(capsys, argv: list[str], status: int = 2) -> str:
    assert main(argv) == status, argv
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, (argv, err)
    return lines[0]


def test_a_binary_manifest_is_one_error_line(tmp_path, capsys):
    binary = tmp_path / "model.toml"
    binary.write_bytes(bytes(range(256)) * 4)
    for command in ("build", "explain", "bench"):
        line = one_error_line(capsys, [command, str(binary)])
        assert f"attncc {command}: error: {binary}: not a text file" in line, line
        assert "a manifest is TOML text" in line


@pytest.mark.parametrize("arch", ["", ",", " , "])
def test_build_with_no_arch_is_an_error_not_an_empty_success(tmp_path, capsys, arch):
    manifest = write_manifest(tmp_path / "m.toml", {"ok": GOOD.split("\n", 1)[1]})
    line = one_error_line(capsys, ["build", str(manifest), "--arch", arch, "--out",
                                   str(tmp_path / "cache")])
    assert "--arch: expected one or more targets like sm_80,sm_90" in line, line
    assert not (tmp_path / "cache" / "kernels").exists()


@pytest.mark.parametrize("kind", ["file", "dangling_symlink"])
@pytest.mark.parametrize("action", ["ls", "info", "verify", "clean"])
def test_cache_commands_refuse_a_dir_that_is_no_directory(tmp_path, capsys, action, kind):
    where = tmp_path / "not-a-dir"
    if kind == "file":
        where.write_text("I am a file\n")
    else:
        where.symlink_to(tmp_path / "gone")
    line = one_error_line(capsys, ["cache", action, "--dir", str(where)], status=1)
    what = "is not a directory" if kind == "file" else "is a dangling symbolic link"
    assert f"the cache directory {where} {what}" in line and "ATTNCC_CACHE_DIR" in line, line
    if kind == "file":
        assert where.read_text() == "I am a file\n"


@pytest.mark.parametrize("days", ["nan", "inf", "-inf", "-1"])
def test_clean_older_than_must_be_a_finite_number_of_days(tmp_path, capsys, days):
    line = one_error_line(capsys, ["cache", "clean", "--dir", str(tmp_path),
                                   f"--older-than={days}"])
    assert "--older-than: expected a finite number of DAYS >= 0" in line, line


def test_explain_takes_combined_masks_and_speaks_no_manifest_fields(capsys):
    assert main(["explain", "causal() & sliding_window(64)", "--score", "softcap(30.0)",
                 "--arch", "sm_90"]) == 0
    out = capsys.readouterr().out
    assert "(kv_idx <= Lk - Lq + q_idx) & (Lk - Lq - kv_idx + q_idx < window)" in out
    assert "softcap*tanh(score/softcap)  [softcap:float+=30.0]" in out
    assert main(["explain", "~(causal() | sliding_window(8))"]) == 0
    capsys.readouterr()
    for argv, words in (
            (["explain", "causal() & slidng_window(8)"],
             "SPEC: unknown catalogue mask 'slidng_window'; did you mean 'sliding_window'?"),
            (["explain", "sliding_window(width=3)"],
             "SPEC: sliding_window() takes no argument 'width' (it takes: window)"),
            (["explain", "causal() + 1"], "SPEC: expected catalogue mask calls combined with "
                                          "&, | and ~, like \"causal() & sliding_window(1024)\""),
            (["explain", "causal", "--score", "softcap(cap)"],
             "--score: softcap(): arguments must be literals"),
            (["explain", "causal", "--score", "softcap(1.0) & softcap(2.0)"],
             "--score: expected catalogue score calls, like \"softcap(50.0)\""),
            (["explain", "attncc.library.masks:no_such_spec"],
             "cannot import 'attncc.library.masks:no_such_spec': module 'attncc.library.masks' has no "
             "attribute 'no_such_spec'")):
        line = one_error_line(capsys, argv)
        assert words in line, (argv, line)
        assert "field" not in line and "_args" not in line, line


def test_explain_says_when_the_tile_map_is_too_wide_to_draw(capsys):
    assert main(["explain", "causal", "--shape", "8192,8192", "--arch", "sm_90"]) == 0
    out = capsys.readouterr().out
    assert "== tile map Lq=8192 Lk=8192 tiles 64x64: " in out
    assert "(map not drawn: 128 kv tiles wide, more than 64 fit in text; " in out
    assert "`--png FILE`" in out
    assert main(["explain", "causal", "--shape", "256,256", "--arch", "sm_90"]) == 0
    assert "map not drawn" not in capsys.readouterr().out


def test_bench_smoke_benchmarks_the_manifest_entries(tmp_path):
    """`attncc bench MANIFEST --smoke`: each entry is a workload of the harness, run on the CPU
    and checked against the reference (the entry names are not workload filters)."""
    manifest = write_manifest(tmp_path / "m.toml", {
        "tiny-window": 'mask = "sliding_window"\nmask_args = [16]\nhead_dims = [16]\n'
                       'shapes = [[1, 2, 1, 64]]'})
    run = attncc_cli("bench", str(manifest), "--smoke", "--out", str(tmp_path / "out"),
                     root=tmp_path / "cache")
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^manifest-tiny-window +B1 H1 L64 D16 float16 +attncc=ok ", run.stdout,
                     re.MULTILINE), run.stdout
    (result,) = (tmp_path / "out").glob("*-smoke.json")
    obj = __import__("json").loads(result.read_text())
    (case,) = obj["results"]
    assert case["family"] == "manifest" and case["params"] == {"entry": "tiny-window",
                                                               "kv_heads": 1}
    assert case["entries"]["flex"]["status"] == "unavailable"
    assert "no FlexAttention form" in case["entries"]["flex"]["reason"]
