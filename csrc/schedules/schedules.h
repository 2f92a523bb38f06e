// Schedule generators. Each returns a full plan (compute and communication actions
// for every rank) or throws std::invalid_argument with a message that says what would
// be valid.
#pragma once

#include <string>
#include <vector>

#include "plan/action.h"

namespace dpx {

// Names accepted by make_plan, in display order.
const std::vector<std::string>& schedule_names();

Plan make_plan(const std::string& name, int ranks, int chunks);

// Individual generators (registered in registry.cpp).
Plan make_dualpipe(int ranks, int chunks);
Plan make_dualpipev(int ranks, int chunks);
Plan make_gpipe(int ranks, int chunks);
Plan make_1f1b(int ranks, int chunks);
Plan make_zb1p(int ranks, int chunks);

}  // namespace dpx
