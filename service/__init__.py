"""The trmrl policy service: checkpoints loaded onto the device, per-session memory in a slot pool,
every waiting step of a model evaluated in one batched forward pass, the v1 HTTP API in front.

Layout: ``config`` (settings), ``sessions`` (session table), ``engine`` (slot pool + micro-batcher),
``registry`` (models by name), ``api/`` (body parsing and thin routes), ``app`` (the FastAPI factory),
``cli`` (``trmrl-serve``).
"""
