import os

import pytest
import torch


if not torch.cuda.is_available():
    # Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors. The
    # variable is read when a kernel module is imported, so it is set before any test imports one.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # Keep the tiny model cache inside the test session, never in the user's home.
    if "QUANTBRIDGE_CACHE" not in os.environ:
        os.environ["QUANTBRIDGE_CACHE"] = str(config.rootpath / ".pytest_cache" / "quantbridge")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    from quantbridge.models import load_model

    return load_model("tiny", torch.device("cpu"), torch.float32)
