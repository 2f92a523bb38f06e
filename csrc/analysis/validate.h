// Static proof that a plan is sound before it runs: communication matches, nothing
// deadlocks under the runtime's blocking semantics, every computation has its inputs, and
// every micro-batch is forwarded (and backwarded) exactly once.
#pragma once

#include "analysis/execute.h"
#include "plan/action.h"

#include <stdexcept>
#include <string>

namespace dpx {

// Why a plan is unsound: the broken rule and the first offending action.
//
// The checks run in a fixed order and the first that fails is reported: structure (counts,
// the stage table, then every action's ranges, rank by rank and step by step); then per rank,
// rank 0 first, its actions in program order (each computation has its input, peers follow
// the stage table, a send's data exist, nothing runs or moves twice, weight work is queued
// before a W pops it, a forward-only plan has no backward work), followed by what that rank
// leaves at its end (an operation queued without a wait after it, weight work never run);
// then every micro-batch of every rank and module forwarded and backwarded once; then the
// matching of sends and receives per ordered pair of ranks (sender, receiver), in program
// order; then deadlock. The offending action is the one at which the failing check fails:
// the computation without its input, the second run, the send whose receive differs, the
// extra operation, the forward never backwarded, the first backward input whose weight
// work is never run, the wait at which the first rank of the deadlock cycle blocks. Rules
// about no action (counts, the stage table, a forward that never runs and nothing received
// for it) name none: rank and step are -1.
struct PlanError : std::invalid_argument {
  PlanError(const std::string& message, std::string rule, int rank, int step, std::string token)
      : std::invalid_argument(message), rule(std::move(rule)), rank(rank), step(step), token(std::move(token)) {}
  std::string rule;   // "structure", "dependency", "exactly once", "peer", "weight FIFO", ...
  int rank, step;     // the first offending action, or -1, -1
  std::string token;  // its text form ("" without one)
};

// A PlanError as data, for the binding's check_plan.
struct PlanIssue {
  std::string rule;
  int rank = -1, step = -1;
  std::string token;
  std::string message;
};

// Throws PlanError (a std::invalid_argument: ValueError in Python) naming the broken rule and
// the first offending action, with the rank-by-step grid and the failing cells marked. Plans
// without any backward work are checked as forward-only plans (every micro-batch forwarded
// once, nothing backwarded).
void validate(const Plan& plan);

// The matching part of validate() alone; assumes the structural checks passed.
CommLinks link_comm(const Plan& plan);

}  // namespace dpx
