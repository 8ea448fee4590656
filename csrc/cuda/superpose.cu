// Many tasks at once: the superposition W * sum_t alpha_t M_t and the dots <v, M_t> for all t.
// Each launch reads every mask bit of the bank exactly once.
#include "elem.cuh"

namespace supsup_cuda {
namespace {

// ------------------------------------------------------------------------------------------
// superpose
// ------------------------------------------------------------------------------------------
constexpr int kSupThreads = 128;
constexpr int kTaskChunk = 256;  // alphas staged per round; a chunk's counts fit in 9 bits
constexpr int kCountBits = 9;

// One thread owns one word position (32 weights) and walks the tasks. Per chunk of tasks the
// block decides whether every non-zero alpha in it is equal (the common alpha = 1/T case):
// then the chunk's words go into bit-sliced counters (bit b of c[j] is bit j of weight b's
// count: a ripple-carry add per word, usually one or two levels deep) and are unsliced once per
// chunk; otherwise each non-zero task adds alpha_t to the weights whose bit is set.
template <typename T>
__global__ void __launch_bounds__(kSupThreads) superpose_kernel(const T* __restrict__ weight,
                                                                const int32_t* __restrict__ bank,
                                                                const float* __restrict__ alpha, T* __restrict__ out,
                                                                int64_t n, int64_t k, int64_t num_tasks) {
  __shared__ float s_alpha[kTaskChunk];
  __shared__ float s_ref;
  const int64_t wpr = (k + 31) / 32;
  const int64_t slab = n * wpr;
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool live = pos < slab;

  float acc[32];
#pragma unroll
  for (int b = 0; b < 32; ++b) acc[b] = 0.f;
  if (threadIdx.x == 0) s_ref = 0.f;
  __syncthreads();

  for (int64_t t0 = 0; t0 < num_tasks; t0 += kTaskChunk) {
    const int count = static_cast<int>(num_tasks - t0 < kTaskChunk ? num_tasks - t0 : kTaskChunk);
    for (int i = threadIdx.x; i < kTaskChunk; i += blockDim.x) {
      const float a = i < count ? alpha[t0 + i] : 0.f;
      s_alpha[i] = a;
      if (a != 0.f) s_ref = a;  // any non-zero alpha of the chunk: a race whose every winner is fine
    }
    __syncthreads();
    const float ref = s_ref;
    bool uniform_here = true;
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
      const float a = s_alpha[i];
      uniform_here &= (a == 0.f) || (a == ref);
    }
    const int any_nonzero = __syncthreads_or(ref != 0.f && count > 0 ? 1 : 0);
    const int uniform = __syncthreads_and(uniform_here ? 1 : 0);
    if (any_nonzero && live) {
      const int32_t* words = bank + t0 * slab + pos;
      if (uniform) {
        uint32_t c[kCountBits];
#pragma unroll
        for (int j = 0; j < kCountBits; ++j) c[j] = 0u;
        for (int i = 0; i < count; ++i) {
          if (s_alpha[i] == 0.f) continue;
          uint32_t carry = static_cast<uint32_t>(__ldg(words + i * slab));
#pragma unroll
          for (int j = 0; j < kCountBits; ++j) {
            const uint32_t next = c[j] & carry;
            c[j] ^= carry;
            carry = next;
            if (!carry) break;
          }
        }
#pragma unroll
        for (int b = 0; b < 32; ++b) {
          uint32_t cnt = 0;
#pragma unroll
          for (int j = 0; j < kCountBits; ++j) cnt |= ((c[j] >> b) & 1u) << j;
          acc[b] += ref * static_cast<float>(cnt);
        }
      } else {
        for (int i = 0; i < count; ++i) {
          const float a = s_alpha[i];
          if (a == 0.f) continue;
          const uint32_t word = static_cast<uint32_t>(__ldg(words + i * slab));
#pragma unroll
          for (int b = 0; b < 32; ++b) acc[b] += ((word >> b) & 1u) ? a : 0.f;
        }
      }
    }
    __syncthreads();  // s_alpha / s_ref are rewritten by the next chunk
    if (threadIdx.x == 0) s_ref = 0.f;
    __syncthreads();
  }

