// bitsack CPU kernels for packed segments (formats.PackFormat.BITSTREAM_U32 / FP16).
//
// Built by bitsack/kernels/cpu_build.py with the machine's compiler (-O3 -march=native
// -fopenmp), loaded with ctypes; plain C entry points, no Python or torch headers.
//
//   bs_gemv      y[b, y_off + r] (+)= Σ_j ŵ[r, j] · x[b, x_off + j]    (decode: batch ≤ 8)
//   bs_dequant   out[r, j] = ŵ[r0 + r, j] for a tile of rows            (prefill: then BLAS)
//
// ŵ = s·(q − z) is computed in fp32 exactly as the format defines it (fp16 scale widened to
// fp32, or for double-quantized scales k·step from the S-bit code stream and the fp16 steps:
// the same value; the code and the zero point, read from the segment's zero-point stream,
// converted exactly): every product and the sum are fp32, summed in
// an order the bound does not care about (bitsack.kernels.bounds: γ_n covers any order, with
// or without FMA). Rows are split over OpenMP threads; each output is written by one thread.
//
// Unpacking, for any width 1..8 (Frantar et al.'s Marlin and llama.cpp's k-quants unpack with
// per-width shuffles; this is a width-generic variant of the idea): a chunk of 32 values of
// BITS bits fills exactly BITS words. Value k sits at bit k·BITS: word wi = k·BITS / 32, shift
// sh = k·BITS % 32, straddling into word wi + 1 when sh + BITS > 32. With the chunk's words in
// one 16-lane vector, a lane-wise permute brings word wi (and wi + 1) of each value's lane into
// place, two variable shifts and a mask extract 16 values at once; the permute indices and
// shifts are compile-time constants per BITS.
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <omp.h>
#if defined(__F16C__) || defined(__AVX512VBMI2__)
#include <immintrin.h>
#endif

typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v16f __attribute__((vector_size(64)));

#define BS_MAX_BATCH 8

static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    // exact fp16 -> fp32, subnormals included
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  // subnormal: normalize
        int e = -1;
        do { man <<= 1; ++e; } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FFu) << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline v16f load16_half(const uint16_t* p) {
    v16f out;
#if defined(__F16C__)
    __m128i a, b;
    std::memcpy(&a, p, 16);
    std::memcpy(&b, p + 8, 16);
    __m256 fa = _mm256_cvtph_ps(a), fb = _mm256_cvtph_ps(b);
    std::memcpy(&out, &fa, 32);
    std::memcpy(reinterpret_cast<char*>(&out) + 32, &fb, 32);
#else
    for (int i = 0; i < 16; ++i) out[i] = half_to_float(p[i]);
#endif
    return out;
}

static inline v16f load16f(const float* p) {
    v16f v;
    std::memcpy(&v, p, 64);
    return v;
}

static inline float hsum(v16f v) {
    float s = 0.f;
    for (int i = 0; i < 16; ++i) s += v[i];
    return s;
}

// The 16 codes of half h (values 16h .. 16h+15) of a chunk whose words are in `w` (lanes
// 0..BITS-1; lane BITS may hold anything: it is read only for values that do not straddle,
// and then masked away). The word index and shift of each lane are constant vectors per BITS
// and h (folded by the compiler).
template <int BITS>
static inline __attribute__((always_inline)) v16u extract16(v16u w, int h) {
    const v16u lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const v16u bit = (lane + (uint32_t)(16 * h)) * (uint32_t)BITS;
    const v16u wi = bit >> 5, sh = bit & 31u;
    const v16u mask = (v16u){} + (uint32_t)((1u << BITS) - 1u);
    if (32 % BITS == 0) {
        // no value straddles: one permute, one shift
        return (__builtin_shuffle(w, wi) >> sh) & mask;
    }
#if defined(__AVX512VBMI2__)
    // one funnel shift: (lo >> sh) | (hi << (32 − sh)) per lane
    __m512i lo, hi, shv;
    const v16u a = __builtin_shuffle(w, wi), b = __builtin_shuffle(w, wi + 1u);
    std::memcpy(&lo, &a, 64);
    std::memcpy(&hi, &b, 64);
    std::memcpy(&shv, &sh, 64);
    const __m512i f = _mm512_shrdv_epi32(lo, hi, shv);
    v16u out;
    std::memcpy(&out, &f, 64);
    return out & mask;
#else
    const v16u lo = __builtin_shuffle(w, wi) >> sh;
    // (x << 1) << (31 − sh) = x << (32 − sh), defined for sh = 0 too (gives 0)
    const v16u hi = (__builtin_shuffle(w, wi + 1u) << 1) << (31u - sh);
    return (lo | hi) & mask;
#endif
}

