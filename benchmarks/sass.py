"""Read what matters for speed out of `cuobjdump -sass` text: tensor-core instructions, the kind
of global loads, register spills (local-memory traffic) and the instructions per iteration of
each main loop.

Loops are found from backward branches: a `BRA` whose target address is at or before its own
address closes a loop `[target, branch]`. Two kinds of backward branch are not loops and are
dropped: the `BRA self` that ends every function, and the out-of-line blocks ptxas places after
the function's `EXIT` that branch back into the body (their range contains the unpredicated
`EXIT`). A *main loop* is a loop with a tensor-core instruction in it and no other such loop
inside it (the innermost loop that does the matrix products); its "instructions per iteration"
is the longest path from its first instruction to its back edge (NOPs excluded; a loop body
with if/else arms executes one arm per iteration; nested wait loops counted once). The static
size of the body (all arms) is kept too.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import triton

_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)", re.MULTILINE)
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_HEX = re.compile(r"0x([0-9a-f]+)")
MMA_OPS = ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "BGMMA", "DMMA")
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


@dataclass(frozen=True)
class Instr:
    """One SASS instruction: byte address, guard predicate ("" when none), opcode with its
    modifiers (`LDG.E.U16`), operand text."""

    addr: int
    pred: str
    op: str
    operands: str

    @property
    def base(self) -> str:
        return self.op.split(".", 1)[0]


def parse_functions(sass: str) -> dict[str, list[Instr]]:
    """{function name: its instructions in address order} from `cuobjdump -sass` output."""
    heads = list(_FUNCTION.finditer(sass))
    out = {}
    for i, head in enumerate(heads):
        body = sass[head.end(): heads[i + 1].start() if i + 1 < len(heads) else len(sass)]
        out[head[1]] = [Instr(int(m[1], 16), (m[2] or "").strip(), m[3], m[4].strip())
                        for m in _INSTR.finditer(body)]
    return out


def access_width(op: str) -> int:
    """Bytes moved per thread by a load/store opcode (`LDG.E.U16` -> 2, `STL.128` -> 16,
    `LDGSTS.E.BYPASS.128` -> 16, plain `LDG.E` -> 4)."""
    for part in reversed(op.split(".")[1:]):
        if part in _WIDTH:
            return _WIDTH[part]
    return 4


def load_kind(op: str) -> str | None:
    """A global-memory load's kind, or None for anything else: `TMA` (UTMALDG), `LDGSTS.<bits>`
    (asynchronous copy to shared memory, the sm_80 pipeline), `LDG.<bits>` (through registers)."""
    base = op.split(".", 1)[0]
    if base in ("UTMALDG", "UBLKCP"):
        return "TMA"
    if base == "LDGSTS":
        return f"LDGSTS.{8 * access_width(op)}"
    if base == "LDG":
        return f"LDG.{8 * access_width(op)}"
    return None


@dataclass
class Region:
    """Counts over a range of instructions: all (NOPs excluded), tensor-core ops by opcode,
    global loads by kind, local-memory (spill) stores/loads in instructions and bytes."""

    insts: int = 0
    path: tuple[int, int] | None = None  # (shortest, longest) path through a loop body
    mma: Counter = field(default_factory=Counter)
    loads: Counter = field(default_factory=Counter)
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    stl: int = 0
    ldl: int = 0

    def to_json(self) -> dict:
        return {"insts": self.insts, "path": list(self.path) if self.path else None,
                "mma": dict(self.mma), "loads": dict(self.loads),
                "stl": self.stl, "ldl": self.ldl, "spill_store_bytes": self.spill_store_bytes,
                "spill_load_bytes": self.spill_load_bytes}


def region(instrs: list[Instr]) -> Region:
    r = Region()
    for ins in instrs:
        if ins.base == "NOP":
            continue
        r.insts += 1
        if ins.base in MMA_OPS:
            r.mma[ins.op] += 1
        kind = load_kind(ins.op)
        if kind:
            r.loads[kind] += 1
        if ins.base == "STL":
            r.stl += 1
            r.spill_store_bytes += access_width(ins.op)
        elif ins.base == "LDL":
            r.ldl += 1
            r.spill_load_bytes += access_width(ins.op)
    return r


def paths(body: list[Instr], after: list[Instr] = ()) -> tuple[int, int]:
    """(shortest, longest) instruction count from a loop's first instruction to its back edge
    (the last), NOPs excluded: what one iteration executes when the body has if/else arms.
    Forward branches inside the body are followed; branches out of it leave the iteration,
    unless they go to an out-of-line block among `after` (the instructions past the loop) that
    comes back into the body further on: ptxas places some arms there (a straight run ending in
    a branch back), and that run counts; a nested loop's body counts once (its own back edge is
    not followed)."""
    index = {ins.addr: i for i, ins in enumerate(body)}
    outside = {ins.addr: i for i, ins in enumerate(after)}
    inf = len(body) + 1
    low, high = [inf] * len(body), [-1] * len(body)
    low[0] = high[0] = 0
    for i, ins in enumerate(body):
        if high[i] < 0:
            continue  # not reachable from the loop header without a back edge
        weight = ins.base != "NOP"
        here = (low[i] + weight, high[i] + weight)
        successors = []
        if ins.base == "BRA":
            target = _HEX.findall(ins.operands)
            address = int(target[-1], 16) if target else None
            j = index.get(address)
            if j is not None and j > i:
                successors.append((j, 0))
            elif address in outside:
                successors += [(j, extra) for j, extra in _detour(after, outside[address], index)
                               if j > i]
            if ins.pred and i + 1 < len(body):
                successors.append((i + 1, 0))
        elif (ins.base not in ("EXIT", "RET") or ins.pred) and i + 1 < len(body):
            successors.append((i + 1, 0))
        if i == len(body) - 1:
            return here
        for j, extra in successors:
            low[j] = min(low[j], here[0] + extra)
            high[j] = max(high[j], here[1] + extra)
    raise ValueError("the back edge is not reachable from the loop header")


def _detour(after: list[Instr], start: int, body_index: dict[int, int]
            ) -> list[tuple[int, int]]:
    """(body index, instructions run) of each way a straight out-of-line run starting at
    `after[start]` branches back into the loop body; [] when it ends another way."""
    found, count = [], 0
    for ins in after[start:]:
        count += ins.base != "NOP"
        if ins.base in ("EXIT", "RET") and not ins.pred:
            return found
        if ins.base != "BRA":
            continue
        target = _HEX.findall(ins.operands)
        j = body_index.get(int(target[-1], 16)) if target else None
        if j is not None:
            found.append((j, count))
        if not ins.pred:
            return found
    return found


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of each loop, outer before inner; back edges to one
    header are merged into the furthest."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    exits = [i for i, ins in enumerate(instrs) if ins.base == "EXIT" and not ins.pred]
    found: dict[int, int] = {}
    for i, ins in enumerate(instrs):
        if ins.base != "BRA":
            continue
        targets = _HEX.findall(ins.operands)
        if not targets:
            continue
        start = index.get(int(targets[-1], 16))
        if start is None or start >= i or any(start <= e <= i for e in exits):
            continue
        found[start] = max(found.get(start, i), i)
    return sorted(found.items(), key=lambda se: (se[0], -se[1]))


@dataclass
class FunctionReport:
    """One function's static profile: the whole body and each main loop."""

    name: str
    total: Region
    main_loops: list[tuple[int, int, Region]]  # (start addr, end addr, counts)
    n_loops: int

    def to_json(self) -> dict:
        return {"name": self.name, "n_loops": self.n_loops, "total": self.total.to_json(),
                "main_loops": [{"start": hex(s), "end": hex(e), **r.to_json()}
                               for s, e, r in self.main_loops]}


