// SANA's two attentions on float32 (B, N, H, d) arrays, forward and backward, as XLA FFI handlers for the CPU.
//
// The ReLU linear self-attention (sana_jax.kernels.linear_attention; its closed-form backward in docs/kernels.md):
//
//   forward:  q, k, v (B, N, H, d)  ->  out (B, N, H, d), S = relu(K)^T V (B, H, d, d), z = relu(K)^T 1 (B, H, d)
//             out_i = relu(q_i) S / (relu(q_i) . z + eps)
//   backward: q, k, v, S, z, dout (B, N, H, d)  ->  dq, dk, dv (B, N, H, d)
//
// The softmax cross-attention from N image tokens to L caption tokens (sana_jax.kernels.cross_attention):
//
//   forward:  q (B, N, H, d), k, v (B, L, H, d), bias (B, H, L)  ->  out (B, N, H, d)
//             out_i = sum_j p_ij v_j,  p_i = softmax_j(scale q_i . k_j + bias_j)
//   backward: q, k, v, bias, dout (B, N, H, d)  ->  dq, dk, dv, dbias (B, H, L); p is recomputed.
//
// eps and scale are attributes; d is a multiple of 16 up to 128. One item per (batch entry, head), run on the
// calling thread and XLA's intra-op pool. An item's rows are read and written where they lie, H d floats apart, so
// no transposed copy is made; its small matrices (d x d, or L x d and d x L) stay in the core's cache, and tokens
// go through them four at a time with their accumulators in registers.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "xla/ffi/api/ffi.h"
#include "cpu_kernels.h"

namespace sana_jax {

namespace ffi = xla::ffi;

namespace {

template <int T>
using Size = std::integral_constant<int, T>;

inline Vector Relu(Vector x) { return x > Vector{} ? x : Vector{}; }

inline float Sum(Vector x) {
  float sum = 0.0f;
  for (int64_t e = 0; e < kLanes; ++e) sum += x[e];
  return sum;
}

// The products over an item's rows. A group of T rows a[t] (pointers to floats), m's rows `stride` floats apart;
// d = V 16 floats.

// out[t] = sum_{r < rows} a[t][r] m[r, :d].
template <int V, int T>
void RowsTimes(const float* const* a, const float* m, int64_t rows, int64_t stride, Vector (&out)[T][V]) {
  Vector sum[T][V] = {};
  for (int64_t r = 0; r < rows; ++r) {
    Vector row[V];
    for (int j = 0; j < V; ++j) row[j] = Load(m + r * stride + j * kLanes);
    for (int t = 0; t < T; ++t) {
      const float at = a[t][r];
      for (int j = 0; j < V; ++j) sum[t][j] += at * row[j];
    }
  }
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < V; ++j) out[t][j] = sum[t][j];
}

// m[r, :d] += sum_t a[t][r] b[t] for r < rows.
template <int V, int T>
void AddOuters(const float* const* a, const Vector (&b)[T][V], float* m, int64_t rows, int64_t stride) {
  Vector columns[T][V];  // b, copied: the stores to m cannot change it, so it stays in registers
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < V; ++j) columns[t][j] = b[t][j];
  for (int64_t r = 0; r < rows; ++r) {
    for (int j = 0; j < V; ++j) {
      Vector sum = Load(m + r * stride + j * kLanes);
      for (int t = 0; t < T; ++t) sum += a[t][r] * columns[t][j];
      Store(m + r * stride + j * kLanes, sum);
    }
  }
}

// out[t][c] = sum_{r < d} a[t][r] m[r, c] for m (d, columns), columns a multiple of 16.
template <int V, int T>
void RowsTimesWide(const float* const* a, const float* m, int64_t columns, float* const* out) {
  constexpr int64_t d = V * kLanes;
  for (int64_t c = 0; c < columns; c += kLanes) {
    Vector sum[T] = {};
    for (int64_t r = 0; r < d; ++r) {
      const Vector row = Load(m + r * columns + c);
      for (int t = 0; t < T; ++t) sum[t] += a[t][r] * row;
    }
    for (int t = 0; t < T; ++t) Store(out[t] + c, sum[t]);
  }
}

