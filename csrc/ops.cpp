// paradec's ops: schemas and CPU kernels.
//
// paradec::score — one pass over each addressed logits row: the chosen token (argmax, or the
//   Gumbel-max sample argmax(x / T - log(-log u)) in float64), its probability, the top-1 minus
//   top-2 probability and the negative entropy, by an online softmax. Barred ids (the mask id
//   always, the stop ids on rows that ask) are never chosen. row_invariant: each row's reduction order
//   depends on V alone, never on how many rows share the call (the CPU kernel's always does).
// paradec::select_commit — per segment (key), rank candidates by score (ties: lowest position),
//   commit by rule (top-k quota, threshold, factor; each with a floor), and write the committed
//   tokens and the step into the canvas and trace in place.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "check.h"
#include "rules.h"
#include "score_state.h"

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

namespace paradec {

using at::Tensor;

// exp(x) for x <= 0 by range reduction and Cephes' polynomial (max relative error ~2e-7);
// written without branches or libm calls so the compiler vectorises the loop around it.
static inline float exp_nonpositive(float x) {
  const float clamped = std::max(x, -87.0f);
  const float k = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  float r = clamped - k * 0.693145751953125f;
  r = r - k * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale * static_cast<float>(x >= -87.0f);  // 0 below (and for -inf)
}

// A tensor's shape as text, for error messages.
static std::string dims(const Tensor& t) {
  std::string out = "[";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + std::to_string(t.size(d));
  return out + "]";
}

constexpr int64_t kChunk = 2048;
constexpr int kLanes = 16;  // independent accumulators: lets the compiler vectorise without reassociating

// Largest value of x[0:n] and how many entries are +inf.
static inline void lane_max(const float* x, int64_t n, float& top, int64_t& n_inf) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const float pinf = std::numeric_limits<float>::infinity();
  float acc[kLanes];
  int32_t inf[kLanes];
  for (int l = 0; l < kLanes; ++l) { acc[l] = ninf; inf[l] = 0; }
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = x[j + l];
      acc[l] = std::max(acc[l], v);
      inf[l] += static_cast<int32_t>(v == pinf);
    }
  }
  top = ninf;
  n_inf = 0;
  for (; j < n; ++j) { top = x[j] > top ? x[j] : top; n_inf += x[j] == pinf; }
  for (int l = 0; l < kLanes; ++l) { top = acc[l] > top ? acc[l] : top; n_inf += inf[l]; }
}

// sum exp(x - m) and sum exp(x - m) * (x - m) over x[0:n] (all x finite or -inf, m = max);
// e is scratch for n values.
static inline void exp_sums(const float* x, float* e, int64_t n, float m, float& s, float& t) {
  for (int64_t j = 0; j < n; ++j) e[j] = exp_nonpositive(x[j] - m);
  float sa[kLanes], ta[kLanes];
  for (int l = 0; l < kLanes; ++l) { sa[l] = 0.f; ta[l] = 0.f; }
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      sa[l] += e[j + l];
      ta[l] += e[j + l] * std::max(x[j + l] - m, -100.f);  // exp is 0 below: keeps 0 * -inf out
    }
  }
  s = 0.f;
  t = 0.f;
  for (; j < n; ++j) {
    s += e[j];
    t += e[j] * std::max(x[j] - m, -100.f);
  }
  for (int l = 0; l < kLanes; ++l) { s += sa[l]; t += ta[l]; }
}

