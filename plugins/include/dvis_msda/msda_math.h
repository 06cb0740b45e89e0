// dvis-trt: the per-sample math of multi-scale deformable attention (MSDeformAttn), written once.
//
// Every function here is `__host__ __device__` when compiled by nvcc and plain `inline` C++ otherwise, so the
// CUDA kernel (src/msda_cuda.cu) and the CPU twin (src/msda_cpu.cpp) run the very same code for
//   * the level lookup (spatial_shapes / level_start_index, with a bounds check against S),
//   * the sampling position and bilinear weights (zero padding, align_corners=False),
//   * the accumulation of the four taps, weighted by the attention weight, in fp32.
// Only the loads and stores differ (vectorised on the GPU, scalar on the CPU).
//
// Semantics (official `ms_deform_attn_core_pytorch`, mask2former/modeling/pixel_decoder/ops/functions/
// ms_deform_attn_func.py): for every batch n, query q, head m, channel d
//   out[n, q, m*D + d] = sum_l sum_p  A[n,q,m,l,p] * bilinear(value_l[n, :, :, m, d], loc[n,q,m,l,p])
// where value_l is the (h_l, w_l) map of level l (rows level_start_index[l] .. + h_l*w_l of value (N,S,M,D)),
// `bilinear` is F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False) at the grid point
// 2*loc - 1, i.e. at the pixel position  x = loc_x * w_l - 0.5,  y = loc_y * h_l - 0.5  (pixel centres at
// integers). A tap that falls outside the map contributes zero.
#ifndef DVIS_MSDA_MATH_H
#define DVIS_MSDA_MATH_H

#include <stdint.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define DVIS_HD __host__ __device__ __forceinline__
#define DVIS_UNROLL _Pragma("unroll")
#else
#include <math.h>
#define DVIS_HD inline
#if defined(__clang__)
#define DVIS_UNROLL _Pragma("clang loop unroll(full)")
#elif defined(__GNUC__)
#define DVIS_UNROLL _Pragma("GCC unroll 16")
#else
#define DVIS_UNROLL
#endif
#endif

namespace dvis_msda
{

// ---------------------------------------------------------------------------------------------------------------
// Element conversions. Half types exist only when compiled by nvcc; the CPU twin is fp32.
// ---------------------------------------------------------------------------------------------------------------
DVIS_HD float to_float(float x)
{
    return x;
}
#if defined(__CUDACC__)
DVIS_HD float to_float(__half x)
{
    return __half2float(x);
}
DVIS_HD float to_float(__nv_bfloat16 x)
{
    return __bfloat162float(x);
}
#endif

// Round-to-nearest multiply that the compiler may not fuse into a following add. Keeps the sampling position
// bit-identical between the GPU (where nvcc would contract `a*b - c` into one FMA) and the CPU.
DVIS_HD float mul_rn(float a, float b)
{
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    volatile float p = a * b; // volatile: forbid contraction on hosts that have FMA
    return p;
#endif
}

DVIS_HD float floor_f(float x)
{
    return floorf(x);
}

// ---------------------------------------------------------------------------------------------------------------
// Index inputs (spatial_shapes, level_start_index) may be int32 or int64 (ONNX exports int64, TensorRT's built-in
// plugin takes int32). A view reads either.
// ---------------------------------------------------------------------------------------------------------------
struct IndexView
{
    void const* data;
    int32_t is_int64; // 1: int64_t elements, 0: int32_t elements

