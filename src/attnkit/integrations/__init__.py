"""Integrations with model libraries.

- :mod:`attnkit.integrations.hf`: register attnkit as a Hugging Face transformers attention implementation
  (``attn_implementation="attnkit"``).
- :mod:`attnkit.integrations.timm`: swap attnkit into timm Vision Transformers, with any attnkit mask or
  score mod.

Each module imports its library lazily, so importing attnkit never requires transformers or timm.
"""
