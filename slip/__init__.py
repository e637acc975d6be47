"""slip: multi-objective image-text pretraining (CLIP, SimCLR, SLIP, SigLIP)."""
from slip.checkpoint import load_pretrained, save_model
from slip.losses import CLIPLoss, Objective, SigLIPLoss, SimCLRLoss, SLIPLoss, WeightedObjectives
from slip.models import MODEL_BUILDERS, ImageTextModel, build_resnet_model, build_vit_model
from slip.tokenizer import decode, tokenize

__version__ = "0.1.0"

__all__ = [
    "CLIPLoss", "ImageTextModel", "MODEL_BUILDERS", "Objective", "SLIPLoss", "SigLIPLoss", "SimCLRLoss",
    "WeightedObjectives", "__version__", "build_resnet_model", "build_vit_model", "decode", "load_pretrained",
    "save_model", "tokenize",
]
