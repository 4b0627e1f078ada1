// Many tensors of an ops.Custom kernel taken as one range of elements laid end to end (a train step's gradients,
// an optimizer's parameters), so that a kernel can split all of them evenly over the cores.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"

namespace conformer {

class TensorList {
 public:
  // The `count` tensors whose shapes are ndims[0..count), shapes[0..count).
  TensorList(int count, const int *ndims, int64_t *const *shapes) : starts_(count + 1, 0) {
    for (int t = 0; t < count; ++t) starts_[t + 1] = starts_[t] + elements(ndims[t], shapes[t]);
  }

  int64_t elements_in_all() const { return starts_.back(); }

  // Calls fn(t, offset, n) for each piece of the elements [begin, end) of all tensors: n elements of tensor t from
  // its element `offset`, in order.
  template <typename Fn>
  void for_each_piece(int64_t begin, int64_t end, Fn fn) const {
    int t = static_cast<int>(std::upper_bound(starts_.begin(), starts_.end(), begin) - starts_.begin()) - 1;
    for (int64_t at = begin; at < end; ++t) {
      const int64_t stop = std::min(end, starts_[t + 1]);
      fn(t, at - starts_[t], stop - at);
      at = stop;
    }
  }

 private:
  std::vector<int64_t> starts_;  // where each tensor begins among all elements; the last is their total
};

}  // namespace conformer
