// dvis-trt MSDeformAttn CUDA kernel (forward only).
//
// One thread per (batch, query, head, group of VEC channels). A thread walks the head's L*P sampling points with the
// shared math of include/dvis_msda/msda_math.h (fp32 coordinates and accumulation for every I/O type), loads each
// in-map tap as one vector of VEC channels (16 bytes when the head dim and pointer alignment allow), and writes its
// VEC outputs once: no atomics, no workspace. Threads of one head sit next to each other, so the taps of a head are
// read as contiguous 64-128 byte segments and the sampling locations / weights are broadcast loads.
#include "dvis_msda/msda_api.h"
#include "dvis_msda/msda_math.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>

namespace
{

thread_local std::string g_last_error;

int32_t fail(int32_t code, std::string const& message)
{
    g_last_error = message;
    return code;
}

constexpr int kBlock = 256;

// Raw vector types for 2/4/8/16-byte loads and stores.
template <int BYTES>
struct RawVec;
template <>
struct RawVec<2>
{
    using type = unsigned short;
};
template <>
struct RawVec<4>
{
    using type = unsigned int;
};
template <>
struct RawVec<8>
{
    using type = uint2;
};
template <>
struct RawVec<16>
{
    using type = uint4;
};

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x)
{
    return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x)
{
    return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x)
{
    return __float2bfloat16_rn(x);
}

// VEC channels of one value row, converted to fp32, as one read-only vector load.
template <typename T, int VEC>
struct VectorLoader
{
    T const* base;      // value + n*S*M*D + m*D + first channel of the group
    int64_t row_stride; // M*D

    __device__ __forceinline__ void operator()(int64_t row, float (&v)[VEC]) const
    {
        using Raw = typename RawVec<sizeof(T) * VEC>::type;
        Raw const raw = __ldg(reinterpret_cast<Raw const*>(base + row * row_stride));
        T elems[VEC];
        memcpy(elems, &raw, sizeof(Raw));
#pragma unroll
        for (int j = 0; j < VEC; ++j)
        {
            v[j] = dvis_msda::to_float(elems[j]);
        }
    }
};

template <typename T, int VEC>
struct GroupVisitor
{
    VectorLoader<T, VEC> load;
    float* acc;

    __device__ __forceinline__ void operator()(dvis_msda::BilinearTaps const& t, float attn) const
    {
        dvis_msda::accumulate_taps<VEC>(t, attn, load, acc);
    }
};

// total = N*Lq*M*(D/VEC) threads of this launch (< 2^31; the host splits the batch otherwise).
template <typename T, typename LocT, int VEC>
__global__ void __launch_bounds__(kBlock) msda_forward_kernel(T const* __restrict__ value,
    dvis_msda::IndexView spatial_shapes, dvis_msda::IndexView level_start_index, LocT const* __restrict__ loc,
    LocT const* __restrict__ attn, T* __restrict__ out, uint32_t total, uint32_t groups, uint32_t M, uint32_t Lq,
    int64_t S, int32_t D, int32_t L, int32_t P)
{
    uint32_t const idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total)
    {
        return;
    }
    uint32_t const g = idx % groups;
    uint32_t const head = idx / groups; // (n*Lq + q)*M + m
    uint32_t const m = head % M;
    uint32_t const nq = head / M;
    uint32_t const n = nq / Lq;

    int64_t const row_stride = static_cast<int64_t>(M) * D;
    int64_t const channel0 = static_cast<int64_t>(g) * VEC;

    float acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j)
    {
        acc[j] = 0.f;
    }
    GroupVisitor<T, VEC> visit{
        VectorLoader<T, VEC>{value + static_cast<int64_t>(n) * S * row_stride + static_cast<int64_t>(m) * D + channel0,
            row_stride},
        acc};
    int64_t const lp = static_cast<int64_t>(L) * P;
    dvis_msda::for_each_sample(
        spatial_shapes, level_start_index, L, P, S, loc + head * lp * 2, attn + head * lp, visit);

    T res[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j)
    {
        res[j] = from_float<T>(acc[j]);
    }
    using Raw = typename RawVec<sizeof(T) * VEC>::type;
    Raw raw;
    memcpy(&raw, res, sizeof(Raw));
    *reinterpret_cast<Raw*>(out + static_cast<int64_t>(head) * D + channel0) = raw;
}

