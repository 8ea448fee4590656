// Many tasks at once: the superposition W * sum_t alpha_t M_t and the dots <v_r, M_t>.
//
// superpose: tasks sharing one alpha value (the common case: uniform alpha over the surviving
// tasks) are counted with a bit-sliced carry-save counter (Harley-Seal: 16 masks per step into
// 1/2/4/8/16-weight bit planes), then the counts are scaled once; lonely alpha values are added
// task by task. Work is blocked over word columns so that planes and accumulators stay in L1.
//
// mask_dots: the "Four Russians" trick. With AVX2 (fp32/fp16/bf16 v) eight tasks ride in the
// eight lanes of a vector: for each pair of weights the 4 subset sums of v form an in-lane table
// and one vpermilps looks up 2 mask bits of 8 tasks at once (16 lookups per word, ~1.5 vector
// instructions per mask byte instead of ~3 for bit-to-lane expansion or ~4 for a scalar 256-entry
// lookup). Work is blocked over words so a block's tables and the bank's block of every task stay
// in L2 while the rows of v and the task groups stream through. With AVX-512F (chosen at run
// time, the masked GEMM's switch) sixteen tasks ride in a zmm and each group of 4 weights has a
// 16-entry table (its subset sums, one zmm): vpermps reads only the low 4 bits of each lane, so
// group g's index is the task words shifted by 4g, no mask; 8 (shift, vpermps, add) per word
// look up 32 bits of 16 tasks, against 16 per word for 8 tasks. The shifts and permutes share the
// shuffle pipes, the adds run as FMAs (1 x + s, exact) beside them (bench/lookup_ceiling.cpp times
// this mix alone), and up to 4 rows share the shifts; one row keeps the transposed words in
// registers instead. One row's blocks are 1024 words (a page of each task, 512 KB of tables); each
// step prefetches into L2 the line the next task group will need at that step, so the bank's stream
// rides along the lookups. Xeon (480 MB L3), 2 threads, T = 2500, one row of v, bank in DRAM: a
// 1024x784 layer in 17 ms (15 GB/s of bank; 25 ms with 256-word blocks and each group's lines
// prefetched at once), of which the lookups alone (bank in L1) take 11 ms and the bank's stream
// alone 15. Each (row, task) is summed by one thread in a fixed order, so results do not depend on
// the thread count. Elsewhere (fp64, no AVX2) 256-entry tables per byte serve; few tasks make
// tables not worth building: a direct bit loop serves.

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers seed some intrinsics with an "undefined" vector, which its own
// -Wuninitialized then reports after inlining (as in masked_gemm.cpp)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "cpu/avx512.h"
#include "cpu/bits.h"
#include "cpu/masked_gemm.h"
#include "cpu/ops.h"

#include <cmath>
#include <cstdlib>
#include <memory>
#include <type_traits>
#include <vector>

