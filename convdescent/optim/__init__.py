"""Optimizers as composable gradient transformations (Optax style), checked against torch.optim.

Quick start::

    from convdescent import optim
    opt = optim.make_optimizer("adam", lr=1e-3, clip_norm=1.0)
    state = opt.init(params)                      # params: dict name -> Tensor
    updates, state = opt.update(grads, state, params)
    optim.apply_updates(params, updates)          # in place

See docs/optimizers.md for the building blocks, schedules, clipping, recording and state saving.
"""

from .aliases import (
    OPTIMIZERS,
    OptimizerEntry,
    adadelta,
    adagrad,
    adam,
    adamax,
    adamw,
    gd,
    lion,
    list_optimizers_text,
    make_optimizer,
    nadam,
    optimizer_from_args,
    radam,
    rmsprop,
    sgd,
)
from .base import (
    EmptyState,
    GradientTransformation,
    TransformInfo,
    apply_updates,
    chain,
    current_lr,
    describe,
    find_plateau,
    identity,
    load_state_dict,
    state_dict,
    walk_infos,
)
from .clipping import (
    ClipState,
    adaptive_grad_clip,
    clip_by_global_norm,
    clip_by_norm,
    clip_by_value,
    global_norm,
    peak_magnitudes,
    unitwise_norm,
)
from .fused import InlineAdam, fused_step, inline_step, update_and_apply
from .record import RecordState, optimizer_stats, record_norms
from .schedules import (
    SCHEDULES,
    ReduceOnPlateau,
    Schedule,
    ScheduleEntry,
    constant_schedule,
    cosine_decay,
    cosine_restarts,
    exponential_decay,
    inverse_time_decay,
    make_schedule,
    multistep_decay,
    one_cycle,
    one_cycle_momentum,
    polynomial_decay,
    step_decay,
    warmup,
)
from .transforms import (
    ScaleByAdadeltaState,
    ScaleByAdagradState,
    ScaleByAdamaxState,
    ScaleByAdamState,
    ScaleByLearningRateState,
    ScaleByLionState,
    ScaleByNadamState,
    ScaleByRadamState,
    ScaleByRmsState,
    TraceState,
    add_decayed_weights,
    coupled_weight_decay,
    decoupled_weight_decay,
    scale,
    scale_by_adadelta,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_adamax,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_nadam,
    scale_by_radam,
    scale_by_rms,
    trace,
)
from .sharding import across_shards, shard_any, shard_sum
from .updates import LazyUpdates

__all__ = [
    "OPTIMIZERS", "OptimizerEntry", "adadelta", "adagrad", "adam", "adamax", "adamw", "gd", "lion",
    "list_optimizers_text", "make_optimizer", "nadam", "optimizer_from_args", "radam", "rmsprop", "sgd",
    "EmptyState", "GradientTransformation", "TransformInfo", "apply_updates", "chain", "current_lr", "describe",
    "find_plateau", "identity", "load_state_dict", "state_dict",
    "ClipState", "adaptive_grad_clip", "clip_by_global_norm", "clip_by_norm", "clip_by_value", "global_norm", "peak_magnitudes",
    "unitwise_norm",
    "RecordState", "optimizer_stats", "record_norms",
    "SCHEDULES", "ReduceOnPlateau", "Schedule", "ScheduleEntry", "constant_schedule", "cosine_decay",
    "cosine_restarts", "exponential_decay", "inverse_time_decay", "make_schedule", "multistep_decay", "one_cycle",
    "one_cycle_momentum", "polynomial_decay", "step_decay", "warmup",
    "ScaleByAdadeltaState", "ScaleByAdagradState", "ScaleByAdamState", "ScaleByLearningRateState",
    "ScaleByLionState", "ScaleByNadamState", "ScaleByRadamState", "ScaleByAdamaxState", "ScaleByRmsState",
    "TraceState", "add_decayed_weights", "coupled_weight_decay", "decoupled_weight_decay", "scale",
    "scale_by_adadelta", "scale_by_adagrad", "scale_by_adam", "scale_by_adamax", "scale_by_radam",
    "scale_by_learning_rate", "scale_by_lion", "scale_by_nadam", "scale_by_rms", "trace",
    "LazyUpdates", "fused_step", "update_and_apply", "InlineAdam", "inline_step", "walk_infos", "across_shards", "shard_any", "shard_sum",
]
