"""Task families for meta-RL: point-nav, MuJoCo locomotion (PEARL / variBAD) and Meta-World ML1/ML10/ML45.

>>> from trmrl.tasks import get_family
>>> family = get_family("halfcheetah-vel")
>>> tasks = family.sample_tasks("train", 4, seed=0)
>>> env = family.make_env(tasks[0])  # doctest: +SKIP
>>> env.set_task(tasks[1])           # doctest: +SKIP  (takes effect at the next reset)

Importing this package is cheap: MuJoCo models and Meta-World are only loaded when an environment or
a Meta-World task is first needed.
"""

from trmrl.tasks import locomotion, metaworld_tasks, point_nav
from trmrl.tasks.base import (
    Split,
    Task,
    TaskEnv,
    TaskFamily,
    TaskFamilyError,
    family_names,
    get_family,
    register_family,
)

__all__ = ["Split", "Task", "TaskEnv", "TaskFamily", "TaskFamilyError", "family_names", "get_family"]

for _family in (*point_nav.FAMILIES, *locomotion.FAMILIES, *metaworld_tasks.FAMILIES):
    register_family(_family)
del _family
