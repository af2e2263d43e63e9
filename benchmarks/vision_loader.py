"""Multimodal data pipeline: images/s of the sharded streaming loader vs a naive per-image PIL loader, and scene
generation with 1 vs 2 worker processes. Writes benchmarks/results/vision_loader.{json,png}
(vision_loader_smoke.{json,png} with --smoke).

    python benchmarks/vision_loader.py            # ~30 s on 2 cores
    python benchmarks/vision_loader.py --smoke    # a few seconds (tests/test_benchmarks.py runs it)
"""
import argparse, json, os, tempfile, time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

from guide.core import atomic_write, environment_info, setup_torch
from guide.vision.data import NaivePILLoader, SceneLoader, export_pngs, write_scene_shards

OUT = Path(__file__).resolve().parent / "results"


def rate(it, n_batches, batch_size):
    next(it)                                                     # warm up: first shard map / file open
    t0 = time.perf_counter()
    for _ in range(n_batches): next(it)
    return n_batches * batch_size / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--out", default=str(OUT), help="folder for the JSON and the plot")
    args = p.parse_args(argv)
    if args.image_size < 16: p.error("--image-size must be >= 16 (the room a scene's text may need)")
    out, name = Path(args.out), "vision_loader_smoke" if args.smoke else "vision_loader"
    setup_torch()
    n = 1000 if args.smoke else 8000
    res = {"env": environment_info(), "image_size": args.image_size, "n_images": n, "generation": {}, "loaders": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for workers in (1, 2):
            t0 = time.perf_counter()
            write_scene_shards(tmp / f"w{workers}", n, shard_size=n // 4, workers=workers, image_size=args.image_size)
            res["generation"][f"{workers} workers scenes/s"] = n / (time.perf_counter() - t0)
        pngs = export_pngs(tmp / "w1", tmp / "png")
        for bs in (32, 128):
            nb = max(2, (n // bs - 1) // (4 if args.smoke else 1))
            naive = rate(iter(NaivePILLoader(pngs, bs)), nb, bs)
            fast = rate(iter(SceneLoader(tmp / "w1", bs)), nb, bs)
            res["loaders"].append({"batch_size": bs, "naive_pil_images_s": naive, "sharded_images_s": fast, "speedup": fast / naive})
            print(f"batch {bs:4d}: naive PIL {naive:9,.0f} images/s  sharded {fast:9,.0f} images/s  ({fast / naive:.1f}×)")
    print({k: round(v) for k, v in res["generation"].items()})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{name}.json", lambda path: path.write_text(json.dumps(res, indent=1)))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bss = [r["batch_size"] for r in res["loaders"]]
    x = range(len(bss))
    ax.bar([i - 0.2 for i in x], [r["naive_pil_images_s"] for r in res["loaders"]], 0.4, label="naive PIL, one PNG per image")
    ax.bar([i + 0.2 for i in x], [r["sharded_images_s"] for r in res["loaders"]], 0.4, label="uint8 shards, batched augmentation")
    ax.set_xticks(list(x), [f"batch {b}" for b in bss]); ax.set_ylabel("images / s"); ax.set_yscale("log"); ax.legend(fontsize=8)
    ax.set_title(f"{args.image_size}×{args.image_size} scenes, 1 thread")
    fig.tight_layout(); fig.savefig(out / f"{name}.png", dpi=120)
    print(f"wrote {out / name}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