// Value i of a stream of `bits`-bit values: bits at bit i·bits of the little-endian
// concatenation of the stream's words (formats.pack_zero). Branchless: the word after wi is
// read only when the value straddles into it (wi1 = wi otherwise, and the value's bits then
// lie in the low word), so no load passes the stream's end and no branch is mispredicted
// (a straddle test taken for some groups and not others cost decode 1.2–1.5× with 6-bit
// scale codes: bench/results/kernels_cpu_scales.md).
static inline uint32_t stream_at(const uint32_t* words, long i, int bits) {
    const long bit = i * bits;
    const long wi = bit >> 5;
    const int sh = (int)(bit & 31);
    const long wi1 = wi + (sh + bits > 32);
    const uint64_t v = (((uint64_t)words[wi1] << 32) | words[wi]) >> sh;
    return (uint32_t)v & ((1u << bits) - 1u);
}

// Zero point i (= row·ngroups + group) of a segment's zero-point stream.
template <int BITS>
static inline float zero_at(const uint32_t* zs, long i) {
    return (float)stream_at(zs, i, BITS);
}

// A segment's group scales: fp16 values [rows, ngroups], or (double-quantized: formats
// SCALE_BITS) S-bit codes k in one stream like the zero points, times an fp16 step per row and
// 256 columns: s = k·step, exact in fp32 and equal to the fp16 value the format defines (the
// steps keep 11 − S significant bits), so both forms give the same ŵ bit for bit.
struct Scales {
    const uint16_t* fp16 = nullptr;   // [rows, ngroups], or null with codes
    const uint32_t* codes = nullptr;  // S-bit codes, index row·ngroups + group
    const uint16_t* step = nullptr;   // [rows, nsuper]
    int S = 0, ngroups = 1, nsuper = 1, G = 1;

    inline float at(long r, int g) const {
        if (fp16) return half_to_float(fp16[r * ngroups + g]);
        const float k = (float)stream_at(codes, r * ngroups + g, S);
        return k * half_to_float(step[r * nsuper + (((long)g * G) >> 8)]);
    }
};

static inline Scales make_scales(const uint16_t* s, const uint32_t* codes, const uint16_t* step,
                                 int S, int cols, int G) {
    Scales sc;
    sc.fp16 = codes ? nullptr : s;
    sc.codes = codes;
    sc.step = step;
    sc.S = S;
    sc.ngroups = (cols + G - 1) / G;
    sc.nsuper = (cols + 255) / 256;
    sc.G = G;
    return sc;
}

// Words of chunk c of a row: 16 words from its first (an unaligned vector load) when the
// buffer holds them, else the ones that exist, zeros after.
static inline v16u load_words(const uint32_t* p, const uint32_t* end) {
    v16u w;
    if (p + 16 <= end) {
        std::memcpy(&w, p, 64);
    } else {
        w = (v16u){};
        const long n = end - p;
        for (long i = 0; i < n && i < 16; ++i) w[i] = p[i];
    }
    return w;
}

// Dequantized values of a row, 32 columns (one chunk) at a time, chunks in order. Columns
// past `cols` get codes from padding (or the next row's words) and the last group's
// parameters: finite values that the caller multiplies by 0 or drops.
template <int BITS>
struct RowDecoder {
    const uint32_t* qrow = nullptr;
    const uint32_t* qend = nullptr;
    Scales sc;
    long row = 0;
    const uint32_t* zs = nullptr;  // the segment's zero-point stream
    long zbase = 0;                // index of this row's first zero point in it
    int cols = 0, G = 1, ngroups = 1;
    // Group tracking without a division per vector (when G % 16 == 0 a 16-column vector lies
    // in one group): the current group g covers columns [gstart, gend).
    int g = 0, gend = 0;
    float s = 0.f, z = 0.f;

    RowDecoder() = default;
    inline RowDecoder(const uint32_t* q, const uint32_t* e, const Scales& scales, long r,
                      const uint32_t* z_stream, int c, int gs, int ng)
        : qrow(q), qend(e), sc(scales), row(r), zs(z_stream), zbase(r * ng), cols(c), G(gs),
          ngroups(ng) {
        gend = G;
        s = sc.at(row, 0);
        z = zero_at<BITS>(zs, zbase);
    }