namespace supsup {

namespace {

// ------------------------------------------------------------------------------------------
// superpose
// ------------------------------------------------------------------------------------------
typedef uint32_t v8u __attribute__((vector_size(32)));

constexpr int64_t kBlockWords = 128;  // words per block: 16 KB of fp32 accumulators
constexpr int64_t kBlockVecs = kBlockWords / 8;
constexpr size_t kCsaMinTasks = 3;  // from 3 equal alphas on, counting beats per-task adds

alignas(64) const uint32_t kZeroWords[kBlockWords] = {};

inline v8u load8(const uint32_t* p, int64_t cnt) {
  v8u v;
  if (cnt >= 8) {
    std::memcpy(&v, p, sizeof(v));  // constant size: one unaligned vector load
  } else {
    v = v8u{0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < cnt; ++i) v[i] = p[i];
  }
  return v;
}

// carry-save adder: l = a ^ b ^ c (sum bit), h = majority(a, b, c) (carry bit)
inline void csa(v8u& h, v8u& l, v8u a, v8u b, v8u c) {
  const v8u u = a ^ b;
  h = (a & b) | (u & c);
  l = u ^ c;
}

struct Group {
  double alpha;
  std::vector<int64_t> tasks;
};

// Tasks with non-zero alpha, grouped by their value in the accumulation type.
template <typename A>
std::vector<Group> alpha_groups(const at::Tensor& alpha) {
  const at::Tensor a = alpha.to(at::kDouble).contiguous();
  const double* ap = a.data_ptr<double>();
  std::vector<std::pair<A, int64_t>> nz;
  std::vector<Group> groups;
  for (int64_t t = 0; t < a.numel(); ++t) {
    if (ap[t] == 0.0) continue;
    const A v = static_cast<A>(ap[t]);
    if (std::isnan(v))
      groups.push_back({static_cast<double>(v), {t}});  // NaN equals nothing
    else
      nz.emplace_back(v, t);
  }
  std::stable_sort(nz.begin(), nz.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
  for (size_t i = 0; i < nz.size();) {
    size_t e = i;
    Group g{static_cast<double>(nz[i].first), {}};
    while (e < nz.size() && nz[e].first == nz[i].first) g.tasks.push_back(nz[e++].second);
    groups.push_back(std::move(g));
    i = e;
  }
  return groups;
}

// acc[jj * 32 + i] += a * (number of tasks in `g` whose bit i of word j0 + jj is set)
template <typename A>
void count_group(const uint32_t* bank, int64_t task_words, const Group& g, int64_t j0, int64_t bw, A a, A* acc,
                 std::vector<v8u>& planes) {
  const int64_t nv = (bw + 7) / 8;
  const size_t n_tasks = g.tasks.size();
  int nh = 0;  // planes for the count of 16s
  for (size_t c = n_tasks / 16; c; c >>= 1) ++nh;
  const int np = 4 + nh;
  planes.assign(static_cast<size_t>(np) * kBlockVecs, v8u{0, 0, 0, 0, 0, 0, 0, 0});
  v8u* ones = planes.data();
  v8u* twos = ones + kBlockVecs;
  v8u* fours = twos + kBlockVecs;
  v8u* eights = fours + kBlockVecs;
  v8u* hi = eights + kBlockVecs;
  for (size_t s = 0; s < n_tasks; s += 16) {
    const uint32_t* d[16];
    for (size_t i = 0; i < 16; ++i) d[i] = s + i < n_tasks ? bank + g.tasks[s + i] * task_words + j0 : kZeroWords;
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t o = v * 8, cnt = bw - o;
      v8u x[16];
      for (int i = 0; i < 16; ++i) x[i] = load8(d[i] + o, cnt);
      v8u on = ones[v], tw = twos[v], fo = fours[v], ei = eights[v];
      v8u twA, twB, foA, foB, eiA, eiB, sixteens;
      csa(twA, on, on, x[0], x[1]);
      csa(twB, on, on, x[2], x[3]);
      csa(foA, tw, tw, twA, twB);
      csa(twA, on, on, x[4], x[5]);
      csa(twB, on, on, x[6], x[7]);
      csa(foB, tw, tw, twA, twB);
      csa(eiA, fo, fo, foA, foB);
      csa(twA, on, on, x[8], x[9]);
      csa(twB, on, on, x[10], x[11]);
      csa(foA, tw, tw, twA, twB);
      csa(twA, on, on, x[12], x[13]);
      csa(twB, on, on, x[14], x[15]);
      csa(foB, tw, tw, twA, twB);
      csa(eiB, fo, fo, foA, foB);
      csa(sixteens, ei, ei, eiA, eiB);
      ones[v] = on, twos[v] = tw, fours[v] = fo, eights[v] = ei;
      v8u carry = sixteens;
      for (int b = 0; b < nh; ++b) {
        v8u& p = hi[b * kBlockVecs + v];
        const v8u c2 = p & carry;
        p ^= carry;
        carry = c2;
      }
    }
  }
  // counts from the planes: plane b has weight 2^b (ones, twos, fours, eights, then 16, 32, ...)
  const uint32_t* pw = reinterpret_cast<const uint32_t*>(planes.data());
  const int64_t plane_words = kBlockVecs * 8;
  for (int64_t jj = 0; jj < bw; ++jj) {
    int32_t cnt[kWordBits] = {};
    for (int b = 0; b < np; ++b) {
      const uint32_t p = pw[b * plane_words + jj];
      for (int i = 0; i < kWordBits; ++i) cnt[i] += static_cast<int32_t>(((p >> i) & 1u) << b);
    }
    A* ab = acc + jj * kWordBits;
    for (int i = 0; i < kWordBits; ++i) ab[i] += a * static_cast<A>(cnt[i]);
  }
}

template <typename A>
void add_task(const uint32_t* words, int64_t bw, A a, A* acc) {
  for (int64_t jj = 0; jj < bw; ++jj) {
    const uint32_t word = words[jj];
    A* ab = acc + jj * kWordBits;
    for (int i = 0; i < kWordBits; ++i) ab[i] += ((word >> i) & 1u) ? a : A(0);
  }
}

// ------------------------------------------------------------------------------------------
// mask_dots
// ------------------------------------------------------------------------------------------
constexpr int64_t kTileWords = 8;  // 32 bytes of every task per tile: 32 KB of fp32 tables
constexpr int64_t kTileGroups = kTileWords * 4;
constexpr int64_t kTableMinTasks = 48;  // below this, building 256-entry tables does not pay
constexpr int64_t kTaskChunk = 256;     // tasks per pass over a span's tiles
constexpr int64_t kSpanTiles = 64;      // tiles per independently summed span

// Sum of v over the set bits of bw words (v padded to 32 values per word).
template <typename A>
inline A dot_bits(const A* v, const uint32_t* words, int64_t bw) {
  A s = 0;
  for (int64_t jj = 0; jj < bw; ++jj) {
    const uint32_t word = words[jj];
    for (int i = 0; i < kWordBits; ++i) s += ((word >> i) & 1u) ? v[jj * kWordBits + i] : A(0);
  }
  return s;
}

// Word jj of a block starting at flat word j0 of a task: its first weight in v's row-major [N, K]
// and how many of its bits are weights (the last word of a row may be partial).
inline void block_offsets(int64_t j0, int64_t bw, int64_t nw, int64_t k, int64_t* off, int* nbits) {
  for (int64_t jj = 0; jj < bw; ++jj) {
    const int64_t j = j0 + jj, row = j / nw, wi = j % nw;
    off[jj] = row * k + wi * kWordBits;
    nbits[jj] = bits_in_word(wi, k);
  }
}

#if SUPSUP_AVX2 || SUPSUP_AVX512_TARGET
// Block j0 of the G tasks of group g; tasks past t_count read zeros.
template <int G>
inline void group_words(const uint32_t* bits, int64_t task_words, int64_t t_count, int64_t g, int64_t j0,
                        const uint32_t* zeros, const uint32_t** p) {
  for (int i = 0; i < G; ++i) {
    const int64_t t = g * G + i;
    p[i] = t < t_count ? bits + t * task_words + j0 : zeros;
  }
}

// Block j0 (bw words) of the G tasks of group g into L1 (Hint = _MM_HINT_T0) or L2 (_MM_HINT_T1), one
// prefetch per 64-byte line.
template <int G, decltype(_MM_HINT_T0) Hint = _MM_HINT_T0>
inline void prefetch_group(const uint32_t* bits, int64_t task_words, int64_t t_count, int64_t g, int64_t j0,
                           int64_t bw) {
  for (int i = 0; i < G; ++i) {
    const int64_t t = g * G + i;
    if (t >= t_count) break;
    const char* line = reinterpret_cast<const char*>(bits + t * task_words + j0);
    for (int64_t o = 0; o < bw; o += 16) _mm_prefetch(line + 4 * o, Hint);
  }
}
#endif

#if SUPSUP_AVX2
template <>
inline float dot_bits<float>(const float* v, const uint32_t* words, int64_t bw) {
  const BitLanes L;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t jj = 0; jj < bw; ++jj) {
    const __m256i wv = _mm256_set1_epi32(static_cast<int>(words[jj]));
    const float* vp = v + jj * kWordBits;
    acc0 = _mm256_add_ps(acc0, masked8(_mm256_loadu_ps(vp), L.sel(wv, 0)));
    acc1 = _mm256_add_ps(acc1, masked8(_mm256_loadu_ps(vp + 8), L.sel(wv, 1)));
    acc0 = _mm256_add_ps(acc0, masked8(_mm256_loadu_ps(vp + 16), L.sel(wv, 2)));
    acc1 = _mm256_add_ps(acc1, masked8(_mm256_loadu_ps(vp + 24), L.sel(wv, 3)));
  }
  return hsum(_mm256_add_ps(acc0, acc1));
}

constexpr int64_t kLaneBlockWords = 128;  // words per block: 64 KB of tables, 512 B of each task
constexpr int64_t kLaneFlushWords = 16;   // fp32 partial sums go to fp64 this often
constexpr int64_t kLaneMinTasks = 16;     // below this the tables (16 per word and row) do not pay
constexpr int64_t kLanePrefetch = 2;      // task groups ahead

// r[i][j] -> r[j][i] for 8 vectors of 8 32-bit lanes.
inline void transpose8(__m256i* r) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
  }
}

