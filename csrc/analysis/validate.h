// Static proof that a plan is sound before it runs: communication matches, nothing
// deadlocks under the runtime's blocking semantics, every computation has its inputs, and
// every micro-batch is forwarded (and backwarded) exactly once.
#pragma once

#include <vector>

#include "analysis/grid.h"
#include "plan/action.h"

namespace dpx {

// How the communication actions of a plan pair up. Sends and receives between an ordered
// pair of ranks match in program order: the k-th send from r to p is the k-th receive on
// p from r.
struct CommLinks {
  std::vector<std::vector<Cell>> partner;  // [rank][step]: the matching operation; {-1,-1} if none
  std::vector<std::vector<int>> wait_of;   // [rank][step]: the Wait that posts this operation; -1 if none
};

// Throws std::invalid_argument (ValueError in Python) naming the broken rule, with the
// rank-by-step grid and the failing cells marked. Plans without any backward work are
// checked as forward-only plans (every micro-batch forwarded once, nothing backwarded).
void validate(const Plan& plan);

// The matching part of validate() alone; assumes the structural checks passed.
CommLinks link_comm(const Plan& plan);

}  // namespace dpx
