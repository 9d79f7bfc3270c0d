"""Host launchers and ``torch.library`` custom ops (fake + autograd) for the kernels in ``kernels/``."""