template <typename scalar_t>
static void score_row(const scalar_t* src, int64_t V, const std::vector<int64_t>& barred, double temperature,
                      const double* noise, int64_t& token, float& confidence, float& margin, float& neg_entropy) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const float pinf = std::numeric_limits<float>::infinity();
  ScoreState st;
  st.init();
  float buf[kChunk];
  float scratch[kChunk];
  size_t next_barred = 0;
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(src[start + j]);
    while (next_barred < barred.size() && barred[next_barred] < start + n) {
      if (barred[next_barred] >= start) buf[barred[next_barred] - start] = ninf;
      ++next_barred;
    }
    ScoreState chunk;
    chunk.init();
    float top;
    lane_max(buf, n, top, chunk.n_inf);
    if (top > ninf) {
      // the first index of the maximum, then the largest value elsewhere (equal to it on ties)
      int64_t i1 = 0;
      while (buf[i1] != top) ++i1;
      buf[i1] = ninf;
      int64_t unused;
      lane_max(buf, n, chunk.b2, unused);
      buf[i1] = top;
      chunk.b1 = top;
      chunk.i1 = start + i1;
    }
    if (chunk.n_inf > 0) {
      int64_t j = 0;
      while (buf[j] != pinf) ++j;
      chunk.first_inf = start + j;
    } else if (top > ninf && st.n_inf == 0) {
      chunk.m = top;
      exp_sums(buf, scratch, n, top, chunk.s, chunk.t);
    }
    if (noise != nullptr) {
      for (int64_t j = 0; j < n; ++j) {
        if (buf[j] == ninf) continue;
        const double g = static_cast<double>(buf[j]) / temperature - std::log(-std::log(noise[start + j]));
        chunk.push_gumbel(g, start + j);
      }
    }
    st.merge(chunk);
  }
  const bool sampled = noise != nullptr;
  const int64_t chosen = sampled ? st.gi : st.i1;
  const float chosen_logit = chosen >= 0 ? static_cast<float>(src[chosen]) : 0.f;
  finish_scores(st, sampled, chosen_logit, token, confidence, margin, neg_entropy);
}

void check_score_args(const Tensor& logits, const Tensor& rows, int64_t mask_id, const Tensor& stop_ids,
                      const Tensor& bar_stop, double temperature, const c10::optional<Tensor>& noise) {
  PARADEC_CHECK(logits.dim() == 2, "paradec::score: logits must be [R, V], got ", dims(logits));
  PARADEC_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                  logits.scalar_type() == at::kHalf,
              "paradec::score: logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
  PARADEC_CHECK(logits.size(1) >= 1, "paradec::score: logits must have V >= 1 columns, got ", dims(logits));
  PARADEC_CHECK(logits.stride(1) == 1, "paradec::score: logits rows must be contiguous");
  PARADEC_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, "paradec::score: rows must be [N] int64, got ",
              dims(rows), " ", rows.scalar_type());
  PARADEC_CHECK(mask_id >= 0 && mask_id < logits.size(1), "paradec::score: mask_id must lie in [0, V) = [0, ",
                logits.size(1), "), got ", mask_id);
  PARADEC_CHECK(stop_ids.dim() == 1 && stop_ids.scalar_type() == at::kLong, "paradec::score: stop_ids must be [S] int64");
  PARADEC_CHECK(bar_stop.dim() == 1 && bar_stop.scalar_type() == at::kBool && bar_stop.size(0) == rows.size(0),
              "paradec::score: bar_stop must be [N] bool with N = rows.size(0) = ", rows.size(0));
  for (const Tensor* t : {&rows, &stop_ids, &bar_stop}) {
    PARADEC_CHECK(t->device() == logits.device(), "paradec::score: every tensor must be on ", logits.device(),
                ", got one on ", t->device());
  }
  PARADEC_CHECK(temperature >= 0, "paradec::score: temperature must be >= 0, got ", temperature);
  if (temperature > 0) {
    PARADEC_CHECK(noise.has_value(), "paradec::score: noise is required when temperature > 0");
    PARADEC_CHECK(noise->scalar_type() == at::kDouble && noise->dim() == 2 && noise->size(0) == rows.size(0) &&
                    noise->size(1) == logits.size(1),
                "paradec::score: noise must be [N, V] float64 = [", rows.size(0), ", ", logits.size(1),
                "], got ", dims(*noise), " ", noise->scalar_type());
    PARADEC_CHECK(noise->device() == logits.device(), "paradec::score: noise must be on ", logits.device());
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> score_cpu(const Tensor& logits, const Tensor& rows, int64_t mask_id,
                                                     const Tensor& stop_ids, const Tensor& bar_stop, double temperature,
                                                     const c10::optional<Tensor>& noise, bool /*row_invariant*/) {
  check_score_args(logits, rows, mask_id, stop_ids, bar_stop, temperature, noise);
  const int64_t N = rows.size(0), V = logits.size(1), R = logits.size(0);
  auto rows_c = rows.contiguous();
  const int64_t* row_idx = rows_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    PARADEC_CHECK(row_idx[i] >= 0 && row_idx[i] < R, "paradec::score: rows[", i, "] = ", row_idx[i],
                " is outside [0, ", R, ")");
  }
  auto stops = stop_ids.contiguous();
  auto bar = bar_stop.contiguous();
  Tensor noise_c = temperature > 0 ? noise->contiguous() : Tensor();
  auto tokens = at::empty({N}, rows.options());
  auto conf = at::empty({N}, logits.options().dtype(at::kFloat));
  auto marg = at::empty_like(conf);
  auto negent = at::empty_like(conf);
  std::vector<int64_t> always = {mask_id};
  std::vector<int64_t> with_stops = {mask_id};
  for (int64_t k = 0; k < stops.size(0); ++k) {
    const int64_t id = stops.data_ptr<int64_t>()[k];
    PARADEC_CHECK(id >= 0 && id < V, "paradec::score: stop_ids[", k, "] = ", id, " is outside [0, ", V, ")");
    with_stops.push_back(id);
  }
  std::sort(with_stops.begin(), with_stops.end());
  with_stops.erase(std::unique(with_stops.begin(), with_stops.end()), with_stops.end());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "paradec_score_cpu", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    const int64_t stride = logits.stride(0);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const double* nz = temperature > 0 ? noise_c.data_ptr<double>() + i * V : nullptr;
        score_row<scalar_t>(base + row_idx[i] * stride, V, bar.data_ptr<bool>()[i] ? with_stops : always,
                            temperature, nz, tokens.data_ptr<int64_t>()[i], conf.data_ptr<float>()[i],
                            marg.data_ptr<float>()[i], negent.data_ptr<float>()[i]);
      }
    });
  });
  return {tokens, conf, marg, negent};
}

