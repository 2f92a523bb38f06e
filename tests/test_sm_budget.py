"""The SM partition: inside sm_partition the compute kernels get the device's SMs minus the
communication's, and the grouped GEMMs size their grids by it; outside, the whole device."""
import torch

from dualpipe_ext import sm_budget


def test_partition_sets_the_compute_budget_and_restores_it(monkeypatch):
    monkeypatch.setattr(sm_budget, "device_sms", lambda device: 132)
    dev = torch.device("cpu")
    assert sm_budget.compute_sms(dev) is None
    with sm_budget.sm_partition(dev, 20) as budget:
        assert budget == sm_budget.compute_sms(dev) == 112
        with sm_budget.sm_partition(dev, 40):
            assert sm_budget.compute_sms(dev) == 92
        assert sm_budget.compute_sms(dev) == 112
    assert sm_budget.compute_sms(dev) is None
    with sm_budget.sm_partition(dev, None) as budget:
        assert budget is None and sm_budget.compute_sms(dev) is None


def test_grouped_mms_take_the_budget(monkeypatch):
    from dualpipe_ext.kernels import grouped_mm as kernels
    from dualpipe_ext.moe import grouped_mm

    seen = []
    monkeypatch.setattr(kernels, "grouped_mm", lambda *a, num_sms=None, **k: seen.append(("fwd", num_sms)) or
                        torch.zeros(a[0].shape[0], a[1].shape[1]))
    monkeypatch.setattr(kernels, "grouped_wgrad", lambda *a, num_sms=None, **k: seen.append(("wgrad", num_sms)) or
                        torch.zeros(a[2].shape[0], a[0].shape[1], a[1].shape[1]))
    monkeypatch.setattr(sm_budget, "device_sms", lambda device: 16)
    x, w, ends = torch.randn(5, 8), torch.randn(2, 4, 8), torch.tensor([2, 5])
    with sm_budget.sm_partition(torch.device("cpu"), 6):
        grouped_mm.grouped_mm(x, w, ends, "triton")
        grouped_mm.grouped_wgrad(torch.randn(5, 4), x, ends, "triton")
    grouped_mm.grouped_mm(x, w, ends, "triton")
    assert seen == [("fwd", 10), ("wgrad", 10), ("fwd", None)]


def test_nccl_options_bound_the_ctas():
    import pytest
    import torch.distributed as dist

    if not hasattr(dist, "ProcessGroupNCCL"):  # a CPU build of torch without NCCL: the helper says so
        with pytest.raises(AttributeError):
            sm_budget.nccl_options(20)
        return
    options = sm_budget.nccl_options(20)
    assert options.config.max_ctas == 20