    // values of columns [j0, j0 + 16), j0 a multiple of 16, called in increasing j0
    inline v16f scale16(v16f qf, int j0) {
        if (G % 16 == 0) {
            if (j0 >= gend && g + 1 < ngroups) {
                ++g;
                gend += G;
                s = sc.at(row, g);
                z = zero_at<BITS>(zs, zbase + g);
            }
            return qf * s + (-(z * s));  // = s·(q − z) exactly (see gemv1_g32)
        }
        v16f sv = {}, zv = {};
        for (int l = 0; l < 16; ++l) {
            int gl = (j0 + l) / G;
            if (gl >= ngroups) gl = ngroups - 1;
            sv[l] = sc.at(row, gl);
            zv[l] = zero_at<BITS>(zs, zbase + gl);
        }
        return (qf - zv) * sv;
    }

    inline void chunk(int c, v16f out[2]) {
        const v16u w = load_words(qrow + (long)c * BITS, qend);
        out[0] = scale16(__builtin_convertvector(extract16<BITS>(w, 0), v16f), c * 32);
        out[1] = scale16(__builtin_convertvector(extract16<BITS>(w, 1), v16f), c * 32 + 16);
    }
};

// x rows are padded by the caller to a multiple of 32 columns (zeros), stride x_stride.
//
// Batch 1 (decode) with G % 32 == 0 (every chunk inside one group): RB rows at a time per
// thread, group by group, so a chunk's x vectors are loaded once for RB rows, a group's
// scale and zero are converted once, and the 2·RB accumulator chains are independent
// (latency hidden). SAFE = every 16-word load stays inside the buffer (all but the last rows).
template <int BITS, int RB, bool SAFE>
static inline void gemv1_g32(const uint32_t* qdata, const Scales& sc,
                             const uint32_t* zero, int r, int wpr, int G, int ngroups,
                             int nchunks, const uint32_t* qend, const float* x, float* y,
                             int accumulate) {
    const uint32_t* q[RB];
    long zr[RB];  // index of each row's first zero point in the stream
    v16f acc0[RB], acc1[RB];
#pragma GCC unroll 8
    for (int i = 0; i < RB; ++i) {
        q[i] = qdata + (long)(r + i) * wpr;
        zr[i] = (long)(r + i) * ngroups;
        acc0[i] = (v16f){};
        acc1[i] = (v16f){};
    }
    const int cpg = G / 32;  // chunks per group
    for (int g = 0; g < ngroups; ++g) {
        // ŵ = s·(q − z) computed as q·s + (−z·s): z·s and q·s are exact in fp32 (an integer
        // ≤ 255 times an fp16: ≤ 19 significant bits) and so is their difference (≤ 20), so
        // the fused multiply-add yields exactly the format's value, one instruction instead
        // of two. (Without FMA contraction the compiler's q·s then + is exact too.)
        float s[RB], nzs[RB];
#pragma GCC unroll 8
        for (int i = 0; i < RB; ++i) {
            s[i] = sc.at(r + i, g);
            nzs[i] = -(zero_at<BITS>(zero, zr[i] + g) * s[i]);
        }
        const int c1 = (g + 1) * cpg < nchunks ? (g + 1) * cpg : nchunks;
        for (int c = g * cpg; c < c1; ++c) {
            const v16f x0 = load16f(x + c * 32), x1 = load16f(x + c * 32 + 16);
#pragma GCC unroll 8
            for (int i = 0; i < RB; ++i) {
                v16u w;
                if (SAFE)
                    std::memcpy(&w, q[i] + (long)c * BITS, 64);
                else
                    w = load_words(q[i] + (long)c * BITS, qend);
                const v16f w0 = __builtin_convertvector(extract16<BITS>(w, 0), v16f);
                const v16f w1 = __builtin_convertvector(extract16<BITS>(w, 1), v16f);
                acc0[i] += (w0 * s[i] + nzs[i]) * x0;
                acc1[i] += (w1 * s[i] + nzs[i]) * x1;
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < RB; ++i) {
        const float v = hsum(acc0[i] + acc1[i]);
        y[r + i] = accumulate ? y[r + i] + v : v;
    }
}

template <int BITS>
static void gemv_rows(const uint32_t* qdata, const Scales& scale, const uint32_t* zero,
                      int rows, int cols, int G, const float* x, int nb, long x_stride,
                      float* y, long y_stride, int y_off, int accumulate, int nthreads) {
    const int wpr = (BITS * cols + 31) / 32;
    const int ngroups = (cols + G - 1) / G;
    const int nchunks = (cols + 31) / 32;
    const uint32_t* qend = qdata + (long)rows * wpr;
    if (nb == 1 && G % 32 == 0) {
        constexpr int RB = 4;
        const int blocks = rows / RB;
        float* yo = y + y_off;
        // rows from `safe_rows` on may read past the buffer with a 16-word load
        const long need = (long)(nchunks - 1) * BITS + 16;
        const long total = (long)rows * wpr;
        const int safe_rows = total >= need ? (int)std::min<long>(rows, (total - need) / wpr + 1)
                                            : 0;
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int bi = 0; bi < blocks + (rows % RB); ++bi) {
            if (bi < blocks) {
                const int r = bi * RB;
                if (r + RB <= safe_rows)
                    gemv1_g32<BITS, RB, true>(qdata, scale, zero, r, wpr, G, ngroups, nchunks,
                                              qend, x, yo, accumulate);
                else
                    gemv1_g32<BITS, RB, false>(qdata, scale, zero, r, wpr, G, ngroups,
                                               nchunks, qend, x, yo, accumulate);
            } else {
                gemv1_g32<BITS, 1, false>(qdata, scale, zero, blocks * RB + (bi - blocks), wpr,
                                          G, ngroups, nchunks, qend, x, yo, accumulate);
            }
        }
        return;
    }
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int r = 0; r < rows; ++r) {
        RowDecoder<BITS> d(qdata + (long)r * wpr, qend, scale, r, zero, cols, G, ngroups);
        v16f acc[BS_MAX_BATCH];
        for (int b = 0; b < BS_MAX_BATCH; ++b) acc[b] = (v16f){};
        for (int c = 0; c < nchunks; ++c) {
            v16f w[2];
            d.chunk(c, w);
            for (int b = 0; b < nb; ++b) {
                const float* xb = x + b * x_stride + c * 32;
                acc[b] += w[0] * load16f(xb) + w[1] * load16f(xb + 16);
            }
        }
        for (int b = 0; b < nb; ++b) {
            float* out = y + b * y_stride + y_off + r;
            const float v = hsum(acc[b]);
            *out = accumulate ? *out + v : v;
        }
    }
}

