// The seed formats of the signed-constant base weights, for host and device code alike.
//
// The specification is supsup_fast/seed_format.py (its module docstring); this header is its
// C++/CUDA transcription and is tested against it bit for bit. Torch-free and 32-bit integer
// arithmetic only, so CPU SIMD code, CUDA and Triton kernels all regenerate the same bits.
//
//   H = lowbias32, key = H(layer ^ H(seed))            (seed, layer taken mod 2^32)
//   version 1: weight (n, k) of an [N, K] view is + iff H(uint32(n*K + k) ^ key) & 1
//   version 2: sign word S(n, j) = H(R(n) ^ C(j)), R(n) = H(kr ^ n), C(j) = H(kc ^ j),
//              kr = H(key ^ kRowSalt), kc = H(key ^ kColumnSalt); weight (n, k) is + iff
//              bit k % 32 of S(n, k / 32) is set
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SUPSUP_SEED_HD __host__ __device__ inline
#else
#define SUPSUP_SEED_HD inline
#endif

namespace supsup_seed {

constexpr uint32_t kRowSalt = 0x243F6A88u;
constexpr uint32_t kColumnSalt = 0x85A308D3u;

// H: the lowbias32 finaliser.
SUPSUP_SEED_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// key = H(layer ^ H(seed)) on the low 32 bits of each (both versions).
SUPSUP_SEED_HD uint32_t layer_key(int64_t seed, int64_t layer) {
  return hash32(static_cast<uint32_t>(layer) ^ hash32(static_cast<uint32_t>(seed)));
}

// Version 1: the sign (true = +) of the weight at row-major flat index `idx` of the [N, K] view.
SUPSUP_SEED_HD bool v1_sign(uint64_t idx, uint32_t key) {
  return hash32(static_cast<uint32_t>(idx) ^ key) & 1u;
}

// Version 2's per-layer row and column keys.
struct V2Keys {
  uint32_t row, column;
};

SUPSUP_SEED_HD V2Keys v2_keys(int64_t seed, int64_t layer) {
  const uint32_t key = layer_key(seed, layer);
  return V2Keys{hash32(key ^ kRowSalt), hash32(key ^ kColumnSalt)};
}

SUPSUP_SEED_HD uint32_t v2_row(const V2Keys& keys, uint32_t n) {
  return hash32(keys.row ^ n);
}
SUPSUP_SEED_HD uint32_t v2_column(const V2Keys& keys, uint32_t j) {
  return hash32(keys.column ^ j);
}
// S(n, j) from R(n) and C(j): the signs of weights (n, 32j) .. (n, 32j + 31), bit 0 first.
SUPSUP_SEED_HD uint32_t v2_sign_word(uint32_t row_hash, uint32_t column_hash) {
  return hash32(row_hash ^ column_hash);
}
SUPSUP_SEED_HD uint32_t v2_sign_word(const V2Keys& keys, uint32_t n, uint32_t j) {
  return v2_sign_word(v2_row(keys, n), v2_column(keys, j));
}

}  // namespace supsup_seed
