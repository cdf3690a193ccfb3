"""Processes that disagree at initialize get an error on every process, naming the difference.

Two CPU processes (jax.distributed + gloo): differing sizes or options, a
process that never calls, a setup step that fails on one; and the record
checks of the intranode peer exchange, which run on one process.
"""

import json

import pytest

import jax_ep
from jax_ep import _agreement
from jax_ep.cuda import intranode
from jax_ep.testing import run_multiprocess


def _run(target, *args, processes=2):
    results = run_multiprocess(f"agreement_workers:{target}", processes, local_devices=2,
                               timeout=120, args=args)
    for res in results:
        assert res.ok, res.describe()
    return [res.result for res in results]


def test_differing_sizes_raise_on_every_process_naming_field_and_values():
    for seen in _run("differing_sizes"):
        assert seen["type"] == "DisagreementError"
        msg = seen["message"]
        assert "max_tokens_per_rank (process 0: 128, process 1: 256)" in msg, msg
        assert "hidden" not in msg.split("Differences:")[1], msg


def test_differing_options_raise_on_every_process():
    for seen in _run("differing_options"):
        assert seen["type"] == "DisagreementError"
        assert "options" in seen["message"] and "'force_put': True" in seen["message"]


def test_the_same_config_passes():
    assert _run("same_config") == [None, None]


def test_a_process_that_never_initializes_gives_a_bounded_error():
    first, absent = _run("one_process_never_initializes", "1")
    assert absent is None
    assert first["type"] == "DisagreementError"
    assert "process 1 did not reach 'config'" in first["message"]
    assert first["seconds"] < 30


def test_a_step_that_fails_on_one_process_raises_on_all():
    ok_side, failing_side = _run("one_step_fails", "1")
    for seen in (ok_side, failing_side):
        assert seen["type"] == "DisagreementError"
        assert "a test step failed on 1 of 2 processes (process 1: OSError: no such device)" \
            in seen["message"]
    assert failing_side["cause"] == "OSError" and ok_side["cause"] is None


def test_a_second_initialize_needs_a_shutdown():
    jax_ep.initialize(backend="reference")
    try:
        with pytest.raises(RuntimeError, match="already initialized.*shutdown"):
            jax_ep.initialize()
        assert jax_ep.default_backend() == "reference"  # not silently reset
    finally:
        jax_ep.shutdown()
    jax_ep.initialize()
    jax_ep.shutdown()


def _record(**changes):
    record = dict(format=1, process=3, group=0, rank=2, ipc="ab" * intranode.IPC_HANDLE_BYTES)
    record.update(changes)
    return json.dumps(record).encode()


def test_a_valid_peer_record_gives_its_handle():
    assert intranode._peer_handle(_record(), 0, 2, 3, 0) == b"\xab" * 64


@pytest.mark.parametrize("raw", [
    b"\x80\x04pickle",                       # not JSON (a pickle, say)
    _record(format=2),                       # another jax_ep version
    _record(process=0),                      # claims to be this process
    _record(process=1),                      # not the process owning that rank
    _record(rank=1),                         # a record for another rank
    _record(ipc="ab" * 10),                  # a short handle
    _record(ipc="zz" * 64),                  # not hex
    _record(ipc=None),
    json.dumps([1, 2]).encode(),
])
def test_malformed_peer_records_are_refused(raw):
    with pytest.raises(_agreement.DisagreementError, match="EP group 0, rank 2"):
        intranode._peer_handle(raw, 0, 2, 3, 0)


def test_the_agreement_is_a_no_op_in_one_process():
    import jax

    mesh = jax.make_mesh((jax.device_count(),), ("ep",))
    _agreement.compare_configs(mesh, {"a": 1}, timeout_s=1)
    assert _agreement.step(mesh, "x", lambda: 7, timeout_s=1) == 7
    with pytest.raises(ValueError, match="boom"):
        _agreement.step(mesh, "x", lambda: (_ for _ in ()).throw(ValueError("boom")),
                        timeout_s=1)


def test_a_call_mesh_of_another_device_order_raises_at_trace_time():
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from jax_ep import _mesh

    devices = jax.devices()[:4]
    mesh = Mesh(np.array(devices), ("ep",))
    expected = _mesh.group_ids(mesh, "ep")
    with jax.set_mesh(Mesh(np.array(devices[::-1]), ("ep",))):
        with pytest.raises(ValueError, match="orders the devices of axis 'ep'.*same order"):
            _mesh.check_call_mesh("dispatch", "ep", expected)
    with jax.set_mesh(mesh):
        _mesh.check_call_mesh("dispatch", "ep", expected)
    _mesh.check_call_mesh("dispatch", "ep", expected)  # no mesh known: the kernels check
