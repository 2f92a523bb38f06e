// Schedule generators and the registry that names them. A generator returns a full plan
// (compute and communication actions for every rank) or throws std::invalid_argument with
// a message that says what would be valid. Everything that needs to know which schedules
// exist (the runtime, the command line, the comparison table, the pictures) asks the
// registry.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "plan/action.h"
#include "plan/costs.h"

namespace dpx {

struct ScheduleInfo {
  std::string name;
  std::string summary;       // one line, for help texts
  int modules_per_rank = 1;  // local stage modules each rank holds
  int stages_per_rank = 1;   // stages of one pipeline per rank: PP = ranks * stages_per_rank
  std::string module1;       // what local module 1 is, for legends; "" when a rank holds one module
  std::function<Plan(int ranks, int chunks)> make;
  // The DualPipe README's bubble of one rank; throws std::invalid_argument for impossible ranks.
  std::function<double(int ranks, const Costs& c)> bubble;
};

// Every schedule, in display order.
const std::vector<ScheduleInfo>& schedules();

// The entry named `name`; throws std::invalid_argument listing the valid names.
const ScheduleInfo& schedule_info(const std::string& name);

std::vector<std::string> schedule_names();

Plan make_plan(const std::string& name, int ranks, int chunks);

// The closed-form bubble of schedule `name` on `ranks` ranks (of costs, F, B, W and FB only).
double closed_form_bubble(const std::string& name, int ranks, const Costs& costs);

// Individual generators (registered in registry.cpp).
Plan make_dualpipe(int ranks, int chunks);
Plan make_dualpipev(int ranks, int chunks);
Plan make_gpipe(int ranks, int chunks);
Plan make_1f1b(int ranks, int chunks);
Plan make_zb1p(int ranks, int chunks);

}  // namespace dpx
