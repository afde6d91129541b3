"""Model registry: versions and production assignments of each tenant's adapter and ONNX export.

`base` is the backend-neutral interface, `gto_registry` its git-tag (GTO) backend, `release` the
step that flows and the CLI run after a tenant's DVC stages.
"""

from loraline.registry.base import ANY, Assignment, PromotionConflict, Registry, RegistryError, Version

__all__ = ["ANY", "Assignment", "PromotionConflict", "Registry", "RegistryError", "Version"]
