"""TensorRT backend (package): prebuilt engines (``dvis-trt build``), tensors resident on the GPU between
stages. No torch. ``tensorrt`` and ``cuda.bindings`` (NVIDIA's CUDA Python binding) are
imported only inside :class:`TrtBackend`, so this module imports — and its buffer planning is
tested — on machines without a GPU.

Data flow (one CUDA stream, everything enqueued asynchronously)::

    frames --pinned x2--> images --segmenter--> mask_features, frame_embeds: written straight
                                                into the clip stores at the window's frame offset;
                                                mask_pooled, pred_logits: window buffers
    store mask_features[i] --D2D--> tracker_step inputs --CUDA graph per tQ--> outputs
    store frame_embeds[0:L] --(zero copy)--> refiner
    refiner mask_embed --row gather (D2D)--> mask_head <--(zero copy)-- mask_features[t0:t0+t]
    to the host, via pinned buffers: segmenter pred_logits and frame_embeds (host scores,
    Hungarian links), tracker outputs (track hub), refiner pred_logits, the final masks.

* Buffers are allocated once per *shape bucket* = (stage, optimization profile) at the
  profile's max shapes (:func:`plan_buffers`) and reused for every call in that bucket; the
  clip stores are sized for the engine's ``max_frames``.
* One ``IExecutionContext`` per (stage, profile); named tensors via ``set_input_shape`` /
  ``set_tensor_address`` / ``execute_async_v3``.
* ``tracker_step`` runs once per frame with ``tQ`` live tracks; after a warm-up call per
  ``(profile, tQ)`` its enqueue is captured in a CUDA graph and replayed (:class:`GraphCache`);
  its inputs live at fixed addresses (D2D copies from the stores: ~26 MB/frame at R50 sizes,
  microseconds on a datacenter GPU), which is what makes the graph replayable.
* Decoding, the H2D copy of the next window and the segmenter overlap: ``run_resident`` returns
  as soon as the work is enqueued; the image staging buffers are double-buffered and guarded
  by CUDA events, so the host fills window k+1 while window k is copied and segmented.

Device-resident variants (beyond :class:`~dvis_trt.runtime.backends.base.Backend`):
``begin_clip(num_frames, Hp, Wp)``, ``run_resident("segmenter", ..., frame_offset=f0)``,
``clip_store(name, start, stop)`` -> :class:`DeviceTensor`, ``DeviceTensor.frame(i)`` /
``.frames(a, b)`` views, ``gather_rows(src, rows, t0, t)`` for the mask head.

Modules: :mod:`.loader` (machine identity, engine folder, plugin, deserialisation),
:mod:`.buffers` (planning, no GPU), :mod:`.cuda` (CUDA helpers), :mod:`.backend` (the runner).
"""
from .backend import TrtBackend
from .buffers import (ALIGNMENT, CLIP_STORES, GRAPH_STAGES, HOST_FED, HOST_FETCHED, BufferPlan,
                      GraphCache, plan_buffers, profile_max_dims)
from .cuda import DeviceTensor

__all__ = ["ALIGNMENT", "CLIP_STORES", "HOST_FETCHED", "HOST_FED", "GRAPH_STAGES",
           "BufferPlan", "plan_buffers", "profile_max_dims", "GraphCache", "DeviceTensor",
           "TrtBackend"]
