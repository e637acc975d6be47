"""Weights in and out of other formats: OpenAI CLIP, original SLIP, open_clip, transformers' CLIPModel, safetensors.

Each module converts one format to our terms (`common.Converted`: model spec, state dict, provenance) and, where
the target can express a model exactly, back (`common.Exported`; `common.ExportError` names what it cannot).
`slip.pretrained.load_pretrained` reads them all; `python -m slip.export` writes them.
"""
