"""Attention backends. Each module answers "can you serve this call, and if not, why?" and "run it";
``attnkit.dispatch`` owns the registry and the choice."""
