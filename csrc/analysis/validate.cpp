#include "analysis/validate.h"

#include <map>
#include <stdexcept>
#include <string>

#include "analysis/grid.h"

namespace dpx {

namespace {

std::string S(int v) { return std::to_string(v); }

std::string ordinal(int k) {  // 0 -> "1st"
  const int n = k + 1;
  const char* suffix = (n % 100 >= 11 && n % 100 <= 13) ? "th" : n % 10 == 1 ? "st" : n % 10 == 2 ? "nd" : n % 10 == 3 ? "rd" : "th";
  return S(n) + suffix;
}

bool in_plan(const Plan& plan, Cell c) {
  return c.rank >= 0 && c.rank < static_cast<int>(plan.actions.size()) && c.step >= 0 &&
         c.step < static_cast<int>(plan.actions[c.rank].size());
}

// `offending`: the first offending action (see PlanError); {-1, -1} for none. The grid marks
// `marks` (the offending action among them).
[[noreturn]] void fail_at(const Plan& plan, const std::string& rule, const std::string& detail,
                          const std::vector<Cell>& marks, Cell offending) {
  std::string msg = "invalid " + (plan.schedule.empty() ? std::string("custom") : plan.schedule) + " plan (" +
                    S(plan.ranks) + " ranks, " + S(plan.chunks) + " chunks): " + rule + ": " + detail;
  std::string token;
  if (in_plan(plan, offending)) {
    token = to_string(plan.actions[offending.rank][offending.step]);
    msg += "\n  first offending action: rank " + S(offending.rank) + ", step " + S(offending.step) + ": " + token;
  } else {
    offending = Cell{-1, -1};
  }
  if (!plan.actions.empty()) msg += "\n" + render_grid(plan, marks);
  throw PlanError(msg, rule, offending.rank, offending.step, token);
}

// The offending action is the first marked cell (none without marks).
[[noreturn]] void fail(const Plan& plan, const std::string& rule, const std::string& detail,
                       const std::vector<Cell>& marks = {}) {
  fail_at(plan, rule, detail, marks, marks.empty() ? Cell{-1, -1} : marks.front());
}

bool is_backward(ActionType t) {
  return t == ActionType::kBackward || t == ActionType::kBackwardInput || t == ActionType::kWeight ||
         t == ActionType::kForwardBackward;
}

std::string mb_name(int m, int c) { return S(m) + "." + S(c); }

// ---------------------------------------------------------------------------------------
// Shapes and ranges: everything later code indexes with.
void check_structure(const Plan& plan) {
  const int R = plan.ranks, M = plan.num_modules, N = plan.mbs_per_module;
  if (R < 1) fail(plan, "structure", "ranks must be at least 1, got " + S(R));
  if (M < 1 || M > 2) fail(plan, "structure", "num_modules must be 1 or 2, got " + S(M));
  if (N < 1) fail(plan, "structure", "mbs_per_module must be at least 1, got " + S(N));
  if (static_cast<int>(plan.actions.size()) != R || static_cast<int>(plan.stages.size()) != R)
    fail(plan, "structure", "expected actions and stages for " + S(R) + " ranks, got " + S(plan.actions.size()) +
                                " and " + S(plan.stages.size()));
  auto in_range = [&](int rank, int module) { return rank >= 0 && rank < R && module >= 0 && module < M; };
  for (int r = 0; r < R; ++r) {
    if (static_cast<int>(plan.stages[r].size()) != M)
      fail(plan, "structure", "rank " + S(r) + " has " + S(plan.stages[r].size()) + " stage entries, expected " + S(M));
    for (int m = 0; m < M; ++m) {
      const StageInfo& s = plan.stages[r][m];
      if (s.next_rank >= 0) {
        if (!in_range(s.next_rank, s.next_module))
          fail(plan, "structure", "stage table: next of rank " + S(r) + " module " + S(m) + " is out of range");
        const StageInfo& n = plan.stages[s.next_rank][s.next_module];
        if (n.prev_rank != r || n.prev_module != m)
          fail(plan, "structure", "stage table: rank " + S(r) + " module " + S(m) + " feeds rank " + S(s.next_rank) +
                                      " module " + S(s.next_module) + ", whose prev does not point back");
      }
      if (s.prev_rank >= 0 && !in_range(s.prev_rank, s.prev_module))
        fail(plan, "structure", "stage table: prev of rank " + S(r) + " module " + S(m) + " is out of range");
    }
  }
  for (int r = 0; r < R; ++r) {
    const auto& acts = plan.actions[r];
    for (int i = 0; i < static_cast<int>(acts.size()); ++i) {
      const Action& a = acts[i];
      const Cell cell{r, i};
      if (a.type == ActionType::kWeight || a.type == ActionType::kWait) continue;
      if (a.module < 0 || a.module >= M || a.mb < 0 || a.mb >= N)
        fail(plan, "structure", describe(plan, cell) + " names module " + S(a.module) + " micro-batch " + S(a.mb) +
                                    "; expected module < " + S(M) + " and micro-batch < " + S(N), {cell});
      if (a.type == ActionType::kForwardBackward && (a.module2 < 0 || a.module2 >= M || a.mb2 < 0 || a.mb2 >= N))
        fail(plan, "structure", describe(plan, cell) + ": backward half out of range", {cell});
      if (a.is_comm() && (a.peer < 0 || a.peer >= R || a.peer == r))
        fail(plan, "structure", describe(plan, cell) + ": peer must be another rank in [0, " + S(R) + ")", {cell});
    }
  }
}

// ---------------------------------------------------------------------------------------
// Per rank, in program order: data exists before it is used or sent, peers follow the
// stage table, weight work is queued before it is run, nothing runs twice.
struct ModuleState {
  std::vector<int> fwd, bwd, recv_f, recv_b, send_f, send_b;  // step where it happened, -1 if not yet
  std::vector<char> ready_f, ready_b;                         // receive completed by a wait
  explicit ModuleState(int n)
      : fwd(n, -1), bwd(n, -1), recv_f(n, -1), recv_b(n, -1), send_f(n, -1), send_b(n, -1), ready_f(n, 0), ready_b(n, 0) {}
};

void check_dataflow(const Plan& plan, bool forward_only) {
  const int R = plan.ranks, M = plan.num_modules, N = plan.mbs_per_module;
  std::vector<std::vector<ModuleState>> st(R, std::vector<ModuleState>(M, ModuleState(N)));
  for (int r = 0; r < R; ++r) {
    const auto& acts = plan.actions[r];
    std::vector<int> pending;
    int queued_w = 0;
    std::vector<int> bz_steps;

    // A computation and its input: forward data come from the previous stage, output
    // gradients from the next one, by a completed receive or a hand-off on this rank.
    auto check_input = [&](bool fwd, int m, int c, Cell cell) {
      ModuleState& s = st[r][m];
      const StageInfo& info = plan.stages[r][m];
      const std::string kind = fwd ? "F" : "B";
      const int done = (fwd ? s.fwd : s.bwd)[c];
      if (done >= 0)
        fail_at(plan, "exactly once", kind + mb_name(m, c) + " runs twice on rank " + S(r) + " (steps " + S(done) +
                                          " and " + S(cell.step) + ")", {Cell{r, done}, cell}, cell);
      if (!fwd && s.fwd[c] < 0)
        fail(plan, "dependency", describe(plan, cell) + " runs before its forward F" + mb_name(m, c), {cell});
      const int peer = fwd ? info.prev_rank : info.next_rank;
      const int peer_module = fwd ? info.prev_module : info.next_module;
      const std::string input = fwd ? "input" : "output gradient";
      if (peer < 0) return;
      if (peer == r) {
        if ((fwd ? st[r][peer_module].fwd : st[r][peer_module].bwd)[c] < 0)
          fail(plan, "dependency", describe(plan, cell) + " runs before " + kind + mb_name(peer_module, c) +
                                       ", which hands it its " + input + " on the same rank", {cell});
        return;
      }
      const int recv = (fwd ? s.recv_f : s.recv_b)[c];
      if (recv < 0)
        fail(plan, "dependency", describe(plan, cell) + " runs without its " + input + ": no recv" + kind +
                                     mb_name(m, c) + "<" + S(peer) + " before it", {cell});
      if (!(fwd ? s.ready_f : s.ready_b)[c])
        fail_at(plan, "dependency", describe(plan, cell) + " runs before a wait completes its receive at step " +
                                        S(recv), {Cell{r, recv}, cell}, cell);
    };
    // A send or receive: its peer follows the stage table, a send's data exist, each happens once.
    auto check_comm = [&](const Action& a, Cell cell) {
      const bool send = a.type == ActionType::kSendForward || a.type == ActionType::kSendBackward;
      const bool fwd = a.type == ActionType::kRecvForward || a.type == ActionType::kSendForward;
      const StageInfo& info = plan.stages[r][a.module];
      // Forward data go from the previous stage to the next; gradients the other way.
      const int expect = fwd != send ? info.prev_rank : info.next_rank;
      if (expect != a.peer || expect == r) {
        const std::string what = send ? (fwd ? " sends its outputs " : " sends its input gradients ")
                                      : (fwd ? " gets its inputs " : " gets its output gradients ");
        const std::string where = expect < 0   ? std::string(send ? "nowhere" : "from nowhere") + " (end of the pipeline)"
                                  : expect == r ? std::string("locally, without communication")
                                                : (send ? "to rank " : "from rank ") + S(expect);
        fail(plan, "peer", describe(plan, cell) + ": module " + S(a.module) + " on rank " + S(r) + what + where, {cell});
      }
      ModuleState& s = st[r][a.module];
      if (send && (fwd ? s.fwd : s.bwd)[a.mb] < 0)
        fail(plan, "dependency", describe(plan, cell) + " sends data that does not exist yet: " + (fwd ? "F" : "B") +
                                     mb_name(a.module, a.mb) + " has not run", {cell});
      int& at = (send ? (fwd ? s.send_f : s.send_b) : (fwd ? s.recv_f : s.recv_b))[a.mb];
      if (at >= 0)
        fail_at(plan, "exactly once", describe(plan, cell) + (send ? " sends" : " receives") +
                                          " again (first at step " + S(at) + ")", {Cell{r, at}, cell}, cell);
      at = cell.step;
    };

    for (int i = 0; i < static_cast<int>(acts.size()); ++i) {
      const Action& a = acts[i];
      const Cell cell{r, i};
      if (forward_only && a.type != ActionType::kForward && a.type != ActionType::kWait &&
          a.type != ActionType::kRecvForward && a.type != ActionType::kSendForward)
        fail(plan, "forward only", describe(plan, cell) + " in a plan without backward computation", {cell});
      switch (a.type) {
        case ActionType::kForward:
          check_input(true, a.module, a.mb, cell);
          st[r][a.module].fwd[a.mb] = i;
          break;
        case ActionType::kBackward:
        case ActionType::kBackwardInput:
          check_input(false, a.module, a.mb, cell);
          st[r][a.module].bwd[a.mb] = i;
          if (a.type == ActionType::kBackwardInput) ++queued_w, bz_steps.push_back(i);
          break;
        case ActionType::kForwardBackward:
          // The halves run concurrently: neither may depend on the other.
          check_input(false, a.module2, a.mb2, cell);
          check_input(true, a.module, a.mb, cell);
          st[r][a.module].fwd[a.mb] = i;
          st[r][a.module2].bwd[a.mb2] = i;
          break;
        case ActionType::kWeight:
          if (queued_w == 0)
            fail(plan, "weight FIFO", describe(plan, cell) + " pops weight work, but no backward input (B..z) "
                                      "before it left any queued", {cell});
          --queued_w;
          break;
        case ActionType::kRecvForward:
        case ActionType::kRecvBackward:
        case ActionType::kSendForward:
        case ActionType::kSendBackward:
          check_comm(a, cell);
          pending.push_back(i);
          break;
        case ActionType::kWait:
          for (int p : pending) {
            const Action& q = acts[p];
            if (q.type == ActionType::kRecvForward) st[r][q.module].ready_f[q.mb] = 1;
            if (q.type == ActionType::kRecvBackward) st[r][q.module].ready_b[q.mb] = 1;
          }
          pending.clear();
          break;
      }
    }
    if (!pending.empty())
      fail(plan, "unposted", "rank " + S(r) + " ends with " + describe(plan, Cell{r, pending.front()}) +
                                 " queued but no wait after it to post it", {Cell{r, pending.front()}});
    if (queued_w > 0)
      fail(plan, "weight FIFO", "rank " + S(r) + " ends with " + S(queued_w) +
                                    " queued weight-gradient batch(es) never run by a W",
           {Cell{r, bz_steps[bz_steps.size() - queued_w]}});
  }

  // Every micro-batch of every module: forwarded once, and backwarded once unless forward-only.
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      for (int c = 0; c < N; ++c) {
        const ModuleState& s = st[r][m];
        if (s.fwd[c] < 0) {
          std::vector<Cell> marks;
          if (s.recv_f[c] >= 0) marks.push_back({r, s.recv_f[c]});
          fail(plan, "exactly once", "F" + mb_name(m, c) + " never runs on rank " + S(r) + " (module " + S(m) +
                                         " sees " + S(N) + " micro-batches)", marks);
        }
        if (!forward_only && s.bwd[c] < 0)
          fail(plan, "exactly once", "B" + mb_name(m, c) + " never runs on rank " + S(r) + ": " +
                                         describe(plan, Cell{r, s.fwd[c]}) + " is never backwarded",
               {Cell{r, s.fwd[c]}});
      }
}

void check_deadlock(const Plan& plan, const CommLinks& links) {
  Costs unit;
  // The runtime's blocking semantics: a wait needs every operation of its batch matched (rendezvous).
  const Execution ex = execute(plan, links, unit, SimOptions());
  if (ex.finished) return;
  const int R = plan.ranks;
  // Each stuck rank sits at a wait; it waits on the ranks whose matching operations are not posted.
  std::vector<int> waits_on(R, -1);
  std::vector<Cell> unmatched(R, Cell{-1, -1});
  for (int r = 0; r < R; ++r) {
    const int w = ex.pc[r];
    if (w >= static_cast<int>(plan.actions[r].size())) continue;
    for (int i = w - 1; i >= 0 && plan.actions[r][i].type != ActionType::kWait; --i) {
      const Cell p = links.partner[r][i];
      if (p.rank < 0) continue;
      const int pw = links.wait_of[p.rank][p.step];
      if (ex.pc[p.rank] < pw) waits_on[r] = p.rank, unmatched[r] = Cell{r, i};
    }
  }
  int start = 0;
  while (start < R && waits_on[start] < 0) ++start;
  std::vector<int> seen(R, -1), cycle;
  int r = start;
  for (int k = 0; r >= 0 && seen[r] < 0; ++k) seen[r] = k, cycle.push_back(r), r = waits_on[r];
  if (r >= 0) cycle.erase(cycle.begin(), cycle.begin() + seen[r]);
  std::string chain, detail;
  std::vector<Cell> marks;
  for (int q : cycle) {
    chain += "rank " + S(q) + " -> ";
    const Cell u = unmatched[q];
    const Cell p = links.partner[u.rank][u.step];
    detail += "\n  rank " + S(q) + " is blocked at its wait (step " + S(ex.pc[q]) + ") on " +
              to_string(plan.actions[q][u.step]) + ", matched by " + describe(plan, p) + " which rank " + S(p.rank) +
              " posts only at step " + S(links.wait_of[p.rank][p.step]);
    marks.push_back(Cell{q, ex.pc[q]});
  }
  chain += "rank " + S(cycle.empty() ? 0 : cycle.front());
  std::string blocked;
  for (int q = 0; q < R; ++q)
    if (ex.pc[q] < static_cast<int>(plan.actions[q].size())) blocked += (blocked.empty() ? "" : ", ") + S(q);
  fail(plan, "deadlock", "ranks " + blocked + " cannot progress; cycle " + chain + detail, marks);
}

}  // namespace

CommLinks link_comm(const Plan& plan) {
  const int R = plan.ranks;
  CommLinks links;
  links.partner.resize(R);
  links.wait_of.resize(R);
  // [from][to] -> steps on `from` (sends) / steps on `to` (receives), in program order.
  std::map<std::pair<int, int>, std::vector<int>> sends, recvs;
  for (int r = 0; r < R; ++r) {
    const auto& acts = plan.actions[r];
    links.partner[r].assign(acts.size(), Cell{-1, -1});
    links.wait_of[r].assign(acts.size(), -1);
    std::vector<int> pending;
    for (int i = 0; i < static_cast<int>(acts.size()); ++i) {
      const Action& a = acts[i];
      if (a.type == ActionType::kSendForward || a.type == ActionType::kSendBackward) sends[{r, a.peer}].push_back(i);
      if (a.type == ActionType::kRecvForward || a.type == ActionType::kRecvBackward) recvs[{a.peer, r}].push_back(i);
      if (a.is_comm()) pending.push_back(i);
      if (a.type == ActionType::kWait) {
        for (int p : pending) links.wait_of[r][p] = i;
        pending.clear();
      }
    }
  }
  std::map<std::pair<int, int>, char> pairs;
  for (auto& kv : sends) pairs[kv.first] = 1;
  for (auto& kv : recvs) pairs[kv.first] = 1;
  for (auto& kv : pairs) {
    const int from = kv.first.first, to = kv.first.second;
    const auto& s = sends[kv.first];
    const auto& q = recvs[kv.first];
    const size_t n = std::min(s.size(), q.size());
    for (size_t k = 0; k < n; ++k) {
      const Cell sc{from, s[k]}, rc{to, q[k]};
      const Action& sa = plan.actions[from][s[k]];
      const Action& ra = plan.actions[to][q[k]];
      const bool fwd = sa.type == ActionType::kSendForward;
      const StageInfo& info = plan.stages[from][sa.module];
      const int want_module = fwd ? info.next_module : info.prev_module;
      const bool kind_ok = (ra.type == ActionType::kRecvForward) == fwd;
      if (!kind_ok || ra.module != want_module || ra.mb != sa.mb)
        fail(plan, "matching",
             "the " + ordinal(static_cast<int>(k)) + " send from rank " + S(from) + " to rank " + S(to) + " is " +
                 describe(plan, sc) + ", but the " + ordinal(static_cast<int>(k)) + " receive on rank " + S(to) +
                 " from rank " + S(from) + " is " + describe(plan, rc) + "; expected recv" + (fwd ? "F" : "B") +
                 mb_name(want_module, sa.mb) + "<" + S(from),
             {sc, rc});
      links.partner[from][s[k]] = rc;
      links.partner[to][q[k]] = sc;
    }
    if (s.size() != q.size()) {
      const bool extra_send = s.size() > q.size();
      const Cell c = extra_send ? Cell{from, s[n]} : Cell{to, q[n]};
      fail(plan, "matching",
           "rank " + S(from) + " sends " + S(s.size()) + " time(s) to rank " + S(to) + ", which receives " +
               S(q.size()) + " time(s) from it; " + describe(plan, c) + " has no matching " +
               (extra_send ? "receive" : "send"),
           {c});
    }
  }
  return links;
}

void validate(const Plan& plan) {
  check_structure(plan);
  bool forward_only = true;
  for (const auto& acts : plan.actions)
    for (const Action& a : acts)
      if (is_backward(a.type)) forward_only = false;
  check_dataflow(plan, forward_only);
  const CommLinks links = link_comm(plan);
  check_deadlock(plan, links);
}

}  // namespace dpx
