#include <stdexcept>

#include "schedules/schedules.h"

namespace dpx {

namespace {

std::string valid_names() {
  std::string out;
  for (const auto& s : schedules()) out += (out.empty() ? "" : ", ") + s.name;
  return out;
}

// (PP - 1)(F + B) for GPipe and 1F1B; (PP - 1)(F + B - 2W) for ZB-H1; (PP/2 - 1)(FB + B - 3W)
// for DualPipe and DualPipeV, where PP counts the stages of one pipeline.
double one_f_one_b(int ranks, const Costs& c) { return (ranks - 1) * (c.F + c.B); }
double zero_bubble(int ranks, const Costs& c) { return (ranks - 1) * (c.F + c.B - 2 * c.W); }
double dualpipe_bubble(int ranks, const Costs& c) {
  if (ranks % 2) throw std::invalid_argument("dualpipe needs an even number of ranks, got " + std::to_string(ranks));
  return (ranks / 2.0 - 1) * (c.FB + c.B - 3 * c.W);
}
double dualpipev_bubble(int ranks, const Costs& c) { return (ranks - 1) * (c.FB + c.B - 3 * c.W); }

}  // namespace

const std::vector<ScheduleInfo>& schedules() {
  static const std::vector<ScheduleInfo> r = {
      {"dualpipe", "DeepSeek's bidirectional pipeline: two stages per rank, one per direction, even ranks", 2, 1,
       "reverse direction", make_dualpipe, dualpipe_bubble},
      {"dualpipev", "DualPipe's V-shaped half: one pipeline of 2 x ranks stages, rank r holds r and 2R-1-r", 2, 2,
       "second leg of the V", make_dualpipev, dualpipev_bubble},
      {"1f1b", "one forward, one backward: one stage per rank", 1, 1, "", make_1f1b, one_f_one_b},
      {"zb1p", "ZB-H1: 1F1B with the weight gradients deferred into the bubbles", 1, 1, "", make_zb1p, zero_bubble},
      {"gpipe", "all forwards, then all backwards: one stage per rank", 1, 1, "", make_gpipe, one_f_one_b},
  };
  return r;
}

const ScheduleInfo& schedule_info(const std::string& name) {
  for (const auto& s : schedules())
    if (s.name == name) return s;
  throw std::invalid_argument("unknown schedule '" + name + "': expected one of " + valid_names());
}

std::vector<std::string> schedule_names() {
  std::vector<std::string> names;
  for (const auto& s : schedules()) names.push_back(s.name);
  return names;
}

Plan make_plan(const std::string& name, int ranks, int chunks) {
  const ScheduleInfo& s = schedule_info(name);
  if (ranks < 1) throw std::invalid_argument(name + ": ranks must be at least 1, got " + std::to_string(ranks));
  if (chunks < 1) throw std::invalid_argument(name + ": chunks must be at least 1, got " + std::to_string(chunks));
  return s.make(ranks, chunks);
}

double closed_form_bubble(const std::string& name, int ranks, const Costs& costs) {
  const ScheduleInfo* info = nullptr;
  for (const auto& s : schedules())
    if (s.name == name) info = &s;
  if (info == nullptr)
    throw std::invalid_argument("no closed-form bubble for schedule '" + name + "': expected one of " + valid_names());
  if (ranks < 1) throw std::invalid_argument("ranks must be at least 1, got " + std::to_string(ranks));
  return info->bubble(ranks, costs);
}

}  // namespace dpx
