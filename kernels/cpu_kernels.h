// Helpers shared by the CPU kernels (`kernels/*.cc`): running independent items on XLA's intra-op thread pool,
// per-thread scratch, 16-float vectors and a vectorisable exp.

#ifndef SANA_JAX_KERNELS_CPU_KERNELS_H_
#define SANA_JAX_KERNELS_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace sana_jax {

// Calls item(i) for i in [0, count) on the calling thread and on the pool's threads; returns when all are done.
template <typename Item>
void ForEachItem(xla::ffi::ThreadPool& pool, int64_t count, Item item) {
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto progress = std::make_shared<Progress>();
  auto work = [progress, count, item]() {
    for (int64_t i; (i = progress->next.fetch_add(1)) < count;) {
      item(i);
      if (progress->done.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(progress->mutex);
        progress->finished.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(count, std::max<int64_t>(pool.num_threads(), 1)) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();  // a helper that starts late finds no item left, so waiting below never depends on the pool
  std::unique_lock<std::mutex> lock(progress->mutex);
  progress->finished.wait(lock, [&] { return progress->done.load() == count; });
}

// Per-thread scratch of at least `size` floats, kept between calls; one item's at a time.
inline float* Scratch(int64_t size) {
  thread_local std::vector<float> scratch;
  if (static_cast<int64_t>(scratch.size()) < size) scratch.resize(size);
  return scratch.data();
}

// 16 floats, in the widest registers the target has (GCC's and Clang's generic vectors), loaded and stored unaligned.
typedef float Vector __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

inline Vector Load(const float* p) {
  Vector v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, Vector v) { std::memcpy(p, &v, sizeof(v)); }

// exp(x) within 2 ulp, in a form the compiler vectorises: x = n ln2 + r with |r| <= ln2 / 2 (n rounded by adding
// and subtracting 1.5 * 2^23), exp(r) by Cephes' expf polynomial, 2^n by the exponent bits. x is clamped to
// [-87, 88], inside float's normal range.
inline float Exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts, so that r is exact
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

}  // namespace sana_jax

#endif  // SANA_JAX_KERNELS_CPU_KERNELS_H_
