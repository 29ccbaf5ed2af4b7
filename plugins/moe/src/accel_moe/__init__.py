"""accel-moe: ScatterMoE experts for transformers' ``ExpertsInterface`` and expert parallelism.

``kernels/scatter_gemm`` is the op (a grouped GEMM whose input rows are gathered and whose
output rows are scattered by the routing, Triton on CUDA, ``torch._grouped_mm`` on CPU),
``experts`` is the experts forward registered as ``experts_implementation="scattermoe"``,
``parallel`` turns ``ep_degree`` into transformers' ``DistributedConfig`` and checks it, and
``plugin`` is the accel plugin. Nothing heavy is imported here.
"""

IMPLEMENTATION = "scattermoe"
