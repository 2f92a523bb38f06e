#include <functional>
#include <map>
#include <stdexcept>

#include "schedules/schedules.h"

namespace dpx {

namespace {
using Generator = std::function<Plan(int, int)>;

const std::map<std::string, Generator>& registry() {
  static const std::map<std::string, Generator> r = {
      {"dualpipe", make_dualpipe}, {"dualpipev", make_dualpipev}, {"gpipe", make_gpipe},
      {"1f1b", make_1f1b},         {"zb1p", make_zb1p},
  };
  return r;
}
}  // namespace

const std::vector<std::string>& schedule_names() {
  static const std::vector<std::string> names = {"dualpipe", "dualpipev", "1f1b", "zb1p", "gpipe"};
  return names;
}

Plan make_plan(const std::string& name, int ranks, int chunks) {
  auto it = registry().find(name);
  if (it == registry().end()) {
    std::string valid;
    for (const auto& n : schedule_names()) valid += (valid.empty() ? "" : ", ") + n;
    throw std::invalid_argument("unknown schedule '" + name + "': expected one of " + valid);
  }
  if (ranks < 1) throw std::invalid_argument(name + ": ranks must be at least 1, got " + std::to_string(ranks));
  if (chunks < 1) throw std::invalid_argument(name + ": chunks must be at least 1, got " + std::to_string(chunks));
  return it->second(ranks, chunks);
}

}  // namespace dpx
