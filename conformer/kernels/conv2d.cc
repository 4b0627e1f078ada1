// 2-D convolution of NCHW float32 with any square kernel, stride and zero padding (groups 1, no dilation), with or
// without a bias, for MindSpore's CPU (ops.Custom, func_type="aot"): im2col of a block of output rows into a buffer
// that stays in the core's cache, then one OpenBLAS sgemm per block. For the convolutions conv3x3.cc does not serve:
// the stem's 7x7 / 2, the patch embedding (k x k / k) and the stride-2 convs between stages.
//
// The backward is two ops, so that a graph which needs no input gradient (the stem's image) drops that op: the weight
// (and bias) gradient sums one partial per block, added in block order (the same on every run); the input gradient
// scatters each block's columns back (col2im), each image on one core, as blocks of one image overlap when the kernel
// is larger than the stride. The same math as nn.Conv2d, in another summation order.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemm.h"
#include "parallel.h"

namespace {
constexpr int64_t kColumnBytes = 1 << 20;  // one block's columns (im2col buffer)

struct Geometry {
  int64_t batch, in_channels, out_channels, height, width, kernel, stride, padding, out_height, out_width;
  int64_t block_rows, blocks;

  // x [N, Cin, H, W], w [Cout, Cin, k, k], [stride, padding]
  Geometry(const int64_t *x, const int64_t *w, const float *strides)
      : batch(x[0]), in_channels(x[1]), out_channels(w[0]), height(x[2]), width(x[3]), kernel(w[2]),
        stride(static_cast<int64_t>(strides[0])), padding(static_cast<int64_t>(strides[1])) {
    out_height = (height + 2 * padding - kernel) / stride + 1;
    out_width = (width + 2 * padding - kernel) / stride + 1;
    // a block's columns stay in cache, and small convolutions still get one block per core
    const int64_t rows = batch * out_height, threads = conformer::Pool::instance().threads();
    block_rows = std::clamp<int64_t>(kColumnBytes / (4 * patch() * out_width), 1, (rows + threads - 1) / threads);
    blocks = (rows + block_rows - 1) / block_rows;
  }
  int64_t patch() const { return in_channels * kernel * kernel; }  // rows of the column matrix
  int64_t plane() const { return out_height * out_width; }
  int64_t image_size() const { return in_channels * height * width; }
};

// The input with its zero padding, each padded row split into `stride` phases (phase q holds the padded columns q,
// q + stride, ...): im2col's rows for tap kw are then contiguous runs of phase kw % stride.
struct PhaseRows {
  const Geometry &g;
  int64_t length;  // of one phase
  std::vector<float> values;  // [N, Cin, H, stride, length]

  PhaseRows(const Geometry &geometry, const float *x)
      : g(geometry), length((geometry.width + 2 * geometry.padding + geometry.stride - 1) / geometry.stride),
        values(geometry.batch * geometry.in_channels * geometry.height * geometry.stride * length) {
    conformer::parallel_for(g.batch * g.in_channels * g.height, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const float *in = x + row * g.width;
        float *out = values.data() + row * g.stride * length;
        for (int64_t q = 0; q < g.stride; ++q) {
          for (int64_t jj = 0; jj < length; ++jj) {
            const int64_t column = jj * g.stride + q - g.padding;
            out[q * length + jj] = column >= 0 && column < g.width ? in[column] : 0.0f;
          }
        }
      }
    });
  }

  // the phases of input row ih of (image, channel): tap kw's Wo inputs start at tap_offset(kw) from here
  const float *row(int64_t image, int64_t channel, int64_t ih) const {
    return values.data() + ((image * g.in_channels + channel) * g.height + ih) * g.stride * length;
  }
  int64_t tap_offset(int64_t kw) const { return (kw % g.stride) * length + kw / g.stride; }
};

