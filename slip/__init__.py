"""slip: multi-objective image-text pretraining (CLIP, SimCLR, SLIP, SigLIP)."""

__version__ = "0.1.0"
