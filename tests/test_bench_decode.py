"""benchmarks/bench_decode_step.py and bench_ragged_layer.py on CPU: the no-comm
stand-in against jax_ep's reference backend (one rank) and the numpy oracle
(several ranks), the step it stands in for, the command-buffer options, the
kernel and floor arithmetic, the bars, and both --dry-runs (which need no GPU)."""

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_decode_step as ds  # noqa: E402
import bench_ragged_layer as rl  # noqa: E402
import jax_ep  # noqa: E402
from _timing import mesh_of  # noqa: E402
from jax_ep.testing import oracle  # noqa: E402

H = 16


def _routing(seed, tokens, experts, top_k):
    """One rank's x (float32), topk_idx with some -1 and repeated ids, weights."""
    return oracle.make_rank_inputs(seed, 0, tokens, H, experts, top_k, none_prob=0.15,
                                   duplicate_prob=0.25)


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_stand_in_is_the_dispatch_and_combine_of_one_rank(layout):
    # One rank: local_dispatch / local_combine are exactly jax_ep's reference ops.
    T, E, K = 6, 8, 3
    x, idx, w = _routing(1, T, E, K)
    y_seed = np.random.default_rng(2)
    mesh = mesh_of(jax.devices()[:1])

    def ref(x, idx, w, y_like):
        recv, count, handle = jax_ep.low_latency_dispatch(
            x, idx, num_experts=E, axis_name="ep", max_tokens_per_rank=T, layout=layout,
            backend="reference")
        y = y_like.reshape(recv.shape)
        return recv, count, jax_ep.low_latency_combine(y, idx, w, handle, backend="reference")

    N = T * min(K, E)
    shape = (N, H) if layout == "ragged" else (E, T, H)
    y_like = y_seed.standard_normal(shape).astype(np.float32)
    f = jax.jit(jax.shard_map(ref, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    recv, count, out = f(x, idx, w, y_like.reshape(shape[0], -1))

    my_recv, my_count, rows = ds.local_dispatch(
        jnp.asarray(x), jnp.asarray(idx), num_local=E, rows_per_expert=T, layout=layout,
        ragged_rows=N)
    np.testing.assert_array_equal(np.asarray(my_count), np.asarray(count))
    np.testing.assert_array_equal(np.asarray(my_recv), np.asarray(recv))
    assert my_recv.shape == shape
    mine = ds.local_combine(jnp.asarray(y_like), rows, jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(mine), np.asarray(out), rtol=1e-6, atol=1e-6)
    assert np.asarray(count).sum() > 0 and np.any(np.asarray(out))


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_stand_in_of_several_ranks_matches_the_oracle(layout):
    # R ranks: this rank's tokens on its L = E / R experts (id mod L) in
    # buffers of R * M rows per expert = the oracle's one rank with L experts
    # and max_tokens_per_rank R * M.
    R, T, E, K = 4, 5, 16, 3
    L = E // R
    x, idx, w = _routing(3, T, E, K)
    local = np.where(idx >= 0, idx % L, -1).astype(np.int32)
    want = oracle.low_latency_dispatch([x], [local], L, R * T, layout=layout)[0]
    N = oracle.low_latency_ragged_rows(1, R * T, K, L)
    recv, count, rows = ds.local_dispatch(
        jnp.asarray(x), jnp.asarray(idx), num_local=L, rows_per_expert=R * T, layout=layout,
        ragged_rows=R * T * min(K, L))
    assert recv.shape == ((N, H) if layout == "ragged" else (L, R * T, H))
    np.testing.assert_array_equal(np.asarray(count), want["recv_count"])
    np.testing.assert_array_equal(np.asarray(recv), want["recv_x"])
    y = np.random.default_rng(4).standard_normal(recv.shape).astype(np.float32)
    got = ds.local_combine(jnp.asarray(y), rows, jnp.asarray(w))
    expect = oracle.low_latency_combine([y], [local], [w], L, R * T, layout=layout)[0]
    np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-6, atol=1e-6)


def test_no_comm_step_is_the_jax_ep_step_on_one_rank():
    cfg = dict(ds.DRY, layers=2, experts=8, top_k=2, tokens=8, hidden=128, expert_width=32)
    mesh = mesh_of(jax.devices()[:1])
    args = ds.make_arrays(mesh, cfg)
    specs = (P("ep"), P(), P("ep"), P("ep"), P("ep"))
    outs = {}
    for kind in ("jax_ep", "no-comm"):
        step = ds.make_step(kind, backend="reference", layers=cfg["layers"],
                            num_experts=cfg["experts"], top_k=cfg["top_k"],
                            max_tokens=cfg["tokens"], layout="ragged")
        f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=P("ep")))
        outs[kind] = np.asarray(f(*args), np.float32)
    x0 = np.asarray(args[0], np.float32)
    assert outs["jax_ep"].shape == x0.shape
    assert np.abs(outs["jax_ep"] - x0).max() > 0.05  # the layers did something
    np.testing.assert_allclose(outs["no-comm"], outs["jax_ep"], rtol=2e-2, atol=2e-2)


