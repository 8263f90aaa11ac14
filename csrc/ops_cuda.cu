// CUDA kernels of paradec's ops (schemas and CPU kernels in ops.cpp).
//
// score: blocks of (row, split) stream a slice of the row each with 16-byte loads into per-thread
// online-softmax states, merged by warp shuffles; a block that read a whole row writes its scores,
// else a second kernel merges the row's slices and writes them. The row is read once;
// probabilities are never written.
// select_commit: one thread per candidate ranks it inside its segment (ties: lowest column),
// reading the candidates from shared-memory tiles, and commits it in place. No host
// synchronisation in either, so a CUDA graph can capture a step.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <atomic>

#include "check.h"
#include "rules.h"
#include "score_state.h"

namespace paradec {

using at::Tensor;

void check_score_args(const Tensor& logits, const Tensor& rows, int64_t mask_id, const Tensor& stop_ids,
                      const Tensor& bar_stop, double temperature, const c10::optional<Tensor>& noise);
void check_select_args(const Tensor& canvas, const Tensor& trace, const std::vector<const Tensor*>& flat,
                       const Tensor& score, const Tensor& confidence, int64_t rule);

constexpr int kThreads = 256;
constexpr int kRowThreads = 768;  // a scoring block that reads a whole row (see whole_rows)
constexpr int kMaxStops = 16;

template <typename T> __device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <> __device__ __forceinline__ float to_float(at::BFloat16 x) { return static_cast<float>(x); }
template <> __device__ __forceinline__ float to_float(at::Half x) { return static_cast<float>(x); }

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFullWarp = 0xffffffffu;

__device__ __forceinline__ float exp2_approx(float x) {  // 2^x, flushing results below 2^-126 to 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

using LaneState = BasicScoreState<int32_t>;

// ScoreState's sums (natural log, against the exact maximum m) from base-2 sums s and t kept
// against mL = m * log2(e) rounded; the rounding cancels out.
__device__ __forceinline__ void natural_sums(float m, float mL, float s, float t, LaneState& st) {
  if (s > 0.f) {
    const float r = fmaf(m, kLog2e, -mL);  // m * log2(e) - mL, exact
    const float c = exp2f(-r);
    st.s = s * c;
    st.t = c * kLn2 * fmaf(-r, s, t);
  } else {
    st.s = 0.f; st.t = 0.f;
  }
}

// The hot loop's state. The softmax sums are kept in base 2 against mL = m * log2(e) rounded
// once (s = sum 2^(x log2 e - mL), t = sum of those times their exponent), so each logit costs
// one FMA, one ex2, an add and an FMA; `lane()` turns them back into ScoreState's natural-log
// sums against the exact maximum m, the rounding of mL cancelling out.
template <bool kSampled>
struct LightState {
  float m, mL, s, t, b1, b2;
  int32_t i1, n_inf, first_inf;
  double g;
  int32_t gi;

  __device__ __forceinline__ void init() {
    m = -INFINITY; mL = -INFINITY; s = 0.f; t = 0.f; b1 = -INFINITY; b2 = -INFINITY;
    i1 = -1; n_inf = 0; first_inf = -1; g = -HUGE_VAL; gi = -1;
  }

  __device__ __forceinline__ void top2(float x, int32_t v) {
    if (x > b1) { b2 = b1; b1 = x; i1 = v; } else if (x > b2) { b2 = x; }
  }

  __device__ __forceinline__ void rebase(float top) {  // a new running max (finite)
    const float top_l = top * kLog2e;
    if (s > 0.f) {
      const float shift = mL - top_l;  // <= 0
      const float scale = exp2_approx(shift);
      t = scale * fmaf(shift, s, t);
      s *= scale;
    }
    m = top;
    mL = top_l;
  }

  __device__ __forceinline__ void add(float x) {  // x finite or -inf, x <= m, m finite
    const float d = fmaf(x, kLog2e, -mL);
    const float e = exp2_approx(d);  // 0 for -inf
    s += e;
    t = fmaf(e, fmaxf(d, -150.f), t);  // keeps 0 * -inf out
  }

  __device__ __forceinline__ void gumbel(float x, int32_t v, const double* noise, double temperature) {
    if (kSampled && x > -INFINITY) {
      const double value = static_cast<double>(x) / temperature - log(-log(noise[v]));
      if (value > g) { g = value; gi = v; }
    }
  }

  __device__ __forceinline__ void push(float x, int32_t v, const double* noise, double temperature) {
    top2(x, v);
    if (x == INFINITY) {
      if (n_inf == 0) first_inf = v;
      ++n_inf;
    } else if (x > -INFINITY) {
      if (x > m) rebase(x);
      add(x);
    }
    gumbel(x, v, noise, temperature);
  }

  // Eight logits from one 16-byte load at indices v0..v0+7. +inf (rare) takes the per-element
  // path, whatever the state (two +inf seen make b2 +inf: the gate below would skip a third);
  // otherwise the top-2 bookkeeping runs per element only when the eight's maximum beats the
  // running second best (rare after the first few loads).
  __device__ __forceinline__ void push8(const float (&x)[8], int32_t v0, const double* noise, double temperature) {
    float top = fmaxf(fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3])), fmaxf(fmaxf(x[4], x[5]), fmaxf(x[6], x[7])));
    if (top == INFINITY) {
#pragma unroll
      for (int k = 0; k < 8; ++k) push(x[k], v0 + k, noise, temperature);
      return;
    }
    if (top > b2) {
#pragma unroll
      for (int k = 0; k < 8; ++k) top2(x[k], v0 + k);
    }
    if (top > m) rebase(top);
    if (m > -INFINITY) {
#pragma unroll
      for (int k = 0; k < 8; ++k) add(x[k]);
    }
    if (kSampled) {
#pragma unroll
      for (int k = 0; k < 8; ++k) gumbel(x[k], v0 + k, noise, temperature);
    }
  }

  __device__ __forceinline__ LaneState lane() const {
    LaneState st;
    st.m = m; st.b1 = b1; st.i1 = i1; st.b2 = b2; st.n_inf = n_inf; st.first_inf = first_inf; st.g = g; st.gi = gi;
    natural_sums(m, mL, s, t, st);
    return st;
  }
};