// ---- selection -------------------------------------------------------------------------------

void check_select_args(const Tensor& canvas, const Tensor& trace, const std::vector<const Tensor*>& flat,
                       const Tensor& score, const Tensor& confidence, int64_t rule) {
  PARADEC_CHECK(canvas.dim() == 2 && canvas.scalar_type() == at::kLong, "paradec::select_commit: canvas must be [B, C] int64");
  PARADEC_CHECK(trace.sizes() == canvas.sizes() && trace.scalar_type() == at::kLong,
              "paradec::select_commit: trace must be int64 shaped like canvas ", dims(canvas));
  PARADEC_CHECK(canvas.is_contiguous() && trace.is_contiguous(), "paradec::select_commit: canvas and trace must be contiguous");
  const int64_t N = score.size(0);
  PARADEC_CHECK(score.dim() == 1 && score.scalar_type() == at::kFloat, "paradec::select_commit: score must be [N] float32");
  PARADEC_CHECK(confidence.sizes() == score.sizes() && confidence.scalar_type() == at::kFloat,
              "paradec::select_commit: confidence must be [N] float32");
  const char* names[] = {"batch_index", "column", "key", "quota", "floor", "tokens"};
  for (size_t k = 0; k < flat.size(); ++k) {
    PARADEC_CHECK(flat[k]->dim() == 1 && flat[k]->size(0) == N && flat[k]->scalar_type() == at::kLong,
                "paradec::select_commit: ", names[k], " must be [N] int64 with N = ", N, ", got ", dims(*flat[k]),
                " ", flat[k]->scalar_type());
    PARADEC_CHECK(flat[k]->device() == canvas.device(), "paradec::select_commit: ", names[k], " must be on ",
                canvas.device());
  }
  PARADEC_CHECK(score.device() == canvas.device() && confidence.device() == canvas.device(),
              "paradec::select_commit: score and confidence must be on ", canvas.device());
  PARADEC_CHECK(rule >= kTopK && rule <= kFactor, "paradec::select_commit: rule must be 0 (top-k), 1 (threshold) or 2 (factor), got ", rule);
}

