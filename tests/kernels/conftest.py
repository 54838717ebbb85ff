"""The kernels tests' shared fixtures."""

import pytest

from lisa_kernels import _native


@pytest.fixture(params=["fallback", "native"])
def backend(request):
    if request.param == "native" and _native.load() is None:
        pytest.skip(f"native extension cannot be built here: {_native.failure_reason()}")
    return request.param