def analyse(name: str, instrs: list[Instr]) -> FunctionReport:
    spans = loops(instrs)
    with_mma = [(s, e) for s, e in spans
                if any(ins.base in MMA_OPS for ins in instrs[s:e + 1])]
    main = [(s, e) for s, e in with_mma
            if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in with_mma)]
    found = []
    for s, e in main:
        counts = region(instrs[s:e + 1])
        counts.path = paths(instrs[s:e + 1], instrs[e + 1:])
        found.append((instrs[s].addr, instrs[e].addr, counts))
    return FunctionReport(name, region(instrs), found, len(spans))


def disassemble(cubin: bytes | Path, cuobjdump: str) -> str:
    """`cuobjdump -sass` of a cubin (bytes are written to a temp file first)."""
    if isinstance(cubin, bytes):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            return disassemble(Path(f.name), cuobjdump)
    return subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True,
                          text=True).stdout


def cuobjdump_path() -> str:
    """The cuobjdump that ships with the installed Triton."""
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def toolchain(cuobjdump: str) -> str:
    """`triton <version>, cuobjdump <release>` for the report header."""
    text = subprocess.run([cuobjdump, "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release ([\d.]+)", text)
    return f"triton {triton.__version__}, cuobjdump {release[1] if release else '?'}"
