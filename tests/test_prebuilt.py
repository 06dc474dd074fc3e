"""Prebuilt kernels and the hardened cache, no GPU needed.

- `attncc build --arch sm_90` on a two-kernel manifest, then a new process with every compiler
  replaced by one that raises loads both through `precompile` (zero compiles, zero cache
  builds), under ATTNCC_OFFLINE=1; a kernel not in the build raises the offline error.
- in-process `precompile`: compiles once (one WARNING log line), then loads.
- 4 `attncc build --jobs 2` processes on overlapping manifests build each kernel exactly once
  and leave a cache `attncc cache verify` accepts.
- a read-only cache serves its entries; writing a new one is a clear CacheError (as a non-root
  user: as root, through `setpriv` as nobody, else skipped).
- disk full and an unwritable lock dir are clear CacheErrors that leave nothing behind; threads
  of one process build a key once.

Each AOT compile costs 2-12 s of CPU, so the kernels here are small (head dims 16-64).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import attncc
from attncc import config
from attncc.backends.triton import prebuilt
from attncc.backends import cache

REPO = Path(__file__).resolve().parents[1]
MANIFEST = textwrap.dedent("""
    [[kernel]]
    name = "causal"
    mask = "causal"
    dtypes = ["float16"]
    head_dims = [64]

    [[kernel]]
    name = "local-capped"
    mask = "sliding_window"
    mask_args = {window = 128}
    score = "softcap"
    score_args = {cap = 30.0}
    dtypes = ["fp16"]
    head_dims = [64]
""")
SPECS = ("attncc.Attention(mask=attncc.causal())",
         "attncc.Attention(mask=attncc.sliding_window(128), score=attncc.softcap(30.0))")


def env_for(root: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, ATTNCC_CACHE_DIR=str(root), TRITON_CACHE_DIR=str(root / "triton"),
               OMP_NUM_THREADS="1", **extra)
    env.pop("ATTNCC_OFFLINE", None)
    env.update(extra)
    return env


def attncc_cli(*args: str, root: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attncc", *args], env=env_for(root, **extra),
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def summary(stdout: str) -> dict[str, int]:
    found = re.search(r"(\d+) built, (\d+) cached, (\d+) failed, (\d+) bad entries", stdout)
    assert found, stdout
    return dict(zip(("built", "cached", "failed", "bad"), map(int, found.groups())))


def say(request, line: str) -> None:
    """A line on the terminal even when pytest captures output (the numbers worth quoting)."""
    if hasattr(request.node, "user_properties"):
        request.node.user_properties.append(("note", line))
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n[{request.node.name}] {line}")


@pytest.fixture(scope="module")
def built(tmp_path_factory, request) -> Path:
    """A cache that `attncc build --arch sm_90` filled from MANIFEST (two fp16 d64 kernels)."""
    root = tmp_path_factory.mktemp("prebuilt-cache")
    manifest = root.parent / "manifest.toml"
    manifest.write_text(MANIFEST)
    start = time.perf_counter()
    run = attncc_cli("build", str(manifest), "--arch", "sm_90", "--jobs", "2", root=root)
    seconds = time.perf_counter() - start
    assert run.returncode == 0, run.stderr
    assert summary(run.stdout) == {"built": 2, "cached": 0, "failed": 0, "bad": 0}
    say(request, f"attncc build --arch sm_90, 2 kernels fp16 d64: {seconds:.1f}s wall "
                 f"(process included); cache {cache.dir_size(root) / 2**20:.1f} MiB "
                 f"({cache.dir_size(root / 'kernels') / 2**20:.2f} MiB of entries); "
                 f"summary: {run.stdout.strip()}")
    return root


# A new process: every compiler raises; precompile must load both kernels from the cache.
LOAD_CHILD = textwrap.dedent("""
    import json, sys
    import triton
    import attncc
    from attncc.backends.triton import prebuilt
    from attncc.backends import cache
    from attncc.backends.triton import aot as triton_aot

    def refuse(*args, **kwargs):
        raise AssertionError("a compiler was called")

    triton.compile = triton_aot.compile_for_target = triton_aot.compile_spec = refuse
    triton_aot.compile_block_map_for_target = triton_aot.compile_in_child = refuse
    out = {"loaded": []}
    for text in json.loads(sys.argv[1]):
        art = attncc.compile(eval(text)).precompile("float16", 64, arch="sm_90")
        out["loaded"].append([art.file_stem, art.arch, len(art.cubin), art.shared_bytes])
    out["builds"], out["hits"] = cache.stats.builds, cache.stats.hits
    try:  # not in the build
        attncc.compile(attncc.Attention(mask=attncc.causal())).precompile("float16", 32,
                                                                           arch="sm_90")
        out["missing"] = None
    except prebuilt.NotPrebuiltError as e:
        out["missing"] = str(e)
    print(json.dumps(out))
