"""One error enum and one dtype wire table for both expert-parallel paths."""
from __future__ import annotations

import importlib

import pytest
import torch


def test_error_codes_are_distinct_and_named_by_both_paths():
    collective = importlib.import_module("dualpipe_ext.moe.dispatch")
    from dualpipe_ext.moe import ep_board
    from dualpipe_ext.moe.ep_errors import EPError

    assert len(EPError.__members__) == len(set(EPError))  # no two names share a value
    assert EPError.OK == 0 and EPError.DISAGREE == 99
    for table in (collective._DISPATCH_ERRORS, collective._COMBINE_ERRORS, ep_board._ERRORS):
        assert all(isinstance(code, EPError) and code != EPError.OK for code in table)
    # a code read back from the wire as a plain int finds its words
    assert ep_board._ERRORS[13] == "handle is not from this buffer"
    assert collective._DISPATCH_ERRORS[int(EPError.FP8_DTYPE)] == "x dtype for fp8"


def test_one_dtype_wire_table():
    from dualpipe_ext.kernels import _common
    collective = importlib.import_module("dualpipe_ext.moe.dispatch")
    from dualpipe_ext.moe import ep_buffer

    assert collective.WIRE_DTYPES is _common.WIRE_DTYPES is ep_buffer.WIRE_DTYPES is _common.FLOAT_DTYPES
    for i, dtype in enumerate(_common.WIRE_DTYPES):
        assert _common.dtype_code(dtype) == i and _common.code_dtype(i) is dtype
    with pytest.raises(ValueError, match="dtype must be one of"):
        _common.dtype_code(torch.int64)
