// The generator of component plans: a list schedule of the runs' components on one compute
// stream.
#pragma once

#include <vector>

#include "overlap/steps.h"

namespace dpx {

// The plan of `runs` (1 <= runs, 1 <= layers <= 4096 each): a list schedule on one compute
// stream that issues every exchange as soon as its inputs exist, runs the ready computation
// with the longest remaining path first, and waits just before a consumer. At most
// `max_in_flight` exchanges of each shape (dispatch-shaped: dispatch F, combine B;
// combine-shaped: combine F, dispatch B) are in flight at once.
std::vector<OverlapStep> overlap_plan(const std::vector<RunSpec>& runs, const PlanCosts& costs, int max_in_flight);

}  // namespace dpx
