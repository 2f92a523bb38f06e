"""The communication SM budget ``num_comm_sms``: the compute kernels get the device's SMs minus the
communication's, passed as an argument (no state); the grouped GEMMs size their grids by it,
forward and backward (on whatever thread autograd runs the backward), deferred weight gradients
included; without a budget, the whole device."""
import threading

import pytest
import torch

from dualpipe_ext import sm_budget


def test_partition_sets_the_compute_budget_and_restores_it(monkeypatch):
    monkeypatch.setattr(sm_budget, "device_sms", lambda device: 132)
    dev = torch.device("cpu")
    assert sm_budget.compute_sms(dev, None) is None
    with sm_budget.sm_partition(dev, 20) as budget:
        assert budget == sm_budget.compute_sms(dev, 20) == 112
        with sm_budget.sm_partition(dev, 40) as inner:
            assert inner == sm_budget.compute_sms(dev, 40) == 92
        assert sm_budget.compute_sms(dev, 20) == 112
    assert sm_budget.compute_sms(dev, None) is None
    with sm_budget.sm_partition(dev, None) as budget:
        assert budget is None and sm_budget.compute_sms(dev, None) is None


def test_no_budget_on_a_device_without_sms():
    assert sm_budget.compute_sms(torch.device("cpu"), 20) is None


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "20"])
def test_one_validator_for_the_budget(bad):
    from dualpipe_ext.kernels.permute import permute
    from dualpipe_ext.overlap import OverlapConfig

    with pytest.raises(ValueError, match="num_comm_sms must be None or a positive int"):
        sm_budget.check_num_comm_sms(bad)
    with pytest.raises(ValueError, match=r"OverlapConfig\.num_comm_sms must be None or a positive int"):
        OverlapConfig(num_comm_sms=bad)
    with pytest.raises(ValueError, match="num_sms must be None or a positive int"):
        permute(torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.int64), 2, num_sms=bad)


def _record_gemms(monkeypatch, device_sms=16):
    from dualpipe_ext.kernels import grouped_mm as kernels

    seen = []
    monkeypatch.setattr(kernels, "grouped_mm", lambda *a, num_sms=None, **k: seen.append(("fwd", num_sms)) or
                        torch.zeros(a[0].shape[0], a[1].shape[1]))
    monkeypatch.setattr(kernels, "grouped_wgrad", lambda *a, num_sms=None, **k: seen.append(("wgrad", num_sms)) or
                        torch.zeros(a[2].shape[0], a[0].shape[1], a[1].shape[1]))
    monkeypatch.setattr(sm_budget, "device_sms", lambda device: device_sms)
    return seen


def test_grouped_mms_take_the_budget(monkeypatch):
    from dualpipe_ext.moe import grouped_mm

    seen = _record_gemms(monkeypatch)
    x, w, ends = torch.randn(5, 8), torch.randn(2, 4, 8), torch.tensor([2, 5])
    grouped_mm.grouped_mm(x, w, ends, "triton", num_comm_sms=6)
    grouped_mm.grouped_wgrad(torch.randn(5, 4), x, ends, "triton", num_comm_sms=6)
    grouped_mm.grouped_mm(x, w, ends, "triton")
    assert seen == [("fwd", 10), ("wgrad", 10), ("fwd", None)]


@pytest.mark.parametrize("deferred", [False, True])
def test_backward_gemms_take_the_budget_on_another_thread(monkeypatch, deferred):
    """The backward's GEMMs (input gradient, weight gradient) get the budget from the autograd
    context, also when the backward runs on a thread that never saw the forward's arguments."""
    from dualpipe_ext.moe.experts import grouped_linear
    from dualpipe_ext.utils import WeightGradStore

    seen = _record_gemms(monkeypatch)
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(2, 4, 8, requires_grad=True)
    out = grouped_linear(x, w, torch.tensor([2, 5]), "triton", num_comm_sms=6)
    assert seen == [("fwd", 10)]
    errors, deferred_funcs = [], []

    def backward():
        try:
            if deferred:
                with WeightGradStore.collect() as funcs:
                    out.sum().backward()
                deferred_funcs.extend(funcs)
            else:
                out.sum().backward()
        except Exception as e:  # reported on the test's thread
            errors.append(e)

    thread = threading.Thread(target=backward)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive() and not errors, errors
    if deferred:
        assert seen == [("fwd", 10), ("fwd", 10)] and w.grad is None and len(deferred_funcs) == 1
        deferred_funcs[0]()
    assert seen == [("fwd", 10), ("fwd", 10), ("wgrad", 10)]
    assert w.grad is not None and x.grad is not None


def test_moe_layer_passes_its_budget_to_every_gemm_and_comm_kernel(monkeypatch):
    """MoE(num_comm_sms=6) on one process: the expanding and reducing kernels run 6 programs,
    the grouped GEMMs (forward and backward) 16 - 6."""
    from dualpipe_ext.kernels import expand_reduce
    from dualpipe_ext.moe import MoE, MoEConfig

    seen = _record_gemms(monkeypatch)
    grids = []
    for name in ("permute", "combine"):
        real = getattr(expand_reduce, name)
        monkeypatch.setattr(expand_reduce, name,
                            lambda *a, _real=real, _name=name, num_sms=None, **k: grids.append((_name, num_sms))
                            or _real(*a, num_sms=num_sms, **k))
    config = MoEConfig(hidden=8, moe_intermediate=4, num_experts=2, topk=1, gemm_backend="triton")
    layer = MoE(config, num_comm_sms=6)
    layer(torch.randn(3, 8, requires_grad=True)).sum().backward()
    assert grids == [("permute", 6), ("combine", 6)]
    assert seen and all(sms == 10 for _, sms in seen), seen
    assert [kind for kind, _ in seen].count("wgrad") == 2 and [kind for kind, _ in seen].count("fwd") == 4


def test_nccl_options_bound_the_ctas():
    import torch.distributed as dist

    if not hasattr(dist, "ProcessGroupNCCL"):  # a CPU build of torch without NCCL: the helper says so
        with pytest.raises(AttributeError):
            sm_budget.nccl_options(20)
        return
    options = sm_budget.nccl_options(20)
    assert options.config.max_ctas == 20
