// What each kind of action of a plan costs: the one definition of the cost model's fields
// and their defaults. The simulator (analysis/) runs plans with it, the closed-form bubbles
// of the registry (schedules/) take it, and Python reads its defaults from the binding.
#pragma once

#include "plan/action.h"

namespace dpx {

// Durations in arbitrary time units. The defaults: a backward costs twice a forward, half
// of it weight gradients, and an overlapped pair saves nothing (FB = F + B).
struct Costs {
  double F = 1;    // forward chunk
  double B = 2;    // backward chunk (input part + W)
  double W = 1;    // weight part of a backward; a backward input costs B - W
  double FB = 3;   // overlapped forward+backward pair
  double P2P = 0;  // from a send being posted (and, rendezvous only, its receive posted) to the data being usable
  // Per-action bookkeeping of a runtime, added before every compute action of a rank but its
  // first (after any wait in between): the action starts `overhead` after the rank is free
  // and its data are there. Not part of the action's timeline interval nor of busy time.
  double overhead = 0;

  double of(const Action& a) const;
  // The one check of a cost model (Python's Costs calls it too): every cost finite and
  // non-negative, W <= B. Throws std::invalid_argument naming the cost.
  void check() const;
};

}  // namespace dpx
