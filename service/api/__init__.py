"""The HTTP layer: thin routes over :class:`service.core.catalogue.ModelRegistry` and the core beside it."""