Tensor select_commit_cpu(Tensor& canvas, Tensor& trace, const Tensor& batch_index, const Tensor& column,
                         const Tensor& key, const Tensor& score, const Tensor& confidence, const Tensor& quota,
                         const Tensor& floor, const Tensor& tokens, int64_t rule, double param, int64_t step) {
  check_select_args(canvas, trace, {&batch_index, &column, &key, &quota, &floor, &tokens}, score, confidence, rule);
  const int64_t N = score.size(0), C = canvas.size(1), B = canvas.size(0);
  auto b = batch_index.contiguous(), c = column.contiguous(), k = key.contiguous(), q = quota.contiguous(),
       f = floor.contiguous(), tok = tokens.contiguous(), sc = score.contiguous(), cf = confidence.contiguous();
  const int64_t *pb = b.data_ptr<int64_t>(), *pc = c.data_ptr<int64_t>(), *pk = k.data_ptr<int64_t>(),
                *pq = q.data_ptr<int64_t>(), *pf = f.data_ptr<int64_t>(), *pt = tok.data_ptr<int64_t>();
  const float *ps = sc.data_ptr<float>(), *pcf = cf.data_ptr<float>();
  for (int64_t i = 0; i < N; ++i) {
    PARADEC_CHECK(pb[i] >= 0 && pb[i] < B && pc[i] >= 0 && pc[i] < C, "paradec::select_commit: candidate ", i,
                " at (", pb[i], ", ", pc[i], ") is outside the canvas ", dims(canvas));
  }
  std::vector<int64_t> order(N);
  for (int64_t i = 0; i < N; ++i) order[i] = i;
  // By segment, then score (high first), then position (low first): positions are columns of
  // one canvas row, and a segment never spans two rows.
  std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    if (pk[x] != pk[y]) return pk[x] < pk[y];
    if (ps[x] != ps[y]) return ps[x] > ps[y];
    return pc[x] < pc[y];
  });
  auto committed = at::zeros({N}, score.options().dtype(at::kBool));
  bool* out = committed.data_ptr<bool>();
  int64_t* pcanvas = canvas.data_ptr<int64_t>();
  int64_t* ptrace = trace.data_ptr<int64_t>();
  if (rule == kTopK) {  // a quota may not ask for more than its segment holds
    for (int64_t n = 0, start = 0; n <= N; ++n) {
      if (n == N || (n > 0 && pk[order[n]] != pk[order[n - 1]])) {
        const int64_t i = order[start], size = n - start;
        PARADEC_CHECK(pq[i] <= size, "paradec::select_commit: quota ", pq[i], " of segment key ", pk[i],
                    " is larger than its ", size, " candidates");
        start = n;
      }
    }
  }
  int64_t rank = 0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t i = order[n];
    rank = (n > 0 && pk[order[n - 1]] == pk[i]) ? rank + 1 : 0;
    if (accepted(rule, static_cast<float>(param), rank, pcf[i], pq[i], pf[i])) {
      out[i] = true;
      pcanvas[pb[i] * C + pc[i]] = pt[i];
      ptrace[pb[i] * C + pc[i]] = step;
    }
  }
  return committed;
}

TORCH_LIBRARY(paradec, m) {
  m.def("score(Tensor logits, Tensor rows, int mask_id, Tensor stop_ids, Tensor bar_stop, float temperature, "
        "Tensor? noise, bool row_invariant=False) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("select_commit(Tensor(a!) canvas, Tensor(b!) trace, Tensor batch_index, Tensor column, Tensor key, "
        "Tensor score, Tensor confidence, Tensor quota, Tensor floor, Tensor tokens, int rule, float param, "
        "int step) -> Tensor");
}

TORCH_LIBRARY_IMPL(paradec, CPU, m) {
  m.impl("score", &score_cpu);
  m.impl("select_commit", &select_commit_cpu);
}

}  // namespace paradec
