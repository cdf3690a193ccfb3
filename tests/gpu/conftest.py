"""The CUDA MPS daemon fixture shared by the multi-process GPU tests."""

import pytest

from jax_ep.testing import external_launch, mps_daemon


@pytest.fixture(scope="module")
def mps():
    """The MPS daemon for this module's multi-process tests (none under a scheduler)."""
    if external_launch():
        yield None
        return
    with mps_daemon() as d:
        yield d
