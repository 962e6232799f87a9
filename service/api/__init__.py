"""The HTTP layer: thin routes over :class:`service.registry.ModelRegistry`."""