// Calls group(Size<T>{}, i) for the groups of `tokens` tokens: T = G at a time, then one at a time.
template <int G, typename Group>
void ForGroups(int64_t tokens, Group group) {
  int64_t i = 0;
  for (; i + G <= tokens; i += G) group(Size<G>{}, i);
  for (; i < tokens; ++i) group(Size<1>{}, i);
}

// t (columns, padded) = m (rows, columns; rows `stride` floats apart) transposed, zero beyond `rows`.
void Transpose(const float* m, int64_t rows, int64_t columns, int64_t stride, int64_t padded, float* t) {
  for (int64_t c = 0; c < columns; ++c) {
    for (int64_t r = 0; r < rows; ++r) t[c * padded + r] = m[r * stride + c];
    std::fill(t + c * padded + rows, t + (c + 1) * padded, 0.0f);
  }
}

// Calls run(Size<V>{}) for V = d / 16; false when d is not a multiple of 16 up to 128.
template <typename Run>
bool WithVectors(int64_t d, Run run) {
  switch (d) {
    case 16: run(Size<1>{}); return true;
    case 32: run(Size<2>{}); return true;
    case 48: run(Size<3>{}); return true;
    case 64: run(Size<4>{}); return true;
    case 80: run(Size<5>{}); return true;
    case 96: run(Size<6>{}); return true;
    case 112: run(Size<7>{}); return true;
    case 128: run(Size<8>{}); return true;
    default: return false;
  }
}

// The linear attention's (batch entry, head) item: `tokens` rows of q, k, v, d = V 16 floats each, `stride` apart.
template <int V>
struct LinearHead {
  static constexpr int64_t d = V * kLanes;
  static constexpr int kGroup = 4;  // tokens per pass over a d x d matrix
  int64_t tokens, stride;

  // Writes relu(x[t]) of T rows x + t stride into relu + t d, and points rows[t] at it.
  template <int T>
  void ReluRows(const float* x, float* relu, const float* (&rows)[T]) const {
    for (int t = 0; t < T; ++t) {
      for (int j = 0; j < V; ++j) Store(relu + t * d + j * kLanes, Relu(Load(x + t * stride + j * kLanes)));
      rows[t] = relu + t * d;
    }
  }

  // S += sum_t relu(k_t) v_t^T, z += sum_t relu(k_t).
  template <int T>
  void StateGroup(Size<T>, const float* k, const float* v, float* relu, float* state, Vector (&key_sum)[V]) const {
    const float* rows[T];
    ReluRows<T>(k, relu, rows);
    Vector values[T][V];
    for (int t = 0; t < T; ++t) {
      for (int j = 0; j < V; ++j) {
        values[t][j] = Load(v + t * stride + j * kLanes);
        key_sum[j] += Load(rows[t] + j * kLanes);
      }
    }
    AddOuters<V, T>(rows, values, state, d, d);
  }

  // out_t = relu(q_t) S / (relu(q_t) . z + eps).
  template <int T>
  void OutputGroup(Size<T>, const float* q, float* relu, const float* state, const Vector (&key_sum)[V], float eps,
                   float* out) const {
    const float* rows[T];
    ReluRows<T>(q, relu, rows);
    Vector numerator[T][V];
    RowsTimes<V, T>(rows, state, d, d, numerator);
    for (int t = 0; t < T; ++t) {
      Vector dot{};
      for (int j = 0; j < V; ++j) dot += Load(rows[t] + j * kLanes) * key_sum[j];
      const float scale = 1.0f / (Sum(dot) + eps);
      for (int j = 0; j < V; ++j) Store(out + t * stride + j * kLanes, numerator[t][j] * scale);
    }
  }