// The 16 in-lane tables of one word of v: table g is {0, a, b, a + b} in both 128-bit lanes for
// (a, b) = v[2g], v[2g + 1]; vpermilps reads the low 2 bits of each lane's index.
template <typename T>
inline void lane_tables(const T* src, int nb, float* tab) {
  alignas(32) float x[kWordBits];
  for (int i = 0; i < nb; ++i) x[i] = static_cast<float>(src[i]);
  for (int i = nb; i < kWordBits; ++i) x[i] = 0.f;
  for (int g = 0; g < 16; ++g) {
    const float a = x[2 * g], b = x[2 * g + 1];
    _mm256_store_ps(tab + 8 * g, _mm256_setr_ps(0.f, a, b, a + b, 0.f, a, b, a + b));
  }
}

// out[r, t] = <v_r, M_t> for fp32-accumulated v, eight tasks per vector.
template <typename T>
void mask_dots_lanes(const T* vp, const uint32_t* bits, int64_t r_count, int64_t t_count, int64_t n, int64_t k,
                     double* total) {
  const int64_t nw = words_per_row(k), task_words = n * nw;
  const int64_t groups = (t_count + 7) / 8, items = r_count * groups;
  std::vector<double> acc(static_cast<size_t>(items * 8), 0.0);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(1, (items + threads - 1) / threads);
  at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
    alignas(32) float tab[kLaneBlockWords * 16 * 8];
    alignas(64) static const uint32_t zeros[kLaneBlockWords] = {};
    const int64_t r0 = i0 / groups, r1 = (i1 - 1) / groups + 1;
    int64_t off[kLaneBlockWords];
    int nbits[kLaneBlockWords];
    for (int64_t j0 = 0; j0 < task_words; j0 += kLaneBlockWords) {
      const int64_t bw = std::min(kLaneBlockWords, task_words - j0);
      block_offsets(j0, bw, nw, k, off, nbits);
      for (int64_t r = r0; r < r1; ++r) {
        const T* vr = vp + r * n * k;
        for (int64_t jj = 0; jj < bw; ++jj) lane_tables(vr + off[jj], nbits[jj], tab + jj * 128);
        const int64_t g0 = std::max(i0, r * groups) - r * groups, g1 = std::min(i1, (r + 1) * groups) - r * groups;
        for (int64_t g = g0; g < g1; ++g) {
          const uint32_t* p[8];
          group_words<8>(bits, task_words, t_count, g, j0, zeros, p);
          if (g + kLanePrefetch < g1) prefetch_group<8>(bits, task_words, t_count, g + kLanePrefetch, j0, bw);
          __m256d d0 = _mm256_setzero_pd(), d1 = _mm256_setzero_pd();
          const float* tb = tab;  // advanced by SUPSUP_WORD
          for (int64_t s0 = 0; s0 < bw; s0 += kLaneFlushWords) {
            const int64_t s1 = std::min(bw, s0 + kLaneFlushWords);
            __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
#define SUPSUP_LOOKUP(q) \
  _mm256_permutevar_ps(_mm256_load_ps(tb + 8 * (q)), (q) == 0 ? w : _mm256_srli_epi32(w, 2 * (q)))
#define SUPSUP_WORD(wv)                        \
  do {                                         \
    const __m256i w = (wv);                    \
    c0 = _mm256_add_ps(c0, SUPSUP_LOOKUP(0));  \
    c1 = _mm256_add_ps(c1, SUPSUP_LOOKUP(1));  \
    c2 = _mm256_add_ps(c2, SUPSUP_LOOKUP(2));  \
    c3 = _mm256_add_ps(c3, SUPSUP_LOOKUP(3));  \
    c0 = _mm256_add_ps(c0, SUPSUP_LOOKUP(4));  \
    c1 = _mm256_add_ps(c1, SUPSUP_LOOKUP(5));  \
    c2 = _mm256_add_ps(c2, SUPSUP_LOOKUP(6));  \
    c3 = _mm256_add_ps(c3, SUPSUP_LOOKUP(7));  \
    c0 = _mm256_add_ps(c0, SUPSUP_LOOKUP(8));  \
    c1 = _mm256_add_ps(c1, SUPSUP_LOOKUP(9));  \
    c2 = _mm256_add_ps(c2, SUPSUP_LOOKUP(10)); \
    c3 = _mm256_add_ps(c3, SUPSUP_LOOKUP(11)); \
    c0 = _mm256_add_ps(c0, SUPSUP_LOOKUP(12)); \
    c1 = _mm256_add_ps(c1, SUPSUP_LOOKUP(13)); \
    c2 = _mm256_add_ps(c2, SUPSUP_LOOKUP(14)); \
    c3 = _mm256_add_ps(c3, SUPSUP_LOOKUP(15)); \
    tb += 128;                                 \
  } while (0)
            int64_t jj = s0;
            // 8 words of 8 tasks at a time: 8 loads and an 8x8 transpose put word j of every task in one vector
            for (; jj + 8 <= s1; jj += 8) {
              __m256i r[8];
              for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p[i] + jj));
              transpose8(r);
              for (int i = 0; i < 8; ++i) SUPSUP_WORD(r[i]);
            }
            for (; jj < s1; ++jj)
              SUPSUP_WORD(_mm256_setr_epi32(static_cast<int>(p[0][jj]), static_cast<int>(p[1][jj]),
                                            static_cast<int>(p[2][jj]), static_cast<int>(p[3][jj]),
                                            static_cast<int>(p[4][jj]), static_cast<int>(p[5][jj]),
                                            static_cast<int>(p[6][jj]), static_cast<int>(p[7][jj])));
#undef SUPSUP_WORD
#undef SUPSUP_LOOKUP
            const __m256 c = _mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3));
            d0 = _mm256_add_pd(d0, _mm256_cvtps_pd(_mm256_castps256_ps128(c)));
            d1 = _mm256_add_pd(d1, _mm256_cvtps_pd(_mm256_extractf128_ps(c, 1)));
          }
          double* a = acc.data() + (r * groups + g) * 8;
          _mm256_storeu_pd(a, _mm256_add_pd(_mm256_loadu_pd(a), d0));
          _mm256_storeu_pd(a + 4, _mm256_add_pd(_mm256_loadu_pd(a + 4), d1));
        }
      }
    }
  });
  for (int64_t r = 0; r < r_count; ++r)
    for (int64_t t = 0; t < t_count; ++t) total[r * t_count + t] = acc[(r * groups + t / 8) * 8 + t % 8];
}

