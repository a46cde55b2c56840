import os

import torch

# The Triton kernels run on CPU tensors through the interpreter; the switch must be set before
# any @triton.jit decorator runs. On a CUDA machine the real compiler is used instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
