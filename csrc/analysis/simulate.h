// Simulation of a validated plan: how long each rank computes and waits, given the cost of
// each kind of action and the latency of a point-to-point transfer.
#pragma once

#include <vector>

#include "analysis/execute.h"
#include "plan/action.h"

namespace dpx {

struct SimResult {
  double makespan = 0;                          // max over ranks of (end of its last action + tail)
  std::vector<std::vector<TimedAction>> timeline;  // [rank]: compute actions in program order
  std::vector<double> busy;                     // [rank]: sum of compute durations
  std::vector<double> bubble;                   // [rank]: makespan - busy
  std::vector<int> peak_activations;            // [rank]: most forward activations alive at once
};

// Validates the plan first (ValueError when unsound), then simulates it.
SimResult simulate(const Plan& plan, const Costs& costs, const SimOptions& opts = SimOptions());

}  // namespace dpx