  // With r = relu(q_t), den = r . z + eps and o_t = r S / den:
  //   dq_t = [S (dout_t / den) - (dout_t . o_t / den) z] where q_t > 0,
  //   dS += r (dout_t / den)^T,  dz -= r (dout_t . o_t / den).
  template <int T>
  void QueryGroup(Size<T>, const float* q, const float* dout, float* relu, float* scaled, const float* state,
                  const float* state_t, const Vector (&key_sum)[V], float eps, float* dq, float* d_state,
                  Vector (&d_key_sum)[V]) const {
    const float* rows[T];
    ReluRows<T>(q, relu, rows);
    Vector o[T][V], d_numerator[T][V];
    RowsTimes<V, T>(rows, state, d, d, o);
    const float* scaled_rows[T];
    float d_denominator[T];
    for (int t = 0; t < T; ++t) {
      Vector dot{};
      for (int j = 0; j < V; ++j) dot += Load(rows[t] + j * kLanes) * key_sum[j];
      const float inverse = 1.0f / (Sum(dot) + eps);
      Vector projection{};
      for (int j = 0; j < V; ++j) {
        const Vector g = Load(dout + t * stride + j * kLanes);
        d_numerator[t][j] = g * inverse;
        projection += g * (o[t][j] * inverse);
        Store(scaled + t * d + j * kLanes, d_numerator[t][j]);
      }
      d_denominator[t] = -Sum(projection) * inverse;
      scaled_rows[t] = scaled + t * d;
    }
    Vector back[T][V];
    RowsTimes<V, T>(scaled_rows, state_t, d, d, back);
    for (int t = 0; t < T; ++t) {
      for (int j = 0; j < V; ++j) {
        const Vector grad = back[t][j] + d_denominator[t] * key_sum[j];
        Store(dq + t * stride + j * kLanes, Load(q + t * stride + j * kLanes) > Vector{} ? grad : Vector{});
        d_key_sum[j] += Load(rows[t] + j * kLanes) * d_denominator[t];
      }
    }
    AddOuters<V, T>(rows, d_numerator, d_state, d, d);
  }

  // dk_t = [dS v_t + dz] where k_t > 0,  dv_t = relu(k_t) dS.
  template <int T>
  void KeyGroup(Size<T>, const float* k, const float* v, float* relu, const float* d_state, const float* d_state_t,
                const Vector (&d_key_sum)[V], float* dk, float* dv) const {
    const float* rows[T];
    ReluRows<T>(k, relu, rows);
    const float* value_rows[T];
    for (int t = 0; t < T; ++t) value_rows[t] = v + t * stride;
    Vector grad[T][V];
    RowsTimes<V, T>(value_rows, d_state_t, d, d, grad);
    for (int t = 0; t < T; ++t) {
      for (int j = 0; j < V; ++j) {
        const Vector g = grad[t][j] + d_key_sum[j];
        Store(dk + t * stride + j * kLanes, Load(k + t * stride + j * kLanes) > Vector{} ? g : Vector{});
      }
    }
    RowsTimes<V, T>(rows, d_state, d, d, grad);
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < V; ++j) Store(dv + t * stride + j * kLanes, grad[t][j]);
  }

  void Forward(const float* q, const float* k, const float* v, float* out, float* state, float* key_sum,
               float eps) const {
    float* relu = Scratch(kGroup * d);
    std::fill(state, state + d * d, 0.0f);
    Vector z[V] = {};
    ForGroups<kGroup>(tokens, [&](auto size, int64_t i) {
      StateGroup(size, k + i * stride, v + i * stride, relu, state, z);
    });
    for (int j = 0; j < V; ++j) Store(key_sum + j * kLanes, z[j]);
    ForGroups<kGroup>(tokens, [&](auto size, int64_t i) {
      OutputGroup(size, q + i * stride, relu, state, z, eps, out + i * stride);
    });
  }

  void Backward(const float* q, const float* k, const float* v, const float* state, const float* key_sum,
                const float* dout, float* dq, float* dk, float* dv, float eps) const {
    float* state_t = Scratch(3 * d * d + 2 * kGroup * d);
    float* d_state = state_t + d * d;
    float* d_state_t = d_state + d * d;
    float* relu = d_state_t + d * d;
    float* scaled = relu + kGroup * d;
    Transpose(state, d, d, d, d, state_t);
    std::fill(d_state, d_state + d * d, 0.0f);
    Vector z[V], d_key_sum[V] = {};
    for (int j = 0; j < V; ++j) z[j] = Load(key_sum + j * kLanes);
    ForGroups<kGroup>(tokens, [&](auto size, int64_t i) {
      QueryGroup(size, q + i * stride, dout + i * stride, relu, scaled, state, state_t, z, eps, dq + i * stride,
                 d_state, d_key_sum);
    });
    Transpose(d_state, d, d, d, d, d_state_t);
    ForGroups<kGroup>(tokens, [&](auto size, int64_t i) {
      KeyGroup(size, k + i * stride, v + i * stride, relu, d_state, d_state_t, d_key_sum, dk + i * stride,
               dv + i * stride);
    });
  }
};

