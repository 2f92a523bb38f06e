// The cost model of component plans: how long the compute stream waits for exchanges.
#pragma once

#include <vector>

#include "overlap/steps.h"

namespace dpx {

// Time the compute stream waits for exchanges when `steps` run with `costs` (exchanges
// in flight concurrently, each taking costs.comm).
double exposed_comm(const std::vector<OverlapStep>& steps, const std::vector<RunSpec>& runs, const PlanCosts& costs);

}  // namespace dpx
