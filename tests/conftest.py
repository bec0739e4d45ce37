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
    from quantbridge.models.load import load_model

    return load_model("tiny", torch.device("cpu"), torch.float32)


@pytest.fixture()
def no_model_load(monkeypatch):
    """The model must not be loaded: the checks under test come first."""
    import quantbridge.models.load
    import quantbridge.run.convert

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")

    for module in (quantbridge.models.load, quantbridge.run.convert):  # convert binds the name at import
        monkeypatch.setattr(module, "load_model", refuse)


@pytest.fixture(scope="module")
def previous(tmp_path_factory, tiny):
    """A complete compare run (fp16 only, with its report) to copy as the previous run."""
    from cli_checks import FAST, invoke

    out = tmp_path_factory.mktemp("prev") / "run"
    r = invoke("compare", "tiny", "--backends", "fp16", *FAST, "--out", out)
    assert r.exit_code == 0, r.output
    return out
