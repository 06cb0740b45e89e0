"""The MSDeformAttn plugin's identity, defined once: TensorRT plugin name / version /
namespace, the ONNX node's domain and op type, TensorRT's built-in equivalent, and the C ABI
version. Used by the exporter (node names), the precision converter and FLOP counter (op types),
the ONNX Runtime custom op and the TensorRT registration. Pure constants: no imports.
"""

__all__ = ["PLUGIN_NAME", "PLUGIN_VERSION", "PLUGIN_NAMESPACE", "ONNX_DOMAIN", "ONNX_OP_TYPE",
           "TRT_BUILTIN_PLUGIN", "TRT_BUILTIN_VERSION", "MSDA_OP_TYPES", "ABI_VERSION"]

#: TensorRT plugin name / version / default namespace (``IPluginCreatorV3One``); also the ONNX node's
#: ``plugin_version`` / ``plugin_namespace`` attributes.
PLUGIN_NAME = "DvisMSDeformAttn"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
#: The ONNX node that carries the op: ``dvis_trt::DvisMSDeformAttn``.
ONNX_DOMAIN = "dvis_trt"
ONNX_OP_TYPE = PLUGIN_NAME
#: Must equal DVIS_MSDA_ABI_VERSION in include/dvis_msda/msda_api.h.
ABI_VERSION = 1
#: TensorRT's own MSDeformAttn plugin (same input contract; ``--msda trt-builtin``).
TRT_BUILTIN_PLUGIN = "MultiscaleDeformableAttnPlugin_TRT"
#: Its IPluginV3 version (the ``plugin_version`` attribute of a ``trt-builtin`` node).
TRT_BUILTIN_VERSION = "2"
#: Every ONNX op type that is one whole MSDeformAttn call (ours and TensorRT's).
MSDA_OP_TYPES = (ONNX_OP_TYPE, TRT_BUILTIN_PLUGIN)
