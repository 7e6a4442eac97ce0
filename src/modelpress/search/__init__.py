"""Reaching a target: sensitivity analysis, allocation of formats under a byte budget, SensiMix, search."""
