// C interface of the sm90 grouped GEMM (grouped_mm_sm90.cu), free of torch and CUTLASS types.
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

extern "C" {
// Bytes of device workspace dualpipe_grouped_mm_bf16_sm90_run needs for num_groups groups.
size_t dualpipe_grouped_mm_bf16_sm90_workspace_bytes(int num_groups, int sm_count);

// out[rows of g] = x[rows of g] @ w[g]^T for every group g; rows of g are [ends[g-1], ends[g]).
// x [rows, k], w [num_groups, n, k], out [rows, n]: bf16, contiguous; ends [num_groups] int32 on
// the device. Returns nullptr on success, else a static error message.
const char* dualpipe_grouped_mm_bf16_sm90_run(const void* x, const void* w, void* out, const int32_t* ends,
                                                int num_groups, int n, int k, void* workspace, int device_id,
                                                int sm_count, cudaStream_t stream);
}
