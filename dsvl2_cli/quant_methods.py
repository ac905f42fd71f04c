"""The quantization methods of the routed experts as the command line names them: each method's
name, its note in `--quantize`'s help, its group sizes and what it needs, and the order
`--quantize auto` tries. No torch here: the CLI builds its help from this table at start.

Each method is implemented in engine/quant/<name>.py (a `QuantMethod`: packed shapes, pack,
dequantize, the experts module and its kernel layouts) and listed in engine/quant/registry.py,
which refuses to import when the two lists differ. A name not in this table is an error
wherever a method is named (`unknown`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    note: str = ""  # after the name in --quantize's help, e.g. "fast on CPU"
    group_sizes: tuple[int, ...] = ()  # values per scale it accepts; () = one scale per output channel
    default_group: int | None = None
    needs: str | None = None  # a package it needs beyond dsvl2's own (its extra: dsvl2[quant])
    auto: bool = False  # tried by --quantize auto, in this table's order, after "none"


METHODS: tuple[Method, ...] = (
    Method("int8", auto=True),
    Method("int4", "fast on CPU", group_sizes=(32, 64, 128, 256), default_group=128, auto=True),
    Method("nf4", "bitsandbytes", group_sizes=tuple(2**i for i in range(5, 13)), default_group=64,
           needs="bitsandbytes"),
)
NAMES = tuple(m.name for m in METHODS)
AUTO_ORDER = ("none", *(m.name for m in METHODS if m.auto))  # --quantize auto takes the first that fits


def known(conjunction: str = "or") -> str:
    """The method names for a message: "int8, int4 or nf4"."""
    return f"{', '.join(NAMES[:-1])} {conjunction} {NAMES[-1]}" if len(NAMES) > 1 else NAMES[0]


def unknown(name: object) -> str:
    """The one-line message for a method not in this table (engine/quant raises it as a
    QuantizationError)."""
    return f"quantization method {name!r} is not known; use {known()}"


def get(name: str) -> Method | None:
    """The method called `name` (exactly: callers lower-case first), None when there is none."""
    return next((m for m in METHODS if m.name == name), None)


QUANTIZE_METAVAR = "|".join(("auto", "none", *NAMES))
QUANTIZE_HELP = ("Quantize the routed experts while loading: "
                 + ", ".join(f"{m.name} ({m.note})" if m.note else m.name for m in METHODS)
                 + f"; auto: the first of {', '.join(AUTO_ORDER)} that fits in memory. Default: the folder as it is.")
# `dsvl2 quantize`'s --method and --group-size (a folder must say its method: no auto, no none)
FOLDER_METAVAR = "|".join(NAMES)
GROUP_SIZE_HELP = ("Values per scale (default: "
                   + ", ".join(f"{m.name} {m.default_group}" for m in METHODS if m.default_group) + ").")
