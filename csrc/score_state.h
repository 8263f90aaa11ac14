// Per-row scoring state shared by the CPU and CUDA kernels: an online softmax that never
// materialises probabilities, the top-2 logits, the +inf count, and the Gumbel-max winner.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define PARADEC_HD __host__ __device__ __forceinline__
#else
#define PARADEC_HD inline
#endif

namespace paradec {

// Index: int64_t for the CPU kernel and the CUDA partial states in memory; int32_t inside a CUDA
// block, where states travel between lanes by warp shuffles.
template <typename Index>
struct BasicScoreState {
  float m;          // running max over finite allowed logits (-inf: none yet)
  float s;          // sum of exp(x - m)
  float t;          // sum of exp(x - m) * (x - m)
  float b1;         // largest allowed logit (+inf included), ties keep the lowest index
  Index i1;
  float b2;         // second largest (equal to b1 when the maximum is tied)
  Index n_inf;      // allowed +inf logits
  Index first_inf;
  double g;         // best x / T + gumbel, and its index
  Index gi;

  PARADEC_HD void init() {
    const float ninf = -std::numeric_limits<float>::infinity();
    m = ninf; s = 0.f; t = 0.f; b1 = ninf; i1 = -1; b2 = ninf; n_inf = 0; first_inf = -1;
    g = -std::numeric_limits<double>::infinity(); gi = -1;
  }

  PARADEC_HD void push_gumbel(double value, Index v) {
    if (value > g) { g = value; gi = v; }
  }

  // Merge another state (any index order): ties go to the lowest index.
  PARADEC_HD void merge(const BasicScoreState& o) {
    // top-2 of the union, and the lowest index holding the maximum
    const float nb1 = fmaxf(b1, o.b1);
    const float nb2 = b1 >= o.b1 ? fmaxf(b2, o.b1) : fmaxf(b1, o.b2);
    Index ni1 = b1 > o.b1 ? i1 : (o.b1 > b1 ? o.i1 : lowest(i1, o.i1));
    b1 = nb1; b2 = nb2; i1 = ni1;
    // +inf
    first_inf = lowest(first_inf, o.first_inf);
    n_inf += o.n_inf;
    // online softmax
    if (o.s > 0.f) {
      if (!(s > 0.f)) { m = o.m; s = o.s; t = o.t; }
      else {
        const float nm = fmaxf(m, o.m);
        const float a = expf(m - nm), c = expf(o.m - nm);
        t = a * (t + (m - nm) * s) + c * (o.t + (o.m - nm) * o.s);
        s = a * s + c * o.s;
        m = nm;
      }
    }
    // Gumbel winner
    if (o.g > g) { g = o.g; gi = o.gi; }
    else if (o.g == g) { gi = lowest(gi, o.gi); }
  }

  // The lower of two indices, -1 meaning none. i1 may also hold -2 - c: "the maximum lies in the
  // 16-byte chunk of 2-byte logits starting at c, not yet resolved" (the CUDA kernel's greedy
  // rows, resolved once per row at the end). Such a chunk never straddles another state's
  // indices, so its start orders it.
  static PARADEC_HD Index lowest(Index a, Index b) {
    if (a == -1) return b;
    if (b == -1) return a;
    return place(a) < place(b) ? a : b;
  }

  static PARADEC_HD Index place(Index a) { return a <= -2 ? -2 - a : a; }
};

using ScoreState = BasicScoreState<int64_t>;

// Final scores of a row from its state. `chosen_logit` is the logit of the chosen token.
PARADEC_HD void finish_scores(const ScoreState& st, bool sampled, float chosen_logit, int64_t& token,
                              float& confidence, float& margin, float& neg_entropy) {
  if (st.n_inf > 0) {  // the limit of the softmax: uniform over the +inf logits
    token = st.first_inf;
    const float n = static_cast<float>(st.n_inf);
    confidence = 1.f / n;
    margin = st.n_inf >= 2 ? 0.f : 1.f;
    neg_entropy = -logf(n);
    return;
  }
  if (!(st.s > 0.f)) {  // nothing allowed and finite: no token
    token = -1; confidence = 0.f; margin = 0.f; neg_entropy = 0.f;
    return;
  }
  token = sampled ? st.gi : st.i1;
  confidence = expf(chosen_logit - st.m) / st.s;
  margin = (expf(st.b1 - st.m) - expf(st.b2 - st.m)) / st.s;
  neg_entropy = st.t / st.s - logf(st.s);
}

}  // namespace paradec
