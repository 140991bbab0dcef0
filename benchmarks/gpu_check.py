"""GPU check: everything that needs a CUDA device, in one run that fits a short GPU lease.

    uv run python benchmarks/gpu_check.py                      # on a CUDA machine (~6 minutes)
    uv run python benchmarks/gpu_check.py --dry-run            # anywhere: tiny shapes on the CPU
    uv run python benchmarks/gpu_check.py --stages fit_tiny,fit_big --out /tmp/gpu

Stages (each runs even when an earlier one failed; ``--stages`` picks some):

1. ``tests``: every GPU-marked test (``pytest -m gpu``), passed/failed.
2. ``throughput``: the trainer's step on a randomly initialised Qwen2 model with Qwen2.5-1.5B's
   shape (hidden 1536, 28 layers, 12 heads, 2 KV heads, MLP 8960, vocabulary 151,936, tied
   embeddings) in bf16 autocast with fp32 master weights: forward + backward of the GRPO loss
   (dapo) with the chunked log-probabilities, then AdamW; tokens/s and MFU, with and without
   gradient checkpointing, and the top kernels of one profiled step.
3. ``server``: the built-in server on CUDA with the same 1.5B-shaped model (bf16): tokens/s of
   64 concurrent requests against one at a time, and a verified ``update_weights_from_disk``
   against a restart (``benchmarks/bench_server.py``).
4. ``fit_tiny`` / ``fit_big``: ``fit`` end to end with the built-in server and the trainer on the
   one GPU: tiny-sat for 20 iterations, the 1.5B-shaped model for 3. Per-iteration
   generate/train/sync/eval seconds from the run's metrics files, whether every sync was
   verified, and the peak GPU memory of each process (sampled with ``nvidia-smi``) and of the
   trainer's allocator (``device/max_memory_allocated_gib``).

The 1.5B-shaped model is a folder built here: random weights (seed 0) and the tiny-sat
tokenizer. Its completions are random tokens, which the SAT parser rejects (minimum reward,
advantages 0): the point is the cost of every stage at this size, not learning.

MFU = model FLOPs per second / the GPU's dense bf16 peak. Model FLOPs per token:
6 * N (weights, forward + backward) + 12 * layers * hidden * sequence length (attention scores
and values), the accounting of PaLM (Chowdhery et al. 2022, appendix B). Target: >= 40%.

Results go to stdout and to ``--out`` (``gpu_check.json`` and ``gpu_check.md``, written after
each stage, so a run cut short still leaves what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grpo_lightning.logprobs import sequence_token_logprobs  # noqa: E402
from grpo_lightning.loss import LossConfig, Normalizer, grpo_loss  # noqa: E402
from grpo_lightning.models import resolve_model_path  # noqa: E402
from grpo_lightning.runfiles import read_evals, read_train  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), in FLOP/s, by device-name substring.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}

QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=True)
STAGES = ("tests", "throughput", "server", "fit_tiny", "fit_big")


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def run_tests(dry_run: bool) -> dict:
    """The GPU-marked tests (skipped, not failed, without CUDA)."""
    # Serially, without the project's addopts: one GPU, and the device machine's Python may not
    # have pytest-xdist (the suite's -n would be an unknown option there).
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=--strict-markers", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           "-rA", str(ROOT / "tests")]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout[-6000:], proc.stderr[-3000:], flush=True)
    outcome = {"PASSED": [], "FAILED": [], "ERROR": [], "SKIPPED": []}  # pytest -rA summary words
    for line in proc.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word in outcome:
            outcome[word].append(rest.split(" - ")[0])
    return {"returncode": proc.returncode, "passed": outcome["PASSED"], "failed": outcome["FAILED"],
            "errors": outcome["ERROR"], "skipped": outcome["SKIPPED"]}


def throughput(shape: dict, device: torch.device, seq_len: int, batch: int, steps: int, ckpt: bool,
               tf32: bool = True, profile: bool = False) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = tf32  # what the trainer's ``trainer.tf32`` sets
    torch.manual_seed(0)
    config = Qwen2Config(**shape, attn_implementation="sdpa")
    with torch.device(device):  # initialised where it runs: a CPU init of 1.5B takes longer than the steps
        model = Qwen2ForCausalLM(config)  # fp32 master weights
    if ckpt:
        model.gradient_checkpointing_enable()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    cfg = LossConfig(loss_type="dapo", max_completion_length=seq_len)
    prompt = seq_len // 4  # SAT prompts are short next to long reasoning completions
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
    attn = torch.ones_like(ids)
    mask = torch.zeros(batch, seq_len - 1, device=device)
    mask[:, prompt - 1 :] = 1
    behaviour = torch.zeros_like(mask)
    adv = torch.randn(batch, device=device)
    norm = Normalizer.from_mask(mask)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            logp, _ = sequence_token_logprobs(model, ids, attn, loss_positions=mask.bool(), chunk_size=4096)
        out = grpo_loss(logp, behaviour, adv, mask, cfg, norm)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    tokens = batch * seq_len
    flops_per_token = 6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * seq_len
    achieved = flops_per_token * tokens / seconds
    peak = peak_flops(device)
    row = {
        "params_M": n_params / 1e6,
        "tokens/step": tokens,
        "step_s": seconds,
        "tokens/s": tokens / seconds,
        "TFLOP/s": achieved / 1e12,
        "MFU": achieved / peak if peak else None,
        "peak_mem_GiB": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    if profile:
        row["top_kernels"] = profile_step(step, device)
    return row


def head_error(device: torch.device, tokens: int, hidden: int, vocab: int) -> dict:
    """Largest |log-prob error| of the chunked head against fp64, with TF32 and true fp32
    products, on Qwen2.5-1.5B-sized inputs (logits of std ~4 and extremes ~20, as a trained
    model's)."""
    from grpo_lightning.logprobs import token_logprobs

    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, generator=g)
    w = torch.randn(vocab, hidden, device=device, generator=g) * 0.1
    y = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    ref, _ = token_logprobs(h.double(), w.double(), y)
    out = {}
    for tf32 in (True, False):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        got, _ = token_logprobs(h, w, y)
        out["tf32" if tf32 else "fp32"] = (got.double() - ref).abs().max().item()
    torch.backends.cuda.matmul.allow_tf32 = True
    return out


