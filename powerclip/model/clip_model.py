"""PowerClipModel: an open_clip model plus the dense outputs of docs/losses.md §0, in one forward pass.

The wrapped open_clip model is ``self.clip`` and is the only thing with parameters, so the
export is exactly ``model.clip.state_dict()``. The global embeddings come out of open_clip's own
code paths (``visual(images)`` and ``encode_text``); the dense outputs are read from the same pass
(the ViT's ``output_tokens`` and the output of the text tower's ``ln_final``), so turning dense on
can never change the pooled embeddings (tests/test_model.py asserts bit-equality).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from powerclip.data.batch import Batch, text_fields
from powerclip.errors import UserError
from powerclip.model.features import Features


class DenseUnsupportedError(UserError, RuntimeError):
    """The model's towers have no dense path (docs/losses.md §0) that powerclip knows how to read."""


def _project(x: torch.Tensor, proj: nn.Module | torch.Tensor | None) -> torch.Tensor:
    """Apply an open_clip output projection (a Parameter matrix or an nn.Linear, or none)."""
    if proj is None:
        return x
    if isinstance(proj, nn.Linear):
        return proj(x)
    return x @ proj


def mean_pool_text(clip: nn.Module, text: torch.Tensor) -> torch.Tensor:
    """Unnormalised text embeddings [N, D] by averaging the ``ln_final`` token states over the real
    tokens (SOT .. EOT, not the padding) and projecting: PowerCLIP's text pooling, which open_clip's
    ``text_pool_type`` cannot express. One tower pass, read by a hook like the dense path."""
    return _text_states_and_mean(clip, text)[1]


