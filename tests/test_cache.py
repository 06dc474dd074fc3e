"""Disk cache: hits, cross-process reuse, one build under a 4-process race, corrupt entries."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from attncc import config
from attncc.backends import cache

KEY = hashlib.sha256(b"attn_fwd_causal").hexdigest()
NAME = "attn_fwd_causal_d64_fp16"
FILES = {"kernel.py": b"@triton.jit\ndef k(): pass\n", "kernel.cubin": bytes(range(256)) * 8}


@pytest.fixture(autouse=True)
def _fresh_stats():
    cache.reset_stats()
    yield
    cache.reset_stats()


class CountingBuild:
    def __init__(self, files: dict[str, bytes] = FILES):
        self.files, self.calls = files, 0

    def __call__(self) -> dict[str, bytes]:
        self.calls += 1
        return dict(self.files)


def assert_valid(entry: cache.CacheEntry, files: dict[str, bytes] = FILES) -> None:
    assert entry.path.name == cache.entry_name(NAME, KEY)
    assert {f: p.read_bytes() for f, p in entry.files.items()} == files
    assert entry.meta["key"] == KEY
    assert sorted(p.name for p in entry.path.iterdir()) == sorted([*files, "meta.json"])


def kernel_dirs(root: Path) -> list[str]:
    kernels = root / "kernels"
    return sorted(p.name for p in kernels.iterdir()) if kernels.exists() else []


def test_entry_name_is_readable_plus_key_prefix():
    assert cache.entry_name(NAME, KEY) == f"{NAME}-{KEY[:16]}"
    for bad_name in ["", ".hidden", "a/b", "a b"]:
        with pytest.raises(ValueError):
            cache.entry_name(bad_name, KEY)
    with pytest.raises(ValueError):
        cache.entry_name(NAME, "not-hex")


def test_build_then_load_hits_without_building(tmp_path):
    build = CountingBuild()
    first = cache.load_or_build(KEY, NAME, build, root=tmp_path, extra_meta={"arch": ("sm_90",)})
    again = cache.load_or_build(KEY, NAME, build, root=tmp_path)
    loaded = cache.load(KEY, NAME, root=tmp_path)
    assert build.calls == 1 and first.built and not again.built and not loaded.built
    assert (cache.stats.builds, cache.stats.hits, cache.stats.rebuilt_corrupt) == (1, 2, 0)
    for entry in (first, again, loaded):
        assert_valid(entry)
    meta = json.loads((first.path / "meta.json").read_text())
    assert meta == first.meta == loaded.meta
    assert meta["arch"] == ["sm_90"] and meta["name"] == NAME
    assert meta["files"]["kernel.cubin"] == {
        "sha256": hashlib.sha256(FILES["kernel.cubin"]).hexdigest(),
        "size": 2048,
    }
    assert {"created", "attncc_version", "torch_version", "triton_version"} <= meta.keys()
    assert kernel_dirs(tmp_path) == [first.path.name]


def test_default_root_comes_from_config(tmp_path):
    with config.override(ATTNCC_CACHE_DIR=str(tmp_path)):
        entry = cache.load_or_build(KEY, NAME, CountingBuild())
    assert entry.path == tmp_path / "kernels" / cache.entry_name(NAME, KEY)


def test_bad_build_output_and_failed_build_leave_nothing(tmp_path):
    for files in ({"meta.json": b"x"}, {"../evil": b"x"}, {"k.py": "str, not bytes"}):
        with pytest.raises((ValueError, TypeError)):
            cache.load_or_build(KEY, NAME, lambda f=files: f, root=tmp_path)

    def boom() -> dict[str, bytes]:
        raise RuntimeError("compile failed")

    with pytest.raises(RuntimeError):
        cache.load_or_build(KEY, NAME, boom, root=tmp_path)
    assert kernel_dirs(tmp_path) == [] and cache.load(KEY, NAME, root=tmp_path) is None
    with pytest.raises(ValueError):  # reserved meta keys are refused before building
        cache.load_or_build(KEY, NAME, boom, root=tmp_path, extra_meta={"key": "x"})


# A child process: load_or_build with a build that sleeps, appends to a marker file and prints
# the counters. With GATE it says "ready" and waits for "go" on stdin so all start together.
CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from attncc.backends import cache
    root, marker, key, name, gate = sys.argv[1:6]
    def build():
        time.sleep(0.3)
        with open(marker, "a") as f:
            f.write("built\\n")
        return {"kernel.py": b"@triton.jit\\ndef k(): pass\\n",
                "kernel.cubin": bytes(range(256)) * 8}
    if gate == "1":
        print("ready", flush=True)
        sys.stdin.readline()
    entry = cache.load_or_build(key, name, build, root=Path(root))
    s = cache.stats
    print(json.dumps({"built": entry.built, "builds": s.builds, "hits": s.hits}), flush=True)
    """
)