// The cross-attention's (batch entry, head) item: `tokens` rows of q (and out, dout), `keys` rows of k and v, d = V
// 16 floats each, `stride` apart. k and v are used transposed, (d, padded) with padded = keys rounded up to 16.
template <int V>
struct CrossHead {
  static constexpr int64_t d = V * kLanes;
  static constexpr int kGroup = 8;  // tokens per pass over the keys and values
  int64_t tokens, keys, padded, stride;
  float scale;

  // p[t] (padded floats) = softmax_j(scale q_t . k_j + bias_j) for the group's queries, zero beyond `keys` (where
  // keys_t is zero and bias is -inf).
  template <int T>
  void Probabilities(const float* q, const float* keys_t, const float* bias, float* const (&rows)[T]) const {
    const float* queries[T];
    for (int t = 0; t < T; ++t) queries[t] = q + t * stride;
    RowsTimesWide<V, T>(queries, keys_t, padded, rows);
    for (int t = 0; t < T; ++t) {
      float* row = rows[t];
      Vector largest = Vector{} - std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < padded; c += kLanes) {
        const Vector logits = Load(row + c) * scale + Load(bias + c);
        Store(row + c, logits);
        largest = logits > largest ? logits : largest;
      }
      float shift = largest[0];
      for (int64_t e = 1; e < kLanes; ++e) shift = std::max(shift, largest[e]);
      for (int64_t j = 0; j < padded; ++j) row[j] = Exp(row[j] - shift);
      std::fill(row + keys, row + padded, 0.0f);
      Vector sum{};
      for (int64_t c = 0; c < padded; c += kLanes) sum += Load(row + c);
      const float inverse = 1.0f / Sum(sum);
      for (int64_t c = 0; c < padded; c += kLanes) Store(row + c, Load(row + c) * inverse);
    }
  }

  template <int T>
  void ForwardGroup(Size<T>, const float* q, const float* keys_t, const float* bias, const float* v, float* p,
                    float* out) const {
    float* rows[T];
    for (int t = 0; t < T; ++t) rows[t] = p + t * padded;
    Probabilities<T>(q, keys_t, bias, rows);
    Vector o[T][V];
    RowsTimes<V, T>(rows, v, keys, stride, o);
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < V; ++j) Store(out + t * stride + j * kLanes, o[t][j]);
  }

  // With dp_tj = dout_t . v_j and ds_t = p_t (dp_t - p_t . dp_t): dq_t = scale sum_j ds_tj k_j,
  // dk_j += scale sum_t ds_tj q_t, dv_j += sum_t p_tj dout_t, dbias += sum_t ds_t.
  template <int T>
  void BackwardGroup(Size<T>, const float* q, const float* dout, const float* k, const float* keys_t,
                     const float* values_t, const float* bias, float* p, float* ds, float* dq, float* dk, float* dv,
                     float* d_bias) const {
    float* p_rows[T];
    float* ds_rows[T];
    const float* gradients[T];
    for (int t = 0; t < T; ++t) {
      p_rows[t] = p + t * padded;
      ds_rows[t] = ds + t * padded;
      gradients[t] = dout + t * stride;
    }
    Probabilities<T>(q, keys_t, bias, p_rows);
    RowsTimesWide<V, T>(gradients, values_t, padded, ds_rows);
    for (int t = 0; t < T; ++t) {
      Vector dot{};
      for (int64_t c = 0; c < padded; c += kLanes) dot += Load(p_rows[t] + c) * Load(ds_rows[t] + c);
      const float projection = Sum(dot);
      for (int64_t c = 0; c < padded; c += kLanes) {
        const Vector s = Load(p_rows[t] + c) * (Load(ds_rows[t] + c) - projection);
        Store(ds_rows[t] + c, s);
        Store(d_bias + c, Load(d_bias + c) + s);
      }
    }
    Vector g[T][V], scaled[T][V], out_gradients[T][V];
    RowsTimes<V, T>(ds_rows, k, keys, stride, g);
    for (int t = 0; t < T; ++t) {
      for (int j = 0; j < V; ++j) {
        Store(dq + t * stride + j * kLanes, g[t][j] * scale);
        scaled[t][j] = Load(q + t * stride + j * kLanes) * scale;
        out_gradients[t][j] = Load(gradients[t] + j * kLanes);
      }
    }
    AddOuters<V, T>(ds_rows, scaled, dk, keys, stride);
    AddOuters<V, T>(p_rows, out_gradients, dv, keys, stride);
  }

  // bias (keys) -> row (padded), -inf beyond `keys`.
  void PadBias(const float* bias, float* row) const {
    std::copy(bias, bias + keys, row);
    std::fill(row + keys, row + padded, -std::numeric_limits<float>::infinity());
  }

  void Forward(const float* q, const float* k, const float* v, const float* bias, float* out) const {
    float* keys_t = Scratch(d * padded + (kGroup + 1) * padded);
    float* bias_row = keys_t + d * padded;
    float* p = bias_row + padded;
    Transpose(k, keys, d, stride, padded, keys_t);
    PadBias(bias, bias_row);
    ForGroups<kGroup>(tokens, [&](auto size, int64_t i) {
      ForwardGroup(size, q + i * stride, keys_t, bias_row, v, p, out + i * stride);
    });
  }

  void Backward(const float* q, const float* k, const float* v, const float* bias, const float* dout, float* dq,
                float* dk, float* dv, float* d_bias) const {
    float* keys_t = Scratch(2 * d * padded + (2 * kGroup + 2) * padded);
    float* values_t = keys_t + d * padded;
    float* bias_row = values_t + d * padded;
    float* p = bias_row + padded;
    float* ds = p + kGroup * padded;
    float* bias_sums = ds + kGroup * padded;
    Transpose(k, keys, d, stride, padded, keys_t);
    Transpose(v, keys, d, stride, padded, values_t);
    PadBias(bias, bias_row);
    std::fill(bias_sums, bias_sums + padded, 0.0f);
    for (int64_t j = 0; j < keys; ++j) {
      std::fill(dk + j * stride, dk + j * stride + d, 0.0f);
      std::fill(dv + j * stride, dv + j * stride + d, 0.0f);
    }
    ForGroups<kGroup>(tokens, [&](auto size, int64_t i) {
      BackwardGroup(size, q + i * stride, dout + i * stride, k, keys_t, values_t, bias_row, p, ds, dq + i * stride,
                    dk, dv, bias_sums);
    });
    std::copy(bias_sums, bias_sums + keys, d_bias);
  }
};

