// 3x3 depthwise convolution (zero padding 1) on channels-last float32 images, forward and backward, as XLA FFI
// handlers for the CPU. Each image carries its own kernel and bias, and the backward returns each image's kernel
// and bias gradients, so that every array has the batch axis first (sana_jax.kernels.partitioning).
//
//   forward:  x (B, H, W, C), kernel (B, 3, 3, C), bias (B, C)  ->  y (B, H, W, C)
//   backward: x, kernel, dy (B, H, W, C)  ->  dx (B, H, W, C), dkernel (B, 3, 3, C), dbias (B, C)
//
// and the same convolution between SANA's Mix-FFN's SiLU and its gated linear unit: with u (B, H, W, 2, C) and a
// shift (B, 2, C) (the preceding layer's bias), s = silu(u + shift), y = conv(s) on 2C channels and
// out = y[..., 0, :] * silu(y[..., 1, :]):
//
//   gated forward:  u (B, H, W, 2, C), shift (B, 2, C), kernel (B, 3, 3, 2, C), bias (B, 2, C)
//                   ->  out (B, H, W, C)
//   gated backward: u, shift, kernel, bias, dout (B, H, W, C)  ->  du (B, H, W, 2, C), dshift (B, 2, C),
//                   dkernel (B, 3, 3, 2, C), dbias (B, 2, C)
//
// The work is split into (image, block of channels) items, run on the calling thread and XLA's intra-op
// pool. The backward reads x and dy once for all nine taps; the channel axis is the vectorised inner loop.
// The gated kernels keep an item's s (and, backward, silu's derivative and y's gradient) in per-thread scratch,
// so that u is read once and neither s nor y is written out; the backward recomputes y.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_kernels.h"

