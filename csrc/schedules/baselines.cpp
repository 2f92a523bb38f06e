// Single-direction baselines with one stage per rank: GPipe, 1F1B and ZB-H1.
#include <algorithm>
#include <stdexcept>

#include "schedules/builder.h"
#include "schedules/schedules.h"

namespace dpx {

namespace {

Plan linear_layout(const std::string& name, int ranks, int chunks) {
  Plan p;
  p.schedule = name;
  p.ranks = ranks;
  p.chunks = chunks;
  p.num_modules = 1;
  p.mbs_per_module = chunks;
  p.stages.assign(ranks, std::vector<StageInfo>(1));
  for (int r = 0; r < ranks; ++r) {
    StageInfo& s = p.stages[r][0];
    s.stage = r;
    if (r > 0) s.prev_rank = r - 1, s.prev_module = 0;
    if (r < ranks - 1) s.next_rank = r + 1, s.next_module = 0;
  }
  p.actions.resize(ranks);
  return p;
}

}  // namespace

Plan make_gpipe(int ranks, int chunks) {
  Plan p = linear_layout("gpipe", ranks, chunks);
  for (int r = 0; r < ranks; ++r) {
    Builder b(p, r);
    for (int i = 0; i < chunks; ++i) b.forward_chunk(0);
    for (int i = 0; i < chunks; ++i) b.backward_chunk(0);
    p.actions[r] = b.finish();
  }
  return p;
}

Plan make_1f1b(int ranks, int chunks) {
  Plan p = linear_layout("1f1b", ranks, chunks);
  for (int r = 0; r < ranks; ++r) {
    Builder b(p, r);
    const int warmup = std::min(ranks - 1 - r, chunks);
    for (int i = 0; i < warmup; ++i) b.forward_chunk(0);
    for (int i = 0; i < chunks - warmup; ++i) {
      b.forward_chunk(0);
      b.backward_chunk(0);
    }
    for (int i = 0; i < warmup; ++i) b.backward_chunk(0);
    p.actions[r] = b.finish();
  }
  return p;
}

// ZB-H1: 1F1B's order and memory, with the backward split into its input and weight
// halves. Rank r holds back the weight work of its first `ranks - 1 - r` backwards and
// spends it in the cool-down, where 1F1B leaves that rank idle.
Plan make_zb1p(int ranks, int chunks) {
  Plan p = linear_layout("zb1p", ranks, chunks);
  for (int r = 0; r < ranks; ++r) {
    Builder b(p, r);
    const int warmup = std::min(ranks - 1 - r, chunks);
    int queued = 0;
    for (int i = 0; i < warmup; ++i) b.forward_chunk(0);
    for (int i = 0; i < chunks - warmup; ++i) {
      b.forward_chunk(0);
      b.backward_chunk(0, /*input_only=*/true);
      if (++queued > warmup) b.weight_chunk(), --queued;
    }
    for (int i = 0; i < warmup; ++i) {
      b.backward_chunk(0, /*input_only=*/true);
      b.weight_chunk();  // one queued weight batch fills the wait for the next backward
    }
    for (; queued > 0; --queued) b.weight_chunk();
    p.actions[r] = b.finish();
  }
  return p;
}

}  // namespace dpx
