"""The names of a batch's inputs, shared by the models, the objectives, the view recipes and the training task."""
from __future__ import annotations

__all__ = ["ALL_INPUTS", "IMAGE_TEXT", "IMAGE_VIEWS", "SSL_VIEWS"]

IMAGE_TEXT = ("image", "text")
"""The image-text pair: the CLIP view and its caption's tokens."""
SSL_VIEWS = ("aug1", "aug2")
"""The two augmented views that the SSL head embeds."""
IMAGE_VIEWS = ("image", *SSL_VIEWS)
"""Every input that is an image: the CLIP view and the SSL views."""
ALL_INPUTS = (*IMAGE_TEXT, *SSL_VIEWS)
"""Every input a batch may hold, in the order objectives list them."""
