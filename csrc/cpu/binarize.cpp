// The binarisers on CPU: scores -> the packed words of a supermask.
//
// * threshold_words: M = [S >= 0], packed in one pass.
// * topk_words: M = 1 on the k largest |S| (ties at the k-th value in index order), packed.
//   A sample select: a fixed, evenly spaced sample of the keys brackets the k-th largest between
//   two sample keys L <= H; one parallel pass over the scores writes the bits of every key above H
//   and gathers the few keys in [L, H]; the k-th largest is found among those alone. When the
//   bracket misses (A > k or A + candidates < k), the full radix select (largest_k) answers.
// * largest_k: the full radix select on a flat tensor (bool mask), also the fallback above.
// Chunks of work are fixed (not per thread), so every result is independent of the thread count.
#include "cpu/bits.h"
#include "cpu/ops.h"

#include <cmath>
#include <vector>

namespace supsup {

namespace {

// Index of the bin holding the `need`-th largest key (counting from the top), and how many keys
// lie in the bins above it.
inline int pick_bin(const int64_t* hist, int bins, int64_t need, int64_t& above) {
  above = 0;
  for (int b = bins - 1; b > 0; --b) {
    if (above + hist[b] >= need) return b;
    above += hist[b];
  }
  return 0;
}

// |s| as an order-preserving key: the float's bits with the sign cleared (NaN above +inf).
inline uint32_t magnitude_key(const float* p) {
  uint32_t u;
  std::memcpy(&u, p, sizeof(u));
  return u & 0x7FFFFFFFu;
}

inline int bit_length(uint32_t v) {
  return v ? 32 - __builtin_clz(v) : 0;
}

void check_scores_2d(const at::Tensor& s, const char* op) {
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 2 && s.device().is_cpu(), op,
              ": scores must be a 2-D [N, K] float32 CPU tensor, got ", s.scalar_type(), " ", s.sizes(), " on ",
              s.device());
}

// Rows per parallel chunk: about 32K scores each.
int64_t rows_per_chunk(int64_t k) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(k, 1));
}

// Bits [0, nb) of one word set (the valid bits of a row's last word).
inline uint32_t low_bits(int nb) {
  return nb >= 32 ? 0xFFFFFFFFu : ((1u << nb) - 1u);
}

// The `need`-th largest of `keys` (need >= 1), all of which lie in [base, base + 2^span_bits): a
// radix select, up to 11 bits a level (fewer for few keys: a level's fixed cost is its bins). On
// return `need` is how many copies of the result rank within the `need` largest, and `copies` (if
// given) how many there are. Branch-free inner loops: which side of a bin a key falls on is a coin
// toss, and a mispredicted branch per key would cost more than the whole level. `keys` is consumed.
uint32_t radix_select(std::vector<uint32_t>& keys, uint32_t base, int span_bits, int64_t& need,
                      int64_t* copies = nullptr) {
  constexpr int kMaxBits = 11, kBins = 1 << kMaxBits;
  std::vector<int64_t> hist(kBins);
  std::vector<int32_t> sub;
  for (;;) {
    const size_t m = keys.size();
    const int bits = std::min(span_bits, std::clamp(bit_length(static_cast<uint32_t>(m)) - 3, 6, kMaxBits));
    const int shift = span_bits - bits, bins = 1 << bits;
    std::fill(hist.begin(), hist.begin() + bins, 0);
    if (m >= 16384) {
      // four interleaved counters: keys crowd into few bins, and one counter would serialise
      sub.assign(4 * static_cast<size_t>(bins), 0);
      size_t i = 0;
      for (; i + 4 <= m; i += 4)
        for (int j = 0; j < 4; ++j) ++sub[j * bins + ((keys[i + j] - base) >> shift)];
      for (; i < m; ++i) ++sub[(keys[i] - base) >> shift];
      for (int b = 0; b < bins; ++b) hist[b] = sub[b] + sub[bins + b] + sub[2 * bins + b] + sub[3 * bins + b];
    } else {
      for (const uint32_t key : keys) ++hist[(key - base) >> shift];
    }
    int64_t above = 0;
    const int b = pick_bin(hist.data(), bins, need, above);
    need -= above;
    base += static_cast<uint32_t>(b) << shift;
    if (shift == 0) {
      if (copies) *copies = hist[b];
      return base;
    }
    const uint32_t width = (1u << shift) - 1u;
    size_t kept = 0;
    for (const uint32_t key : keys) {  // unsigned wrap puts keys below `base` out of range too
      keys[kept] = key;
      kept += (key - base) <= width;
    }
    keys.resize(kept);
    span_bits = shift;
  }
}

}  // namespace

