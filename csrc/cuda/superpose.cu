// superpose: out = W * sum_t alpha_t M_t in one launch that reads every mask bit of the bank once,
// parallel over words and over balanced chunks of tasks (superpose_impl.cuh has the per-thread
// work and the decomposition).
#include "superpose_impl.cuh"

namespace supsup_cuda {
namespace {

constexpr int kSupThreads = 128;
constexpr int kBlocksPerSm = 4;         // the grid aimed at: about 4 blocks per SM
constexpr int kMinTasksPerChunk = 128;  // the partials of a chunk cost 1/4 of its bank reads at most

// Block (x, c): threads' word groups [x * 128, ...), chunk c of the tasks. With several chunks
// the block that finishes a word range last (a counter per range, re-armed for the next
// launch) sums the chunks' partials and writes the output.
template <typename T, int kVec>
__global__ void __launch_bounds__(kSupThreads)
    superpose_kernel(const T* __restrict__ weight, const int32_t* __restrict__ bank, const float* __restrict__ alpha,
                     float* ws, int32_t* counters, T* __restrict__ out, sup::Shape s) {
  __shared__ float s_alpha[sup::kMaxChunk];
  __shared__ int s_last;
  const int chunk = blockIdx.y;
  const int64_t t0 = sup::chunk_begin(s, chunk);
  const int count = static_cast<int>(sup::chunk_begin(s, chunk + 1) - t0);
  for (int i = threadIdx.x; i < count; i += blockDim.x) s_alpha[i] = alpha[t0 + i];
  __syncthreads();
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (group < s.groups) sup::chunk_thread<T, kVec>(weight, bank, ws, out, s, group, chunk, s_alpha);
  if (s.chunks == 1) return;
  __threadfence();  // this block's partials are visible before its arrival is counted
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(counters + blockIdx.x, 1) == s.chunks - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  if (group < s.groups) sup::finish_thread<T, kVec>(weight, ws, out, s, group);
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;
}

template <typename T>
void launch(const void* weight, const int32_t* bank, const float* alpha, void* out, const SuperposePlan& p,
            const sup::Shape& s, float* ws, int32_t* counters, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.blocks_x), static_cast<unsigned>(p.chunks));
  const T* w = static_cast<const T*>(weight);
  T* o = static_cast<T*>(out);
  if (p.vec == 4) {
    superpose_kernel<T, 4><<<grid, kSupThreads, 0, stream>>>(w, bank, alpha, ws, counters, o, s);
  } else {
    superpose_kernel<T, 1><<<grid, kSupThreads, 0, stream>>>(w, bank, alpha, ws, counters, o, s);
  }
}

}  // namespace

SuperposePlan superpose_plan(int64_t n, int64_t k, int64_t num_tasks, int num_sms, bool bank_aligned) {
  SuperposePlan p{};
  const int64_t slab = n * ((k + 31) / 32);
  p.vec = bank_aligned && slab % 4 == 0 ? 4 : 1;
  p.groups = (slab + p.vec - 1) / p.vec;
  p.blocks_x = (p.groups + kSupThreads - 1) / kSupThreads;
  const int64_t sms = num_sms > 0 ? num_sms : 132;
  const int64_t fill = p.blocks_x ? (kBlocksPerSm * sms + p.blocks_x - 1) / p.blocks_x : 1;
  const int64_t cap = num_tasks / kMinTasksPerChunk > 1 ? num_tasks / kMinTasksPerChunk : 1;
  const int64_t need = (num_tasks + sup::kMaxChunk - 1) / sup::kMaxChunk;  // counts fit in 9 bits
  int64_t chunks = fill < cap ? fill : cap;
  if (chunks < need) chunks = need;
  if (chunks < 1) chunks = 1;
  p.chunks = static_cast<int>(chunks);
  p.ws_floats = p.chunks > 1 ? p.chunks * p.groups * p.vec * 32 : 0;
  p.counters = p.chunks > 1 ? p.blocks_x : 0;
  return p;
}

cudaError_t superpose(const void* weight, DType dtype, const int32_t* bank, const float* alpha, void* out, int64_t n,
                      int64_t k, int64_t num_tasks, const SuperposePlan& plan, float* ws, int32_t* counters,
                      cudaStream_t stream) {
  const int64_t wpr = (k + 31) / 32;
  if (n * wpr == 0) return cudaSuccess;
  if (plan.chunks > 65535 || plan.blocks_x > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;
  if (plan.chunks > 1 && (ws == nullptr || counters == nullptr)) return cudaErrorInvalidValue;
  sup::Shape s{n, k, wpr, n * wpr, plan.groups, num_tasks, plan.chunks, false};
  // 16-byte epilogue: rows of 8-element multiples and 16-byte aligned weight / output
  s.vec_epilogue =
      k % 8 == 0 && reinterpret_cast<uintptr_t>(weight) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  bool ok = true;
  switch (dtype) {
    case DType::kF16:
      launch<__half>(weight, bank, alpha, out, plan, s, ws, counters, stream);
      break;
    case DType::kBF16:
      launch<__nv_bfloat16>(weight, bank, alpha, out, plan, s, ws, counters, stream);
      break;
    case DType::kF32:
      launch<float>(weight, bank, alpha, out, plan, s, ws, counters, stream);
      break;
    default:
      ok = false;
  }
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace supsup_cuda
