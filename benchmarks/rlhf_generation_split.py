"""RLHF step time split into generation (rollouts) vs training, for the GRPO loop of chapter 54.

Rollouts are generated two ways on the same policy and batch: guide's KV-cache engine
(`guide.model.generate`, used by `guide.rlhf.grpo.train_grpo`) and transformers' `generate` on the
converted `LlamaForCausalLM` (what TRL's GRPOTrainer uses without vLLM). The training part is one GRPO
update (policy + reference forward, backward, AdamW step) on those rollouts. Writes
benchmarks/results/rlhf_generation_split.json and .png.

    python benchmarks/rlhf_generation_split.py            # tiny tier, CPU
    python benchmarks/rlhf_generation_split.py --smoke    # a few repeats (what the test runs)
"""
import argparse, copy, json, os, sys, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

from guide.core import environment_info, pick_device, seed_everything, setup_torch
from guide.model import to_hf
from guide.rlhf.grpo import group_advantages, grpo_loss
from guide.rlhf.sft import sft_policy
from guide.rlhf.task import ANSWER_LEN, completion_mask, encode_prompts, make_problems, sample, score_ids, token_logprobs


def timed(fn, repeats, sync):
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter(); out = fn(); sync(); best.append(time.perf_counter() - t0)
    return sorted(best)[len(best) // 2], out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tier", default="tiny"); p.add_argument("--device", default=None)
    p.add_argument("--prompts", type=int, default=16); p.add_argument("--group", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5); p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args(argv)
    if a.smoke: a.repeats, a.prompts = 2, 4
    setup_torch(); seed_everything(0)
    dev = pick_device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    policy, tok = sft_policy(a.tier, 0, dev)
    ref = copy.deepcopy(policy).eval()
    hf = to_hf(policy).eval()
    end = tok.convert_tokens_to_ids("<|end|>")
    problems = make_problems(a.prompts, "train", 3)
    prompts = encode_prompts(tok, problems, dev).repeat_interleave(a.group, 0)
    gen = torch.Generator(device=dev).manual_seed(0)

    guide_s, comps = timed(lambda: sample(policy, tok, prompts, 1.0, gen), a.repeats, sync)
    def hf_generate():
        with torch.no_grad():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, max_new_tokens=ANSWER_LEN, min_new_tokens=ANSWER_LEN, pad_token_id=tok.pad_token_id)
        return out[:, prompts.shape[1]:]
    hf_s, _ = timed(hf_generate, a.repeats, sync)

    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    rewards = score_ids(tok, [q for q in problems for _ in range(a.group)], comps)
    def train_step():
        policy.train()
        mask = completion_mask(comps, end)
        with torch.no_grad(): ref_lp = token_logprobs(ref, prompts, comps)
        loss, _ = grpo_loss(token_logprobs(policy, prompts, comps), ref_lp, group_advantages(rewards, a.group), mask)
        opt.zero_grad(); loss.backward(); opt.step()
        return loss
    train_s, _ = timed(train_step, a.repeats, sync)

    res = dict(env=environment_info(), device=str(dev), completions=int(prompts.shape[0]), tokens_per_completion=ANSWER_LEN,
               guide_generate_s=guide_s, hf_generate_s=hf_s, train_step_s=train_s,
               generation_share_guide=guide_s / (guide_s + train_s), generation_share_hf=hf_s / (hf_s + train_s),
               hf_over_guide=hf_s / guide_s)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    name = "rlhf_generation_split" + ("_smoke" if a.smoke else "")
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for i, (label, g) in enumerate([("guide KV-cache engine", guide_s), ("transformers generate", hf_s)]):
        ax.barh(i, g, color="tab:orange", label="generation" if i == 0 else None)
        ax.barh(i, train_s, left=g, color="tab:blue", label="training" if i == 0 else None)
        ax.text(g + train_s, i, f" {g / (g + train_s):.0%} generating", va="center")
    ax.set_yticks([0, 1], ["guide KV-cache engine", "transformers generate"]); ax.set_xlabel("seconds per GRPO step")
    ax.set_xlim(0, 1.45 * max(guide_s, hf_s) + 1.45 * train_s)
    ax.set_title(f"GRPO step, {prompts.shape[0]} completions ({dev.type})"); ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2)
    fig.tight_layout(); fig.savefig(out / f"{name}.png", dpi=120)
    print(json.dumps({k: v for k, v in res.items() if k != "env"}, indent=1))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