// Bool mask of the k largest entries (of |a| with `magnitude`) of a flat float32 tensor: a radix
// select on order-preserving uint32 keys. Pass 1 histograms the top 11 bits per fixed chunk; pass 2
// marks every key above the chosen bin and gathers the keys inside it; 11 + 10 more bits over
// those find the k-th key, and only the gathered keys are re-marked. Both full passes run chunks in
// parallel; ties at the k-th value are taken in index order.
at::Tensor largest_k(const at::Tensor& a, int64_t k, bool magnitude) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && a.dim() == 1 && a.device().is_cpu(),
              "largest_k: a must be a 1-D float32 CPU tensor, got ", a.scalar_type(), " ", a.sizes());
  const int64_t n = a.numel();
  TORCH_CHECK(k >= 0, "largest_k: k must be non-negative, got ", k);
  const at::Tensor x = a.contiguous();
  at::Tensor out = at::empty({n}, x.options().dtype(at::kBool));
  bool* o = out.data_ptr<bool>();
  if (k >= n || k == 0) {
    std::fill(o, o + n, k != 0);
    return out;
  }
  const float* p = x.data_ptr<float>();
  // |a| without a pass of its own: the sign bit is cleared as the keys are formed
  const uint32_t sign_mask = magnitude ? 0x7FFFFFFFu : 0xFFFFFFFFu;
  const auto key_at = [&](int64_t i) {
    uint32_t u;
    std::memcpy(&u, p + i, sizeof(u));
    u &= sign_mask;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  };
  constexpr int64_t kChunk = 1 << 15;
  constexpr int kBins = 2048;
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  // pass 1: the top 11 bits, one histogram per chunk (4 interleaved counters inside a chunk:
  // scores crowd into few bins, and one counter would serialise)
  std::vector<int32_t> chunk_hist(static_cast<size_t>(n_chunks * kBins), 0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<int32_t> h4(4 * kBins);
    for (int64_t c = c0; c < c1; ++c) {
      std::fill(h4.begin(), h4.end(), 0);
      const int64_t i0 = c * kChunk, i1 = std::min(n, i0 + kChunk);
      int64_t i = i0;
      for (; i + 4 <= i1; i += 4)
        for (int j = 0; j < 4; ++j) ++h4[j * kBins + (key_at(i + j) >> 21)];
      for (; i < i1; ++i) ++h4[key_at(i) >> 21];
      int32_t* h = chunk_hist.data() + c * kBins;
      for (int b = 0; b < kBins; ++b) h[b] = h4[b] + h4[kBins + b] + h4[2 * kBins + b] + h4[3 * kBins + b];
    }
  });
  std::vector<int64_t> hist(kBins, 0);
  for (int64_t c = 0; c < n_chunks; ++c)
    for (int b = 0; b < kBins; ++b) hist[b] += chunk_hist[c * kBins + b];
  int64_t above = 0;
  uint32_t prefix = static_cast<uint32_t>(pick_bin(hist.data(), kBins, k, above));
  int64_t need = k - above;
  // where each chunk's keys of that bin go (one slack slot per chunk for the branch-free gather)
  std::vector<int64_t> start(static_cast<size_t>(n_chunks + 1), 0);
  for (int64_t c = 0; c < n_chunks; ++c) start[c + 1] = start[c] + chunk_hist[c * kBins + prefix] + 1;
  std::vector<uint32_t> cand(static_cast<size_t>(start[n_chunks]));
  std::vector<int64_t> where(cand.size());
  // pass 2: mark the keys above the bin, gather the keys in it
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * kChunk, i1 = std::min(n, i0 + kChunk);
      int64_t pos = start[c];
      for (int64_t i = i0; i < i1; ++i) {  // branch-free: the bin is often a large, random subset
        const uint32_t key = key_at(i), top = key >> 21;
        o[i] = top > prefix;
        cand[pos] = key;
        where[pos] = i;
        pos += top == prefix;
      }
    }
  });
  // 11 and 10 more bits over the gathered keys only
  const auto each_candidate = [&](auto&& fn) {
    for (int64_t c = 0; c < n_chunks; ++c)
      for (int64_t j = start[c], e = start[c + 1] - 1; j < e; ++j) fn(j);
  };
  for (const int shift : {10, 0}) {
    const int width = shift ? 11 : 10;
    std::fill(hist.begin(), hist.end(), 0);
    each_candidate([&](int64_t j) {
      const uint32_t key = cand[j];
      if ((key >> (shift + width)) == prefix) ++hist[(key >> shift) & ((1u << width) - 1u)];
    });
    const int b = pick_bin(hist.data(), 1 << width, need, above);
    need -= above;
    prefix = (prefix << width) | static_cast<uint32_t>(b);
  }
  // the k-th largest key (keys order like the floats): the bin's keys above it are kept, and
  // `need` of its copies, in index order
  const uint32_t edge = prefix;
  each_candidate([&](int64_t j) {
    const bool keep = cand[j] > edge || (cand[j] == edge && need > 0);
    need -= cand[j] == edge && keep;
    o[where[j]] = keep;
  });
  return out;
}

