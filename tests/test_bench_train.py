"""benchmarks/bench_train.py on CPU: its training step against the example's
Flax model (loss and gradients at one rank), the CUDA step's lowering (no XLA
collective, so 8 processes on one GPU can run it), the token, capacity,
parameter and memory arithmetic, the kernel attribution, and --dry-run."""

import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_train as bt  # noqa: E402  (puts examples/ on sys.path)
import train_moe_lm as lm  # noqa: E402
from _timing import mesh_of  # noqa: E402

CFG = dict(bt.DRY, ranks=1, remat=False)


def _from_example(d):
    """The example's nnx.Param state (or its gradients) as a pure dict -> the
    benchmark's parameter tree."""
    return dict(embed=d["embed"]["embedding"], pos=d["pos"], norm=d["norm"]["scale"],
                blocks=[dict(norm1=b["norm1"]["scale"], qkv=b["qkv"]["kernel"],
                             proj=b["proj"]["kernel"], norm2=b["norm2"]["scale"],
                             router=b["moe"]["router"], w_gate=b["moe"]["w_gate"],
                             w_up=b["moe"]["w_up"], w_down=b["moe"]["w_down"])
                        for b in (d["blocks"][i] for i in sorted(d["blocks"]))])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_one_rank_step_is_the_examples_step(dtype):
    # The benchmark computes in bfloat16, where two programs' reduction orders
    # differ by bf16 roundings in the gradients; float32 pins them down.
    from flax import nnx

    from jax_ep.flax import total_aux_loss

    args = lm.parse_args(["--layers", str(CFG["layers"]), "--hidden", str(CFG["hidden"]),
                          "--heads", str(CFG["heads"]), "--experts", str(CFG["experts"]),
                          "--top-k", str(CFG["top_k"]), "--ffn", str(CFG["ffn"]),
                          "--seq", str(CFG["seq_len"]), "--dtype", dtype])
    assert args.capacity_factor == bt.CAPACITY_FACTOR and args.aux_weight == bt.AUX_WEIGHT
    auto = (jax.sharding.AxisType.Auto,) * 2
    lm_mesh = jax.make_mesh((1, 1), ("data", "expert"), axis_types=auto,
                            devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    seqs = rng.integers(0, 256, (3, CFG["seq_len"] + 1)).astype(np.int32)

    def example_loss(model, seqs):
        logits = model(seqs[:, :-1])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, seqs[:, 1:]).mean()
        return nll + args.aux_weight * total_aux_loss(model), nll

    with jax.set_mesh(lm_mesh):
        model = lm.build_model(args, lm_mesh, "reference")
        (want, want_nll), grads = nnx.jit(nnx.value_and_grad(example_loss, has_aux=True))(
            model, jnp.asarray(seqs))
    params = _from_example(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    want_grads = _from_example(nnx.to_pure_dict(grads))

    # The benchmark's own initialisation has the example's parameters' shapes.
    mine = bt.init_params(jax.random.key(1), 0, CFG, CFG["experts"])
    assert jax.tree.structure(mine) == jax.tree.structure(params)
    assert jax.tree.map(jnp.shape, mine) == jax.tree.map(jnp.shape, params)

    mesh = mesh_of(jax.devices()[:1])

    def local(params, seqs):
        def loss_fn(p):
            logits, aux, _ = bt.forward(p, seqs[:, :-1], cfg=CFG, backend="reference",
                                        dtype=dtype)
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, seqs[:, 1:]).mean()
            return nll + bt.AUX_WEIGHT * aux, nll
        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    stacked = jax.tree.map(lambda a: jnp.asarray(a)[None], params)
    run = jax.jit(jax.shard_map(lambda p, s: jax.tree.map(lambda a: a[None], local(
        jax.tree.map(lambda a: a[0], p), s)), mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    (got, got_nll), got_grads = jax.tree.map(lambda a: np.asarray(a)[0],
                                             run(stacked, jnp.asarray(seqs)))
    assert 4.5 < float(want_nll) < 7.0  # ~ log(256) at initialisation
    np.testing.assert_allclose(got_nll, want_nll, rtol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got - got_nll > 0.01  # the load-balancing term is in
    tol = 3e-2 if dtype == "bfloat16" else 1e-4
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads),
                            jax.tree.leaves(want_grads)):
        w, where = np.asarray(w), jax.tree_util.keystr(path)
        assert np.abs(w).max() > 0, where
        assert np.abs(g - w).max() <= tol * np.abs(w).max(), where
        assert np.corrcoef(g.ravel(), w.ravel())[0, 1] > 0.999, where


def test_cuda_step_lowers_without_xla_collectives(monkeypatch):
    # 8 processes on one GPU cannot run XLA collectives: the whole step on the
    # CUDA backend must talk only through jax_ep's kernels.
    from jax_ep import _mesh
    from jax_ep.cuda import intranode

    if not intranode.compiled():
        pytest.skip("jax_ep built without the CUDA intranode ops")
    R = 8
    mesh = mesh_of(jax.devices()[:R])
    monkeypatch.setattr(intranode, "_buffers", intranode._Buffers(
        "ep", 1 << 40, tuple(range(R)), _mesh.group_ids(mesh, "ep")))
    cfg = dict(CFG, ranks=R)
    tx = bt.optimizer()
    sharded = NamedSharding(mesh, P("ep"))
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharded),
                         jax.eval_shape(lambda: bt.init_state(mesh, cfg, tx)))
    seqs = jax.ShapeDtypeStruct((R * cfg["batch"], cfg["seq_len"] + 1), jnp.int32,
                                sharding=sharded)
    collective = r"stablehlo\.(all_reduce|all_gather|all_to_all|collective_permute|reduce_scatter)"
    texts = {b: bt.make_train_step(mesh, cfg, b, tx).trace(state, seqs).lower(
        lowering_platforms=("cuda",)).as_text() for b in ("cuda", "reference")}
    assert re.findall(collective, texts["reference"])  # the check can see collectives
    assert re.findall(collective, texts["cuda"]) == []
    calls = re.findall(r"custom_call @(jax_ep_\w+)\(", texts["cuda"])
    L = cfg["layers"]
    assert calls.count("jax_ep_intranode_dispatch") == L  # forward, one per layer
    assert calls.count("jax_ep_intranode_dispatch_cached") == L  # combine's backward
    assert calls.count("jax_ep_intranode_combine") >= 2 * L  # forward + dispatch's backward


