// dvis-trt MSDeformAttn: the C entry points of the CPU twin (libdvis_msda_cpu) and of the CUDA kernel library
// (libdvis_msda_cuda, also linked into the TensorRT plugin libdvis_msda_trt).
//
// Tensor contract (identical to TensorRT's built-in MultiscaleDeformableAttnPlugin_TRT inputs; output flattened):
//   value               (N, S, M, D)        float
//   spatial_shapes      (L, 2)   [h, w]     int32 or int64
//   level_start_index   (L)                 int32 or int64
//   sampling_locations  (N, Lq, M, L, P, 2) float, (x, y) normalised to [0, 1]
//   attention_weights   (N, Lq, M, L, P)    float
//   output              (N, Lq, M*D)        float (same type as value)
// All tensors dense, row-major (C-contiguous). Semantics: official ms_deform_attn_core_pytorch.
#ifndef DVIS_MSDA_API_H
#define DVIS_MSDA_API_H

#include <stdint.h>

#if defined(_WIN32)
#define DVIS_MSDA_EXPORT __declspec(dllexport)
#else
#define DVIS_MSDA_EXPORT __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

// Bumped whenever a signature below changes; the Python loader refuses a library with another value.
#define DVIS_MSDA_ABI_VERSION 1

// Status codes returned by the forward functions.
#define DVIS_MSDA_OK 0
#define DVIS_MSDA_ERR_ARGUMENT (-1)  // bad sizes or null pointers (message in *_last_error)
#define DVIS_MSDA_ERR_LEVELS (-2)    // a level (h, w, start) does not fit in S (CPU twin only: checked on host)
#define DVIS_MSDA_ERR_DTYPE (-3)     // unsupported dtype combination (CUDA)
#define DVIS_MSDA_ERR_CUDA (-4)      // CUDA launch error (message in dvis_msda_cuda_last_error)

// Element types for the CUDA entry point.
#define DVIS_MSDA_FLOAT32 0
#define DVIS_MSDA_FLOAT16 1
#define DVIS_MSDA_BFLOAT16 2

// ---- CPU twin (libdvis_msda_cpu) --------------------------------------------------------------------------------
DVIS_MSDA_EXPORT int32_t dvis_msda_cpu_abi_version(void);

// fp32 forward on the CPU. index_is_int64: 1 when spatial_shapes / level_start_index hold int64, 0 for int32.
// num_threads <= 0: use the hardware concurrency. Checks every level against S before touching memory.
DVIS_MSDA_EXPORT int32_t dvis_msda_cpu_forward_f32(float const* value, void const* spatial_shapes,
    void const* level_start_index, int32_t index_is_int64, float const* sampling_locations,
    float const* attention_weights, float* output, int64_t N, int64_t S, int64_t M, int64_t D, int64_t L, int64_t Lq,
    int64_t P, int32_t num_threads);

// Message of the last failed call on this thread ("" if none).
DVIS_MSDA_EXPORT char const* dvis_msda_cpu_last_error(void);

// ---- CUDA kernel (libdvis_msda_cuda) -----------------------------------------------------------------------------
DVIS_MSDA_EXPORT int32_t dvis_msda_cuda_abi_version(void);

// Enqueue the forward pass on `stream` (a cudaStream_t; NULL = legacy default stream). All pointers are device
// pointers. value_dtype: DVIS_MSDA_FLOAT32/FLOAT16/BFLOAT16 (output has the same type); loc_dtype (type of
// sampling_locations and attention_weights): value_dtype or DVIS_MSDA_FLOAT32. Sampling coordinates and the
// accumulation are fp32 whatever the I/O type. No atomics; every output element is written exactly once.
// A level whose (h, w, start) does not fit in S contributes zero (the index tensors live on the device and are
// not read back).
DVIS_MSDA_EXPORT int32_t dvis_msda_cuda_forward(int32_t value_dtype, int32_t loc_dtype, void const* value,
    void const* spatial_shapes, void const* level_start_index, int32_t index_is_int64, void const* sampling_locations,
    void const* attention_weights, void* output, int64_t N, int64_t S, int64_t M, int64_t D, int64_t L, int64_t Lq,
    int64_t P, void* stream);

// The vector width (elements per load) the kernel would use for this head dim / dtype / pointer alignment.
DVIS_MSDA_EXPORT int32_t dvis_msda_cuda_vector_width(
    int32_t value_dtype, int64_t D, void const* value, void const* output);

DVIS_MSDA_EXPORT char const* dvis_msda_cuda_last_error(void);

#ifdef __cplusplus
}
#endif

#endif // DVIS_MSDA_API_H