// M = [S >= 0] packed: -0 is kept, NaN is not (as `scores >= 0`).
at::Tensor threshold_words(const at::Tensor& scores) {
  check_scores_2d(scores, "threshold_words");
  const at::Tensor s = scores.contiguous();
  const int64_t n = s.size(0), k = s.size(1), nw = words_per_row(k);
  at::Tensor out = at::empty({n, nw}, s.options().dtype(at::kInt));
  if (n == 0 || nw == 0) return out;
  const float* p = s.data_ptr<float>();
  uint32_t* o = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  at::parallel_for(0, n, rows_per_chunk(k), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = p + r * k;
      uint32_t* orow = o + r * nw;
      int64_t wi = 0;
#if SUPSUP_AVX2
      const __m256 zero = _mm256_setzero_ps();
      for (; (wi + 1) * kWordBits <= k; ++wi) {
        uint32_t w = 0;
        for (int q = 0; q < 4; ++q) {
          const __m256 ge = _mm256_cmp_ps(_mm256_loadu_ps(row + wi * kWordBits + 8 * q), zero, _CMP_GE_OQ);
          w |= static_cast<uint32_t>(_mm256_movemask_ps(ge)) << (8 * q);
        }
        orow[wi] = w;
      }
#endif
      for (; wi < nw; ++wi) {
        uint32_t w = 0;
        const int64_t c0 = wi * kWordBits, c1 = std::min(k, c0 + kWordBits);
        for (int64_t c = c0; c < c1; ++c) w |= static_cast<uint32_t>(row[c] >= 0.f) << (c - c0);
        orow[wi] = w;
      }
    }
  });
  return out;
}

