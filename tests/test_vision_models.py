"""guide.vision.clip and guide.vision.vlm: losses, a few training steps, save/load, transformers vision towers."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from guide.core import seed_everything
from guide.vision.clip import (CLIP, ClipConfig, ViT, caption_positives, encode_captions, infonce_loss, load_clip, save_clip,
                               siglip_loss, train_clip)
from guide.vision.data import SceneLoader, sample_scene, write_scene_shards
from guide.vision.vlm import (TASKS, VLM, HFVisionTower, VLMConfig, ViTTower, dequantize, generate, generate_naive,
                              load_vision_tower, load_vlm, make_batch, parse_boxes, pixel_shuffle, quantize, save_vlm, train_vlm)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("scenes")
    write_scene_shards(path / "objects", 256, shard_size=128, workers=1, n_objects=(1, 1), text_prob=0.0)
    write_scene_shards(path / "scenes", 256, shard_size=128, workers=1)
    return path


def test_losses_match_definitions_and_handle_duplicates():
    seed_everything(0)
    img, txt = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    y = torch.arange(5)
    ref = (F.cross_entropy(7 * img @ txt.T, y) + F.cross_entropy(7 * txt @ img.T, y)) / 2
    assert torch.allclose(infonce_loss(img, txt, 7.0), ref, atol=1e-6)
    labels = 2 * torch.eye(5) - 1
    assert torch.allclose(siglip_loss(img, txt, 7.0, -3.0), -F.logsigmoid(labels * (7 * img @ txt.T - 3)).sum() / 5, atol=1e-6)
    # two identical captions: the duplicate is a positive, not a negative
    pos = caption_positives(["a", "a", "b", "c", "d"])
    dup = torch.cat([img[:1], img[:1], img[2:]]); dtx = torch.cat([txt[:1], txt[:1], txt[2:]])
    img2 = F.normalize(torch.randn(5, 8), dim=-1)
    logits = 7 * img2 @ dtx.T; t = pos / pos.sum(1, keepdim=True)
    ref = (-(t * logits.log_softmax(1)).sum(1).mean() - (t * logits.T.log_softmax(1)).sum(1).mean()) / 2
    assert torch.allclose(infonce_loss(img2, dtx, 7.0, pos), ref, atol=1e-6)
    with pytest.raises(ValueError, match="differ in shape"): infonce_loss(img, txt[:, :3], 1.0)
    with pytest.raises(ValueError, match="not in the vocabulary"): encode_captions(["a tiny dog"])


def test_clip_trains_and_round_trips(shards, tmp_path):
    seed_everything(0)
    m = CLIP(ClipConfig(dim=32, n_layers=1, embed_dim=32))
    hist = train_clip(m, SceneLoader(shards / "objects", 32, seed=0), steps=30, lr=3e-3)
    assert np.mean(hist[-5:]) < np.mean(hist[:5])
    hist = train_clip(CLIP(ClipConfig(dim=32, n_layers=1, embed_dim=32)), SceneLoader(shards / "objects", 32), 5, 3e-3, loss="siglip")
    assert all(np.isfinite(hist))
    with pytest.raises(ValueError, match="loss must be"): train_clip(m, None, 1, 1e-3, loss="triplet")
    save_clip(m, tmp_path / "clip")
    m2 = load_clip(tmp_path / "clip"); x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): assert torch.equal(m.eval().encode_image(x), m2.encode_image(x))
    with pytest.raises(FileNotFoundError): load_clip(tmp_path / "missing")
    with pytest.raises(ValueError, match="multiple of patch"): ClipConfig(image_size=30)


def test_location_tokens_and_pixel_shuffle():
    v = np.linspace(0, 1, 101)
    assert np.abs(dequantize(quantize(v, 32), 32) - v).max() <= 0.5 / 32 + 1e-12
    assert quantize(1.0, 32) == 31 and quantize(-0.1, 32) == 0
    x = torch.arange(16.0).view(1, 16, 1)
    assert pixel_shuffle(x, 4, 2)[0, 0].tolist() == [0, 1, 4, 5]            # a 2×2 block of the 4×4 grid
    with pytest.raises(ValueError, match="not divisible"): pixel_shuffle(torch.randn(1, 9, 2), 3, 2)
    with pytest.raises(ValueError, match="n_bins"): quantize(0.5, 0)


def _tiny_vlm(tower=None):
    return VLM(tower or ViTTower(ViT(ClipConfig(dim=32, n_layers=1))), VLMConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1))


def test_vlm_trains_generates_and_round_trips(shards, tmp_path):
    seed_everything(0)
    m = _tiny_vlm()
    loader = SceneLoader(shards / "scenes", 16, seed=0)
    h1 = train_vlm(m, loader, 10, 3e-3, freeze_vision=True)
    assert all(p.requires_grad for p in m.tower.parameters())               # unfrozen again after the stage
    h2 = train_vlm(m, loader, 20, 3e-3, freeze_vision=False)
    assert np.mean(h2[-5:]) < h1[0]
    x = torch.randn(3, 3, 32, 32)
    for task in TASKS:
        fast, slow = generate(m, x, task, 12), generate_naive(m, x, task, 12)
        assert torch.equal(fast, slow[:, :fast.shape[1]])
    save_vlm(m, tmp_path / "vlm")
    m2 = load_vlm(tmp_path / "vlm")
    assert torch.equal(generate(m, x, "<OD>", 12), generate(m2, x, "<OD>", 12))
    with pytest.raises(ValueError, match="unknown task"): generate(m, x, "<VQA>")
    with pytest.raises(FileNotFoundError, match="no VLM checkpoint"): load_vlm(tmp_path / "none")
    scene = sample_scene(np.random.default_rng(0), (2, 2), 1.0)
    ids, tgt = make_batch(m.tok, [scene] * len(TASKS), list(TASKS))
    assert ((tgt != -100).sum(1) == torch.tensor([len(m.tok.target(scene, t)) + 1 for t in TASKS])).all()
    assert len(parse_boxes(m.tok.target(scene, "<OD>"), 32)) == 2
    (x0, y0, x1, y1), = [b for _, b in parse_boxes(["cross", "<loc_20>", "<loc_3>", "<loc_4>", "<loc_30>"], 32)]
    assert x0 < x1 and y0 < y1                                              # swapped corners come back ordered


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_transformers_vision_tower_from_local_folder(kind, tmp_path):
    """The loading path for real pretrained encoders (AutoModel), on tiny configs saved locally (no download)."""
    from transformers import CLIPModel, CLIPConfig, CLIPVisionConfig, SiglipVisionConfig, SiglipVisionModel
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    if kind == "siglip": SiglipVisionModel(SiglipVisionConfig(**kw)).save_pretrained(tmp_path / "enc")
    else:   # a full two-tower CLIPModel: the tower keeps its vision half
        CLIPModel(CLIPConfig(vision_config=kw, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                                num_attention_heads=2, vocab_size=100))).save_pretrained(tmp_path / "enc")
    tower = load_vision_tower(tmp_path / "enc")
    assert isinstance(tower, HFVisionTower) and tower.grid == 4 and tower.dim == 32
    assert tower(torch.randn(2, 3, 32, 32)).shape == (2, 16, 32)
    m = _tiny_vlm(tower)
    scene = sample_scene(np.random.default_rng(0))
    ids, tgt = make_batch(m.tok, [scene, scene], ["<CAPTION>", "<COUNT>"])
    _, loss = m(torch.randn(2, 3, 32, 32), ids, tgt); loss.backward()
    assert torch.isfinite(loss)
    assert generate(m, torch.randn(2, 3, 32, 32), "<OCR>", 4).shape[0] == 2
