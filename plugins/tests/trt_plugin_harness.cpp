// Host-only checks of the dvis-trt TensorRT plugin library (no GPU, no libnvinfer needed):
//   trt_plugin_harness <path/to/libdvis_msda_trt.so>
// dlopens the library the way IPluginRegistry::loadLibrary() does, takes its creators from getCreators(), and
// exercises every build-time method of the plugin with hand-made tensor descriptions and a stand-in expression
// builder. Prints one line per check; exit status 0 when all pass. The enqueue path needs a GPU and is covered
// by benchmarks/gpu_msda_check.py.
#include <NvInferRuntime.h>

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

int g_failures = 0;

void check(bool ok, char const* what)
{
    std::printf("%s %s\n", ok ? "PASS" : "FAIL", what);
    if (!ok)
    {
        ++g_failures;
    }
}

// ---- stand-in expression builder: constants only, enough for getOutputShapes ----
class ConstExprImpl : public apiv::VDimensionExpr
{
public:
    explicit ConstExprImpl(int64_t v)
        : mValue(v)
    {
    }
    bool isConstant() const override
    {
        return true;
    }
    int64_t getConstantValue() const override
    {
        return mValue;
    }
    bool isSizeTensor() const override
    {
        return false;
    }

private:
    int64_t mValue;
};

class ConstExpr : public IDimensionExpr
{
public:
    explicit ConstExpr(int64_t v)
        : mOwn(v)
    {
        mImpl = &mOwn;
    }
    ~ConstExpr() noexcept override = default;

private:
    ConstExprImpl mOwn;
};

class ExprPool
{
public:
    IDimensionExpr const* make(int64_t v)
    {
        mExprs.emplace_back(new ConstExpr(v));
        return mExprs.back().get();
    }

private:
    std::vector<std::unique_ptr<ConstExpr>> mExprs;
};

class ConstBuilderImpl : public apiv::VExprBuilder
{
public:
    explicit ConstBuilderImpl(ExprPool& pool)
        : mPool(pool)
    {
    }
    IDimensionExpr const* constant(int64_t value) override
    {
        return mPool.make(value);
    }
    IDimensionExpr const* operation(
        DimensionOperation op, IDimensionExpr const& first, IDimensionExpr const& second) override
    {
        int64_t const a = first.getConstantValue();
        int64_t const b = second.getConstantValue();
        switch (op)
        {
        case DimensionOperation::kSUM: return mPool.make(a + b);
        case DimensionOperation::kPROD: return mPool.make(a * b);
        default: return nullptr;
        }
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }

private:
    ExprPool& mPool;
};

class ConstBuilder : public IExprBuilder
{
public:
    explicit ConstBuilder(ExprPool& pool)
        : mOwn(pool)
    {
        mImpl = &mOwn;
    }
    ~ConstBuilder() noexcept override = default;

private:
    ConstBuilderImpl mOwn;
};

Dims make_dims(std::vector<int64_t> const& d)
{
    Dims dims{};
    dims.nbDims = static_cast<int32_t>(d.size());
    for (size_t i = 0; i < d.size(); ++i)
    {
        dims.d[i] = d[i];
    }
    return dims;
}

