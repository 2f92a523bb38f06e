#include "plan/costs.h"

#include <cmath>
#include <sstream>
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

namespace {

std::string num(double v) {  // shortest form: 2, 0.5, -1, inf
  std::ostringstream s;
  s << v;
  return s.str();
}

}  // namespace

void Costs::check() const {
  const double v[] = {F, B, W, FB, P2P, overhead};
  const char* names[] = {"F", "B", "W", "FB", "P2P", "overhead"};
  for (int i = 0; i < 6; ++i)
    if (!(v[i] >= 0) || std::isinf(v[i]))
      throw std::invalid_argument(std::string("cost ") + names[i] + " must be a non-negative finite number, got " +
                                  num(v[i]));
  if (W > B)
    throw std::invalid_argument("cost W (the weight part of a backward) cannot exceed B (the full backward): W=" +
                                num(W) + ", B=" + num(B));
}

}  // namespace dpx
