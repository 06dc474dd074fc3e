"""The benchmark harness (benchmarks/): its smoke mode end to end, and that its correctness
check refuses to time a wrong kernel. CPU only; nothing here claims a speed.

The end-to-end runs are subprocesses (the real command line, and no TRITON_INTERPRET leaking
into this process on a GPU machine); the harness tests use reference-backed stand-ins for
attncc, so they need no Triton at all.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attncc
from attncc.backends.reference.forward import attention_reference
from benchmarks import harness, peers, report, workloads
from benchmarks.flops import mask_stats
from benchmarks.schema import validate_results

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("smoke")
    proc = _run("-m", "benchmarks.run", "--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob("*.json")
    return path, json.loads(path.read_text())


def test_smoke_run_writes_valid_checked_results(smoke):
    path, obj = smoke
    validate_results(obj)
    assert obj["smoke"] and path.name.endswith("-smoke.json")
    assert {r["workload"] for r in obj["results"]} == {w.name for w in workloads.WORKLOADS}
    for r in obj["results"]:
        what = f"{r['workload']} {r['shape']}"
        assert r["entries"]["attncc"]["status"] == "ok", what
        assert r["entries"]["attncc"]["runs_on"] == "Triton interpreter", what
        math_peer = r["entries"]["sdpa-math"]
        assert math_peer["status"] == "ok" or (math_peer["status"] == "unavailable"
                                               and "soft-cap" in math_peer["reason"]), what
        assert r["entries"]["flex"]["status"] == "ok", what  # its mods match attncc's masks
        for name in ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn"):
            assert r["entries"][name] == {"status": "unavailable", "ms": None, "tflops": None,
                                          "max_err": None, "reason": "no CUDA"}, what
        assert all(e["ms"] is None for e in r["entries"].values()) and r["speedup"] == {}
    assert set(obj["pending"]["families"]) == {"linear", "decode", "backward"}


def test_smoke_report_png_and_markdown_regenerate(smoke):
    path, obj = smoke
    png, md = path.with_suffix(".png"), path.with_suffix(".md")
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    written = md.read_text()
    assert "smoke run: no timings" in written
    assert written == report.render_markdown(obj)
    proc = _run("-m", "benchmarks.report", str(path))
    assert proc.returncode == 0, proc.stderr
    assert md.read_text() == written
    assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_list_and_only():
    proc = _run("-m", "benchmarks.run", "--list")
    assert proc.returncode == 0, proc.stderr
    for w in workloads.WORKLOADS:
        assert w.name in proc.stdout
    assert "not landed" not in proc.stdout  # linear, decode and backward kernels exist
    for family in ("linear", "decode", "backward"):
        assert f"(not benchmarked yet) {family}: " in proc.stdout and " exist" in proc.stdout
    proc = _run("-m", "benchmarks.run", "--list", "--only", "sparse-hilberta", "--only",
                "flex-doc")
    listed = [line.split()[0] for line in proc.stdout.splitlines() if not line.startswith("(")]
    assert listed == ["flex-document", "sparse-hilberta-rowmajor", "sparse-hilberta-hilbert"]
    proc = _run("-m", "benchmarks.run", "--list", "--only", "no-such-workload")
    assert proc.returncode == 2 and "no workload matches" in proc.stderr


# ---- the check refuses wrong kernels -------------------------------------------------------------

def _case(name: str = "dense-causal") -> workloads.Case:
    (w,) = [w for w in workloads.WORKLOADS if w.name == name]
    return workloads.make_case(w, w.smoke_shapes[0], "cpu", smoke=True)


def _reference_impl(spec_of, scale: float = 1.0, calls: list | None = None) -> peers.Impl:
    """A stand-in for attncc: the fp64 reference of `spec_of(case)`, times `scale`."""
    def prepare(case):
        q, k, v = (t.double() for t in (case.q, case.k, case.v))

        def fn():
            if calls is not None:
                calls.append(fn)
            o, _ = attention_reference(spec_of(case), q, k, v)
            return (o * scale).to(case.q.dtype)
        return peers.Prepared(fn)
    return peers.Impl("attncc", prepare)


class CountingTimer:
    def __init__(self, ms: float = 1.0) -> None:
        self.timed: list = []
        self.ms = ms

    def __call__(self, fn) -> float:
        self.timed.append(fn)
        return self.ms


@pytest.mark.parametrize("how", ["scaled output", "different mask"])
def test_wrong_kernel_is_refused_and_never_timed(how):
    case = _case()
    calls: list = []
    if how == "scaled output":  # o * 1.1: off by 10%, far outside bf16's tolerance
        wrong = _reference_impl(lambda c: c.variant.spec, scale=1.1, calls=calls)
    else:  # non-causal where the workload is causal
        wrong = _reference_impl(lambda c: attncc.Attention(), calls=calls)
    timer = CountingTimer()
    ref = harness.reference(case)
    entry = harness.measure(wrong, case, ref, flops=1, timer=timer)
    assert entry["status"] == "wrong"
    assert entry["max_err"] > harness.TOLERANCES[case.shape.dtype][0]
    assert entry["ms"] is None and entry["tflops"] is None and "not timed" in entry["reason"]
    assert len(calls) == 1  # the one checking call
    assert timer.timed == []  # the timer never saw it



def test_a_wrong_attncc_fails_the_run(tmp_path, monkeypatch, capsys):
    """The command exits 1 and the JSON says "wrong" when attncc disagrees with the reference
    (--only narrows the smoke run to one workload, at its two smoke shapes)."""
    from benchmarks import run
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # restored afterwards (run.main sets it too)
    monkeypatch.setattr(peers, "ATTNCC", _reference_impl(lambda c: c.variant.spec, scale=1.1))
    assert run.main(["--smoke", "--only", "dense-causal", "--out", str(tmp_path)]) == 1
    assert "attncc is not ok on 2 case(s)" in capsys.readouterr().err
    (path,) = tmp_path.glob("*.json")
    obj = json.loads(path.read_text())
    validate_results(obj)
    assert [r["workload"] for r in obj["results"]] == ["dense-causal"] * 2  # --only filters
    assert [r["entries"]["attncc"]["status"] for r in obj["results"]] == ["wrong", "wrong"]
    assert "**wrong**" in path.with_suffix(".md").read_text()


def test_a_case_the_harness_cannot_check_is_listed_as_failed(tmp_path, monkeypatch):
    from benchmarks import run

    def no_reference(case):
        raise RuntimeError("reference unavailable")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(peers, "ATTNCC", _reference_impl(lambda c: c.variant.spec))
    monkeypatch.setattr(harness, "reference", no_reference)
    assert run.main(["--smoke", "--only", "flex-noop", "--out", str(tmp_path)]) == 1
    (path,) = tmp_path.glob("*.json")
    obj = json.loads(path.read_text())
    validate_results(obj)
    assert obj["results"] == []
    assert obj["failed"] == [{"workload": "flex-noop", "shape": workloads.FLEX_SMOKE[0].as_dict(),
                              "reason": "RuntimeError: reference unavailable"}]
    assert "failed in the harness" in path.with_suffix(".md").read_text()

def test_whole_case_times_only_what_passed_its_check():
    case = _case()
    timer = CountingTimer(ms=2.0)
    right = _reference_impl(lambda c: c.variant.spec)
    bad = peers.Impl("bad-peer", _reference_impl(lambda c: c.variant.spec, 1.05).prepare)

    def refuses(case):
        raise peers.Unavailable("not on this machine")

    def crashes(case):
        raise RuntimeError("boom\nsecond line")

    impls = (right, bad, peers.Impl("absent", refuses), peers.Impl("broken", crashes),
             *[p for p in peers.PEERS if p.name in ("sdpa-flash", "sdpa-math")])
    result = harness.run_case(case, impls, timer)
    e = result["entries"]
    assert e["attncc"]["status"] == "ok" and e["attncc"]["ms"] == 2.0
    assert e["sdpa-math"]["status"] == "ok" and e["sdpa-math"]["mask"] == "is_causal=True"
    assert e["bad-peer"]["status"] == "wrong" and e["bad-peer"]["ms"] is None
    assert e["absent"] == {"status": "unavailable", "ms": None, "tflops": None,
                           "max_err": None, "reason": "not on this machine"}
    assert e["broken"]["status"] == "error" and e["broken"]["reason"] == "RuntimeError: boom"
    assert e["sdpa-flash"]["reason"] == "no CUDA"
    assert len(timer.timed) == 2  # attncc and sdpa-math, nothing else
    assert result["speedup"] == {"sdpa-math": 1.0}
    L = case.shape.L
    assert result["allowed_pairs"] == L * (L + 1) // 2  # causal, closed form
    assert result["flops"] == 4 * result["allowed_pairs"] * case.shape.D
    assert e["attncc"]["tflops"] == pytest.approx(result["flops"] / 2e-3 / 1e12)


# ---- schema and report of a timed run ------------------------------------------------------------

def _timed_object(tmp_path: Path) -> dict:
    """A results object as a GPU run writes it (timings from a fake timer, device faked)."""
    case = _case("flex-sliding-window")
    times = iter([1.0, 1.5])
    impls = (_reference_impl(lambda c: c.variant.spec),
             *[p for p in peers.PEERS if p.name in ("sdpa-cudnn", "sdpa-math")])
    result = harness.run_case(case, impls, lambda fn: next(times))
    return {"schema": "attncc-bench/1", "smoke": False, "date": "2026-01-01T00:00:00+00:00",
            "device": {"kind": "cuda", "name": "Fake GPU", "driver": "1.0", "cuda": "13.0"},
            "versions": {"python": "3", "torch": "2", "triton": "3", "attncc": "0.1"},
            "git": {"commit": None, "dirty": None},
            "protocol": {"timer": "fake", "reference": "fp64", "checked_on": "batch 0",
                         "tolerances": {"bfloat16": [0.02, 0.02]}, "flops": "4BHPD",
                         "fill_rule": "B=H=1"},
            "pending": {"families": {}, "peers": {}}, "results": [result], "failed": []}


def test_timed_results_validate_and_render(tmp_path):
    obj = _timed_object(tmp_path)
    validate_results(obj)
    r = obj["results"][0]
    assert r["speedup"] == {"sdpa-math": 1.5}
    assert r["tile_efficiency"] < 1
    assert r["params"] == {"window": workloads.FLEX_SMOKE[0].L // 4}
    text = report.render_markdown(obj)
    assert "TFLOP/s" in text and "(1.50x)" in text and "smoke run" not in text
    path = tmp_path / "fake.json"
    path.write_text(json.dumps(obj))
    md, png = report.write_report(path)
    assert md.read_text() == text and png.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("corrupt, message", [
    (lambda r: r["entries"].pop("attncc"), "'attncc'"),
    (lambda r: r["entries"]["attncc"].update(status="wrong", reason="x"), "not timed"),
    (lambda r: r["entries"]["attncc"].update(tflops=1e9), "tflops"),
    (lambda r: r["speedup"].update({"sdpa-math": 3.0}), "peer ms / attncc ms"),
    (lambda r: r.update(flops=r["flops"] + 1), "flops"),
    (lambda r: r["entries"]["sdpa-cudnn"].update(reason=""), "says why"),
])
def test_validate_results_rejects(tmp_path, corrupt, message):
    obj = _timed_object(tmp_path)
    bad = copy.deepcopy(obj)
    corrupt(bad["results"][0])
    with pytest.raises(ValueError, match=message):
        validate_results(bad)
    bad = copy.deepcopy(obj)
    bad["smoke"] = True  # a smoke run times nothing
    with pytest.raises(ValueError, match="smoke"):
        validate_results(bad)


def test_allowed_pairs_and_tile_efficiency():
    """Exact counts from attncc's mask: noop L^2, causal L(L+1)/2, and the sparse orders agree on
    the allowed pairs while visiting different tiles."""
    noop, causal = mask_stats(_case("flex-noop")), mask_stats(_case("flex-causal"))
    L = workloads.FLEX_SMOKE[0].L
    assert noop["allowed_pairs"] == L * L and noop["tile_efficiency"] == 1.0
    assert causal["allowed_pairs"] == L * (L + 1) // 2
    rowmajor = mask_stats(_case("sparse-na2d-7x7-rowmajor"))
    hilbert = mask_stats(_case("sparse-na2d-7x7-hilbert"))
    assert rowmajor["allowed_pairs"] == hilbert["allowed_pairs"]
    y, x = torch.arange(256) // 16, torch.arange(256) % 16
    cy, cx = y.clamp(3, 12), x.clamp(3, 12)  # brute force on the 16 x 16 grid
    mask = ((cy[:, None] - y[None, :]).abs() <= 3) & ((cx[:, None] - x[None, :]).abs() <= 3)
    assert rowmajor["allowed_pairs"] == int(mask.sum())