// cols [patch, rows * Wo]: for (c, kh, kw) and output row r of the batch's rows [first, first + rows) (image
// r / Ho, row r % Ho), column j: the input pixel (row * stride - padding + kh, j * stride - padding + kw), zero
// outside the image.
void im2col(const Geometry &g, const PhaseRows &input, int64_t first, int64_t rows, float *cols) {
  const int64_t wo = g.out_width, columns = rows * wo;
  // per output row of the block: its image and its window's top input row (no division in the loops below: with
  // the short rows of small images they cost more than the copies)
  thread_local std::vector<int64_t> images, tops, taps;
  images.resize(rows);
  tops.resize(rows);
  for (int64_t r = 0; r < rows; ++r) {
    images[r] = (first + r) / g.out_height;
    tops[r] = (first + r) % g.out_height * g.stride - g.padding;
  }
  taps.resize(g.kernel);
  for (int64_t kw = 0; kw < g.kernel; ++kw) taps[kw] = input.tap_offset(kw);
  for (int64_t c = 0; c < g.in_channels; ++c) {
    for (int64_t kh = 0; kh < g.kernel; ++kh) {
      float *rows_of_kh = cols + (c * g.kernel + kh) * g.kernel * columns;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t ih = tops[r] + kh;
        if (ih < 0 || ih >= g.height) {
          for (int64_t kw = 0; kw < g.kernel; ++kw) std::fill_n(rows_of_kh + kw * columns + r * wo, wo, 0.0f);
          continue;
        }
        const float *phases = input.row(images[r], c, ih);
        for (int64_t kw = 0; kw < g.kernel; ++kw) {
          float *__restrict out = rows_of_kh + kw * columns + r * wo;
          const float *__restrict in = phases + taps[kw];
#pragma omp simd
          for (int64_t j = 0; j < wo; ++j) out[j] = in[j];  // inline: rows are short, a memcpy call per row is not
        }
      }
    }
  }
}

// Runs fn(offset in a [N, Cout, Ho, Wo] tensor, offset in a block [Cout, rows * Wo]) for each output row of
// channel o in the batch's rows [first, first + rows): the two places of one row of Wo values.
template <typename Fn>
void over_output_rows(const Geometry &g, int64_t first, int64_t rows, Fn fn) {
  const int64_t wo = g.out_width;
  for (int64_t o = 0; o < g.out_channels; ++o) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = first + r;
      fn((row / g.out_height * g.out_channels + o) * g.plane() + row % g.out_height * wo, (o * rows + r) * wo);
    }
  }
}

// The transpose of im2col: adds cols [patch, rows * Wo] into `image` [Cin, H, W] (which the caller zeroed).
void col2im(const Geometry &g, const float *cols, int64_t first, int64_t rows, float *image) {
  const int64_t wo = g.out_width, columns = rows * wo;
  for (int64_t c = 0; c < g.in_channels; ++c) {
    for (int64_t kh = 0; kh < g.kernel; ++kh) {
      for (int64_t kw = 0; kw < g.kernel; ++kw) {
        const float *row = cols + ((c * g.kernel + kh) * g.kernel + kw) * columns;
        for (int64_t r = 0; r < rows; ++r) {
          const float *in = row + r * wo;
          const int64_t ih = (first + r) * g.stride - g.padding + kh;
          if (ih < 0 || ih >= g.height) continue;
          float *out = image + (c * g.height + ih) * g.width + kw - g.padding;
          for (int64_t j = 0; j < wo; ++j) {
            const int64_t iw = j * g.stride - g.padding + kw;
            if (iw >= 0 && iw < g.width) out[j * g.stride] += in[j];
          }
        }
      }
    }
  }
}

// Runs fn(chunk, first row, rows) for every block of the batch's output rows, the blocks split over the cores in
// conformer::chunks(g.blocks, 1) fixed chunks.
template <typename Fn>
void over_blocks(const Geometry &g, Fn fn) {
  const int64_t count = conformer::chunks(g.blocks, 1), total = g.batch * g.out_height;
  conformer::parallel_chunks(g.blocks, count, [&](int64_t chunk, int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * g.block_rows;
      fn(chunk, first, std::min(g.block_rows, total - first));
    }
  });
}

// inputs x, w, (b), [stride, padding]; output y [N, Cout, Ho, Wo]
int forward(int nparam, void **params, int64_t **shapes) {
  const bool bias = nparam == 5;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *b = bias ? static_cast<const float *>(params[2]) : nullptr;
  const Geometry g(shapes[0], shapes[1], static_cast<const float *>(params[bias ? 3 : 2]));
  float *y = static_cast<float *>(params[bias ? 4 : 3]);
  const PhaseRows input(g, x);
  over_blocks(g, [&](int64_t, int64_t first, int64_t rows) {
    thread_local std::vector<float> cols, out;
    const int64_t columns = rows * g.out_width;
    cols.resize(g.patch() * columns);
    out.resize(g.out_channels * columns);
    im2col(g, input, first, rows, cols.data());
    for (int64_t o = 0; bias && o < g.out_channels; ++o) std::fill(&out[o * columns], &out[(o + 1) * columns], b[o]);
    conformer::sgemm(false, false, g.out_channels, columns, g.patch(), 1.0f, w, g.patch(), cols.data(), columns,
                     bias ? 1.0f : 0.0f, out.data(), columns);
    over_output_rows(g, first, rows, [&](int64_t at, int64_t in_block) {
      std::memcpy(y + at, out.data() + in_block, g.out_width * sizeof(float));
    });
  });
  return 0;
}

