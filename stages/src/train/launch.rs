//! The launch geometry of the `train` stage's CUDA kernels (`kernels.cu`): one place for the
//! grid and block sizes that the kernels' host side (`cuda`) uses and that the tests running
//! the kernels on the CPU (`kernel_sim`) use too.

/// A kernel launch's grid and block dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

const fn one_d(blocks: u32, threads: u32) -> Geometry {
    Geometry { grid: (blocks, 1, 1), block: (threads, 1, 1) }
}

/// `pipe_radix_hist` over (rows, n): up to 1024 blocks of 256 threads per row, each thread
/// reading at least 16 values.
pub(crate) fn radix_hist(rows: usize, n: usize) -> Geometry {
    let per_row = (n as u64).div_ceil(256 * 16).clamp(1, 1024) as u32;
    Geometry { grid: (per_row, rows as u32, 1), block: (256, 1, 1) }
}

/// `pipe_adam_f32` over n entries, a grid-stride loop; `blocks` overrides the grid.
pub(crate) fn adam(n: u64, blocks: Option<u32>) -> Geometry {
    one_d(blocks.unwrap_or(n.div_ceil(256).clamp(1, 1 << 16) as u32), 256)
}

/// `pipe_compact_f32`: one block of 1024 threads per row.
pub(crate) fn compact(rows: usize) -> Geometry {
    one_d(rows as u32, 1024)
}

/// `pipe_decode_f32`: one block per row.
pub(crate) fn decode(rows: usize) -> Geometry {
    one_d(rows as u32, 256)
}

/// `pipe_code_grads_f32`: one block per row, one warp per entry.
pub(crate) fn code_grads(rows: usize) -> Geometry {
    one_d(rows as u32, 256)
}

/// `pipe_sparse_backward_f32`: one block per latent.
pub(crate) fn sparse_backward(f: usize) -> Geometry {
    one_d(f as u32, 256)
}

/// `pipe_transpose_f32` of a (rows, cols) matrix: 32 × 32 tiles, blocks of 32 × 8 threads.
pub(crate) fn transpose(rows: usize, cols: usize) -> Geometry {
    Geometry { grid: (cols.div_ceil(32) as u32, rows.div_ceil(32) as u32, 1), block: (32, 8, 1) }
}