constexpr int64_t kRowTile = 4, kTaskTile = 3;  // 12 accumulators in registers
constexpr int64_t kRowsBlockWords = 16;         // words per block: 2 KB of each row of v
// Few tasks and several rows: lane masks shared by a tile of rows beat building tables per row
// (measured crossover near 64 tasks at 64-128 rows).
constexpr int64_t kRowsMinRows = 3, kRowsMaxTasks = 64;

// out[r, t] = <v_r, M_t> for many rows: each task's bits become lane masks once per 8 weights
// and serve a tile of rows (an AND and an add per row), like a GEMM micro-kernel with v's
// block (fp32, zero-padded per word) in L1/L2.
template <typename T>
void mask_dots_rows(const T* vp, const uint32_t* bits, int64_t r_count, int64_t t_count, int64_t n, int64_t k,
                    double* total) {
  const int64_t nw = words_per_row(k), task_words = n * nw;
  const int64_t rtiles = (r_count + kRowTile - 1) / kRowTile, ttiles = (t_count + kTaskTile - 1) / kTaskTile;
  const int64_t items = rtiles * ttiles;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(1, (items + threads - 1) / threads);
  constexpr int64_t stride = kRowsBlockWords * kWordBits;  // floats per row of a v block
  at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
    const int64_t rt0 = i0 / ttiles, rt1 = (i1 - 1) / ttiles + 1;
    std::vector<float> vb(static_cast<size_t>((rt1 - rt0) * kRowTile * stride));
    alignas(64) static const uint32_t zeros[kRowsBlockWords] = {};
    const __m256i sh0 = shift_for(0), sh1 = shift_for(1), sh2 = shift_for(2), sh3 = shift_for(3);
    for (int64_t j0 = 0; j0 < task_words; j0 += kRowsBlockWords) {
      const int64_t bw = std::min(kRowsBlockWords, task_words - j0);
      int64_t off[kRowsBlockWords];
      int nbits[kRowsBlockWords];
      block_offsets(j0, bw, nw, k, off, nbits);
      for (int64_t rr = 0; rr < (rt1 - rt0) * kRowTile; ++rr) {
        const int64_t r = rt0 * kRowTile + rr;
        float* dst = vb.data() + rr * stride;
        if (r >= r_count) {
          std::fill(dst, dst + stride, 0.f);
          continue;
        }
        for (int64_t jj = 0; jj < bw; ++jj, dst += kWordBits) {
          const T* src = vp + r * n * k + off[jj];
          const int nb = nbits[jj];
          if (nb == kWordBits) {
            for (int i = 0; i < kWordBits; ++i) dst[i] = static_cast<float>(src[i]);
          } else {
            for (int i = 0; i < nb; ++i) dst[i] = static_cast<float>(src[i]);
            for (int i = nb; i < kWordBits; ++i) dst[i] = 0.f;
          }
        }
      }
      for (int64_t item = i0; item < i1; ++item) {
        const int64_t rt = item / ttiles, tt = item % ttiles;
        const float* v0 = vb.data() + (rt - rt0) * kRowTile * stride;
        const uint32_t* p[kTaskTile];
        for (int i = 0; i < kTaskTile; ++i) {
          const int64_t t = tt * kTaskTile + i;
          p[i] = t < t_count ? bits + t * task_words + j0 : zeros;
        }
        __m256 a[kRowTile][kTaskTile];
        for (auto& ar : a)
          for (auto& x : ar) x = _mm256_setzero_ps();
        for (int64_t jj = 0; jj < bw; ++jj) {
          const float* vj = v0 + jj * kWordBits;
          for (int q = 0; q < 4; ++q) {
            const __m256i sh = q == 0 ? sh0 : q == 1 ? sh1 : q == 2 ? sh2 : sh3;
            __m256 sel[kTaskTile];
            for (int i = 0; i < kTaskTile; ++i)
              sel[i] = _mm256_castsi256_ps(
                  _mm256_srai_epi32(_mm256_sllv_epi32(_mm256_set1_epi32(static_cast<int>(p[i][jj])), sh), 31));
            for (int r = 0; r < kRowTile; ++r) {
              const __m256 x = _mm256_loadu_ps(vj + r * stride + 8 * q);
              for (int i = 0; i < kTaskTile; ++i) a[r][i] = _mm256_add_ps(a[r][i], _mm256_and_ps(x, sel[i]));
            }
          }
        }
        for (int r = 0; r < kRowTile; ++r) {
          const int64_t rg = rt * kRowTile + r;
          if (rg >= r_count) break;
          for (int i = 0; i < kTaskTile; ++i) {
            const int64_t t = tt * kTaskTile + i;
            if (t < t_count) total[rg * t_count + t] += static_cast<double>(hsum(a[r][i]));
          }
        }
      }
    }
  });
}
#endif

