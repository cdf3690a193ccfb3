"""jax_ep.flax: Flax NNX layers on the jax_ep ops (needs `pip install jax_ep[flax]`).

`MoE` is an expert-parallel mixture-of-experts feed-forward layer (router,
SwiGLU experts sharded over the mesh's expert axis, dispatch / combine or the
low-latency ops for decoding); `total_aux_loss(model)` sums the load-balancing
losses its layers wrote in their last call. `import jax_ep` does not import
this package, so flax stays optional.
"""

try:
    import flax  # noqa: F401
except ImportError as err:
    raise ImportError("jax_ep.flax needs flax: pip install 'jax_ep[flax]' (or pip install flax)."
                      ) from err

from .layer import AuxLoss, MoE, RoutingStats, total_aux_loss

__all__ = ["AuxLoss", "MoE", "RoutingStats", "total_aux_loss"]
