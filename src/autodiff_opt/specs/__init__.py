"""Records of what can be configured, importing no torch, Optuna or diffusers.

``preflight`` validates names and options against these records before anything heavy is imported, and
the code that runs looks its solver, sampler and option lists up in the same records, so the two cannot
drift apart. Adding a solver or a sampler is one module of code plus one line here (docs/architecture.md).

- ``solvers``: ``SolverSpec`` per ``solver.name`` / ``search.solvers`` entry (order, evaluations a step,
  flow or VP, the diffusers scheduler that runs it on custom steps).
- ``samplers``: ``SamplerSpec`` per ``search.sampler`` (factory, presets, what it supports).
- ``options``: the smaller closed lists (stage-2 units, diffusers caches, peer methods).
"""
