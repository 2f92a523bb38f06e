// The action IR shared by every schedule: what one pipeline rank does, in order.
//
// Compute actions name a local module (0 or 1) and the micro-batch as counted by that
// module. Communication actions are not executed when they appear: sends and receives
// accumulate in a pending batch, and `Wait` posts the whole batch at once and blocks
// until every operation in it has completed (the semantics of `batch_isend_irecv`
// followed by waiting on every request). Stage-to-stage hand-offs between two modules
// of the same rank need no communication and appear only in the stage table.
#pragma once

#include <string>
#include <vector>

namespace dpx {

enum class ActionType : int {
  kForward = 0,        // F{m}.{c}
  kBackward,           // B{m}.{c}: input and weight gradients
  kBackwardInput,      // B{m}.{c}z: input gradients; weight work queued for a later W
  kWeight,             // W: oldest queued weight-gradient batch (FIFO)
  kForwardBackward,    // F{m}.{c}+B{n}.{d}: one forward and one backward, overlapped
  kRecvForward,        // receive the inputs of F{m}.{c} from `peer`
  kRecvBackward,       // receive the output gradients of B{m}.{c} from `peer`
  kSendForward,        // send the outputs of F{m}.{c} to `peer`
  kSendBackward,       // send the input gradients of B{m}.{c} to `peer`
  kWait,               // post the pending communication batch and wait for all of it
};

struct Action {
  ActionType type = ActionType::kWait;
  int module = -1;   // local module; the forward half of a pair
  int mb = -1;       // micro-batch as counted by `module`
  int module2 = -1;  // backward half of a pair
  int mb2 = -1;
  int peer = -1;     // pipeline rank on the other side of a send or receive

  bool is_compute() const;
  bool is_comm() const;  // send or receive (not Wait)
  bool operator==(const Action& o) const;
};

// Where a local module sits in its pipeline. prev/next are -1 at the ends.
struct StageInfo {
  int stage = -1;        // global stage index within its pipeline
  int pipeline = 0;      // 0 = forward direction, 1 = reverse direction (DualPipe only)
  int prev_rank = -1, prev_module = -1;
  int next_rank = -1, next_module = -1;
};

struct Plan {
  std::string schedule;
  int ranks = 0;
  int chunks = 0;                               // micro-batches in the step
  int num_modules = 1;                          // modules per rank
  int mbs_per_module = 0;                       // micro-batches each module sees
  std::vector<std::vector<StageInfo>> stages;   // [rank][module]
  std::vector<std::vector<Action>> actions;     // [rank]
};

// Text form. Compute actions print as the trace tokens of shared/spec/schedule-trace.md;
// communication prints as `sendF0.3>1`, `recvB1.2<0`, and `wait`.
std::string to_string(const Action& a);
Action parse_action(const std::string& s);  // throws std::invalid_argument

// The trace: the projection of a rank's actions onto compute actions.
std::vector<std::string> trace(const std::vector<Action>& actions);

// Forward-only projection used under torch.no_grad(): backward, weight and backward
// communication actions removed, pairs reduced to their forward half, empty waits dropped.
Plan forward_only(const Plan& plan);

}  // namespace dpx
