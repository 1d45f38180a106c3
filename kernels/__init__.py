"""Triton kernels of pyens, one file per op; installed as the subpackage ``pyens.kernels``."""
