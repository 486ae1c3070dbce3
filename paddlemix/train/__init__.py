"""Training pieces: losses over the data world, optimizer groups and schedules."""
from .loss import ClipLoss, SigLipLoss
from .optim import CosineWithWarmup, build_optimizer, cosine_with_warmup, param_groups

__all__ = ["ClipLoss", "SigLipLoss", "CosineWithWarmup", "build_optimizer", "cosine_with_warmup", "param_groups"]
