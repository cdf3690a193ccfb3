"""EP groups of a mesh: which devices form one EP axis, and each device's rank in it.

The EP axis is `axis_name`; every combination of the mesh's other axes is one
EP group, so a (data, ep) mesh has one group per data index.
"""

from __future__ import annotations

import numpy as np
from jax._src import mesh as _jax_mesh  # the concrete mesh of a trace, if any


def ep_groups(mesh, axis_name) -> np.ndarray:
    """[num_groups, R] array of devices: row g is EP group g in rank order."""
    if axis_name not in mesh.axis_names:
        raise ValueError(f"jax_ep: axis_name={axis_name!r} is not one of the mesh axes "
                         f"{tuple(mesh.axis_names)}.")
    axis = mesh.axis_names.index(axis_name)
    devices = np.asarray(mesh.devices)
    moved = np.moveaxis(devices, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def group_ids(mesh, axis_name) -> tuple:
    """The EP groups as device ids: ((ids of group 0 in rank order), ...)."""
    return tuple(tuple(int(d.id) for d in row) for row in ep_groups(mesh, axis_name))


def check_call_mesh(op, axis_name, expected) -> None:
    """Trace-time check, where the call's mesh is known (jax.set_mesh / use_mesh):
    its EP groups must be those `initialize` set up (`expected`, from group_ids).

    Under shard_map(mesh=...) the mesh is not visible at trace time; the kernels
    then check the call's EP axis index against the rank at run time.
    """
    mesh = _jax_mesh.get_concrete_mesh()
    if mesh is None or mesh.empty or axis_name not in mesh.axis_names:
        return
    got = group_ids(mesh, axis_name)
    if got != expected:
        raise ValueError(
            f"jax_ep.{op}: the mesh of this call orders the devices of axis {axis_name!r} as "
            f"{[list(g) for g in got]} but jax_ep.initialize set them up as "
            f"{[list(g) for g in expected]}; call the ops under the mesh given to initialize "
            f"(the same devices in the same order).")


def ep_coordinates(mesh, axis_name) -> dict:
    """device -> (EP group, rank)."""
    groups = ep_groups(mesh, axis_name)
    return {d: (g, r) for g, row in enumerate(groups) for r, d in enumerate(row)}
