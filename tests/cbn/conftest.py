import pytest

from tests.cbn.cuda_emulation import emulated_cuda_kernels


@pytest.fixture(params=['portable', 'fused-emulated'])
def kernel_set(request):
    """Run a test with the portable kernels and again with the CUDA branch (``kernels.FUSED``)
    through CPU emulations of the fused CUDA kernels (see cuda_emulation.py)."""
    if request.param == 'portable':
        yield 'portable'
    else:
        with emulated_cuda_kernels():
            yield 'fused'