// The state of a greedy row's hot loop over 16-byte loads of 2-byte logits, with no data-dependent
// branch in the common case, so that a warp's lanes stay together (LightState's top-2 and rebase
// branches left ~20 of 32 lanes active at N = 256, per ncu). The softmax base follows the running
// maximum through a rescale by 2^(old - new) every chunk (by 1 when it did not move), and the
// top-2 is kept per 16-byte chunk: the best chunk's first index, b1 its maximum, and b2 the
// largest maximum of the other chunks. lane() hands the best chunk on unresolved (i1 = -2 -
// start); write_scores reads the row's one winning chunk again for the lowest index holding b1
// and the chunk's own second best, once per row instead of once per thread.
template <typename scalar_t>
struct GreedyState {
  float mL, s, t, b1, b2;  // mL = b1 * log2(e), rounded: the base of s and t (base 2)
  int32_t best_v0, n_inf, first_inf;

  __device__ __forceinline__ void init() {
    mL = -INFINITY; s = 0.f; t = 0.f; b1 = -INFINITY; b2 = -INFINITY; best_v0 = -1; n_inf = 0; first_inf = -1;
  }

  // x: the chunk's logits as floats (barred ones -inf); v0: its first index.
  __device__ __forceinline__ void push(const float (&x)[8], int32_t v0) {
    const float top = fmaxf(fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3])), fmaxf(fmaxf(x[4], x[5]), fmaxf(x[6], x[7])));
    if (top == INFINITY) {  // rare: from now on only the +inf count matters (finish_scores)
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        if (x[k] == INFINITY) {
          if (n_inf == 0) first_inf = v0 + k;
          ++n_inf;
        }
      }
      return;
    }
    const bool new_best = top > b1;  // ties keep the earlier (lower) chunk
    b2 = fmaxf(b2, new_best ? b1 : top);
    b1 = new_best ? top : b1;
    best_v0 = new_best ? v0 : best_v0;
    if (b1 > -INFINITY) {  // false only while every logit so far is -inf
      const float base = __fmul_rn(b1, kLog2e);  // rounded once: mL and the shift agree
      const float shift = mL - base;  // <= 0; -inf before the first finite logit
      const float scale = exp2_approx(shift);
      t = scale * fmaf(fmaxf(shift, -150.f), s, t);
      s *= scale;
      mL = base;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float d = fmaf(x[k], kLog2e, -mL);
        const float e = exp2_approx(d);  // 0 for -inf
        s += e;
        t = fmaf(e, fmaxf(d, -150.f), t);  // keeps 0 * -inf out
      }
    }
  }

  // Folds in another state of the same row: the larger chunk maximum wins, ties to the lower chunk;
  // the sums move to the larger base (one ex2 each side, 1 for the winner's).
  __device__ __forceinline__ void merge(const GreedyState& o) {
    const bool take = o.b1 > b1 || (o.b1 == b1 && o.best_v0 >= 0 && (best_v0 < 0 || o.best_v0 < best_v0));
    b2 = take ? fmaxf(o.b2, b1) : fmaxf(b2, o.b1);
    best_v0 = take ? o.best_v0 : best_v0;
    const float top = fmaxf(b1, o.b1);
    if (top > -INFINITY) {
      const float base = __fmul_rn(top, kLog2e);
      const float shift = mL - base, o_shift = o.mL - base;  // <= 0; -inf for a side with no finite logit
      const float scale = exp2_approx(shift), o_scale = exp2_approx(o_shift);
      t = scale * fmaf(fmaxf(shift, -150.f), s, t) + o_scale * fmaf(fmaxf(o_shift, -150.f), o.s, o.t);
      s = scale * s + o_scale * o.s;
      mL = base;
    }
    b1 = top;
    n_inf += o.n_inf;
    first_inf = first_inf < 0 ? o.first_inf : (o.first_inf < 0 ? first_inf : min(first_inf, o.first_inf));
  }

  // Merges a warp's lanes: seven shuffles a step (the base mL follows from b1).
  __device__ __forceinline__ void warp_merge() {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      GreedyState o;
      o.b1 = __shfl_xor_sync(kFullWarp, b1, offset);
      o.b2 = __shfl_xor_sync(kFullWarp, b2, offset);
      o.s = __shfl_xor_sync(kFullWarp, s, offset);
      o.t = __shfl_xor_sync(kFullWarp, t, offset);
      o.best_v0 = __shfl_xor_sync(kFullWarp, best_v0, offset);
      o.n_inf = __shfl_xor_sync(kFullWarp, n_inf, offset);
      o.first_inf = __shfl_xor_sync(kFullWarp, first_inf, offset);
      o.mL = __fmul_rn(o.b1, kLog2e);  // exactly as push rounded it: not fused into the shift below
      merge(o);
    }
  }

  __device__ __forceinline__ LaneState lane() const {
    LaneState st;
    st.n_inf = n_inf; st.first_inf = first_inf; st.g = -HUGE_VAL; st.gi = -1;
    st.m = b1; st.b1 = b1; st.b2 = b2; st.i1 = best_v0 >= 0 ? -2 - best_v0 : -1;
    natural_sums(b1, mL, s, t, st);
    return st;
  }
};

