"""Variant names: ``destseg`` (the baseline), ``pfadseg`` (all three modules) and
the ablation rows ``destseg+<modules>``, as model, trainer, benchmark and report
write and read them. Torch-free, so the report runs without it."""
from __future__ import annotations

MODULES = ("aff", "pcar", "rcm")  # PFADSeg's modules, in the order names list them

# Table 4's rows in the paper's order: its experiments 1-7 are none, RCM, AFF, PCAR,
# RCM+PCAR, AFF+PCAR and all three; AFF+RCM, which the paper left out, stands before
# all three so that the 8 combinations are complete.
ABLATION = ("destseg", "destseg+rcm", "destseg+aff", "destseg+pcar", "destseg+pcar+rcm",
            "destseg+aff+pcar", "destseg+aff+rcm", "pfadseg")


def variant_name(modules: tuple[str, ...] | list[str]) -> str:
    """The name of a module combination: pfadseg, or destseg+<modules> in MODULES order."""
    on = [m for m in MODULES if m in modules]
    return "pfadseg" if len(on) == len(MODULES) else "+".join(["destseg", *on])


def modules_of(variant: str) -> tuple[str, ...] | None:
    """The modules of a variant name (``destseg+aff+rcm`` -> ``("aff", "rcm")``;
    ``+aff`` is short for ``destseg+aff``), or None when the name is not a module
    combination."""
    name = variant.strip().lower()
    if name == "pfadseg":
        return MODULES
    if name.startswith("+"):
        name = "destseg" + name
    base, *modules = name.split("+")
    if base != "destseg" or len(set(modules)) != len(modules) or not set(modules) <= set(MODULES):
        return None
    return tuple(m for m in MODULES if m in modules)
