"""Fault injection: a save killed at any point leaves the target as the old or the new complete model,
bit-exact, once the next load has run; and that load leaves no hidden folder behind.

1. Every point: a child process forks one saver per filesystem operation of `save` (mkdir, write, chmod, fsync,
   rename, delete), which dies (os._exit, no cleanup) just before operation k.
2. Random points: a child saves two models in turn, forever, and is sent SIGKILL / SIGTERM after a random delay.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import modelpress as mp
from io_helpers import make, quantized, same_model

SRC = str(Path(mp.__file__).resolve().parents[1])
TESTS = str(Path(__file__).resolve().parents[1])

EVERY_POINT = r'''
import json, os, shutil, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import modelpress as mp
import modelpress.io.writer as writer
from io_helpers import make, quantized, same_model

target = Path(sys.argv[1])
a, b = quantized(seed=0), quantized(seed=1)
results, k = [], 0
while k < 200:
    k += 1
    shutil.rmtree(target.parent, ignore_errors=True)
    target.parent.mkdir()
    mp.save(a, target)
    pid = os.fork()
    if pid == 0:  # the saver: dies just before its k-th filesystem operation
        count = [0]
        def dying(fn):
            def op(*args, **kwargs):
                count[0] += 1
                if count[0] == k:
                    os._exit(137)
                return fn(*args, **kwargs)
            return op
        for name in ("mkdir", "replace", "rename", "rmdir", "unlink", "fsync", "chmod"):
            setattr(os, name, dying(getattr(os, name)))
        writer.save_file = dying(writer.save_file)
        mp.save(b, target, overwrite=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 137
    left_before = sorted(os.listdir(target.parent))
    try:
        m = mp.load(target, make())
        state = "old" if same_model(a, m) else "new" if same_model(b, m) else "other"
    except Exception as e:
        state = f"{type(e).__name__}: {e}"
    results.append({"k": k, "killed": killed, "state": state, "before": left_before,
                    "after": sorted(os.listdir(target.parent))})
    if not killed:
        break
print(json.dumps(results))
'''

LOOP = r'''
import sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import modelpress as mp
from io_helpers import quantized

target = Path(sys.argv[1])
models = [quantized(seed=0), quantized(seed=1)]
mp.save(models[0], target)
print("ready", flush=True)
i = 1
while True:
    mp.save(models[i % 2], target, overwrite=True)
    i += 1
'''


def child(script, *args, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, TESTS, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            text=True, **kw)


def test_killed_at_every_point_of_save(tmp_path):
    p = child(EVERY_POINT, tmp_path / "d" / "q")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0
    results = json.loads(out)
    assert len(results) >= 10, results  # the save has that many operations to die before
    for r in results[:-1]:
        assert r["killed"] and r["state"] in ("old", "new"), r
        assert r["after"] == ["q"], r  # the load cleaned every leftover
    assert not results[-1]["killed"] and results[-1]["state"] == "new"
    assert {r["state"] for r in results} == {"old", "new"}
    assert any(r["before"] != ["q"] for r in results)  # kills did leave work for the recovery


def test_killed_by_signals_at_random_points(tmp_path):
    rng = random.Random(0)
    a, b = quantized(seed=0), quantized(seed=1)
    sigs = [signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGTERM]
    targets = [tmp_path / str(i) / "q" for i in range(len(sigs))]
    procs = [child(LOOP, t) for t in targets]  # started together: their imports overlap
    for p, sig in zip(procs, sigs):
        assert p.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.3))
        p.send_signal(sig)
    for p, target in zip(procs, targets):
        p.wait(timeout=60)
        p.stdout.close()
        m = mp.load(target, make())
        assert same_model(a, m) or same_model(b, m)
        assert os.listdir(target.parent) == ["q"]