namespace sana_jax {

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChannelBlock = 128;

struct Geometry {
  int64_t height, width, channels;
};

// The nine taps' rows of `source` (g.channels floats per pixel) around pixel (i, j):
// source[i + sign (ky - 1), j + sign (kx - 1)], or `zeros` (g.channels of them) where that falls outside the image
// (the zero padding). sign = +1 for the forward, -1 for the input gradient.
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

// out[c] = first[c] + sum over taps t of taps[t][c] * kernel[t * stride + c], for c in [0, n).
void Stencil(const float* const taps[9], const float* __restrict kernel, int64_t stride,
             const float* __restrict first, float* __restrict out, int64_t n) {
  const float *__restrict t0 = taps[0], *__restrict t1 = taps[1], *__restrict t2 = taps[2],
              *__restrict t3 = taps[3], *__restrict t4 = taps[4], *__restrict t5 = taps[5],
              *__restrict t6 = taps[6], *__restrict t7 = taps[7], *__restrict t8 = taps[8];
  const float* __restrict k = kernel;
  const int64_t S = stride;
  for (int64_t c = 0; c < n; ++c) {
    out[c] = first[c] + t0[c] * k[c] + t1[c] * k[S + c] + t2[c] * k[2 * S + c] + t3[c] * k[3 * S + c] +
             t4[c] * k[4 * S + c] + t5[c] * k[5 * S + c] + t6[c] * k[6 * S + c] + t7[c] * k[7 * S + c] +
             t8[c] * k[8 * S + c];
  }
}

inline float Sigmoid(float z) { return 1.0f / (1.0f + Exp(-z)); }

// silu(u + shift) for channels [c0, c0 + n) of both halves of u (H, W, 2, C), as (H, W, 2n) in s, a row of 2n
// zeros after it; silu's derivative there alike in `slopes` unless that is null.
void SiluBlock(const float* u, const float* shift, Geometry g, int64_t c0, int64_t n, float* s, float* slopes) {
  const int64_t C = g.channels, pixels = g.height * g.width;
  for (int64_t p = 0; p < pixels; ++p) {
    for (int half = 0; half < 2; ++half) {
      const float* __restrict from = u + (p * 2 + half) * C + c0;
      const float* __restrict b = shift + half * C + c0;
      float* __restrict to = s + (p * 2 + half) * n;
      if (slopes == nullptr) {
        for (int64_t c = 0; c < n; ++c) to[c] = (from[c] + b[c]) * Sigmoid(from[c] + b[c]);
      } else {
        float* __restrict slope = slopes + (p * 2 + half) * n;
        for (int64_t c = 0; c < n; ++c) {
          const float z = from[c] + b[c], sigmoid = Sigmoid(z);
          to[c] = z * sigmoid;
          slope[c] = sigmoid * (1.0f + z * (1.0f - sigmoid));
        }
      }
    }
  }
  std::fill(s + pixels * 2 * n, s + (pixels + 1) * 2 * n, 0.0f);
}

// The kernel (9, 2, C) and bias (2, C) of channels [c0, c0 + n) of both halves, packed as (9, 2n) and (2n).
void PackBlock(const float* kernel, const float* bias, int64_t C, int64_t c0, int64_t n, float* packed) {
  for (int tap = 0; tap <= 9; ++tap) {  // tap 9: the bias
    for (int half = 0; half < 2; ++half) {
      const float* from = tap < 9 ? kernel + (tap * 2 + half) * C + c0 : bias + half * C + c0;
      std::copy(from, from + n, packed + (tap * 2 + half) * n);
    }
  }
}

// The nine taps' pointers (Taps) of every pixel of row i, 9 per pixel, in `taps` (9 W of them).
void RowTaps(const float* source, const float* zeros, Geometry g, int64_t i, int sign, const float** taps) {
  for (int64_t j = 0; j < g.width; ++j) Taps(source, zeros, g, i, j, sign, taps + 9 * j);
}

// Stencil for channels [c0, c1) of every pixel of a row (RowTaps' taps); kernel (9, m), first (m) and out (W, m)
// with m = g.channels. A block of 16 channels at a time, its nine kernel rows held in registers over the row; the
// last (c1 - c0) % 16 channels by Stencil.
void RowStencil(const float* const* taps, const float* kernel, const float* first, float* out, Geometry g, int64_t c0,
                int64_t c1) {
  const int64_t m = g.channels;
  int64_t c = c0;
  for (; c + kLanes <= c1; c += kLanes) {
    Vector k[9];
    for (int tap = 0; tap < 9; ++tap) k[tap] = Load(kernel + tap * m + c);
    const Vector b = Load(first + c);
    for (int64_t j = 0; j < g.width; ++j) {
      const float* const* t = taps + 9 * j;
      Vector acc = b;
      for (int tap = 0; tap < 9; ++tap) acc += Load(t[tap] + c) * k[tap];
      Store(out + j * m + c, acc);
    }
  }
  if (c < c1) {
    for (int64_t j = 0; j < g.width; ++j) {
      const float* t[9];
      for (int tap = 0; tap < 9; ++tap) t[tap] = taps[9 * j + tap] + c;
      Stencil(t, kernel + c, m, first + c, out + j * m + c, c1 - c);
    }
  }
}

// sums[tap * m + c] = sum over the row's pixels j of taps[9 j + tap][c] * d[j * m + c], and sums[9 m + c] the sum of
// d[j * m + c], for c in [c0, c1) (m = g.channels): a row's kernel and bias gradients, a block of 16 channels at a
// time in ten registers.
void RowGradients(const float* const* taps, const float* d, float* sums, Geometry g, int64_t c0, int64_t c1) {
  const int64_t m = g.channels;
  int64_t c = c0;
  for (; c + kLanes <= c1; c += kLanes) {
    Vector acc[10] = {};
    for (int64_t j = 0; j < g.width; ++j) {
      const Vector dj = Load(d + j * m + c);
      for (int tap = 0; tap < 9; ++tap) acc[tap] += Load(taps[9 * j + tap] + c) * dj;
      acc[9] += dj;
    }
    for (int tap = 0; tap < 10; ++tap) Store(sums + tap * m + c, acc[tap]);
  }
  for (; c < c1; ++c) {
    float acc[10] = {};
    for (int64_t j = 0; j < g.width; ++j) {
      for (int tap = 0; tap < 9; ++tap) acc[tap] += taps[9 * j + tap][c] * d[j * m + c];
      acc[9] += d[j * m + c];
    }
    for (int tap = 0; tap < 10; ++tap) sums[tap * m + c] = acc[tap];
  }
}

void ForwardItem(const float* x, const float* kernel, const float* bias, const float* zeros, float* y, Geometry g,
                 int64_t c0, int64_t c1) {
  std::vector<const float*> taps(9 * g.width);
  for (int64_t i = 0; i < g.height; ++i) {
    RowTaps(x, zeros, g, i, +1, taps.data());
    RowStencil(taps.data(), kernel, bias, y + i * g.width * g.channels, g, c0, c1);
  }
}

// dx for channels [c0, c1), and their kernel and bias gradients, summed row by row (sums: 10 x C scratch).
void BackwardItem(const float* x, const float* kernel, const float* dy, const float* zeros, float* dx,
                  float* dkernel, float* dbias, float* sums, Geometry g, int64_t c0, int64_t c1) {
  const int64_t C = g.channels, row = g.width * C;
  std::fill(dbias + c0, dbias + c1, 0.0f);
  for (int tap = 0; tap < 9; ++tap) std::fill(dkernel + tap * C + c0, dkernel + tap * C + c1, 0.0f);
  std::vector<const float*> taps(9 * g.width);
  for (int64_t i = 0; i < g.height; ++i) {
    RowTaps(x, zeros, g, i, +1, taps.data());
    RowGradients(taps.data(), dy + i * row, sums, g, c0, c1);
    for (int64_t c = c0; c < c1; ++c) dbias[c] += sums[9 * C + c];
    for (int tap = 0; tap < 9; ++tap) {
      for (int64_t c = c0; c < c1; ++c) dkernel[tap * C + c] += sums[tap * C + c];
    }
  }
  for (int64_t i = 0; i < g.height; ++i) {
    RowTaps(dy, zeros, g, i, -1, taps.data());
    RowStencil(taps.data(), kernel, zeros, dx + i * row, g, c0, c1);
  }
}

void GatedForwardItem(const float* u, const float* shift, const float* kernel, const float* bias, float* out,
                      Geometry g, int64_t c0, int64_t n) {
  const int64_t C = g.channels, m = 2 * n, block = (g.height * g.width + 1) * m;
  const Geometry blocked{g.height, g.width, m};
  float* s = Scratch(block + 10 * m + g.width * m);
  float *packed = s + block, *y = packed + 10 * m;
  std::vector<const float*> taps(9 * g.width);
  PackBlock(kernel, bias, C, c0, n, packed);
  SiluBlock(u, shift, g, c0, n, s, nullptr);
  for (int64_t i = 0; i < g.height; ++i) {
    RowTaps(s, s + block - m, blocked, i, +1, taps.data());
    RowStencil(taps.data(), packed, packed + 9 * m, y, blocked, 0, m);
    for (int64_t j = 0; j < g.width; ++j) {
      const float *__restrict ya = y + j * m, *__restrict yg = ya + n;
      float* __restrict o = out + (i * g.width + j) * C + c0;
      for (int64_t c = 0; c < n; ++c) o[c] = ya[c] * yg[c] * Sigmoid(yg[c]);
    }
  }
}

// du and the shift, kernel and bias gradients for channels [c0, c0 + n) of both halves. y's gradient (H, W, 2n)
// is kept whole (the input gradient's stencil reads its neighbours); the kernel gradient is summed row by row.
void GatedBackwardItem(const float* u, const float* shift, const float* kernel, const float* bias, const float* dout,
                       float* du, float* dshift, float* dkernel, float* dbias, Geometry g, int64_t c0, int64_t n) {
  const int64_t C = g.channels, m = 2 * n, block = (g.height * g.width + 1) * m;
  const Geometry blocked{g.height, g.width, m};
  float* s = Scratch(3 * block + 20 * m + g.width * m);
  float *slopes = s + block, *dy = slopes + block, *sums = dy + block, *packed = sums + 10 * m, *y = packed + 10 * m;
  float* zeros = dy + block - m;  // the row of zeros after dy, as after s
  std::vector<const float*> taps(9 * g.width);
  PackBlock(kernel, bias, C, c0, n, packed);
  SiluBlock(u, shift, g, c0, n, s, slopes);
  std::fill(zeros, zeros + m, 0.0f);
  for (int half = 0; half < 2; ++half) {
    std::fill(dbias + half * C + c0, dbias + half * C + c0 + n, 0.0f);
    for (int tap = 0; tap < 9; ++tap) {
      float* first = dkernel + (tap * 2 + half) * C + c0;
      std::fill(first, first + n, 0.0f);
    }
  }
  for (int64_t i = 0; i < g.height; ++i) {
    RowTaps(s, zeros, blocked, i, +1, taps.data());
    RowStencil(taps.data(), packed, packed + 9 * m, y, blocked, 0, m);
    float* dy_row = dy + i * g.width * m;
    for (int64_t j = 0; j < g.width; ++j) {
      const float *__restrict ya = y + j * m, *__restrict yg = ya + n;
      const float* __restrict o = dout + (i * g.width + j) * C + c0;
      float* __restrict d = dy_row + j * m;
      for (int64_t c = 0; c < n; ++c) {
        const float sigmoid = Sigmoid(yg[c]);
        d[c] = o[c] * yg[c] * sigmoid;
        d[n + c] = o[c] * ya[c] * sigmoid * (1.0f + yg[c] * (1.0f - sigmoid));
      }
    }
    RowGradients(taps.data(), dy_row, sums, blocked, 0, m);
    for (int half = 0; half < 2; ++half) {
      for (int64_t c = 0; c < n; ++c) dbias[half * C + c0 + c] += sums[9 * m + half * n + c];
      for (int tap = 0; tap < 9; ++tap) {
        for (int64_t c = 0; c < n; ++c) dkernel[(tap * 2 + half) * C + c0 + c] += sums[tap * m + half * n + c];
      }
    }
  }
  for (int half = 0; half < 2; ++half) std::fill(dshift + half * C + c0, dshift + half * C + c0 + n, 0.0f);
  for (int64_t i = 0; i < g.height; ++i) {
    RowTaps(dy, zeros, blocked, i, -1, taps.data());
    RowStencil(taps.data(), packed, zeros, y, blocked, 0, m);  // y: ds, the SiLU output's gradient
    for (int64_t j = 0; j < g.width; ++j) {
      const int64_t p = i * g.width + j;
      for (int half = 0; half < 2; ++half) {
        const float *__restrict slope = slopes + (p * 2 + half) * n, *__restrict ds = y + j * m + half * n;
        float* __restrict dx = du + (p * 2 + half) * C + c0;
        float* __restrict dsum = dshift + half * C + c0;
        for (int64_t c = 0; c < n; ++c) {
          dx[c] = ds[c] * slope[c];
          dsum[c] += dx[c];
        }
      }
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
  // One (10, C) row of sums per image: items of one image touch disjoint channels of it.
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

using GatedImages = ffi::Buffer<ffi::F32, 5>;
using GatedBiases = ffi::Buffer<ffi::F32, 3>;

ffi::Error CheckGatedShapes(const GatedImages& u, const GatedBiases& shift, const GatedImages& kernel,
                            const GatedBiases& bias) {
  auto ud = u.dimensions(), sd = shift.dimensions(), kd = kernel.dimensions(), bd = bias.dimensions();
  if (ud[3] != 2 || kd[0] != ud[0] || kd[1] != 3 || kd[2] != 3 || kd[3] != 2 || kd[4] != ud[4] ||
      bd[0] != ud[0] || bd[1] != 2 || bd[2] != ud[4] || sd[0] != bd[0] || sd[1] != bd[1] || sd[2] != bd[2]) {
    return ffi::Error::InvalidArgument("gated depthwise_conv3x3: expected u (B, H, W, 2, C), shift (B, 2, C), "
                                       "kernel (B, 3, 3, 2, C) and bias (B, 2, C)");
  }
  return ffi::Error::Success();
}

ffi::Error GatedForward(ffi::ThreadPool pool, GatedImages u, GatedBiases shift, GatedImages kernel, GatedBiases bias,
                        ffi::Result<Images> out) {
  if (ffi::Error error = CheckGatedShapes(u, shift, kernel, bias); error.failure()) return error;
  auto d = u.dimensions();
  const Geometry g{d[1], d[2], d[4]};
  const int64_t C = g.channels, pixels = g.height * g.width, blocks = (C + kChannelBlock - 1) / kChannelBlock;
  const float *up = u.typed_data(), *sp = shift.typed_data(), *kp = kernel.typed_data(), *bp = bias.typed_data();
  float* op = out->typed_data();
  ForEachItem(pool, d[0] * blocks, [=](int64_t item) {
    const int64_t b = item / blocks, c0 = item % blocks * kChannelBlock;
    GatedForwardItem(up + b * pixels * 2 * C, sp + b * 2 * C, kp + b * 18 * C, bp + b * 2 * C, op + b * pixels * C,
                     g, c0, std::min(kChannelBlock, C - c0));
  });
  return ffi::Error::Success();
}

ffi::Error GatedBackward(ffi::ThreadPool pool, GatedImages u, GatedBiases shift, GatedImages kernel, GatedBiases bias,
                         Images dout, ffi::Result<GatedImages> du, ffi::Result<GatedBiases> dshift,
                         ffi::Result<GatedImages> dkernel, ffi::Result<GatedBiases> dbias) {
  if (ffi::Error error = CheckGatedShapes(u, shift, kernel, bias); error.failure()) return error;
  auto d = u.dimensions();
  const Geometry g{d[1], d[2], d[4]};
  const int64_t C = g.channels, pixels = g.height * g.width, blocks = (C + kChannelBlock - 1) / kChannelBlock;
  const float *up = u.typed_data(), *sp = shift.typed_data(), *kp = kernel.typed_data(), *bp = bias.typed_data(),
              *dop = dout.typed_data();
  float *dup = du->typed_data(), *dsp = dshift->typed_data(), *dkp = dkernel->typed_data(),
        *dbp = dbias->typed_data();
  ForEachItem(pool, d[0] * blocks, [=](int64_t item) {
    const int64_t b = item / blocks, c0 = item % blocks * kChannelBlock;
    GatedBackwardItem(up + b * pixels * 2 * C, sp + b * 2 * C, kp + b * 18 * C, bp + b * 2 * C, dop + b * pixels * C,
                      dup + b * pixels * 2 * C, dsp + b * 2 * C, dkp + b * 18 * C, dbp + b * 2 * C, g, c0,
                      std::min(kChannelBlock, C - c0));
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(SanaGatedDepthwiseConv3x3, GatedForward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<GatedImages>().Arg<GatedBiases>()
                                  .Arg<GatedImages>().Arg<GatedBiases>().Ret<Images>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SanaGatedDepthwiseConv3x3Backward, GatedBackward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<GatedImages>().Arg<GatedBiases>()
                                  .Arg<GatedImages>().Arg<GatedBiases>().Arg<Images>().Ret<GatedImages>()
                                  .Ret<GatedBiases>().Ret<GatedImages>().Ret<GatedBiases>());

}  // namespace sana_jax
