"""Recipes and steps: the registry of step kinds, the Context steps share, and structural records."""
from .context import Context
from .recipes import BUILTIN_RECIPES, Recipe, load_recipe
from .steps import STEPS, EqualizeStep, FoldBNStep, QuantizeStep, Step, get_step

__all__ = ["Context", "Recipe", "load_recipe", "BUILTIN_RECIPES", "STEPS", "Step", "get_step",
           "QuantizeStep", "FoldBNStep", "EqualizeStep"]