namespace {

// Below this many scores there is no sample: every score is a candidate of the radix select.
constexpr int64_t kSampleSelectMin = 4096;
// The sample: evenly spaced runs of kSampleRun contiguous keys (one cache line each: a 16K sample
// costs ~1K memory accesses, not 16K). Its size balances selecting within the sample (~ s) against
// the candidates the bracket lets through (~ n / sqrt(s)): ~2 n^(2/3), at most 16K and n / 4.
constexpr int64_t kMaxSampleBlocks = 1024, kSampleRun = 16;

int64_t sample_blocks(int64_t n) {
  const double want = 2.0 * std::cbrt(static_cast<double>(n) * static_cast<double>(n)) / kSampleRun;
  return std::max<int64_t>(1, std::min({kMaxSampleBlocks, n / (4 * kSampleRun), static_cast<int64_t>(want)}));
}
// The bracket is the sample rank of the k-th key +- (kSigmas standard deviations + 8 ranks).
constexpr double kSigmas = 6.0;

// One row chunk's candidates: keys in the bracket, and their bit positions relative to the chunk's
// first row (r - r0) * 32W + c, in index order.
struct Candidates {
  std::vector<uint32_t> key;
  std::vector<int32_t> bit;
  int64_t size = 0;
  void reserve_more(int64_t extra) {
    if (size + extra <= static_cast<int64_t>(key.size())) return;
    const size_t cap = static_cast<size_t>(std::max<int64_t>(2 * static_cast<int64_t>(key.size()), size + extra));
    key.resize(cap);
    bit.resize(cap);
  }
};

#if SUPSUP_AVX2
// lanes of each 8-bit mask, in order: the shuffle that packs a vector's selected lanes to the front
struct CompactTable {
  alignas(32) int32_t lanes[256][8];
  CompactTable() {
    for (int m = 0; m < 256; ++m) {
      int j = 0;
      for (int l = 0; l < 8; ++l)
        if (m >> l & 1) lanes[m][j++] = l;
      for (; j < 8; ++j) lanes[m][j] = 0;
    }
  }
};
const CompactTable kCompact;
#endif

// One 32-wide block of a row: returns the bits of the keys above `hi`; keys in [lo, hi] are
// appended to `cand` (capacity for nb more is the caller's).
inline uint32_t split_block(const float* src, int nb, int32_t bit0, uint32_t lo, uint32_t hi, Candidates& cand) {
  uint32_t above = 0;
#if SUPSUP_AVX2
  if (nb == kWordBits) {
    // keys have the sign bit clear, so signed compares order them (hi <= 0x7FFFFFFF, lo >= 0);
    // the keys inside the bracket are packed to the buffer's end branch-free
    const __m256i clear = _mm256_set1_epi32(0x7FFFFFFF);
    const __m256i hv = _mm256_set1_epi32(static_cast<int32_t>(hi));
    const __m256i lv = _mm256_set1_epi32(static_cast<int32_t>(lo) - 1);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    uint32_t* kd = cand.key.data();
    int32_t* bd = cand.bit.data();
    int64_t pos = cand.size;
    for (int q = 0; q < 4; ++q) {
      const __m256i key = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 8 * q)), clear);
      const uint32_t gt = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, hv))));
      const uint32_t in =
          static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, lv)))) & ~gt;
      above |= gt << (8 * q);
      const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompact.lanes[in]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(kd + pos), _mm256_permutevar8x32_epi32(key, perm));
      const __m256i bits = _mm256_add_epi32(lane, _mm256_set1_epi32(bit0 + 8 * q));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(bd + pos), _mm256_permutevar8x32_epi32(bits, perm));
      pos += __builtin_popcount(in);
    }
    cand.size = pos;
    return above;
  }
#endif
  for (int j = 0; j < nb; ++j) {
    const uint32_t key = magnitude_key(src + j);
    const bool in = key >= lo && key <= hi;
    cand.key[cand.size] = key;
    cand.bit[cand.size] = bit0 + j;
    cand.size += in;
    above |= static_cast<uint32_t>(key > hi) << j;
  }
  return above;
}

}  // namespace

