// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a
// counter-based RNG, so any element's random number is a pure function of (seed, position).
// The CPU twin and the CUDA kernels include this one header and therefore draw the SAME
// dropout keep-mask for the same seed, whatever the tiling or thread count.
//
// Counter layout of the attention dropout mask (B, HQ, LQ, LK), row-major:
//   idx     = ((b · HQ + h) · LQ + i) · LK + j           64-bit element index
//   counter = (lo32(idx >> 2), hi32(idx >> 2), 0, 0)      one Philox call per 4 elements
//   key     = (lo32(seed), hi32(seed))
//   r       = philox4x32_10(counter, key)[idx & 3]
//   u       = (r >> 8) · 2^-24                           uniform in [0, 1), exact in fp32
//   keep    = u >= dropout_p                             P(keep) = 1 - dropout_p
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FF_HOST_DEVICE inline
#endif

namespace fusedformer {

struct Philox4 {
  uint32_t x, y, z, w;
};

FF_HOST_DEVICE uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return uint32_t((uint64_t(a) * uint64_t(b)) >> 32);
#endif
}

// Ten rounds of Philox4x32 on `ctr` with key (k0, k1).
FF_HOST_DEVICE Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = philox_mulhi(kM0, ctr.x), lo0 = kM0 * ctr.x;
    const uint32_t hi1 = philox_mulhi(kM1, ctr.z), lo1 = kM1 * ctr.z;
    ctr = Philox4{hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0};
    k0 += kW0;
    k1 += kW1;
  }
  return ctr;
}

// The uniform number in [0, 1) of element `idx` of the stream `seed` (layout above).
FF_HOST_DEVICE float philox_uniform(uint64_t seed, uint64_t idx) {
  const uint64_t c = idx >> 2;
  const Philox4 r = philox4x32_10(Philox4{uint32_t(c), uint32_t(c >> 32), 0u, 0u},
                                  uint32_t(seed), uint32_t(seed >> 32));
  const uint32_t lane = uint32_t(idx & 3u);
  const uint32_t bits = lane == 0 ? r.x : lane == 1 ? r.y : lane == 2 ? r.z : r.w;
  return float(bits >> 8) * (1.0f / 16777216.0f);
}

// Whether attention dropout keeps probability (b, h, i, j) of a (B, HQ, LQ, LK) score tensor.
FF_HOST_DEVICE bool dropout_keep(uint64_t seed, int64_t b, int64_t h, int64_t i, int64_t j,
                                 int64_t hq, int64_t lq, int64_t lk, float dropout_p) {
  const uint64_t idx = ((uint64_t(b) * uint64_t(hq) + uint64_t(h)) * uint64_t(lq) + uint64_t(i)) *
                           uint64_t(lk) + uint64_t(j);
  return philox_uniform(seed, idx) >= dropout_p;
}

}  // namespace fusedformer
