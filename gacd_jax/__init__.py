"""gacd_jax: adversarial robustness distillation in JAX (GACD, CRDND and the baselines)."""

__version__ = "0.1.0"
