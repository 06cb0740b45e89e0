// dvis-trt MSDeformAttn TensorRT plugin: IPluginV3 (IPluginV3OneCore / IPluginV3OneBuild / IPluginV3OneRuntime)
// plus its IPluginCreatorV3One. Plugin name "DvisMSDeformAttn", version "1", namespace "" unless configured.
//
// Inputs (same order, shapes and types as TensorRT's built-in MultiscaleDeformableAttnPlugin_TRT, so a graph can
// switch between the two by renaming the node):
//   0 value               (N, S, M, D)         float32 / float16 / bfloat16
//   1 spatial_shapes      (L, 2)               int32 or int64
//   2 level_start_index   (L)                  same type as input 1
//   3 sampling_locations  (N, Lq, M, L, P, 2)  value's type or float32
//   4 attention_weights   (N, Lq, M, L, P)     same type as input 3
// Output 0 (N, Lq, M*D), value's type (also under strongly typed networks).
//
// The plugin has no attributes and no state: nothing is serialised but its name, version and namespace.
//
// Registration. The library exports the entry points TensorRT's IPluginRegistry::loadLibrary() looks for
// (getCreators, setLoggerFinder), so it is registered by loading it through TensorRT:
//   C++:     getPluginRegistry()->loadLibrary("libdvis_msda_trt.so");
//   Python:  tensorrt.get_plugin_registry().load_library("libdvis_msda_trt.so")
//            (or dvis_trt.plugins.register_trt_plugin(), which does that once per process)
//   trtexec: --dynamicPlugins=libdvis_msda_trt.so   (version-compatible engines: setPluginsToSerialize)
// Do it before parsing an ONNX graph that contains the node and before deserialising an engine built with it.
// A plain dlopen (ctypes.CDLL, polygraphy's LoadPlugins, trtexec --staticPlugins) registers nothing unless the
// environment variable DVIS_TRT_PLUGIN_AUTOREGISTER=1 is set: the library then registers its creator with the
// process-wide registry of the libnvinfer already loaded (do not also call loadLibrary on that registry then).
// dvis_msda_trt_register_global() does the same on request. The library links no TensorRT library either way.
// The namespace is "" unless the environment variable DVIS_TRT_PLUGIN_NAMESPACE is set or
// dvis_msda_trt_set_namespace() is called before the first registration.
#include "dvis_msda/msda_api.h"

#include <NvInferRuntime.h>

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <string>

using namespace nvinfer1;

namespace
{

char const* const kPLUGIN_NAME = "DvisMSDeformAttn";
char const* const kPLUGIN_VERSION = "1";
constexpr int32_t kNB_INPUTS = 5;
constexpr int32_t kNB_OUTPUTS = 1;

// ---------------------------------------------------------------------------------------------------------------
// Logging (through the logger TensorRT hands over with setLoggerFinder, else stderr) and the namespace setting.
// ---------------------------------------------------------------------------------------------------------------
std::mutex g_mutex;
ILoggerFinder* g_logger_finder = nullptr;
std::string g_namespace;
bool g_namespace_set = false;

void log_error(char const* msg) noexcept
{
    try
    {
        std::string const line = std::string("[") + kPLUGIN_NAME + "] " + msg;
        ILogger* logger = nullptr;
        {
            std::lock_guard<std::mutex> lock(g_mutex);
            if (g_logger_finder)
            {
                logger = g_logger_finder->findLogger();
            }
        }
        if (logger)
        {
            logger->log(ILogger::Severity::kERROR, line.c_str());
        }
        else
        {
            std::fprintf(stderr, "%s\n", line.c_str());
        }
    }
    catch (...)
    {
    }
}

std::string plugin_namespace()
{
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!g_namespace_set)
    {
        char const* env = std::getenv("DVIS_TRT_PLUGIN_NAMESPACE");
        g_namespace = env ? env : "";
        g_namespace_set = true;
    }
    return g_namespace;
}

bool is_float_type(DataType t)
{
    return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16;
}

int32_t to_api_dtype(DataType t)
{
    switch (t)
    {
    case DataType::kFLOAT: return DVIS_MSDA_FLOAT32;
    case DataType::kHALF: return DVIS_MSDA_FLOAT16;
    case DataType::kBF16: return DVIS_MSDA_BFLOAT16;
    default: return -1;
    }
}

// Shape checks shared by configurePlugin (dims may hold -1 wildcards) and onShapeChange (concrete dims).
bool same_or_unknown(int64_t a, int64_t b)
{
    return a < 0 || b < 0 || a == b;
}