using Tokens = ffi::Buffer<ffi::F32, 4>;  // (B, N, H, d)
using States = ffi::Buffer<ffi::F32, 4>;  // (B, H, d, d)
using Rows = ffi::Buffer<ffi::F32, 3>;    // (B, H, d) or (B, H, L)

ffi::Error UnsupportedHeadDim(const char* name) {
  return ffi::Error::InvalidArgument(std::string(name) + ": the head dim d must be a multiple of 16 up to 128");
}

bool SameShape(const Tokens& a, const Tokens& b) {
  auto ad = a.dimensions(), bd = b.dimensions();
  return ad[0] == bd[0] && ad[1] == bd[1] && ad[2] == bd[2] && ad[3] == bd[3];
}

ffi::Error CheckLinear(const Tokens& q, const Tokens& k, const Tokens& v) {
  if (!SameShape(q, k) || !SameShape(q, v)) {
    return ffi::Error::InvalidArgument("linear_attention: q, k and v must have one (B, N, H, d) shape");
  }
  return ffi::Error::Success();
}

ffi::Error CheckStates(const Tokens& q, const States& state, const Rows& key_sum) {
  auto qd = q.dimensions(), sd = state.dimensions(), zd = key_sum.dimensions();
  if (sd[0] != qd[0] || sd[1] != qd[2] || sd[2] != qd[3] || sd[3] != qd[3] || zd[0] != qd[0] || zd[1] != qd[2] ||
      zd[2] != qd[3]) {
    return ffi::Error::InvalidArgument("linear_attention: expected the state (B, H, d, d) and key sum (B, H, d) of "
                                       "q (B, N, H, d)");
  }
  return ffi::Error::Success();
}