// A greedy 2-byte row's merged state whose maximum lies in an unresolved chunk (i1 = -2 - c), given
// the chunk's 16 bytes (logits c .. c + 7): the lowest index in it holding b1, and b2 raised to the
// chunk's own second best. Barred ids read as -inf, as in the hot loop.
template <typename scalar_t>
__device__ void resolve_chunk(ScoreState& st, const uint4& raw, int64_t mask_id, const int64_t* stops, int num_stops,
                              bool bar_stop) {
  const int64_t c = -2 - st.i1;
  const scalar_t* vals = reinterpret_cast<const scalar_t*>(&raw);
  int at = -1;
  float second = -INFINITY;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    float x = to_float(vals[k]);
    x = c + k == mask_id ? -INFINITY : x;
    for (int j = 0; bar_stop && j < num_stops; ++j) x = stops[j] == c + k ? -INFINITY : x;
    if (x == st.b1 && at < 0) at = k; else second = fmaxf(second, x);
  }
  st.i1 = c + max(at, 0);
  st.b2 = fmaxf(st.b2, second);
}

// Merges the states of a warp's lanes; every lane ends with the merged state.
template <bool kSampled>
__device__ __forceinline__ void warp_merge(LaneState& st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    LaneState o;
    o.m = __shfl_xor_sync(kFullWarp, st.m, offset);
    o.s = __shfl_xor_sync(kFullWarp, st.s, offset);
    o.t = __shfl_xor_sync(kFullWarp, st.t, offset);
    o.b1 = __shfl_xor_sync(kFullWarp, st.b1, offset);
    o.i1 = __shfl_xor_sync(kFullWarp, st.i1, offset);
    o.b2 = __shfl_xor_sync(kFullWarp, st.b2, offset);
    o.n_inf = __shfl_xor_sync(kFullWarp, st.n_inf, offset);
    o.first_inf = __shfl_xor_sync(kFullWarp, st.first_inf, offset);
    if (kSampled) {
      o.g = __shfl_xor_sync(kFullWarp, st.g, offset);
      o.gi = __shfl_xor_sync(kFullWarp, st.gi, offset);
    } else {
      o.g = st.g; o.gi = st.gi;
    }
    st.merge(o);
  }
}

