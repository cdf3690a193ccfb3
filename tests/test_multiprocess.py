"""The EP ops across 2 processes x 4 CPU devices (jax.distributed + gloo).

Under a scheduler (pytest started once per process, e.g. `srun -n 2 pytest`)
the same test runs in place instead of spawning workers.
"""

from jax_ep.testing import run_multiprocess


def test_ops_across_two_processes():
    results = run_multiprocess("mp_ep_workers:ops_against_oracle", 2, local_devices=4,
                               timeout=300)
    for res in results:
        assert res.ok, res.describe()
        assert res.result == {"ranks": 8, "processes": 2}, res.result