  if (!live) return;
  const int64_t row = pos / wpr;
  const int64_t col0 = (pos - row * wpr) * 32;
  const int64_t base = row * k + col0;
  const int valid = static_cast<int>(k - col0 < 32 ? k - col0 : 32);
#pragma unroll
  for (int b = 0; b < 32; ++b) {
    if (b < valid) out[base + b] = detail::from_float<T>(detail::to_float(weight[base + b]) * acc[b]);
  }
}

// ------------------------------------------------------------------------------------------
// mask_dots: Four Russians
// ------------------------------------------------------------------------------------------
constexpr int kDotThreads = 256;
constexpr int kStepWords = 8;                // words per step: 256 weights, 32 byte-groups
constexpr int kGroups = kStepWords * 4;      // byte groups (8 weights each) per step
constexpr int kLanesPerTask = kStepWords;    // threads that share one task in a step
constexpr int kTasksPerPass = kDotThreads / kLanesPerTask;  // 32 tasks in flight
constexpr int kMaxTasksPerBlock = 2048;      // shared per-task accumulators (8 KiB)
constexpr int kTabStride = 256 + 8;          // padding: a warp's 4 groups write distinct banks

__host__ __device__ constexpr int lowest_bit(int e) {
  return (e & 1) ? 0 : (e & 2) ? 1 : (e & 4) ? 2 : (e & 8) ? 3 : 4;
}

// Block (x, r, z): row r of v, word steps [x * steps_per_block, ...), tasks of chunk z.
// Per step: 32 tables of 256 partial sums of v (one per byte of weights, built from two nibble
// tables), then thread j reads word j % 8 of tasks j / 8 (+ 32 i) and adds 4 table lookups;
// the 8 threads of a task reduce by shuffles into a shared accumulator that only they touch.
template <typename T>
__global__ void __launch_bounds__(kDotThreads) mask_dots_kernel(const T* __restrict__ v,
                                                                const int32_t* __restrict__ bank,
                                                                float* __restrict__ out, int64_t n, int64_t k,
                                                                int64_t num_tasks, int64_t steps_per_block) {
  __shared__ float s_tab[kGroups][kTabStride];
  __shared__ float s_acc[kMaxTasksPerBlock];
  const int64_t wpr = (k + 31) / 32;
  const int64_t slab = n * wpr;
  const int64_t r = blockIdx.y;
  const T* vr = v + r * n * k;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.z) * kMaxTasksPerBlock;
  const int64_t t_end = t_begin + kMaxTasksPerBlock < num_tasks ? t_begin + kMaxTasksPerBlock : num_tasks;
  const int tid = threadIdx.x;
  const int lane8 = tid % kLanesPerTask;
  const int task_slot = tid / kLanesPerTask;

  for (int i = tid; i < kMaxTasksPerBlock; i += kDotThreads) s_acc[i] = 0.f;

  const int64_t first_step = static_cast<int64_t>(blockIdx.x) * steps_per_block;
  const int64_t num_steps = (slab + kStepWords - 1) / kStepWords;
  const int64_t last_step = first_step + steps_per_block < num_steps ? first_step + steps_per_block : num_steps;

  for (int64_t step = first_step; step < last_step; ++step) {
    const int64_t word0 = step * kStepWords;
    {
      // 8 threads per byte group. Entry e = part + 8 i of a group's table: its low 3 bits are
      // the thread's `part` (one partial sum), its high 5 bits the unrolled i (a 32-entry table
      // over weights 3..7 built with one add per entry), so every index is a constant.
      const int g = tid / 8;
      const int part = tid % 8;
      const int64_t word = word0 + g / 4;
      float x[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) x[i] = 0.f;
      if (word < slab) {
        const int64_t row = word / wpr;
        const int64_t col0 = (word - row * wpr) * 32 + (g % 4) * 8;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (col0 + i < k) x[i] = detail::to_float(vr[row * k + col0 + i]);
        }
      }
      const float base = ((part & 1) ? x[0] : 0.f) + ((part & 2) ? x[1] : 0.f) + ((part & 4) ? x[2] : 0.f);
      float hi[32];
      hi[0] = base;
#pragma unroll
      for (int i = 1; i < 32; ++i) hi[i] = hi[i & (i - 1)] + x[3 + lowest_bit(i)];
#pragma unroll
      for (int i = 0; i < 32; ++i) s_tab[g][part + 8 * i] = hi[i];
    }
    __syncthreads();
    // every lane runs the same passes (the shuffles need the whole warp); absent work adds zero
    const int64_t word = word0 + lane8;
    for (int64_t tb = t_begin; tb < t_end; tb += kTasksPerPass) {
      const int64_t t = tb + task_slot;
      const bool live = t < t_end && word < slab;
      const uint32_t bits = live ? static_cast<uint32_t>(__ldg(bank + t * slab + word)) : 0u;
      float s = s_tab[lane8 * 4 + 0][bits & 0xFFu] + s_tab[lane8 * 4 + 1][(bits >> 8) & 0xFFu] +
                s_tab[lane8 * 4 + 2][(bits >> 16) & 0xFFu] + s_tab[lane8 * 4 + 3][bits >> 24];
      // the 8 lanes of a task are consecutive and aligned inside one warp
      s += __shfl_xor_sync(0xFFFFFFFFu, s, 1, kLanesPerTask);
      s += __shfl_xor_sync(0xFFFFFFFFu, s, 2, kLanesPerTask);
      s += __shfl_xor_sync(0xFFFFFFFFu, s, 4, kLanesPerTask);
      if (lane8 == 0 && t < t_end) s_acc[t - t_begin] += s;
    }
    __syncthreads();  // the tables are rebuilt by the next step
  }
  for (int64_t t = t_begin + tid; t < t_end; t += kDotThreads) atomicAdd(out + r * num_tasks + t, s_acc[t - t_begin]);
}

}  // namespace

