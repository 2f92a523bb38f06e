"""The default costs are written once, in the C++ core; every Python face reads them from the binding."""
import ast
import dataclasses
import inspect

from dualpipe_ext import _C
from dualpipe_ext.schedules import Costs, closed_form_bubble
from dualpipe_ext.schedules import analysis


def _field_defaults(module, cls_name):
    """The default expressions of a dataclass's fields, as written in its source."""
    tree = ast.parse(inspect.getsource(module))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls_name)
    return {n.target.id: n.value for n in cls.body if isinstance(n, ast.AnnAssign) and n.value is not None}


def test_simulator_costs_default_to_the_core_values():
    core = _C.Costs()
    for f in dataclasses.fields(Costs):
        assert f.default == getattr(core, f.name), f.name
        assert Costs().__getattribute__(f.name) == getattr(core, f.name)
    # not a literal typed a second time: every default is read off the binding
    for name, expr in _field_defaults(analysis, "Costs").items():
        assert not isinstance(expr, ast.Constant), f"Costs.{name} repeats a default instead of reading _C.Costs()"
    # the defaults are the model the docs describe: B = 2F, half of it W, FB = F + B
    assert (core.F, core.B, core.W, core.FB, core.P2P, core.overhead) == (1, 2, 1, 3, 0, 0)


def test_binding_defaults_are_the_struct_defaults():
    # the keyword defaults of the binding and the struct's defaults agree (both printed by the core)
    assert repr(_C.Costs()) == repr(_C.Costs(F=1, B=2, W=1, FB=3, P2P=0, overhead=0))
    durations = {t: _C.Costs().of(_C.Action.parse(t)) for t in ("F0.0", "B0.0", "B0.0z", "W", "F0.1+B1.0")}
    assert durations == {"F0.0": 1, "B0.0": 2, "B0.0z": 1, "W": 1, "F0.1+B1.0": 3}  # a backward input costs B - W


def test_closed_form_bubble_defaults_come_from_the_core():
    for name in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
        assert closed_form_bubble(name, 4) == _C.closed_form_bubble(name, 4)
        assert _C.closed_form_bubble(name, 4) == _C.closed_form_bubble(name, 4, _C.Costs())
    assert _C.closed_form_bubble("1f1b", 4, _C.Costs(F=2, B=3, W=1, FB=5)) == 3 * (2 + 3)
