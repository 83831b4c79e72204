"""model.pool=mean: PowerCLIP's token-average pooling of both towers, against a hand-written pass
through the towers, and through an export that plain open_clip refuses and powerclip's loader reads."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from powerclip.eval_io.model_io import load_export_dir
from powerclip.export import export_open_clip
from powerclip.model.clip_model import mean_pool_text
from powerclip.model.factory import create_model, model_cfg_dict, preprocess_cfg, reference_model
from tests.tiny import tiny_config


def _tokens() -> torch.Tensor:
    return open_clip.get_tokenizer("ViT-B-32")(["a red circle", "a small blue square left of a green cross", "a"])


@torch.no_grad()
def _brute_text(clip, text: torch.Tensor) -> torch.Tensor:
    """Each caption alone, cut to its real tokens (SOT..EOT): causal attention makes the padding
    irrelevant, so the mean of the cut sequence's final states is the pooled value."""
    out = []
    for row in text:
        n = int((row != 0).sum())
        x = clip.token_embedding(row[None, :n]) + clip.positional_embedding[:n]
        x = clip.transformer(x, attn_mask=clip.attn_mask[:n, :n])
        out.append(clip.ln_final(x)[0].mean(0) @ clip.text_projection)
    return torch.stack(out)


@torch.no_grad()
def _brute_image(clip, images: torch.Tensor) -> torch.Tensor:
    v = clip.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
    x = v.transformer(v.ln_pre(x))
    return v.ln_post(x[:, 1:]).mean(1) @ v.proj  # the patch tokens' average (open_clip's "avg")


def test_mean_pooling_of_both_towers_matches_a_hand_written_pass():
    torch.manual_seed(0)
    model = create_model(tiny_config(["model.pool=mean"]).model).eval()
    text, images = _tokens(), torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.encode_text(text)[0], _brute_text(model.clip, text), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.encode_image(images)[0], _brute_image(model.clip, images), rtol=1e-4,
                               atol=1e-5)
    # the dense token path is unchanged by the pooling, and the pooled rows are the same either way
    pooled, tokens = model.encode_text(text, dense_rows=2)
    torch.testing.assert_close(pooled, model.encode_text(text)[0])
    default = create_model(tiny_config().model).eval()
    default.load_state_dict(model.state_dict())
    torch.testing.assert_close(tokens, default.encode_text(text, dense_rows=2)[1])
    assert not torch.allclose(default.encode_text(text)[0], pooled)  # EOT pooling differs


def test_export_with_mean_pooling_loads_in_open_clip_and_in_powerclip(tmp_path):
    torch.manual_seed(1)
    cfg = tiny_config(["model.pool=mean"])
    model = create_model(cfg.model).eval()
    model_cfg = model_cfg_dict(cfg.model)
    assert model_cfg["vision_cfg"]["pool_type"] == "avg"
    out = export_open_clip(model, model_cfg, preprocess_cfg(reference_model(model_cfg)), tmp_path / "m",
                           text_pool="mean")
    assert json.loads((out / "open_clip_config.json").read_text())["powerclip"] == {"text_pool": "mean"}
    text, images = _tokens(), torch.randn(2, 3, 32, 32)
    # plain open_clip would pool the text at EOT (its only options): it refuses, naming powerclip's loader
    with pytest.raises(TypeError, match=r"powerclip\.eval_io\.model_io\.load_model"):
        open_clip.create_model_and_transforms(f"local-dir:{out}")
    with torch.no_grad():
        # powerclip's loader (open_clip's own load without the refusal key) applies the recorded text pooling
        loaded = load_export_dir(out).model
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images)[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded.encode_text(text, normalize=True),
                                   F.normalize(model.encode_text(text)[0], dim=-1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mean_pool_text(loaded, text), model.encode_text(text)[0], rtol=1e-4, atol=1e-5)


def test_mean_pooling_config_errors():
    from powerclip.config import ConfigError

    with pytest.raises(ConfigError, match="model.pool"):
        tiny_config(["model.pool=max"])