#if SUPSUP_AVX512_TARGET
// ---- AVX-512: sixteen tasks per vector, 4 weights per lookup ----
constexpr int64_t kWideBlockWords = 128;         // words per block: 64 KB of tables per row, 512 B of each task
constexpr int64_t kWideOneRowBlockWords = 1024;  // one row: 512 KB of tables, 4 KB (a page) of each task per block
constexpr int64_t kWideStepWords = 16;           // one 16x16 transpose of task words; fp32 sums go to fp64 this often
constexpr int64_t kWideRowChunk = 4;             // rows whose tables are built together (and share index shifts)
constexpr int64_t kWideMinTasks = 12;            // below this the tables (8 per word and row) do not pay
constexpr int64_t kWideRowsMaxTasks = 16;        // from 3 rows on, row tiles (mask_dots_rows) win below this
constexpr int64_t kWidePrefetch = 1;             // task groups ahead, into L2, one line per task and step

// One row's tables fit L2 at the larger block, and longer runs of each task's words stream better.
// (A layer smaller than a block is one block: its tables take no more room than it needs; an empty one still
// gets a table's room, so its allocation is never of 0 bytes.)
inline int64_t wide_block_words(int64_t r_count, int64_t task_words) {
  return std::clamp<int64_t>(task_words, 1, r_count == 1 ? kWideOneRowBlockWords : kWideBlockWords);
}

// The 8 tables of one word of v: table g holds the 16 subset sums of (a0..a3) = v[4g..4g+3]
// (entry b: ((0 + a_i1) + a_i2) + ... over the set bits i1 < i2 < ... of b); vpermps reads the
// low 4 bits of each lane's index, so group g's index is the word shifted right by 4g.
template <typename T>
SUPSUP_AVX512_FN inline void wide_tables(const T* src, int nb, float* tab) {
  alignas(64) float x[kWordBits];
  for (int i = 0; i < nb; ++i) x[i] = static_cast<float>(src[i]);
  for (int i = nb; i < kWordBits; ++i) x[i] = 0.f;
  for (int g = 0; g < 8; ++g) {
    const float* a = x + 4 * g;
    __m512 t = _mm512_maskz_mov_ps(0xAAAA, _mm512_set1_ps(a[0]));
    t = _mm512_mask_add_ps(t, 0xCCCC, t, _mm512_set1_ps(a[1]));
    t = _mm512_mask_add_ps(t, 0xF0F0, t, _mm512_set1_ps(a[2]));
    t = _mm512_mask_add_ps(t, 0xFF00, t, _mm512_set1_ps(a[3]));
    _mm512_store_ps(tab + 16 * g, t);
  }
}

// a[0..15] += the four partial sums of 16 tasks, added as (s0 + s1) + (s2 + s3) in fp32, then in fp64.
SUPSUP_AVX512_FN inline void add_sums(__m512 s0, __m512 s1, __m512 s2, __m512 s3, double* a) {
  const __m512 t = _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3));
  _mm512_storeu_pd(a, _mm512_add_pd(_mm512_loadu_pd(a), _mm512_cvtps_pd(_mm512_castps512_ps256(t))));
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1));
  _mm512_storeu_pd(a + 8, _mm512_add_pd(_mm512_loadu_pd(a + 8), _mm512_cvtps_pd(hi)));
}