def start_child(root: Path, marker: Path, gate: bool) -> subprocess.Popen:
    argv = [sys.executable, "-c", CHILD, str(root), str(marker), KEY, NAME, str(int(gate))]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def finish(child: subprocess.Popen) -> dict:
    out, _ = child.communicate(timeout=20)
    assert child.returncode == 0
    return json.loads(out.splitlines()[-1])


def test_second_process_loads_without_building(tmp_path):
    cache.load_or_build(KEY, NAME, CountingBuild(), root=tmp_path)
    marker = tmp_path / "marker"
    report = finish(start_child(tmp_path, marker, gate=False))
    assert report == {"built": False, "builds": 0, "hits": 1}
    assert not marker.exists()


def test_four_racing_processes_build_once(tmp_path):
    marker = tmp_path / "marker"
    children = [start_child(tmp_path, marker, gate=True) for _ in range(4)]
    for child in children:  # every child has imported the cache before any starts
        assert child.stdout.readline().strip() == "ready"
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    reports = [finish(child) for child in children]
    assert marker.read_text() == "built\n"
    assert sorted(r["built"] for r in reports) == [False, False, False, True]
    assert sum(r["builds"] for r in reports) == 1 and sum(r["hits"] for r in reports) == 3
    assert kernel_dirs(tmp_path) == [cache.entry_name(NAME, KEY)]  # no temp dirs left
    assert_valid(cache.load(KEY, NAME, root=tmp_path))


def truncate(entry: cache.CacheEntry) -> None:
    data = entry.files["kernel.cubin"].read_bytes()
    entry.files["kernel.cubin"].write_bytes(data[:100])


def flip_byte(entry: cache.CacheEntry) -> None:  # same size, wrong sha256
    data = bytearray(entry.files["kernel.cubin"].read_bytes())
    data[7] ^= 0xFF
    entry.files["kernel.cubin"].write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated_file": truncate,
    "flipped_byte": flip_byte,
    "deleted_file": lambda e: e.files["kernel.py"].unlink(),
    "garbage_meta": lambda e: (e.path / "meta.json").write_text('{"key": "'),
    "meta_not_object": lambda e: (e.path / "meta.json").write_text("[1, 2]"),
    "deleted_meta": lambda e: (e.path / "meta.json").unlink(),
    "other_key_in_meta": lambda e: (e.path / "meta.json").write_text(
        json.dumps({**e.meta, "key": "0" * 64})
    ),
    "meta_escapes_entry": lambda e: (e.path / "meta.json").write_text(
        json.dumps({**e.meta, "files": {"../x": {"sha256": "", "size": 0}}})
    ),
    "entry_is_a_file": lambda e: (__import__("shutil").rmtree(e.path), e.path.write_bytes(b"")),
    "entry_is_a_dangling_symlink": lambda e: (
        __import__("shutil").rmtree(e.path), e.path.symlink_to(e.path.parent / "gone")
    ),
    "entry_is_a_symlink_loop": lambda e: (
        __import__("shutil").rmtree(e.path), e.path.symlink_to(e.path.name)
    ),
    "entry_is_a_symlink_to_a_file": lambda e: (
        __import__("shutil").rmtree(e.path), (e.path.parent / "f").write_bytes(b""),
        e.path.symlink_to("f"),
    ),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_entry_is_rebuilt_not_loaded(tmp_path, corrupt):
    build = CountingBuild()
    corrupt(cache.load_or_build(KEY, NAME, build, root=tmp_path))
    assert cache.load(KEY, NAME, root=tmp_path) is None
    assert cache.list_entries(tmp_path) == []
    with pytest.warns(UserWarning, match="corrupt"):
        entry = cache.load_or_build(KEY, NAME, build, root=tmp_path)
    assert build.calls == 2 and entry.built
    assert cache.stats.rebuilt_corrupt == 1
    assert_valid(entry)
    assert_valid(cache.load(KEY, NAME, root=tmp_path))
    assert not entry.path.is_symlink()
    assert sorted(set(kernel_dirs(tmp_path)) - {"f"}) == [entry.path.name]


