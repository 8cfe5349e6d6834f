"""Ahead-of-time analysis for hardware this host does not have: compile a jitted program for abstract TPU / GPU
devices and read what it needs per device (memory, FLOPs through loops, collectives, estimated step time).

  target = Target("tpu:v5e:4x4")            # or targets.parse(name): published figures, abstract devices
  mesh = Mesh(np.asarray(target.devices()).reshape(...), axes)
  analysis = compile_and_analyze(jax.jit(f, in_shardings=..., out_shardings=...).lower(*shape_dtype_structs), target)
  analysis.to_dict(); analysis.mfu(model_flops_per_step)

Modules: `targets` (Target, SOURCES), `hlo` (Analysis, analyze, compile_and_analyze, the time model METHOD),
`hlo_module` (the optimized HLO text: computations, loop trip counts, FLOPs, collectives).
"""

from ipo_jax.aot.hlo import METHOD, Analysis, CollectiveSummary, analyze, compile_and_analyze, parse_oom
from ipo_jax.aot.targets import FORMS, SOURCES, Target

__all__ = ["Analysis", "CollectiveSummary", "FORMS", "METHOD", "SOURCES", "Target", "analyze", "compile_and_analyze",
           "parse_oom"]