// inputs x, w, dy, [stride, padding]; output dx [N, Cin, H, W]
int backward_input(void **params, int64_t **shapes) {
  const float *w = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  const Geometry g(shapes[0], shapes[1], static_cast<const float *>(params[3]));
  float *dx = static_cast<float *>(params[4]);
  conformer::parallel_for(g.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> cols(g.patch() * std::min(g.block_rows, g.out_height) * g.out_width);
    for (int64_t image = begin; image < end; ++image) {
      float *dxi = dx + image * g.image_size();
      std::fill(dxi, dxi + g.image_size(), 0.0f);
      const int64_t block_rows = std::min(g.block_rows, g.out_height);
      for (int64_t first = 0; first < g.out_height; first += block_rows) {
        const int64_t rows = std::min(block_rows, g.out_height - first), columns = rows * g.out_width;
        conformer::sgemm(true, false, g.patch(), columns, g.out_channels, 1.0f, w, g.patch(),
                         dy + image * g.out_channels * g.plane() + first * g.out_width, g.plane(), 0.0f,
                         cols.data(), columns);
        col2im(g, cols.data(), first, rows, dxi);
      }
    }
  });
  return 0;
}

// inputs x, w, dy, [stride, padding]; outputs dw [Cout, Cin, k, k], (db [Cout])
int backward_weight(int nparam, void **params, int64_t **shapes) {
  const bool bias = nparam == 6;
  const float *x = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[2]);
  const Geometry g(shapes[0], shapes[1], static_cast<const float *>(params[3]));
  float *dw = static_cast<float *>(params[4]);
  float *db = bias ? static_cast<float *>(params[5]) : nullptr;
  const int64_t weights = g.out_channels * g.patch();
  const PhaseRows input(g, x);
  std::vector<std::vector<float>> partials(conformer::chunks(g.blocks, 1));  // [dw, db] per chunk of blocks
  over_blocks(g, [&](int64_t chunk, int64_t first, int64_t rows) {
    thread_local std::vector<float> cols, dy_rows;
    const int64_t columns = rows * g.out_width;
    cols.resize(g.patch() * columns);
    dy_rows.resize(g.out_channels * columns);
    im2col(g, input, first, rows, cols.data());
    over_output_rows(g, first, rows, [&](int64_t at, int64_t in_block) {
      std::memcpy(dy_rows.data() + in_block, dy + at, g.out_width * sizeof(float));
    });
    std::vector<float> &partial = partials[chunk];
    if (partial.empty()) partial.assign(weights + (bias ? g.out_channels : 0), 0.0f);
    conformer::sgemm(false, true, g.out_channels, g.patch(), columns, 1.0f, dy_rows.data(), columns, cols.data(),
                     columns, 1.0f, partial.data(), g.patch());
    for (int64_t o = 0; bias && o < g.out_channels; ++o) {
      float sum = 0.0f;
      const float *row = dy_rows.data() + o * columns;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < columns; ++i) sum += row[i];
      partial[weights + o] += sum;
    }
  });
  std::fill(dw, dw + weights, 0.0f);
  if (bias) std::fill(db, db + g.out_channels, 0.0f);
  for (const auto &partial : partials) {  // in chunk order: the same sum on every run
#pragma omp simd
    for (int64_t i = 0; i < weights; ++i) dw[i] += partial[i];
    for (int64_t o = 0; bias && o < g.out_channels; ++o) db[o] += partial[weights + o];
  }
  return 0;
}
}  // namespace

#define CONFORMER_CONV_ENTRY(name, call)                                                                         \
  extern "C" int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, \
                      void *extra) {                                                                            \
    return call;                                                                                                \
  }

CONFORMER_CONV_ENTRY(Conv2dForward, forward(nparam, params, shapes))
CONFORMER_CONV_ENTRY(Conv2dForwardNoBias, forward(nparam, params, shapes))
CONFORMER_CONV_ENTRY(Conv2dBackwardInput, backward_input(params, shapes))
CONFORMER_CONV_ENTRY(Conv2dBackwardInputNoBias, backward_input(params, shapes))
CONFORMER_CONV_ENTRY(Conv2dBackwardWeight, backward_weight(nparam, params, shapes))
CONFORMER_CONV_ENTRY(Conv2dBackwardWeightNoBias, backward_weight(nparam, params, shapes))