def test_command_buffer_options():
    assert ds.compiler_options(True, "cpu") is None
    assert ds.compiler_options(False, "cpu") is None
    on, off = ds.compiler_options(True, "gpu"), ds.compiler_options(False, "gpu")
    assert set(on["xla_gpu_enable_command_buffer"].split(",")) == {
        "FUSION", "CUBLAS", "CUBLASLT", "CUSTOM_CALL", "CUDNN"}
    assert on["xla_gpu_graph_min_graph_size"] == 1
    assert off == {"xla_gpu_enable_command_buffer": "",
                   "xla_gpu_experimental_use_ragged_dot_fusion": True}
    assert ds.compiler_options(False, "gpu", "xla")[
        "xla_gpu_experimental_use_ragged_dot_fusion"] is False
    # XLA parses every set (it rejects a misspelt command type), on CPU too.
    for opts in (on, off, ds.compiler_options(True, "gpu", "xla")):
        assert float(jax.jit(lambda v: v * 2, compiler_options=opts)(jnp.float32(3))) == 6
    with pytest.raises(Exception, match="not a valid enum"):
        jax.jit(lambda v: v * 2, compiler_options={
            "xla_gpu_enable_command_buffer": "FUSION,CUSTOMCALL"})(jnp.float32(3))


def test_jax_ep_kernel_seconds():
    rows = [("void jax_ep::(anonymous namespace)::LLKernelEntry<jax_ep::LLDispatchKernel>",
             2e-5, 1),
            ("_ZN6jax_ep12RouteKernelEv", 3e-6, 1),
            ("loop_fusion_3", 5e-6, 2), ("cutlass_gemm_bf16", 1e-5, 3)]
    assert ds.jax_ep_kernel_seconds(rows) == pytest.approx(2.3e-5)
    assert ds.jax_ep_kernel_seconds(rows[2:]) == 0


def _table_rows(out):
    return [line for line in out.splitlines() if re.match(r"^\| \d+ \|", line)]


def _numbers(cell):
    return [float(v) for v in re.findall(r"\d+\.\d+", cell)]


@pytest.mark.parametrize("argv, ranks", [(["--ranks", "2"], 2),
                                         (["--layout", "padded", "--layers", "1"], 1)])
