// 3x3 convolution with stride 1 and padding 1 of NCHW float32, without a bias, for MindSpore's CPU (ops.Custom,
// func_type="aot"): forward and backward as OpenBLAS sgemm calls on shifted views of a zero-padded tile, no im2col.
//
// A tile holds some rows of an image's channels, each row padded to W + 2 columns and one zero row above and below.
// Laid out as one long row per channel, output pixel q = h * (W + 2) + w reads its tap (kh, kw) at q + kh * (W + 2)
// + kw: each of the 9 taps is one sgemm of the weights [Cout, Cin] by the tile shifted by that offset (two extra
// columns per row are computed and dropped). The input gradient is the same convolution of the padded output gradient
// with the taps flipped and transposed; the weight gradient per tap is one sgemm of the output gradient by the
// shifted tile (the padding's zeros stand in for the dropped columns). Tiles are (image, block of rows) tasks split
// over the cores; the weight gradient is summed per chunk of tasks and the chunks added in order, so it is the same
// on every run. The same math as nn.Conv2d(kernel_size=3, padding=1), in another summation order.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemm.h"
#include "parallel.h"

namespace {
constexpr int kTaps = 9;
constexpr int64_t kTileBytes = 1 << 20;  // input + output of one tile: stays in the core's L2 between the 9 sgemms

struct Geometry {
  int64_t batch, in_channels, out_channels, height, width;
  int64_t padded_width() const { return width + 2; }
  int64_t block_rows() const {  // output rows per tile
    const int64_t row_bytes = (in_channels + out_channels) * padded_width() * 4;
    return std::clamp<int64_t>(kTileBytes / row_bytes, 1, height);
  }
  int64_t blocks() const { return (height + block_rows() - 1) / block_rows(); }
};

// from x's shape [N, Cin, H, W] and the weight's [Cout, Cin, 3, 3]
Geometry geometry(const int64_t *x, const int64_t *w) { return {x[0], x[1], w[0], x[2], x[3]}; }

// Channel stride of a tile of `rows` output rows: rows + 2 padded rows and 2 floats the last tap reads past them.
int64_t tile_stride(const Geometry &g, int64_t rows) { return (rows + 2) * g.padded_width() + 2; }

// Copies rows [first - 1, first + rows] of `image` [channels, H, W] into `tile`, zero outside the image.
void pad_rows(const Geometry &g, const float *image, int64_t channels, int64_t first, int64_t rows, float *tile) {
  const int64_t wp = g.padded_width(), stride = tile_stride(g, rows);
  for (int64_t c = 0; c < channels; ++c) {
    float *t = tile + c * stride;
    const float *plane = image + c * g.height * g.width;
    for (int64_t r = 0; r < rows + 2; ++r) {
      float *row = t + r * wp;
      const int64_t source = first - 1 + r;
      row[0] = row[wp - 1] = 0.0f;
      if (source < 0 || source >= g.height) {
        std::fill(row + 1, row + 1 + g.width, 0.0f);
      } else {
        std::memcpy(row + 1, plane + source * g.width, g.width * sizeof(float));
      }
    }
    t[stride - 2] = t[stride - 1] = 0.0f;
  }
}

// out [outputs, rows * (W + 2)] = sum over taps of taps[t] [outputs, inputs] times the tile shifted by the tap.
void convolve_tile(const Geometry &g, const float *taps, int64_t inputs, int64_t outputs, const float *tile,
                   int64_t rows, float *out) {
  const int64_t wp = g.padded_width(), columns = rows * wp, stride = tile_stride(g, rows);
  for (int t = 0; t < kTaps; ++t) {
    conformer::sgemm(false, false, outputs, columns, inputs, 1.0f, taps + t * outputs * inputs, inputs,
                     tile + (t / 3) * wp + t % 3, stride, t == 0 ? 0.0f : 1.0f, out, columns);
  }
}

// Drops the two padding columns of each row of `out` [channels, rows * (W + 2)] into rows [first, first + rows) of
// `image` [channels, H, W].
void store_rows(const Geometry &g, const float *out, int64_t channels, int64_t first, int64_t rows, float *image) {
  const int64_t wp = g.padded_width();
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(image + (c * g.height + first + r) * g.width, out + (c * rows + r) * wp, g.width * sizeof(float));
    }
  }
}

