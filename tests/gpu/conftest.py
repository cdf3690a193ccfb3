"""The CUDA MPS daemon fixture shared by the multi-process GPU tests; the workers' folder on sys.path."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers"))

from jax_ep.testing import external_launch, mps_daemon


@pytest.fixture(scope="module")
def mps():
    """The MPS daemon for this module's multi-process tests (none under a scheduler)."""
    if external_launch():
        yield None
        return
    with mps_daemon() as d:
        yield d