def test_decode_dry_run(capsys, argv, ranks):
    assert ds.main(["--dry-run"] + argv) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    keys = [tuple(c.strip() for c in r.split("|")[2:4]) for r in rows]
    assert keys == [("jax_ep (reference)", "on"), ("jax_ep (reference)", "off"),
                    ("no-comm", "on"), ("no-comm", "off")]
    layers = 1 if "--layers" in argv else ds.DRY["layers"]
    for r in rows:
        cells = r.split("|")
        assert cells[1].strip() == str(ranks)
        step, layer = float(cells[4]), float(cells[5])
        assert step > 0 and layer == pytest.approx(step / layers, abs=0.06)
        assert cells[6].strip() == "n/a" and cells[8].strip() == "n/a"  # no kernels on CPU
    assert "padded layout" in out if "padded" in argv else "ragged layout" in out
    assert re.search(r"bar: graphed / ungraphed step with jax_ep \(reference\): \d+\.\d\dx", out)
    assert "bar: wall / kernel time of the graphed step" in out
    assert "jax_ep (reference) - no-comm, graphs on:" in out


def test_decode_bad_arguments():
    with pytest.raises(SystemExit):
        ds.main(["--dry-run", "--ranks", "3"])  # 3 does not divide 8 experts
    with pytest.raises(SystemExit):
        ds.main(["--dry-run", "--top-k", "9"])


def test_expert_weights_and_floor():
    # DeepSeek's shape, 8 ranks: L = 32 local experts, 3 x 7168 x 2048 bf16 each.
    assert rl.expert_weight_bytes(32, 7168, 2048) == 32 * 3 * 7168 * 2048 * 2 == 2818572288
    assert rl.expert_weight_bytes(2, 3, 5, itemsize=1) == 2 * (3 * 5 * 2 + 5 * 3)
    assert rl.floor_seconds(4e9, 2e12) == pytest.approx(2e-3)


def test_bar_ratios():
    t = {"padded": {"dispatch": (10e-6, 5e-6), "experts": (1e-3, 9e-4),
                    "combine": (12e-6, 6e-6), "layer": (1.2e-3, 9.5e-4)},
         "ragged": {"dispatch": (10.5e-6, None), "experts": (2e-4, 1.4e-4),
                    "combine": (12e-6, 7e-6), "layer": (3e-4, 2e-4)}}
    got = {what: (ratio, met, basis) for what, ratio, _, met, basis in rl.bar_ratios(t, 1e-4)}
    assert got["ragged experts / floor"] == (pytest.approx(1.4), True, "GPU")
    assert got["padded layer / ragged layer"] == (pytest.approx(4.75), True, "GPU")
    # one operand without a kernel time: both in wall clock
    assert got["ragged dispatch / padded dispatch"] == (pytest.approx(1.05), True, "wall")
    assert got["ragged combine / padded combine"] == (pytest.approx(7 / 6), False, "GPU")
    t["ragged"]["experts"] = (2e-4, None)
    assert rl.bar_ratios(t, 1e-4)[0][1:] == (pytest.approx(2.0), "<= 1.5", False, "wall")


@pytest.mark.parametrize("argv, ranks", [(["--ranks", "2"], 2), (["--fp8"], 1)])
def test_ragged_layer_dry_run(capsys, argv, ranks):
    assert rl.main(["--dry-run"] + argv) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert [tuple(c.strip() for c in r.split("|")[1:4]) for r in rows] == [
        (str(ranks), "reference", "padded"), (str(ranks), "reference", "ragged")]
    for r in rows:
        cells = r.split("|")[4:9]
        walls = [_numbers(c)[0] for c in cells]
        assert all(v > 0 for v in walls) and all("n/a" in c for c in cells)
        assert walls[3] == pytest.approx(sum(walls[:3]), abs=0.2)  # the sum column
    assert ("FP8 dispatch" if "--fp8" in argv else "BF16 dispatch") in out
    assert float(re.search(r"copy: (\d+\.\d) GB/s", out).group(1)) > 0
    E, Hd, F = rl.DRY["experts"], rl.DRY["hidden"], rl.DRY["expert_width"]
    assert f"{E} x 3 x {Hd} x {F} x 2 B" in out
    for what in ("ragged experts / floor", "padded layer / ragged layer",
                 "ragged dispatch / padded dispatch", "ragged combine / padded combine"):
        assert re.search(re.escape(what) + r" +\d+\.\d\d +\(bar ", out), what