ffi::Error LinearForward(ffi::ThreadPool pool, Tokens q, Tokens k, Tokens v, float eps, ffi::Result<Tokens> out,
                         ffi::Result<States> state, ffi::Result<Rows> key_sum) {
  if (ffi::Error error = CheckLinear(q, k, v); error.failure()) return error;
  auto dims = q.dimensions();
  const int64_t tokens = dims[1], heads = dims[2], d = dims[3];
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *sp = state->typed_data(), *zp = key_sum->typed_data();
  const bool supported = WithVectors(d, [&](auto vectors) {
    const LinearHead<decltype(vectors)::value> head{tokens, heads * d};
    ForEachItem(pool, dims[0] * heads, [=](int64_t item) {
      const int64_t first = (item / heads) * tokens * heads * d + (item % heads) * d;
      head.Forward(qp + first, kp + first, vp + first, op + first, sp + item * d * d, zp + item * d, eps);
    });
  });
  return supported ? ffi::Error::Success() : UnsupportedHeadDim("linear_attention");
}

ffi::Error LinearBackward(ffi::ThreadPool pool, Tokens q, Tokens k, Tokens v, States state, Rows key_sum,
                          Tokens dout, float eps, ffi::Result<Tokens> dq, ffi::Result<Tokens> dk,
                          ffi::Result<Tokens> dv) {
  if (ffi::Error error = CheckLinear(q, k, v); error.failure()) return error;
  if (ffi::Error error = CheckStates(q, state, key_sum); error.failure()) return error;
  auto dims = q.dimensions();
  const int64_t tokens = dims[1], heads = dims[2], d = dims[3];
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *sp = state.typed_data(),
              *zp = key_sum.typed_data(), *gp = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  const bool supported = WithVectors(d, [&](auto vectors) {
    const LinearHead<decltype(vectors)::value> head{tokens, heads * d};
    ForEachItem(pool, dims[0] * heads, [=](int64_t item) {
      const int64_t first = (item / heads) * tokens * heads * d + (item % heads) * d;
      head.Backward(qp + first, kp + first, vp + first, sp + item * d * d, zp + item * d, gp + first, dqp + first,
                    dkp + first, dvp + first, eps);
    });
  });
  return supported ? ffi::Error::Success() : UnsupportedHeadDim("linear_attention");
}

ffi::Error CheckCross(const Tokens& q, const Tokens& k, const Tokens& v, const Rows& bias) {
  auto qd = q.dimensions(), kd = k.dimensions(), bd = bias.dimensions();
  if (!SameShape(k, v) || kd[0] != qd[0] || kd[2] != qd[2] || kd[3] != qd[3] || kd[1] < 1 || bd[0] != qd[0] ||
      bd[1] != qd[2] || bd[2] != kd[1]) {
    return ffi::Error::InvalidArgument("cross_attention: expected q (B, N, H, d), k and v (B, L, H, d) with L >= 1, "
                                       "and bias (B, H, L)");
  }
  return ffi::Error::Success();
}

