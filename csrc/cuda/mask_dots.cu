// mask_dots: <v_r, M_t> for every row r of v and every task t of the bank, in one launch that reads
// every mask bit once ("Four Russians": a table lookup per 8 weights and task; mask_dots_impl.cuh).
#include "mask_dots_impl.cuh"

namespace supsup_cuda {
namespace {

using namespace dots;

// Block (x, r, z): row r of v, word steps [x * steps_per_block, ...), tasks of chunk z (chunks
// of equal size). Per step: the tables (every thread its share), then each lane loads its words
// for kPassUnroll tasks before the first lookup; the pair reduces by one shuffle into a shared
// accumulator that only it touches.
template <typename T, bool kVec4>
__global__ void __launch_bounds__(kDotThreads)
    mask_dots_kernel(const T* __restrict__ v, const int32_t* __restrict__ bank, float* __restrict__ out, int64_t n,
                     int64_t k, int64_t num_tasks, int64_t chunk_tasks, int64_t steps_per_block) {
  __shared__ float s_tab[kGroups][kTabStride];
  __shared__ float s_acc[kMaxTasksPerBlock];
  const int64_t wpr = (k + 31) / 32;
  const int64_t slab = n * wpr;
  const int64_t r = blockIdx.y;
  const T* vr = v + r * n * k;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.z) * chunk_tasks;
  const int64_t t_end = t_begin + chunk_tasks < num_tasks ? t_begin + chunk_tasks : num_tasks;
  const int tid = threadIdx.x;
  const int half = tid % kLanesPerTask;  // words 4 half .. 4 half + 3 of the step
  const int task_slot = tid / kLanesPerTask;

  for (int i = tid; i < kMaxTasksPerBlock; i += kDotThreads) s_acc[i] = 0.f;

  const int64_t first_step = static_cast<int64_t>(blockIdx.x) * steps_per_block;
  const int64_t num_steps = (slab + kStepWords - 1) / kStepWords;
  const int64_t last_step = first_step + steps_per_block < num_steps ? first_step + steps_per_block : num_steps;

  for (int64_t step = first_step; step < last_step; ++step) {
    const int64_t word0 = step * kStepWords;
    build_entries<T>(vr, k, wpr, slab, word0, tid, s_tab);
    __syncthreads();
    // every lane runs the same passes (the shuffle needs the whole warp); absent work adds zero
    const int64_t word = word0 + kLaneWords * half;
    for (int64_t tb = t_begin; tb < t_end; tb += kTasksPerPass * kPassUnroll) {
      uint32_t bits[kPassUnroll][kLaneWords];
#pragma unroll
      for (int u = 0; u < kPassUnroll; ++u) {
        load_lane<kVec4>(bank, slab, tb + u * kTasksPerPass + task_slot, t_end, word, bits[u]);
      }
#pragma unroll
      for (int u = 0; u < kPassUnroll; ++u) {
        const int64_t t = tb + u * kTasksPerPass + task_slot;
        float s = lane_sum(s_tab, bits[u], half);
        s += __shfl_xor_sync(0xFFFFFFFFu, s, 1);  // the two lanes of a task are neighbours
        if (half == 0 && t < t_end) s_acc[t - t_begin] += s;
      }
    }
    __syncthreads();  // the tables are rebuilt by the next step
  }
  for (int64_t t = t_begin + tid; t < t_end; t += kDotThreads) atomicAdd(out + r * num_tasks + t, s_acc[t - t_begin]);
}

}  // namespace

cudaError_t mask_dots(const void* v, DType dtype, const int32_t* bank, float* out, int64_t rows_r, int64_t n, int64_t k,
                      int64_t num_tasks, int num_sms, cudaStream_t stream) {
  const int64_t slab = n * ((k + 31) / 32);
  if (slab == 0 || rows_r == 0 || num_tasks == 0) return cudaSuccess;
  const int64_t num_steps = (slab + kStepWords - 1) / kStepWords;
  // balanced chunks: as few as the shared accumulators allow, all of the same size
  const int64_t task_chunks = (num_tasks + kMaxTasksPerBlock - 1) / kMaxTasksPerBlock;
  const int64_t chunk_tasks = (num_tasks + task_chunks - 1) / task_chunks;
  // kBlocksPerSm blocks per SM in all; more steps per block means fewer global atomics
  int64_t want = (kBlocksPerSm * static_cast<int64_t>(num_sms > 0 ? num_sms : 132)) / (rows_r * task_chunks);
  if (want < 1) want = 1;
  if (want > num_steps) want = num_steps;
  const int64_t steps_per_block = (num_steps + want - 1) / want;
  const dim3 grid(static_cast<unsigned>((num_steps + steps_per_block - 1) / steps_per_block),
                  static_cast<unsigned>(rows_r), static_cast<unsigned>(task_chunks));
  // 16-byte loads need every task's slab, and the bank, 16-byte aligned
  const bool vec4 = slab % 4 == 0 && reinterpret_cast<uintptr_t>(bank) % 16 == 0;
  const bool ok = dispatch_float(dtype,
                                 [&](auto tag) {
                                   using T = decltype(tag);
                                   if constexpr (sizeof(T) <= 4) {
                                     const T* vp = static_cast<const T*>(v);
                                     if (vec4) {
                                       mask_dots_kernel<T, true><<<grid, kDotThreads, 0, stream>>>(
                                           vp, bank, out, n, k, num_tasks, chunk_tasks, steps_per_block);
                                     } else {
                                       mask_dots_kernel<T, false><<<grid, kDotThreads, 0, stream>>>(
                                           vp, bank, out, n, k, num_tasks, chunk_tasks, steps_per_block);
                                     }
                                   }
                                 }) &&
                  dtype != DType::kF64;
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace supsup_cuda
