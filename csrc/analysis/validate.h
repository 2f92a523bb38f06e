// Static proof that a plan is sound before it runs: communication matches, nothing
// deadlocks under the runtime's blocking semantics, every computation has its inputs, and
// every micro-batch is forwarded (and backwarded) exactly once.
#pragma once

#include "analysis/execute.h"
#include "plan/action.h"

namespace dpx {

// Throws std::invalid_argument (ValueError in Python) naming the broken rule, with the
// rank-by-step grid and the failing cells marked. Plans without any backward work are
// checked as forward-only plans (every micro-batch forwarded once, nothing backwarded).
void validate(const Plan& plan);

// The matching part of validate() alone; assumes the structural checks passed.
CommLinks link_comm(const Plan& plan);

}  // namespace dpx