// One step (cnt <= 16 words) of 16 tasks for rt rows sharing the index shifts: w[i] holds word i
// of the tasks, tb[r * rs + 128 i + 16 g] row r's table g of word i. Row r's sums go to a[16 r].
// Every row adds in the same order whatever rt is (group g into s[g % 4], word by word).
template <int RT>
SUPSUP_AVX512_FN inline void wide_step(const __m512i* w, int cnt, const float* tb, int64_t rs, double* a) {
  const __m512 one = _mm512_set1_ps(1.f);
  __m512 s[RT][4];
  for (auto& sr : s)
    for (auto& x : sr) x = _mm512_setzero_ps();
  for (int i = 0; i < cnt; ++i, tb += 128) {
    const __m512i x = _mm512_load_si512(w + i);
    for (int g = 0; g < 8; ++g) {
      const __m512i idx = g == 0 ? x : _mm512_srli_epi32(x, 4 * g);
      // the sums go through the FMA units (1 t + s, exact as t + s), beside the permutes and shifts
      for (int r = 0; r < RT; ++r)
        s[r][g & 3] =
            _mm512_fmadd_ps(one, _mm512_permutexvar_ps(idx, _mm512_load_ps(tb + r * rs + 16 * g)), s[r][g & 3]);
    }
  }
  for (int r = 0; r < RT; ++r) add_sums(s[r][0], s[r][1], s[r][2], s[r][3], a + 16 * r);
}

// A full step (16 words of 16 tasks) for one row, the transposed words x[i] kept in registers (wide_step
// stores them for the rows that share them): the same sums in the same order as wide_step<1>.
SUPSUP_AVX512_FN inline void wide_step_row(const __m512* x, const float* tb, double* a) {
  const __m512 one = _mm512_set1_ps(1.f);
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
#define SUPSUP_LOOKUP(g) \
  _mm512_permutexvar_ps((g) == 0 ? w : _mm512_srli_epi32(w, 4 * (g)), _mm512_load_ps(tb + 16 * (g)))
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i, tb += 128) {
    const __m512i w = _mm512_castps_si512(x[i]);
    s0 = _mm512_fmadd_ps(one, SUPSUP_LOOKUP(0), s0);
    s1 = _mm512_fmadd_ps(one, SUPSUP_LOOKUP(1), s1);
    s2 = _mm512_fmadd_ps(one, SUPSUP_LOOKUP(2), s2);
    s3 = _mm512_fmadd_ps(one, SUPSUP_LOOKUP(3), s3);
    s0 = _mm512_fmadd_ps(one, SUPSUP_LOOKUP(4), s0);
    s1 = _mm512_fmadd_ps(one, SUPSUP_LOOKUP(5), s1);
    s2 = _mm512_fmadd_ps(one, SUPSUP_LOOKUP(6), s2);
    s3 = _mm512_fmadd_ps(one, SUPSUP_LOOKUP(7), s3);
  }
#undef SUPSUP_LOOKUP
  add_sums(s0, s1, s2, s3, a);
}

// Items [i0, i1) of mask_dots_wide (item = g * r_count + r: task group g, row r) into acc.
template <typename T>
SUPSUP_AVX512_FN void mask_dots_wide_part(const T* vp, const uint32_t* bits, int64_t r_count, int64_t t_count,
                                          int64_t n, int64_t k, int64_t i0, int64_t i1, float* tab, double* acc) {
  alignas(64) static const uint32_t zeros[kWideOneRowBlockWords] = {};
  const int64_t nw = words_per_row(k), task_words = n * nw;
  const int64_t g0 = i0 / r_count, g1 = (i1 - 1) / r_count + 1;
  const int64_t rlo = g1 - g0 > 1 ? 0 : i0 % r_count, rhi = g1 - g0 > 1 ? r_count : (i1 - 1) % r_count + 1;
  const int64_t block = wide_block_words(r_count, task_words);
  const int64_t rs = block * 128;  // floats of one row's tables
  alignas(64) __m512i w[kWideStepWords];
  int64_t off[kWideOneRowBlockWords];
  int nbits[kWideOneRowBlockWords];
  for (int64_t j0 = 0; j0 < task_words; j0 += block) {
    const int64_t bw = std::min(block, task_words - j0);
    block_offsets(j0, bw, nw, k, off, nbits);
    for (int64_t c0 = rlo; c0 < rhi; c0 += kWideRowChunk) {
      const int64_t c1 = std::min(rhi, c0 + kWideRowChunk);
      for (int64_t r = c0; r < c1; ++r)
        for (int64_t jj = 0; jj < bw; ++jj)
          wide_tables(vp + r * n * k + off[jj], nbits[jj], tab + (r - c0) * rs + jj * 128);
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t ra = std::max(c0, i0 - g * r_count), rb = std::min(c1, i1 - g * r_count);
        if (ra >= rb) continue;
        const uint32_t* p[16];
        group_words<16>(bits, task_words, t_count, g, j0, zeros, p);
        for (int64_t s0 = 0; s0 < bw; s0 += kWideStepWords) {
          const int cnt = static_cast<int>(std::min(kWideStepWords, bw - s0));
          const __mmask16 m = static_cast<__mmask16>((1u << cnt) - 1);
          // step s0 reads line s0 / 16 of each task: the same line of the next group's tasks goes to L2 now.
          // Spread over the steps, the prefetches ride along the lookups (a burst of a whole group's lines at
          // once stalls them: 30% slower for a 1024x784 layer at T = 2500).
          if (g + kWidePrefetch < g1)
            prefetch_group<16, _MM_HINT_T1>(bits, task_words, t_count, g + kWidePrefetch, j0 + s0, 1);
          // word s0 + i of the 16 tasks in w[i]: 16 loads and a 16x16 transpose
          __m512 x[16];
          for (int i = 0; i < 16; ++i) x[i] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(m, p[i] + s0));
          transpose16(x);
          const float* tb = tab + (ra - c0) * rs + s0 * 128;
          double* a = acc + (g * r_count + ra) * 16;
          if (rb - ra == 1 && cnt == kWideStepWords) {
            wide_step_row(x, tb, a);
            continue;
          }
          for (int i = 0; i < 16; ++i) _mm512_store_si512(w + i, _mm512_castps_si512(x[i]));
          for (int64_t r = ra; r < rb; r += 4, tb += 4 * rs, a += 64) {
            switch (std::min<int64_t>(4, rb - r)) {
              case 1:
                wide_step<1>(w, cnt, tb, rs, a);
                break;
              case 2:
                wide_step<2>(w, cnt, tb, rs, a);
                break;
              case 3:
                wide_step<3>(w, cnt, tb, rs, a);
                break;
              default:
                wide_step<4>(w, cnt, tb, rs, a);
            }
          }
        }
      }
    }
  }
}