// Runs fn(chunk, image, first row, rows) for every tile, the tiles in chunks over the cores; returns the chunk count.
template <typename Fn>
int64_t over_tiles(const Geometry &g, Fn fn) {
  const int64_t blocks = g.blocks(), rows = g.block_rows(), tiles = g.batch * blocks;
  const int64_t count = conformer::chunks(tiles, 1);
  conformer::parallel_chunks(tiles, count, [&](int64_t chunk, int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t image = tile / blocks, first = (tile % blocks) * rows;
      fn(chunk, image, first, std::min(rows, g.height - first));
    }
  });
  return count;
}
}  // namespace

// inputs x [N, Cin, H, W], w [Cout, Cin, 3, 3]; output y [N, Cout, H, W]
extern "C" int Conv3x3ForwardNoBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const Geometry g = geometry(shapes[0], shapes[1]);
  const int64_t cin = g.in_channels, cout = g.out_channels;
  std::vector<float> taps(kTaps * cout * cin);  // [tap][out][in]
  for (int64_t o = 0; o < cout; ++o)
    for (int64_t i = 0; i < cin; ++i)
      for (int t = 0; t < kTaps; ++t) taps[(t * cout + o) * cin + i] = w[(o * cin + i) * kTaps + t];
  const int64_t rows = g.block_rows();
  over_tiles(g, [&](int64_t, int64_t image, int64_t first, int64_t count) {
    thread_local std::vector<float> tile, out;
    tile.resize(cin * tile_stride(g, rows));
    out.resize(cout * rows * g.padded_width());
    pad_rows(g, x + image * cin * g.height * g.width, cin, first, count, tile.data());
    convolve_tile(g, taps.data(), cin, cout, tile.data(), count, out.data());
    store_rows(g, out.data(), cout, first, count, y + image * cout * g.height * g.width);
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
  const Geometry g = geometry(shapes[0], shapes[1]);
  const int64_t cin = g.in_channels, cout = g.out_channels, weights = kTaps * cout * cin, wp = g.padded_width();
  std::vector<float> flipped(weights);  // [tap][in][out]: tap t of the input gradient is the weights' tap 8 - t
  for (int64_t o = 0; o < cout; ++o)
    for (int64_t i = 0; i < cin; ++i)
      for (int t = 0; t < kTaps; ++t) flipped[(t * cin + i) * cout + o] = w[(o * cin + i) * kTaps + (kTaps - 1 - t)];
  const int64_t rows = g.block_rows();
  std::vector<std::vector<float>> partials(conformer::chunks(g.batch * g.blocks(), 1));  // [tap][out][in] per chunk
  over_tiles(g, [&](int64_t chunk, int64_t image, int64_t first, int64_t count) {
    thread_local std::vector<float> x_tile, dy_tile, out;
    const int64_t stride = tile_stride(g, rows), columns = count * wp;
    x_tile.resize(cin * stride);
    dy_tile.resize(cout * stride);
    out.resize(cin * rows * wp);
    std::vector<float> &partial = partials[chunk];
    if (partial.empty()) partial.assign(weights, 0.0f);
    pad_rows(g, x + image * cin * g.height * g.width, cin, first, count, x_tile.data());
    pad_rows(g, dy + image * cout * g.height * g.width, cout, first, count, dy_tile.data());
    convolve_tile(g, flipped.data(), cout, cin, dy_tile.data(), count, out.data());
    store_rows(g, out.data(), cin, first, count, dx + image * cin * g.height * g.width);
    // dy's rows start one padded row and one column into its tile; the padding zeroes the dropped columns
    const int64_t tile_stride_now = tile_stride(g, count);
    for (int t = 0; t < kTaps; ++t) {
      conformer::sgemm(false, true, cout, cin, columns, 1.0f, dy_tile.data() + wp + 1, tile_stride_now,
                       x_tile.data() + (t / 3) * wp + t % 3, tile_stride_now, 1.0f, partial.data() + t * cout * cin,
                       cin);
    }
  });
  std::fill(dw, dw + weights, 0.0f);
  for (const auto &partial : partials) {
    if (partial.empty()) continue;
    for (int64_t o = 0; o < cout; ++o)
      for (int64_t i = 0; i < cin; ++i)
        for (int t = 0; t < kTaps; ++t) dw[(o * cin + i) * kTaps + t] += partial[(t * cout + o) * cin + i];
  }
  return 0;
}