    DVIS_HD int64_t operator[](int64_t i) const
    {
        return is_int64 ? static_cast<int64_t const*>(data)[i] : static_cast<int64_t>(static_cast<int32_t const*>(data)[i]);
    }
};

// One level of the flattened multi-scale value tensor.
struct LevelInfo
{
    int32_t h;      // map height
    int32_t w;      // map width
    int64_t start;  // first row of this level in value's S axis
    bool ok;        // false: the level does not fit inside S (bad index input); it is skipped (contributes zero)
};

// Level lookup: reads (h, w) = spatial_shapes[l] and start = level_start_index[l] and checks that the level's
// h*w rows lie inside [0, S). A level that does not fit is reported as not ok instead of being read out of bounds.
DVIS_HD LevelInfo level_lookup(IndexView spatial_shapes, IndexView level_start_index, int32_t l, int64_t S)
{
    LevelInfo lv;
    int64_t const h = spatial_shapes[2 * static_cast<int64_t>(l)];
    int64_t const w = spatial_shapes[2 * static_cast<int64_t>(l) + 1];
    int64_t const start = level_start_index[l];
    lv.ok = h > 0 && w > 0 && h <= 0x7fffffff && w <= 0x7fffffff && start >= 0 && h * w <= S - start;
    lv.h = lv.ok ? static_cast<int32_t>(h) : 0;
    lv.w = lv.ok ? static_cast<int32_t>(w) : 0;
    lv.start = start;
    return lv;
}

// The four bilinear taps of one sampling point: rows into value's S axis (level start already added), their
// weights, and which of them lie inside the map (zero padding: taps outside are never read).
struct BilinearTaps
{
    int64_t row[4];   // top-left, top-right, bottom-left, bottom-right
    float weight[4];
    uint32_t valid;   // bit k set: tap k is inside the map
};

// Sampling position and bilinear weights of one point, grid_sample(bilinear, zeros, align_corners=False).
// loc_x, loc_y: normalised location in [0, 1] (x along the width); returns false when no tap can be inside the
// map (the point contributes zero; also for NaN locations), true and the taps otherwise.
DVIS_HD bool bilinear_taps(float loc_x, float loc_y, LevelInfo const& lv, BilinearTaps& t)
{
    float const w = static_cast<float>(lv.w);
    float const h = static_cast<float>(lv.h);
    float const x = mul_rn(loc_x, w) - 0.5f;
    float const y = mul_rn(loc_y, h) - 0.5f;
    // Outside (-1, w) x (-1, h) every tap is outside the map. Written so that NaN fails the test.
    if (!(x > -1.f && y > -1.f && x < w && y < h))
    {
        return false;
    }
    float const x0f = floor_f(x);
    float const y0f = floor_f(y);
    int32_t const x0 = static_cast<int32_t>(x0f);
    int32_t const y0 = static_cast<int32_t>(y0f);
    float const lx = x - x0f; // weight of the right column
    float const ly = y - y0f; // weight of the bottom row
    float const hx = 1.f - lx;
    float const hy = 1.f - ly;

    bool const left = x0 >= 0;
    bool const right = x0 + 1 <= lv.w - 1;
    bool const top = y0 >= 0;
    bool const bottom = y0 + 1 <= lv.h - 1;

    int64_t const r_top = lv.start + static_cast<int64_t>(y0) * lv.w + x0;
    int64_t const r_bottom = r_top + lv.w;
    t.row[0] = r_top;
    t.row[1] = r_top + 1;
    t.row[2] = r_bottom;
    t.row[3] = r_bottom + 1;
    t.weight[0] = hy * hx;
    t.weight[1] = hy * lx;
    t.weight[2] = ly * hx;
    t.weight[3] = ly * lx;
    t.valid = (top && left ? 1u : 0u) | (top && right ? 2u : 0u) | (bottom && left ? 4u : 0u)
        | (bottom && right ? 8u : 0u);
    return true;
}

// Accumulate one sampling point into VEC consecutive channels:
//   acc[j] += attn * sum_k weight[k] * value[row[k], j]     (taps outside the map skipped)
// `load(row, v)` fills v[0..VEC) with the channels of `row` as fp32 (the caller's vectorised or scalar load).
template <int VEC, typename Loader>
DVIS_HD void accumulate_taps(BilinearTaps const& t, float attn, Loader const& load, float* acc)
{
    float s[VEC];
DVIS_UNROLL
    for (int j = 0; j < VEC; ++j)
    {
        s[j] = 0.f;
    }
DVIS_UNROLL
    for (int k = 0; k < 4; ++k)
    {
        if (t.valid & (1u << k))
        {
            float v[VEC];
            load(t.row[k], v);
DVIS_UNROLL
            for (int j = 0; j < VEC; ++j)
            {
                s[j] += t.weight[k] * v[j];
            }
        }
    }
DVIS_UNROLL
    for (int j = 0; j < VEC; ++j)
    {
        acc[j] += attn * s[j];
    }
}

// Walk the L*P sampling points of one (batch, query, head): for every point with at least one tap inside its
// level, call visit(taps, attention_weight). `loc` points at sampling_locations[n, q, m, 0, 0, 0] (L*P*2 values,
// x then y), `attn` at attention_weights[n, q, m, 0, 0] (L*P values). Levels that fail the lookup are skipped.
template <typename LocT, typename Visitor>
DVIS_HD void for_each_sample(IndexView spatial_shapes, IndexView level_start_index, int32_t L, int32_t P, int64_t S,
    LocT const* loc, LocT const* attn, Visitor& visit)
{
    for (int32_t l = 0; l < L; ++l)
    {
        LevelInfo const lv = level_lookup(spatial_shapes, level_start_index, l, S);
        if (!lv.ok)
        {
            continue;
        }
        LocT const* lp = loc + static_cast<int64_t>(l) * P * 2;
        LocT const* ap = attn + static_cast<int64_t>(l) * P;
        for (int32_t p = 0; p < P; ++p)
        {
            BilinearTaps t;
            if (bilinear_taps(to_float(lp[2 * p]), to_float(lp[2 * p + 1]), lv, t))
            {
                visit(t, to_float(ap[p]));
            }
        }
    }
}

} // namespace dvis_msda

#endif // DVIS_MSDA_MATH_H
