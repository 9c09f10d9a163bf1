"""Suite-wide setup. Triton reads TRITON_INTERPRET when a kernel is decorated, so it
is set here, before any kernel module is imported, whenever no GPU is present."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
