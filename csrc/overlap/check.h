// The checker of component plans: every rule a plan breaks, in plain words.
#pragma once

#include <string>
#include <vector>

#include "overlap/steps.h"

namespace dpx {

// Every violated rule, in plain words; empty when the plan is sound: each component and
// each issue/wait of every run exactly once, inputs ready before use, waits after their
// issues and before their consumers, partners between issue and wait, at most
// `max_in_flight` exchanges of a shape in flight (0: no limit).
std::vector<std::string> validate_overlap_plan(const std::vector<OverlapStep>& steps,
                                               const std::vector<RunSpec>& runs, int max_in_flight);

}  // namespace dpx