template <int BITS>
static void gemv_bits(const uint32_t* q, const Scales& s, const uint32_t* z, int rows,
                      int cols, int G, const float* x, int nb, long xs, float* y, long ys,
                      int yo, int acc, int nt) {
    gemv_rows<BITS>(q, s, z, rows, cols, G, x, nb, xs, y, ys, yo, acc, nt);
}

template <int BITS>
static void dequant_rows(const uint32_t* qdata, const Scales& scale, const uint32_t* zero,
                         int rows, int cols, int G, int r0, int r1, float* out, long ld,
                         int nthreads) {
    const int wpr = (BITS * cols + 31) / 32;
    const int ngroups = (cols + G - 1) / G;
    const int nchunks = (cols + 31) / 32;
    const uint32_t* qend = qdata + (long)rows * wpr;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int r = r0; r < r1; ++r) {
        RowDecoder<BITS> d(qdata + (long)r * wpr, qend, scale, r, zero, cols, G, ngroups);
        float* o = out + (long)(r - r0) * ld;
        for (int c = 0; c < nchunks; ++c) {
            v16f w[2];
            d.chunk(c, w);
            const int j = c * 32;
            if (j + 32 <= cols) {
                std::memcpy(o + j, &w[0], 64);
                std::memcpy(o + j + 16, &w[1], 64);
            } else {
                for (int k = 0; j + k < cols; ++k) o[j + k] = w[k >> 4][k & 15];
            }
        }
    }
}