def test_tokens_and_capacity():
    assert bt.tokens_per_step(dict(batch=2, seq_len=1024), 8) == (2048, 16384)
    assert bt.tokens_per_step(dict(batch=3, seq_len=10), 1) == (30, 30)
    from jax_ep.flax import _shard

    for tokens, k, ranks in [(1024, 8, 8), (1024, 8, 1), (100, 2, 8), (7, 1, 64), (64, 2, 2)]:
        assert bt.capacity(tokens, k, ranks) == _shard.capacity(tokens, k, ranks, 1.25)
    assert bt.capacity(1024, 8, 8) == 8192 and bt.capacity(100, 2, 8) == 250


@pytest.mark.parametrize("ranks", [1, 2])
def test_parameter_count_is_the_state(ranks):
    mesh = mesh_of(jax.devices()[:ranks])
    params, _ = jax.eval_shape(lambda: bt.init_state(mesh, CFG, bt.optimizer()))
    held = sum(math.prod(a.shape) for a in jax.tree.leaves(params))
    counts = bt.param_counts(CFG, ranks)
    assert held == ranks * counts["total"]
    assert counts["total"] == counts["dense"] + counts["experts"]
    experts = sum(math.prod(a.shape) for b in params["blocks"] for k, a in b.items()
                  if k.startswith("w_"))
    assert experts == ranks * counts["experts"]


def test_ranks_draw_their_own_experts():
    L = CFG["experts"] // 2
    a, b = (bt.init_params(jax.random.key(0), r, CFG, L) for r in (0, 1))
    for x, y in zip(a["blocks"], b["blocks"]):
        assert not np.allclose(x["w_up"], y["w_up"]) and np.array_equal(x["qkv"], y["qkv"])
    assert np.array_equal(a["embed"], b["embed"])


def test_memory_estimate():
    H, E, F, S, K = 2048, 64, 1024, 1024, 8
    cfg = dict(bt.FULL, remat=False)
    assert (cfg["hidden"], cfg["experts"], cfg["ffn"], cfg["top_k"]) == (H, E, F, K)
    dense = 256 * H + S * H + H + 2 * (2 * H + 4 * H * H + H * E)
    assert bt.param_counts(cfg, 8) == dict(dense=dense, experts=2 * 3 * 8 * H * F,
                                           total=dense + 2 * 3 * 8 * H * F)
    one, eight = bt.memory_estimate(cfg, 1), bt.memory_estimate(cfg, 8)
    for m, ranks in ((one, 1), (eight, 8)):
        params = bt.param_counts(cfg, ranks)["total"]
        assert m["state"] == 12 * params and m["gradients"] == 4 * params
        assert m["per_process"] == sum(v for k, v in m.items() if k not in ("per_process",
                                                                             "total"))
        assert m["total"] == ranks * m["per_process"]
    # 8 ranks: the expert path's capacity x K slots (64 per token) dominate.
    slots = bt.capacity(S, K, 8) * K
    assert slots == 64 * S and eight["activations"] > 3 * slots * (4 * H + 8 * F + 4 * H)
    remat = bt.memory_estimate(dict(cfg, remat=True), 8)
    assert remat["activations"] < eight["activations"] and remat["state"] == eight["state"]
    assert bt.memory_estimate(dict(cfg, batch=2), 8)["activations"] > 1.9 * eight["activations"]
    # The docstring's figures are the estimate's.
    doc = " ".join(bt.__doc__.split())
    assert f"{eight['per_process'] / 1e9:.1f} GB per process, {eight['total'] / 1e9:.0f} GB " \
           f"for 8 processes" in doc
    assert f"({remat['total'] / 1e9:.0f} GB with --remat)" in doc
    assert f"{one['total'] / 1e9:.1f} GB for one process" in doc
    four = dict(cfg, layers=4)
    assert f"({bt.memory_estimate(dict(four, remat=True), 8)['total'] / 1e9:.0f} GB; " \
           f"{bt.memory_estimate(four, 8)['total'] / 1e9:.0f} GB without)" in doc