def profile_step(step: Callable[[], None], device: torch.device, top: int = 12) -> list[dict]:
    """Where one step's device time goes: the kernels (or CPU ops) with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == ("CUDA" if device.type == "cuda" else "CPU")]
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"kernel": e.key[:90], "ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total, "calls": e.count}
            for e in events[:top]]


def build_random_model(out: Path, shape: dict, device: torch.device) -> Path:
    """A Hugging Face folder: a random Qwen2 model of ``shape`` (bf16) and the tiny-sat tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tiny = Path(resolve_model_path("tiny-sat"))
    tok_config = json.loads((tiny / "config.json").read_text())
    torch.manual_seed(0)
    config = Qwen2Config(**shape, bos_token_id=tok_config.get("bos_token_id"), eos_token_id=tok_config.get("eos_token_id"),
                         pad_token_id=tok_config.get("pad_token_id"))
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(out)
    for f in tiny.iterdir():
        if f.name.startswith("tokenizer") or f.name in {"chat_template.jinja", "generation_config.json"}:
            shutil.copy(f, out / f.name)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


class GPUMemorySampler:
    """Peak GPU memory per process (``nvidia-smi --query-compute-apps``) and of the whole GPU,
    sampled every ``interval`` seconds; each process is named by its command line."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.per_process: dict[str, float] = {}
        self.total_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    @staticmethod
    def _role(pid: str) -> str:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return f"pid {pid}"
        return "server" if "inference.server" in cmd or " serve " in cmd else "trainer"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True, timeout=10).stdout
                gpu = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                for line in apps.strip().splitlines():
                    pid, mib = (x.strip() for x in line.split(","))
                    role = self._role(pid)
                    self.per_process[role] = max(self.per_process.get(role, 0.0), float(mib))
                if gpu.strip():
                    self.total_mib = max(self.total_mib, float(gpu.strip().splitlines()[0]))
            except (subprocess.SubprocessError, ValueError, OSError):
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> GPUMemorySampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(timeout=15)


def fit_run(name: str, work: Path, out: Path, overrides: list[str], timeout: float) -> dict:
    """``fit`` in a subprocess (as a user runs it), then the per-iteration table of its metrics
    files. The run directory stays in ``work`` (a 1.5B run's ``last.ckpt`` is ~18 GB); its log
    goes to ``out``."""
    cmd = [sys.executable, "-m", "grpo_lightning", "fit", "--config", str(ROOT / "configs" / "sat_tiny.yaml"),
           "--trainer.logger.init_args.save_dir", str(work), "--trainer.logger.init_args.name", name, *overrides]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with GPUMemorySampler() as mem, open(out / f"{name}.log", "w") as log:
        try:
            returncode = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:  # keep what the iterations that finished measured
            returncode = "timeout"
    wall = time.perf_counter() - t0
    run = work / name / "version_0"
    train = read_train(run)
    evals = read_evals(run)  # by step: the baseline at 0, the eval after iteration i at i + 1
    if returncode != 0:
        print((out / f"{name}.log").read_text()[-4000:], flush=True)
    # Whole iterations, checkpoint writing included: between consecutive metrics files.
    stamps = {m["iteration"]: (run / "metrics" / f"train_iter_{m['iteration']:03d}.json").stat().st_mtime for m in train}
    rows = [{
        "iteration": m["iteration"],
        "iteration_s": stamps[m["iteration"]] - stamps[m["iteration"] - 1] if m["iteration"] - 1 in stamps else None,
        "generate_s": m.get("time/generate_s"),
        "train_s": m.get("time/train_s"),
        "sync_s": m.get("time/sync_s"),
        "eval_s": evals.get(m["iteration"] + 1, {}).get("time/eval_s"),
        "verified": m.get("sync/verified"),
        "reward_mean": m.get("reward/reward_mean"),
        "mismatch_abs_mean": m.get("train/mismatch/abs_mean"),
    } for m in train]
    return {
        "returncode": returncode,
        "wall_s": wall,
        "iterations": rows,
        "all_synced_verified": bool(rows) and all(r["verified"] is True for r in rows),
        "eval_success_by_step": {i: evals[i].get("success_rate") for i in sorted(evals)},
        "baseline_eval_s": evals.get(0, {}).get("time/eval_s"),
        "trainer_max_allocated_GiB": max((m.get("device/max_memory_allocated_gib") or 0 for m in train), default=None),
        "gpu_peak_MiB_by_process": mem.per_process,
        "gpu_peak_MiB_total": mem.total_mib,
    }


def markdown(results: dict) -> str:
    lines = [f"# GPU check: {results.get('device')}, torch {results.get('torch')}", ""]
    if "tests" in results:
        t = results["tests"]
        if "error" in t:
            lines.append(f"tests: error {t['error']}")
        else:
            lines.append(f"GPU-marked tests: {len(t['passed'])} passed, {len(t['failed']) + len(t['errors'])} failed, "
                         f"{len(t['skipped'])} skipped (exit {t['returncode']})")
            lines += [f"- FAILED {x}" for x in t["failed"] + t["errors"]]
        lines.append("")
    if "throughput" in results and "rows" in results["throughput"]:
        rows = results["throughput"]["rows"]
        keys = [k for k in rows[0][1] if k != "top_kernels"]
        lines += ["| training step | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, r in rows:
            cells = ["—" if r[k] is None else (f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k])) for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", f"head log-prob max |error| vs fp64: {results['throughput'].get('head_max_abs_error_vs_fp64')}"]
        kernels = rows[0][1].get("top_kernels") or []
        if kernels:
            lines += ["", f"| top kernels of one step ({rows[0][0]}) | ms | share | calls |", "|---|---:|---:|---:|"]
            lines += [f"| `{k['kernel']}` | {k['ms']:.2f} | {k['share']:.1%} | {k['calls']} |" for k in kernels]
        lines.append("")
    if "server" in results:
        lines += ["built-in server (bench_server.py):", "```", results["server"].get("table", results["server"].get("error", "")), "```", ""]
    for key in ("fit_tiny", "fit_big"):
        if key not in results:
            continue
        r = results[key]
        if "error" in r:
            lines += [f"{key}: error {r['error']}", ""]
            continue
        lines.append(f"{key}: exit {r['returncode']}, {r['wall_s']:.0f} s for the whole command, every sync verified: "
                     f"{r['all_synced_verified']}; eval success by step (0 = baseline) {r['eval_success_by_step']}, baseline eval {r['baseline_eval_s']} s")
        lines.append(f"peak GPU memory (nvidia-smi, MiB): {r['gpu_peak_MiB_by_process']} (whole GPU {r['gpu_peak_MiB_total']:.0f}); "
                     f"trainer allocator peak {r['trainer_max_allocated_GiB']} GiB")
        lines += ["", "| iteration | generate s | train s | sync s | eval s | whole iteration s | verified | reward mean | mismatch |",
                  "|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
        fmt = lambda v: "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
        lines += ["| " + " | ".join(fmt(x[k]) for k in ("iteration", "generate_s", "train_s", "sync_s", "eval_s", "iteration_s", "verified",
                                                         "reward_mean", "mismatch_abs_mean")) + " |" for x in r["iterations"]]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script, no targets")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="folder for the results")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16, help="sequences per micro-batch")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    if unknown := set(stages) - set(STAGES):
        ap.error(f"--stages: unknown {sorted(unknown)}; choose from {','.join(STAGES)}")

    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    results: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}
    print(f"device: {results['device']}; torch {torch.__version__}; stages {stages}", flush=True)
    if not cuda and not args.dry_run:
        print("no CUDA device: run with --dry-run to exercise the script on the CPU")
        return 1
    shape = TINY if args.dry_run else QWEN25_15B
    big_shape = {**TINY, "vocab_size": 151936} if args.dry_run else QWEN25_15B
    gpu = [] if args.dry_run else ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--data.server.device", "cuda"]
    big: list[Path] = []

    def big_model() -> Path:
        if not big:
            t0 = time.perf_counter()
            big.append(build_random_model(work / "qwen2.5-1.5b-shaped", big_shape, device))
            print(f"built {big[0]} in {time.perf_counter() - t0:.1f}s", flush=True)
        return big[0]

    def stage_tests() -> dict:
        return run_tests(args.dry_run)

    def stage_throughput() -> dict:
        seq, batch, steps = (128, 4, 2) if args.dry_run else (args.seq_len, args.batch, args.steps)
        rows = []
        for name, ckpt, tf32, prof in [("TF32 head", False, True, True), ("fp32 head", False, False, False),
                                       ("TF32 head, gradient checkpointing", True, True, False)]:
            rows.append((name, throughput(shape, device, seq, batch, steps, ckpt=ckpt, tf32=tf32, profile=prof)))
            if cuda:
                torch.cuda.empty_cache()  # the model is garbage now; give its memory back
        errors = head_error(device, 256 if args.dry_run else 2048, shape["hidden_size"], shape["vocab_size"])
        return {"rows": rows, "head_max_abs_error_vs_fp64": errors}

    def stage_server() -> dict:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_server.py"), "--model", str(big_model()),
               "--device", "cuda" if cuda else "cpu", "--completions", "64", "--serial-completions", "16",
               "--tokens", "32" if cuda else "8", "--repeats", "1", "--sync-repeats", "2"]
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
        print(proc.stdout[-3000:], proc.stderr[-3000:] if proc.returncode else "", flush=True)
        table = proc.stdout[proc.stdout.find("built-in server"):] if proc.returncode == 0 else proc.stderr[-1500:]
        return {"returncode": proc.returncode, "table": table.strip()}

    def stage_fit_tiny() -> dict:
        iters = 2 if args.dry_run else 20
        return fit_run("fit_tiny", work, out, [*gpu, "--trainer.max_epochs", str(iters), "--data.eval.interval", "10",
                                        "--data.eval.num_problems", "16" if args.dry_run else "200",
                                        "--data.server.dtype", "float32"], timeout=180)

    def stage_fit_big() -> dict:
        # Random weights answer malformed SAT (all-equal groups): dynamic sampling would
        # resample forever, so it is off; one eval set of 32 problems x 4 before and after.
        return fit_run("fit_big", work, out, [*gpu, "--model.model_name_or_path", str(big_model()),
                                        "--trainer.max_epochs", "1" if args.dry_run else "3",
                                        "--data.dynamic_sampling", "false", "--data.server.dtype", "bfloat16",
                                        "--data.eval.num_problems", "8" if args.dry_run else "32",
                                        "--data.eval.interval", "3", "--checkpoint.save_interval", "3",
                                        "--data.server.startup_timeout", "600"], timeout=240)

    run = {"tests": stage_tests, "throughput": stage_throughput, "server": stage_server,
           "fit_tiny": stage_fit_tiny, "fit_big": stage_fit_big}
    stages.sort(key=STAGES.index)
    failed = False
    for name in stages:
        t0 = time.perf_counter()
        print(f"\n=== {name}", flush=True)
        try:
            results[name] = run[name]()
        except Exception as exc:  # one stage's failure must not cost the others' numbers
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["stage_s"] = time.perf_counter() - t0
        r = results[name]
        failed |= "error" in r or r.get("returncode", 0) != 0
        print(f"=== {name}: {r['stage_s']:.0f}s", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "gpu_check.md").write_text(markdown(results))
    shutil.rmtree(work, ignore_errors=True)
    print("\n" + markdown(results), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