char const* check_dims(Dims const* d)
{
    Dims const& value = d[0];
    Dims const& shapes = d[1];
    Dims const& starts = d[2];
    Dims const& loc = d[3];
    Dims const& attn = d[4];
    if (value.nbDims != 4)
        return "value must be 4-D (N, S, M, D)";
    if (shapes.nbDims != 2)
        return "spatial_shapes must be 2-D (L, 2)";
    if (starts.nbDims != 1)
        return "level_start_index must be 1-D (L)";
    if (loc.nbDims != 6)
        return "sampling_locations must be 6-D (N, Lq, M, L, P, 2)";
    if (attn.nbDims != 5)
        return "attention_weights must be 5-D (N, Lq, M, L, P)";
    if (!same_or_unknown(shapes.d[1], 2) || !same_or_unknown(loc.d[5], 2))
        return "spatial_shapes and sampling_locations must end in a dimension of 2";
    if (!same_or_unknown(value.d[0], loc.d[0]) || !same_or_unknown(value.d[0], attn.d[0]))
        return "batch (N) differs between value, sampling_locations and attention_weights";
    if (!same_or_unknown(loc.d[1], attn.d[1]))
        return "query count (Lq) differs between sampling_locations and attention_weights";
    if (!same_or_unknown(value.d[2], loc.d[2]) || !same_or_unknown(value.d[2], attn.d[2]))
        return "head count (M) differs between value, sampling_locations and attention_weights";
    if (!same_or_unknown(shapes.d[0], starts.d[0]) || !same_or_unknown(shapes.d[0], loc.d[3])
        || !same_or_unknown(shapes.d[0], attn.d[3]))
        return "level count (L) differs between the inputs";
    if (!same_or_unknown(loc.d[4], attn.d[4]))
        return "point count (P) differs between sampling_locations and attention_weights";
    return nullptr;
}