DynamicPluginTensorDesc make_desc(std::vector<int64_t> const& d, DataType t)
{
    DynamicPluginTensorDesc desc{};
    desc.desc.dims = make_dims(d);
    desc.desc.type = t;
    desc.desc.format = TensorFormat::kLINEAR;
    desc.min = desc.max = desc.opt = desc.desc.dims;
    return desc;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: %s <libdvis_msda_trt.so>\n", argv[0]);
        return 2;
    }
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib)
    {
        std::fprintf(stderr, "dlopen failed: %s\n", dlerror());
        return 2;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetNamespace = int32_t (*)(char const*);
    auto get_creators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    auto set_logger_finder = dlsym(lib, "setLoggerFinder");
    auto set_namespace = reinterpret_cast<SetNamespace>(dlsym(lib, "dvis_msda_trt_set_namespace"));
    check(get_creators != nullptr, "exports getCreators");
    check(set_logger_finder != nullptr, "exports setLoggerFinder");
    check(set_namespace != nullptr, "exports dvis_msda_trt_set_namespace");
    if (!get_creators || !set_namespace)
    {
        return 1;
    }
    check(set_namespace("dvis_test_ns") == 0, "namespace settable before first use");
    using RegisterGlobal = int32_t (*)(char const*);
    auto register_global = reinterpret_cast<RegisterGlobal>(dlsym(lib, "dvis_msda_trt_register_global"));
    check(register_global != nullptr, "exports dvis_msda_trt_register_global");
    if (register_global)
    {
        check(register_global(nullptr) == -1, "register_global reports that libnvinfer is not loaded");
    }

    int32_t n = 0;
    IPluginCreatorInterface* const* creators = get_creators(n);
    check(n == 1 && creators && creators[0], "one creator");
    if (n != 1 || !creators || !creators[0])
    {
        return 1;
    }
    check(set_namespace("other") != 0, "namespace frozen after first use");
    check(std::strcmp(creators[0]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0, "creator is V3One");
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    check(std::strcmp(creator->getPluginName(), "DvisMSDeformAttn") == 0, "creator name DvisMSDeformAttn");
    check(std::strcmp(creator->getPluginVersion(), "1") == 0, "creator version 1");
    check(std::strcmp(creator->getPluginNamespace(), "dvis_test_ns") == 0, "creator namespace as configured");
    check(creator->getFieldNames() && creator->getFieldNames()->nbFields == 0, "no attributes");

    // Fields the ONNX parser may forward must be accepted and ignored.
    char const version[] = "1";
    PluginField fields[] = {PluginField("plugin_version", version, PluginFieldType::kCHAR, 1)};
    PluginFieldCollection fc{1, fields};
    IPluginV3* plugin = creator->createPlugin("msda0", &fc, TensorRTPhase::kBUILD);
    check(plugin != nullptr, "createPlugin(kBUILD)");
    if (!plugin)
    {
        return 1;
    }
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(core && build && runtime, "core/build/runtime capabilities");
    if (!core || !build || !runtime)
    {
        return 1;
    }
    check(std::strcmp(core->getPluginName(), "DvisMSDeformAttn") == 0 && std::strcmp(core->getPluginVersion(), "1") == 0
            && std::strcmp(core->getPluginNamespace(), "dvis_test_ns") == 0,
        "plugin name/version/namespace");
    check(build->getNbOutputs() == 1, "one output");

    // Output types follow value's type.
    DataType const float_types[] = {DataType::kFLOAT, DataType::kHALF, DataType::kBF16};
    for (DataType t : float_types)
    {
        DataType in[5] = {t, DataType::kINT64, DataType::kINT64, t, t};
        DataType out = DataType::kINT8;
        check(build->getOutputDataTypes(&out, 1, in, 5) == 0 && out == t, "getOutputDataTypes = value type");
    }
    {
        DataType in[5] = {DataType::kINT32, DataType::kINT64, DataType::kINT64, DataType::kFLOAT, DataType::kFLOAT};
        DataType out = DataType::kFLOAT;
        check(build->getOutputDataTypes(&out, 1, in, 5) != 0, "getOutputDataTypes rejects int value");
    }

    // Shapes: R50 pixel-decoder encoder layer, N=2, 3 levels.
    int64_t const N = 2, S = 6480 + 1620 + 405, M = 8, D = 32, L = 3, P = 4, Lq = S;
    DynamicPluginTensorDesc io[6] = {
        make_desc({N, S, M, D}, DataType::kHALF),
        make_desc({L, 2}, DataType::kINT64),
        make_desc({L}, DataType::kINT64),
        make_desc({N, Lq, M, L, P, 2}, DataType::kHALF),
        make_desc({N, Lq, M, L, P}, DataType::kHALF),
        make_desc({N, Lq, M * D}, DataType::kHALF),
    };
    // supportsFormatCombination: every position, given earlier positions.
    check(build->supportsFormatCombination(0, io, 5, 1), "value fp16 supported");
    io[0].desc.type = DataType::kBF16;
    check(build->supportsFormatCombination(0, io, 5, 1), "value bf16 supported");
    io[0].desc.type = DataType::kINT8;
    check(!build->supportsFormatCombination(0, io, 5, 1), "value int8 rejected");
    io[0].desc.type = DataType::kHALF;
    io[0].desc.format = TensorFormat::kHWC8;
    check(!build->supportsFormatCombination(0, io, 5, 1), "non-linear format rejected");
    io[0].desc.format = TensorFormat::kLINEAR;
    check(build->supportsFormatCombination(1, io, 5, 1), "spatial_shapes int64 supported");
    io[1].desc.type = DataType::kINT32;
    check(build->supportsFormatCombination(1, io, 5, 1), "spatial_shapes int32 supported");
    check(!build->supportsFormatCombination(2, io, 5, 1), "level_start_index must match spatial_shapes type");
    io[2].desc.type = DataType::kINT32;
    check(build->supportsFormatCombination(2, io, 5, 1), "level_start_index int32 with int32 shapes");
    check(build->supportsFormatCombination(3, io, 5, 1), "sampling_locations in value type");
    io[3].desc.type = DataType::kFLOAT;
    check(build->supportsFormatCombination(3, io, 5, 1), "sampling_locations fp32 with fp16 value");
    io[3].desc.type = DataType::kBF16;
    check(!build->supportsFormatCombination(3, io, 5, 1), "sampling_locations bf16 with fp16 value rejected");
    io[3].desc.type = DataType::kFLOAT;
    check(!build->supportsFormatCombination(4, io, 5, 1), "attention_weights must match sampling_locations");
    io[4].desc.type = DataType::kFLOAT;
    check(build->supportsFormatCombination(4, io, 5, 1), "attention_weights fp32 with fp32 locations");
    check(build->supportsFormatCombination(5, io, 5, 1), "output in value type");
    io[5].desc.type = DataType::kFLOAT;
    check(!build->supportsFormatCombination(5, io, 5, 1), "output of another type rejected");
    io[5].desc.type = DataType::kHALF;

    check(build->configurePlugin(io, 5, io + 5, 1) == 0, "configurePlugin accepts consistent shapes");
    DynamicPluginTensorDesc dyn[6];
    std::memcpy(dyn, io, sizeof(io));
    dyn[0].desc.dims.d[0] = -1;
    dyn[3].desc.dims.d[1] = -1;
    dyn[4].desc.dims.d[1] = -1;
    check(build->configurePlugin(dyn, 5, dyn + 5, 1) == 0, "configurePlugin accepts wildcard dims");
    DynamicPluginTensorDesc bad[6];
    std::memcpy(bad, io, sizeof(io));
    bad[4].desc.dims.d[4] = P + 1;
    check(build->configurePlugin(bad, 5, bad + 5, 1) != 0, "configurePlugin rejects mismatched P");
    std::memcpy(bad, io, sizeof(io));
    bad[2].desc.dims.d[0] = L + 1;
    check(build->configurePlugin(bad, 5, bad + 5, 1) != 0, "configurePlugin rejects mismatched L");

    PluginTensorDesc concrete[6];
    for (int i = 0; i < 6; ++i)
    {
        concrete[i] = io[i].desc;
    }
    check(runtime->onShapeChange(concrete, 5, concrete + 5, 1) == 0, "onShapeChange accepts consistent shapes");
    concrete[0].dims.d[2] = M + 1;
    check(runtime->onShapeChange(concrete, 5, concrete + 5, 1) != 0, "onShapeChange rejects mismatched M");
    check(build->getWorkspaceSize(io, 5, io + 5, 1) == 0, "no workspace");

    // getOutputShapes: (N, Lq, M*D).
    ExprPool pool;
    ConstBuilder builder(pool);
    DimsExprs in_exprs[5];
    for (int i = 0; i < 5; ++i)
    {
        in_exprs[i].nbDims = io[i].desc.dims.nbDims;
        for (int j = 0; j < in_exprs[i].nbDims; ++j)
        {
            in_exprs[i].d[j] = pool.make(io[i].desc.dims.d[j]);
        }
    }
    DimsExprs out_exprs{};
    int32_t const rc = build->getOutputShapes(in_exprs, 5, nullptr, 0, &out_exprs, 1, builder);
    check(rc == 0 && out_exprs.nbDims == 3 && out_exprs.d[0]->getConstantValue() == N
            && out_exprs.d[1]->getConstantValue() == Lq && out_exprs.d[2]->getConstantValue() == M * D,
        "getOutputShapes = (N, Lq, M*D)");

    PluginFieldCollection const* ser = runtime->getFieldsToSerialize();
    check(ser && ser->nbFields == 0, "nothing to serialise");

    // Runtime-phase creation (deserialisation) from the serialised fields, clone and attachToContext.
    IPluginV3* rt = creator->createPlugin("msda0", ser, TensorRTPhase::kRUNTIME);
    check(rt != nullptr && rt->getCapabilityInterface(PluginCapabilityType::kRUNTIME) != nullptr,
        "createPlugin(kRUNTIME) from serialised fields");
    IPluginV3* cl = plugin->clone();
    auto* cl_core = cl ? static_cast<IPluginV3OneCore*>(cl->getCapabilityInterface(PluginCapabilityType::kCORE))
                       : nullptr;
    check(cl_core && std::strcmp(cl_core->getPluginNamespace(), "dvis_test_ns") == 0, "clone keeps namespace");
    IPluginV3* att = runtime->attachToContext(nullptr);
    check(att != nullptr && att != plugin, "attachToContext returns a new object");
    delete att;
    delete cl;
    delete rt;
    delete plugin;

    std::printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "OK", g_failures);
    return g_failures ? 1 : 0;
}
