"""dvis-trt: deployment-optimized inference for DVIS-DAQ offline.

One import namespace over the project's folders: ``dvis_trt.runtime`` (``runtime/``),
``dvis_trt.export`` (``export/``), ``dvis_trt.engine`` (``engine/``),
``dvis_trt.benchmarks`` (``benchmarks/``) and ``dvis_trt.plugins`` (``plugins/``).
"""

__version__ = "0.1.0"