// M = 1 on the k largest |S| of a [N, K] float32 tensor (ties in row-major index order), packed.
at::Tensor topk_words(const at::Tensor& scores, int64_t k) {
  check_scores_2d(scores, "topk_words");
  TORCH_CHECK(k >= 0, "topk_words: k must be non-negative, got ", k);
  // candidates record their bit within a row chunk as int32
  TORCH_CHECK(scores.size(1) < (int64_t{1} << 30), "topk_words: rows of ", scores.size(1), " scores are too long");
  const at::Tensor s = scores.contiguous();
  const int64_t rows = s.size(0), cols = s.size(1), nw = words_per_row(cols), n = rows * cols;
  at::Tensor out = at::zeros({rows, nw}, s.options().dtype(at::kInt));
  if (n == 0 || k == 0) return out;
  uint32_t* o = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  if (k >= n) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t wi = 0; wi < nw; ++wi)
        o[r * nw + wi] = low_bits(static_cast<int>(std::min<int64_t>(kWordBits, cols - wi * kWordBits)));
    return out;
  }
  const float* p = s.data_ptr<float>();
  const auto full_select = [&] { return pack_masks(largest_k(s.reshape({-1}), k, true).view({rows, cols})); };
  // 1. bracket the k-th largest key between two keys of an evenly spaced sample; with few keys
  // there is no bracket and every key is a candidate
  uint32_t hi = 0x7FFFFFFFu, lo = 0;  // no bound: no key lies above 0x7FFFFFFF or below 0
  double expect = 1.0;                // expected fraction of the keys inside the bracket
  if (n >= kSampleSelectMin) {
    const int64_t n_blocks = sample_blocks(n), kSample = n_blocks * kSampleRun;
    std::vector<uint32_t> sample(kSample);
    const int64_t gap = n / n_blocks;  // >= 4 * kSampleRun
    for (int64_t b = 0; b < n_blocks; ++b) {
      if (b + 16 < n_blocks) __builtin_prefetch(p + (b + 16) * gap);  // ~1K memory latencies otherwise
      for (int64_t j = 0; j < kSampleRun; ++j) sample[b * kSampleRun + j] = magnitude_key(p + b * gap + j);
    }
    const double frac = static_cast<double>(k) / static_cast<double>(n);
    const double rank = frac * kSample;  // the k-th key's expected rank in the sample, from the top
    const double sigma = std::sqrt(static_cast<double>(kSample) * frac * (1.0 - frac));
    const int64_t spread = static_cast<int64_t>(std::ceil(kSigmas * sigma)) + 8;
    const int64_t r_hi = static_cast<int64_t>(rank) - spread, r_lo = static_cast<int64_t>(rank) + spread;
    if (r_hi >= 0) {
      std::vector<uint32_t> work(sample);
      int64_t need_hi = r_hi + 1;
      hi = radix_select(work, 0, 31, need_hi);
    }
    if (r_lo < kSample) {
      int64_t need_lo = r_lo + 1;
      lo = radix_select(sample, 0, 31, need_lo);
    }
    expect = std::min(1.0, 2.0 * spread / kSample);
  }

  // 2. one pass: bits above the bracket written, keys inside it gathered, per fixed row chunk
  const int64_t rpc = rows_per_chunk(cols), n_chunks = (rows + rpc - 1) / rpc;
  const int64_t row_bits = nw * kWordBits;
  std::vector<Candidates> cand(n_chunks);
  std::vector<int64_t> above_count(n_chunks, 0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      Candidates& mine = cand[c];
      const int64_t r0 = c * rpc, r1 = std::min(rows, r0 + rpc);
      mine.reserve_more(static_cast<int64_t>(1.5 * expect * (r1 - r0) * cols) + row_bits);
      int64_t count = 0;
      for (int64_t r = r0; r < r1; ++r) {
        mine.reserve_more(row_bits);  // a row appends at most its width (+ the vector stores' slack)
        const int32_t bit_row = static_cast<int32_t>((r - r0) * row_bits);
        for (int64_t wi = 0; wi < nw; ++wi) {
          const int nb = static_cast<int>(std::min<int64_t>(kWordBits, cols - wi * kWordBits));
          const uint32_t w = split_block(p + r * cols + wi * kWordBits, nb,
                                         bit_row + static_cast<int32_t>(wi * kWordBits), lo, hi, mine);
          o[r * nw + wi] = w;
          count += __builtin_popcount(w);
        }
      }
      above_count[c] = count;
    }
  });
  int64_t above = 0, n_cand = 0;
  for (int64_t c = 0; c < n_chunks; ++c) {
    above += above_count[c];
    n_cand += cand[c].size;
  }
  if (above > k || above + n_cand < k) return full_select();  // the bracket missed the k-th key

  // 3. the k-th largest key among the candidates: a radix select over [lo, hi]
  int64_t need = k - above;
  if (need == 0) return out;
  std::vector<uint32_t> keys;
  keys.reserve(static_cast<size_t>(n_cand));
  for (const auto& cc : cand) keys.insert(keys.end(), cc.key.begin(), cc.key.begin() + cc.size);
  int64_t copies = 0;  // keys equal to the k-th
  const uint32_t edge = radix_select(keys, lo, bit_length(hi - lo), need, &copies);
  // 4. mark the candidates above the k-th key, and `need` of its copies in index order; when every
  // copy is taken (the usual case: ties are rare among float scores) chunks mark in parallel
  const auto mark = [&](int64_t c, bool all_ties, int64_t& ties_left) {
    const Candidates& cc = cand[c];
    uint32_t* oc = o + c * rpc * nw;
    for (int64_t j = 0; j < cc.size; ++j) {
      const uint32_t key = cc.key[j];
      const bool tie = key == edge;
      const bool keep = (key > edge) | (tie & (all_ties | (ties_left > 0)));
      ties_left -= tie & keep;
      oc[cc.bit[j] >> 5] |= static_cast<uint32_t>(keep) << (cc.bit[j] & 31);
    }
  };
  if (need == copies) {
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      int64_t unused = 0;
      for (int64_t c = c0; c < c1; ++c) mark(c, true, unused);
    });
  } else {
    for (int64_t c = 0; c < n_chunks; ++c) mark(c, false, need);
  }
  return out;
}

}  // namespace supsup
