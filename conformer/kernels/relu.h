// The ReLU and its gradient for the project's CPU kernels.
#pragma once

#include <cstdint>
#include <cstring>

namespace conformer {

inline float relu(float value) { return value > 0.0f ? value : 0.0f; }

// dy where the ReLU's output y is positive, else 0, as MindSpore's ReluGrad: as a bit mask, which vectorises where
// a select (y > 0 ? dy : 0) did not.
inline float relu_gradient(float dy, float y) {
  uint32_t bits;
  std::memcpy(&bits, &dy, sizeof bits);
  bits &= y > 0.0f ? 0xffffffffu : 0u;
  float gradient;
  std::memcpy(&gradient, &bits, sizeof gradient);
  return gradient;
}

}  // namespace conformer
