"""Training-step throughput with and without token-budget packing, on SAT-like rollout lengths.

    uv run python benchmarks/bench_train_step.py                 # CPU (and CUDA if present)
    uv run python benchmarks/bench_train_step.py --steps 2 --quick

A step is what the trainer does per optimizer step: for every micro-batch, right-pad it,
compute the completion tokens' log-probabilities with
:func:`grpo_lightning.logprobs.sequence_token_logprobs`, the loss with
:func:`grpo_lightning.loss.grpo_loss` (dapo, normalised by the step totals), backward; then
one AdamW step. The model is randomly initialised and Qwen2-shaped (by default the
``tiny-sat`` preset's dimensions: hidden 128, 2 layers, the tiny-sat vocabulary).

Rollout lengths (documented, deterministic):

* prompts: the chat prompts of SAT problems (``grpo_lightning.envs.sat``, seeds
  ``p * 100 // P`` so they span the difficulty range) tokenized by the tiny-sat tokenizer
  (whose literals are single tokens): 104-160 tokens;
* completions: 90% uniform in 10..40 tokens (an answer of n bits with tags and EOS, plus a
  little text), 10% a long tail uniform in 41..``--max-new-tokens`` (256: rambling or
  truncated completions);
* order: the G completions of a prompt are consecutive, as a rollout produces them.

Rows: the unpacked path (fixed micro-batch size, original order) and token-budget packing
(:func:`grpo_lightning.packing.plan_micro_batches`). Throughput counts real (non-padding)
prompt + completion tokens per second. Before timing, one step of each plan is compared
against the first plan's gradient: packing must not change it (up to float rounding).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass

import torch

from grpo_lightning.logprobs import sequence_token_logprobs
from grpo_lightning.loss import LossConfig, Normalizer, grpo_loss
from grpo_lightning.packing import padding_fraction, plan_micro_batches


@dataclass(frozen=True)
class Rollout:
    prompt_len: int
    completion_len: int

    @property
    def length(self) -> int:
        return self.prompt_len + self.completion_len


def sat_rollouts(num_prompts: int, group_size: int, max_new_tokens: int, seed: int = 0) -> list[Rollout]:
    """Prompt lengths from real SAT prompts; completion lengths as in the module docstring."""
    from grpo_lightning.envs.sat import SATEnv
    from grpo_lightning.tiny_sat import _hf_tokenizer, build_tokenizer

    tok = _hf_tokenizer(build_tokenizer())
    env = SATEnv()
    rng = random.Random(seed)
    out = []
    for p in range(num_prompts):
        # Seeds spread over seed % 100, i.e. over the whole difficulty range (n, m grow with it).
        problem_seed = p * 100 // num_prompts
        text = tok.apply_chat_template(env.reset(problem_seed), add_generation_prompt=True, tokenize=False)
        prompt_len = len(tok(text, add_special_tokens=False)["input_ids"])
        for _ in range(group_size):
            tail = rng.random() < 0.10
            completion = rng.randint(41, max_new_tokens) if tail else rng.randint(10, 40)
            out.append(Rollout(prompt_len, completion))
    return out


def make_model(args: argparse.Namespace, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=1024, tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg).to(device)


def random_token_ids(rollouts: list[Rollout], vocab: int) -> list[torch.Tensor]:
    """Fixed random ids per sequence (the model is random too: only shapes matter)."""
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, vocab, (r.length,), generator=g) for r in rollouts]


def micro_batch_tensors(rollouts: list[Rollout], token_ids: list[torch.Tensor], idx: list[int], device: torch.device):
    """Right-padded ids, attention mask and loss positions (completion targets) of one micro-batch."""
    width = max(rollouts[i].length for i in idx)
    lengths = torch.tensor([rollouts[i].length for i in idx])
    prompts = torch.tensor([rollouts[i].prompt_len for i in idx])
    ar = torch.arange(width)
    attn = (ar[None] < lengths[:, None]).long()
    ids = torch.zeros(len(idx), width, dtype=torch.long)
    for row, i in enumerate(idx):
        ids[row, : rollouts[i].length] = token_ids[i]
    target_pos = ar[None, 1:]
    loss_positions = (target_pos >= prompts[:, None]) & (target_pos < lengths[:, None])
    return ids.to(device), attn.to(device), loss_positions.to(device)


def run_step(model, rollouts, token_ids, plan, advantages, cfg: LossConfig, device: torch.device) -> None:
    total_tokens = sum(r.completion_len for r in rollouts)
    norm = Normalizer(num_sequences=len(rollouts), num_tokens_local=total_tokens, num_tokens_global=total_tokens)
    for mb in plan:
        ids, attn, lp = micro_batch_tensors(rollouts, token_ids, mb, device)
        logp, _ = sequence_token_logprobs(model, ids, attn, temperature=0.7, loss_positions=lp)
        # Full-width [B, T-1] tensors with the loss positions as mask: grpo_loss only needs
        # the mask to say which tokens are trained on.
        out = grpo_loss(logp, logp.detach(), advantages[mb], lp, cfg, norm)
        out.loss.backward()


def bench_device(device: torch.device, args: argparse.Namespace, rollouts: list[Rollout]) -> None:
    lengths = [r.length for r in rollouts]
    model = make_model(args, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    cfg = LossConfig(loss_type="dapo")
    token_ids = random_token_ids(rollouts, args.vocab)
    adv = torch.randn(len(rollouts), generator=torch.Generator().manual_seed(1)).to(device)
    plans = {f"unpacked, micro-batch {m}": plan_micro_batches(lengths, micro_batch_size=m) for m in args.micro_batch_sizes}
    plans.update({f"packed, budget {b} tokens": plan_micro_batches(lengths, max_tokens_per_micro_batch=b) for b in args.budgets})

    # Same gradient whatever the plan (the loss is normalised by step totals).
    ref_grad = None
    max_rel = {}
    for name, plan in plans.items():
        model.zero_grad(set_to_none=True)
        run_step(model, rollouts, token_ids, plan, adv, cfg, device)
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        if ref_grad is None:
            ref_grad = grad
        max_rel[name] = float((grad - ref_grad).abs().max() / ref_grad.abs().max())

    real = sum(lengths)
    # Round-robin over the plans, so that load from other processes on a shared machine
    # falls on all of them alike.
    times: dict[str, list[float]] = {name: [] for name in plans}
    for step in range(args.warmup + args.steps):
        for name, plan in plans.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            run_step(model, rollouts, token_ids, plan, adv, cfg, device)
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    rows = []
    for name, plan in plans.items():
        t = statistics.median(times[name])
        widest = max(len(mb) * max(lengths[i] for i in mb) for mb in plan)
        rows.append((name, len(plan), widest, padding_fraction(lengths, plan), t, real / t, max_rel[name]))

    base = rows[0][5]
    n_params = sum(p.numel() for p in model.parameters())
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\ndevice: {dev}; model: Qwen2-shaped, {n_params / 1e6:.2f}M params (hidden {args.hidden}, "
          f"{args.layers} layers, vocab {args.vocab}), fp32; {len(rollouts)} sequences, {real} real tokens "
          f"({sum(r.completion_len for r in rollouts)} completion); median of {args.steps} steps")
    print("| plan | micro-batches | max slots/mb | padded fraction | step s | tokens/s | speedup | grad max rel diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, n_mb, widest, pf, t, tps, rel in rows:
        print(f"| {name} | {n_mb} | {widest} | {pf:.1%} | {t:.2f} | {tps:,.0f} | {tps / base:.2f}x | {rel:.1e} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", action="append", help="cpu / cuda (repeatable; default cpu and cuda if present)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[4, 8], help="unpacked rows")
    p.add_argument("--budgets", type=int, nargs="+", default=[2048, 4096], help="packed rows (tokens)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=464, help="the tiny-sat model's vocabulary size")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="4 prompts x 8 completions, 1 step, no warmup")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); 1 is steadier on a shared machine")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.num_prompts, args.group_size, args.steps, args.warmup = 4, 8, 1, 0
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    rollouts = sat_rollouts(args.num_prompts, args.group_size, args.max_new_tokens)
    lengths = [r.length for r in rollouts]
    completions = sorted(r.completion_len for r in rollouts)
    print(f"lengths: prompts {min(r.prompt_len for r in rollouts)}-{max(r.prompt_len for r in rollouts)}, "
          f"completions median {completions[len(completions) // 2]} (max {completions[-1]}), "
          f"total {min(lengths)}-{max(lengths)}")
    for d in devices:
        bench_device(torch.device(d), args, rollouts)


if __name__ == "__main__":
    main()