def test_kernel_names_and_shares():
    rows = [("void jax_ep::(anonymous namespace)::DispatchSendKernel<jax_ep::Bf16>(jax_ep::"
             "IntranodeComm, jax_ep::DispatchKernelArgs)", 4e-3, 2),
            ("_ZN6jax_ep12_GLOBAL__N_117CombineRecvKernelEv", 3e-3, 6),
            ("RouteChunkKernel(jax_ep::RouteParams, int*, bool)", 1e-3, 2),
            ("loop_fusion_3", 10e-3, 40), ("sm90_xmma_gemm_bf16bf16", 22e-3, 30)]
    assert bt.jax_ep_kernel_seconds(rows) == pytest.approx(8e-3)
    assert bt.jax_ep_kernel_seconds(rows[3:]) == 0
    assert bt.short_name(rows[0][0]) == "jax_ep::DispatchSendKernel"
    assert bt.short_name(rows[2][0]) == "RouteChunkKernel"
    assert bt.short_name("loop_fusion_3") == "loop_fusion_3"
    cfg = dict(batch=2, seq_len=512)
    row = dict(sec=0.1, kernel_sec=0.08, jax_ep_sec=0.02, xla_bytes=3.5e9)
    cells = [c.strip() for c in bt.table_row(8, "cuda", row, cfg).split("|")[1:-1]]
    assert cells == ["8", "cuda", "100.00", "10,240", "81,920", "80.00", "20.00", "25.0%",
                     "20.0%", "3.50 GB"]
    ref = [c.strip() for c in bt.table_row(1, "reference", row, cfg).split("|")[1:-1]]
    assert ref[5:9] == ["80.00", "n/a", "n/a", "n/a"]
    none = dict(row, kernel_sec=None, jax_ep_sec=None, xla_bytes=None)
    assert [c.strip() for c in bt.table_row(1, "cuda", none, cfg).split("|")[6:11]] == [
        "n/a"] * 5


def _rows(out):
    return [[c.strip() for c in line.split("|")[1:-1]]
            for line in out.splitlines() if re.match(r"^\| \d+ \|", line)]


@pytest.mark.parametrize("argv, ranks", [(["--layers", "1"], 1),
                                         (["--ranks", "2", "--remat", "--batch", "3",
                                           "--layers", "1"], 2)])
def test_dry_run(capsys, argv, ranks):
    assert bt.main(["--dry-run"] + argv) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert [r[:2] for r in rows] == [[str(ranks), "reference"]]
    cells = rows[0]
    batch = 3 if "--batch" in argv else bt.DRY["batch"]
    per_rank = batch * bt.DRY["seq_len"]
    ms, rank_rate, all_rate = float(cells[2]), *(float(c.replace(",", "")) for c in cells[3:5])
    assert ms > 0
    assert rank_rate == pytest.approx(per_rank / (ms / 1e3), rel=0.01, abs=1)
    assert all_rate == pytest.approx(ranks * rank_rate, rel=0.01, abs=ranks)
    assert cells[5:9] == ["n/a"] * 4  # no kernels on CPU
    assert re.fullmatch(r"\d+\.\d (MB|GB)", cells[9])
    assert f"command: python3 benchmarks/bench_train.py --dry-run {' '.join(argv)}".strip() in out
    assert f"batch {batch} per rank = {per_rank} tokens per rank" in out
    first, last = map(float, re.search(r"reference: loss ([\d.]+) after the first step, "
                                       r"([\d.]+) after", out).groups())
    assert 4.5 < first < 7.0 and math.isfinite(last)
    assert "XLA collectives cannot run between processes sharing one GPU" in out
    assert ("R > 1: no all-reduce of the dense parameters' gradients" in out) == (ranks > 1)
    assert ("remat per block" in out) == ("--remat" in argv)
    assert re.search(r"memory estimate per process: \d+\.\d (MB|GB) \(state", out)


def test_bad_arguments():
    for argv in (["--ranks", "3"], ["--top-k", "9"], ["--heads", "5"], ["--batch", "0"]):
        with pytest.raises(SystemExit):
            bt.main(["--dry-run"] + argv)
