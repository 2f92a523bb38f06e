// The component plan of overlapped chunks: how the compute and communication of several
// runs (forward or backward chunks of MoE stages) interleave on one compute stream.
//
// A stage of MoE layers is split into components: attention (with the router), shared
// experts and the experts MLP run on the compute stream; dispatch and combine are
// exchanges, issued asynchronously and waited for just before their first consumer. A
// run is one chunk walked through those components: a forward (layers up) or a backward
// (layers down, its weight gradients as separate W steps), optionally with a prologue
// (embedding-like work before the first layer) and an epilogue (norm and head after the
// last). A plan interleaves two or more runs so that each exchange of one is in flight
// while another computes: a DualPipe forward+backward pair (DeepSeek-V3, Figure 4), or two
// halves of one micro-batch (two-batch overlap) where a chunk has no partner.
#pragma once

// One job per file: the steps and their text form (steps.h), the components of runs as a
// dependency graph (graph.h, internal), the generator (list_schedule.h), DeepSeek's order as
// a reference (deepseek.h), the checker (check.h) and the cost model (cost_model.h).
#include "overlap/check.h"
#include "overlap/cost_model.h"
#include "overlap/deepseek.h"
#include "overlap/list_schedule.h"
#include "overlap/steps.h"
