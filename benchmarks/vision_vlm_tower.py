"""Which patch features should the VLM read from its image encoder? Measured on two encoders, one run.

The chapter-32 VLM reads patch features of the chapter-31 ViT. Contrastive training supervises only `[CLS]`, so
what the patch states keep depends on how the encoder was trained. This trains the tiny-tier VLM recipe six
times: {the chapter's CLIP (trained with two-object pair batches), the same CLIP recipe without the pair batches}
× {first + last hidden state with 2×2 pixel shuffle (guide before VLM_VERSION 2), every hidden state with the
shuffle, every hidden state with all 36 patch tokens (guide now)}, and reports caption exact match / token F1,
box mIoU, OCR character accuracy on seen and held-out combinations, and which caption slots go wrong.
Writes benchmarks/results/vision_vlm_tower.{json,png}. About 14 minutes on 2 idle cores.

    python benchmarks/vision_vlm_tower.py
"""
import argparse, dataclasses, json, sys, time
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def wrong_slots(pred: list[str], gold: list[str]) -> list[str]:
    "Which slots of a caption ('a {size} {colour} {shape} at the {place}' and ...) the prediction got wrong."
    P, G = " ".join(pred).split(" and "), " ".join(gold).split(" and ")
    if len(P) != len(G): return ["object count"]
    out = []
    for p, g in zip(P, G):
        p, g = p.split(), g.split()
        if len(p) != len(g): out.append("place"); continue          # a place has one or two words
        out += [{1: "size", 2: "colour", 3: "shape"}.get(i, "place") for i, (u, v) in enumerate(zip(p, g)) if u != v]
    return out


def plot(res: dict, path: Path):
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    runs = res["runs"]
    labels = [f"{r['encoder']}: {r['tower']}" for r in runs]
    fig, ax = plt.subplots(1, 3, figsize=(15, 3.6), sharey=True)
    for k, (metric, title) in enumerate([("caption_em", "caption exact match"), ("box_miou", "box mIoU"), ("ocr_char_acc", "OCR char accuracy")]):
        ax[k].barh(range(len(runs)), [r["held_out"][metric] for r in runs]); ax[k].set_title(f"{title} (held-out)")
        ax[k].set_xlim(0, 1)
        if metric != "ocr_char_acc": ax[k].axvline(0.8, color="red", lw=0.8)
    ax[0].set_yticks(range(len(runs)), labels, fontsize=8); ax[0].invert_yaxis()
    fig.suptitle(f"tiny-tier VLM, stage 2 = {res['recipe']['stage2']} steps (red: the chapter's bound)"); fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0); ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the JSON in --out, train nothing")
    a = ap.parse_args(argv)
    if a.plot_only:
        plot(json.loads((Path(a.out) / "vision_vlm_tower.json").read_text()), Path(a.out) / "vision_vlm_tower.png"); return 0
    from guide.core import atomic_write, cache_dir, environment_info, seed_everything, setup_torch
    from guide.vision.clip import CLIP, CLIP_RECIPES, clip_config, load_clip, pretrained_clip, save_clip, train_clip
    from guide.vision.data import SceneLoader, caption, scene_dataset
    from guide.vision.vlm import VLM, VLM_RECIPES, ViTTower, evaluate_vlm, generate, train_vlm, vlm_config
    setup_torch(2); tier, seed = "tiny", a.seed

    class FirstLastTower(ViTTower):
        "The earlier tower: the first hidden state and the last (normed) one."
        def __init__(self, vit):
            super().__init__(vit); self.dim = 2 * vit.config.dim
        def forward(self, x):
            v = self.vit
            h = torch.cat([v.cls.expand(len(x), -1, -1), v.patch(x).flatten(2).transpose(1, 2)], 1) + v.pos
            first = h
            for b in v.blocks: h = b(h)
            return torch.cat([first, v.norm(h)], -1)[:, 1:]

    def clip_without_pairs():
        path = cache_dir("models") / f"clip-{tier}-{seed}-no-pairs"
        if (path / "model.safetensors").exists(): return load_clip(path)
        r = CLIP_RECIPES[tier]; seed_everything(seed); model = CLIP(clip_config(tier))
        loader = SceneLoader(scene_dataset("objects", tier, seed)["train"], r["batch_size"], seed=seed)
        train_clip(model, loader, r["steps"], r["lr"], "infonce", scale_lr_mult=r["scale_lr_mult"], seed=seed)
        save_clip(model, path); return model

    recipe, ds = VLM_RECIPES[tier], scene_dataset("scenes", tier, seed)
    encoders = {"with pairs (chapter 31)": lambda: pretrained_clip(tier, seed), "without pairs": clip_without_pairs}
    towers = {"first+last, 3x3 tokens": (FirstLastTower, 2), "every state, 3x3 tokens": (ViTTower, 2),
              "every state, 6x6 tokens (guide)": (ViTTower, 1)}
    runs = []
    for enc_name, make_clip in encoders.items():
        for tower_name, (Tower, shuffle) in towers.items():
            clip = make_clip(); seed_everything(seed)
            model = VLM(Tower(clip.vision), dataclasses.replace(vlm_config(tier), shuffle=shuffle))
            loader = SceneLoader(ds["train"], recipe["batch_size"], seed=seed)
            t = time.perf_counter()
            train_vlm(model, loader, recipe["stage1"], recipe["lr"], freeze_vision=True, desc="stage 1")
            train_vlm(model, loader, recipe["stage2"], recipe["lr"], freeze_vision=False, desc="stage 2")
            seconds = time.perf_counter() - t
            x, scenes = next(iter(SceneLoader(ds["test_held"], 500, augment=False, shuffle=False, loop=False, drop_last=False)))
            slots = Counter(w for pred, s in zip((model.tok.decode(r) for r in generate(model, x, "<CAPTION>", 40)), scenes)
                            for w in wrong_slots(pred, caption(s).split()))
            run = dict(encoder=enc_name, tower=tower_name, train_seconds=seconds, seen=evaluate_vlm(model, ds["test"]),
                       held_out=evaluate_vlm(model, ds["test_held"]), held_out_wrong_slots=dict(slots))
            print(json.dumps(run), flush=True); runs.append(run)
    res = dict(benchmark="vision_vlm_tower", env=environment_info(), recipe=recipe, runs=runs)
    out = Path(a.out); atomic_write(out / "vision_vlm_tower.json", lambda p: p.write_text(json.dumps(res, indent=1)))
    plot(res, out / "vision_vlm_tower.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
