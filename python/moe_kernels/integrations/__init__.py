"""Integrations of moe_kernels with model libraries. Each submodule imports its library only when
imported itself: `import moe_kernels` never imports transformers.

- :mod:`moe_kernels.integrations.transformers`: HF transformers' experts interfaces
  (``register()``, then ``model.set_experts_implementation("moe_kernels")``).
"""
