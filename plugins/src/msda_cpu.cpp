// dvis-trt MSDeformAttn CPU twin: the fp32 forward pass on the host, running the shared per-sample math of
// include/dvis_msda/msda_math.h (the same functions the CUDA kernel calls). Used by ONNX Runtime (through
// dvis_trt.plugins.ort_op) so that `--msda plugin` bundles run and are parity-tested without a GPU.
#include "dvis_msda/msda_api.h"
#include "dvis_msda/msda_math.h"

#include <algorithm>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

namespace
{

thread_local std::string g_last_error;

int32_t fail(int32_t code, std::string const& message)
{
    g_last_error = message;
    return code;
}

// Scalar loader: VEC consecutive channels of one value row.
struct RowLoader
{
    float const* base;  // value + n*S*M*D + m*D + first channel
    int64_t row_stride; // M*D

    template <int VEC>
    void operator()(int64_t row, float (&v)[VEC]) const
    {
        float const* p = base + row * row_stride;
        for (int j = 0; j < VEC; ++j)
        {
            v[j] = p[j];
        }
    }
};

// Accumulates every channel of one head for each visited sampling point: channel groups of 8, then singles.
struct HeadVisitor
{
    float const* head_base; // value + n*S*M*D + m*D
    int64_t row_stride;     // M*D
    int64_t D;
    float* acc;             // D accumulators

    void operator()(dvis_msda::BilinearTaps const& t, float attn) const
    {
        int64_t c = 0;
        for (; c + 8 <= D; c += 8)
        {
            RowLoader const load{head_base + c, row_stride};
            dvis_msda::accumulate_taps<8>(t, attn, load, acc + c);
        }
        for (; c < D; ++c)
        {
            RowLoader const load{head_base + c, row_stride};
            dvis_msda::accumulate_taps<1>(t, attn, load, acc + c);
        }
    }
};

struct Problem
{
    float const* value;
    dvis_msda::IndexView shapes;
    dvis_msda::IndexView starts;
    float const* loc;
    float const* attn;
    float* out;
    int64_t N, S, M, D, L, Lq, P;
};

// Rows [begin, end) of the flattened (N*Lq) query axis.
void run_rows(Problem const& pb, int64_t begin, int64_t end)
{
    std::vector<float> acc(static_cast<size_t>(pb.D));
    int64_t const row_stride = pb.M * pb.D;
    for (int64_t nq = begin; nq < end; ++nq)
    {
        int64_t const n = nq / pb.Lq;
        for (int64_t m = 0; m < pb.M; ++m)
        {
            std::fill(acc.begin(), acc.end(), 0.f);
            int64_t const head = nq * pb.M + m;
            HeadVisitor visit{pb.value + n * pb.S * row_stride + m * pb.D, row_stride, pb.D, acc.data()};
            dvis_msda::for_each_sample(pb.shapes, pb.starts, static_cast<int32_t>(pb.L), static_cast<int32_t>(pb.P),
                pb.S, pb.loc + head * pb.L * pb.P * 2, pb.attn + head * pb.L * pb.P, visit);
            std::copy(acc.begin(), acc.end(), pb.out + head * pb.D);
        }
    }
}

} // namespace

extern "C" {

int32_t dvis_msda_cpu_abi_version(void)
{
    return DVIS_MSDA_ABI_VERSION;
}

char const* dvis_msda_cpu_last_error(void)
{
    return g_last_error.c_str();
}

int32_t dvis_msda_cpu_forward_f32(float const* value, void const* spatial_shapes, void const* level_start_index,
    int32_t index_is_int64, float const* sampling_locations, float const* attention_weights, float* output, int64_t N,
    int64_t S, int64_t M, int64_t D, int64_t L, int64_t Lq, int64_t P, int32_t num_threads)
{
    g_last_error.clear();
    if (N < 0 || S < 0 || M < 0 || D < 0 || L < 0 || Lq < 0 || P < 0)
    {
        return fail(DVIS_MSDA_ERR_ARGUMENT, "negative size");
    }
    if (L > 0x7fffffff || P > 0x7fffffff)
    {
        return fail(DVIS_MSDA_ERR_ARGUMENT, "L or P too large");
    }
    int64_t const n_out = N * Lq * M * D;
    if (n_out == 0)
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
    for (int32_t l = 0; l < static_cast<int32_t>(L); ++l)
    {
        if (!dvis_msda::level_lookup(shapes, starts, l, S).ok)
        {
            char buf[256];
            std::snprintf(buf, sizeof(buf),
                "level %d: spatial_shapes=(%lld, %lld), level_start_index=%lld do not fit in value's S=%lld", l,
                static_cast<long long>(shapes[2 * l]), static_cast<long long>(shapes[2 * l + 1]),
                static_cast<long long>(starts[l]), static_cast<long long>(S));
            return fail(DVIS_MSDA_ERR_LEVELS, buf);
        }
    }

    Problem const pb{value, shapes, starts, sampling_locations, attention_weights, output, N, S, M, D, L, Lq, P};
    int64_t const rows = N * Lq;
    int64_t threads = num_threads > 0 ? num_threads : static_cast<int64_t>(std::thread::hardware_concurrency());
    // Below ~64k multiply-adds per thread the thread start-up costs more than it saves.
    int64_t const work = rows * M * L * P * (D + 8);
    threads = std::max<int64_t>(1, std::min<int64_t>({threads, rows, work / 65536 + 1}));
    if (threads == 1)
    {
        run_rows(pb, 0, rows);
        return DVIS_MSDA_OK;
    }
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(threads));
    int64_t const chunk = (rows + threads - 1) / threads;
    for (int64_t t = 0; t < threads; ++t)
    {
        int64_t const begin = t * chunk;
        int64_t const end = std::min(rows, begin + chunk);
        if (begin >= end)
        {
            break;
        }
        pool.emplace_back([&pb, begin, end] { run_rows(pb, begin, end); });
    }
    for (auto& th : pool)
    {
        th.join();
    }
    return DVIS_MSDA_OK;
}

} // extern "C"