// out[r, t] = <v_r, M_t> for fp32-accumulated v, sixteen tasks per vector (AVX-512F).
template <typename T>
void mask_dots_wide(const T* vp, const uint32_t* bits, int64_t r_count, int64_t t_count, int64_t n, int64_t k,
                    double* total) {
  const int64_t groups = (t_count + 15) / 16, items = groups * r_count;
  std::vector<double> acc(static_cast<size_t>(items * 16), 0.0);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(1, (items + threads - 1) / threads);
  const int64_t chunk = std::min(r_count, kWideRowChunk);
  at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
    const size_t bytes =
        static_cast<size_t>(chunk * wide_block_words(r_count, n * words_per_row(k)) * 128) * sizeof(float);
    std::unique_ptr<float, decltype(&std::free)> tab(static_cast<float*>(std::aligned_alloc(64, bytes)), &std::free);
    TORCH_CHECK(tab != nullptr, "mask_dots: out of memory allocating ", bytes, " bytes of tables");
    mask_dots_wide_part<T>(vp, bits, r_count, t_count, n, k, i0, i1, tab.get(), acc.data());
  });
  for (int64_t r = 0; r < r_count; ++r)
    for (int64_t t = 0; t < t_count; ++t) total[r * t_count + t] = acc[((t / 16) * r_count + r) * 16 + t % 16];
}
#endif

}  // namespace

at::Tensor superpose(const at::Tensor& weight, const at::Tensor& bank, const at::Tensor& alpha) {
  const char* op = "superpose";
  check_float(weight, op, "weight");
  TORCH_CHECK(weight.dim() >= 1, op, ": weight needs at least 1 dim [N, ...]");
  const int64_t n = weight.size(0), k = n ? weight.numel() / n : 0;
  check_words(bank, n, k, 1, op, "bank");
  TORCH_CHECK(alpha.dim() == 1 && alpha.size(0) == bank.size(0), op, ": alpha has shape ", alpha.sizes(),
              ", expected [", bank.size(0), "] (one weight per task)");
  TORCH_CHECK(alpha.is_floating_point(), op, ": alpha must be floating, got ", alpha.scalar_type());
  const at::Tensor w = weight.contiguous(), bk = bank.contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options());
  const int64_t nw = words_per_row(k), task_words = n * nw;
  if (out.numel() == 0) return out;
  const uint32_t* bits = word_ptr(bk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "superpose", [&] {
    using A = acc_t<scalar_t>;
    const std::vector<Group> groups = alpha_groups<A>(alpha);
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    const int64_t n_blocks = (task_words + kBlockWords - 1) / kBlockWords;
    at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<A> acc(kBlockWords * kWordBits);
      std::vector<v8u> planes;
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t j0 = blk * kBlockWords, bw = std::min(kBlockWords, task_words - j0);
        std::fill(acc.begin(), acc.begin() + bw * kWordBits, A(0));
        for (const Group& g : groups) {
          const A a = static_cast<A>(g.alpha);
          if (g.tasks.size() >= kCsaMinTasks) {
            count_group<A>(bits, task_words, g, j0, bw, a, acc.data(), planes);
          } else {
            for (int64_t t : g.tasks) add_task<A>(bits + t * task_words + j0, bw, a, acc.data());
          }
        }
        for (int64_t jj = 0; jj < bw; ++jj) {
          const int64_t j = j0 + jj, row = j / nw, wi = j % nw;
          const int nb = bits_in_word(wi, k);
          const int64_t base = row * k + wi * kWordBits;
          const A* ab = acc.data() + jj * kWordBits;
          for (int i = 0; i < nb; ++i) op_[base + i] = static_cast<scalar_t>(static_cast<A>(wp[base + i]) * ab[i]);
        }
      }
    });
  });
  return out;
}