def _text_states_and_mean(clip: nn.Module, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    owner = clip.text if hasattr(clip, "text") else clip
    ln = getattr(owner, "ln_final", None)
    if not isinstance(ln, nn.Module) or not hasattr(owner, "text_projection"):
        raise DenseUnsupportedError(f"mean text pooling needs a text tower with ln_final and text_projection, "
                                    f"not {type(owner).__name__}")
    captured: list[torch.Tensor] = []
    handle = ln.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        type(clip).encode_text(clip, text)  # the class's method: an evaluation may patch the instance's
    finally:
        handle.remove()
    states = captured[-1]
    if states.ndim != 3 or states.shape[1] != text.shape[1]:
        raise DenseUnsupportedError("text tower applies ln_final after pooling; no token states")
    real = (text != 0).to(states.dtype).unsqueeze(-1)  # open_clip pads with 0; SOT/EOT are nonzero
    pooled = (states * real).sum(1) / real.sum(1).clamp(min=1)
    return states, _project(pooled, owner.text_projection)


class PowerClipModel(nn.Module):
    """Wraps an open_clip CLIP / CustomTextCLIP; ``forward(batch, dense)`` returns ``Features``.

    ``text_pool="mean"`` averages the text tower's token states instead of open_clip's own pooling
    (``mean_pool_text``); the image tower's pooling lives in the open_clip config (``pool_type``).
    """

    def __init__(self, clip: nn.Module, logit_scale_max: float = math.log(100.0), text_pool: str = "default"):
        super().__init__()
        if text_pool not in ("default", "mean"):
            raise ValueError(f"text_pool must be 'default' or 'mean', got {text_pool!r}")
        self.text_pool = text_pool
        self.clip = clip
        self.logit_scale_max_cfg = float(logit_scale_max)
        self.logit_scale_max = float(logit_scale_max)  # set by reset_logit_scale_max()
        self.encoder = _Encoder(self)
        self._register_zero3_external_params()

    # ---------------------------------------------------------------------------- set-up
    def _text_parts(self) -> tuple[nn.Module | None, nn.Module | None]:
        """Where the text tower's final LayerNorm and projection live (CLIP vs CustomTextCLIP).

        Looked up on demand, never stored: a module attribute would register them a second time.
        """
        owner = self.clip.text if hasattr(self.clip, "text") else self.clip
        ln = getattr(owner, "ln_final", None)
        if not isinstance(ln, nn.Module) or not hasattr(owner, "text_projection"):
            return None, None  # e.g. HF text towers: no dense token path
        return ln, owner

    def _register_zero3_external_params(self) -> None:
        """Tell ZeRO-3 about parameters that are read outside their owner's ``forward``.

        ZeRO-3 gathers a module's own parameters around that module's forward. open_clip and timm
        read some parameters from methods instead: CLIP's ``encode_text`` uses its
        ``positional_embedding``/``text_projection``, the losses use ``logit_scale``/``logit_bias``,
        the dense paths multiply by ``visual.proj``/``text_projection`` after the tower's forward,
        and timm's ``forward_features`` reads ``cls_token``/``pos_embed``. All of these are direct
        parameters of container modules (modules with children), which are small, so every such
        parameter is registered on ``_Encoder`` and gathered for its whole forward and backward
        (no-op without ZeRO-3). Leaf layers (Linear, LayerNorm...) and attention blocks are always
        called through their own forward and are left to ZeRO's normal schedule.
        """
        try:
            import deepspeed  # `deepspeed.zero` is an attribute, not an importable submodule
        except ImportError:  # DeepSpeed is a dependency, but the model works without it
            return
        register_external_parameter = deepspeed.zero.register_external_parameter
        seen: set[int] = set()
        for module in self.clip.modules():
            if not any(True for _ in module.children()) or isinstance(module, nn.MultiheadAttention):
                continue
            for p in module._parameters.values():
                if isinstance(p, nn.Parameter) and id(p) not in seen:
                    seen.add(id(p))
                    register_external_parameter(self.encoder, p)

    @torch.no_grad()
    def reset_logit_scale_max(self) -> None:
        """Clamp at max(config clamp, current value): a pretrained scale above the clamp stays.

        Called once after the starting weights are loaded (create_model / load_state_dict_into);
        a resumed run rebuilds the model from the same config and weights, so it gets the same value.
        """
        scale = self.clip.logit_scale
        if hasattr(scale, "ds_id"):  # ZeRO-3 partitioned (built under zero.Init): gather it to read it
            import deepspeed

            with deepspeed.zero.GatheredParameters([scale]):
                current = float(scale.detach().float().reshape(-1)[0])
        else:
            current = float(scale.detach().float().reshape(-1)[0])
        self.logit_scale_max = max(self.logit_scale_max_cfg, current)

    # ---------------------------------------------------------------------------- encoders
    def logit_scale(self) -> torch.Tensor:
        """exp(clamp(logit_scale, max)) as a 0-dim fp32 tensor (a bf16 clamp at ln(100) would be
        off by 1%); the clamp is applied where it is used (an in-place clamp would be undone by
        ZeRO's fp32 master copy)."""
        return self.clip.logit_scale.float().clamp(max=self.logit_scale_max).exp().reshape(())

    def logit_bias(self) -> torch.Tensor | None:
        """The SigLIP bias as a 0-dim fp32 tensor (None for CLIP models)."""
        bias = getattr(self.clip, "logit_bias", None)
        return None if bias is None else bias.float().reshape(())

    def encode_image(self, images: torch.Tensor, dense: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unnormalised (pooled [B, D], patches [B, T, D] or None), one tower pass."""
        visual = self.clip.visual
        if not dense:
            return self.clip.encode_image(images), None
        if isinstance(visual, VisionTransformer):
            if visual.attn_pool is not None or visual.final_ln_after_pool or visual.pool_type == "none":
                raise DenseUnsupportedError(
                    "dense patch embeddings need a ViT whose patch tokens pass through ln_post before "
                    f"pooling (pool_type tok|avg, no attentional pool); got pool_type={visual.pool_type!r}")
            previous = visual.output_tokens
            visual.output_tokens = True  # open_clip returns (pooled, ln_post(x)[:, 1:]) from one pass
            try:
                pooled, tokens = visual(images)
            finally:
                visual.output_tokens = previous
            return pooled, _project(tokens, visual.proj)
        from open_clip.timm_model import TimmModel

        if isinstance(visual, TimmModel):
            try:
                from powerclip.model.dense_timm import timm_image_dense
            except ImportError as e:
                raise DenseUnsupportedError(
                    "dense patch embeddings for timm towers need powerclip/model/dense_timm.py "
                    f"(timm_image_dense), which could not be imported: {e}") from e
            return timm_image_dense(visual, images)
        raise DenseUnsupportedError(f"no dense patch path for image tower {type(visual).__name__}")

    def encode_text(self, text: torch.Tensor, dense_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unnormalised (pooled [N, D], tokens [dense_rows, L, D] or None), one tower pass.

        The token states are the output of the tower's ``ln_final`` in the same call that pools
        them, read by a forward hook; only the first ``dense_rows`` rows are projected.
        """
        if self.text_pool == "mean":
            states, pooled = _text_states_and_mean(self.clip, text)
            if dense_rows <= 0:
                return pooled, None
            owner = self.clip.text if hasattr(self.clip, "text") else self.clip
            return pooled, _project(states[:dense_rows], owner.text_projection)
        if dense_rows <= 0:
            return self.clip.encode_text(text), None
        ln, owner = self._text_parts()
        if ln is None:
            raise DenseUnsupportedError(
                f"no dense token path for text tower {type(getattr(self.clip, 'text', self.clip)).__name__}")
        captured: list[torch.Tensor] = []
        handle = ln.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            pooled = self.clip.encode_text(text)
        finally:
            handle.remove()
        states = captured[-1]
        if states.ndim != 3 or states.shape[1] != text.shape[1]:
            raise DenseUnsupportedError("text tower applies ln_final after pooling; no token states")
        return pooled, _project(states[:dense_rows], owner.text_projection)

    # ---------------------------------------------------------------------------- forward
    def _encode(self, images: torch.Tensor | None, text: torch.Tensor, dense: bool,
                n_cap: int) -> dict[str, torch.Tensor | None]:
        """Both towers plus the scale and bias, as a flat dict of tensors (see ``_Encoder``)."""
        image, patches = (None, None) if images is None else self.encode_image(images, dense=dense)
        pooled_text, tokens = self.encode_text(text, dense_rows=n_cap if dense else 0)
        return {"image": image, "patches": patches, "text": pooled_text, "tokens": tokens,
                "logit_scale": self.logit_scale(), "logit_bias": self.logit_bias()}

    def forward(self, batch: Batch, dense: bool = False, images: bool = True) -> Features:
        """Encode a batch. Every text-tower field the batch declares (``FieldSpec.encodes``: captions,
        concept rows, hard negatives) goes through ONE text-tower call (concatenated, then split
        back into the Features field it names), so the tower runs once per step.

        ``dense`` adds patch and token embeddings (docs/losses.md §0). ``images=False`` skips the image
        tower (Features.image is then an empty [0, D] tensor), for text-only passes.
        """
        # every text-tower field of the batch (captions first), flattened to rows and concatenated
        parts, shapes = [], []
        for name, spec in text_fields(type(batch)):
            v = getattr(batch, name)
            if v is not None:
                parts.append(v.reshape(-1, v.shape[-1]))
                shapes.append((spec.encodes, v.shape[:-1]))
        if not shapes or shapes[0][0] != "text":
            raise ValueError("the batch's first text-tower field must be the captions (Batch.text)")
        n_cap = parts[0].shape[0]
        all_text = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        out = self.encoder(batch.images if images else None, all_text, dense, n_cap)

        pooled_text = F.normalize(out["text"], dim=-1)
        encoded: dict[str, torch.Tensor] = {}
        start = 0
        for target, shape in shapes:  # split back into each field's own leading shape
            n = math.prod(shape)
            encoded[target] = pooled_text[start:start + n].reshape(*shape, pooled_text.shape[-1])
            start += n
        text = encoded.pop("text")
        image = out["image"]
        if image is None:
            image = text.new_zeros((0, text.shape[-1]))
        return Features(
            image=F.normalize(image, dim=-1),
            text=text,
            logit_scale=out["logit_scale"],
            logit_bias=out["logit_bias"],
            patches=None if out["patches"] is None else F.normalize(out["patches"], dim=-1),
            tokens=None if out["tokens"] is None else F.normalize(out["tokens"], dim=-1),
            **encoded,
        )


class _Encoder(nn.Module):
    """A parameter-less child that runs the towers for ``PowerClipModel.forward``.

    Why it exists: ZeRO-3 re-gathers parameters in backward through hooks on a module's OUTPUT
    tensors, and it cannot see tensors inside a ``Features`` dataclass. The parameters used outside
    their owner's forward (CLIP's positional embedding, projections, logit scale) are therefore
    registered on this module, whose output is a plain dict of tensors. It holds its owner outside
    ``_modules`` so no parameter is registered twice (the state dict stays ``clip.*`` only).
    """

    def __init__(self, owner: PowerClipModel):
        super().__init__()
        object.__setattr__(self, "_owner", owner)

    def forward(self, images: torch.Tensor | None, text: torch.Tensor, dense: bool,
                n_cap: int) -> dict[str, torch.Tensor | None]:
        return self._owner._encode(images, text, dense, n_cap)
