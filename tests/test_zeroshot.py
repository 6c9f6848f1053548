"""Zero-shot CLIP heads: prompt ensembling through open_clip (optional extra `clip`)."""

import pytest
import torch

from robustft.zeroshot import CLIP_TEXT_TOWERS, text_tower_name, zeroshot_head

open_clip = pytest.importorskip("open_clip")


class FakeTextTower(torch.nn.Module):
    """encode_text as a bag of token embeddings (padding left out, so that prompts differ by
    their words): enough to check the ensembling arithmetic, and to train (FLYP), without
    downloading a text tower."""

    def __init__(self, dim=16):
        super().__init__()
        self.embed = torch.nn.Embedding(49408, dim)
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6052))  # exp = 100, as CLIP's

    def encode_text(self, tokens, normalize=False):
        features = (self.embed(tokens) * (tokens != 0).unsqueeze(-1)).sum(dim=1)
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features


def test_head_is_the_scaled_normalised_mean_of_the_80_prompt_embeddings():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    torch.manual_seed(0)
    model, tokenizer = FakeTextTower(), open_clip.get_tokenizer("ViT-B-16")
    names = ["golden_retriever", "airplane", "cat"]
    weight, bias = zeroshot_head(model=model, tokenizer=tokenizer, class_names=names)
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert weight.shape == (3, 16) and torch.equal(bias, torch.zeros(3))
    torch.testing.assert_close(weight.norm(dim=1), torch.full((3,), 100.0), rtol=1e-4, atol=1e-3)
    with torch.no_grad():
        prompts = [t("golden retriever") for t in OPENAI_IMAGENET_TEMPLATES]
        embeddings = model.encode_text(tokenizer(prompts), normalize=True)
        expected = torch.nn.functional.normalize(embeddings.mean(dim=0), dim=0) * 100.0
    torch.testing.assert_close(weight[0], expected, rtol=1e-4, atol=1e-4)


def test_text_towers_are_named_for_clip_backbones_only():
    assert text_tower_name("vit_base_patch16_clip_224.openai") == ("ViT-B-16", "openai")
    assert "toyresnet" not in CLIP_TEXT_TOWERS
    with pytest.raises(ValueError, match="no known CLIP text tower"):
        text_tower_name("toyresnet")
