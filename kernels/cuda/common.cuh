// Shared helpers of bitsack's kernels. No CUDA headers are included, so NVRTC compiles these
// sources without an include path (fp16 is converted with PTX `cvt`, not cuda_fp16.h).
#pragma once

// fp16 bit pattern -> fp32 (exact: every fp16 value, subnormals included, is an fp32 value).
__device__ __forceinline__ float bs_half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// fp32 -> fp16 bit pattern, round to nearest even.
__device__ __forceinline__ unsigned short bs_float_to_half(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Value k (0..31) of a 32-value chunk of BITS-bit codes held in the chunk's BITS words.
// Value k occupies bits [k*BITS, (k+1)*BITS) of the little-endian concatenation of the words
// (formats.PackFormat.BITSTREAM_U32); it straddles two words when the shift + BITS > 32.
template <int BITS>
__device__ __forceinline__ unsigned int bs_extract(const unsigned int (&words)[BITS], int k) {
    const int bit = k * BITS;
    const int wi = bit >> 5;
    const int sh = bit & 31;
    unsigned int v = words[wi] >> sh;
    if (sh + BITS > 32) v |= words[wi + 1] << (32 - sh);
    return v & ((1u << BITS) - 1u);
}

// Value i of a stream of `bits`-bit values: bits at bit i·bits of the little-endian
// concatenation of the stream's words (formats.pack_zero: a segment's zero points, or its
// scale codes, form one stream, not one per row). With `bits` a compile-time constant after
// inlining, as in bs_zero_at, the mask folds away (the straddle test depends on the shift).
__device__ __forceinline__ unsigned int bs_stream_at(const unsigned int* __restrict__ words,
                                                     size_t i, int bits) {
    const size_t bit = i * bits;
    const size_t wi = bit >> 5;
    const int sh = (int)(bit & 31);
    // branchless (lanes of a warp straddle differently): the next word is read only when
    // the value straddles into it; otherwise the value's bits lie in the low word
    const size_t wi1 = wi + (sh + bits > 32);
    const unsigned long long v =
        (((unsigned long long)__ldg(words + wi1) << 32) | __ldg(words + wi)) >> sh;
    return (unsigned int)v & ((1u << bits) - 1u);
}

// Zero point i (= row·ngroups + group) of a segment's zero-point stream, as a float (exact).
template <int BITS>
__device__ __forceinline__ float bs_zero_at(const unsigned int* __restrict__ zs, size_t i) {
    return (float)bs_stream_at(zs, i, BITS);
}

// A segment's group scales: fp16 values [rows, ngroups] (S == 0), or double-quantized
// (S > 0): the S-bit code k of group i = row·ngroups + g in one stream times the fp16 step of
// the row's 256-column super-block holding the group's first column (formats.SUPER_COLS;
// step is [rows, nsuper]). k·step has at most 11 significant bits, so the fp32 product is
// exact and equals the expanded fp16 scale (grid.expand_scales): both paths compute the same
// ŵ. Unused pointers may be any valid buffer (never read).
struct BsScales {
    const unsigned short* __restrict__ fp16;
    const unsigned int* __restrict__ codes;
    const unsigned short* __restrict__ step;
    int S, ngroups, nsuper, group_size;

    __device__ __forceinline__ float at(size_t row, int g) const {
        if (S == 0) return bs_half_to_float(fp16[row * ngroups + g]);
        const float k = (float)bs_stream_at(codes, row * ngroups + g, S);
        return k * bs_half_to_float(step[row * nsuper + (g * group_size) / 256]);
    }
};

__device__ __forceinline__ BsScales bs_scales(const unsigned short* fp16,
                                              const unsigned int* codes,
                                              const unsigned short* step, int S, int cols,
                                              int group_size) {
    BsScales sc;
    sc.fp16 = fp16;
    sc.codes = codes;
    sc.step = step;
    sc.S = S;
    sc.ngroups = (cols + group_size - 1) / group_size;  // the last group may be short
    sc.nsuper = (cols + 255) / 256;
    sc.group_size = group_size;
    return sc;
}

// Exact float of a code v < 2^23 without an int->float conversion instruction (a quarter-rate
// op on recent GPUs): the bit pattern 0x4B000000 | v is the float 2^23 + v, and subtracting
// 2^23 is exact. Same value as (float)v.
__device__ __forceinline__ float bs_code_to_float(unsigned int v) {
    return __int_as_float(0x4B000000u | v) - 8388608.f;
}

// Load the BITS words of chunk c of a row with `wpr` words; words past the row's end are 0
// (the last chunk of a row whose length is not a multiple of 32 is shorter).
template <int BITS>
__device__ __forceinline__ void bs_load_chunk(const unsigned int* __restrict__ qrow, int wpr,
                                              int c, unsigned int (&words)[BITS]) {
#pragma unroll
    for (int i = 0; i < BITS; ++i) {
        const int idx = c * BITS + i;
        words[i] = idx < wpr ? __ldg(qrow + idx) : 0u;
    }
}