cudaError_t superpose(const void* weight, DType dtype, const int32_t* bank, const float* alpha, void* out, int64_t n,
                      int64_t k, int64_t num_tasks, cudaStream_t stream) {
  const int64_t slab = n * ((k + 31) / 32);
  if (slab == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>((slab + kSupThreads - 1) / kSupThreads);
  bool ok = false;
  switch (dtype) {
    case DType::kF16:
      superpose_kernel<__half><<<grid, kSupThreads, 0, stream>>>(static_cast<const __half*>(weight), bank, alpha,
                                                                  static_cast<__half*>(out), n, k, num_tasks);
      ok = true;
      break;
    case DType::kBF16:
      superpose_kernel<__nv_bfloat16><<<grid, kSupThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(weight), bank, alpha, static_cast<__nv_bfloat16*>(out), n, k, num_tasks);
      ok = true;
      break;
    case DType::kF32:
      superpose_kernel<float><<<grid, kSupThreads, 0, stream>>>(static_cast<const float*>(weight), bank, alpha,
                                                                 static_cast<float*>(out), n, k, num_tasks);
      ok = true;
      break;
    default:
      break;
  }
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

cudaError_t mask_dots(const void* v, DType dtype, const int32_t* bank, float* out, int64_t rows_r, int64_t n, int64_t k,
                      int64_t num_tasks, int num_sms, cudaStream_t stream) {
  const int64_t slab = n * ((k + 31) / 32);
  if (slab == 0 || rows_r == 0 || num_tasks == 0) return cudaSuccess;
  const int64_t num_steps = (slab + kStepWords - 1) / kStepWords;
  const int64_t task_chunks = (num_tasks + kMaxTasksPerBlock - 1) / kMaxTasksPerBlock;
  // about two blocks per SM in all; more steps per block means fewer global atomics
  int64_t want = (2LL * (num_sms > 0 ? num_sms : 132)) / (rows_r * task_chunks);
  if (want < 1) want = 1;
  if (want > num_steps) want = num_steps;
  const int64_t steps_per_block = (num_steps + want - 1) / want;
  const dim3 grid(static_cast<unsigned>((num_steps + steps_per_block - 1) / steps_per_block),
                  static_cast<unsigned>(rows_r), static_cast<unsigned>(task_chunks));
  bool ok = false;
  switch (dtype) {
    case DType::kF16:
      mask_dots_kernel<__half><<<grid, kDotThreads, 0, stream>>>(static_cast<const __half*>(v), bank, out, n, k,
                                                                  num_tasks, steps_per_block);
      ok = true;
      break;
    case DType::kBF16:
      mask_dots_kernel<__nv_bfloat16><<<grid, kDotThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(v), bank,
                                                                         out, n, k, num_tasks, steps_per_block);
      ok = true;
      break;
    case DType::kF32:
      mask_dots_kernel<float><<<grid, kDotThreads, 0, stream>>>(static_cast<const float*>(v), bank, out, n, k,
                                                                 num_tasks, steps_per_block);
      ok = true;
      break;
    default:
      break;
  }
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace supsup_cuda
