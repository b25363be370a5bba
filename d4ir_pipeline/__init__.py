"""d4ir-pipeline: data-free distillation with degradation-prompt diffusion (D4IR)."""

__version__ = "0.1.0"
