"""guide.vision.clip and guide.vision.vlm: losses, a few training steps, save/load, transformers vision towers."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from guide.core import seed_everything
from guide.vision.clip import (CLIP, ClipConfig, ViT, caption_positives, clip_caption, encode_captions, infonce_loss, load_clip,
                               pair_binding_accuracy, pair_negatives, relation_caption, save_clip, siglip_loss, swapped_captions,
                               train_clip)
from guide.vision.data import SceneLoader, sample_scene, write_scene_shards
from guide.vision.vlm import (TASKS, VLM, HFVisionTower, VLMConfig, ViTTower, dequantize, generate, generate_naive,
                              load_vision_tower, load_vlm, make_batch, parse_boxes, pixel_shuffle, quantize, save_vlm, train_vlm)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("scenes")
    write_scene_shards(path / "objects", 256, shard_size=128, workers=1, n_objects=(1, 1), text_prob=0.0)
    write_scene_shards(path / "scenes", 256, shard_size=128, workers=1)
    write_scene_shards(path / "pairs", 128, shard_size=128, workers=1, n_objects=(2, 2), text_prob=0.0, distinct=True)
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
    dtx = torch.cat([txt[:1], txt[:1], txt[2:]])
    img2 = F.normalize(torch.randn(5, 8), dim=-1)
    logits = 7 * img2 @ dtx.T; t = pos / pos.sum(1, keepdim=True)
    ref = (-(t * logits.log_softmax(1)).sum(1).mean() - (t * logits.T.log_softmax(1)).sum(1).mean()) / 2
    assert torch.allclose(infonce_loss(img2, dtx, 7.0, pos), ref, atol=1e-6)
    assert torch.allclose(siglip_loss(img2, dtx, 7.0, -3.0, pos), -F.logsigmoid((2 * pos - 1) * (logits - 3)).sum() / 5, atol=1e-6)
    with pytest.raises(ValueError, match="differ in shape"): infonce_loss(img, txt[:, :3], 1.0)
    with pytest.raises(ValueError, match="not in the vocabulary"): encode_captions(["a tiny dog"])


def test_hard_negative_texts_extend_both_losses():
    seed_everything(0)
    img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    neg = F.normalize(torch.randn(3, 8), dim=-1); allt = torch.cat([txt, neg])
    y = torch.arange(4)
    ref = (F.cross_entropy(5 * img @ allt.T, y) + F.cross_entropy(5 * txt @ img.T, y)) / 2   # negatives: image→text only
    assert torch.allclose(infonce_loss(img, allt, 5.0), ref, atol=1e-6)
    labels = torch.cat([2 * torch.eye(4) - 1, -torch.ones(4, 3)], 1)                            # SigLIP: −1 on every extra
    assert torch.allclose(siglip_loss(img, allt, 5.0, -2.0), -F.logsigmoid(labels * (5 * img @ allt.T - 2)).sum() / 4, atol=1e-6)
    with pytest.raises(ValueError, match="differ in shape"): infonce_loss(img, txt[:3], 1.0)     # fewer texts than images
    assert caption_positives(["x", "y"], ["x", "y", "x"]).tolist() == [[1, 0, 1], [0, 1, 0]]


def test_relation_captions_and_their_swaps():
    objs = [["triangle", "green", "small", 5], ["cross", "cyan", "large", 6]]                     # columns 2 and 0
    assert relation_caption(objs) == "a cyan cross left of a green triangle"
    assert relation_caption(objs, left_first=False) == "a green triangle right of a cyan cross"
    assert pair_negatives(objs) == {"true": "a cyan cross left of a green triangle", "color_swap": "a green cross left of a cyan triangle",
                                    "left_right": "a cyan cross right of a green triangle"}
    col, rel = swapped_captions("a green triangle right of a cyan cross")
    bag = lambda c: sorted(c.split())
    assert bag(col) == bag("a green triangle right of a cyan cross")        # same words, other meaning
    assert bag(rel) == bag("a cyan cross left of a green triangle")         # the words of the other true phrasing
    assert swapped_captions("a small red circle at the center") == []
    assert {clip_caption({"objects": objs}, np.random.default_rng(i)) for i in range(20)} == {relation_caption(objs), relation_caption(objs, False)}
    encode_captions([relation_caption(objs)])                                                     # every word is in the vocabulary
    with pytest.raises(ValueError, match="different grid columns"): relation_caption([objs[0], objs[0]])


def test_clip_trains_and_round_trips(shards, tmp_path):
    seed_everything(0)
    m = CLIP(ClipConfig(dim=32, n_layers=1, embed_dim=32))
    hist = train_clip(m, SceneLoader(shards / "objects", 32, seed=0), steps=30, lr=3e-3)
    assert np.mean(hist[-5:]) < np.mean(hist[:5])
    m2 = CLIP(ClipConfig(dim=32, n_layers=1, embed_dim=32))
    hist = train_clip(m2, SceneLoader(shards / "objects", 32), 5, 3e-3, loss="siglip", pair_loader=SceneLoader(shards / "pairs", 8))
    assert all(np.isfinite(hist))
    acc = pair_binding_accuracy(m2, shards / "pairs")
    assert set(acc) == {"color_swap", "left_right"} and all(0 <= v <= 1 for v in acc.values())
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
    from transformers import CLIPModel, CLIPConfig, SiglipVisionConfig, SiglipVisionModel
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
