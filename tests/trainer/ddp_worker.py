"""Run under ``torchrun --nproc_per_node=2``: one distributed update, then each rank dumps its weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import preset_config
from trainer.run import Trainer, init_distributed


def main(out: Path) -> None:
    init_distributed()
    cfg = preset_config(
        "small-point-nav",
        {"tasks_per_update": "4", "epochs": "2", "minibatch_size": "256", "eval_tasks": "2"},
    )
    trainer = Trainer(cfg, out / "run", progress=False)
    rank = dist.get_rank()
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    record = trainer.train_one_update()
    params = [p.detach().clone() for p in trainer.model.parameters()]
    torch.save(
        {
            "initial": initial,
            "params": params,
            "tasks": [t.label for t in trainer.last_tasks],
            "steps": record["steps"],
        },
        out / f"rank{rank}.pt",
    )
    trainer.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
