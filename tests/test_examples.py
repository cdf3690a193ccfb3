"""The examples run as a user would run them, and the MoE examples' losses fall."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

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


@pytest.mark.skipif(importlib.util.find_spec("flax") is None,
                    reason="flax is not installed (pip install 'jax_ep[examples]')")
def test_moe_lm_learns_the_stdlib_and_plots(tmp_path):
    out = run("train_moe_lm.py", "--steps", "40", "--eval-every", "20",
              "--out", str(tmp_path / "lm.png"))
    first, last = map(float, re.search(r"first loss ([\d.]+)\s+last loss ([\d.]+)", out).groups())
    assert last < 0.75 * first, (first, last)
    assert "validation loss" in out and "tokens/s" in out
    assert (tmp_path / "lm.png").exists() or (tmp_path / "lm.csv").exists()
