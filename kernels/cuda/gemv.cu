// Mixed-bit GEMV for decode: y[b, :] (+)= x[b, :] · Ŵ_segᵀ for one packed segment, b < batch ≤ 8.
//
// A matrix with segments of different bit-widths is one launch per segment on the same stream:
// a row segment (axis 0) writes its own rows of y (y_offset = its first row); a column segment
// (axis 1) reads its columns of x (x_offset = its first column) and adds into y
// (accumulate = 1 for every column segment but the first). Launches on one stream run in order,
// so the sum over segments is deterministic.
//
// Thread layout: one warp per segment row; lane l takes the 32-value chunks l, l+32, l+64, ...
// of the row (chunk c = columns [32c, 32c+32) = words [c*BITS, (c+1)*BITS)), dequantizes each
// value w = s·(q − z) in fp32 (exact; s from fp16 scales or S-bit scale codes × steps:
// BsScales) and accumulates w·x in fp32; the 32 lane sums are then
// added by a shuffle tree. bitsack/kernels/emulate.py is a NumPy port of exactly this
// indexing, tested on CPU against the reference.
#include "common.cuh"

#define BS_MAX_BATCH 8

template <int BITS>
__device__ __forceinline__ void bs_gemv_row(
    const unsigned int* __restrict__ qdata, const BsScales& sc,
    const unsigned int* __restrict__ zero, const float* __restrict__ x,
    float* __restrict__ y, int row, int lane, int cols, int group_size, int batch,
    int x_stride, int x_offset, int y_stride, int y_offset, int accumulate) {
    const int wpr = (BITS * cols + 31) / 32;
    const int nchunks = (cols + 31) / 32;
    const unsigned int* qrow = qdata + (size_t)row * wpr;
    const size_t zrow = (size_t)row * sc.ngroups;  // this row's first zero point in the stream
    // A chunk lies inside one group when the group size is a multiple of 32.
    const bool chunk_in_group = (group_size % 32) == 0;

    float acc[BS_MAX_BATCH];
#pragma unroll
    for (int b = 0; b < BS_MAX_BATCH; ++b) acc[b] = 0.f;

    for (int c = lane; c < nchunks; c += 32) {
        unsigned int words[BITS];
        bs_load_chunk<BITS>(qrow, wpr, c, words);
        float s = 0.f, z = 0.f;
        if (chunk_in_group) {
            const int g = (c * 32) / group_size;
            s = sc.at(row, g);
            z = bs_zero_at<BITS>(zero, zrow + g);
        }
#pragma unroll
        for (int k = 0; k < 32; ++k) {
            const int j = c * 32 + k;
            if (j < cols) {
                if (!chunk_in_group) {
                    const int g = j / group_size;
                    s = sc.at(row, g);
                    z = bs_zero_at<BITS>(zero, zrow + g);
                }
                const float w = s * (bs_code_to_float(bs_extract<BITS>(words, k)) - z);
                const float* xj = x + x_offset + j;
#pragma unroll
                for (int b = 0; b < BS_MAX_BATCH; ++b)
                    if (b < batch) acc[b] += w * xj[(size_t)b * x_stride];
            }
        }
    }
#pragma unroll
    for (int b = 0; b < BS_MAX_BATCH; ++b) {
        if (b < batch) {
            float v = acc[b];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
            if (lane == 0) {
                float* out = y + (size_t)b * y_stride + y_offset + row;
                *out = accumulate ? *out + v : v;
            }
        }
    }
}

template <int BITS>
__global__ void bs_gemv(const unsigned int* __restrict__ qdata,
                        const unsigned short* __restrict__ scale,
                        const unsigned int* __restrict__ codes,
                        const unsigned short* __restrict__ step, int S,
                        const unsigned int* __restrict__ zero, const float* __restrict__ x,
                        float* __restrict__ y, int rows, int cols, int group_size, int batch,
                        int x_stride, int x_offset, int y_stride, int y_offset, int accumulate) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;  // whole warps exit together: the shuffles stay full-warp
    const BsScales sc = bs_scales(scale, codes, step, S, cols, group_size);
    bs_gemv_row<BITS>(qdata, sc, zero, x, y, row, lane, cols, group_size, batch, x_stride,
                      x_offset, y_stride, y_offset, accumulate);
}

// 16-bit (fp16 weight) segment, same thread layout: lane l takes columns l, l+32, ...
__global__ void bs_gemv_fp16(const unsigned short* __restrict__ weight,
                             const float* __restrict__ x, float* __restrict__ y, int rows,
                             int cols, int batch, int x_stride, int x_offset, int y_stride,
                             int y_offset, int accumulate) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const unsigned short* wrow = weight + (size_t)row * cols;
    float acc[BS_MAX_BATCH];
#pragma unroll
    for (int b = 0; b < BS_MAX_BATCH; ++b) acc[b] = 0.f;
    for (int j = lane; j < cols; j += 32) {
        const float w = bs_half_to_float(wrow[j]);
#pragma unroll
        for (int b = 0; b < BS_MAX_BATCH; ++b)
            if (b < batch) acc[b] += w * x[(size_t)b * x_stride + x_offset + j];
    }
#pragma unroll
    for (int b = 0; b < BS_MAX_BATCH; ++b) {
        if (b < batch) {
            float v = acc[b];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
            if (lane == 0) {
                float* out = y + (size_t)b * y_stride + y_offset + row;
                *out = accumulate ? *out + v : v;
            }
        }
    }
}
