#include "overlap/steps.h"

#include "overlap/graph.h"

namespace dpx {

namespace {

const char* const kComponentNames[] = {"attn", "mlp", "dispatch", "combine", "shared", "prologue", "epilogue"};
const char* const kPassNames[] = {"F", "B", "W"};

}  // namespace

bool OverlapStep::operator==(const OverlapStep& o) const {
  return kind == o.kind && component == o.component && pass == o.pass && run == o.run && layer == o.layer &&
         under == o.under;
}

std::string to_string(const OverlapStep& s, bool with_run) {
  std::string it = std::string(kComponentNames[static_cast<int>(s.component)]) + "." +
                   kPassNames[static_cast<int>(s.pass)];
  if (s.component != Component::kPrologue && s.component != Component::kEpilogue) it += std::to_string(s.layer);
  if (with_run) it = "r" + std::to_string(s.run) + ":" + it;
  switch (s.kind) {
    case StepKind::kIssue: return "issue " + it;
    case StepKind::kWait: return "wait " + it;
    default: return it;
  }
}

std::string describe(const std::vector<OverlapStep>& steps, int index) {
  const bool runs = several_runs(steps);
  const OverlapStep& s = steps.at(index);
  std::string out = to_string(s, runs);
  if (!s.under.empty()) {
    out += " under";
    for (size_t i = 0; i < s.under.size(); ++i) {
      int u = s.under[i];
      out += (i ? ", " : " ") + (u >= 0 && u < static_cast<int>(steps.size()) ? to_string(steps[u], runs) : "?");
    }
  }
  return out;
}

}  // namespace dpx
