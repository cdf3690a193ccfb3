"""The examples run as a user would run them, and the MoE example's loss falls."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_quickstart_round_trips_tokens():
    out = run("quickstart.py")
    assert "max |out - x| = 0.0" in out, out


def test_moe_training_loss_falls():
    out = run("train_moe.py", "--steps", "40")
    first, last = map(float, re.search(r"first loss ([\d.]+)\s+last loss ([\d.]+)", out).groups())
    assert last < 0.5 * first, (first, last)