template <typename T>
constexpr int max_vec()
{
    return 16 / static_cast<int>(sizeof(T));
}

int32_t element_size(int32_t dtype)
{
    return dtype == DVIS_MSDA_FLOAT32 ? 4 : 2;
}

// Largest vector width (16-byte loads first) that divides D and keeps every row aligned.
int32_t pick_vec(int32_t dtype, int64_t D, void const* value, void const* output)
{
    int32_t const es = element_size(dtype);
    for (int32_t vec = 16 / es; vec > 1; vec /= 2)
    {
        int64_t const bytes = static_cast<int64_t>(vec) * es;
        if (D % vec == 0 && reinterpret_cast<uintptr_t>(value) % bytes == 0
            && reinterpret_cast<uintptr_t>(output) % bytes == 0)
        {
            return vec;
        }
    }
    return 1;
}

template <typename T, typename LocT, int VEC>
int32_t launch(void const* value, dvis_msda::IndexView shapes, dvis_msda::IndexView starts, void const* loc,
    void const* attn, void* out, int64_t N, int64_t S, int64_t M, int64_t D, int64_t L, int64_t Lq, int64_t P,
    cudaStream_t stream)
{
    int64_t const groups = D / VEC;
    int64_t const per_batch = Lq * M * groups;
    int64_t const limit = int64_t{1} << 31;
    if (per_batch >= limit)
    {
        return fail(DVIS_MSDA_ERR_ARGUMENT, "Lq*M*D too large for one batch element");
    }
    int64_t const batch_chunk = std::max<int64_t>(1, (limit - 1) / std::max<int64_t>(per_batch, 1));
    for (int64_t n0 = 0; n0 < N; n0 += batch_chunk)
    {
        int64_t const nb = std::min(batch_chunk, N - n0);
        int64_t const total = nb * per_batch;
        if (total == 0)
        {
            continue;
        }
        T const* v = static_cast<T const*>(value) + n0 * S * M * D;
        LocT const* lc = static_cast<LocT const*>(loc) + n0 * Lq * M * L * P * 2;
        LocT const* at = static_cast<LocT const*>(attn) + n0 * Lq * M * L * P;
        T* o = static_cast<T*>(out) + n0 * Lq * M * D;
        unsigned const blocks = static_cast<unsigned>((total + kBlock - 1) / kBlock);
        msda_forward_kernel<T, LocT, VEC><<<blocks, kBlock, 0, stream>>>(v, shapes, starts, lc, at, o,
            static_cast<uint32_t>(total), static_cast<uint32_t>(groups), static_cast<uint32_t>(M),
            static_cast<uint32_t>(Lq), S, static_cast<int32_t>(D), static_cast<int32_t>(L), static_cast<int32_t>(P));
        cudaError_t const err = cudaGetLastError();
        if (err != cudaSuccess)
        {
            return fail(DVIS_MSDA_ERR_CUDA, std::string("kernel launch failed: ") + cudaGetErrorString(err));
        }
    }
    return DVIS_MSDA_OK;
}

template <typename T, typename LocT>
int32_t dispatch_vec(int32_t vec, void const* value, dvis_msda::IndexView shapes, dvis_msda::IndexView starts,
    void const* loc, void const* attn, void* out, int64_t N, int64_t S, int64_t M, int64_t D, int64_t L, int64_t Lq,
    int64_t P, cudaStream_t stream)
{
    constexpr int kMax = max_vec<T>();
    if (vec == kMax)
    {
        return launch<T, LocT, kMax>(value, shapes, starts, loc, attn, out, N, S, M, D, L, Lq, P, stream);
    }
    if (vec >= 2)
    {
        return launch<T, LocT, 2>(value, shapes, starts, loc, attn, out, N, S, M, D, L, Lq, P, stream);
    }
    return launch<T, LocT, 1>(value, shapes, starts, loc, attn, out, N, S, M, D, L, Lq, P, stream);
}

} // namespace

