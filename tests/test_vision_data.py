"""guide.vision.data: deterministic scenes, parallel shards, the streaming loader, bad inputs."""
import json

import numpy as np
import pytest
import torch

from guide.vision.data import (COMBOS, NaivePILLoader, SceneLoader, caption, export_pngs, held_out_combos, make_shard,
                               render, sample_scene, write_scene_shards)


def test_scenes_are_deterministic_and_labels_match_pixels():
    a = [sample_scene(np.random.default_rng([3, i]), (1, 3), 0.5) for i in range(20)]
    b = [sample_scene(np.random.default_rng([3, i]), (1, 3), 0.5) for i in range(20)]
    assert a == b
    for s in a:
        img = render(s, 32)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        for shape, color, size, cell, x0, y0, x1, y1 in s["objects"]:
            cx, cy = int((x0 + x1) / 2 * 32), int((y0 + y1) / 2 * 32)
            assert img[cy, cx].max() > 60, f"no {color} {shape} drawn at its box centre"   # objects are bright on dark
        assert caption(s).count(" and ") == len(s["objects"]) - 1


def test_distinct_pairs_differ_in_colour_shape_and_column(tmp_path):
    make_shard(tmp_path / "p", 0, 200, seed=0, split="test_held", n_objects=(2, 2), text_prob=0.0, distinct=True)
    held = held_out_combos(0.14, 0)
    for s in json.loads((tmp_path / "p" / "shard_00000.json").read_text()):
        a, b = s["objects"]
        assert a[0] != b[0] and a[1] != b[1] and a[3] % 3 != b[3] % 3 and not s["text"]
        assert tuple(a[:4]) in held or tuple(b[:4]) in held


def test_shards_do_not_depend_on_worker_count(tmp_path):
    write_scene_shards(tmp_path / "a", 300, shard_size=100, workers=1, seed=1)
    write_scene_shards(tmp_path / "b", 300, shard_size=100, workers=2, seed=1)
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    assert not list((tmp_path / "a").glob(".*"))        # no temporary files left behind


def test_held_out_combinations_never_reach_training(tmp_path):
    held = held_out_combos(0.14, 0)
    make_shard(tmp_path / "tr", 0, 400, seed=0, split="train")
    make_shard(tmp_path / "te", 0, 200, seed=0, split="test_held")
    train = json.loads((tmp_path / "tr" / "shard_00000.json").read_text())
    test = json.loads((tmp_path / "te" / "shard_00000.json").read_text())
    assert not any(tuple(o[:4]) in held for s in train for o in s["objects"])
    assert all(any(tuple(o[:4]) in held for o in s["objects"]) for s in test)
    assert len(held) == round(0.14 * len(COMBOS))


def test_loader_epoch_parity_with_naive_loader(tmp_path):
    write_scene_shards(tmp_path / "s", 250, shard_size=100, workers=1)
    batches = list(SceneLoader(tmp_path / "s", 64, shuffle=False, augment=False, loop=False, drop_last=False))
    assert [len(l) for _, l in batches] == [64, 64, 64, 58]
    pngs = export_pngs(tmp_path / "s", tmp_path / "png")
    naive = next(iter(NaivePILLoader(pngs, 64, augment=False)))
    assert torch.equal(naive, batches[0][0])
    # augmentation changes pixels but keeps the batch finite and in the normalized range of [0, 1] pixels
    x, _ = SceneLoader(tmp_path / "s", 64, seed=0).next_batch()
    assert torch.isfinite(x).all() and not torch.equal(x, batches[0][0])


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no scene shards"): SceneLoader(tmp_path, 4)
    write_scene_shards(tmp_path / "s", 10, shard_size=10, workers=1)
    with pytest.raises(ValueError, match="batch_size"): SceneLoader(tmp_path / "s", 0)
    with pytest.raises(ValueError, match="split"): make_shard(tmp_path, 0, 1, split="dev")
    with pytest.raises(ValueError, match="positive"): write_scene_shards(tmp_path, 0)
    with pytest.raises(ValueError, match="frac"): held_out_combos(2.0)
    with pytest.raises(ValueError, match="mode"): sample_scene(np.random.default_rng(0), mode="eval")
