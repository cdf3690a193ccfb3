"""The low-latency (NVSHMEM) custom calls lower for CUDA on a CPU-only machine.

Checks the target names, attributes and operand / result types that the
jax_ep.cuda.low_latency wrappers emit, the public ops' ragged layout around
them (with the mode faked as set up), and the pure-Python helpers of the
extension (region layout, info before init). Needs the NVSHMEM module
compiled in, not a GPU.
"""

import jax
import jax.numpy as jnp
import pytest

import jax_ep
from jax_ep.cuda import extension
from jax_ep.cuda import low_latency as ll
from lowering import custom_call, fake_low_latency, lower_for_cuda, lower_loss_grad_for_cuda

pytestmark = pytest.mark.skipif(
    not extension.nvshmem_available(),
    reason="jax_ep built without the NVSHMEM low-latency ops (JAX_EP_NVSHMEM=OFF or no wheel)",
)

R, M, E, K, T, H = 4, 16, 32, 4, 12, 256
L = E // R
AX = jnp.zeros((), jnp.int32)  # the EP axis index operand every target takes first


def _calls(fn, *shapes, target):
    text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if f"custom_call @{target}(" in line]
    assert len(calls) == 1, text
    return calls[0]


def _s(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def test_dispatch_bf16():
    call = _calls(lambda x, i: ll.dispatch_call(x, i, axis_index=AX, num_experts=E, max_tokens_per_rank=M,
                                                    num_ranks=R),
                  _s((T, H), jnp.bfloat16), _s((T, K), jnp.int32), target="jax_ep_ll_dispatch")
    assert f"(tensor<i32>, tensor<{T}x{H}xbf16>, tensor<{T}x{K}xi32>) -> " \
           f"(tensor<{L}x{R * M}x{H}xbf16>, " \
           f"tensor<{L}xi32>, tensor<{L}x{R * M}xi32>, tensor<{T}x{K}xi32>)" in call
    for attr in ("use_fp8 = false", "zero_fill = true", f"max_tokens_per_rank = {M} : i64",
                 f"num_experts = {E} : i64"):
        assert attr in call, call


def test_dispatch_fp8_has_scales():
    call = _calls(lambda x, i: ll.dispatch_call(x, i, axis_index=AX, num_experts=E, max_tokens_per_rank=M,
                                                    use_fp8=True, num_ranks=R)[0],
                  _s((T, H), jnp.float32), _s((T, K), jnp.int32), target="jax_ep_ll_dispatch")
    assert f"tensor<{L}x{R * M}x{H}xf8E4M3FN>" in call
    assert f"tensor<{L}x{R * M}x{H // 128}xf32>)" in call
    assert "use_fp8 = true" in call


def test_split_dispatch_token_orders_halves():
    def fn(x, i):
        tok = ll.dispatch_send_call(x, i, axis_index=AX, num_experts=E, max_tokens_per_rank=M)
        return ll.dispatch_recv_call(tok, i, axis_index=AX, hidden=H, x_dtype=x.dtype, num_experts=E,
                                         max_tokens_per_rank=M, num_ranks=R)

    shapes = (_s((T, H), jnp.float16), _s((T, K), jnp.int32))
    send = _calls(fn, *shapes, target="jax_ep_ll_dispatch_send")
    assert "-> tensor<2xi32>" in send
    recv = _calls(fn, *shapes, target="jax_ep_ll_dispatch_recv")
    assert f"(tensor<i32>, tensor<2xi32>, tensor<{T}x{K}xi32>) -> (tensor<{L}x{R * M}x{H}xf16>" \
        in recv


def test_combine_gather_and_split_combine():
    y = _s((L, R * M, H), jnp.bfloat16)
    idx, w = _s((T, K), jnp.int32), _s((T, K), jnp.float32)
    src, cnt = _s((L, R * M), jnp.int32), _s((L,), jnp.int32)
    slot = _s((T, K), jnp.int32)
    y_type = f"tensor<{L}x{R * M}x{H}xbf16>"
    call = _calls(lambda *a: ll.combine_call(*a, axis_index=AX, num_ranks=R), y, idx, w, src, cnt, slot,
                  target="jax_ep_ll_combine")
    assert f"-> tensor<{T}x{H}xbf16>" in call
    assert (f"(tensor<i32>, {y_type}, tensor<{T}x{K}xi32>, tensor<{T}x{K}xf32>, tensor<{L}x{R * M}xi32>, "
            f"tensor<{L}xi32>, tensor<{T}x{K}xi32>)") in call
    assert f"max_tokens_per_rank = {M} : i64" in call and f"num_experts = {E} : i64" in call
    call = _calls(lambda y, i, s, c, sl: ll.gather_call(y, i, s, c, sl, axis_index=AX, num_ranks=R), y, idx,
                  src, cnt, slot, target="jax_ep_ll_gather")
    assert f"-> tensor<{T}x{K}x{H}xbf16>" in call

    def split(y, i, w, s, c):
        tok = ll.combine_send_call(y, s, c, axis_index=AX, num_ranks=R)
        return ll.combine_recv_call(tok, i, w, axis_index=AX, hidden=H, y_dtype=y.dtype, num_experts=E,
                                        max_tokens_per_rank=M)

    args = (y, idx, w, src, cnt)
    assert "-> tensor<2xi32>" in _calls(split, *args, target="jax_ep_ll_combine_send")
    recv = _calls(split, *args, target="jax_ep_ll_combine_recv")
    # the receive holds neither y nor the slots (y need not stay alive through the overlap)
    assert (f"(tensor<i32>, tensor<2xi32>, tensor<{T}x{K}xi32>, tensor<{T}x{K}xf32>) -> "
            f"tensor<{T}x{H}xbf16>") in recv


def test_cached_dispatch_optional_scale():
    x, idx = _s((T, H), jnp.float32), _s((T, K), jnp.int32)
    slot, cnt, scale = _s((T, K), jnp.int32), _s((L,), jnp.int32), _s((T, K), jnp.float32)
    kw = dict(axis_index=AX, num_experts=E, max_tokens_per_rank=M, num_ranks=R)
    plain = _calls(lambda *a: ll.dispatch_cached_call(*a, **kw), x, idx, slot, cnt,
                   target="jax_ep_ll_dispatch_cached")
    assert f"tensor<{L}xi32>) -> tensor<{L}x{R * M}x{H}xf32>" in plain
    scaled = _calls(lambda *a: ll.dispatch_cached_call(*a, **kw), x, idx, slot, cnt, scale,
                    target="jax_ep_ll_dispatch_cached")
    assert f"tensor<{L}xi32>, tensor<{T}x{K}xf32>) -> tensor<{L}x{R * M}x{H}xf32>" in scaled


def test_region_layout_and_info_without_init():
    mod = extension.nvshmem_module()
    info = mod.nvshmem_ll_info()
    assert info["initialized"] is False and info["allocated"] is False
    lay = mod.nvshmem_ll_layout(8, 128, 7168, 256, 8, 2, False)
    stride = 7168 * 2  # a bf16 row (>= the FP8 row + scales)
    assert lay["set_bytes"] >= 256 * 128 * stride
    assert lay["send_bytes"] == 0
    assert lay["total_bytes"] == lay["set_offset"] + 2 * lay["set_bytes"]
    # the streamed combine's arrival counters: u64 [2][M] between jpos and the sets
    assert lay["arrive_offset"] >= lay["jpos_offset"] + 2 * 128 * 8 * 4
    assert lay["set_offset"] >= lay["arrive_offset"] + 2 * 128 * 8
    with_send = mod.nvshmem_ll_layout(8, 128, 7168, 256, 8, 2, True)
    assert with_send["send_bytes"] >= 8 * 128 * 8 * stride
    assert mod.nvshmem_ll_region_bytes(8, 128, 7168, 256, 8, 2, True) == with_send["total_bytes"]
    # one expert per PE: a dispatch set (token-number index [E][M] + rows [R][M])
    # is larger than E * M rows
    one = mod.nvshmem_ll_layout(8, 128, 7168, 8, 8, 2, False)
    assert one["set_bytes"] >= 8 * 128 * 4 + 8 * 128 * stride > 8 * 128 * stride
    assert mod.ll_last_error() is None
    mod.nvshmem_finalize()  # no-op without init


# ---------------------------------------------------------------- ragged layout

N = R * M * min(K, L)


@pytest.fixture
def cuda_low_latency(monkeypatch):
    """The CUDA low-latency mode as if initialize had set it up (only traced here)."""
    fake_low_latency(monkeypatch, R, max_tokens_per_rank=M, hidden=H, top_k=K, num_experts=E)


def _all_calls(text, target):
    return [line for line in text.splitlines() if f"custom_call @{target}(" in line]


KW = dict(num_experts=E, axis_name="ep", max_tokens_per_rank=M, layout="ragged", backend="cuda")
ROUTING = (((T, K), jnp.int32), ((T, K), jnp.float32))


def _no_padded_rows(text):
    """The ragged layout moves no padded [L, R*M, ...] rows anywhere."""
    return f"tensor<{L}x{R * M}x{H}x" not in text


def test_ragged_dispatch_and_combine_are_the_kernels_own(cuda_low_latency):
    def body(x, idx, w):
        rx, cnt, h = jax_ep.low_latency_dispatch(x, idx, **KW)
        assert rx.shape == (N, H) and h.layout == "ragged"
        return jax_ep.low_latency_combine(rx, idx, w, h, backend="cuda")

    text = lower_for_cuda(body, R, ((T, H), jnp.bfloat16), *ROUTING)
    ragged = f"tensor<{N}x{H}xbf16>"
    dispatch = custom_call(text, "jax_ep_ll_dispatch")
    assert f"-> ({ragged}, tensor<{L}xi32>, tensor<{L}x{R * M}xi32>, " in dispatch
    assert "zero_fill = true" in dispatch  # the kernel zeroes the tail itself
    assert f"(tensor<i32>, {ragged}, " in custom_call(text, "jax_ep_ll_combine")
    assert _no_padded_rows(text)


def test_ragged_unpadded_dispatch_leaves_the_tail(cuda_low_latency):
    def body(x, idx, w):
        return jax_ep.low_latency_dispatch(x, idx, zero_padding=False, **KW)[0]

    text = lower_for_cuda(body, R, ((T, H), jnp.bfloat16), *ROUTING)
    assert "zero_fill = false" in custom_call(text, "jax_ep_ll_dispatch")


def test_ragged_fp8_dispatch_writes_both_parts_ragged(cuda_low_latency):
    def body(x, idx, w):
        (q, s), _, _ = jax_ep.low_latency_dispatch(x, idx, use_fp8=True, **KW)
        assert q.shape == (N, H) and s.shape == (N, H // 128)
        return q, s

    text = lower_for_cuda(body, R, ((T, H), jnp.bfloat16), *ROUTING)
    dispatch = custom_call(text, "jax_ep_ll_dispatch")
    assert f"-> (tensor<{N}x{H}xf8E4M3FN>, " in dispatch
    assert f"tensor<{N}x{H // 128}xf32>)" in dispatch


def test_ragged_split_forms(cuda_low_latency):
    def body(x, idx, w):
        rx, _, h = jax_ep.low_latency_dispatch_recv(jax_ep.low_latency_dispatch_send(x, idx, **KW))
        assert rx.shape == (N, H) and h.layout == "ragged"
        back = jax_ep.low_latency_combine_send(rx, h, backend="cuda")
        return jax_ep.low_latency_combine_recv(back, idx, w)

    text = lower_for_cuda(body, R, ((T, H), jnp.float16), *ROUTING)
    assert f"-> (tensor<{N}x{H}xf16>, " in custom_call(text, "jax_ep_ll_dispatch_recv")
    send = custom_call(text, "jax_ep_ll_combine_send")
    assert f"(tensor<i32>, tensor<{N}x{H}xf16>, " in send
    assert _no_padded_rows(text)


def test_ragged_gradients_lower(cuda_low_latency):
    """The VJPs on the ragged layout: the gather reads a ragged y, the cached
    dispatch writes ragged rows (zeroing the tail), and a combine."""
    def body(x, idx, w):
        rx, _, h = jax_ep.low_latency_dispatch(x, idx, **KW)
        return jax_ep.low_latency_combine(jnp.sin(rx), idx, w, h, backend="cuda")

    text = lower_loss_grad_for_cuda(body, R, T, H, K)
    ragged = f"tensor<{N}x{H}xf32>"
    assert f"(tensor<i32>, {ragged}, " in custom_call(text, "jax_ep_ll_gather")
    cached = custom_call(text, "jax_ep_ll_dispatch_cached")
    assert "zero_fill = true" in cached and f"-> {ragged}" in cached
    assert len(_all_calls(text, "jax_ep_ll_combine")) == 2  # forward, and dispatch's VJP
    assert _no_padded_rows(text)
