"""The faster Meta-World per-step computations give Meta-World's own observations, rewards and info."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from trmrl.tasks import get_family
from trmrl.tasks.metaworld_fast import OBJECT_GEOMS, quat_from_matrix, speed_up

metaworld = pytest.importorskip("metaworld")
policies = pytest.importorskip("metaworld.policies")

SCRIPTED = {
    "push-v3": "SawyerPushV3Policy",
    "pick-place-v3": "SawyerPickPlaceV3Policy",
    "reach-v3": "SawyerReachV3Policy",
}


def test_the_quaternion_is_scipys_on_rotations_and_on_matrices_scipy_orthogonalises() -> None:
    rotations = Rotation.random(500, random_state=0).as_matrix()
    # Rotations near each of the four formulas' regions: identity, and half-turns about each axis.
    rotations = np.concatenate(
        [rotations, np.eye(3)[None], np.diag([1.0, -1, -1])[None], np.diag([-1.0, 1, -1])[None]]
    )
    for m in rotations:
        np.testing.assert_allclose(quat_from_matrix(m), Rotation.from_matrix(m).as_quat(), atol=1e-15)
    skewed = rotations[0] + 1e-6  # not orthogonal within scipy's tolerance: scipy's own path
    assert np.array_equal(quat_from_matrix(skewed), Rotation.from_matrix(skewed).as_quat())


@pytest.mark.parametrize("env_name", sorted(SCRIPTED))
def test_a_patched_simulator_steps_exactly_as_meta_worlds_own(env_name: str) -> None:
    """The benchmark's scripted policy (with noise) drives an original and a patched simulator with the
    same actions: every observation, reward, flag and info is equal, and the pads touch the object on
    some steps (so the contact test is exercised both ways where the class grasps)."""
    ml1 = metaworld.ML1(env_name, seed=0)
    original, patched = ml1.train_classes[env_name](), ml1.train_classes[env_name]()
    speed_up(patched, env_name)
    policy = getattr(policies, SCRIPTED[env_name])()
    rng = np.random.default_rng(0)
    touching = []
    for task in ml1.train_tasks[:2]:
        original.set_task(task)
        patched.set_task(task)
        obs, _ = original.reset()
        obs_p, _ = patched.reset()
        assert np.array_equal(obs, obs_p)
        for _ in range(original.max_path_length):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the scripted policy's "constants may be too high"
                action = np.clip(policy.get_action(obs) + rng.normal(0.0, 0.3, 4), -1, 1)
            step, step_p = original.step(action), patched.step(action)
            assert np.array_equal(step[0], step_p[0])
            assert step[1:4] == step_p[1:4]
            assert step[4] == step_p[4]
            touching.append(original.touching_main_object)
            assert patched.touching_main_object == touching[-1]
            obs = step[0]
    if env_name != "reach-v3":  # reach has no grasp: its pads need not touch anything
        assert any(touching) and not all(touching)


def test_every_meta_world_family_env_is_patched() -> None:
    family = get_family("ml1-push-fresh")
    env = family.make_env(family.sample_tasks("train", 1, 0)[0])
    try:
        sim = env.env
        assert "touching_object" in vars(sim) and "_get_quat_objects" in vars(sim)
        assert set(OBJECT_GEOMS) == set(SCRIPTED)
    finally:
        env.close()