template <int V>
CrossHead<V> MakeCrossHead(const Tokens& q, const Tokens& k, float scale) {
  auto qd = q.dimensions();
  const int64_t keys = k.dimensions()[1];
  return CrossHead<V>{qd[1], keys, (keys + kLanes - 1) / kLanes * kLanes, qd[2] * qd[3], scale};
}

ffi::Error CrossForward(ffi::ThreadPool pool, Tokens q, Tokens k, Tokens v, Rows bias, float scale,
                        ffi::Result<Tokens> out) {
  if (ffi::Error error = CheckCross(q, k, v, bias); error.failure()) return error;
  auto dims = q.dimensions();
  const int64_t tokens = dims[1], heads = dims[2], d = dims[3], keys = k.dimensions()[1];
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *bp = bias.typed_data();
  float* op = out->typed_data();
  const bool supported = WithVectors(d, [&](auto vectors) {
    const auto head = MakeCrossHead<decltype(vectors)::value>(q, k, scale);
    ForEachItem(pool, dims[0] * heads, [=](int64_t item) {
      const int64_t b = item / heads, h = item % heads;
      const int64_t first = b * tokens * heads * d + h * d, first_key = b * keys * heads * d + h * d;
      head.Forward(qp + first, kp + first_key, vp + first_key, bp + item * keys, op + first);
    });
  });
  return supported ? ffi::Error::Success() : UnsupportedHeadDim("cross_attention");
}

ffi::Error CrossBackward(ffi::ThreadPool pool, Tokens q, Tokens k, Tokens v, Rows bias, Tokens dout, float scale,
                         ffi::Result<Tokens> dq, ffi::Result<Tokens> dk, ffi::Result<Tokens> dv,
                         ffi::Result<Rows> d_bias) {
  if (ffi::Error error = CheckCross(q, k, v, bias); error.failure()) return error;
  auto dims = q.dimensions();
  const int64_t tokens = dims[1], heads = dims[2], d = dims[3], keys = k.dimensions()[1];
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *bp = bias.typed_data(),
              *gp = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data(), *dbp = d_bias->typed_data();
  const bool supported = WithVectors(d, [&](auto vectors) {
    const auto head = MakeCrossHead<decltype(vectors)::value>(q, k, scale);
    ForEachItem(pool, dims[0] * heads, [=](int64_t item) {
      const int64_t b = item / heads, h = item % heads;
      const int64_t first = b * tokens * heads * d + h * d, first_key = b * keys * heads * d + h * d;
      head.Backward(qp + first, kp + first_key, vp + first_key, bp + item * keys, gp + first, dqp + first,
                    dkp + first_key, dvp + first_key, dbp + item * keys);
    });
  });
  return supported ? ffi::Error::Success() : UnsupportedHeadDim("cross_attention");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SanaLinearAttention, LinearForward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Tokens>().Arg<Tokens>().Arg<Tokens>()
                                  .Attr<float>("eps").Ret<Tokens>().Ret<States>().Ret<Rows>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SanaLinearAttentionBackward, LinearBackward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Tokens>().Arg<Tokens>().Arg<Tokens>()
                                  .Arg<States>().Arg<Rows>().Arg<Tokens>().Attr<float>("eps").Ret<Tokens>()
                                  .Ret<Tokens>().Ret<Tokens>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SanaCrossAttention, CrossForward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Tokens>().Arg<Tokens>().Arg<Tokens>()
                                  .Arg<Rows>().Attr<float>("scale").Ret<Tokens>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SanaCrossAttentionBackward, CrossBackward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Tokens>().Arg<Tokens>().Arg<Tokens>()
                                  .Arg<Rows>().Arg<Tokens>().Attr<float>("scale").Ret<Tokens>().Ret<Tokens>()
                                  .Ret<Tokens>().Ret<Rows>());

}  // namespace sana_jax
