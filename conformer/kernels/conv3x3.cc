// 3x3 convolution with stride 1 and padding 1 of NCHW float32, without a bias, for MindSpore's CPU (ops.Custom,
// func_type="aot"): forward and backward as OpenBLAS sgemm calls on shifted views of a zero-padded tile, no im2col.
//
// The batch is one tall image (a zero row between two images) cut into tiles of rows; a tile holds its rows of all
// channels, each row padded to W + 2 columns, with one padded row above and below. Laid out as one long row per
// channel, output pixel q = h * (W + 2) + w reads its tap (kh, kw) at q + kh * (W + 2) + kw: each of the 9 taps is
// one sgemm of the weights [Cout, Cin] by the tile shifted by that offset (the padding columns' and separator rows'
// outputs are computed and dropped). The input gradient is the same convolution of the padded output gradient with
// the taps flipped and transposed; the weight gradient per tap is one sgemm of the output gradient by the shifted
// tile (the padding's zeros stand in for the dropped outputs), one partial per tile, added in tile order: the same on
// every run. The tiles are split over the cores. The same math as nn.Conv2d(kernel_size=3, padding=1), in another
// summation order.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemm.h"
#include "parallel.h"

namespace {
constexpr int kTaps = 9;
constexpr int64_t kTileBytes = 1 << 20;  // input + output of one tile: stays in the core's L2 between the 9 sgemms

// The batch as one tall image: image n's rows are rows n * (H + 1) ... n * (H + 1) + H - 1, with a row of zeros
// (a separator: its outputs are dropped) between two images, so a tile may hold rows of several small images.
struct Geometry {
  int64_t batch, in_channels, out_channels, height, width, tile_rows, tiles;

  Geometry(const int64_t *x, const int64_t *w)  // from x's shape [N, Cin, H, W] and the weight's [Cout, Cin, 3, 3]
      : batch(x[0]), in_channels(x[1]), out_channels(w[0]), height(x[2]), width(x[3]) {
    const int64_t row_bytes = (in_channels + out_channels) * padded_width() * 4;
    const int64_t threads = conformer::Pool::instance().threads();
    // as few tiles as fit the budget, in a multiple of the threads (no core waits for a last tile)
    tiles = (rows() + std::max<int64_t>(1, kTileBytes / row_bytes) - 1) / std::max<int64_t>(1, kTileBytes / row_bytes);
    tiles = std::min(rows(), (tiles + threads - 1) / threads * threads);
    tile_rows = (rows() + tiles - 1) / tiles;
    tiles = (rows() + tile_rows - 1) / tile_rows;
  }
  int64_t padded_width() const { return width + 2; }
  int64_t rows() const { return batch * (height + 1) - 1; }  // of the tall image
  // Channel stride of a tile of `count` output rows: count + 2 padded rows and 2 floats the last tap reads past them.
  int64_t tile_stride(int64_t count) const { return (count + 2) * padded_width() + 2; }
  // Where row `row` of the tall image starts in `channel` of a [N, channels, H, W] tensor; -1 for padding.
  int64_t offset(int64_t row, int64_t channels, int64_t channel) const {
    if (row < 0 || row >= rows() || row % (height + 1) == height) return -1;
    return ((row / (height + 1) * channels + channel) * height + row % (height + 1)) * width;
  }
};

// Copies rows [first - 1, first + count] of the tall image of `tensor` [N, channels, H, W] into `tile`, zero
// outside the images.
void pad_rows(const Geometry &g, const float *tensor, int64_t channels, int64_t first, int64_t count, float *tile) {
  const int64_t wp = g.padded_width(), stride = g.tile_stride(count);
  for (int64_t c = 0; c < channels; ++c) {
    float *t = tile + c * stride;
    for (int64_t r = 0; r < count + 2; ++r) {
      float *row = t + r * wp;
      const int64_t at = g.offset(first - 1 + r, channels, c);
      row[0] = row[wp - 1] = 0.0f;
      if (at < 0) {
        std::fill(row + 1, row + 1 + g.width, 0.0f);
      } else {
        std::memcpy(row + 1, tensor + at, g.width * sizeof(float));
      }
    }
    t[stride - 2] = t[stride - 1] = 0.0f;
  }
}

// out [outputs, count * (W + 2)] = sum over taps of taps[t] [outputs, inputs] times the tile shifted by the tap.
void convolve_tile(const Geometry &g, const float *taps, int64_t inputs, int64_t outputs, const float *tile,
                   int64_t count, float *out) {
  const int64_t wp = g.padded_width(), columns = count * wp, stride = g.tile_stride(count);
  for (int t = 0; t < kTaps; ++t) {
    conformer::sgemm(false, false, outputs, columns, inputs, 1.0f, taps + t * outputs * inputs, inputs,
                     tile + (t / 3) * wp + t % 3, stride, t == 0 ? 0.0f : 1.0f, out, columns);
  }
}

// Stores rows [first, first + count) of the tall image from `out` [channels, count * (W + 2)] into `tensor`
// [N, channels, H, W], without the padding columns and the separator rows.
void store_rows(const Geometry &g, const float *out, int64_t channels, int64_t first, int64_t count, float *tensor) {
  const int64_t wp = g.padded_width();
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t r = 0; r < count; ++r) {
      const int64_t at = g.offset(first + r, channels, c);
      if (at >= 0) std::memcpy(tensor + at, out + (c * count + r) * wp, g.width * sizeof(float));
    }
  }
}

