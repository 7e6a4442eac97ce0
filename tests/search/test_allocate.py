import itertools
import random

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.evaluate import model_bytes
from modelpress.search.allocate import allocate, solve, uniform
from modelpress.search.units import find_units, model_fixed_bytes


def _brute(options, budget):
    best = None
    for picks in itertools.product(*[range(len(o)) for o in options]):
        b = sum(options[i][j][0] for i, j in enumerate(picks))
        c = sum(options[i][j][1] for i, j in enumerate(picks))
        if b <= budget and (best is None or c < best[0] - 1e-12):
            best = (c, picks)
    return best


@pytest.mark.parametrize("unit", [1.0, 1e-7])  # 1e-7: divergences that small are typical; the solver's gap is not
@pytest.mark.parametrize("seed", range(12))
def test_knapsack_is_optimal_against_brute_force(seed, unit):
    rng = random.Random(seed)
    options = [[(rng.randint(1, 60), unit * rng.random()) for _ in range(rng.randint(1, 4))]
               for _ in range(rng.randint(1, 6))]
    smallest = sum(min(b for b, _ in o) for o in options)
    largest = sum(max(b for b, _ in o) for o in options)
    budget = rng.randint(smallest - 3, largest)
    picks = solve(options, budget)
    best = _brute(options, budget)
    if best is None:
        assert picks is None
        return
    assert sum(options[i][j][0] for i, j in enumerate(picks)) <= budget
    assert sum(options[i][j][1] for i, j in enumerate(picks)) == pytest.approx(best[0], rel=1e-9, abs=1e-9 * unit)


def test_knapsack_hand_made_table():
    # two layers; the cheap-in-cost way to save bytes is the insensitive layer's 2-bit option
    options = [[(100, 0.0), (50, 0.1), (25, 5.0)],   # sensitive
               [(100, 0.0), (50, 0.01), (25, 0.02)]]  # insensitive
    assert solve(options, 200) == [0, 0]
    assert solve(options, 150) == [0, 1]
    assert solve(options, 75) == [1, 2]
    assert solve(options, 49) is None


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.Linear(32, 50))
    net[4].weight = net[0].weight  # tied: a 50 x 32 table used twice, stored once
    return net.eval()


def test_tied_weights_are_one_unit():
    units = find_units(_net())
    assert [u.name for u in units] == ["0", "1", "3"]
    assert units[0].members == ("0", "4") and units[0].kind == "embedding"


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_predicted_bytes_equal_model_bytes_after_applying(method):
    net = _net()
    units = find_units(net)
    ref = model_bytes(net)
    fixed = model_fixed_bytes(net, units)
    costs = {u.name: {"int8": 1.0, "int4:g32": 2.0, "int3:g32": 3.0, "int2:g32": 4.0} for u in units}
    costs["1"]["int8"] = 0.0
    for ratio in (2.0, 3.0, 4.0, 5.0):
        plan = allocate(units, costs, int(ref / ratio), fixed, ref, method=method)
        assert plan is not None and plan.nbytes <= int(ref / ratio)
        q = _net()
        calib = [torch.randint(0, 50, (4, 8)) for _ in range(2)]
        mp.compress(q, plan.to_recipe(), calib=calib, latency_repeats=1)
        assert model_bytes(q) == plan.nbytes, (ratio, plan.formats)
    assert allocate(units, costs, fixed + 10, fixed, ref) is None  # nothing fits


def test_uniform_plan_bytes():
    net = _net()
    units = find_units(net)
    plan = uniform(units, "int4:g32", model_fixed_bytes(net, units), model_bytes(net))
    q = _net()
    mp.quantize_(q, mp.QuantConfig(weights="int4:g32"))
    assert model_bytes(q) == plan.nbytes


def test_solver_output_below_python_does_not_reach_stdout():
    """HiGHS prints debug lines from C++ to file descriptor 1: `compress --json` must stay valid JSON."""
    import subprocess
    import sys

    code = ("import os, sys\nfrom modelpress.search.allocate import _quiet_stdout_fd\nprint('a', flush=True)\n"
            "with _quiet_stdout_fd():\n    os.write(1, b'HIDDEN\\n')\n    print('also hidden')\nprint('b')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "a\nb\n"


def test_overlapping_quiet_blocks_restore_stdout_once():
    """Threads entering and leaving the redirect out of order: fd 1 comes back when the last one leaves."""
    import subprocess
    import sys

    code = ("import os, threading, time\nfrom modelpress.search.allocate import _quiet_stdout_fd\n"
            "def a():\n    with _quiet_stdout_fd():\n        time.sleep(0.2)\n"
            "def b():\n    time.sleep(0.05)\n    with _quiet_stdout_fd():\n        os.write(1, b'HIDDEN')\n"
            "        time.sleep(0.3)\n"
            "ts = [threading.Thread(target=f) for f in (a, b)]\n[t.start() for t in ts]\n[t.join() for t in ts]\n"
            "os.write(1, b'visible')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "visible"