@pytest.mark.parametrize("link", ["dangling", "loop"])
def test_broken_symlink_entry_is_listed_as_corrupt_and_cleared(tmp_path, link):
    path = tmp_path / "kernels" / cache.entry_name(NAME, KEY)
    path.parent.mkdir()
    path.symlink_to(path.name if link == "loop" else tmp_path / "gone")
    [(where, entry, why)] = cache.inspect_all(tmp_path)
    assert where == path and entry is None
    assert ("loop" if link == "loop" else "dangling symbolic link") in why
    assert cache.clear(tmp_path) == 1 and kernel_dirs(tmp_path) == []


@pytest.mark.parametrize("kind", ["dangling_symlink", "symlink_loop", "file"])
def test_cache_dir_that_is_no_directory_gives_one_clear_error(tmp_path, kind):
    root = tmp_path / "cache"
    if kind == "dangling_symlink":
        root.symlink_to(tmp_path / "missing")
        expected = f"{root} is a dangling symbolic link to {tmp_path / 'missing'}; create"
    elif kind == "symlink_loop":
        root.symlink_to(root.name)
        expected = f"{root} is a symbolic link loop; create"
    else:
        root.write_bytes(b"")
        expected = f"{root} is not a directory; remove it"
    build = CountingBuild()
    with pytest.raises(cache.CacheError, match=re.escape(expected)) as info:
        cache.load_or_build(KEY, NAME, build, root=root)
    assert "\n" not in str(info.value) and "ATTNCC_CACHE_DIR" in str(info.value)
    assert build.calls == 0
    assert cache.load(KEY, NAME, root=root) is None  # reading a missing cache is no error


def test_orphaned_temp_dir_is_removed_on_build(tmp_path):
    name = cache.entry_name(NAME, KEY)
    orphan = tmp_path / "kernels" / f".tmp.abc123.{name}"
    orphan.mkdir(parents=True)
    (orphan / "kernel.py").write_bytes(b"half")
    cache.load_or_build(KEY, NAME, CountingBuild(), root=tmp_path)
    assert kernel_dirs(tmp_path) == [name]


def test_list_entries_and_clear(tmp_path):
    assert cache.list_entries(tmp_path) == [] and cache.clear(tmp_path) == 0
    other_key = hashlib.sha256(b"other").hexdigest()
    a = cache.load_or_build(KEY, NAME, CountingBuild(), root=tmp_path)
    b = cache.load_or_build(other_key, "attn_fwd_sw_d128_bf16", CountingBuild(), root=tmp_path)
    c = cache.load_or_build(
        hashlib.sha256(b"broken").hexdigest(), "broken", CountingBuild(), root=tmp_path
    )
    truncate(c)
    (tmp_path / "kernels" / f".tmp.zz.{a.path.name}").mkdir()  # a dead writer's leftover
    listed = cache.list_entries(tmp_path)
    assert [e.path for e in listed] == sorted([a.path, b.path])  # corrupt and temp skipped
    assert all(not e.built for e in listed)
    assert [e.meta for e in listed] == [e.meta for e in sorted([a, b], key=lambda e: e.path)]
    assert cache.clear(tmp_path) == 3
    assert kernel_dirs(tmp_path) == [] and cache.list_entries(tmp_path) == []
    assert cache.load(KEY, NAME, root=tmp_path) is None


def test_any_name_finds_a_key_under_another_readable_name_and_builds_it_once(tmp_path):
    """Threads building one key under two readable names (two spellings of one spec) share
    the key's lock: one build, one entry, loaded under either name."""
    import threading
    import time

    calls: list[str] = []

    def build_as(name: str):
        def build() -> dict[str, bytes]:
            calls.append(name)
            time.sleep(0.2)
            return dict(FILES)
        return build

    results: list[cache.CacheEntry] = []
    threads = [threading.Thread(target=lambda n=n: results.append(cache.load_or_build(
        KEY, n, build_as(n), root=tmp_path, any_name=True))) for n in ("spelt_a", "spelt_b") * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(kernel_dirs(tmp_path)) == 1
    assert len({r.path for r in results}) == 1 and sorted(r.built for r in results) == \
        [False] * 5 + [True]
    other = "spelt_b" if calls[0] == "spelt_a" else "spelt_a"
    assert cache.load(KEY, other, root=tmp_path) is None  # by name only: not this one
    assert cache.load(KEY, other, root=tmp_path, any_name=True).path == results[0].path
    assert cache.load(hashlib.sha256(b"x").hexdigest(), other, root=tmp_path,
                      any_name=True) is None
