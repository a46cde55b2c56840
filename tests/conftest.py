import os

import pytest
import torch

# The Triton kernels run on CPU tensors through the interpreter; the switch must be set before
# any @triton.jit decorator runs. On a CUDA machine the real compiler is used instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def single_thread():
    """One torch thread for the test (helpers_tiny.one_thread); modules that train tiny models use it
    for every test: pytestmark = pytest.mark.usefixtures("single_thread")."""
    from helpers_tiny import one_thread

    with one_thread():
        yield
