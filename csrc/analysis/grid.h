// Rank-by-step grid of a plan's action tokens with chosen cells marked `[[...]]`, cut to a
// window around the marks so that error messages stay readable.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "plan/action.h"

namespace dpx {

struct Cell {
  int rank;
  int step;  // index into plan.actions[rank]
};

std::string render_grid(const Plan& plan, const std::vector<Cell>& marks);

// "F0.3 (rank 1, step 7)"
std::string describe(const Plan& plan, Cell c);

}  // namespace dpx
