// Event-driven simulation of a plan: how long each rank computes and waits, given the cost
// of each kind of action and the latency of a point-to-point transfer.
#pragma once

#include <functional>
#include <vector>

#include "analysis/validate.h"
#include "plan/action.h"

namespace dpx {

// Durations in arbitrary time units.
struct Costs {
  double F = 1;    // forward chunk
  double B = 2;    // full backward chunk (input part + W)
  double W = 1;    // weight-gradient part of a backward; an input-only backward costs B - W
  double FB = 3;   // overlapped forward+backward pair
  double P2P = 0;  // from a send being posted (and, rendezvous only, its receive posted) to the data being usable
  // Per-action bookkeeping of a runtime, added before every compute action of a rank but its
  // first (after any wait in between): the action starts `overhead` after the rank is free
  // and its data are there. Not part of the action's timeline interval nor of busy time.
  double overhead = 0;

  double of(const Action& a) const;
  void check() const;  // throws std::invalid_argument for negative costs or W > B
};

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

struct TimedAction {
  int step;  // index into plan.actions[rank]
  double start, end;
};

struct SimResult {
  double makespan = 0;                          // max over ranks of (end of its last action + tail)
  std::vector<std::vector<TimedAction>> timeline;  // [rank]: compute actions in program order
  std::vector<double> busy;                     // [rank]: sum of compute durations
  std::vector<double> bubble;                   // [rank]: makespan - busy
  std::vector<int> peak_activations;            // [rank]: most forward activations alive at once
};

// Validates the plan first (ValueError when unsound), then simulates it.
SimResult simulate(const Plan& plan, const Costs& costs, const SimOptions& opts = SimOptions());

// The execution engine shared with the validator's deadlock check.
struct Execution {
  bool finished = false;
  std::vector<int> pc;                          // [rank]: first step not completed
  std::vector<double> finish;                   // [rank]: time its program ended (or stalled)
  std::vector<std::vector<TimedAction>> timeline;
};
Execution execute(const Plan& plan, const CommLinks& links, const Costs& costs,
                  const SimOptions& opts = SimOptions());

}  // namespace dpx
