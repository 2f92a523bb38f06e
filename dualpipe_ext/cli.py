"""``dualpipe-ext``: draw, compare and trace pipeline schedules.

    dualpipe-ext schedule NAME --ranks R --chunks C --out FILE.svg [--costs F,B,W,FB,P2P]
    dualpipe-ext simulate --ranks R --chunks C [--costs F,B,W,FB,P2P] [--best] [--memory N]
    dualpipe-ext trace RANK0.json RANK1.json ... [--chrome OUT.json] [--svg OUT.svg] [--predict]
    dualpipe-ext demo [--steps N] [--schedule dualpipe|dualpipev] [--ep-path collective|buffer] ...

Also runnable as ``python -m dualpipe_ext.cli``. Bad input, and an optional package that a
command needs but is not installed (matplotlib for PNG and PDF pictures), end with one line
on standard error and exit status 2; set ``DUALPIPE_EXT_DEBUG=1`` to see tracebacks.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, NoReturn, Optional

__all__ = ["main"]

PROG = "dualpipe-ext"


class _Parser(argparse.ArgumentParser):
    """Reports a usage error as one line instead of the usage text plus the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _costs(text: Optional[str]):
    from dualpipe_ext.schedules import Costs

    return Costs() if text is None else Costs.parse(text)


def _check_folder(flag: str, path: str) -> None:
    """An output's folder must exist: a mistyped path is an error, not a new folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path!r}: the folder {folder} does not exist; create it first or pick another path")


def _cmd_schedule(args: argparse.Namespace) -> int:
    from dualpipe_ext.schedules import get_plan, simulate
    from dualpipe_ext.viz import draw_timeline
    from dualpipe_ext.viz.render import FORMATS

    if os.path.splitext(args.out)[1].lower() not in FORMATS:
        raise ValueError(f"--out {args.out!r}: expected a file name ending in one of {', '.join(FORMATS)}")
    _check_folder("--out", args.out)
    costs = _costs(args.costs)
    plan = get_plan(args.name, args.ranks, args.chunks)
    sim = simulate(plan, costs=costs)
    title = (f"{args.name}: {args.ranks} ranks, {args.chunks} micro-batches; "
             f"F={costs.F:g} B={costs.B:g} W={costs.W:g} FB={costs.FB:g} P2P={costs.P2P:g}; "
             f"makespan {sim.makespan:.4g}")
    drawing = draw_timeline(sim.timeline, args.out, schedule=args.name, title=title)
    cells = sum(len(row) for row in drawing.rows)
    print(f"wrote {args.out}: {len(drawing.rows)} ranks, {cells} compute actions, makespan {sim.makespan:.4g}")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from dualpipe_ext.schedules.compare import compare, format_table, pick_best

    if args.memory is not None and not args.best:
        raise ValueError("--memory applies to --best: add --best to pick a schedule within that memory")
    costs = _costs(args.costs)
    rows = compare(args.ranks, args.chunks, costs)
    best, why = pick_best(rows, args.memory) if args.best else (None, "")
    print(f"{args.ranks} ranks, {args.chunks} micro-batches; costs F={costs.F:g} B={costs.B:g} "
          f"W={costs.W:g} FB={costs.FB:g} P2P={costs.P2P:g}")
    print(format_table(rows, best))
    if args.best:
        if best is None:
            raise ValueError(f"--best: {why}")
        limit = "" if args.memory is None else f" within {args.memory} activations"
        print(f"\nbest{limit}: {best.name} (makespan {best.makespan:.4g}, peak activations {best.peak_activations})")
    if not any(not r.error for r in rows):
        raise ValueError(f"no schedule is valid for {args.ranks} ranks and {args.chunks} micro-batches")
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    from dualpipe_ext.viz.records import load_record, merge_step

    if not (args.chrome or args.svg or args.predict):
        raise ValueError("nothing to do: give --chrome OUT.json, --svg OUT.svg and/or --predict")
    for flag, path in (("--chrome", args.chrome), ("--svg", args.svg)):
        if path:
            _check_folder(flag, path)
    records = [load_record(p) for p in args.files]
    args.step_given = args.step is not None
    args.step = -1 if args.step is None else args.step
    run = merge_step(records, step=args.step)
    if args.chrome:
        from dualpipe_ext.viz.chrome import write_chrome_trace

        write_chrome_trace(run, args.chrome)
        print(f"wrote {args.chrome}: {run.ranks} ranks, step {run.step}")
    if args.svg:
        from dualpipe_ext.viz import draw_run

        drawing = draw_run(run, args.svg)
        print(f"wrote {args.svg}: {sum(len(row) for row in drawing.rows)} compute actions, step {run.step}")
    if args.predict:
        from dualpipe_ext.schedules.predict import format_prediction, predict

        # Every recorded step but the first (warm-up), unless --step picks one.
        num_steps = min(len(r["steps"]) for r in records)
        steps = [args.step] if args.step_given or num_steps == 1 else range(1, num_steps)
        runs = [merge_step(records, step=s) for s in steps]
        print(format_prediction(predict(runs)))
    return 0


def _parser() -> argparse.ArgumentParser:
    from dualpipe_ext.schedules import Costs, schedule_names

    p = _Parser(prog=PROG, description="Draw, compare and trace pipeline schedules.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    default = Costs()
    costs_help = ("costs F,B,W,FB,P2P of forward, backward, weight, overlapped forward+backward pair, transfer "
                  f"(default {default.F:g},{default.B:g},{default.W:g},{default.FB:g},{default.P2P:g})")

    s = sub.add_parser("schedule", help="draw a schedule's timeline (SVG, PNG or PDF)")
    s.add_argument("name", help="schedule name: " + ", ".join(schedule_names()))
    s.add_argument("--ranks", type=_positive, required=True, help="pipeline ranks (devices)")
    s.add_argument("--chunks", type=_positive, required=True, help="micro-batches per step")
    s.add_argument("--out", required=True, help="output file: .svg, .png or .pdf")
    s.add_argument("--costs", help=costs_help)
    s.set_defaults(func=_cmd_schedule)

    m = sub.add_parser("simulate", help="compare every schedule valid at a size")
    m.add_argument("--ranks", type=_positive, required=True, help="pipeline ranks (devices)")
    m.add_argument("--chunks", type=_positive, required=True, help="micro-batches per step")
    m.add_argument("--costs", help=costs_help)
    m.add_argument("--best", action="store_true", help="pick the fastest schedule (within --memory)")
    m.add_argument("--memory", type=_positive, help="most live activations per device allowed for --best")
    m.set_defaults(func=_cmd_simulate)

    t = sub.add_parser("trace", help="merge per-rank records of a run into a Chrome trace and a picture")
    t.add_argument("files", nargs="+", help="one record file per pipeline rank (written by the runtime)")
    t.add_argument("--chrome", help="write a Chrome trace JSON (open in Perfetto)")
    t.add_argument("--svg", help="draw the measured timeline (.svg, .png or .pdf)")
    t.add_argument("--step", type=int, default=None,
                   help="which recorded step to draw and export (default: the last; --predict: all but the first)")
    t.add_argument("--predict", action="store_true", help="compare the measured step time with the simulator's")
    t.set_defaults(func=_cmd_trace)

    sub.add_parser("demo", help="the main job: train an MoE language model with DualPipe x expert parallelism "
                                "(flags: dualpipe-ext demo --help)", add_help=False)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the main job keeps its own flags (python -m dualpipe_ext.demo --help)
        from dualpipe_ext.demo.__main__ import main as demo_main

        return demo_main(argv[1:])
    try:
        parser = _parser()
    except ImportError as e:  # the C++ core is not built
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as e:
        if os.environ.get("DUALPIPE_EXT_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{PROG} {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
