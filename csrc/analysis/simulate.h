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
  double P2P = 0;  // from a send being posted (and its receive posted) to the data being usable

  double of(const Action& a) const;
  void check() const;  // throws std::invalid_argument for negative costs or W > B
};

struct TimedAction {
  int step;  // index into plan.actions[rank]
  double start, end;
};

struct SimResult {
  double makespan = 0;                          // time the last rank finishes
  std::vector<std::vector<TimedAction>> timeline;  // [rank]: compute actions in program order
  std::vector<double> busy;                     // [rank]: sum of compute durations
  std::vector<double> bubble;                   // [rank]: makespan - busy
  std::vector<int> peak_activations;            // [rank]: most forward activations alive at once
};

// Validates the plan first (ValueError when unsound), then simulates it.
SimResult simulate(const Plan& plan, const Costs& costs);

// The execution engine shared with the validator's deadlock check.
struct Execution {
  bool finished = false;
  std::vector<int> pc;                          // [rank]: first step not completed
  std::vector<double> finish;                   // [rank]: time its program ended (or stalled)
  std::vector<std::vector<TimedAction>> timeline;
};
Execution execute(const Plan& plan, const CommLinks& links, const Costs& costs);

}  // namespace dpx
