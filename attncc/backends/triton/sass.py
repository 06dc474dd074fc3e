"""Read what a compiled cubin does from its SASS (`cuobjdump -sass`, shipped with Triton), with
no GPU: which load instructions move Q/K/V, which loops there are and how many instructions an
iteration of each costs, and whether a loop touches local memory (register spills).

Used by the tests that hold the shipped kernels to pipelined loads and by the measurements in
docs/performance.md. A loop is a backward branch (`BRA` to a lower address); its body is every
instruction from the target to the branch, NOPs left out (they are padding, never issued).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
# the instructions that move data from global memory (LDGSTS: asynchronous copy into shared
# memory, cp.async; UTMALDG: a tensor-memory-accelerator load, TMA)
GLOBAL_LOADS = ("LDGSTS", "UTMALDG", "LDG")


@dataclass(frozen=True)
class Loop:
    start: int  # address of the branch target
    end: int  # address of the backward branch
    opcodes: Counter = field(compare=False)

    @property
    def instructions(self) -> int:
        return sum(self.opcodes.values())

    @property
    def spills(self) -> int:
        """Local-memory loads and stores in the body: registers spilled inside the loop."""
        return sum(n for op, n in self.opcodes.items() if op.split(".")[0] in ("LDL", "STL"))


@dataclass(frozen=True)
class Sass:
    instructions: list[tuple[int, str, str]]  # (address, opcode with modifiers, operands)

    def loads(self) -> Counter:
        """Global-memory load opcodes (with width modifiers, e.g. "LDG.E.U16") -> count."""
        return Counter(op for _, op, _ in self.instructions if op.split(".")[0] in GLOBAL_LOADS)

    def loops(self) -> list[Loop]:
        """Innermost loops (no backward branch inside), in address order."""
        spans = []
        for addr, op, operands in self.instructions:
            target = _BRANCH_TARGET.search(operands) if op.startswith("BRA") else None
            if target and int(target[1], 16) < addr:  # not the `BRA` to itself ending a kernel
                spans.append((int(target[1], 16), addr))
        inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1]
                                             for o in spans)]
        return [Loop(a, b, Counter(op for addr, op, _ in self.instructions
                                   if a <= addr <= b and not op.startswith("NOP")))
                for a, b in sorted(set(inner))]


def disassemble(cubin: bytes, cuobjdump: str | None = None) -> Sass:
    """The SASS of the (single-kernel) `cubin`; `cuobjdump` defaults to the one Triton ships."""
    if cuobjdump is None:
        import triton  # the tool ships inside triton's package; triton is a runtime dependency

        cuobjdump = triton.knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory(prefix="attncc-sass-") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([cuobjdump, "-sass", path], check=True, capture_output=True,
                              text=True).stdout
    return Sass([(int(m[1], 16), m[2], m[3]) for m in _LINE.finditer(text)])
