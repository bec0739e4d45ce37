"""The one resolver compare, bench, convert, env and the vLLM plugin share."""

import pytest
import torch

from quantbridge.plugin import backend as registry
from quantbridge.plugin import resolve
from quantbridge.plugin.errors import UserError
from quantbridge.plugin.spec import QuantSpec

CPU = torch.device("cpu")


def test_reference_first_and_each_with_its_reason():
    rs = resolve.backends(["native", "tinygemm"], CPU)
    assert [r.name for r in rs] == [registry.reference_name(), "native", "tinygemm"]
    native, tiny = rs[1], rs[2]
    assert native.ok and native.kind == "backend"
    assert not tiny.ok and "CUDA" in tiny.reason
    with pytest.raises(UserError, match="backend tinygemm is unavailable: .*CUDA"):
        resolve.require(tiny)


def test_spec_problems_are_kept_and_raised_on_require():
    # Asked about a CUDA device, tinygemm's library check passes (torch has the op, on any
    # build): the spec is what stops it, kept as the reason and raised by require.
    r = resolve.backend("tinygemm", torch.device("cuda"), QuantSpec(group_size=-1))
    assert r.availability.ok and not r.ok
    assert "group-size" in r.spec_problem and r.reason == r.spec_problem
    with pytest.raises(UserError, match="group-size"):
        resolve.require(r)
    assert resolve.backend("native", CPU, QuantSpec(group_size=-1)).ok


def test_unknown_names_are_one_line_errors():
    with pytest.raises(UserError, match="nosuch"):
        resolve.backend("nosuch", CPU)
    with pytest.raises(UserError, match="nosuch"):
        resolve.kernel("nosuch", CPU)


def test_kernels_and_int4_runners():
    k = resolve.kernel("exllamav2", CPU)
    assert not k.ok and k.kind == "kernel"
    assert "exllamav2" in k.message()
    runners = resolve.int4_runners()
    assert {"native", "gptq", "awq"} <= set(runners) and registry.reference_name() not in runners
