"""EPBuffer exchanges replayable by a CUDA graph: every use of a slot launches its kernels with the
same host arguments (the epochs are device words the kernels read and the stream advances), and
no argument that changes between exchanges is specialised on, so the first exchange of a shape
compiles each kernel once. Under the interpreter, the launches are recorded and checked."""
from __future__ import annotations

from collections import defaultdict

import torch

from ep_cases import problem
from moe_dist_utils import run_ranks

EXPERTS, TOPK, HIDDEN, MAX_TOKENS, ROUNDS = 4, 2, 8, 5, 3
_KERNELS = {"ep_dispatch": ("_put_dispatch_kernel", "_recv_dispatch_kernel"),
            "ep_combine": ("_put_combine_kernel", "_recv_combine_kernel"), "ep_common": ("_wait_kernel",)}


def _record_launches(log):
    """Wrap every exchange kernel so that each launch appends (name, kernel, grid, args, kwargs) to ``log``."""
    import importlib

    for mod_name, names in _KERNELS.items():
        module = importlib.import_module(f"dualpipe_ext.kernels.{mod_name}")
        for name in names:
            kernel = getattr(module, name)

            class Recorder:
                def __init__(self, name=name, kernel=kernel):
                    self.name, self.kernel = name, kernel

                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        log.append((self.name, self.kernel, grid, args, kwargs))
                        return self.kernel[grid](*args, **kwargs)
                    return launch

            setattr(module, name, Recorder())


def _host_args(args, kwargs):
    """What a launch passes from the host, tensors by dtype and shape (a graph keeps their storage)."""
    def one(a):
        return ("tensor", a.dtype, tuple(a.shape)) if isinstance(a, torch.Tensor) else a
    return tuple(one(a) for a in args), tuple(sorted((k, one(v)) for k, v in kwargs.items()))


def _specialisation_keys(log, honour_do_not_specialize=True):
    """Per kernel, {constexpr values: set of Triton specialisation keys} of the recorded launches, as a
    compiled (not interpreted) launch computes them."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    binders, keys = {}, defaultdict(lambda: defaultdict(set))
    for name, kernel, _, args, kwargs in log:
        if name not in binders:
            dns = kernel.kwargs.get("do_not_specialize") if honour_do_not_specialize else None
            jf = JITFunction(kernel.fn, do_not_specialize=dns)
            binders[name] = create_function_from_signature(jf.signature, jf.params, BaseBackend)
        _, spec, options = binders[name](*args, **kwargs)
        consts = tuple(str(v) for t, v in spec if t == "constexpr")
        keys[name][consts].add((str(spec), str(sorted(options.items()))))
    return keys


def _worker(rank, world):
    from dualpipe_ext import moe

    ep = moe.EPBuffer(None, max_tokens=MAX_TOKENS, hidden=HIDDEN, dtype=torch.float32, max_topk=TOPK, num_slots=2,
                      timeout_s=30)
    ep._exchanges.fused = True  # as on CUDA: put and receive launched together, the waits inside the kernels
    log = []
    _record_launches(log)
    ok = []
    for i in range(ROUNDS):  # two exchanges in flight per shape, then the backward of each
        inputs = [problem(rank, world, "random", EXPERTS, TOPK, HIDDEN, MAX_TOKENS, seed=10 * i + j)
                  for j in range(2)]
        for x, _, w in inputs:
            x.requires_grad_(True)
            w.requires_grad_(True)
        pend = [ep.dispatch(x, idx, w, EXPERTS, async_op=True) for x, idx, w in inputs]
        got = [p.wait() for p in pend]
        pend = [ep.combine(rx * (1 + rw.sum(1, keepdim=True)), h, async_op=True) for rx, _, rw, h in got]
        outs = [p.wait() for p in pend]
        for out, (x, idx, w) in zip(outs, inputs):
            out.pow(2).sum().backward()
            xc, wc = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
            rx, _, rw, h = moe.dispatch(xc, idx, wc, EXPERTS)
            ref = moe.combine(rx * (1 + rw.sum(1, keepdim=True)), h)
            ref.pow(2).sum().backward()
            ok.append(torch.allclose(out, ref, rtol=1e-6, atol=1e-6) and torch.allclose(x.grad, xc.grad, rtol=1e-5,
                                                                                        atol=1e-5)
                      and torch.allclose(w.grad, wc.grad, rtol=1e-5, atol=1e-5))
    uses = ep._exchanges.rings[0].uses + ep._exchanges.rings[1].uses
    epochs_ok = ep._exchanges.epochs.tolist() == uses
    # per kernel, slot and exchange (a dispatch carries routes, the backward of a combine does not)
    by_slot, launches = defaultdict(set), defaultdict(int)
    for name, _, grid, args, kwargs in log:
        where = (name, kwargs["epoch_word"], kwargs.get("ROUTES", kwargs.get("WEIGHTS")))
        by_slot[where].add((grid,) + _host_args(args, kwargs))
        launches[where] += 1
    keys = _specialisation_keys(log)
    control = _specialisation_keys(log, honour_do_not_specialize=False)
    ep.close()
    return (ok, epochs_ok, uses, {k: len(v) for k, v in by_slot.items()}, dict(launches),
            {n: [len(v) for v in c.values()] for n, c in keys.items()},
            {n: [len(v) for v in c.values()] for n, c in control.items()})


def test_every_use_of_a_slot_launches_with_the_same_host_arguments_and_compiles_once():
    for rank, (ok, epochs_ok, uses, variants, launches, keys, control) in enumerate(run_ranks(_worker, 2,
                                                                                               timeout_s=300)):
        assert all(ok), (rank, ok)
        assert epochs_ok, (rank, uses)
        # both slots of both rings used, every (kernel, slot) several times, with one set of host arguments
        assert {w for _, w, _ in launches} == {0, 1, 2, 3}, launches
        assert all(n >= ROUNDS for n in launches.values()), launches
        assert all(n == 1 for n in variants.values()), variants
        # one compilation per kernel and exchange shape (constexpr values), across slots and epochs
        assert set(keys) == {"_put_dispatch_kernel", "_recv_dispatch_kernel", "_put_combine_kernel",
                             "_recv_combine_kernel"}, keys
        assert all(n == [1] * len(n) for n in keys.values()), keys
        # the control: specialising on every argument, as Triton does by default, would compile again
        assert any(sum(control[n]) > sum(keys[n]) for n in keys), control
