"""The HTTP layer: thin routes over :class:`service.core.registry.ModelRegistry` and the core beside it."""
