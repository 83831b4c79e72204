"""Per-patch embeddings of timm MAP-head towers (SigLIP): pooled bit-equality, shapes, head semantics."""

from __future__ import annotations

import copy

import pytest
import torch
from open_clip.model import _build_vision_tower

from powerclip.config import ModelConfig
from powerclip.model.dense_timm import timm_image_dense
from powerclip.model.factory import create_model
from tests.tiny import register_tiny_siglip

TINY = register_tiny_siglip()


def _tower(proj: str = "none", pool: str = "map", embed_dim: int = 64):
    torch.manual_seed(0)
    visual = _build_vision_tower(embed_dim, {"image_size": 32, "timm_model_name": TINY,
                                             "timm_pool": pool, "timm_proj": proj})
    return visual.eval()


def _reference_patches(visual, images: torch.Tensor) -> torch.Tensor:
    """Patch t = the MAP head run on the one-token sequence [x_t]: its attention is then one-hot."""
    trunk = visual.trunk
    x = trunk.forward_features(images)[:, trunk.num_prefix_tokens:]
    rows = []
    for t in range(x.shape[1]):
        y = trunk.attn_pool(x[:, t:t + 1])
        rows.append(visual.head(trunk.head(trunk.head_drop(trunk.fc_norm(y)))))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("proj,embed_dim", [("none", 64), ("linear", 48)])
def test_pooled_is_bit_exact_and_patches_follow_the_head(proj, embed_dim):
    visual = _tower(proj, embed_dim=embed_dim)
    # give the zero-initialised parts random values so no term can hide
    with torch.no_grad():
        for p in visual.parameters():
            p.add_(0.02 * torch.randn_like(p))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        pooled, patches = timm_image_dense(visual, images)
        expected = visual(images)
    assert torch.equal(pooled, expected)
    assert pooled.shape == (3, embed_dim) and patches.shape == (3, 16, embed_dim)
    assert torch.allclose(patches, _reference_patches(visual, images), atol=1e-5)
    # genuinely per patch, not one vector repeated
    assert (patches[:, 0] - patches[:, 1]).abs().max() > 1e-3


def test_gradients_flow_through_patches_and_pooled():
    visual = _tower().train()
    images = torch.randn(2, 3, 32, 32)
    pooled, patches = timm_image_dense(visual, images)
    (pooled.sum() + patches.pow(2).sum()).backward()
    assert visual.trunk.attn_pool.kv.weight.grad is not None
    assert visual.trunk.attn_pool.mlp.fc1.weight.grad.abs().sum() > 0


def test_non_map_tower_is_refused_with_a_clear_error():
    visual = _tower(pool="avg", proj="linear")
    with pytest.raises(ValueError, match="MAP head"):
        timm_image_dense(visual, torch.randn(1, 3, 32, 32))


def test_power_clip_model_dispatches_timm_towers():
    """Through PowerClipModel: dense=True keeps the pooled embedding exact."""
    cfg = {"embed_dim": 64, "init_logit_bias": -10,
           "vision_cfg": {"image_size": 32, "timm_model_name": TINY, "timm_pool": "map", "timm_proj": "none"},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    torch.manual_seed(0)
    model = create_model(ModelConfig(config=copy.deepcopy(cfg), init_logit_bias=-10.0)).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain, _ = model.encode_image(images, dense=False)
        pooled, patches = model.encode_image(images, dense=True)
    assert torch.equal(plain, pooled) and patches.shape == (2, 16, 64)


@pytest.mark.slow
def test_real_vit_b16_siglip_tower_architecture():
    """open_clip's "ViT-B-16-SigLIP" vision tower (random init, no weights): bit-exact pooled output."""
    import open_clip

    vision_cfg = dict(open_clip.get_model_config("ViT-B-16-SigLIP")["vision_cfg"])
    torch.manual_seed(0)
    visual = _build_vision_tower(768, vision_cfg).eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        pooled, patches = timm_image_dense(visual, images)
        assert torch.equal(pooled, visual(images))
    assert patches.shape == (1, 196, 768)