__device__ __forceinline__ ScoreState to_memory(const LaneState& st) {
  ScoreState out;
  out.m = st.m; out.s = st.s; out.t = st.t; out.b1 = st.b1; out.i1 = st.i1; out.b2 = st.b2;
  out.n_inf = st.n_inf; out.first_inf = st.first_inf; out.g = st.g; out.gi = st.gi;
  return out;
}

// A row's scores from its merged state. Greedy rows take the chosen logit from the state (b1);
// sampled ones read it; greedy 2-byte rows first resolve their winning chunk (resolve_chunk: one
// 16-byte read per row).
template <typename scalar_t, bool kSampled>
__device__ __forceinline__ void write_scores(ScoreState merged, const scalar_t* row, int64_t mask_id,
                                             const int64_t* stops, int num_stops, bool bar_stop, int64_t* token,
                                             float* confidence, float* margin, float* neg_entropy) {
  if constexpr (!kSampled && sizeof(scalar_t) == 2) {
    if (merged.i1 <= -2 && merged.n_inf == 0) {
      const uint4 raw = *reinterpret_cast<const uint4*>(row - 2 - merged.i1);
      resolve_chunk<scalar_t>(merged, raw, mask_id, stops, num_stops, bar_stop);
    }
  }
  const float chosen_logit = kSampled ? (merged.gi >= 0 ? to_float(row[merged.gi]) : 0.f) : merged.b1;
  finish_scores(merged, kSampled, chosen_logit, *token, *confidence, *margin, *neg_entropy);
}