""")


def test_a_new_process_loads_the_built_kernels_and_compiles_nothing(built, request):
    run = subprocess.run([sys.executable, "-c", LOAD_CHILD, json.dumps(SPECS)],
                         env=env_for(built, ATTNCC_OFFLINE="1"), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["builds"] == 0, out  # neither sources nor kernels: everything came from disk
    assert len(out["loaded"]) == 2 and out["hits"] >= 4
    for stem, arch, n_cubin, shared in out["loaded"]:
        assert stem.endswith(".sm90.fp16.d64") and arch == 90 and n_cubin > 0 and shared > 0
    assert "compiled" not in run.stderr  # no "attncc: compiled ..." log line
    message = out["missing"]
    assert message is not None, "an unbuilt kernel must raise under ATTNCC_OFFLINE=1"
    assert "\n" not in message
    name = attncc.compile(attncc.Attention(mask=attncc.causal())).name
    for part in ("ATTNCC_OFFLINE=1", name, "sm_90",
                 "float16", "head dims 32/32", "attncc build"):
        assert part in message, (part, message)
    say(request, f"offline error: {message}")


def test_precompile_compiles_once_then_loads(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    attn = attncc.compile(attncc.Attention(mask=attncc.causal()))
    with caplog.at_level(logging.INFO, logger="attncc"):
        first = attn.precompile("float16", 16, arch="sm_90")
    (record,) = caplog.records  # one line: which kernel, how long
    assert record.levelno == logging.WARNING
    assert f"{attn.name}.sm90.fp16.d16" in record.getMessage()
    assert re.search(r"in \d+\.\ds", record.getMessage())
    caplog.clear()
    calls = []
    monkeypatch.setattr("attncc.backends.triton.aot.compile_spec",
                        lambda *a, **k: calls.append(a))
    with caplog.at_level(logging.INFO, logger="attncc"):
        again = attn.precompile("fp16", 16, 16, arch=90)
    assert calls == [] and caplog.records == []
    assert (again.cubin, again.ptx, again.schedule) == (first.cubin, first.ptx, first.schedule)
    (entry,) = [e for e in cache.list_entries(tmp_path) if e.meta.get("kind") == "forward"]
    assert entry.meta["target"] == "sm_90" and entry.meta["dtype"] == "float16"
    assert (entry.meta["head_dim_qk"], entry.meta["head_dim_v"]) == (16, 16)
    assert entry.meta["source_key"] == attn.kernels.kernel.entry.meta["key"]
    assert entry.path.name.startswith(f"{attn.name}.sm90.fp16.d16-")


_DOC = torch.tensor([0, 0, 1, 1, 1, 2], dtype=torch.int32)
_OFFSETS = torch.tensor([0, 2, 5], dtype=torch.int32)


def _doc_offsets(b, h, q_idx, kv_idx):  # one key interval per row: the row-interval form
    return (kv_idx >= _OFFSETS[_DOC[q_idx]]) & (kv_idx <= q_idx)


@pytest.mark.parametrize("mask,rows", [(attncc.document(_DOC), False), (_doc_offsets, True)],
                         ids=["pairs", "row-intervals"])
def test_precompile_builds_the_block_map_kernel_too(tmp_path, monkeypatch, caplog, mask, rows):
    """A mask on a captured tensor has its tiles classified on the device by a second kernel
    (in the form the analysis chose: at every pair, or from per-row key intervals); precompile
    stores both (Dqk != Dv: the block map uses the forward kernel's tiles)."""
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    attn = attncc.compile(attncc.Attention(mask=mask))
    assert prebuilt.kinds(attn.kernels.kernel) == ("forward", "block_map")
    assert (attn.plan.block_map.rows.pieces is not None) == rows
    assert ("form: per-row key intervals" in
            attn.kernels.kernel.entry.files["block_map.py"].read_text()) == rows
    with caplog.at_level(logging.WARNING, logger="attncc"):
        art = attn.precompile("float16", 32, 16, arch="sm_80")
    assert art.name == attn.name and (art.head_dim_qk, art.head_dim_v) == (32, 16)
    assert len(caplog.records) == 2  # one line per compiled kernel
    stored = {e.meta["kind"]: e for e in cache.list_entries(tmp_path) if "kind" in e.meta}
    assert sorted(stored) == ["block_map", "forward"]
    assert stored["block_map"].path.name.startswith(
        f"{attn.name.replace('attn_fwd_', 'block_map_', 1)}.sm80.fp16.d32_16.t128x64-")
    bm, fwd = (prebuilt._artifact(stored[k]).schedule for k in ("block_map", "forward"))
    assert (bm.block_m, bm.block_n) == (fwd.block_m, fwd.block_n) == (128, 64)


def test_artifact_keys_and_arguments(monkeypatch):
    forward = attncc.compile(attncc.Attention(mask=attncc.causal())).kernels.kernel
    keys = {prebuilt.artifact_key(forward, "forward", *sig) for sig in
            [(90, "float16", 64, 64), (80, "float16", 64, 64), (90, "bfloat16", 64, 64),
             (90, "float16", 128, 128), (90, "float16", 128, 64)]}
    assert len(keys) == 5  # arch, dtype and head dims are all in the key
    monkeypatch.setattr("triton.__version__", "0.0.0-other")
    assert prebuilt.artifact_key(forward, "forward", 90, "float16", 64, 64) not in keys
    assert [prebuilt.parse_arch(a) for a in ("sm_90", "sm90", 90, "sm_90a", "86")] == \
        [90, 90, 90, 90, 86]
    for bad in ("sm_75", "sm_100", "hopper", 75):
        with pytest.raises(ValueError, match="unknown arch"):
            prebuilt.parse_arch(bad)
    with pytest.raises(ValueError, match="unknown dtype"):
        prebuilt.parse_dtype("float8")
    with pytest.raises(ValueError, match=r"head dim 512 is not supported \(1\.\.256\)"):
        prebuilt.load_or_compile(forward, "forward", "float16", 512, 512, 90)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU here; pass a target"):
            attncc.compile(attncc.Attention()).precompile("float16", 64)


# --- concurrency ----------------------------------------------------------------------------

KERNELS = {
    "a": 'name = "a"\nmask = "causal"\ndtypes = ["float16"]\nhead_dims = [16]\n',
    "b": 'name = "b"\nmask = "causal"\ndtypes = ["bfloat16"]\nhead_dims = [16]\n',
    "c": 'name = "c"\nmask = "sliding_window"\nmask_args = [64]\ndtypes = ["float16"]\n'
         'head_dims = [16]\n',
}


def test_racing_builders_build_each_kernel_once(tmp_path, request):
    """4 processes x 2 threads, overlapping manifests over 3 distinct kernels."""
    root = tmp_path / "cache"
    procs = []
    for i, names in enumerate(["ab", "bc", "ca", "abc"]):
        manifest = tmp_path / f"m{i}.toml"
        manifest.write_text("\n".join(f"[[kernel]]\n{KERNELS[n]}" for n in names))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "attncc", "build", str(manifest), "--arch", "sm_90",
             "--jobs", "2"], env=env_for(root), cwd=REPO, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    start = time.perf_counter()
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in results]
    counts = [summary(out) for out, _ in results]
    assert sum(c["built"] for c in counts) == 3, counts  # each distinct kernel built once
    assert sum(c["built"] + c["cached"] for c in counts) == 9 and not any(
        c["failed"] for c in counts)
    dirs = sorted(p.name for p in (root / "kernels").iterdir())
    assert not [d for d in dirs if d.startswith(".")], dirs  # no temporary dirs left
    assert len([d for d in dirs if ".sm90." in d]) == 3 and len(dirs) == 5  # + 2 sources
    created = [e.meta["created"] for e in cache.list_entries(root)]
    assert len(set(created)) == len(created) == 5
    verify = attncc_cli("cache", "verify", root=root)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "5 entries ok, 0 bad" in verify.stdout
    say(request, f"4 racing builders: {time.perf_counter() - start:.1f}s after start; "
                 f"built per process {[c['built'] for c in counts]}")


