"""Reaching a target: sensitivity analysis, allocation of formats under a byte budget, SensiMix, search.

- `Target` (also `mp.Target`): a recipe step that analyses, allocates (or searches), applies and checks.
- `analyse` / `Sensitivity` (sensitivity.py), `Probe` (probe.py), `hutchinson_trace` (hutchinson.py).
- `allocate` / `solve` / `Plan` (allocate.py): the exact-bytes knapsack and its result as a recipe.
- `SensiMix` (sensimix.py): 8-bit sensitive part, 1-bit rest.
- `run_study` (study.py): the Optuna study (optional extra `modelpress[search]`).
"""
from .allocate import Plan, allocate, solve
from .hutchinson import hutchinson_trace
from .probe import Probe
from .sensimix import SensiMix
from .sensitivity import Sensitivity, analyse
from .target import Target, TargetError
from .units import DEFAULT_FORMATS, Unit, find_units

__all__ = ["Target", "TargetError", "SensiMix", "Sensitivity", "analyse", "Probe", "hutchinson_trace", "Plan",
           "allocate", "solve", "Unit", "find_units", "DEFAULT_FORMATS"]
