// Packing, unpacking and applying one task's mask; the signed-constant base weight fill.
#include "cpu/bits.h"
#include "cpu/ops.h"

namespace supsup {

namespace {

// Rows of a [..., N, K] tensor: the product of all but the last dim (valid when K == 0 too).
int64_t leading_rows(const at::Tensor& t) {
  int64_t r = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) r *= t.size(d);
  return r;
}

constexpr int64_t kRowGrain = 64;

// Words of one row of k byte-sized flags (non-zero = set).
void pack_row_bytes(const uint8_t* src, int64_t k, uint32_t* dst) {
  const int64_t full = k / kWordBits;
  for (int64_t wi = 0; wi < full; ++wi) {
    const uint8_t* s = src + wi * kWordBits;
#if SUPSUP_AVX2
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s));
    const uint32_t zero = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, _mm256_setzero_si256())));
    dst[wi] = ~zero;
#else
    uint32_t w = 0;
    for (int i = 0; i < kWordBits; ++i) w |= static_cast<uint32_t>(s[i] != 0) << i;
    dst[wi] = w;
#endif
  }
  if (full * kWordBits < k) {
    uint32_t w = 0;
    for (int64_t i = full * kWordBits; i < k; ++i) w |= static_cast<uint32_t>(src[i] != 0) << (i - full * kWordBits);
    dst[full] = w;
  }
}

template <typename T>
void pack_row(const T* src, int64_t k, uint32_t* dst) {
  const int64_t nw = words_per_row(k);
  for (int64_t wi = 0; wi < nw; ++wi) {
    const int nb = bits_in_word(wi, k);
    const T* s = src + wi * kWordBits;
    uint32_t w = 0;
    for (int i = 0; i < nb; ++i) w |= static_cast<uint32_t>(s[i] != T(0)) << i;
    dst[wi] = w;
  }
}

#if SUPSUP_AVX2
template <>
void pack_row<float>(const float* src, int64_t k, uint32_t* dst) {
  const int64_t full = k / kWordBits;
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t wi = 0; wi < full; ++wi) {
    const float* s = src + wi * kWordBits;
    uint32_t w = 0;
    for (int q = 0; q < 4; ++q) {
      // NEQ_UQ: NaN counts as non-zero, as `masks != 0` does
      const __m256 ne = _mm256_cmp_ps(_mm256_loadu_ps(s + 8 * q), zero, _CMP_NEQ_UQ);
      w |= static_cast<uint32_t>(_mm256_movemask_ps(ne)) << (8 * q);
    }
    dst[wi] = w;
  }
  if (full * kWordBits < k) {
    uint32_t w = 0;
    for (int64_t i = full * kWordBits; i < k; ++i) w |= static_cast<uint32_t>(src[i] != 0.f) << (i - full * kWordBits);
    dst[full] = w;
  }
}
#endif

template <typename T>
void unpack_row(const uint32_t* words, int64_t k, T* dst) {
  const int64_t nw = words_per_row(k);
  for (int64_t wi = 0; wi < nw; ++wi) {
    const uint32_t word = words[wi];
    const int nb = bits_in_word(wi, k);
    T* d = dst + wi * kWordBits;
    for (int i = 0; i < nb; ++i) d[i] = static_cast<T>((word >> i) & 1u);
  }
}

}  // namespace

at::Tensor pack_masks(const at::Tensor& masks) {
  TORCH_CHECK(masks.dim() >= 2, "pack_masks: masks need at least 2 dims [..., N, K], got shape ", masks.sizes());
  TORCH_CHECK(masks.device().is_cpu(), "pack_masks: masks must be a CPU tensor, got ", masks.device());
  TORCH_CHECK(!masks.is_complex(), "pack_masks: masks must be bool, integer or real floating, got ",
              masks.scalar_type());
  const at::Tensor m = masks.contiguous();
  const int64_t k = m.size(-1), nw = words_per_row(k), rows = leading_rows(m);
  auto shape = m.sizes().vec();
  shape.back() = nw;
  at::Tensor out = at::empty(shape, m.options().dtype(at::kInt));
  if (rows == 0 || nw == 0) return out;
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const auto st = m.scalar_type();
  if (st == at::kBool || st == at::kByte || st == at::kChar) {
    const uint8_t* src = static_cast<const uint8_t*>(m.data_ptr());
    at::parallel_for(0, rows, kRowGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) pack_row_bytes(src + r * k, k, dst + r * nw);
    });
    return out;
  }
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, st, "pack_masks", [&] {
    const scalar_t* src = m.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kRowGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) pack_row<scalar_t>(src + r * k, k, dst + r * nw);
    });
  });
  return out;
}

