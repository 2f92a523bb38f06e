#include "plan/action.h"

#include <regex>
#include <stdexcept>

namespace dpx {

bool Action::is_compute() const {
  switch (type) {
    case ActionType::kForward:
    case ActionType::kBackward:
    case ActionType::kBackwardInput:
    case ActionType::kWeight:
    case ActionType::kForwardBackward:
      return true;
    default:
      return false;
  }
}

bool Action::is_comm() const { return !is_compute() && type != ActionType::kWait; }

bool Action::operator==(const Action& o) const {
  return type == o.type && module == o.module && mb == o.mb && module2 == o.module2 &&
         mb2 == o.mb2 && peer == o.peer;
}

static std::string mb_str(int module, int mb) {
  return std::to_string(module) + "." + std::to_string(mb);
}

std::string to_string(const Action& a) {
  switch (a.type) {
    case ActionType::kForward: return "F" + mb_str(a.module, a.mb);
    case ActionType::kBackward: return "B" + mb_str(a.module, a.mb);
    case ActionType::kBackwardInput: return "B" + mb_str(a.module, a.mb) + "z";
    case ActionType::kWeight: return "W";
    case ActionType::kForwardBackward:
      return "F" + mb_str(a.module, a.mb) + "+B" + mb_str(a.module2, a.mb2);
    case ActionType::kRecvForward: return "recvF" + mb_str(a.module, a.mb) + "<" + std::to_string(a.peer);
    case ActionType::kRecvBackward: return "recvB" + mb_str(a.module, a.mb) + "<" + std::to_string(a.peer);
    case ActionType::kSendForward: return "sendF" + mb_str(a.module, a.mb) + ">" + std::to_string(a.peer);
    case ActionType::kSendBackward: return "sendB" + mb_str(a.module, a.mb) + ">" + std::to_string(a.peer);
    case ActionType::kWait: return "wait";
  }
  return "?";
}

Action parse_action(const std::string& s) {
  static const std::regex compute(R"(([FB])(\d+)\.(\d+)(z?))");
  static const std::regex pair(R"(F(\d+)\.(\d+)\+B(\d+)\.(\d+))");
  static const std::regex comm(R"((send|recv)([FB])(\d+)\.(\d+)([<>])(\d+))");
  std::smatch m;
  Action a;
  if (s == "W") {
    a.type = ActionType::kWeight;
  } else if (s == "wait") {
    a.type = ActionType::kWait;
  } else if (std::regex_match(s, m, pair)) {
    a.type = ActionType::kForwardBackward;
    a.module = std::stoi(m[1]);
    a.mb = std::stoi(m[2]);
    a.module2 = std::stoi(m[3]);
    a.mb2 = std::stoi(m[4]);
  } else if (std::regex_match(s, m, compute)) {
    const bool fwd = m[1] == "F";
    if (fwd && m[4] == "z") throw std::invalid_argument("action '" + s + "': only a backward can end in 'z'");
    a.type = fwd ? ActionType::kForward : (m[4] == "z" ? ActionType::kBackwardInput : ActionType::kBackward);
    a.module = std::stoi(m[2]);
    a.mb = std::stoi(m[3]);
  } else if (std::regex_match(s, m, comm)) {
    const bool send = m[1] == "send";
    if ((send && m[5] != ">") || (!send && m[5] != "<"))
      throw std::invalid_argument("action '" + s + "': sends use '>' and receives '<'");
    const bool fwd = m[2] == "F";
    a.type = send ? (fwd ? ActionType::kSendForward : ActionType::kSendBackward)
                  : (fwd ? ActionType::kRecvForward : ActionType::kRecvBackward);
    a.module = std::stoi(m[3]);
    a.mb = std::stoi(m[4]);
    a.peer = std::stoi(m[6]);
  } else {
    throw std::invalid_argument("cannot parse action '" + s +
                                "': expected F0.1, B0.1, B0.1z, W, F0.1+B1.0, sendF0.1>2, recvB1.0<3 or wait");
  }
  return a;
}

std::vector<std::string> trace(const std::vector<Action>& actions) {
  std::vector<std::string> out;
  for (const auto& a : actions)
    if (a.is_compute()) out.push_back(to_string(a));
  return out;
}

Plan forward_only(const Plan& plan) {
  Plan out = plan;
  for (auto& acts : out.actions) {
    std::vector<Action> kept;
    bool pending = false;
    for (Action a : acts) {
      switch (a.type) {
        case ActionType::kBackward:
        case ActionType::kBackwardInput:
        case ActionType::kWeight:
        case ActionType::kRecvBackward:
        case ActionType::kSendBackward:
          continue;
        case ActionType::kForwardBackward:
          a.type = ActionType::kForward;
          a.module2 = a.mb2 = -1;
          break;
        case ActionType::kWait:
          if (!pending) continue;
          pending = false;
          break;
        default:
          if (a.is_comm()) pending = true;
          break;
      }
      kept.push_back(a);
    }
    acts.swap(kept);
  }
  return out;
}

}  // namespace dpx
