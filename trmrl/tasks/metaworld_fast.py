"""Faster equivalents of two Meta-World v3 per-step computations, bound to a simulator instance.

Profiling a push-v3 step on the 2-core CPU box put most of its time in Python rather than in MuJoCo:
``touching_object`` loops over every contact in Python (called by ``evaluate_state`` at every step), and
the object's quaternion goes through ``scipy.spatial.transform.Rotation`` (validation, array dispatch) for
a single 3x3 matrix. :func:`speed_up` replaces both on one simulator instance (the class and every other
instance are untouched) with code that computes the same values:

* ``touching_object``: the same sums of constraint forces over the contacts between each gripper pad
  and the object, selected with array operations on MuJoCo's contact arrays instead of a Python loop;
* ``_get_quat_objects`` of the classes whose object quaternion is scipy's ``from_matrix(...).as_quat()``
  of one geom's orientation (:data:`OBJECT_GEOMS`): the same algorithm on the nine numbers (the largest
  of the diagonal and the trace picks the formula, then the quaternion is normalised; scipy's order
  ``x, y, z, w`` and sign). A matrix that scipy would first orthogonalise (off by more than its 1e-12
  tolerance) still goes through scipy.

Observations, rewards and ``info`` stay Meta-World's: ``tests/tasks/test_metaworld_fast.py`` steps a
patched and an unpatched simulator side by side with the benchmark's scripted policy.
"""

from __future__ import annotations

import math
import types
from typing import Any

import numpy as np
from numpy.typing import NDArray

OBJECT_GEOMS: dict[str, str] = {"reach-v3": "objGeom", "push-v3": "objGeom", "pick-place-v3": "objGeom"}
"""Env classes whose ``_get_quat_objects`` is scipy's quaternion of this geom's orientation matrix."""


def quat_from_matrix(matrix: NDArray[np.float64]) -> NDArray[np.float64]:
    """scipy's ``Rotation.from_matrix(matrix).as_quat()`` for one 3x3 rotation matrix (``x, y, z, w``).

    Example:
        >>> quat_from_matrix(np.eye(3)).tolist()
        [0.0, 0.0, 0.0, 1.0]
    """
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = np.asarray(matrix, dtype=np.float64).ravel().tolist()
    # scipy orthogonalises a matrix whose Gram matrix is not the identity within isclose(atol=1e-12)
    # (rtol 1e-5 against the identity's ones), and refuses a non-positive determinant: such a matrix
    # goes through scipy itself.
    diagonal = (
        m00 * m00 + m01 * m01 + m02 * m02,
        m10 * m10 + m11 * m11 + m12 * m12,
        m20 * m20 + m21 * m21 + m22 * m22,
    )
    off = (
        m00 * m10 + m01 * m11 + m02 * m12,
        m00 * m20 + m01 * m21 + m02 * m22,
        m10 * m20 + m11 * m21 + m12 * m22,
    )
    orthogonal = all(abs(g - 1.0) <= 1e-12 + 1e-5 for g in diagonal) and all(abs(g) <= 1e-12 for g in off)
    det = m00 * (m11 * m22 - m12 * m21) - m01 * (m10 * m22 - m12 * m20) + m02 * (m10 * m21 - m11 * m20)
    if not orthogonal or det <= 0:
        from scipy.spatial.transform import Rotation

        return np.asarray(Rotation.from_matrix(np.reshape(matrix, (3, 3))).as_quat())
    trace = m00 + m11 + m22
    decision = (m00, m11, m22, trace)
    choice = decision.index(max(decision))  # the first of equal maxima, as argmax
    if choice == 0:
        q = (1 - trace + 2 * m00, m10 + m01, m20 + m02, m21 - m12)
    elif choice == 1:
        q = (m10 + m01, 1 - trace + 2 * m11, m21 + m12, m02 - m20)
    elif choice == 2:
        q = (m20 + m02, m21 + m12, 1 - trace + 2 * m22, m10 - m01)
    else:
        q = (m21 - m12, m02 - m20, m10 - m01, 1 + trace)
    norm = math.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3])
    return np.array(q) / norm


def _touching_object(self: Any, object_geom_id: int) -> bool:
    """Meta-World's ``touching_object``: both gripper pads press on the object (positive summed
    constraint force over their contacts with it)."""
    contact = self.data.contact
    if len(contact.geom1) == 0:
        return False
    geom1, geom2 = contact.geom1, contact.geom2
    with_object = (geom1 == object_geom_id) | (geom2 == object_geom_id)
    forces = self.data.efc_force
    for pad in self._trmrl_pads:
        mine = with_object & ((geom1 == pad) | (geom2 == pad))
        if not float(sum(forces[contact.efc_address[mine]].tolist())) > 0:
            return False
    return True


def speed_up(sim: Any, env_name: str) -> Any:
    """Bind the faster equivalents to ``sim`` (a Meta-World v3 env of class ``env_name``); returns it."""
    sim._trmrl_pads = (sim.data.geom("leftpad_geom").id, sim.data.geom("rightpad_geom").id)
    sim.touching_object = types.MethodType(_touching_object, sim)
    geom = OBJECT_GEOMS.get(env_name)
    if geom is not None:
        gid = sim.data.geom(geom).id

        def _get_quat_objects(self: Any) -> NDArray[np.float64]:
            return quat_from_matrix(self.data.geom_xmat[gid])

        sim._get_quat_objects = types.MethodType(_get_quat_objects, sim)
    return sim