at::Tensor unpack_masks(const at::Tensor& words, int64_t k, at::ScalarType dtype) {
  TORCH_CHECK(words.scalar_type() == at::kInt, "unpack_masks: words must be int32, got ", words.scalar_type());
  TORCH_CHECK(words.device().is_cpu(), "unpack_masks: words must be a CPU tensor, got ", words.device());
  TORCH_CHECK(words.dim() >= 2, "unpack_masks: words need at least 2 dims [..., N, W], got shape ", words.sizes());
  TORCH_CHECK(k >= 0, "unpack_masks: k must be >= 0, got ", k);
  TORCH_CHECK(words.size(-1) == words_per_row(k), "unpack_masks: ", words.size(-1), " words per row cannot hold k=", k,
              " bits (needs ", words_per_row(k), ")");
  const at::Tensor w = words.contiguous();
  const int64_t nw = w.size(-1), rows = leading_rows(w);
  auto shape = w.sizes().vec();
  shape.back() = k;
  at::Tensor out = at::empty(shape, w.options().dtype(dtype));
  if (rows == 0 || k == 0) return out;
  const uint32_t* src = word_ptr(w);
  if (dtype == at::kBool) {
    uint8_t* dst = static_cast<uint8_t*>(out.data_ptr());
    at::parallel_for(0, rows, kRowGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) unpack_row<uint8_t>(src + r * nw, k, dst + r * k);
    });
    return out;
  }
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "unpack_masks", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kRowGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) unpack_row<scalar_t>(src + r * nw, k, dst + r * k);
    });
  });
  return out;
}

at::Tensor apply_mask(const at::Tensor& weight, const at::Tensor& mask_words) {
  check_float(weight, "apply_mask", "weight");
  TORCH_CHECK(weight.dim() >= 1, "apply_mask: weight needs at least 1 dim [N, ...], got a scalar");
  const int64_t n = weight.size(0), k = n ? weight.numel() / n : 0;
  check_words(mask_words, n, k, 0, "apply_mask", "mask_words");
  at::Tensor out = at::empty(weight.sizes(), weight.options());
  apply_mask_into(weight, mask_words, out);
  return out;
}

void apply_mask_into(const at::Tensor& weight, const at::Tensor& mask_words, const at::Tensor& out) {
  const int64_t n = weight.size(0), k = n ? weight.numel() / n : 0;
  if (n == 0 || k == 0) return;
  const at::Tensor w = weight.contiguous(), mw = mask_words.contiguous();
  const uint32_t* bits = word_ptr(mw);
  const int64_t nw = mw.size(1);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "apply_mask", [&] {
    const scalar_t* src = w.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) mask_row<scalar_t>(src + r * k, bits + r * nw, k, dst + r * k);
    });
  });
}

void signed_constant_fill_(const at::Tensor& out, int64_t seed, int64_t layer, double scale) {
  check_float(out, "signed_constant_fill_", "out");
  TORCH_CHECK(out.is_contiguous(), "signed_constant_fill_: out must be contiguous");
  const uint32_t key = layer_key(seed, layer);
  const int64_t numel = out.numel();
  // reference.signed_constant builds the constant in float32, then casts to the dtype
  const float c = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "signed_constant_fill_", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    const scalar_t pos = static_cast<scalar_t>(c), neg = static_cast<scalar_t>(-c);
    at::parallel_for(0, numel, 1 << 14, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dst[i] = hash_sign(i, key) ? pos : neg;
    });
  });
}

}  // namespace supsup
