#include "analysis/execute.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>

namespace dpx {

namespace {

std::string num(double v) {  // shortest form: 2, 0.5, -1, inf
  std::ostringstream s;
  s << v;
  return s.str();
}

void check_edges(const std::vector<double>& v, const char* name, int ranks) {
  if (v.empty()) return;
  if (static_cast<int>(v.size()) != ranks)
    throw std::invalid_argument(std::string("simulation option ") + name + " needs one value per rank (" +
                                std::to_string(ranks) + "), got " + std::to_string(v.size()));
  for (size_t r = 0; r < v.size(); ++r)
    if (!(v[r] >= 0) || std::isinf(v[r]))
      throw std::invalid_argument(std::string("simulation option ") + name + "[" + std::to_string(r) +
                                  "] must be a finite non-negative number, got " + num(v[r]));
}

}  // namespace

void SimOptions::check(int ranks) const {
  check_edges(start, "start", ranks);
  check_edges(tail, "tail", ranks);
}

Execution execute(const Plan& plan, const CommLinks& links, const Costs& costs, const SimOptions& opts) {
  const int R = plan.ranks;
  Execution ex;
  ex.pc.assign(R, 0);
  ex.finish.assign(R, 0.0);
  if (!opts.start.empty()) ex.finish = opts.start;
  ex.timeline.resize(R);
  std::vector<std::vector<double>> posted(R);  // [rank][step of a wait]: post time, -1 until reached
  std::vector<std::vector<std::vector<int>>> batch(R);  // [rank][step of a wait]: its communication steps
  for (int r = 0; r < R; ++r) {
    const auto& acts = plan.actions[r];
    posted[r].assign(acts.size(), -1.0);
    batch[r].resize(acts.size());
    for (int i = 0; i < static_cast<int>(acts.size()); ++i)
      if (links.wait_of[r][i] >= 0) batch[r][links.wait_of[r][i]].push_back(i);
  }
  bool progress = true;
  while (progress) {
    progress = false;
    for (int r = 0; r < R; ++r) {
      const auto& acts = plan.actions[r];
      int& pc = ex.pc[r];
      double& t = ex.finish[r];
      while (pc < static_cast<int>(acts.size())) {
        const Action& a = acts[pc];
        if (a.is_compute()) {
          const double d = costs.of(a);
          if (!ex.timeline[r].empty()) t += costs.overhead;  // bookkeeping before every compute action but the first
          ex.timeline[r].push_back(TimedAction{pc, t, t + d});
          t += d;
        } else if (a.type == ActionType::kWait) {
          if (posted[r][pc] < 0) posted[r][pc] = t, progress = true;
          double done = t;
          bool blocked = false;
          for (int op : batch[r][pc]) {
            const Cell p = links.partner[r][op];
            const bool send = acts[op].type == ActionType::kSendForward || acts[op].type == ActionType::kSendBackward;
            if (opts.eager_comm && send) continue;
            const double other = posted[p.rank][links.wait_of[p.rank][p.step]];
            if (other < 0) {
              blocked = true;
              break;
            }
            const bool recv = acts[op].type == ActionType::kRecvForward || acts[op].type == ActionType::kRecvBackward;
            if (!opts.eager_comm)
              done = std::max(done, std::max(posted[r][pc], other) + (recv ? costs.P2P : 0.0));
            else if (recv)
              done = std::max(done, other + costs.P2P);
          }
          if (blocked) break;
          t = done;
        }
        ++pc;
        progress = true;
      }
    }
  }
  ex.finished = true;
  for (int r = 0; r < R; ++r)
    if (ex.pc[r] < static_cast<int>(plan.actions[r].size())) ex.finished = false;
  return ex;
}

}  // namespace dpx