at::Tensor mask_dots(const at::Tensor& v, const at::Tensor& bank) {
  const char* op = "mask_dots";
  check_float(v, op, "v");
  TORCH_CHECK(v.dim() == 2 || v.dim() == 3, op, ": v must be [N, K] or [R, N, K], got shape ", v.sizes());
  const int64_t n = v.size(-2), k = v.size(-1);
  check_words(bank, n, k, 1, op, "bank");
  const bool squeeze = v.dim() == 2;
  const at::Tensor vv = (squeeze ? v.unsqueeze(0) : v).contiguous(), bk = bank.contiguous();
  const int64_t r_count = vv.size(0), t_count = bk.size(0);
  const int64_t nw = words_per_row(k), task_words = n * nw;
  std::vector<double> total(static_cast<size_t>(r_count * t_count), 0.0);
  const uint32_t* bits = word_ptr(bk);
  const bool tables = t_count >= kTableMinTasks;
#if SUPSUP_AVX512_TARGET
  const bool wide = t_count >= kWideMinTasks && masked_gemm_available();  // same switch as the masked GEMM
#else
  [[maybe_unused]] const bool wide = false;
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vv.scalar_type(), "mask_dots", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* vp = vv.data_ptr<scalar_t>();
#if SUPSUP_AVX2
    if constexpr (std::is_same_v<A, float>) {
      if (r_count >= kRowsMinRows && t_count < (wide ? kWideRowsMaxTasks : kRowsMaxTasks)) {
        mask_dots_rows<scalar_t>(vp, bits, r_count, t_count, n, k, total.data());
        return;
      }
    }
#endif
#if SUPSUP_AVX512_TARGET
    if constexpr (std::is_same_v<A, float>) {
      if (wide) {
        mask_dots_wide<scalar_t>(vp, bits, r_count, t_count, n, k, total.data());
        return;
      }
    }
#endif
#if SUPSUP_AVX2
    if constexpr (std::is_same_v<A, float>) {
      if (t_count >= kLaneMinTasks) {
        mask_dots_lanes<scalar_t>(vp, bits, r_count, t_count, n, k, total.data());
        return;
      }
    }
#endif
    // tiles in fixed spans, each summed into its own partial, the partials added in span order:
    // the result does not depend on how the spans are spread over threads
    const int64_t n_tiles = (task_words + kTileWords - 1) / kTileWords;
    const int64_t n_spans = (n_tiles + kSpanTiles - 1) / kSpanTiles, outs = r_count * t_count;
    std::vector<double> parts(static_cast<size_t>(n_spans * outs), 0.0);
    at::parallel_for(0, n_spans, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t span = s0; span < s1; ++span) {
        const int64_t i0 = span * kSpanTiles, i1 = std::min(n_tiles, i0 + kSpanTiles);
        double* part = parts.data() + span * outs;
        std::vector<A> vt(kTileWords * kWordBits);
        std::vector<A> tab(tables ? kTileGroups * 256 : 0);
        // tasks in chunks, so that the pages of one chunk's masks stay in the TLB across tiles
        for (int64_t t0 = 0; t0 < t_count; t0 += kTaskChunk) {
          const int64_t t1 = std::min(t_count, t0 + kTaskChunk);
          for (int64_t tile = i0; tile < i1; ++tile) {
            const int64_t j0 = tile * kTileWords, bw = std::min(kTileWords, task_words - j0), groups = bw * 4;
            for (int64_t r = 0; r < r_count; ++r) {
              // this tile's v values, zero where a word's bits run past K
              const scalar_t* vr = vp + r * n * k;
              for (int64_t jj = 0; jj < bw; ++jj) {
                const int64_t j = j0 + jj, row = j / nw, wi = j % nw;
                const int nb = bits_in_word(wi, k);
                const scalar_t* src = vr + row * k + wi * kWordBits;
                A* dst = vt.data() + jj * kWordBits;
                for (int i = 0; i < nb; ++i) dst[i] = static_cast<A>(src[i]);
                for (int i = nb; i < kWordBits; ++i) dst[i] = A(0);
              }
              double* pr = part + r * t_count;
              if (!tables) {
                for (int64_t t = t0; t < t1; ++t) pr[t] += dot_bits<A>(vt.data(), bits + t * task_words + j0, bw);
                continue;
              }
              // 256 subset sums per byte group, as (sum over the low nibble) + (sum over the high nibble)
              for (int64_t g = 0; g < groups; ++g) {
                const A* x = vt.data() + g * 8;
                A lo[16], hi[16];
                lo[0] = hi[0] = A(0);
                for (int b = 1; b < 16; ++b) {
                  const int low = __builtin_ctz(b);
                  lo[b] = lo[b & (b - 1)] + x[low];
                  hi[b] = hi[b & (b - 1)] + x[4 + low];
                }
                A* tg = tab.data() + g * 256;
                for (int h = 0; h < 16; ++h)
                  for (int l = 0; l < 16; ++l) tg[h * 16 + l] = lo[l] + hi[h];
              }
              const A* tb = tab.data();
              for (int64_t t = t0; t < t1; ++t) {
                const uint8_t* p = reinterpret_cast<const uint8_t*>(bits + t * task_words + j0);
                if (t + 8 < t1) __builtin_prefetch(bits + (t + 8) * task_words + j0);
                A s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
                int64_t g = 0;
                // 8 mask bytes per load; each byte indexes its group's table
                for (; g + 8 <= groups; g += 8) {
                  uint64_t q;
                  std::memcpy(&q, p + g, sizeof(q));
                  const A* tq = tb + g * 256;
                  s0 += tq[q & 255];
                  s1 += tq[256 + ((q >> 8) & 255)];
                  s2 += tq[512 + ((q >> 16) & 255)];
                  s3 += tq[768 + ((q >> 24) & 255)];
                  s4 += tq[1024 + ((q >> 32) & 255)];
                  s5 += tq[1280 + ((q >> 40) & 255)];
                  s6 += tq[1536 + ((q >> 48) & 255)];
                  s7 += tq[1792 + (q >> 56)];
                }
                for (; g < groups; ++g) s0 += tb[g * 256 + p[g]];
                pr[t] += static_cast<double>(((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)));
              }
            }
          }
        }
      }
    });
    for (int64_t span = 0; span < n_spans; ++span)
      for (int64_t i = 0; i < outs; ++i) total[i] += parts[span * outs + i];
  });
  at::Tensor out = at::from_blob(total.data(), {r_count, t_count}, at::TensorOptions().dtype(at::kDouble))
                       .to(v.scalar_type(), /*non_blocking=*/false, /*copy=*/true);  // own the memory
  return squeeze ? out.squeeze(0) : out;
}

}  // namespace supsup
