// CUDA kernels of the `train` stage, compiled to PTX by stages/build.rs (feature `cuda` only) and
// loaded by src/train/cuda.rs. Explicitly rounded intrinsics (__fmul_rn, __fadd_rn, ...) keep nvcc
// from contracting products and sums into FMAs, so each kernel rounds exactly as the CPU code it
// mirrors.

// One Adam step (torch.optim.Adam, single-tensor path, no weight decay) over n f32 entries, in
// place, in the operation order of adam.rs's `step_fused_cpu`:
//   m = b1·m + (1−b1)·g;  v = b2·v + (1−b2)·g²;  denom = √v · (1/√bc2) + eps;  p −= (m / denom) · step
// with step = lr / bc1.
extern "C" __global__ void pipe_adam_f32(float *__restrict__ p, float *__restrict__ m,
                                         float *__restrict__ v, const float *__restrict__ g,
                                         const unsigned long long n, const float b1, const float nb1,
                                         const float b2, const float nb2, const float inv_sqrt_bc2,
                                         const float eps, const float step) {
    const unsigned long long stride = (unsigned long long)blockDim.x * gridDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        const float gi = g[i];
        const float mi = __fadd_rn(__fmul_rn(m[i], b1), __fmul_rn(gi, nb1));
        const float vi = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(gi, gi), nb2));
        const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vi), inv_sqrt_bc2), eps);
        const float update = __fmul_rn(__fdiv_rn(mi, denom), step);
        p[i] = __fsub_rn(p[i], update);
        m[i] = mi;
        v[i] = vi;
    }
}

// One pass of the radix select behind `kth_largest`: per row of the contiguous (rows, n) f32
// values, the histogram (2048 bins) of the digit (bits >> shift) & digit_mask of the values' bit
// patterns, among the entries whose bits under high_mask equal that row's prefix. Values are ≥ 0,
// whose bit patterns order as the values do; an entry with the sign bit set (−0) counts as +0.
// Grid: (blocks per row, rows); each block counts into shared memory and adds its bins to hist
// (rows × 2048, zeroed by the caller).
extern "C" __global__ void pipe_radix_hist(const float *__restrict__ values, const unsigned long long n,
                                           const unsigned int *__restrict__ prefix,
                                           const unsigned int high_mask, const unsigned int shift,
                                           const unsigned int digit_mask, unsigned int *__restrict__ hist) {
    __shared__ unsigned int local[2048];
    for (unsigned int i = threadIdx.x; i < 2048; i += blockDim.x) {
        local[i] = 0;
    }
    __syncthreads();
    const unsigned int row = blockIdx.y;
    const float *r = values + (unsigned long long)row * n;
    const unsigned int want = prefix[row];
    const unsigned long long stride = (unsigned long long)blockDim.x * gridDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        unsigned int bits = __float_as_uint(r[i]);
        if (bits >> 31) {
            bits = 0;
        }
        if ((bits & high_mask) == want) {
            atomicAdd(&local[(bits >> shift) & digit_mask], 1u);
        }
    }
    __syncthreads();
    unsigned int *out = hist + (unsigned long long)row * 2048;
    for (unsigned int i = threadIdx.x; i < 2048; i += blockDim.x) {
        if (local[i] != 0) {
            atomicAdd(&out[i], local[i]);
        }
    }
}
