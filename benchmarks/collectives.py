"""The collectives in a compiled XLA program, read from its HLO text.

``jax.jit(step).lower(*args).compile().as_text()`` lists every collective
the program runs, with its result shapes and the device groups it spans.
`collectives` turns that into numbers (op, bytes, whether it sits inside a
conditional's branch, whether it crosses the data-parallel axis), so that
a test can count the reductions of a micro-batch step and of a window's
apply, and `jax_scale.py` can report the bytes each moves.

The device mesh is taken as Keras's: the batch axis first, devices numbered
row-major, so a group crosses the batch axis when it holds devices of
different rows (``device // devices_per_row``).
"""

from __future__ import annotations

import math
import re
from typing import Any

_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1}
_SHAPE = re.compile(r"\b(f64|f32|s32|u32|bf16|f16|pred)\[([\d,]*)\]")
_COLLECTIVE = re.compile(
    r"= (.*?) (all-reduce|reduce-scatter|all-gather|all-to-all|"
    r"collective-permute)(?:-start)?\("
)
_GROUPS = re.compile(
    r"replica_groups=(.*?), (?:use_global|to_apply|metadata|dimensions)"
)


def collectives(hlo: str, devices_per_row: int = 1) -> list[dict[str, Any]]:
    """Every collective of an HLO module, in order.

    Each is ``{"op", "bytes", "in_branch", "across_batch"}``: ``bytes`` the
    size of its result (per device), ``in_branch`` whether it runs inside a
    ``conditional``'s branch (the window's apply, under `jax.lax.cond`),
    ``across_batch`` whether its groups span the mesh's batch axis
    (``devices_per_row``: the size of the other mesh axes together).
    """
    branches = set()
    for match in re.finditer(r"branch_computations=\{([^}]*)\}", hlo):
        branches.update(name.strip().lstrip("%") for name in match.group(1).split(","))
    branches.update(re.findall(r"(?:true|false)_computation=%?([\w.-]+)", hlo))
    found = []
    computation = None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.-]+) .*\{$", line)
        if header:
            computation = header.group(1)
            continue
        match = _COLLECTIVE.search(line)
        if match is None:
            continue
        size = sum(
            math.prod(int(d) for d in dims.split(",") if d) * _BYTES[dtype]
            for dtype, dims in _SHAPE.findall(match.group(1))
        )
        groups = _GROUPS.search(line)
        found.append(
            {
                "op": match.group(2),
                "bytes": size,
                "in_branch": computation in branches,
                "across_batch": _across_batch(
                    groups.group(1) if groups else "", devices_per_row
                ),
            }
        )
    return found


def _across_batch(groups: str, devices_per_row: int) -> bool:
    if groups.startswith("mesh"):
        # XLA's own mesh, major axis first, and the axes reduced over.
        return "'axis_0'" in groups.rsplit("{", 1)[-1]
    lists = re.findall(r"\{([\d,]+)\}", groups)
    if not lists:
        return True  # no groups: every device
    first = [int(device) for device in lists[0].split(",")]
    return len({device // devices_per_row for device in first}) > 1


def instructions(hlo: str) -> int:
    """The program's size: its HLO instructions (fusions' bodies included)."""
    return sum(1 for line in hlo.splitlines() if re.match(r"^\s+(ROOT )?%\S+ = ", line))