def test_threads_of_one_process_build_a_key_once(tmp_path):
    key, calls = "ab" * 32, []

    def build() -> dict[str, bytes]:
        calls.append(threading.get_ident())
        time.sleep(0.2)
        return {"k.bin": b"x" * 100}

    results: list[cache.CacheEntry] = []
    threads = [threading.Thread(target=lambda: results.append(
        cache.load_or_build(key, "k", build, root=tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(r.built for r in results) == [False] * 7 + [True]


# --- read-only cache, disk full ---------------------------------------------------------------

RO_CHILD = textwrap.dedent("""
    import json
    import attncc
    from attncc.backends import cache
    from attncc.backends.triton import aot as triton_aot

    def refuse(*args, **kwargs):
        raise AssertionError("a compiler was called")

    triton_aot.compile_spec = refuse
    attn = attncc.compile(attncc.Attention(mask=attncc.causal()))
    art = attn.precompile("float16", 64, arch="sm_90")  # built: loads without a lock
    try:
        attn.precompile("float16", 32, arch="sm_90")  # not built: must not compile or corrupt
        error = None
    except cache.CacheError as e:
        error = str(e)
    print(json.dumps({"loaded": art.file_stem, "error": error}))
""")


def _read_only_runner() -> list[str]:
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, where chmod does not restrict writes, and no setpriv "
                    "to drop to another user")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_a_read_only_cache_loads_and_refuses_to_build(built, request):
    runner = _read_only_runner()
    parent = Path(tempfile.mkdtemp(prefix="attncc-ro-"))
    root = parent / "cache"
    try:
        shutil.copytree(built, root, symlinks=True)
        for path in [parent, *root.rglob("*"), root]:
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode):  # read and traverse for everyone, write for no one
                path.chmod((mode | 0o444 | (0o111 if path.is_dir() else 0)) & ~0o222)
        before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        run = subprocess.run([*runner, sys.executable, "-c", RO_CHILD],
                             env=env_for(root, HOME=str(parent)), cwd=parent,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout.strip().splitlines()[-1])
        assert out["loaded"].endswith(".sm90.fp16.d64")
        assert out["error"] is not None and "\n" not in out["error"]
        assert "attncc cache: cannot lock cache entry" in out["error"], out["error"]
        assert ".sm90.fp16.d32-" in out["error"] and str(root) in out["error"]
        assert "Permission denied" in out["error"] and "ATTNCC_CACHE_DIR" in out["error"]
        assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before
        say(request, f"read-only: {out['error']}")
    finally:
        for path in [parent, *parent.rglob("*")]:
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o200)
        shutil.rmtree(parent, ignore_errors=True)


def test_an_unwritable_lock_dir_is_a_clear_error_and_valid_entries_still_load(
        tmp_path, monkeypatch):
    """The same path as above as whoever runs the tests: the file lock cannot be taken."""
    key, other = "cd" * 32, "ef" * 32
    entry = cache.load_or_build(key, "k", lambda: {"k.bin": b"ok"}, root=tmp_path)

    class DeniedLock:
        def __init__(self, path: str) -> None:
            self.path = path

        def acquire(self) -> None:
            raise PermissionError(errno.EACCES, "Permission denied", self.path)

    monkeypatch.setattr(cache, "FileLock", DeniedLock)
    loaded = cache.load_or_build(key, "k", lambda: pytest.fail("rebuilt"), root=tmp_path)
    assert loaded.files == entry.files and not loaded.built
    with pytest.raises(cache.CacheError, match=r"cannot lock cache entry k-efefef.*"
                       r"Permission denied \[EACCES: no write permission\]"):
        cache.load_or_build(other, "k", lambda: pytest.fail("built"), root=tmp_path)


def test_disk_full_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    key = "12" * 32
    written: list[Path] = []

    def full_disk(path: Path, data: bytes) -> None:
        written.append(path)
        if len(written) == 2:  # the first file fits, the second does not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        path.write_bytes(data)

    monkeypatch.setattr(cache, "_write_file", full_disk)
    files = {"a.bin": b"a" * 10, "b.bin": b"b" * 10}
    with pytest.raises(cache.CacheError) as info:
        cache.load_or_build(key, "k", lambda: files, root=tmp_path)
    message = str(info.value)
    assert "cannot store cache entry k-1212121212121212" in message
    assert "No space left on device [ENOSPC: the disk is full]" in message
    assert str(tmp_path / "kernels") in message and "\n" not in message
    assert written[0].parent.name.startswith(".tmp.")  # written to a temp dir first
    assert sorted((tmp_path / "kernels").iterdir()) == []  # no entry, no temp dir
    assert cache.load(key, "k", root=tmp_path) is None
    monkeypatch.undo()
    assert cache.load_or_build(key, "k", lambda: files, root=tmp_path).built  # space freed


# --- one canonical key, however the spec is spelt ---------------------------------------------

SPELLINGS = textwrap.dedent("""
    import attncc
    both = attncc.Attention(mask=attncc.causal() & attncc.sliding_window(64))
""")


def kv_le_q(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def q_ge_kv(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def test_two_spellings_of_one_spec_build_once_and_serve_each_other_offline(tmp_path,
                                                                          monkeypatch):
    """`causal() & sliding_window(64)` and `sliding_window(64)` have one canonical key: a
    manifest naming both builds one binary, and ATTNCC_OFFLINE=1 loads it for a third spelling
    (`sliding_window(64) & causal()`) that no build named."""
    root = tmp_path / "cache"
    (tmp_path / "spellings.py").write_text(SPELLINGS)
    manifest = tmp_path / "m.toml"
    manifest.write_text(
        '[[kernel]]\nname = "window"\nmask = "sliding_window"\nmask_args = [64]\n'
        'head_dims = [16]\n\n[[kernel]]\nname = "both"\nspec = "spellings:both"\n'
        'head_dims = [16]\n')
    run = attncc_cli("build", str(manifest), "--arch", "sm_90", root=root)
    assert run.returncode == 0, run.stderr
    assert summary(run.stdout) == {"built": 1, "cached": 0, "failed": 0, "bad": 0}
    assert "kernel 'both' shares kernels with 'window' (same canonical spec)" in run.stderr
    compiled = [e for e in cache.list_entries(root) if e.meta.get("kind") == "forward"]
    assert len(compiled) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("a compiler was called")

    monkeypatch.setattr("attncc.backends.triton.aot.compile_spec", refuse)
    with config.override(ATTNCC_CACHE_DIR=str(root), ATTNCC_OFFLINE="1"):
        for mask in (attncc.sliding_window(64) & attncc.causal(),
                     attncc.causal() & attncc.sliding_window(64), attncc.sliding_window(64)):
            attn = attncc.compile(attncc.Attention(mask=mask))
            art = attn.precompile("float16", 16, arch="sm_90")
            assert art.cubin == prebuilt._artifact(compiled[0]).cubin
    assert [e.meta.get("kind") for e in cache.list_entries(root)].count("forward") == 1


def test_a_traced_mask_in_either_orientation_names_one_binary():
    keys = {prebuilt.artifact_key(attncc.compile(fn).kernels.kernel, "forward", 90, "float16",
                                  16, 16)
            for fn in (kv_le_q, q_ge_kv)}
    assert len(keys) == 1