// Called by each stage-1 thread once its loop is done: the finish kernel, launched as a
// programmatic dependent, may be scheduled once every block has got here (sm_90+).
__device__ __forceinline__ void finish_may_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// Stage 1: block (row, split) folds its slice of the row into one state. Thread `tid` reads the
// 16-byte chunks tid, tid + kBlock, ... two loads in flight; the few threads whose chunks hold a
// barred id check for it, the others never do. Greedy 2-byte rows fold into a GreedyState and
// merge in that form; the rest fold into a LightState and merge as LaneStates. Lanes merge by
// warp shuffles, warps through shared memory. A block that reads a whole row writes its scores;
// otherwise it leaves a partial state for stage 2. Greedy 2-byte rows get at most 40 registers,
// so that 6 blocks of 256 threads or 2 of 768 share an SM (the 47 the compiler would take leave
// 5 blocks of 256, measured slower at N = 256 on the H100).
template <typename scalar_t, bool kSampled, int kBlock>
__global__ void __launch_bounds__(kBlock, kSampled || sizeof(scalar_t) > 2 ? 1 : 6 * kThreads / kBlock)
    score_partial_kernel(const scalar_t* __restrict__ logits, int64_t stride, int64_t V, int64_t span,
                         const int64_t* __restrict__ rows, int64_t mask_id, const int64_t* __restrict__ stops,
                         int num_stops, const bool* __restrict__ bar_stop, double temperature,
                         const double* __restrict__ noise, ScoreState* __restrict__ partial,
                         int64_t* __restrict__ tokens, float* __restrict__ confidence, float* __restrict__ margin,
                         float* __restrict__ neg_entropy) {
  constexpr int kWarps = kBlock / 32;
  __shared__ int32_t barred[kMaxStops + 1];
  const int64_t i = blockIdx.x;
  const int split = blockIdx.y;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const scalar_t* row = logits + rows[i] * stride;
  const int32_t begin = static_cast<int32_t>(split * span);
  const int32_t end = static_cast<int32_t>(min(V, split * span + span));
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool aligned = (reinterpret_cast<uintptr_t>(row + begin) % 16 == 0) && ((end - begin) % kVec == 0);
  const uint4* vec = reinterpret_cast<const uint4*>(row + begin);
  const int32_t chunks = aligned ? (end - begin) / kVec : 0;
  // The first load goes out before the barred ids are staged, so their latency overlaps.
  uint4 current = kVec == 8 && tid < chunks ? __ldcs(vec + tid) : make_uint4(0u, 0u, 0u, 0u);
  const int num_barred = 1 + (bar_stop[i] ? num_stops : 0);
  // Ids outside [0, V) bar nothing (mask_id is checked on the host; stop ids would need a sync,
  // so paradec.ops checks them outside graph capture); -1 matches no index.
  if (tid == 0) barred[0] = static_cast<int32_t>(mask_id);
  if (tid < num_stops) barred[tid + 1] = stops[tid] >= 0 && stops[tid] < V ? static_cast<int32_t>(stops[tid]) : -1;
  __syncthreads();
  // The block's merged state: the row's scores when the block read all of it, else a partial state.
  auto emit = [&](const LaneState& total) {
    if (gridDim.y > 1) {
      partial[i * gridDim.y + split] = to_memory(total);
    } else {
      write_scores<scalar_t, kSampled>(to_memory(total), row, mask_id, stops, num_stops, bar_stop[i], tokens + i,
                                       confidence + i, margin + i, neg_entropy + i);
    }
  };
  bool mine = false;  // does one of this thread's chunks hold a barred id?
  for (int k = 0; k < num_barred; ++k) {
    const int32_t at = barred[k] - begin;
    mine |= at >= 0 && at < end - begin && (at / kVec) % kBlock == tid;
  }
  auto logits8 = [&](const uint4& raw, int32_t v0, float (&x)[8]) {
    const scalar_t* vals = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
    for (int k = 0; k < 8; ++k) x[k] = to_float(vals[k]);
    if (mine) {
      for (int k = 0; k < num_barred; ++k) {
        const uint32_t at = static_cast<uint32_t>(barred[k] - v0);
        if (at < 8u) x[at] = -INFINITY;
      }
    }
  };
  // The next load is requested before the current one is folded (one or two in flight: more
  // measured slower on the H100). Streaming loads (__ldcs): every logit is read once.
  if constexpr (!kSampled && kVec == 8) {
    if (aligned) {
      GreedyState<scalar_t> greedy;
      greedy.init();
      for (int32_t c = tid; c < chunks; c += kBlock) {
        const uint4 next = c + kBlock < chunks ? __ldcs(vec + c + kBlock) : current;
        float x[8];
        logits8(current, begin + c * kVec, x);
        greedy.push(x, begin + c * kVec);
        current = next;
      }
      finish_may_launch();
      __shared__ GreedyState<scalar_t> greedy_states[kWarps];
      greedy.warp_merge();
      // A block reading a whole row resolves the row's best chunk at the end (write_scores): each
      // warp's best chunk is prefetched into the SM's L1 now, so that the read overlaps the merge.
      if (gridDim.y == 1 && lane == 0 && greedy.best_v0 >= 0 && greedy.n_inf == 0) {
        asm volatile("prefetch.global.L1 [%0];" ::"l"(row + greedy.best_v0));
      }
      if (lane == 0) greedy_states[warp] = greedy;
      __syncthreads();
      if (warp != 0) return;
      if (lane < kWarps) greedy = greedy_states[lane]; else greedy.init();
      greedy.warp_merge();
      if (lane == 0) emit(greedy.lane());
      return;
    }
  }
  const double* nz = kSampled ? noise + i * V : nullptr;
  LightState<kSampled> st;
  st.init();
  if (aligned && kVec == 8) {  // sampled bf16 / fp16: eight logits per load
    for (int32_t c = tid; c < chunks; c += kBlock) {
      const uint4 next = c + kBlock < chunks ? __ldcs(vec + c + kBlock) : current;
      float x[8];
      logits8(current, begin + c * kVec, x);
      st.push8(x, begin + c * kVec, nz, temperature);
      current = next;
    }
  } else {
    auto visit = [&](float x, int32_t v) {
      for (int k = 0; k < num_barred; ++k) x = barred[k] == v ? -INFINITY : x;
      st.push(x, v, nz, temperature);
    };
    if (aligned) {
      for (int32_t c = tid; c < chunks; c += kBlock) {
        const uint4 raw = vec[c];
        const scalar_t* vals = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
        for (int k = 0; k < kVec; ++k) visit(to_float(vals[k]), begin + c * kVec + k);
      }
    } else {
      for (int32_t v = begin + tid; v < end; v += kBlock) visit(to_float(row[v]), v);
    }
  }
  finish_may_launch();
  __shared__ LaneState warp_states[kWarps];
  LaneState total = st.lane();
  warp_merge<kSampled>(total);
  if (lane == 0) warp_states[warp] = total;
  __syncthreads();
  if (warp != 0) return;
  LightState<kSampled> empty;
  empty.init();
  total = lane < kWarps ? warp_states[lane] : empty.lane();
  warp_merge<kSampled>(total);
  if (lane == 0) emit(total);
}

// Stage 2, for rows split among several blocks: one warp per row merges the row's slices (a lane
// per slice, then shuffles) and writes its scores. On sm_90+ it is launched as a programmatic
// dependent of stage 1: its blocks are scheduled once every stage-1 block has left its loop, and
// wait there for the partial states.
template <typename scalar_t, bool kSampled>
__global__ void score_finish_kernel(const scalar_t* __restrict__ logits, int64_t stride, const int64_t* __restrict__ rows,
                                    const ScoreState* __restrict__ partial, int64_t N, int splits,
                                    int64_t mask_id, const int64_t* __restrict__ stops, int num_stops,
                                    const bool* __restrict__ bar_stop,
                                    int64_t* __restrict__ tokens, float* __restrict__ confidence,
                                    float* __restrict__ margin, float* __restrict__ neg_entropy) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");  // every partial state written and visible
