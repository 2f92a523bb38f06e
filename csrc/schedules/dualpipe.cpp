// DualPipe and DualPipeV, in the order of DeepSeek's reference runtime.
//
// Both run the same eight phases on every rank; they differ in where each local module
// sits. Phase p of the reference names "the direction this half of the ranks starts
// with": for DualPipe the second half of the ranks swap their two modules, so a phase
// maps to module p ^ (rank >= ranks / 2). DualPipeV uses the module index directly.
#include <stdexcept>

#include "schedules/builder.h"
#include "schedules/schedules.h"

namespace dpx {

namespace {

// DualPipe: module 0 of rank r is stage r of the forward-direction pipeline, module 1 is
// stage R-1-r of the reverse-direction pipeline.
Plan dualpipe_layout(int ranks, int chunks) {
  Plan p = empty_plan("dualpipe", ranks, chunks, 2, chunks / 2);
  place_down(p, 0);
  place_up(p, 1);
  for (int r = 0; r < ranks; ++r) p.stages[r][1].pipeline = 1;
  return p;
}

// DualPipeV: one V-shaped pipeline of 2R stages; rank r holds stages r and 2R-1-r, and
// the last rank hands stage R-1's output to stage R locally.
Plan dualpipev_layout(int ranks, int chunks) {
  Plan p = empty_plan("dualpipev", ranks, chunks, 2, chunks);
  place_down(p, 0);
  place_up(p, 1, ranks);
  StageInfo& turn_down = p.stages[ranks - 1][0];
  StageInfo& turn_up = p.stages[ranks - 1][1];
  turn_down.next_rank = ranks - 1, turn_down.next_module = 1;
  turn_up.prev_rank = ranks - 1, turn_up.prev_module = 0;
  return p;
}

// The eight phases shared by DualPipe and DualPipeV. `half_rank` is the rank's distance
// from the nearer end of its (half) pipeline, `num_half_ranks` the length of that half,
// `mbs` the micro-batches per module, `middle` whether the rank is where the two
// directions meet, and `swap` whether phases map to the other module.
std::vector<Action> eight_phases(const Plan& plan, int rank, int half_rank, int num_half_ranks, int mbs,
                                 bool middle, int swap) {
  Builder b(plan, rank);
  auto m = [swap](int phase) { return phase ^ swap; };

  // 1: forwards of the starting direction.
  for (int i = 0; i < (num_half_ranks - half_rank - 1) * 2; ++i) b.forward_chunk(m(0));

  // 2: forwards of both directions, alternating.
  const int step2 = half_rank + 1;
  b.recv_forward(m(0));
  for (int i = 0; i < step2; ++i) {
    b.forward_chunk(m(0), /*recv=*/false, /*send=*/middle);
    b.recv_forward(m(0));
    b.forward_chunk(m(1), /*recv=*/true, /*send=*/!middle || i < step2 - 1);
    if (!middle) b.send_forward(m(0));
  }

  // 3: backward input, weight, forward (zero bubble).
  for (int i = 0; i < num_half_ranks - half_rank - 1; ++i) {
    b.backward_chunk(m(1), /*backward_input=*/true);
    b.recv_forward(m(1));
    b.weight_chunk();
    b.forward_chunk(m(1), /*recv=*/false);
  }

  // 4: the main phase, overlapped forward+backward pairs in both directions.
  const int step4 = mbs - 2 * num_half_ranks + half_rank + 1;
  for (int i = 0; i < step4; ++i) {
    if (i == 0) {
      if (middle) {
        // The first pair at the meeting point runs unpaired: its halves do not wait on
        // each other, which shortens the bubble.
        b.forward_chunk(m(0), /*recv=*/false, /*send=*/false);
        b.send_forward(m(1));
        b.backward_chunk(m(1), /*backward_input=*/false, /*recv=*/true, /*send=*/false);
        b.send_forward(m(0));
        b.send_backward(m(1));
      } else {
        b.forward_backward_chunk(m(0), m(1), /*recv0=*/false);
      }
    } else {
      b.forward_backward_chunk(m(0), m(1));
    }
    b.forward_backward_chunk(m(1), m(0));
  }

  // 5: backward of one direction, pair of the other.
  for (int i = 0; i < num_half_ranks - half_rank - 1; ++i) {
    b.backward_chunk(m(1));
    b.forward_backward_chunk(m(1), m(0));
  }

  // 6: backwards of both directions; the second half defers weight work.
  const int step6 = half_rank + 1;
  bool zb = false;
  for (int i = 0; i < step6; ++i) {
    if (i == step6 / 2 && half_rank % 2 == 1) zb = true;
    b.backward_chunk(m(1), zb);
    if (i == step6 / 2 && half_rank % 2 == 0) zb = true;
    b.backward_chunk(m(0), zb);
  }

  // 7: weight, then backward input.
  for (int i = 0; i < num_half_ranks - half_rank - 1; ++i) {
    b.weight_chunk();
    b.backward_chunk(m(0), /*backward_input=*/true);
  }

  // 8: the remaining weight work.
  for (int i = 0; i < half_rank + 1; ++i) b.weight_chunk();
  return b.finish();
}

}  // namespace

Plan make_dualpipe(int ranks, int chunks) {
  if (ranks < 2 || ranks % 2 != 0)
    throw std::invalid_argument("dualpipe needs an even number of ranks (2, 4, 6, ...), got " +
                                std::to_string(ranks) + "; dualpipev runs on any number of ranks");
  if (chunks % 2 != 0 || chunks < 2 * ranks)
    throw std::invalid_argument("dualpipe on " + std::to_string(ranks) +
                                " ranks needs an even number of chunks of at least " + std::to_string(2 * ranks) +
                                ", got " + std::to_string(chunks));
  Plan p = dualpipe_layout(ranks, chunks);
  const int half = ranks / 2;
  for (int r = 0; r < ranks; ++r) {
    const int half_rank = std::min(r, ranks - 1 - r);
    const bool middle = r == half - 1 || r == half;
    p.actions[r] = eight_phases(p, r, half_rank, half, chunks / 2, middle, r >= half ? 1 : 0);
  }
  return p;
}

Plan make_dualpipev(int ranks, int chunks) {
  if (ranks < 1) throw std::invalid_argument("dualpipev needs at least 1 rank, got " + std::to_string(ranks));
  if (chunks < 2 * ranks)
    throw std::invalid_argument("dualpipev on " + std::to_string(ranks) + " ranks needs at least " +
                                std::to_string(2 * ranks) + " chunks, got " + std::to_string(chunks));
  Plan p = dualpipev_layout(ranks, chunks);
  for (int r = 0; r < ranks; ++r)
    p.actions[r] = eight_phases(p, r, r, ranks, chunks, r == ranks - 1, 0);
  return p;
}

}  // namespace dpx
