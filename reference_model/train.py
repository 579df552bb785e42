"""Train and export the shipped reference MoE: `python -m reference_model.train --out DIR`.

Why it exists: quantization damage can only be measured on a model that has learned something, and
no model can be downloaded here. This trains a small Mixtral-architecture MoE on the Shakespeare
train split (BPE tokenizer trained on the same split), selects the best step on the valid split
(never the test split), and exports a Hugging Face checkpoint (bf16 safetensors + tokenizer) through
the reverse of `conversion/`. Deterministic given `--seed` on a given machine/JAX version.

Shape rules (from the issue): every weight-matrix side a multiple of 128, hidden ≥ 256, ≥ 8 experts
with top-2 routing, ≥ 2 layers, shipped weights ≤ 24 MB.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bitsmoe_jax.io.data import REFERENCE_DIR, read_text, tokenize_text, training_batches
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.models.layers import rope_cos_sin
from bitsmoe_jax.models.transformer import MoETransformer, build_model
from reference_model.tokenizer import save_hf_tokenizer, train_bpe_tokenizer

#: Texts a reference model can be trained on (each has shipped _train and _valid splits).
CORPORA = ("shakespeare", "milton")


def reference_config(vocab_size: int = 2048) -> ModelConfig:
    """The shipped model: 3 layers, hidden 256, 16 experts of width 256, top-2 (≈11.1M params, 22 MB
    bf16)."""
    return ModelConfig(
        model_type="mixtral",
        vocab_size=vocab_size,
        hidden_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=256,
        moe_intermediate_size=256,
        num_experts=16,
        num_experts_per_tok=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=1024,
        norm_topk_prob=True,
        bos_token_id=0,
        eos_token_id=0,
    )


def forward_with_router_logits(
    model: MoETransformer, ids: jax.Array
) -> tuple[jax.Array, list[jax.Array]]:
    """Logits plus every MoE layer's router logits (for the load-balancing loss)."""
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos_sin = rope_cos_sin(model.config, positions, model.dtype)
    x = model.embed_tokens(ids)
    router_logits = []
    for layer in model.layers:
        h, _ = layer.self_attn(layer.input_layernorm(x), positions, cos_sin, None)
        x = x + h
        hn = layer.post_attention_layernorm(x)
        if layer.is_moe:
            router_logits.append(layer.mlp.router(hn.reshape(-1, hn.shape[-1]))[0])
        x = x + layer.mlp(hn)
    return model.logits(model.norm(x)), router_logits


def load_balancing_loss(router_logits: jax.Array, num_experts: int, top_k: int) -> jax.Array:
    """Switch-style auxiliary loss E·Σ_e f_e·P_e: keeps every expert in use (no dead experts to
    quantize)."""
    probs = jax.nn.softmax(router_logits, axis=-1)
    _, idx = jax.lax.top_k(probs, top_k)
    f = jnp.mean(jax.nn.one_hot(idx, num_experts).sum(axis=1), axis=0) / top_k
    return num_experts * jnp.sum(f * jnp.mean(probs, axis=0))


def loss_fn(
    model: MoETransformer, batch: jax.Array, aux_coef: float
) -> tuple[jax.Array, jax.Array]:
    logits, rl = forward_with_router_logits(model, batch[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    c = model.config
    aux = sum(load_balancing_loss(r, c.num_experts, c.num_experts_per_tok) for r in rl) / max(
        len(rl), 1
    )
    return ce + aux_coef * aux, ce


@partial(nnx.jit, static_argnums=(3,))
def train_step(model: MoETransformer, opt: nnx.Optimizer, batch: jax.Array, aux_coef: float):
    (loss, ce), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch, aux_coef)
    opt.update(model, grads)
    return loss, ce


@nnx.jit
def eval_nll(model: MoETransformer, batch: jax.Array) -> jax.Array:
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).sum()


