"""Diagnostics computed from a model's parameters and gradients, starting with gradient checking."""

from .gradcheck import (GradcheckReport, GradcheckResult, check_layer, check_model_layers, gradcheck,
                        register_kink_probe)

__all__ = ["gradcheck", "check_layer", "check_model_layers", "GradcheckReport", "GradcheckResult",
           "register_kink_probe"]
