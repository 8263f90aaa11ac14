// The commit rules of paradec::select_commit, shared by the CPU and CUDA kernels. float32
// arithmetic, as the torch twin compares.
#pragma once

#include <cstdint>

#include "score_state.h"

namespace paradec {

enum Rule : int64_t { kTopK = 0, kThreshold = 1, kFactor = 2 };

// Whether a candidate of rank `rank` (0 = best of its segment) is committed.
PARADEC_HD bool accepted(int64_t rule, float param, int64_t rank, float conf, int64_t quota, int64_t floor) {
  if (rule == kTopK) return rank < quota;
  if (rank < floor) return true;
  if (rule == kThreshold) return conf >= param;
  return conf >= 1.0f - param / static_cast<float>(rank + 2);
}

}  // namespace paradec
