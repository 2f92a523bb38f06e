// The reference component plan: DeepSeek-V3's published order of a forward+backward pair.
#pragma once

#include <vector>

#include "overlap/steps.h"

namespace dpx {

// DeepSeek-V3's published per-layer order for a forward run and a backward run of
// `num_layers` layers each (no prologue, epilogue or separate shared experts).
std::vector<OverlapStep> deepseek_plan(int num_layers);

}  // namespace dpx