#endif
  const int64_t i = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (i >= N) return;  // whole warps leave together
  LightState<kSampled> empty;
  empty.init();
  LaneState total = empty.lane();
  for (int k = lane; k < splits; k += 32) {
    const ScoreState& p = partial[i * splits + k];
    LaneState st;
    st.m = p.m; st.s = p.s; st.t = p.t; st.b1 = p.b1; st.i1 = static_cast<int32_t>(p.i1); st.b2 = p.b2;
    st.n_inf = static_cast<int32_t>(p.n_inf); st.first_inf = static_cast<int32_t>(p.first_inf);
    st.g = p.g; st.gi = static_cast<int32_t>(p.gi);
    total.merge(st);
  }
  warp_merge<kSampled>(total);
  if (lane != 0) return;
  write_scores<scalar_t, kSampled>(to_memory(total), logits + rows[i] * stride, mask_id, stops, num_stops, bar_stop[i],
                                   tokens + i, confidence + i, margin + i, neg_entropy + i);
}

// A per-device fact asked of the runtime once: `ask()` (> 0) the first time, kept in `known`.
template <typename Ask>
int once_per_device(std::array<std::atomic<int>, 64>& known, int device, Ask ask) {
  PARADEC_CHECK(device >= 0 && device < 64, "paradec::score: CUDA device index ", device, " is outside [0, 64)");
  std::atomic<int>& slot = known[static_cast<size_t>(device)];
  int value = slot.load(std::memory_order_relaxed);
  if (value == 0) {
    value = ask();
    slot.store(value, std::memory_order_relaxed);
  }
  return value;
}

// Blocks of score_partial_kernel<scalar_t, kSampled, kBlock> an SM of `device` holds at once.
template <typename scalar_t, bool kSampled, int kBlock>
int resident_blocks(int device) {
  static std::array<std::atomic<int>, 64> known{};
  return once_per_device(known, device, [] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &blocks, score_partial_kernel<scalar_t, kSampled, kBlock>, kBlock, 0));
    return std::max(1, blocks);
  });
}

// Whether score_finish_kernel<scalar_t, kSampled> may start before stage 1 ends on `device`: only
// code generated for sm_90+ holds its griddepcontrol.wait (a build for older targets JIT-compiled
// on a newer GPU does not), and graphs capture such launches from CUDA 12.3 on.
template <typename scalar_t, bool kSampled>
bool finish_launches_early(int device) {
#if CUDART_VERSION >= 12030
  static std::array<std::atomic<int>, 64> known{};  // 1: no, 2: yes
  return once_per_device(known, device, [] {
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, score_finish_kernel<scalar_t, kSampled>));
    return attributes.ptxVersion >= 90 && attributes.binaryVersion >= 90 ? 2 : 1;
  }) == 2;
#else
  return false;
#endif
}

// Blocks per row: the fewest splits (slices at least 4096 wide where the row allows, at most 64)
// whose N * splits blocks fill the GPU's `slots` resident blocks in waves at least 85% full on
// average; else the fullest. A partial last wave leaves SMs idle while the rest of the row's
// blocks finish, and every extra split costs a block's fixed work and a partial state.
int row_splits(int64_t N, int64_t V, int64_t slots) {
  const int64_t widest = std::max<int64_t>(1, std::min<int64_t>(64, V / 4096));
  int64_t best = 1;
  double best_fill = 0.0;
  for (int64_t s = 1; s <= widest; ++s) {
    const int64_t blocks = N * s;
    const double fill = static_cast<double>(blocks) / (static_cast<double>((blocks + slots - 1) / slots) * slots);
    if (fill >= 0.85) return static_cast<int>(s);
    if (fill > best_fill) { best = s; best_fill = fill; }
  }
  return static_cast<int>(best);
}

// Blocks per row when a row's bits must not depend on the rows beside it (row_invariant): from V
// alone, slices about 4096 wide (at most 64), so the partial states and their merge run in one
// order whatever N is.
int invariant_splits(int64_t V) { return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(64, V / 4096))); }

