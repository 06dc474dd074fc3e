"""scripts/gpu_check.sh, the one command for a lent GPU: its CPU dry run end to end (the same
parts at toy shapes under the interpreter, the same files), its budget guard, and the summary's
attncc-vs-fastest-peer arithmetic. Nothing here claims a speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check, gpu_families
from benchmarks.peers import Unavailable

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
WORKLOADS = ["dense-causal", "flex-sliding-window", "flex-document", "flex-softcap",
             "decode-paged", "linear-L6-gated-delta", "backward-causal"]


def _script(*args: str, timeout: int = 400, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False,
                          env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu-check")
    return out, _script("--dry-run", "--out", str(out))


def test_dry_run_runs_every_part_and_says_where_the_results_are(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"results in {out}" in proc.stdout
    parts = [line.split("\t") for line in (out / "parts.tsv").read_text().splitlines()]
    assert [p[0] for p in parts] == ["install", "tests-slice", "bench-all"]
    assert all(p[1] == "ok" for p in parts), parts


def test_dry_run_writes_the_results_files(dry_run):
    out, _ = dry_run
    junit = ET.parse(out / "tests" / "slice.xml").getroot()
    assert junit.find("testsuite") is not None
    for part in gpu_check.PARTS:
        obj = json.loads((out / "bench" / f"{part}.json").read_text())
        assert obj["dry_run"] is True and obj["part"] == part and obj["failed"] == []
        assert obj["device"]["name"] and obj["versions"]["torch"] and obj["versions"]["triton"]
    check = json.loads((out / "check.json").read_text())
    assert check["schema"] == gpu_check.SCHEMA and check["dry_run"] is True
    assert [r["workload"] for r in check["results"]] == WORKLOADS
    for r in check["results"]:  # attncc checked against the reference; nothing timed
        attncc = r["entries"]["attncc"]
        assert attncc["status"] == "ok" and attncc["ms"] is None, r
        assert attncc["max_err"] is not None
        for name, e in r["entries"].items():  # a peer that cannot run says why
            assert e["status"] == "ok" or e["reason"], (r["workload"], name, e)
    assert check["tests"]["slice"]["failures"] == 0
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and all(w in summary for w in WORKLOADS)


def test_a_spent_budget_skips_parts_but_still_writes_the_summary(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "forward.json").write_text("{}")  # an earlier run's: replaced
    proc = _script("--dry-run", "--out", str(tmp_path), timeout=120, GPU_CHECK_BUDGET_S="20")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    statuses = {line.split("\t")[0]: line.split("\t")[1]
                for line in (tmp_path / "parts.tsv").read_text().splitlines()}
    assert set(statuses.values()) == {"skipped"} and "bench-all" in statuses
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["results"] == [] and all(p["status"] == "skipped" for p in check["parts"])
    assert not (tmp_path / "bench" / "forward.json").exists()


def test_unknown_argument_is_an_error():
    proc = _script("--frobnicate", timeout=30)
    assert proc.returncode == 2 and "unknown argument --frobnicate" in proc.stderr


def _result(ms: dict[str, float | None]) -> dict:
    return {"workload": "w", "shape": {"L": 16}, "entries": {
        n: {"status": "ok" if t else "unavailable", "ms": t, "max_err": 0.0,
            "reason": None if t else "no CUDA"} for n, t in ms.items()}}


def test_best_peer_is_the_fastest_timed_peer():
    best = gpu_check.best_peer(_result({"attncc": 2.0, "sdpa-flash": 3.0, "flex": 1.0,
                                        "sdpa-cudnn": None}))
    assert best == {"attncc_ms": 2.0, "peer": "flex", "peer_ms": 1.0, "ratio": 0.5}
    assert gpu_check.best_peer(_result({"attncc": 2.0, "fla": None}))["peer"] is None


def _case(impls: dict) -> gpu_families.FamilyCase:
    return gpu_families.FamilyCase("toy", "toy", "toy", {"L": 2}, "float32",
                                   lambda: torch.ones(1, 2, dtype=torch.float64), impls)


def test_a_wrong_output_is_not_timed_and_a_missing_peer_says_why():
    def unavailable():
        raise Unavailable("not installed")
    timed = []
    r = gpu_families.run_case(_case({
        "attncc": lambda: (lambda: torch.ones(2, 2)),
        "wrong": lambda: (lambda: torch.full((2, 2), 1.5)),
        "missing": unavailable}), timer=lambda fn: timed.append(fn) or 1.0)
    e = r["entries"]
    assert e["attncc"]["status"] == "ok" and e["attncc"]["ms"] == 1.0 and len(timed) == 1
    assert e["wrong"]["status"] == "wrong" and e["wrong"]["ms"] is None
    assert e["missing"] == {"status": "unavailable", "ms": None, "max_err": None,
                            "reason": "not installed"}


def test_the_time_limit_keeps_the_entries_measured_before_it():
    def interrupted():
        raise KeyboardInterrupt
    r = gpu_families.run_case(_case({"attncc": lambda: (lambda: torch.ones(2, 2)),
                                     "slow": interrupted,
                                     "after": lambda: (lambda: torch.ones(2, 2))}), timer=None)
    assert r["interrupted"] and r["entries"]["attncc"]["status"] == "ok"
    assert "time limit" in r["entries"]["slow"]["reason"]
    assert r["entries"]["after"]["reason"].startswith("not run")
