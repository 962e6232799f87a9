"""``python -m trainer`` (and ``torchrun -m trainer``) runs ``trmrl-train``."""

from trainer.cli import train_main

raise SystemExit(train_main())
