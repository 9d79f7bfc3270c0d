"""Device code only: ``@triton.jit`` kernels (``fwd``, ``bwd``, ``common``) and the Gluon variants for Hopper
(``hopper/``)."""
