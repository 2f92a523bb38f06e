"""One check of a tensor argument for the whole package, kernels included: TypeError for what is not
a tensor, ValueError for a tensor of the wrong rank or dtype, metadata only."""
import ast
from pathlib import Path

import pytest
import torch

from dualpipe_ext import _checks
from dualpipe_ext._checks import check_tensor
from dualpipe_ext.kernels import _common
from dualpipe_ext.kernels.dispatch_layout import dispatch_layout
from dualpipe_ext.kernels.routing import route

ROOT = Path(__file__).resolve().parents[1]


def test_one_definition():
    assert _common.check_tensor is _checks.check_tensor
    defs = [str(p.relative_to(ROOT)) for base in ("dualpipe_ext", "kernels") for p in (ROOT / base).rglob("*.py")
            if any(isinstance(n, ast.FunctionDef) and n.name == "check_tensor" for n in ast.walk(ast.parse(p.read_text())))]
    assert defs == ["dualpipe_ext/_checks.py"]


def test_type_then_rank_then_dtype():
    x = torch.zeros(2, 3, dtype=torch.int64)
    assert check_tensor("x", x, ndim=2, dtypes=(torch.int64,)) is x
    with pytest.raises(TypeError, match=r"^x must be a torch.Tensor, got list$"):
        check_tensor("x", [[0, 1]], ndim=2)
    with pytest.raises(ValueError, match=r"^x must have 3 dimensions, got shape \(2, 3\)$"):
        check_tensor("x", x, ndim=3)
    with pytest.raises(ValueError, match=r"^x must have dtype in \(torch.float32, torch.bfloat16\), got torch.int64$"):
        check_tensor("x", x, dtypes=(torch.float32, torch.bfloat16))
    # metadata only: a tensor without storage passes
    check_tensor("x", torch.empty(4, 2, device="meta"), ndim=2, dtypes=(torch.float32,))


def test_kernels_raise_the_same_types():
    with pytest.raises(TypeError, match="topk_idx must be a torch.Tensor, got list"):
        dispatch_layout([[0, 1]], 8, 2)
    with pytest.raises(ValueError, match="topk_idx must have dtype in"):
        dispatch_layout(torch.tensor([[0, 1]], dtype=torch.int32), 8, 2)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor, got tuple"):
        route((1.0, 2.0), 1)
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        route(torch.randn(8), 1)
