"""The ``tiny-sat`` preset: a small Qwen2 model and tokenizer built locally, never downloaded.

It exists so that the CPU demo (``configs/sat_tiny.yaml``) can visibly learn SAT in minutes.
Design (see README "The tiny-sat preset"):

* Tokenizer: byte-level BPE (every string round-trips) with Qwen2's pre-tokenizer and merges
  written here, not trained. SAT pieces are single tokens (added tokens, not special, so
  decoding keeps them): a literal such as ``NOT x12``, `` OR ``, the answer tags, and
  *positional answer bits*: the model writes bit k of its answer after k spaces
  (``<SOLUTION>1 0  1   1</SOLUTION>``, well formed since whitespace is free in an answer), so
  the token it emits names the variable it assigns. A 10-clause prompt is ~110 tokens.
* Model: Qwen2 architecture from a fixed seed, under a million parameters.
* Cold start: a short supervised phase on the answer *format* only: the tags around n
  uniformly random bits, then EOS. It never sees a solver's solution or any heuristic, so the
  baseline success stays at chance; GRPO has to learn to read the clauses.

Why positional bits: with plain ``0 1 1`` answers the bit tokens are the same at every position,
and a tiny model must first learn to count to know which variable it is on; in our
measurements GRPO then moved the eval success rate by less than 0.05 in 150 iterations.

Build it with ``python -m grpo_lightning.models tiny-sat`` or let any command resolve the name.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .envs.sat import CLOSE_TAG, OPEN_TAG, SYSTEM_PROMPT, SATEnv

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
MAX_VARS = 20  # literal and answer-position tokens exist up to here; n is at most 15
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySatRecipe:
    """Everything that determines the preset's bytes; its hash names the cache folder."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 512
    init_seed: int = 0
    cold_start_steps: int = 200
    cold_start_batch_size: int = 32
    cold_start_lr: float = 3e-3
    cold_start_seed_start: int = 1_000_000_000
    version: int = 2

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


# The pre-tokenizer of Qwen2 (transformers 5 forces it on every qwen2 checkpoint): using it
# here too means transformers 4 and 5, vLLM and SGLang all tokenize the preset identically.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _atomic_pieces() -> list[str]:
    """SAT strings that become one token each (added tokens, matched before pre-tokenizing)."""
    literals = [f"x{i}" for i in range(1, MAX_VARS + 1)] + [f"NOT x{i}" for i in range(1, MAX_VARS + 1)]
    # Bit k of an answer is written after k spaces (k = 0, 1, ...): whitespace is free in the
    # answer, and a token per position tells the model which variable it is assigning.
    positional_bits = [" " * k + b for k in range(1, MAX_VARS) for b in "01"]
    return [OPEN_TAG, CLOSE_TAG, " OR ", *positional_bits, *literals]


def _template_texts() -> list[str]:
    """The fixed text of prompts and chat turns, whose words get BPE merges."""
    return [
        SYSTEM_PROMPT,
        "Variables: 7\nClauses:\n(x1 OR NOT x2 OR x3)\n",
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|im_start|>assistant\n",
    ]


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    while len(symbols) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(symbols, symbols[1:], strict=False))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def build_tokenizer() -> Tokenizer:
    """A byte-level BPE with hand-written merges (deterministic, no training)."""
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    ranks: dict[tuple[str, str], int] = {}
    skip = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *_atomic_pieces())
    for text in _template_texts():
        for s in skip:
            text = text.replace(s, "\n")
        for word, _ in pre.pre_tokenize_str(text):
            symbols = _apply_merges(list(word), ranks)
            while len(symbols) > 1:
                pair = (symbols[0], symbols[1])
                ranks[pair] = len(ranks)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
                symbols = [pair[0] + pair[1], *symbols[2:]]
    merges = sorted(ranks, key=ranks.__getitem__)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD_TOKEN, BOS_TOKEN, EOS_TOKEN])
    tok.add_tokens([AddedToken(p, normalized=False) for p in _atomic_pieces()])
    return tok


def _hf_tokenizer(tok: Tokenizer):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        model_max_length=TinySatRecipe.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def positional_answer(bits: list[int]) -> str:
    """The tiny model's way of writing an answer: bit k after k spaces (still well formed:
    the reward counts 0/1 characters and allows any whitespace between them)."""
    return OPEN_TAG + "".join(" " * k + str(b) for k, b in enumerate(bits)) + CLOSE_TAG


def _cold_start(model, hf_tok, recipe: TinySatRecipe) -> None:
    """Supervised steps on the answer format: tags around n random positional bits, then EOS."""
    rng = random.Random(recipe.init_seed)
    env = SATEnv()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.cold_start_lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / recipe.cold_start_steps)
    )
    model.train()
    for step in range(recipe.cold_start_steps):
        seqs, masks = [], []
        for b in range(recipe.cold_start_batch_size):
            seed = recipe.cold_start_seed_start + step * recipe.cold_start_batch_size + b
            messages = env.reset(seed)
            assert env.problem is not None
            prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            bits = [rng.randint(0, 1) for _ in range(env.problem.num_vars)]
            p_ids = hf_tok(prompt, add_special_tokens=False)["input_ids"]
            c_ids = hf_tok(positional_answer(bits) + EOS_TOKEN, add_special_tokens=False)["input_ids"]
            seqs.append(p_ids + c_ids)
            masks.append([0] * len(p_ids) + [1] * len(c_ids))
        width = max(map(len, seqs))
        ids = torch.tensor([s + [hf_tok.pad_token_id] * (width - len(s)) for s in seqs])
        loss_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.float32)
        attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none"
        ).view_as(loss_mask[:, 1:])
        loss = (nll * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()


def build_tiny_sat(out_dir: str | Path, recipe: TinySatRecipe | None = None) -> Path:
    """Write the preset (config, safetensors weights, tokenizer files) into ``out_dir``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    recipe = recipe or TinySatRecipe()
    out = Path(out_dir)
    tok = build_tokenizer()
    hf_tok = _hf_tokenizer(tok)
    vocab_size = -(-len(hf_tok) // 16) * 16
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=hf_tok.convert_tokens_to_ids(BOS_TOKEN),
        eos_token_id=hf_tok.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=hf_tok.pad_token_id,
    )
    # One thread and a fixed seed: the same machine builds byte-identical weights every time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.init_seed)
            model = Qwen2ForCausalLM(config)
            _cold_start(model, hf_tok, recipe)
    finally:
        torch.set_num_threads(threads)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    hf_tok.save_pretrained(out)
    (out / "tiny_sat_recipe.json").write_text(json.dumps(asdict(recipe), indent=2, sort_keys=True) + "\n")
    return out
