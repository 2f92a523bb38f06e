// The event-driven execution of a plan: when each rank's actions start and end, given the
// cost of each kind of action and how communication completes. Shared by the validator's
// deadlock check (unit costs, rendezvous waits) and the simulator.
#pragma once

#include <vector>

#include "analysis/grid.h"
#include "plan/action.h"
#include "plan/costs.h"

namespace dpx {

// How the plan's communication runs, and the edges of the step.
struct SimOptions {
  // false (rendezvous): a wait completes once every operation in its batch is matched by a
  // posted peer operation; a receive's data arrive P2P after both sides posted. This is the
  // semantics the validator's deadlock check uses.
  // true (as the runtime runs on gloo): receives are posted ahead and sends complete in the
  // background, so a send never blocks; a receive completes at the post time of the sender's
  // wait that carries the matching send, plus P2P, once the sender has reached that wait.
  bool eager_comm = false;
  std::vector<double> start;  // [rank] time the rank begins its program (its first action no earlier); empty: 0
  std::vector<double> tail;   // [rank] time the rank spends after its last action; empty: 0

  void check(int ranks) const;  // throws std::invalid_argument for wrong lengths or negative values
};

// How the communication actions of a plan pair up. Sends and receives between an ordered
// pair of ranks match in program order: the k-th send from r to p is the k-th receive on
// p from r.
struct CommLinks {
  std::vector<std::vector<Cell>> partner;  // [rank][step]: the matching operation; {-1,-1} if none
  std::vector<std::vector<int>> wait_of;   // [rank][step]: the Wait that posts this operation; -1 if none
};

struct TimedAction {
  int step;  // index into plan.actions[rank]
  double start, end;
};

struct Execution {
  bool finished = false;
  std::vector<int> pc;                          // [rank]: first step not completed
  std::vector<double> finish;                   // [rank]: time its program ended (or stalled)
  std::vector<std::vector<TimedAction>> timeline;  // [rank]: compute actions in program order
};

// Runs every rank as far as it can; `finished` is false when some rank is stuck at a wait.
Execution execute(const Plan& plan, const CommLinks& links, const Costs& costs,
                  const SimOptions& opts = SimOptions());

}  // namespace dpx
