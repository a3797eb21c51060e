import pytest
import torch

from tests.cbn.cuda_emulation import emulated_cuda_kernels

# On a machine with CUDA (tools/gpu_check.py) the matrix also runs every test on the GPU.
KERNEL_SETS = ['portable', 'fused-emulated'] + (['cuda'] if torch.cuda.is_available() else [])


@pytest.fixture(params=KERNEL_SETS)
def kernel_set(request):
    """Run a test with the portable kernels, again with the CUDA branch (``kernels.FUSED``)
    through CPU emulations of the fused CUDA kernels (see cuda_emulation.py), and where CUDA
    exists on the GPU itself: CUDA as the default device, so the test's tensors and modules
    (and its reference side) are built there and the real fused kernels run."""
    if request.param == 'portable':
        yield 'portable'
    elif request.param == 'cuda':
        torch.set_default_device('cuda')
        try:
            yield 'cuda'
        finally:
            torch.set_default_device(None)
    else:
        with emulated_cuda_kernels():
            yield 'fused'
