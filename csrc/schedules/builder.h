// Emits one rank's actions the way an eager pipeline runtime issues its work: receives
// are queued before a compute chunk, sends after it, and the queued batch is posted and
// waited on right before the next compute (or weight) chunk needs it. Generators drive a
// Builder per rank with the same calls such a runtime makes, so the plan reproduces that
// runtime's order of computation and communication exactly.
#pragma once

#include <array>
#include <string>

#include "plan/action.h"

namespace dpx {

// A plan of `ranks` x `num_modules` stages with no links and no actions yet: what every
// layout starts from before it places its stages.
inline Plan empty_plan(const std::string& name, int ranks, int chunks, int num_modules, int mbs_per_module) {
  Plan p;
  p.schedule = name;
  p.ranks = ranks;
  p.chunks = chunks;
  p.num_modules = num_modules;
  p.mbs_per_module = mbs_per_module;
  p.stages.assign(ranks, std::vector<StageInfo>(num_modules));
  p.actions.resize(ranks);
  return p;
}

// Module `m` of rank r as stage `first_stage + r` of a pipeline that runs from rank 0 to the
// last rank, each stage linked to module `m` of its neighbours.
inline void place_down(Plan& p, int m, int first_stage = 0) {
  for (int r = 0; r < p.ranks; ++r) {
    StageInfo& s = p.stages[r][m];
    s.stage = first_stage + r;
    if (r > 0) s.prev_rank = r - 1, s.prev_module = m;
    if (r < p.ranks - 1) s.next_rank = r + 1, s.next_module = m;
  }
}

// Module `m` of rank r as stage `first_stage + ranks - 1 - r` of a pipeline that runs from
// the last rank back to rank 0.
inline void place_up(Plan& p, int m, int first_stage = 0) {
  for (int r = 0; r < p.ranks; ++r) {
    StageInfo& s = p.stages[r][m];
    s.stage = first_stage + p.ranks - 1 - r;
    if (r < p.ranks - 1) s.prev_rank = r + 1, s.prev_module = m;
    if (r > 0) s.next_rank = r - 1, s.next_module = m;
  }
}

class Builder {
 public:
  Builder(const Plan& plan, int rank) : plan_(plan), rank_(rank) {}

  std::vector<Action> take() { return std::move(out_); }

  // Communication (queued until the next commit).
  void recv_forward(int m) {
    const StageInfo& s = plan_.stages[rank_][m];
    if (s.prev_rank < 0 || s.prev_rank == rank_) return;  // first stage, or local hand-off
    queue(ActionType::kRecvForward, m, recv_f_[m]++, s.prev_rank);
  }
  void send_forward(int m) {
    const StageInfo& s = plan_.stages[rank_][m];
    if (s.next_rank < 0 || s.next_rank == rank_) return;
    queue(ActionType::kSendForward, m, send_f_[m]++, s.next_rank);
  }
  void recv_backward(int m) {
    const StageInfo& s = plan_.stages[rank_][m];
    if (s.next_rank < 0 || s.next_rank == rank_) return;
    queue(ActionType::kRecvBackward, m, recv_b_[m]++, s.next_rank);
  }
  void send_backward(int m) {
    const StageInfo& s = plan_.stages[rank_][m];
    if (s.prev_rank < 0 || s.prev_rank == rank_) return;
    queue(ActionType::kSendBackward, m, send_b_[m]++, s.prev_rank);
  }
  void commit() {
    if (!pending_) return;
    out_.push_back(Action{ActionType::kWait});
    pending_ = false;
  }

  // Compute.
  void forward_compute(int m) { emit(ActionType::kForward, m, f_[m]++); }
  void backward_compute(int m, bool backward_input) {
    emit(backward_input ? ActionType::kBackwardInput : ActionType::kBackward, m, b_[m]++);
  }
  void forward_backward_compute(int m0, int m1) {
    Action a{ActionType::kForwardBackward, m0, f_[m0]++, m1, b_[m1]++, -1};
    out_.push_back(a);
  }

  // Chunks: receive, commit, compute, send.
  void forward_chunk(int m, bool recv = true, bool send = true) {
    if (recv) recv_forward(m);
    commit();
    forward_compute(m);
    if (send) send_forward(m);
  }
  void backward_chunk(int m, bool backward_input = false, bool recv = true, bool send = true) {
    if (recv) recv_backward(m);
    commit();
    backward_compute(m, backward_input);
    if (send) send_backward(m);
  }
  void forward_backward_chunk(int m0, int m1, bool recv0 = true) {
    if (recv0) recv_forward(m0);
    recv_backward(m1);
    commit();
    forward_backward_compute(m0, m1);
    send_forward(m0);
    send_backward(m1);
  }
  void weight_chunk() {
    commit();
    out_.push_back(Action{ActionType::kWeight});
  }
  // Ends the rank's program: the last queued sends are posted and waited on.
  std::vector<Action> finish() {
    commit();
    return take();
  }

 private:
  void queue(ActionType t, int m, int mb, int peer) {
    out_.push_back(Action{t, m, mb, -1, -1, peer});
    pending_ = true;
  }
  void emit(ActionType t, int m, int mb) { out_.push_back(Action{t, m, mb, -1, -1, -1}); }

  const Plan& plan_;
  int rank_;
  bool pending_ = false;
  std::vector<Action> out_;
  std::array<int, 2> f_{}, b_{}, recv_f_{}, send_f_{}, recv_b_{}, send_b_{};
};

}  // namespace dpx
