"""trmrl core: the TrMRL network, working memory, slot pool, checkpoints and task families.

The trainer (``trainer``) and the service (``service``) both build on this package, so the network
that is optimised is the network that is served.
"""

__version__ = "0.1.0"
