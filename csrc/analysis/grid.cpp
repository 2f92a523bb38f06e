#include "analysis/grid.h"

#include <algorithm>
#include <set>

namespace dpx {

namespace {
constexpr int kHalfWindow = 4;     // cells shown on each side of a mark
constexpr int kCommonSpan = 4;     // marks closer than this share one aligned window
constexpr int kMaxFullRows = 16;   // larger plans show only the rows near a mark

std::string pad(const std::string& s, size_t w) { return s.size() >= w ? s : s + std::string(w - s.size(), ' '); }
}  // namespace

std::string describe(const Plan& plan, Cell c) {
  return to_string(plan.actions[c.rank][c.step]) + " (rank " + std::to_string(c.rank) + ", step " +
         std::to_string(c.step) + ")";
}

std::string render_grid(const Plan& plan, const std::vector<Cell>& marks) {
  const int ranks = static_cast<int>(plan.actions.size());
  std::set<std::pair<int, int>> marked;
  std::vector<int> row_mark(ranks, -1);
  int lo = 1 << 30, hi = -1;
  for (const Cell& c : marks) {
    marked.insert({c.rank, c.step});
    if (c.rank >= 0 && c.rank < ranks && row_mark[c.rank] < 0) row_mark[c.rank] = c.step;
    lo = std::min(lo, c.step);
    hi = std::max(hi, c.step);
  }
  if (hi < 0) lo = hi = 0;
  const bool common = hi - lo <= kCommonSpan;
  const int primary = marks.empty() ? 0 : marks.front().step;

  auto window = [&](int r) {
    int a, b;
    if (common) {
      a = lo - kHalfWindow, b = hi + kHalfWindow;
    } else {
      const int center = row_mark[r] >= 0 ? row_mark[r] : primary;
      a = center - kHalfWindow, b = center + kHalfWindow;
    }
    const int n = static_cast<int>(plan.actions[r].size());
    return std::make_pair(std::max(a, 0), std::min(b, n - 1));
  };
  auto shown = [&](int r) {
    if (ranks <= kMaxFullRows) return true;
    for (const Cell& c : marks)
      if (std::abs(c.rank - r) <= 2) return true;
    return false;
  };
  auto token = [&](int r, int i) {
    std::string t = to_string(plan.actions[r][i]);
    return marked.count({r, i}) ? "[[" + t + "]]" : t;
  };

  size_t width = 4;
  for (int r = 0; r < ranks; ++r) {
    if (!shown(r)) continue;
    auto [a, b] = window(r);
    for (int i = a; i <= b; ++i) width = std::max(width, token(r, i).size());
  }

  std::string out;
  if (common) {
    out += pad("  step", 15);
    for (int i = std::max(lo - kHalfWindow, 0); i <= hi + kHalfWindow; ++i) out += pad(std::to_string(i), width) + " ";
    out += "\n";
  }
  bool elided = false;
  for (int r = 0; r < ranks; ++r) {
    if (!shown(r)) {
      if (!elided) out += "  ...\n";
      elided = true;
      continue;
    }
    elided = false;
    auto [a, b] = window(r);
    std::string row = "  rank " + pad(std::to_string(r), 3) + (a > 0 ? " ... " : "     ");
    if (common) row += std::string((a - std::max(lo - kHalfWindow, 0)) * (width + 1), ' ');
    else row = "  rank " + pad(std::to_string(r), 3) + " [from step " + std::to_string(a) + "] " + (a > 0 ? "... " : "");
    for (int i = a; i <= b; ++i) row += pad(token(r, i), width) + " ";
    if (b < static_cast<int>(plan.actions[r].size()) - 1) row += "...";
    if (plan.actions[r].empty()) row += "(no actions)";
    while (!row.empty() && row.back() == ' ') row.pop_back();
    out += row + "\n";
  }
  return out;
}

}  // namespace dpx
