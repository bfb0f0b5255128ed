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

// The sparse BatchTopK step (src/train/sparse.rs). Each kernel mirrors a loop of cpu.rs; decode
// and the decoder's gradient keep its order of operations and its roundings (so they agree with
// it to the bit), the codes' gradients sum in a warp's order instead.

// Per row of the contiguous (rows, n) scaled codes: the columns (ascending) and `post` values of
// the entries s > t and s > 0, and of the first take[row] entries s == t when t > 0 (t =
// thresh[row]), written from offsets[row]. One block per row (blockDim a multiple of 32, at most
// 1024); each tile of blockDim entries is compacted with warp ballots and a scan of the warps'
// counts. written[row] gets the number kept, which the host checks against its own count; no
// write goes past the row's share.
extern "C" __global__ void __launch_bounds__(1024) pipe_compact_f32(const float *__restrict__ scaled, const float *__restrict__ post,
                                            const float *__restrict__ thresh,
                                            const unsigned int *__restrict__ take,
                                            const unsigned int *__restrict__ offsets, const unsigned int n,
                                            unsigned int *__restrict__ cols, float *__restrict__ vals,
                                            unsigned int *__restrict__ written) {
    __shared__ unsigned int warp_kept[32];
    __shared__ unsigned int warp_tied[32];
    __shared__ unsigned int base_kept;
    __shared__ unsigned int base_tied;
    const unsigned int row = blockIdx.x;
    const float t = thresh[row];
    const unsigned int quota = take[row];
    const unsigned int out = offsets[row];
    const unsigned int share = offsets[row + 1] - out;
    const float *s = scaled + (unsigned long long)row * n;
    const float *p = post + (unsigned long long)row * n;
    const unsigned int lane = threadIdx.x & 31;
    const unsigned int warp = threadIdx.x >> 5;
    const unsigned int warps = blockDim.x >> 5;
    const unsigned int below = (1u << lane) - 1u;
    if (threadIdx.x == 0) {
        base_kept = 0;
        base_tied = 0;
    }
    __syncthreads();
    for (unsigned int start = 0; start < n; start += blockDim.x) {
        const unsigned int j = start + threadIdx.x;
        const float v = j < n ? s[j] : 0.0f;
        const bool above = j < n && v > t && v > 0.0f;
        const bool tied = j < n && t > 0.0f && v == t;
        const unsigned int tb = __ballot_sync(0xffffffffu, tied);
        if (lane == 0) {
            warp_tied[warp] = __popc(tb);
        }
        __syncthreads();
        unsigned int tie_rank = base_tied + __popc(tb & below);
        for (unsigned int w = 0; w < warp; ++w) {
            tie_rank += warp_tied[w];
        }
        const bool kept = above || (tied && tie_rank < quota);
        const unsigned int kb = __ballot_sync(0xffffffffu, kept);
        if (lane == 0) {
            warp_kept[warp] = __popc(kb);
        }
        __syncthreads();
        unsigned int pos = base_kept + __popc(kb & below);
        for (unsigned int w = 0; w < warp; ++w) {
            pos += warp_kept[w];
        }
        if (kept && pos < share) {
            cols[out + pos] = j;
            vals[out + pos] = p[j];
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (unsigned int w = 0; w < warps; ++w) {
                base_kept += warp_kept[w];
                base_tied += warp_tied[w];
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        written[row] = base_kept;
    }
}

// x̂[row, c] = Σ_e vals[e] · dec[l, cols[e], k] over the row's entries (c = l·d + k), then
// + bias[c] when use_bias: cpu.rs's `decode_sparse`. dec is (2, f, d); one block per row, the
// threads over the 2d columns.
extern "C" __global__ void pipe_decode_f32(const unsigned int *__restrict__ offsets,
                                           const unsigned int *__restrict__ cols,
                                           const float *__restrict__ vals, const float *__restrict__ dec,
                                           const float *__restrict__ bias, const unsigned int use_bias,
                                           const unsigned int f, const unsigned int d,
                                           float *__restrict__ out) {
    const unsigned int row = blockIdx.x;
    const unsigned int width = 2 * d;
    const unsigned int first = offsets[row];
    const unsigned int last = offsets[row + 1];
    for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
        const unsigned int l = c >= d ? 1 : 0;
        const float *base = dec + (unsigned long long)l * f * d + (c - l * d);
        float acc = 0.0f;
        for (unsigned int e = first; e < last; ++e) {
            acc = __fadd_rn(acc, __fmul_rn(vals[e], base[(unsigned long long)cols[e] * d]));
        }
        if (use_bias) {
            acc = __fadd_rn(acc, bias[c]);
        }
        out[(unsigned long long)row * width + c] = acc;
    }
}

// For each entry e of each row: out[e] = ⟨u[row, :], [dec[0, j, :] | dec[1, j, :]]⟩ with j =
// cols[e], u (rows, 2d): the codes' gradients. One block per row, one warp per entry (strided
// over the row's entries), each lane summing every 32nd column, then a shuffle tree.
extern "C" __global__ void pipe_code_grads_f32(const unsigned int *__restrict__ offsets,
                                               const unsigned int *__restrict__ cols,
                                               const float *__restrict__ u, const float *__restrict__ dec,
                                               const unsigned int f, const unsigned int d,
                                               float *__restrict__ out) {
    const unsigned int row = blockIdx.x;
    const unsigned int width = 2 * d;
    const unsigned int lane = threadIdx.x & 31;
    const unsigned int warps = blockDim.x >> 5;
    const float *ur = u + (unsigned long long)row * width;
    for (unsigned int e = offsets[row] + (threadIdx.x >> 5); e < offsets[row + 1]; e += warps) {
        const unsigned long long j = cols[e];
        float acc = 0.0f;
        for (unsigned int c = lane; c < width; c += 32) {
            const unsigned int l = c >= d ? 1 : 0;
            acc = __fadd_rn(acc, __fmul_rn(ur[c], dec[((unsigned long long)l * f + j) * d + (c - l * d)]));
        }
        for (unsigned int off = 16; off > 0; off >>= 1) {
            acc = __fadd_rn(acc, __shfl_down_sync(0xffffffffu, acc, off));
        }
        if (lane == 0) {
            out[e] = acc;
        }
    }
}

// The backward by latent (cpu.rs's `sparse_backward_by`): for latent j, over its entries q in
// start[j]..start[j+1] (row rows[q], entry idx[q] of vals/dpre):
//   dwd[l, j, k]  = Σ_q vals[idx] · up[row, l·d + k]     (dec's gradient, (2, f, d))
//   dwe_t[j, c]   = Σ_q dpre[idx] · x[row, c]            (the encoder's, transposed: (f, 2d))
//   dbe[j]        = Σ_q dpre[idx]
// up and x (rows, 2d). One block per latent, the threads over the 2d columns; every output is
// written, so none needs zeroing.
extern "C" __global__ void pipe_sparse_backward_f32(
    const unsigned int *__restrict__ start, const unsigned int *__restrict__ rows,
    const unsigned int *__restrict__ idx, const float *__restrict__ vals, const float *__restrict__ dpre,
    const float *__restrict__ up, const float *__restrict__ x, const unsigned int f, const unsigned int d,
    float *__restrict__ dwd, float *__restrict__ dwe_t, float *__restrict__ dbe) {
    const unsigned long long j = blockIdx.x;
    const unsigned int width = 2 * d;
    const unsigned int first = start[j];
    const unsigned int last = start[j + 1];
    for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
        float acc_d = 0.0f;
        float acc_e = 0.0f;
        for (unsigned int q = first; q < last; ++q) {
            const unsigned long long r = rows[q] * (unsigned long long)width + c;
            const unsigned int i = idx[q];
            acc_d = __fadd_rn(acc_d, __fmul_rn(vals[i], up[r]));
            acc_e = __fadd_rn(acc_e, __fmul_rn(dpre[i], x[r]));
        }
        const unsigned int l = c >= d ? 1 : 0;
        dwd[((unsigned long long)l * f + j) * d + (c - l * d)] = acc_d;
        dwe_t[j * width + c] = acc_e;
    }
    if (threadIdx.x == 0) {
        float acc = 0.0f;
        for (unsigned int q = first; q < last; ++q) {
            acc = __fadd_rn(acc, dpre[idx[q]]);
        }
        dbe[j] = acc;
    }
}

// out (cols, rows) = in (rows, cols)ᵀ by 32 × 32 tiles through shared memory, so that both the
// reads and the writes are coalesced. Grid (⌈cols/32⌉, ⌈rows/32⌉), block (32, 8).
extern "C" __global__ void pipe_transpose_f32(const float *__restrict__ in, const unsigned int rows,
                                              const unsigned int cols, float *__restrict__ out) {
    __shared__ float tile[32][33];
    const unsigned int c0 = blockIdx.x * 32;
    const unsigned int r0 = blockIdx.y * 32;
    for (unsigned int i = threadIdx.y; i < 32; i += blockDim.y) {
        const unsigned int r = r0 + i;
        const unsigned int c = c0 + threadIdx.x;
        if (r < rows && c < cols) {
            tile[i][threadIdx.x] = in[(unsigned long long)r * cols + c];
        }
    }
    __syncthreads();
    for (unsigned int i = threadIdx.y; i < 32; i += blockDim.y) {
        const unsigned int c = c0 + i;
        const unsigned int r = r0 + threadIdx.x;
        if (r < rows && c < cols) {
            out[(unsigned long long)c * rows + r] = tile[threadIdx.x][i];
        }
    }
}
