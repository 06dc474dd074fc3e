"""Test set-up: without a CUDA GPU, kernels run under Triton's CPU interpreter, and tests marked
`gpu` are skipped with a reason that pytest's summary (-ra) prints.

The GPU tier: on a machine with a CUDA GPU, every test that takes the `device` fixture (the kernel
correctness suite: it runs on "cuda" there, compiled, not interpreted) is marked `gpu` as well,
so `pytest -m gpu` runs the whole suite on the GPU. Without a GPU, `pytest -m gpu` selects only
the GPU-only tests and reports each as skipped with the reason."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede loading any kernel module
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's default warning


if "ATTNCC_CACHE_DIR" not in os.environ:  # tests never write into the user's ~/.cache/attncc
    os.environ["ATTNCC_CACHE_DIR"] = tempfile.mkdtemp(prefix="attncc-test-cache-")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        for item in items:
            if "device" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.gpu)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here: GPU tier skipped)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    if HAS_GPU:
        return f"attncc: GPU tier ON ({torch.cuda.get_device_name()})"
    return "attncc: no CUDA GPU: kernels run under TRITON_INTERPRET=1; gpu-marked tests skip"


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_GPU else "cpu"