def valid_loss(model: MoETransformer, tokens: np.ndarray, seq_len: int, batch: int = 16) -> float:
    """Mean NLL over non-overlapping windows of the valid split (model selection only)."""
    n = (len(tokens) - 1) // seq_len
    rows = np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])
    total = 0.0
    for i in range(0, n - n % batch, batch):
        total += float(eval_nll(model, jnp.asarray(rows[i : i + batch])))
    return total / ((n - n % batch) * seq_len)


def train(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    corpus = args.corpus
    tok = train_bpe_tokenizer(read_text(f"{corpus}_train"), args.vocab_size)
    train_ids = tokenize_text(tok, read_text(f"{corpus}_train"))
    valid_ids = tokenize_text(tok, read_text(f"{corpus}_valid"))
    if args.valid_tokens:
        valid_ids = valid_ids[: args.valid_tokens]
    config = reference_config(args.vocab_size)
    model = build_model(config, seed=args.seed)
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.steps, args.lr * 0.1)
    opt = nnx.Optimizer(
        model,
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b2=0.98, weight_decay=0.1)),
        wrt=nnx.Param,
    )
    batches = training_batches(train_ids, args.seq_len, args.batch_size, args.seed)
    best = (math.inf, -1, None)
    history = []
    t_train = time.time()
    for step in range(1, args.steps + 1):
        loss, ce = train_step(model, opt, jnp.asarray(next(batches)), args.aux_coef)
        if step % args.log_every == 0:
            print(
                f"step {step:5d}  loss {float(loss):.4f}  ce {float(ce):.4f}  "
                f"{time.time() - t_train:7.1f}s",
                flush=True,
            )
        if step % args.eval_every == 0 or step == args.steps:
            vl = valid_loss(model, valid_ids, args.seq_len)
            history.append({"step": step, "valid_nll": vl, "valid_ppl": math.exp(vl)})
            print(f"step {step:5d}  valid ppl {math.exp(vl):.2f}", flush=True)
            if vl < best[0]:
                best = (vl, step, jax.tree.map(np.asarray, nnx.state(model, nnx.Param)))
    train_time = time.time() - t_train
    nnx.update(model, best[2])
    from conversion.export_hf import export_hf

    out = Path(args.out)
    tmp_tok = out.parent / f".{out.name}.tokenizer"
    save_hf_tokenizer(tok, tmp_tok, model_max_length=config.max_position_embeddings)
    files = [
        tmp_tok / f for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    ]
    record = {
        "command": "python -m reference_model.train " + " ".join(args.argv),
        "corpus": corpus,
        "seed": args.seed,
        "steps": args.steps,
        "best_step": best[1],
        "best_valid_ppl": math.exp(best[0]),
        "train_time_s": round(train_time, 1),
        "total_time_s": round(time.time() - t0, 1),
        "train_tokens": int(len(train_ids)),
        "jax_version": jax.__version__,
        "history": history,
    }
    (tmp_tok / "training.json").write_text(json.dumps(record, indent=1))
    export_hf(
        model,
        config,
        out,
        dtype="bfloat16",
        extra_files=files + [tmp_tok / "training.json"],
        overwrite=args.overwrite,
    )
    for f in tmp_tok.iterdir():
        f.unlink()
    tmp_tok.rmdir()
    return record


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m reference_model.train", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--out",
        default=None,
        help="output directory (default: the shipped model's, Shakespeare only)",
    )
    p.add_argument(
        "--corpus",
        choices=CORPORA,
        default="shakespeare",
        help="the text trained on: its _train split, with the _valid split choosing the step "
        "(milton: Paradise Lost cut 90/5/5 by lines, for a second model on different text)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--aux-coef", type=float, default=0.01)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument(
        "--valid-tokens",
        type=int,
        default=0,
        help="model selection on the first N tokens of the valid split (0: all of it)",
    )
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.out is None:
        if args.corpus != "shakespeare":
            p.error(
                f"--corpus {args.corpus} needs --out (the default is the shipped Shakespeare model)"
            )
        args.out = str(REFERENCE_DIR)
    args.argv = argv
    rec = train(args)
    print(json.dumps({k: v for k, v in rec.items() if k != "history"}, indent=1))


if __name__ == "__main__":
    main()