// ---------------------------------------------------------------------------------------------------------------
// The plugin.
// ---------------------------------------------------------------------------------------------------------------
class MSDeformAttnPlugin final : public IPluginV3,
                                 public IPluginV3OneCore,
                                 public IPluginV3OneBuild,
                                 public IPluginV3OneRuntime
{
public:
    explicit MSDeformAttnPlugin(std::string ns)
        : mNamespace(std::move(ns))
    {
    }

    // IPluginV3
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    IPluginV3* clone() noexcept override
    {
        try
        {
            return new MSDeformAttnPlugin(mNamespace);
        }
        catch (std::exception const& e)
        {
            log_error(e.what());
        }
        return nullptr;
    }

    // IPluginV3OneCore
    AsciiChar const* getPluginName() const noexcept override
    {
        return kPLUGIN_NAME;
    }
    AsciiChar const* getPluginVersion() const noexcept override
    {
        return kPLUGIN_VERSION;
    }
    AsciiChar const* getPluginNamespace() const noexcept override
    {
        return mNamespace.c_str();
    }

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override
    {
        return kNB_OUTPUTS;
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override
    {
        if (!in || !out || nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
        {
            log_error("configurePlugin: expected 5 inputs and 1 output");
            return -1;
        }
        Dims dims[kNB_INPUTS];
        for (int32_t i = 0; i < kNB_INPUTS; ++i)
        {
            dims[i] = in[i].desc.dims;
        }
        if (char const* err = check_dims(dims))
        {
            log_error(err);
            return -1;
        }
        return 0;
    }

    int32_t getOutputDataTypes(
        DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        if (!outputTypes || !inputTypes || nbOutputs != kNB_OUTPUTS || nbInputs != kNB_INPUTS)
        {
            log_error("getOutputDataTypes: expected 5 inputs and 1 output");
            return -1;
        }
        if (!is_float_type(inputTypes[0]))
        {
            log_error("value must be float32, float16 or bfloat16");
            return -1;
        }
        outputTypes[0] = inputTypes[0]; // the output always has value's type
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
        int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override
    {
        if (!inputs || !outputs || nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
        {
            log_error("getOutputShapes: expected 5 inputs and 1 output");
            return -1;
        }
        if (inputs[0].nbDims != 4 || inputs[3].nbDims != 6)
        {
            log_error("getOutputShapes: value must be 4-D and sampling_locations 6-D");
            return -1;
        }
        IDimensionExpr const* md = exprBuilder.operation(DimensionOperation::kPROD, *inputs[0].d[2], *inputs[0].d[3]);
        if (!md)
        {
            log_error("getOutputShapes: could not build M*D");
            return -1;
        }
        outputs[0].nbDims = 3;
        outputs[0].d[0] = inputs[0].d[0]; // N
        outputs[0].d[1] = inputs[3].d[1]; // Lq
        outputs[0].d[2] = md;             // M*D
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override
    {
        if (!inOut || nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS || pos < 0 || pos >= kNB_INPUTS + kNB_OUTPUTS)
        {
            return false;
        }
        PluginTensorDesc const& d = inOut[pos].desc;
        if (d.format != TensorFormat::kLINEAR)
        {
            return false;
        }
        switch (pos)
        {
        case 0: return is_float_type(d.type);                                          // value
        case 1: return d.type == DataType::kINT32 || d.type == DataType::kINT64;       // spatial_shapes
        case 2: return d.type == inOut[1].desc.type;                                   // level_start_index
        case 3: return d.type == inOut[0].desc.type || d.type == DataType::kFLOAT;     // sampling_locations
        case 4: return d.type == inOut[3].desc.type;                                   // attention_weights
        default: return d.type == inOut[0].desc.type;                                  // output
        }
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
        DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept override
    {
        return 0;
    }

    char const* getTimingCacheID() noexcept override
    {
        // No attributes: the I/O shapes and formats TensorRT adds to the key identify the kernel completely.
        return "";
    }

    // IPluginV3OneRuntime
    int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override
    {
        if (!in || !out || nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
        {
            log_error("onShapeChange: expected 5 inputs and 1 output");
            return -1;
        }
        Dims dims[kNB_INPUTS];
        for (int32_t i = 0; i < kNB_INPUTS; ++i)
        {
            dims[i] = in[i].dims;
        }
        if (char const* err = check_dims(dims))
        {
            log_error(err);
            return -1;
        }
        return 0;
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc, void const* const* inputs,
        void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept override
    {
        if (!inputDesc || !outputDesc || !inputs || !outputs)
        {
            log_error("enqueue: null argument");
            return -1;
        }
        Dims const& value = inputDesc[0].dims;
        Dims const& shapes = inputDesc[1].dims;
        Dims const& loc = inputDesc[3].dims;
        int32_t const value_dtype = to_api_dtype(inputDesc[0].type);
        int32_t const loc_dtype = to_api_dtype(inputDesc[3].type);
        if (value_dtype < 0 || loc_dtype < 0 || outputDesc[0].type != inputDesc[0].type)
        {
            log_error("enqueue: unsupported data types");
            return -1;
        }
        int32_t const status = dvis_msda_cuda_forward(value_dtype, loc_dtype, inputs[0], inputs[1], inputs[2],
            inputDesc[1].type == DataType::kINT64 ? 1 : 0, inputs[3], inputs[4], outputs[0],
            /*N=*/value.d[0], /*S=*/value.d[1], /*M=*/value.d[2], /*D=*/value.d[3], /*L=*/shapes.d[0],
            /*Lq=*/loc.d[1], /*P=*/loc.d[4], stream);
        if (status != DVIS_MSDA_OK)
        {
            log_error(dvis_msda_cuda_last_error());
            return status;
        }
        return 0;
    }

    IPluginV3* attachToContext(IPluginResourceContext* /*context*/) noexcept override
    {
        return clone();
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        mSerialized.nbFields = 0;
        mSerialized.fields = nullptr;
        return &mSerialized;
    }

private:
    std::string mNamespace;
    PluginFieldCollection mSerialized{};
};

// ---------------------------------------------------------------------------------------------------------------
// The creator.
// ---------------------------------------------------------------------------------------------------------------
class MSDeformAttnPluginCreator final : public IPluginCreatorV3One
{
public:
    MSDeformAttnPluginCreator()
        : mNamespace(plugin_namespace())
    {
        mFieldNames.nbFields = 0;
        mFieldNames.fields = nullptr;
    }

    IPluginV3* createPlugin(AsciiChar const* /*name*/, PluginFieldCollection const* /*fc*/,
        TensorRTPhase /*phase*/) noexcept override
    {
        // No attributes. Fields the ONNX parser forwards from the node (e.g. plugin_version) are ignored.
        try
        {
            return new MSDeformAttnPlugin(mNamespace);
        }
        catch (std::exception const& e)
        {
            log_error(e.what());
        }
        return nullptr;
    }

    PluginFieldCollection const* getFieldNames() noexcept override
    {
        return &mFieldNames;
    }
    AsciiChar const* getPluginName() const noexcept override
    {
        return kPLUGIN_NAME;
    }
    AsciiChar const* getPluginVersion() const noexcept override
    {
        return kPLUGIN_VERSION;
    }
    AsciiChar const* getPluginNamespace() const noexcept override
    {
        return mNamespace.c_str();
    }

private:
    std::string mNamespace;
    PluginFieldCollection mFieldNames{};
};

MSDeformAttnPluginCreator& creator_instance()
{
    static MSDeformAttnPluginCreator creator;
    return creator;
}

// getPluginRegistry() of the libnvinfer already loaded in this process, found at run time (no link dependency).
// Only a libnvinfer of the major version whose headers this library was compiled with is used: the registry's
// methods are called through its vtable, whose layout may change between major versions.
using GetRegistryFn = IPluginRegistry* (*) ();
using GetMajorFn = int32_t (*)();

GetRegistryFn find_global_registry(int32_t* found_major)
{
    *found_major = -1;
    std::string const soname = "libnvinfer.so." + std::to_string(NV_TENSORRT_MAJOR);
    void* handle = dlopen(soname.c_str(), RTLD_NOW | RTLD_NOLOAD);
    void* registry_sym = dlsym(handle ? handle : RTLD_DEFAULT, "getPluginRegistry");
    void* major_sym = dlsym(handle ? handle : RTLD_DEFAULT, "getInferLibMajorVersion");
    if (handle)
    {
        dlclose(handle); // drops only the reference RTLD_NOLOAD took
    }
    if (!registry_sym || !major_sym)
    {
        return nullptr;
    }
    *found_major = reinterpret_cast<GetMajorFn>(major_sym)();
    return *found_major == NV_TENSORRT_MAJOR ? reinterpret_cast<GetRegistryFn>(registry_sym) : nullptr;
}

} // namespace

extern "C" DVIS_MSDA_EXPORT int32_t dvis_msda_trt_set_namespace(char const* ns);

namespace
{

int32_t register_global(char const* ns)
{
    if (ns && dvis_msda_trt_set_namespace(ns) != 0)
    {
        return -3; // namespace already fixed to another value
    }
    int32_t major = -1;
    GetRegistryFn get_registry = find_global_registry(&major);
    if (!get_registry && major >= 0)
    {
        return -4; // a libnvinfer of another major version is loaded
    }
    IPluginRegistry* registry = get_registry ? get_registry() : nullptr;
    if (!registry)
    {
        return -1; // libnvinfer not loaded in this process
    }
    MSDeformAttnPluginCreator& creator = creator_instance();
    if (registry->getCreator(kPLUGIN_NAME, kPLUGIN_VERSION, creator.getPluginNamespace()) == &creator)
    {
        return 0; // already registered by this library
    }
    return registry->registerCreator(creator, creator.getPluginNamespace()) ? 0 : -2;
}

// DVIS_TRT_PLUGIN_AUTOREGISTER=1: register when the library is dlopen'ed.
struct AutoRegister
{
    AutoRegister()
    {
        char const* env = std::getenv("DVIS_TRT_PLUGIN_AUTOREGISTER");
        if (env && std::strcmp(env, "1") == 0 && register_global(nullptr) != 0)
        {
            log_error("DVIS_TRT_PLUGIN_AUTOREGISTER=1 but the creator could not be registered (load TensorRT "
                      "first, or use IPluginRegistry::loadLibrary)");
        }
    }
};
AutoRegister g_auto_register;

} // namespace

extern "C" {

// Entry point of IPluginRegistry::loadLibrary(): the logger to use for messages.
DVIS_MSDA_EXPORT void setLoggerFinder(ILoggerFinder* finder)
{
    std::lock_guard<std::mutex> lock(g_mutex);
    g_logger_finder = finder;
}

// Entry point of IPluginRegistry::loadLibrary(): the IPluginV3 creators of this library.
DVIS_MSDA_EXPORT IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static IPluginCreatorInterface* const creators[] = {&creator_instance()};
    nbCreators = 1;
    return creators;
}

// Set the plugin namespace. Only effective before the creator is first used (before loadLibrary()); returns 0 on
// success, -1 when it is too late.
DVIS_MSDA_EXPORT int32_t dvis_msda_trt_set_namespace(char const* ns)
{
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_namespace_set)
    {
        return ns && g_namespace == ns ? 0 : -1;
    }
    g_namespace = ns ? ns : "";
    g_namespace_set = true;
    return 0;
}

// Register the creator with the process-wide plugin registry of the libnvinfer already loaded (an alternative to
// IPluginRegistry::loadLibrary for callers that only dlopen the library). ns: namespace, or NULL for the current
// one. Returns 0 on success (also when already registered by this library), -1 when libnvinfer is not loaded,
// -2 when the registry refused (another creator with the same name/version/namespace), -3 when the namespace is
// already fixed to another value, -4 when the loaded libnvinfer has another major version than the headers this
// library was compiled with.
DVIS_MSDA_EXPORT int32_t dvis_msda_trt_register_global(char const* ns)
{
    return register_global(ns);
}

// "name version namespace" of the plugin this library provides (for diagnostics and tests).
DVIS_MSDA_EXPORT char const* dvis_msda_trt_plugin_info(void)
{
    static std::string info;
    info = std::string(kPLUGIN_NAME) + " " + kPLUGIN_VERSION + " " + creator_instance().getPluginNamespace();
    return info.c_str();
}

DVIS_MSDA_EXPORT int32_t dvis_msda_trt_compiled_against(void)
{
    return NV_TENSORRT_MAJOR * 10000 + NV_TENSORRT_MINOR * 100 + NV_TENSORRT_PATCH;
}

} // extern "C"
