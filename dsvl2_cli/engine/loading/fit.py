"""Fit before loading: the memory plan (memory_plan.py) of the quantization asked for against what
this process may use (host_memory.py), and the verdict: go ahead, a one-line refusal naming the
quantizations that would fit (MemoryFitError), or with allow_paging the same line as a warning;
`--quantize auto` takes the first of AUTO_ORDER that fits. runtime.plan_load makes this check once
per load, before any weight is read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ...errors import MemoryFitError
from ...quant_methods import AUTO_ORDER
from .host_memory import Available, available_memory, gb
from .memory_plan import MemoryPlan, plans_for_folder
from .oom import describe_oom  # noqa: F401  (app/terminal/exits.py reads it here)
from ..quant.format import choose_spec, read_spec
from ..native.vision_int8 import unavailable as vision_int8_unavailable


def _alternatives(plans: Mapping[str, MemoryPlan], chosen: str, available: Available) -> str:
    others = [(m, p) for m, p in plans.items() if m != chosen]
    fits = [f"--quantize {m} needs {gb(p.total)} (fits)" for m, p in others if p.total <= available.bytes]
    if fits:
        return "; ".join(fits)
    smallest = min(plans.values(), key=lambda p: p.total)
    hint = "" if smallest.method == chosen else f" (--quantize {smallest.method} needs {gb(smallest.total)})"
    return f"no quantization fits{hint}: use a smaller model, free memory, or raise the limit"


def check_fits(name: str, plan_by_method: Mapping[str, MemoryPlan], available: Available,
               method: str | None = None, *, allow_paging: bool = False) -> str | None:
    """None when `plan_by_method[method]` (default: the first) fits in `available`; else a
    MemoryFitError whose one-line message names the need, what is available and the methods of
    `plan_by_method` that fit. allow_paging=True: the same line returned as a warning instead."""
    method = next(iter(plan_by_method)) if method is None else method
    p = plan_by_method[method]
    if p.total <= available.bytes:
        return None
    message = (f"{name} needs {gb(p.total)} in {p.label()}, {gb(available.bytes)} is available "
               f"({available.source}); {_alternatives(plan_by_method, method, available)}")
    if allow_paging:
        return message.split(";")[0] + "; the weights will be paged from disk, which is slow"
    raise MemoryFitError(message)


def choose_quantization(name: str, plan_by_method: Mapping[str, MemoryPlan], available: Available, *,
                        allow_paging: bool = False) -> tuple[str, str]:
    """`--quantize auto`: the first of none, int8, int4 (those in `plan_by_method`) that fits, and a
    line saying so. None fits: the MemoryFitError of the smallest (or, allow_paging, it with a warning)."""
    order = [m for m in AUTO_ORDER if m in plan_by_method] + [m for m in plan_by_method if m not in AUTO_ORDER]
    for m in order:
        p = plan_by_method[m]
        if p.total <= available.bytes:
            return m, f"--quantize auto: {m} ({gb(p.total)} of {available.describe()})"
    smallest = min(order, key=lambda m: plan_by_method[m].total)
    warning = check_fits(name, {smallest: plan_by_method[smallest]}, available, allow_paging=allow_paging)
    return smallest, f"--quantize auto: {smallest}; {warning}"


@dataclass(frozen=True)
class Fit:
    """What `check_load` decided: the load may go ahead with `quantize` (what to pass on: the
    request, `auto` replaced by its choice), `plan` is the plan of the method in use."""

    quantize: str | None
    method: str  # the method in use: "none", "int8", "int4", "nf4" (a pre-quantized folder's own)
    plan: MemoryPlan
    available: Available
    note: str | None = None  # --quantize auto: what it chose, one line
    warning: str | None = None  # allow_paging: the refusal, as a one-line warning


def check_load(path: str | os.PathLike, name: str, dtype: torch.dtype, device: str | torch.device,
               quantize: str | None = None, *, allow_paging: bool = False, vision_int8: bool = False) -> Fit:
    """The check `load()` makes before reading any weight: the plan of `quantize` (None: the folder
    as it is; "auto": the first of none, int8, int4 that fits) against `available_memory(device)`.
    Too big: MemoryFitError, or with allow_paging the same line as `Fit.warning`. vision_int8: the
    opt-in int8 vision tower is asked for (counted where it will run: CPU, bf16, VNNI)."""
    auto = quantize is not None and str(quantize).lower() == "auto"
    folder = read_spec(path)
    available = available_memory(device)
    int8 = vision_int8 and vision_int8_unavailable(dtype, torch.device(device)) is None
    if auto:
        plans = plans_for_folder(path, dtype, device, vision_int8=int8)
        method, line = choose_quantization(name, plans, available, allow_paging=allow_paging)
        fits = plans[method].total <= available.bytes
        return Fit(method, method, plans[method], available, line if fits else None, None if fits else line)
    spec = choose_spec(quantize, folder, str(path))  # a method the folder cannot load fails here, first
    method = spec.method if spec else "none"
    wanted = AUTO_ORDER if method in AUTO_ORDER else (*AUTO_ORDER, method)
    plans = plans_for_folder(path, dtype, device, wanted, vision_int8=int8)
    warning = check_fits(name, plans, available, method, allow_paging=allow_paging)
    return Fit(quantize, method, plans[method], available, None, warning)
