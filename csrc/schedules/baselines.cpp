// Single-direction baselines with one stage per rank: GPipe, 1F1B and ZB-H1.
#include <algorithm>
#include <stdexcept>

#include "schedules/builder.h"
#include "schedules/schedules.h"

namespace dpx {

namespace {

Plan linear_layout(const std::string& name, int ranks, int chunks) {
  Plan p = empty_plan(name, ranks, chunks, 1, chunks);
  place_down(p, 0);
  return p;
}

// Rank r runs `warmup(r)` forwards, then alternates a forward and a backward, then runs the
// backwards that are left.
template <typename Warmup>
Plan warmup_steady_cooldown(const std::string& name, int ranks, int chunks, Warmup warmup) {
  Plan p = linear_layout(name, ranks, chunks);
  for (int r = 0; r < ranks; ++r) {
    Builder b(p, r);
    const int w = warmup(r);
    for (int i = 0; i < w; ++i) b.forward_chunk(0);
    for (int i = 0; i < chunks - w; ++i) {
      b.forward_chunk(0);
      b.backward_chunk(0);
    }
    for (int i = 0; i < w; ++i) b.backward_chunk(0);
    p.actions[r] = b.finish();
  }
  return p;
}

}  // namespace

// GPipe: every forward, then every backward.
Plan make_gpipe(int ranks, int chunks) {
  return warmup_steady_cooldown("gpipe", ranks, chunks, [chunks](int) { return chunks; });
}

Plan make_1f1b(int ranks, int chunks) {
  return warmup_steady_cooldown("1f1b", ranks, chunks,
                                [ranks, chunks](int r) { return std::min(ranks - 1 - r, chunks); });
}

// ZB-H1: 1F1B's order and memory, with the backward split into its input half (B..z) and
// its weight half (W). W fills the time a rank would wait for data:
//  - in the steady phase rank r keeps r weight batches queued and runs the oldest one after
//    queuing the receive of its next forward but before posting it, so it overlaps the
//    wait for that input (the last ranks, which wait longest there, keep the most queued);
//  - in the cool-down rank 0 runs a W before each wait for a gradient; the other ranks run
//    it right after sending their input gradient, so that the rank before them is never
//    held up by a weight batch;
//  - the rest is drained at the end.
// With P2P = 0 this reaches the bubble (ranks - 1)(F + B - 2W) whenever 2W < B (the
// simulator checks it in tests/schedules/test_bubbles.py).
Plan make_zb1p(int ranks, int chunks) {
  Plan p = linear_layout("zb1p", ranks, chunks);
  for (int r = 0; r < ranks; ++r) {
    Builder b(p, r);
    std::vector<Action> acts;
    // A W inside a pending batch: it runs before the batch is posted, without posting it.
    auto weight_before_post = [&]() {
      for (Action& a : b.take()) acts.push_back(a);
      acts.push_back(Action{ActionType::kWeight});
    };
    const int warmup = std::min(ranks - 1 - r, chunks);
    int queued = 0;
    for (int i = 0; i < warmup; ++i) b.forward_chunk(0);
    for (int i = 0; i < chunks - warmup; ++i) {
      b.recv_forward(0);
      if (queued > r) weight_before_post(), --queued;
      b.forward_chunk(0, /*recv=*/false);
      b.backward_chunk(0, /*backward_input=*/true);
      ++queued;
    }
    for (int i = 0; i < warmup; ++i) {
      b.recv_backward(0);
      if (r == 0 && queued > 0) weight_before_post(), --queued;
      b.backward_chunk(0, /*backward_input=*/true, /*recv=*/false);
      ++queued;
      if (r > 0 && queued > 0) b.weight_chunk(), --queued;
    }
    for (; queued > 0; --queued) b.weight_chunk();
    for (Action& a : b.finish()) acts.push_back(a);
    p.actions[r] = std::move(acts);
  }
  return p;
}

}  // namespace dpx
