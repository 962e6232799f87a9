"""What every benchmark's command line and JSON start with: its parser, the machine it ran on, the date."""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose help is the benchmark's module docstring, kept as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def machine(**extra: Any) -> dict[str, Any]:
    """The machine a result came from (processor, CPUs, Python, load average now), plus ``extra``."""
    return {
        "summary": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        **extra,
    }


def stamp() -> str:
    """Now, as the results' ``date``."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
