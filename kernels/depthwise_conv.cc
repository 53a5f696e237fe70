// 3x3 depthwise convolution (zero padding 1) on channels-last float32 images, forward and backward, as XLA FFI
// handlers for the CPU. Each image carries its own kernel and bias, and the backward returns each image's kernel
// and bias gradients, so that every array has the batch axis first (sana_jax.kernels.partitioning).
//
//   forward:  x (B, H, W, C), kernel (B, 3, 3, C), bias (B, C)  ->  y (B, H, W, C)
//   backward: x, kernel, dy (B, H, W, C)  ->  dx (B, H, W, C), dkernel (B, 3, 3, C), dbias (B, C)
//
// The work is split into (image, block of channels) items, run on the calling thread and XLA's intra-op
// pool. The backward reads x and dy once for all nine taps; the channel axis is the vectorised inner loop.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChannelBlock = 128;

struct Geometry {
  int64_t height, width, channels;
};

// Calls item(i) for i in [0, count) on the calling thread and on the pool's threads; returns when all are done.
template <typename Item>
void ForEachItem(ffi::ThreadPool& pool, int64_t count, Item item) {
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

// The nine taps' rows of `source` around pixel (i, j): source[i + sign (ky - 1), j + sign (kx - 1)], or `zeros`
// where that falls outside the image (the zero padding). sign = +1 for the forward, -1 for the input gradient.
void Taps(const float* source, const float* zeros, Geometry g, int64_t i, int64_t j, int sign, const float* taps[9]) {
  for (int ky = 0; ky < 3; ++ky) {
    const int64_t si = i + sign * (ky - 1);
    for (int kx = 0; kx < 3; ++kx) {
      const int64_t sj = j + sign * (kx - 1);
      const bool inside = si >= 0 && si < g.height && sj >= 0 && sj < g.width;
      taps[ky * 3 + kx] = inside ? source + (si * g.width + sj) * g.channels : zeros;
    }
  }
}

// out[c] = first[c] + sum over taps t of taps[t][c] * kernel[t, c], for c in [c0, c1).
void Stencil(const float* const taps[9], const float* __restrict kernel, const float* __restrict first,
             float* __restrict out, int64_t channels, int64_t c0, int64_t c1) {
  const float *__restrict t0 = taps[0], *__restrict t1 = taps[1], *__restrict t2 = taps[2],
              *__restrict t3 = taps[3], *__restrict t4 = taps[4], *__restrict t5 = taps[5],
              *__restrict t6 = taps[6], *__restrict t7 = taps[7], *__restrict t8 = taps[8];
  const float* __restrict k = kernel;
  const int64_t C = channels;
  for (int64_t c = c0; c < c1; ++c) {
    out[c] = first[c] + t0[c] * k[c] + t1[c] * k[C + c] + t2[c] * k[2 * C + c] + t3[c] * k[3 * C + c] +
             t4[c] * k[4 * C + c] + t5[c] * k[5 * C + c] + t6[c] * k[6 * C + c] + t7[c] * k[7 * C + c] +
             t8[c] * k[8 * C + c];
  }
}

void ForwardItem(const float* x, const float* kernel, const float* bias, const float* zeros, float* y, Geometry g,
                 int64_t c0, int64_t c1) {
  const float* taps[9];
  for (int64_t i = 0; i < g.height; ++i) {
    for (int64_t j = 0; j < g.width; ++j) {
      Taps(x, zeros, g, i, j, +1, taps);
      Stencil(taps, kernel, bias, y + (i * g.width + j) * g.channels, g.channels, c0, c1);
    }
  }
}

// dx for channels [c0, c1), and their kernel and bias gradients, summed row by row (row: 10 x C scratch).
void BackwardItem(const float* x, const float* kernel, const float* dy, const float* zeros, float* dx,
                  float* dkernel, float* dbias, float* row, Geometry g, int64_t c0, int64_t c1) {
  const int64_t C = g.channels;
  for (int64_t c = c0; c < c1; ++c) {
    dbias[c] = 0.0f;
    for (int tap = 0; tap < 9; ++tap) dkernel[tap * C + c] = 0.0f;
  }
  float* __restrict sums = row + 9 * C;
  const float* taps[9];
  for (int64_t i = 0; i < g.height; ++i) {
    for (int tap = 0; tap < 10; ++tap) std::fill(row + tap * C + c0, row + tap * C + c1, 0.0f);
    for (int64_t j = 0; j < g.width; ++j) {
      const float* __restrict d = dy + (i * g.width + j) * C;
      Taps(x, zeros, g, i, j, +1, taps);
      for (int tap = 0; tap < 9; ++tap) {
        const float* __restrict t = taps[tap];
        float* __restrict acc = row + tap * C;
        for (int64_t c = c0; c < c1; ++c) acc[c] += t[c] * d[c];
      }
      for (int64_t c = c0; c < c1; ++c) sums[c] += d[c];
    }
    for (int64_t c = c0; c < c1; ++c) dbias[c] += sums[c];
    for (int tap = 0; tap < 9; ++tap) {
      for (int64_t c = c0; c < c1; ++c) dkernel[tap * C + c] += row[tap * C + c];
    }
  }
  for (int64_t i = 0; i < g.height; ++i) {
    for (int64_t j = 0; j < g.width; ++j) {
      Taps(dy, zeros, g, i, j, -1, taps);
      Stencil(taps, kernel, zeros, dx + (i * g.width + j) * C, C, c0, c1);
    }
  }
}

using Images = ffi::Buffer<ffi::F32, 4>;
using Kernels = ffi::Buffer<ffi::F32, 4>;
using Biases = ffi::Buffer<ffi::F32, 2>;

ffi::Error CheckShapes(const Images& x, const Kernels& kernel) {
  auto xd = x.dimensions();
  auto kd = kernel.dimensions();
  if (kd[0] != xd[0] || kd[1] != 3 || kd[2] != 3 || kd[3] != xd[3]) {
    return ffi::Error::InvalidArgument("depthwise_conv3x3: kernel must be (B, 3, 3, C) for x of (B, H, W, C)");
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, Images x, Kernels kernel, Biases bias, ffi::Result<Images> y) {
  if (ffi::Error error = CheckShapes(x, kernel); error.failure()) return error;
  auto d = x.dimensions();
  const Geometry g{d[1], d[2], d[3]};
  const int64_t image = g.height * g.width * g.channels, blocks = (g.channels + kChannelBlock - 1) / kChannelBlock;
  const float *xp = x.typed_data(), *kp = kernel.typed_data(), *bp = bias.typed_data();
  float* yp = y->typed_data();
  const std::vector<float> zeros(g.channels);
  const float* zp = zeros.data();
  ForEachItem(pool, d[0] * blocks, [=](int64_t item) {
    const int64_t b = item / blocks, c0 = item % blocks * kChannelBlock;
    ForwardItem(xp + b * image, kp + b * 9 * g.channels, bp + b * g.channels, zp, yp + b * image, g, c0,
                std::min(c0 + kChannelBlock, g.channels));
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, Images x, Kernels kernel, Images dy,
                    ffi::Result<Images> dx, ffi::Result<Images> dkernel,
                    ffi::Result<Biases> dbias) {
  if (ffi::Error error = CheckShapes(x, kernel); error.failure()) return error;
  auto d = x.dimensions();
  const Geometry g{d[1], d[2], d[3]};
  const int64_t C = g.channels, image = g.height * g.width * C, blocks = (C + kChannelBlock - 1) / kChannelBlock;
  // One (10, C) row accumulator per image: items of one image touch disjoint channels of it.
  std::vector<float> rows(d[0] * 10 * C);
  const std::vector<float> zeros(C);
  const float* zp = zeros.data();
  const float *xp = x.typed_data(), *kp = kernel.typed_data(), *dyp = dy.typed_data();
  float *dxp = dx->typed_data(), *dkp = dkernel->typed_data(), *dbp = dbias->typed_data();
  float* rp = rows.data();
  ForEachItem(pool, d[0] * blocks, [=](int64_t item) {
    const int64_t b = item / blocks, c0 = item % blocks * kChannelBlock;
    BackwardItem(xp + b * image, kp + b * 9 * C, dyp + b * image, zp, dxp + b * image, dkp + b * 9 * C, dbp + b * C,
                 rp + b * 10 * C, g, c0, std::min(c0 + kChannelBlock, C));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SanaDepthwiseConv3x3, Forward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Images>().Arg<Kernels>().Arg<Biases>()
                                  .Ret<Images>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SanaDepthwiseConv3x3Backward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Images>()
                                  .Arg<Kernels>()
                                  .Arg<Images>()
                                  .Ret<Images>()
                                  .Ret<Images>()
                                  .Ret<Biases>());
