"""Format specs: one short string (`int4:g32:asym`, `fp8_e4m3`, `mxfp4`, `nvfp4`) parsed in one place.

Grammar: NAME[:OPTION...] where OPTION is `gN` (groups of N along the input dimension), `tensor`
(one scale per tensor), `channel` (one scale per output channel, the default), `asym` / `sym`.
MX and NVFP4 formats have fixed blocks (32 and 16) and take no options.
"""
from __future__ import annotations

from dataclasses import dataclass

# name -> (kind, bits per code, fixed block size or None)
ELEMENTS: dict[str, tuple[str, int, int | None]] = {
    **{f"int{b}": ("int", b, None) for b in range(2, 9)},
    "int1": ("binary", 1, None),
    "ternary": ("ternary", 2, None),
    "fp8_e4m3": ("float", 8, None),
    "fp8_e5m2": ("float", 8, None),
    "fp6_e3m2": ("float", 6, None),
    "fp6_e2m3": ("float", 6, None),
    "fp4_e2m1": ("float", 4, None),
    "mxfp8": ("mx", 8, 32),  # element fp8_e4m3
    "mxfp8_e5m2": ("mx", 8, 32),
    "mxfp6": ("mx", 6, 32),  # element fp6_e2m3
    "mxfp6_e3m2": ("mx", 6, 32),
    "mxfp4": ("mx", 4, 32),  # element fp4_e2m1
    "mxint8": ("mx", 8, 32),
    "nvfp4": ("nvfp4", 4, 16),  # fp4_e2m1 elements, fp8_e4m3 block scales, one fp32 tensor scale
}

# element format inside each block format
MX_ELEMENT = {
    "mxfp8": "fp8_e4m3", "mxfp8_e5m2": "fp8_e5m2", "mxfp6": "fp6_e2m3", "mxfp6_e3m2": "fp6_e3m2",
    "mxfp4": "fp4_e2m1", "mxint8": "int8", "nvfp4": "fp4_e2m1",
}
ALIASES = {"fp8": "fp8_e4m3", "fp4": "fp4_e2m1", "fp6": "fp6_e2m3", "binary": "int1", "mxfp6_e2m3": "mxfp6",
           "mxfp8_e4m3": "mxfp8"}


@dataclass(frozen=True)
class Format:
    """What the numbers of a quantized tensor are: element type, scale granularity, symmetry."""

    name: str
    kind: str  # "int" | "binary" | "ternary" | "float" | "mx" | "nvfp4"
    bits: int  # bits per stored code
    granularity: str = "channel"  # "tensor" | "channel" | "group" (mx/nvfp4: "group" with a fixed size)
    group_size: int | None = None
    symmetric: bool = True

    def __str__(self) -> str:
        parts = [self.name]
        if self.kind in ("mx", "nvfp4"):
            return self.name
        if self.granularity == "group":
            parts.append(f"g{self.group_size}")
        elif self.granularity == "tensor":
            parts.append("tensor")
        if not self.symmetric:
            parts.append("asym")
        return ":".join(parts)

    @property
    def element(self) -> str:
        """Name of the element format (`mxfp4` -> `fp4_e2m1`)."""
        return MX_ELEMENT.get(self.name, self.name)


def parse_format(spec: "str | Format") -> Format:
    """Parse a short spec string; raises ValueError naming the problem."""
    if isinstance(spec, Format):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a format spec must be a non-empty string such as 'int4:g32', got {spec!r}")
    name, *opts = [p.strip() for p in spec.strip().lower().split(":")]
    name = ALIASES.get(name, name)
    if name not in ELEMENTS:
        raise ValueError(f"unknown number format {name!r} in spec {spec!r}; known: {', '.join(ELEMENTS)}")
    kind, bits, block = ELEMENTS[name]
    if block is not None:
        if opts:
            raise ValueError(f"{name} has fixed blocks of {block} and takes no options, got {spec!r}")
        return Format(name, kind, bits, "group", block, True)
    granularity, group, symmetric = "channel", None, True
    given: dict[str, str] = {}  # what each option decides -> the option that decided it
    for opt in opts:
        what = "granularity" if opt in ("tensor", "channel") or (opt.startswith("g") and opt[1:].isdigit()) else (
            "symmetry" if opt in ("asym", "sym") else None)
        if what in given:
            raise ValueError(f"format spec {spec!r} sets the {what} twice ({given[what]!r} and {opt!r}); give one")
        if what:
            given[what] = opt
        if opt.startswith("g") and opt[1:].isdigit():
            granularity, group = "group", int(opt[1:])
            if group < 1:
                raise ValueError(f"group size must be positive in {spec!r}")
        elif opt in ("tensor", "channel"):
            granularity, group = opt, None
        elif opt in ("asym", "sym"):
            symmetric = opt == "sym"
        else:
            raise ValueError(f"unknown option {opt!r} in format spec {spec!r}; use gN, tensor, channel, asym or sym")
    if not symmetric and kind != "int":
        raise ValueError(f"{name} is symmetric by construction; ':asym' applies to int2..int8 only ({spec!r})")
    return Format(name, kind, bits, granularity, group, symmetric)
