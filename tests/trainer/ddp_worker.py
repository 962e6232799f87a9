"""Run under ``torchrun --nproc_per_node=2``: a few distributed updates, then each rank dumps its weights.

Usage: ``ddp_worker.py OUT PRESET UPDATES [KEY=VALUE ...]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import preset_config
from trainer.run import Trainer, init_distributed


def main(out: Path, preset: str, updates: int, overrides: dict[str, str]) -> None:
    init_distributed()
    torch.set_num_threads(1)
    cfg = preset_config(preset, overrides)
    trainer = Trainer(cfg, out / "run", progress=False)
    rank = dist.get_rank()
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    records, tasks, local_steps = [], [], []
    for _ in range(updates):
        before = trainer.steps
        records.append(trainer.train_one_update())
        tasks.append([t.label for t in trainer.last_tasks])
        local_steps.append(trainer.last_local_steps)
        assert trainer.steps > before
    params = [p.detach().clone() for p in trainer.model.parameters()]
    torch.save(
        {
            "initial": initial,
            "params": params,
            "tasks": tasks,
            "local_steps": local_steps,
            "steps": records[-1]["steps"],
            "obs_mean": trainer.model.obs_mean.clone(),
            "buffers": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        },
        out / f"rank{rank}.pt",
    )
    trainer.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    pairs = dict(item.split("=", 1) for item in sys.argv[4:])
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), pairs)
