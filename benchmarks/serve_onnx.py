"""ONNX Runtime fp32 and int8 (dynamic quantization) vs PyTorch eager for the encoder of notebook 24, one run.

Latency per call at batch 1 and batch 32 (mean over the test snippets, after a warm-up), accuracy on the
1,000 held-out snippets, the providers each ORT session actually ran on (`session.get_providers()`).
Targets from the issue: int8 latency ratio >= 2x vs eager, accuracy drop <= 1%.
At batch 1 ONNX Runtime wins on overhead (one C++ call instead of ~60 PyTorch ops). At batch 32 on a CPU eager
wins: PyTorch runs attention as one fused kernel, while the exported graph computes it op by op (MatMul, Add of the
mask, Softmax, MatMul over batch x heads x T x T; ORT's session profile puts Softmax first), and the BERT
attention fusion of `onnxruntime.transformers.optimizer` does not match this graph.

    python benchmarks/serve_onnx.py [--device cuda] [--smoke]
"""
from __future__ import annotations

import argparse, json, sys, time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", default="tiny"); ap.add_argument("--device", default="cpu"); ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true"); ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    from guide.core import atomic_write, environment_info, setup_torch
    from guide.serve.batcher import encode_texts, pad_batch, snippets, tiny_encoder
    from guide.serve.optimize import OrtEncoder, export_encoder, ort_session, quantize_int8
    setup_torch()
    enc, tok, _ = tiny_encoder(a.tier, a.seed, device="cpu")
    p32 = export_encoder(enc); p8 = quantize_int8(p32)
    s32, s8 = ort_session(p32, a.device), ort_session(p8, a.device)
    e32, e8 = OrtEncoder(s32), OrtEncoder(s8)
    model = enc.to(a.device)
    test = snippets("test", 200 if a.smoke else 1000, seed=a.seed + 1)
    ids, y = encode_texts(tok, [t for t, _ in test]), np.array([l for _, l in test])

    @torch.no_grad()
    def eager(x, m):
        out = model(x.to(a.device), m.to(a.device))[0]
        return out.float().cpu().numpy()
    runs = {"eager": eager, "ort_fp32": lambda x, m: e32(x, m)[0], "ort_int8": lambda x, m: e8(x, m)[0]}
    res = dict(benchmark="serve_onnx", env=environment_info(), tier=a.tier, device=a.device,
               providers=dict(ort_fp32=s32.get_providers(), ort_int8=s8.get_providers()), results={})
    for batch in (1, 32):
        for name, run in runs.items():
            for i in range(0, 64, batch): run(*pad_batch(ids[i:i + batch]))          # warm up
            preds, times = [], []
            for i in range(0, len(ids), batch):
                x, m = pad_batch(ids[i:i + batch])
                t0 = time.perf_counter(); out = run(x, m); times.append(time.perf_counter() - t0)
                preds.append(out.argmax(-1))
            res["results"][f"{name}@{batch}"] = dict(accuracy=float((np.concatenate(preds) == y).mean()),
                                                    ms_per_call=float(np.mean(times) * 1000), ms_p95=float(np.percentile(times, 95) * 1000))
    r = res["results"]
    for b in (1, 32):
        res[f"speedup_fp32@{b}"] = r[f"eager@{b}"]["ms_per_call"] / r[f"ort_fp32@{b}"]["ms_per_call"]
        res[f"speedup_int8@{b}"] = r[f"eager@{b}"]["ms_per_call"] / r[f"ort_int8@{b}"]["ms_per_call"]
    res["int8_accuracy_drop"] = r["eager@1"]["accuracy"] - r["ort_int8@1"]["accuracy"]
    res["targets"] = dict(int8_speedup=2.0, int8_accuracy_drop=0.01)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    name = "serve_onnx_smoke" if a.smoke else "serve_onnx"
    atomic_write(out / f"{name}.json", lambda p: p.write_text(json.dumps(res, indent=1)))
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
    for i, b in enumerate((1, 32)):
        ax[i].bar(list(runs), [r[f"{k}@{b}"]["ms_per_call"] for k in runs]); ax[i].set_title(f"batch {b}"); ax[i].set_ylabel("ms / call")
    fig.suptitle(f"encoder on {a.device} ({', '.join(s32.get_providers())}); int8 accuracy drop {res['int8_accuracy_drop']:+.3f}")
    fig.tight_layout(); fig.savefig(out / f"{name}.png", dpi=100)
    print(json.dumps({k: v for k, v in res.items() if k != "env"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