// Runs fn(tile, first row, rows) for every tile of the tall image, the tiles split over the cores.
template <typename Fn>
void over_tiles(const Geometry &g, Fn fn) {
  conformer::parallel_for(g.tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t first = tile * g.tile_rows;
      fn(tile, first, std::min(g.tile_rows, g.rows() - first));
    }
  });
}
}  // namespace

// inputs x [N, Cin, H, W], w [Cout, Cin, 3, 3]; output y [N, Cout, H, W]
extern "C" int Conv3x3ForwardNoBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const Geometry g(shapes[0], shapes[1]);
  const int64_t cin = g.in_channels, cout = g.out_channels;
  std::vector<float> taps(kTaps * cout * cin);  // [tap][out][in]
  for (int64_t o = 0; o < cout; ++o)
    for (int64_t i = 0; i < cin; ++i)
      for (int t = 0; t < kTaps; ++t) taps[(t * cout + o) * cin + i] = w[(o * cin + i) * kTaps + t];
  over_tiles(g, [&](int64_t, int64_t first, int64_t count) {
    thread_local std::vector<float> tile, out;
    tile.resize(cin * g.tile_stride(count));
    out.resize(cout * count * g.padded_width());
    pad_rows(g, x, cin, first, count, tile.data());
    convolve_tile(g, taps.data(), cin, cout, tile.data(), count, out.data());
    store_rows(g, out.data(), cout, first, count, y);
  });
  return 0;
}

// inputs x [N, Cin, H, W], w [Cout, Cin, 3, 3], dy [N, Cout, H, W]; outputs dx [N, Cin, H, W], dw [Cout, Cin, 3, 3]
extern "C" int Conv3x3BackwardNoBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                     void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]);
  float *dw = static_cast<float *>(params[4]);
  const Geometry g(shapes[0], shapes[1]);
  const int64_t cin = g.in_channels, cout = g.out_channels, weights = kTaps * cout * cin, wp = g.padded_width();
  std::vector<float> flipped(weights);  // [tap][in][out]: tap t of the input gradient is the weights' tap 8 - t
  for (int64_t o = 0; o < cout; ++o)
    for (int64_t i = 0; i < cin; ++i)
      for (int t = 0; t < kTaps; ++t) flipped[(t * cin + i) * cout + o] = w[(o * cin + i) * kTaps + (kTaps - 1 - t)];
  std::vector<std::vector<float>> partials(g.tiles);  // the weight gradient of each tile, [tap][out][in]
  over_tiles(g, [&](int64_t tile, int64_t first, int64_t count) {
    thread_local std::vector<float> x_tile, dy_tile, out;
    const int64_t stride = g.tile_stride(count);
    x_tile.resize(cin * stride);
    dy_tile.resize(cout * stride);
    out.resize(cin * count * wp);
    pad_rows(g, x, cin, first, count, x_tile.data());
    pad_rows(g, dy, cout, first, count, dy_tile.data());
    convolve_tile(g, flipped.data(), cout, cin, dy_tile.data(), count, out.data());
    store_rows(g, out.data(), cin, first, count, dx);
    // dy's rows start one padded row and one column into its tile; the padding zeroes the dropped columns
    std::vector<float> &partial = partials[tile];
    partial.resize(weights);
    for (int t = 0; t < kTaps; ++t) {
      conformer::sgemm(false, true, cout, cin, count * wp, 1.0f, dy_tile.data() + wp + 1, stride,
                       x_tile.data() + (t / 3) * wp + t % 3, stride, 0.0f, partial.data() + t * cout * cin, cin);
    }
  });
  std::fill(dw, dw + weights, 0.0f);
  for (const auto &partial : partials) {  // in tile order: the same sum on every run
    for (int64_t o = 0; o < cout; ++o)
      for (int64_t i = 0; i < cin; ++i)
        for (int t = 0; t < kTaps; ++t) dw[(o * cin + i) * kTaps + t] += partial[(t * cout + o) * cin + i];
  }
  return 0;
}
