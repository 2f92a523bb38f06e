#include "analysis/simulate.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

namespace dpx {

double Costs::of(const Action& a) const {
  switch (a.type) {
    case ActionType::kForward: return F;
    case ActionType::kBackward: return B;
    case ActionType::kBackwardInput: return B - W;
    case ActionType::kWeight: return W;
    case ActionType::kForwardBackward: return FB;
    default: return 0;
  }
}

void Costs::check() const {
  const double v[] = {F, B, W, FB, P2P, overhead};
  const char* names[] = {"F", "B", "W", "FB", "P2P", "overhead"};
  for (int i = 0; i < 6; ++i)
    if (!(v[i] >= 0))
      throw std::invalid_argument(std::string("cost ") + names[i] + " must be a non-negative number, got " +
                                  std::to_string(v[i]));
  if (W > B)
    throw std::invalid_argument("cost W (weight part of a backward) must not exceed B (full backward): W=" +
                                std::to_string(W) + ", B=" + std::to_string(B));
}

static void check_edges(const std::vector<double>& v, const char* name, int ranks) {
  if (v.empty()) return;
  if (static_cast<int>(v.size()) != ranks)
    throw std::invalid_argument(std::string("simulation option ") + name + " needs one value per rank (" +
                                std::to_string(ranks) + "), got " + std::to_string(v.size()));
  for (size_t r = 0; r < v.size(); ++r)
    if (!(v[r] >= 0) || v[r] == std::numeric_limits<double>::infinity())
      throw std::invalid_argument(std::string("simulation option ") + name + "[" + std::to_string(r) +
                                  "] must be a finite non-negative number, got " + std::to_string(v[r]));
}

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

SimResult simulate(const Plan& plan, const Costs& costs, const SimOptions& opts) {
  costs.check();
  opts.check(plan.ranks);
  validate(plan);
  const CommLinks links = link_comm(plan);
  Execution ex = execute(plan, links, costs, opts);
  if (!ex.finished)  // unreachable for a validated plan: eager_comm only drops constraints
    throw std::logic_error("simulation of a validated plan did not finish");
  const int R = plan.ranks;
  SimResult res;
  res.timeline = std::move(ex.timeline);
  res.busy.assign(R, 0.0);
  res.peak_activations.assign(R, 0);
  for (int r = 0; r < R; ++r) {
    res.makespan = std::max(res.makespan, ex.finish[r] + (opts.tail.empty() ? 0.0 : opts.tail[r]));
    int live = 0, peak = 0;
    for (const TimedAction& ta : res.timeline[r]) {
      res.busy[r] += ta.end - ta.start;
      // A forward's activations live from its start until the end of its backward; an
      // overlapped pair holds its forward's and its backward's at once.
      const ActionType t = plan.actions[r][ta.step].type;
      if (t == ActionType::kForward || t == ActionType::kForwardBackward) peak = std::max(peak, ++live);
      if (t == ActionType::kBackward || t == ActionType::kBackwardInput || t == ActionType::kForwardBackward) --live;
    }
    res.peak_activations[r] = peak;
  }
  res.bubble.resize(R);
  for (int r = 0; r < R; ++r) res.bubble[r] = res.makespan - res.busy[r];
  return res;
}

}  // namespace dpx
