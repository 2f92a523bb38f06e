"""``python -m dualpipe_ext.schedules NAME --ranks R --chunks C [--json]``: print a schedule's trace."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    from dualpipe_ext.schedules import get_plan, schedule_info, schedule_names

    names = schedule_names()
    listing = "\n".join(f"  {n:10} {schedule_info(n).summary}" for n in names)
    parser = argparse.ArgumentParser(prog="python -m dualpipe_ext.schedules", description=__doc__,
                                     epilog="schedules:\n" + listing, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="one of: " + ", ".join(names))
    parser.add_argument("--ranks", type=int, required=True, help="pipeline ranks")
    parser.add_argument("--chunks", type=int, required=True, help="micro-batches per step")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--full", action="store_true", help="include communication actions")
    parser.error = lambda message: (print(f"error: {message}", file=sys.stderr), sys.exit(2))  # one line
    args = parser.parse_args(argv)
    try:
        plan = get_plan(args.name, args.ranks, args.chunks)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.full:
        per_rank = [[str(a) for a in acts] for acts in plan.actions]
    else:
        per_rank = plan.trace()
    if args.json:
        print(json.dumps({"schedule": args.name, "ranks": args.ranks, "chunks": args.chunks, "per_rank": per_rank}))
    else:
        for r, acts in enumerate(per_rank):
            print(f"rank {r}: " + " ".join(acts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
