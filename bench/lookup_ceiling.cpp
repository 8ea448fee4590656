// The fastest this CPU can run mask_dots's AVX-512 inner step, with no memory traffic at all.
//
// mask_dots_wide (csrc/cpu/superpose.cpp) looks up one word of 16 tasks (32 weights, 512 mask bits)
// with 8 (shift, vpermps, add): the 16 subset sums of 4 weights per table, the task bits as indices.
// Here the 8 tables stay in registers and the transposed words come from a 1 KB buffer in L1, so
// what is timed is the instruction mix alone: no bank read, no transpose, no table loads, no
// forward pass. The time it gives per word is a lower bound for the kernel's; bench/lookup_ceiling.py
// turns it into a lower bound for task inference and sets it beside the bandwidth floor.
//
// Usage: lookup_ceiling THREADS WORDS   (WORDS: words of 16 tasks looked up by each thread per round)
// Prints one JSON object: ns per word of 16 tasks, across all threads, for the kernel's mix and for
// the lookups alone (vpermps + add, no shifts), best of 5 rounds.

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

alignas(64) unsigned words[16][16];  // 16 words of 16 tasks: stands in for the transposed block

template <bool Shifts>
__attribute__((target("avx512f"), noinline)) float run(long n_words) {
  __m512 tab[8];
  for (int g = 0; g < 8; ++g) tab[g] = _mm512_set1_ps(static_cast<float>(g + 1));
  __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (long i = 0; i < n_words; ++i) {
    const __m512i x = _mm512_load_si512(words[i & 15]);
#pragma GCC unroll 8
    for (int g = 0; g < 8; ++g) {
      // without shifts every lookup reads the same index: the permutes and adds alone
      const __m512i idx = (Shifts && g) ? _mm512_srli_epi32(x, 4 * g) : x;
      s[g & 3] = _mm512_add_ps(s[g & 3], _mm512_permutexvar_ps(idx, tab[g]));
    }
  }
  const __m512 t = _mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3]));
  return _mm512_reduce_add_ps(t);
}

// Wall-clock ns per word of 16 tasks with `threads` threads each looking up n_words words.
template <bool Shifts>
double ns_per_word(int threads, long n_words) {
  double best = 1e30;
  for (int round = 0; round < 5; ++round) {
    std::vector<float> sink(static_cast<size_t>(threads));
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { sink[t] = run<Shifts>(n_words); });
    for (auto& th : pool) th.join();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (sink[0] == -1.f) std::puts("");  // keeps the sums live
    best = std::min(best, dt * 1e9 / (static_cast<double>(n_words) * threads));
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s THREADS WORDS\n", argv[0]);
    return 2;
  }
  const int threads = std::atoi(argv[1]);
  const long n_words = std::atol(argv[2]);
  if (threads < 1 || n_words < 1) {
    std::fprintf(stderr, "THREADS and WORDS must be positive\n");
    return 2;
  }
  if (!__builtin_cpu_supports("avx512f")) {
    std::fprintf(stderr, "this CPU has no AVX-512F\n");
    return 3;
  }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) words[i][j] = 0x9E3779B9u * static_cast<unsigned>(16 * i + j + 1);
  const double mix = ns_per_word<true>(threads, n_words);
  const double lookups = ns_per_word<false>(threads, n_words);
  std::printf(
      "{\"threads\": %d, \"words_per_thread\": %ld, \"kernel_mix_ns_per_word\": %.4f, "
      "\"lookups_only_ns_per_word\": %.4f}\n",
      threads, n_words, mix, lookups);
  return 0;
}