// Whether each of N greedy 2-byte rows gets one block of kRowThreads threads: when they fill one or
// two waves of the GPU's `slots` such blocks at least 85% (and a row holds two 16-byte loads per
// thread). A row read by one block needs no finish kernel and no partial states, and a third as
// many blocks start and merge as for 256-thread slices of the same rows (N = 256 on the H100:
// 27.2 against 30.8 us). With more waves, smaller blocks finishing at staggered times keep the SMs
// busier (N = 4096: 377 against 366 us), so rows are split among 256-thread blocks (row_splits).
bool whole_rows(int64_t N, int64_t V, int64_t slots) {
  if (V < 16 * kRowThreads || N > 2 * slots) return false;
  const int64_t waves = (N + slots - 1) / slots;
  return static_cast<double>(N) >= 0.85 * static_cast<double>(waves * slots);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> score_cuda(const Tensor& logits, const Tensor& rows, int64_t mask_id,
                                                      const Tensor& stop_ids, const Tensor& bar_stop,
                                                      double temperature, const c10::optional<Tensor>& noise,
                                                      bool row_invariant) {
  check_score_args(logits, rows, mask_id, stop_ids, bar_stop, temperature, noise);
  PARADEC_CHECK(stop_ids.size(0) <= kMaxStops, "paradec::score: at most ", kMaxStops,
              " stop_ids on CUDA, got ", stop_ids.size(0));
  PARADEC_CHECK(logits.size(1) < (int64_t(1) << 31), "paradec::score: V must be < 2^31 on CUDA");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = rows.size(0), V = logits.size(1);
  auto tokens = at::empty({N}, rows.options());
  auto conf = at::empty({N}, logits.options().dtype(at::kFloat));
  auto marg = at::empty_like(conf);
  auto negent = at::empty_like(conf);
  if (N == 0) return {tokens, conf, marg, negent};
  auto rows_c = rows.contiguous();
  auto stops = stop_ids.contiguous();
  auto bar = bar_stop.contiguous();
  Tensor noise_c = temperature > 0 ? noise->contiguous() : Tensor();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "paradec_score_cuda", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    const bool sampled = temperature > 0;
    const int device = logits.get_device();
    auto partial_kernel = sampled ? score_partial_kernel<scalar_t, true, kThreads>
                                  : score_partial_kernel<scalar_t, false, kThreads>;
    const auto finish_kernel = sampled ? score_finish_kernel<scalar_t, true> : score_finish_kernel<scalar_t, false>;
    int threads = kThreads, splits = 1;
    bool whole = false;
    if constexpr (sizeof(scalar_t) == 2) {
      whole = !sampled && !row_invariant && whole_rows(N, V, resident_blocks<scalar_t, false, kRowThreads>(device) * int64_t{sms});
      if (whole) {
        partial_kernel = score_partial_kernel<scalar_t, false, kRowThreads>;
        threads = kRowThreads;
      }
    }
    if (!whole) {
      const int per_sm = sampled ? resident_blocks<scalar_t, true, kThreads>(device)
                                 : resident_blocks<scalar_t, false, kThreads>(device);
      splits = row_invariant ? invariant_splits(V) : row_splits(N, V, static_cast<int64_t>(per_sm) * sms);
    }
    const int64_t span = ((V + splits - 1) / splits + 15) / 16 * 16;  // 16-byte loads stay aligned
    splits = static_cast<int>((V + span - 1) / span);
    // A row split over several blocks leaves a partial state per block for the finish kernel.
    Tensor partial = splits > 1 ? at::empty({N * splits * static_cast<int64_t>(sizeof(ScoreState))},
                                            logits.options().dtype(at::kByte))
                                : Tensor();
    auto* states = splits > 1 ? reinterpret_cast<ScoreState*>(partial.data_ptr<uint8_t>()) : nullptr;
    const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(splits));
    partial_kernel<<<grid, threads, 0, stream>>>(base, logits.stride(0), V, span, rows_c.data_ptr<int64_t>(), mask_id,
                                                 stops.data_ptr<int64_t>(), static_cast<int>(stops.size(0)),
                                                 bar.data_ptr<bool>(), temperature,
                                                 sampled ? noise_c.data_ptr<double>() : nullptr, states,
                                                 tokens.data_ptr<int64_t>(), conf.data_ptr<float>(),
                                                 marg.data_ptr<float>(), negent.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (splits == 1) return;
    const int finish_threads = 256, rows_per_block = finish_threads / 32;
    const auto finish_blocks = static_cast<unsigned>((N + rows_per_block - 1) / rows_per_block);
    cudaLaunchConfig_t finish = {};
    finish.gridDim = dim3(finish_blocks);
    finish.blockDim = dim3(finish_threads);
    finish.stream = stream;
    cudaLaunchAttribute early[1];
    early[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    early[0].val.programmaticStreamSerializationAllowed = 1;
    const bool early_ok = sampled ? finish_launches_early<scalar_t, true>(device)
                                  : finish_launches_early<scalar_t, false>(device);
    if (early_ok) {  // programmatic dependent launch
      finish.attrs = early;
      finish.numAttrs = 1;
    }
    C10_CUDA_CHECK(cudaLaunchKernelEx(&finish, finish_kernel, base, logits.stride(0),
                                      static_cast<const int64_t*>(rows_c.data_ptr<int64_t>()),
                                      static_cast<const ScoreState*>(states), N, splits, mask_id,
                                      static_cast<const int64_t*>(stops.data_ptr<int64_t>()),
                                      static_cast<int>(stops.size(0)), static_cast<const bool*>(bar.data_ptr<bool>()),
                                      tokens.data_ptr<int64_t>(),
                                      conf.data_ptr<float>(), marg.data_ptr<float>(), negent.data_ptr<float>()));
  });
  return {tokens, conf, marg, negent};
}

