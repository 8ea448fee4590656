// Many tasks at once: the superposition W * sum_t alpha_t M_t and the dots <v_r, M_t>.
//
// superpose: tasks sharing one alpha value (the common case: uniform alpha over the surviving
// tasks) are counted with a bit-sliced carry-save counter (Harley-Seal: 16 masks per step into
// 1/2/4/8/16-weight bit planes), then the counts are scaled once; lonely alpha values are added
// task by task. Work is blocked over word columns so that planes and accumulators stay in L1.
//
// mask_dots: the "Four Russians" trick. For each group of 8 weights the 256 subset sums of v
// are tabulated once per tile; each task's mask byte is then a single lookup. A tile is half a
// cache line of every task's words, so a tile's tables (32 KB) stay in L1 while all tasks stream
// through (the other half of each line is still in L2 for the next tile). Few tasks make the
// tables not worth building: a direct bit loop serves.
#include "cpu/bits.h"
#include "cpu/ops.h"

#include <cmath>
#include <mutex>
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
    if (std::isnan(v)) groups.push_back({static_cast<double>(v), {t}});  // NaN equals nothing
    else nz.emplace_back(v, t);
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
    for (size_t i = 0; i < 16; ++i)
      d[i] = s + i < n_tasks ? bank + g.tasks[s + i] * task_words + j0 : kZeroWords;
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
constexpr int64_t kTableMinTasks = 48;
constexpr int64_t kTaskChunk = 256;  // tasks per pass over a thread's tiles  // below this, building 256-entry tables does not pay

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
  std::mutex merge;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vv.scalar_type(), "mask_dots", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* vp = vv.data_ptr<scalar_t>();
    const int64_t n_tiles = (task_words + kTileWords - 1) / kTileWords;
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t grain = std::max<int64_t>(1, (n_tiles + threads - 1) / threads);
    at::parallel_for(0, n_tiles, grain, [&](int64_t i0, int64_t i1) {
      std::vector<double> part(static_cast<size_t>(r_count * t_count), 0.0);
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
            double* pr = part.data() + r * t_count;
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
      std::lock_guard<std::mutex> lock(merge);
      for (size_t i = 0; i < total.size(); ++i) total[i] += part[i];
    });
  });
  at::Tensor out = at::from_blob(total.data(), {r_count, t_count}, at::TensorOptions().dtype(at::kDouble))
                       .to(v.scalar_type(), /*non_blocking=*/false, /*copy=*/true);  // own the memory
  return squeeze ? out.squeeze(0) : out;
}

}  // namespace supsup
