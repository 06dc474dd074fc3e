"""Cache keys and kernel names come from one module (attncc/backends/keys.py): one `cache_key`,
equal in every process, different across families, and changed by every input it names."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

import attncc
from attncc.backends import keys
from attncc.backends.triton import templating
from attncc.backends.triton.backward.kernel import source_key as backward_key
from attncc.backends.triton.forward import source_key as forward_key
from attncc.backends.triton.linear.chunked import source_key as chunked_key
from attncc.backends.triton.linear.recurrent import source_key as recurrent_key
from attncc.backends.triton.serve import source_key as serve_key
from attncc.ir.linear import LinearState
from attncc.passes.pipeline import run_spec_passes

ROOT = pathlib.Path(attncc.__file__).parent


def _plan(mask=None):
    return run_spec_passes(attncc.Attention(mask=attncc.causal() if mask is None else mask))


def _keys_text() -> str:
    plan = _plan()
    node = LinearState(rule="scalar_gate")
    return "\n".join([forward_key(plan), serve_key(plan), backward_key(plan, ()),
                      backward_key(plan, ("bias",)), recurrent_key(node), chunked_key(node)])


def test_keys_differ_across_families_and_grad_sets():
    lines = _keys_text().splitlines()
    assert len(set(lines)) == len(lines), lines


def test_keys_are_equal_in_another_process():
    code = "import tests.test_keys as t; print(t._keys_text())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT.parent).stdout
    assert out.strip() == _keys_text()


def test_every_input_changes_the_key(monkeypatch):
    base = keys.cache_key("triton", "spec", templates="t", printer=3, extra=["x"])
    variants = [keys.cache_key("triton-serve", "spec", templates="t", printer=3, extra=["x"]),
                keys.cache_key("triton", "spec2", templates="t", printer=3, extra=["x"]),
                keys.cache_key("triton", "spec", templates="u", printer=3, extra=["x"]),
                keys.cache_key("triton", "spec", templates="t", printer=4, extra=["x"]),
                keys.cache_key("triton", "spec", templates="t", printer=None, extra=["x"]),
                keys.cache_key("triton", "spec", templates="t", printer=3, extra=["y"])]
    assert base not in variants and len(set(variants)) == len(variants)
    monkeypatch.setattr(keys, "version_stamp", lambda: "attncc=0 torch=0 triton=0")
    assert keys.cache_key("triton", "spec", templates="t", printer=3, extra=["x"]) != base


def test_a_template_edit_changes_the_source_key(monkeypatch):
    plan = _plan()
    before = forward_key(plan)
    original = templating.template_source
    monkeypatch.setattr(templating, "template_source",
                        lambda name: original(name) + ("#" if name == "helpers.py.j2" else ""))
    assert forward_key(plan) != before


def test_version_stamp_names_the_versions():
    stamp = keys.version_stamp()
    assert f"torch={torch.__version__}" in stamp and "triton=" in stamp and "attncc=" in stamp


def test_names_and_dtypes():
    assert keys.kernel_name("attn_fwd", "causal&sw(4)", "0123456789abcdef") == \
        "attn_fwd_causal_sw_4__0123456789"
    assert keys.param_arg("w") == "p_w"
    assert keys.capture_arg_names("t", 2) == ("cap_t_ptr", ["cap_t_stride0", "cap_t_stride1"],
                                              ["cap_t_size0", "cap_t_size1"])
    assert keys.dtype_name(torch.bfloat16) == "bfloat16"
    assert [keys.triton_type(d) for d in ("float16", "bfloat16", "float32", "bool")] == \
        ["fp16", "bf16", "fp32", "u8"]
    assert [keys.parse_dtype(d) for d in ("fp16", torch.bfloat16, "float32")] == \
        ["float16", "bfloat16", "float32"]
    with pytest.raises(ValueError, match="unknown dtype"):
        keys.parse_dtype("float8")


def test_an_edit_of_the_generating_code_changes_the_stamp(tmp_path, monkeypatch):
    """A renderer edit (not a template, not the version) must not reuse sources the old code
    generated: the stamp hashes the package's .py, .j2 and .cuh text."""
    package = tmp_path / "attncc"
    (package / "backends").mkdir(parents=True)
    render = package / "backends" / "render.py"
    render.write_text("LINE = 'a'\n")
    (package / "templates.j2").write_text("{{ x }}\n")
    (package / "notes.txt").write_text("not code\n")
    monkeypatch.setattr(keys, "PACKAGE_ROOT", package)

    def stamp() -> str:
        keys.code_stamp.cache_clear()
        return keys.code_stamp()

    first = stamp()
    (package / "notes.txt").write_text("still not code\n")
    assert stamp() == first
    render.write_text("LINE = 'b'\n")
    second = stamp()
    assert second != first
    (package / "templates.j2").write_text("{{ y }}\n")
    third = stamp()
    assert third not in (first, second)
    (package / "helpers.cuh").write_text("#pragma once\n")
    assert stamp() not in (first, second, third)
    keys.code_stamp.cache_clear()


def test_the_real_stamp_covers_the_renderers():
    keys.code_stamp.cache_clear()
    assert (keys.PACKAGE_ROOT / "backends" / "triton" / "backward" / "render.py").is_file()
    assert f"code={keys.code_stamp()[:16]}" in keys.version_stamp()
