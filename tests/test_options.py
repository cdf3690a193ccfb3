"""jax_ep.Options: validation, the environment defaults, and what initialize / runtime_info do with it."""

import dataclasses

import jax
import pytest

import jax_ep
from jax_ep import Options


def test_defaults():
    o = Options()
    assert (o.force_put, o.system_scope, o.dependent_launch, o.streamed_combine,
            o.phase_trace, o.comm_stream) == (False, False, True, True, None, None)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Options().force_put = True


@pytest.mark.parametrize("field", ["force_put", "system_scope", "dependent_launch",
                                   "streamed_combine"])
def test_switches_must_be_bool(field):
    with pytest.raises(TypeError, match=field):
        Options(**{field: 1})


@pytest.mark.parametrize("bad", ["", 3])
def test_phase_trace_must_be_a_path_or_none(bad):
    with pytest.raises(TypeError, match="phase_trace"):
        Options(phase_trace=bad)


@pytest.mark.parametrize("env, field, value", [
    ({"JAX_EP_LL_FORCE_PUT": "1"}, "force_put", True),
    ({"JAX_EP_LL_SYS_SCOPE": "yes"}, "system_scope", True),
    ({"JAX_EP_LL_NO_PDL": "1"}, "dependent_launch", False),
    ({"JAX_EP_LL_NO_STREAM": "true"}, "streamed_combine", False),
    ({"JAX_EP_LL_TRACE": "/tmp/trace"}, "phase_trace", "/tmp/trace"),
    ({"JAX_EP_LL_FORCE_PUT": "0"}, "force_put", False),
    ({"JAX_EP_LL_NO_PDL": "false"}, "dependent_launch", True),
    ({"JAX_EP_LL_TRACE": ""}, "phase_trace", None),
])
def test_from_env(env, field, value):
    o = Options.from_env(env)
    assert getattr(o, field) == value
    others = {f.name for f in dataclasses.fields(Options)} - {field}
    assert all(getattr(o, f) == getattr(Options(), f) for f in others)


def test_from_env_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("JAX_EP_LL_NO_STREAM", "1")
    assert Options.from_env().streamed_combine is False


def test_initialize_takes_options_and_runtime_info_reports_them():
    mesh = jax.make_mesh((jax.device_count(),), ("ep",))
    given = Options(force_put=True, streamed_combine=False)
    try:
        jax_ep.initialize(mesh, axis_name="ep", options=given)
        info = jax_ep.runtime_info()
        assert info["initialized"] and info["options"] is given
        assert info["intranode"] is None and info["low_latency"] is None  # CPU: nothing set up
    finally:
        jax_ep.shutdown()
    assert jax_ep.runtime_info()["initialized"] is False


def test_initialize_without_options_uses_the_environment(monkeypatch):
    monkeypatch.setenv("JAX_EP_LL_SYS_SCOPE", "1")
    try:
        jax_ep.initialize()
        assert jax_ep.runtime_info()["options"] == Options(system_scope=True)
    finally:
        jax_ep.shutdown()


def test_initialize_rejects_other_option_types():
    with pytest.raises(TypeError, match="jax_ep.Options"):
        jax_ep.initialize(options={"force_put": True})


@pytest.mark.parametrize("good", [None, 1, 7, "collective"])
def test_comm_stream_takes_a_stream_number_or_collective(good):
    assert Options(comm_stream=good).comm_stream == good


@pytest.mark.parametrize("bad", [0, -1, True, 1.0, "1", "gpu_stream:1", "compute"])
def test_comm_stream_rejects_anything_else(bad):
    with pytest.raises(ValueError, match="comm_stream"):
        Options(comm_stream=bad)


def test_initialize_sets_the_comm_stream_and_shutdown_clears_it():
    from jax_ep.cuda import calls

    try:
        jax_ep.initialize(options=Options(comm_stream=2))
        assert calls._comm_stream == 2
    finally:
        jax_ep.shutdown()
    assert calls._comm_stream is None