extern "C" {

// 2: zero points as a packed stream; 3: scales as fp16 or as S-bit codes × steps
int bs_cpu_abi_version() { return 3; }

// Returns 0 on success, 1 for an unsupported width. Scales: `s` (fp16 [rows, ngroups]), or
// with `codes` non-null the S-bit code stream and the fp16 steps [rows, ceil(cols / 256)].
int bs_gemv(int bits, const uint32_t* q, const uint16_t* s0, const uint32_t* codes,
            const uint16_t* step, int S, const uint32_t* z, int rows, int cols, int G,
            const float* x, int nb, long x_stride, float* y, long y_stride, int y_off,
            int accumulate, int nthreads) {
    const Scales s = make_scales(s0, codes, step, S, cols, G);
    switch (bits) {
        case 1: gemv_bits<1>(q, s, z, rows, cols, G, x, nb, x_stride, y, y_stride, y_off, accumulate, nthreads); return 0;
        case 2: gemv_bits<2>(q, s, z, rows, cols, G, x, nb, x_stride, y, y_stride, y_off, accumulate, nthreads); return 0;
        case 3: gemv_bits<3>(q, s, z, rows, cols, G, x, nb, x_stride, y, y_stride, y_off, accumulate, nthreads); return 0;
        case 4: gemv_bits<4>(q, s, z, rows, cols, G, x, nb, x_stride, y, y_stride, y_off, accumulate, nthreads); return 0;
        case 5: gemv_bits<5>(q, s, z, rows, cols, G, x, nb, x_stride, y, y_stride, y_off, accumulate, nthreads); return 0;
        case 6: gemv_bits<6>(q, s, z, rows, cols, G, x, nb, x_stride, y, y_stride, y_off, accumulate, nthreads); return 0;
        case 7: gemv_bits<7>(q, s, z, rows, cols, G, x, nb, x_stride, y, y_stride, y_off, accumulate, nthreads); return 0;
        case 8: gemv_bits<8>(q, s, z, rows, cols, G, x, nb, x_stride, y, y_stride, y_off, accumulate, nthreads); return 0;
        default: return 1;
    }
}

int bs_dequant(int bits, const uint32_t* q, const uint16_t* s0, const uint32_t* codes,
               const uint16_t* step, int S, const uint32_t* z, int rows, int cols, int G,
               int r0, int r1, float* out, long ld, int nthreads) {
    const Scales s = make_scales(s0, codes, step, S, cols, G);
    switch (bits) {
        case 1: dequant_rows<1>(q, s, z, rows, cols, G, r0, r1, out, ld, nthreads); return 0;
        case 2: dequant_rows<2>(q, s, z, rows, cols, G, r0, r1, out, ld, nthreads); return 0;
        case 3: dequant_rows<3>(q, s, z, rows, cols, G, r0, r1, out, ld, nthreads); return 0;
        case 4: dequant_rows<4>(q, s, z, rows, cols, G, r0, r1, out, ld, nthreads); return 0;
        case 5: dequant_rows<5>(q, s, z, rows, cols, G, r0, r1, out, ld, nthreads); return 0;
        case 6: dequant_rows<6>(q, s, z, rows, cols, G, r0, r1, out, ld, nthreads); return 0;
        case 7: dequant_rows<7>(q, s, z, rows, cols, G, r0, r1, out, ld, nthreads); return 0;
        case 8: dequant_rows<8>(q, s, z, rows, cols, G, r0, r1, out, ld, nthreads); return 0;
        default: return 1;
    }
}

// fp16 (16-bit) segment: same contract as bs_gemv, weights [rows, cols] fp16 (x padded too).
int bs_gemv_fp16(const uint16_t* w, int rows, int cols, const float* x, int nb, long x_stride,
                 float* y, long y_stride, int y_off, int accumulate, int nthreads) {
    const int n16 = cols / 16;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int r = 0; r < rows; ++r) {
        const uint16_t* wr = w + (long)r * cols;
        v16f acc[BS_MAX_BATCH];
        float tail[BS_MAX_BATCH];
        for (int b = 0; b < BS_MAX_BATCH; ++b) { acc[b] = (v16f){}; tail[b] = 0.f; }
        for (int v = 0; v < n16; ++v) {
            const v16f wv = load16_half(wr + v * 16);
            for (int b = 0; b < nb; ++b) acc[b] += wv * load16f(x + b * x_stride + v * 16);
        }
        for (int j = n16 * 16; j < cols; ++j) {
            const float wj = half_to_float(wr[j]);
            for (int b = 0; b < nb; ++b) tail[b] += wj * x[b * x_stride + j];
        }
        for (int b = 0; b < nb; ++b) {
            float* out = y + b * y_stride + y_off + r;
            const float v = hsum(acc[b]) + tail[b];
            *out = accumulate ? *out + v : v;
        }
    }
    return 0;
}

}  // extern "C"
