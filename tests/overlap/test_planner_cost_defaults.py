"""The component planner's default costs are written once, in the C++ core; ComponentCosts reads them."""
import ast
import dataclasses
import inspect

from dualpipe_ext import _C
from dualpipe_ext.overlap import config
from dualpipe_ext.overlap.config import ComponentCosts


def _field_defaults(module, cls_name):
    tree = ast.parse(inspect.getsource(module))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls_name)
    return {n.target.id: n.value for n in cls.body if isinstance(n, ast.AnnAssign) and n.value is not None}


def test_component_costs_default_to_the_planner_values():
    core = _C.PlanCosts()
    for f in dataclasses.fields(ComponentCosts):
        assert f.default == getattr(core, f.name), f.name
    for name, expr in _field_defaults(config, "ComponentCosts").items():
        assert not isinstance(expr, ast.Constant), f"ComponentCosts.{name} repeats a default"
    assert (core.attn, core.mlp, core.shared, core.prologue, core.epilogue, core.comm) == (1, 1, 0.5, 1, 1, 1)
