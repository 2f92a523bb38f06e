import os

import torch

# The GPU tests' ranks use cuda:0 together; their kernels must compile for the GPU, not run in
# Triton's interpreter (tests/conftest.py defaults it on for the CPU tests).
if torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "1"
