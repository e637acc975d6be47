"""The image-text model: an image tower, an optional text tower, projections, logit scale and SSL head."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from slip.inputs import (ALL_INPUTS, IMAGE_TEXT, IMAGE_VIEWS, SSL_VIEWS, is_global_view, is_image_view, is_local_view,
                         ordered_inputs)
from slip.models.heads import CLIP_INITIAL_LOGIT_SCALE, MAX_LOGIT_SCALE, SSLHead, projection
from slip.models.text import TextTransformer
from slip.models.vision import has_batch_statistics, patch_dropout_rate

__all__ = ["ALL_INPUTS", "ImageTextModel"]

if TYPE_CHECKING:
    from slip.models.spec import ModelSpec


class ImageTextModel(nn.Module):
    """Maps a batch dict to named outputs; builds and computes only the parts its objective needs.

    Outputs: `image_embed`, `text_embed` (projected, not normalised), `logit_scale` (exponentiated and
    clamped), `augK_embed` for each global view (`aug1`, `aug2` and any more) and `localK_embed` for each local view
    (after the SSL head). `global_views` names the global crops it embeds besides `aug1` and `aug2`, and `local_views`
    the local crops (None: those of `spec.inputs`).
    """

    def __init__(
        self,
        visual: nn.Module,
        embed_dim: int,
        text: TextTransformer | None = None,
        project_image: bool = True,
        ssl_head: SSLHead | None = None,
        logit_scale_init: float = CLIP_INITIAL_LOGIT_SCALE,
        max_logit_scale: float = MAX_LOGIT_SCALE,
        batch_views: bool = True,
        spec: ModelSpec | None = None,
        view_patch_dropout: Mapping[str, float] | None = None,
        local_views: Sequence[str] | None = None,
        global_views: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        # The share of patch tokens each image view drops in training (ViT towers; FLIP's patch dropout).
        self.view_patch_dropout = {view: 0.0 for view in IMAGE_VIEWS} | dict(view_patch_dropout or {})
        multicrop = {}
        for kind, names, recognise, example in (("global", global_views, is_global_view, "aug3, aug4"),
                                                ("local", local_views, is_local_view, "local1, local2")):
            if names is None:
                names = [] if spec is None else [name for name in spec.inputs if recognise(name)]
            if isinstance(names, str) or not all(recognise(name) for name in names):
                raise ValueError(f"{kind}_views must name {kind} views ({example}, ...), got {names!r}")
            multicrop[kind] = ordered_inputs(name for name in names if name not in SSL_VIEWS)
        if (multicrop["global"] or multicrop["local"]) and ssl_head is None:
            raise ValueError(f"views {[*multicrop['global'], *multicrop['local']]} are embedded by the SSL head, but "
                             "ssl_head is None")
        # The global views beyond aug1 and aug2 (a multi-crop objective's), and the local views.
        self.global_views, self.local_views = multicrop["global"], multicrop["local"]
        self.visual = visual
        self.text = text
        self.image_mlp = ssl_head
        self.embed_dim = embed_dim
        self.max_logit_scale = max_logit_scale
        self.batch_views = batch_views
        self.spec = spec  # what built this model (slip.models.build_model); checkpoints keep it
        self._visual_has_batch_statistics = has_batch_statistics(visual)
        if text is None:
            self.register_parameter("image_projection", None)
            self.register_parameter("text_projection", None)
            self.register_parameter("logit_scale", None)
        else:
            if project_image:
                self.image_projection = projection(visual.num_features, embed_dim)
            elif visual.num_features != embed_dim:
                raise ValueError(
                    f"image tower outputs {visual.num_features} features but embed_dim={embed_dim} "
                    "and project_image=False"
                )
            else:
                self.register_parameter("image_projection", None)
            self.text_projection = projection(text.num_features, embed_dim)
            self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))

    @property
    def arch(self) -> dict[str, Any]:
        """The spec's fields by builder keyword (read-only; kept for earlier callers, prefer `spec`)."""
        return {} if self.spec is None else self.spec.builder_kwargs()

    @property
    def inputs(self) -> tuple[str, ...]:
        """The batch keys this model consumes."""
        keys = IMAGE_TEXT if self.text is not None else ()
        return keys + (self.ssl_views if self.image_mlp is not None else ())

    @property
    def ssl_views(self) -> tuple[str, ...]:
        """The views the SSL head embeds: the global views (`aug1`, `aug2` and any more), then the local views."""
        return SSL_VIEWS + self.global_views + self.local_views

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Image-tower features before any projection (what a linear probe reads)."""
        return self.visual(images)

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        """Image-tower features -> joint embedding space."""
        if self.text is None:
            raise RuntimeError("this model was built without a text tower, so it has no joint image-text space")
        return features if self.image_projection is None else features @ self.image_projection

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> projected, un-normalised embeddings in the joint space."""
        return self.project_image(self.image_features(images))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> projected, un-normalised embeddings in the joint space."""
        if self.text is None:
            raise RuntimeError("this model was built without a text tower (an SSL-only objective)")
        return self.project_text(self.text(tokens))

    def project_text(self, features: torch.Tensor) -> torch.Tensor:
        """Text-tower features -> joint embedding space."""
        return features @ self.text_projection

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute tower activations in backward to save memory (where the tower supports it)."""
        if hasattr(self.visual, "set_grad_checkpointing"):
            self.visual.set_grad_checkpointing(enable)
        if self.text is not None:
            self.text.transformer.grad_checkpointing = enable

    def blocks(self) -> list[nn.Module]:
        """The towers' repeated blocks (the image tower's, then the text transformer's): FSDP2's units."""
        text = list(self.text.transformer.resblocks) if self.text is not None else []
        return [*self.spec.vision.blocks(self.visual), *text]

    def scaled_logit_scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped to at most `max_logit_scale`."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def after_optimizer_step(self) -> None:
        """Keep the learned logit scale in [0, log(max_logit_scale)] (CLIP's clamp), when the model has one."""
        if self.logit_scale is not None:
            with torch.no_grad():
                self.logit_scale.clamp_(0, math.log(self.max_logit_scale))

    def logged_scalars(self) -> dict[str, float]:
        """What training logs of the model at a step, read before its optimizer step: the scale its loss used."""
        if self.logit_scale is None:
            return {}
        return {"logit_scale": float(self.scaled_logit_scale().detach())}

    def _patch_dropout(self, view: str) -> float:
        """The share of patch tokens `view` drops in training: its own rate, or for a further global or a local view
        the SSL views'."""
        if view not in self.view_patch_dropout and (is_global_view(view) or is_local_view(view)):
            return self.view_patch_dropout[SSL_VIEWS[0]]
        return self.view_patch_dropout[view]

    def _view_features(self, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Image-tower features of every view, in one batched pass per patch-dropout rate and image size when that
        cannot change the result."""
        rates = {name: self._patch_dropout(name) if self.training else 0.0 for name in views}
        features: dict[str, torch.Tensor] = {}
        for rate in dict.fromkeys(rates.values()):
            group = {name: images for name, images in views.items() if rates[name] == rate}
            with patch_dropout_rate(self.visual, rate):
                features.update(self._group_features(group))
        return {name: features[name] for name in views}

    def _group_features(self, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Features of views that share a patch-dropout rate: one tower call per image shape (the global views
        together, the local crops together) unless batch statistics would mix the views."""
        independent_samples = not (self.training and self._visual_has_batch_statistics)
        if not (self.batch_views and len(views) > 1 and independent_samples):
            return {name: self.visual(images) for name, images in views.items()}
        by_shape: dict[tuple[int, ...], list[str]] = {}
        for name, images in views.items():
            by_shape.setdefault(tuple(images.shape[1:]), []).append(name)
        features: dict[str, torch.Tensor] = {}
        for names in by_shape.values():
            if len(names) == 1:
                features[names[0]] = self.visual(views[names[0]])
                continue
            joint = self.visual(torch.cat([views[name] for name in names]))
            features.update(zip(names, joint.split([views[name].shape[0] for name in names])))
        return features

    def tower_features(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Batch -> the towers' features, keyed by input (`image`, `text`, global and local views), before any head.

        Samples only meet in the towers through batch statistics (a ResNet's BatchNorm); the heads and the
        objective see the whole batch, which is where exact accumulation splits the model (`slip.app.accumulation`).
        """
        wanted = self.inputs
        views = {k: batch[k] for k in wanted if is_image_view(k) and k in batch}
        features = self._view_features(views) if views else {}
        if "text" in batch and "text" in wanted:
            features["text"] = self.text(batch["text"])
        return features

    def heads(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tower features -> the outputs dict: projections, logit scale and the SSL head."""
        outputs: dict[str, torch.Tensor] = {}
        if "image" in features:
            outputs["image_embed"] = self.project_image(features["image"])
        if "text" in features:
            outputs["text_embed"] = self.project_text(features["text"])
        if outputs:  # an image or text embedding was computed, so the logit scale is needed too
            outputs["logit_scale"] = self.scaled_logit_scale()
        for view in self.ssl_views:
            if view in features:  # one head call per view, as BatchNorm in the head normalises per view
                outputs[f"{view}_embed"] = self.image_mlp(features[view])
        return outputs

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Batch dict (`image`, `text`, global and local views, any subset) -> outputs dict."""
        return self.heads(self.tower_features(batch))
