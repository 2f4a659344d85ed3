"""Adam and AdamW settings that the fused-step tests check against torch.optim.

Each entry is (convdescent optimizer name, its keyword arguments, torch.optim class name, its keyword
arguments): plain Adam, Adam with L2 weight decay, AMSGrad with other betas and eps, AdamW, and AdamW with
AMSGrad.
"""

CONFIGS = [
    ("adam", {}, "Adam", {}),
    ("adam", {"weight_decay": 0.1}, "Adam", {"weight_decay": 0.1}),
    ("adam", {"amsgrad": True, "betas": (0.8, 0.99), "eps": 1e-6}, "Adam",
     {"amsgrad": True, "betas": (0.8, 0.99), "eps": 1e-6}),
    ("adamw", {}, "AdamW", {}),
    ("adamw", {"weight_decay": 0.3, "amsgrad": True}, "AdamW", {"weight_decay": 0.3, "amsgrad": True}),
]
CONFIG_IDS = [f"{c[0]}{i}" for i, c in enumerate(CONFIGS)]
