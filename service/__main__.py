"""``python -m service``: the same as ``trmrl-serve``."""

from service.cli import main

main()