// One thread per candidate; the block walks all candidates in tiles staged in shared memory.
__global__ void __launch_bounds__(kThreads) select_kernel(
    int64_t* __restrict__ canvas, int64_t* __restrict__ trace, int64_t C, int64_t N, const int64_t* __restrict__ b,
    const int64_t* __restrict__ col, const int64_t* __restrict__ key, const float* __restrict__ score,
    const float* __restrict__ conf, const int64_t* __restrict__ quota, const int64_t* __restrict__ floor_,
    const int64_t* __restrict__ tokens, int64_t rule, float param, int64_t step, bool* __restrict__ committed) {
  __shared__ int64_t tile_key[kThreads];
  __shared__ int64_t tile_col[kThreads];
  __shared__ float tile_score[kThreads];
  const int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  const bool live = i < N;
  const int64_t k = live ? key[i] : -1;
  const float s = live ? score[i] : 0.f;
  const int64_t c = live ? col[i] : 0;
  int64_t rank = 0;  // candidates of the same segment ahead of this one
  for (int64_t first = 0; first < N; first += kThreads) {
    const int64_t j = first + threadIdx.x;
    if (j < N) { tile_key[threadIdx.x] = key[j]; tile_col[threadIdx.x] = col[j]; tile_score[threadIdx.x] = score[j]; }
    __syncthreads();
    const int n = static_cast<int>(min(static_cast<int64_t>(kThreads), N - first));
    for (int t = 0; t < n; ++t) {
      const float sj = tile_score[t];
      rank += (tile_key[t] == k) & (first + t != i) & ((sj > s) | ((sj == s) & (tile_col[t] < c)));
    }
    __syncthreads();
  }
  if (!live) return;
  const bool ok = accepted(rule, param, rank, conf[i], quota[i], floor_[i]);
  committed[i] = ok;
  if (ok) {
    canvas[b[i] * C + c] = tokens[i];
    trace[b[i] * C + c] = step;
  }
}

Tensor select_commit_cuda(Tensor& canvas, Tensor& trace, const Tensor& batch_index, const Tensor& column,
                          const Tensor& key, const Tensor& score, const Tensor& confidence, const Tensor& quota,
                          const Tensor& floor, const Tensor& tokens, int64_t rule, double param, int64_t step) {
  check_select_args(canvas, trace, {&batch_index, &column, &key, &quota, &floor, &tokens}, score, confidence, rule);
  const c10::cuda::CUDAGuard guard(canvas.device());
  const int64_t N = score.size(0);
  auto committed = at::empty({N}, score.options().dtype(at::kBool));
  if (N == 0) return committed;
  auto b = batch_index.contiguous(), c = column.contiguous(), k = key.contiguous(), q = quota.contiguous(),
       f = floor.contiguous(), tok = tokens.contiguous(), sc = score.contiguous(), cf = confidence.contiguous();
  const int64_t blocks = (N + kThreads - 1) / kThreads;
  select_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      canvas.data_ptr<int64_t>(), trace.data_ptr<int64_t>(), canvas.size(1), N, b.data_ptr<int64_t>(),
      c.data_ptr<int64_t>(), k.data_ptr<int64_t>(), sc.data_ptr<float>(), cf.data_ptr<float>(),
      q.data_ptr<int64_t>(), f.data_ptr<int64_t>(), tok.data_ptr<int64_t>(), rule, static_cast<float>(param), step,
      committed.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return committed;
}

TORCH_LIBRARY_IMPL(paradec, CUDA, m) {
  m.impl("score", &score_cuda);
  m.impl("select_commit", &select_commit_cuda);
}

}  // namespace paradec
