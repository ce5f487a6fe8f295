// Dequantize one packed segment into a dense matrix, for prefill (dense GEMM follows).
//
// out[(row) * out_stride + col_offset + j] = s·(q − z) for the segment's row `row` and column
// j (z read from the segment's zero-point stream, s from its fp16 scales or its S-bit scale
// codes × steps: BsScales); a row segment passes `out` already offset to its first row, a
// column segment passes its
// first column as col_offset. One thread per (row, 32-value chunk): it loads the chunk's BITS
// words once and writes its up to 32 values. OUT_HALF = 1 writes fp16 (rounded to nearest
// even: the bound counts this rounding), 0 writes fp32 (exact).
#include "common.cuh"

template <int BITS, int OUT_HALF>
__global__ void bs_dequant(const unsigned int* __restrict__ qdata,
                           const unsigned short* __restrict__ scale,
                           const unsigned int* __restrict__ codes,
                           const unsigned short* __restrict__ step, int S,
                           const unsigned int* __restrict__ zero, void* __restrict__ out,
                           int rows, int cols, int group_size, int out_stride,
                           int col_offset) {
    const int nchunks = (cols + 31) / 32;
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)rows * nchunks) return;
    const int row = (int)(t / nchunks);
    const int c = (int)(t % nchunks);
    const int wpr = (BITS * cols + 31) / 32;
    const BsScales sc = bs_scales(scale, codes, step, S, cols, group_size);
    unsigned int words[BITS];
    bs_load_chunk<BITS>(qdata + (size_t)row * wpr, wpr, c, words);
    const size_t base = (size_t)row * out_stride + col_offset;
#pragma unroll
    for (int k = 0; k < 32; ++k) {
        const int j = c * 32 + k;
        if (j < cols) {
            const int g = j / group_size;
            const float s = sc.at(row, g);
            const float z = bs_zero_at<BITS>(zero, (size_t)row * sc.ngroups + g);
            const float w = s * (bs_code_to_float(bs_extract<BITS>(words, k)) - z);
            if (OUT_HALF)
                static_cast<unsigned short*>(out)[base + j] = bs_float_to_half(w);
            else
                static_cast<float*>(out)[base + j] = w;
        }
    }
}

// A 16-bit (fp16) segment copied into the dense matrix, same addressing as bs_dequant: one
// thread per (row, column).
template <int OUT_HALF>
__global__ void bs_dequant_fp16(const unsigned short* __restrict__ weight,
                                void* __restrict__ out, int rows, int cols, int out_stride,
                                int col_offset) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)rows * cols) return;
    const int row = (int)(t / cols);
    const int j = (int)(t % cols);
    const unsigned short h = weight[t];
    const size_t idx = (size_t)row * out_stride + col_offset + j;
    if (OUT_HALF)
        static_cast<unsigned short*>(out)[idx] = h;
    else
        static_cast<float*>(out)[idx] = bs_half_to_float(h);
}
