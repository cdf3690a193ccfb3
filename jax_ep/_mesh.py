"""EP groups of a mesh: which devices form one EP axis, and each device's rank in it.

The EP axis is `axis_name`; every combination of the mesh's other axes is one
EP group, so a (data, ep) mesh has one group per data index.
"""

from __future__ import annotations

import numpy as np


def ep_groups(mesh, axis_name) -> np.ndarray:
    """[num_groups, R] array of devices: row g is EP group g in rank order."""
    if axis_name not in mesh.axis_names:
        raise ValueError(f"jax_ep: axis_name={axis_name!r} is not one of the mesh axes "
                         f"{tuple(mesh.axis_names)}.")
    axis = mesh.axis_names.index(axis_name)
    devices = np.asarray(mesh.devices)
    moved = np.moveaxis(devices, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def ep_coordinates(mesh, axis_name) -> dict:
    """device -> (EP group, rank)."""
    groups = ep_groups(mesh, axis_name)
    return {d: (g, r) for g, row in enumerate(groups) for r, d in enumerate(row)}
