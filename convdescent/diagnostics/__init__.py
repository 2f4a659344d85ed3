"""Diagnostics computed from a model's parameters and gradients, starting with gradient checking."""

from .gradcheck import (GradcheckReport, GradcheckResult, check_layer, check_model_layers, gradcheck,
                        register_kink_probe)

__all__ = ["gradcheck", "check_layer", "check_model_layers", "GradcheckReport", "GradcheckResult",
           "register_kink_probe"]

# The gradient-health monitor, border analysis, saliency maps, filter pictures and the loss landscape.
from .border import coverage, edge_center_ratios, input_gradient_map, window_count_1d  # noqa: E402
from .filters import conv_activations, write_filter_pictures  # noqa: E402
from .health import HealthMonitor, HealthRules  # noqa: E402
from .landscape import compute_landscape, filter_normalized_direction  # noqa: E402
from .saliency import explain, grad_cam, saliency, smoothgrad  # noqa: E402

__all__ += ["HealthMonitor", "HealthRules", "coverage", "edge_center_ratios", "input_gradient_map", "window_count_1d",
            "conv_activations", "write_filter_pictures", "compute_landscape", "filter_normalized_direction",
            "explain", "grad_cam", "saliency", "smoothgrad"]