extern "C" {

int32_t dvis_msda_cuda_abi_version(void)
{
    return DVIS_MSDA_ABI_VERSION;
}

char const* dvis_msda_cuda_last_error(void)
{
    return g_last_error.c_str();
}

int32_t dvis_msda_cuda_vector_width(int32_t value_dtype, int64_t D, void const* value, void const* output)
{
    int32_t const vec = pick_vec(value_dtype, D, value, output);
    // dispatch_vec only instantiates the 16-byte width, 2 and 1.
    return (vec == 16 / element_size(value_dtype) || vec < 2) ? vec : 2;
}

int32_t dvis_msda_cuda_forward(int32_t value_dtype, int32_t loc_dtype, void const* value, void const* spatial_shapes,
    void const* level_start_index, int32_t index_is_int64, void const* sampling_locations,
    void const* attention_weights, void* output, int64_t N, int64_t S, int64_t M, int64_t D, int64_t L, int64_t Lq,
    int64_t P, void* stream)
{
    g_last_error.clear();
    if (N < 0 || S < 0 || M < 0 || D < 0 || L < 0 || Lq < 0 || P < 0)
    {
        return fail(DVIS_MSDA_ERR_ARGUMENT, "negative size");
    }
    if (D > 0x7fffffff || L > 0x7fffffff || P > 0x7fffffff || M > 0x7fffffff || Lq > 0x7fffffff)
    {
        return fail(DVIS_MSDA_ERR_ARGUMENT, "a size exceeds int32");
    }
    if (N * Lq * M * D == 0)
    {
        return DVIS_MSDA_OK;
    }
    if (!output || !sampling_locations || !attention_weights || (L > 0 && (!spatial_shapes || !level_start_index))
        || (S > 0 && !value))
    {
        return fail(DVIS_MSDA_ERR_ARGUMENT, "null pointer");
    }
    dvis_msda::IndexView const shapes{spatial_shapes, index_is_int64 ? 1 : 0};
    dvis_msda::IndexView const starts{level_start_index, index_is_int64 ? 1 : 0};
    cudaStream_t const st = static_cast<cudaStream_t>(stream);
    int32_t const vec = dvis_msda_cuda_vector_width(value_dtype, D, value, output);
    bool const loc_f32 = loc_dtype == DVIS_MSDA_FLOAT32;
    if (loc_dtype != value_dtype && !loc_f32)
    {
        return fail(DVIS_MSDA_ERR_DTYPE, "sampling_locations/attention_weights must have value's dtype or float32");
    }
    switch (value_dtype)
    {
    case DVIS_MSDA_FLOAT32:
        return dispatch_vec<float, float>(vec, value, shapes, starts, sampling_locations, attention_weights, output,
            N, S, M, D, L, Lq, P, st);
    case DVIS_MSDA_FLOAT16:
        return loc_f32 ? dispatch_vec<__half, float>(vec, value, shapes, starts, sampling_locations,
                   attention_weights, output, N, S, M, D, L, Lq, P, st)
                       : dispatch_vec<__half, __half>(vec, value, shapes, starts, sampling_locations,
                           attention_weights, output, N, S, M, D, L, Lq, P, st);
    case DVIS_MSDA_BFLOAT16:
        return loc_f32 ? dispatch_vec<__nv_bfloat16, float>(vec, value, shapes, starts, sampling_locations,
                   attention_weights, output, N, S, M, D, L, Lq, P, st)
                       : dispatch_vec<__nv_bfloat16, __nv_bfloat16>(vec, value, shapes, starts, sampling_locations,
                           attention_weights, output, N, S, M, D, L, Lq, P, st);
    default: return fail(DVIS_MSDA_ERR_DTYPE, "unsupported value dtype");
    }
}

} // extern "C"
