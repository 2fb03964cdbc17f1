"""Fine-tune a tiny random-init transformers causal LM for a few steps with striped context parallelism.

    python -m torch.distributed.run --standalone --nproc-per-node 2 examples/finetune_transformers.py --steps 20

Every rank builds the same model (same seed) and draws the same batch; ``shard_inputs`` keeps this rank's
tokens, ``prepare`` makes the model's attention a ring over all ranks. After ``backward`` the gradients are
averaged over the ranks, as data parallelism does, which makes them exactly the single-process gradients.
The task needs attention: each sequence counts up with its own stride (mod the vocabulary), so predicting
the next token means reading the stride off earlier tokens. ``--documents N`` packs N such documents into each
sequence, their position ids restarting at 0 (as transformers' ``DataCollatorWithFlattening`` packs them): each
token attends only to its own document. Without torchrun it runs on one process; ``--plain`` runs the
unmodified model there, for the loss curve to compare with. ``--fsdp`` shards the model over the ranks with
FSDP2 (whose reduce-scatter then averages the gradients) and ``--gradient-checkpointing`` turns on
transformers' own activation checkpointing: the same losses either way. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist

from striped_attention import LAYOUTS
from striped_attention.layouts import BALANCED
from striped_attention.integrations.transformers import prepare, shard_inputs
from striped_attention.launch import init_distributed, under_torchrun

FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}  # transformers class-name prefixes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence, whole sequence (default 256)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step, the same on every rank (default 4)")
    p.add_argument("--documents", type=int, default=1,
                   help="documents packed into each sequence, cut at random tokens, the same in every row (default 1)")
    p.add_argument("--family", choices=sorted(FAMILIES), default="llama", help="model family (default llama)")
    p.add_argument("--layout", choices=[*sorted(LAYOUTS), BALANCED], default="striped",
                   help="sequence layout (default striped); balanced: each batch's documents in balance_documents' "
                        "order, contiguous shares")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default 0)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (gloo) or cuda (NCCL, a GPU per rank)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank on CPU (default 1)")
    p.add_argument("--plain", action="store_true",
                   help="run the unmodified model instead (sdpa attention, transformers' own loss), one process only; "
                        "its loss curve is the one the ring must reproduce")
    p.add_argument("--fsdp", action="store_true",
                   help="shard every decoder layer and the model over the ranks with FSDP2 (torchrun only)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="transformers' activation checkpointing: each layer, the ring included, recomputed in the "
                        "backward")
    args = p.parse_args(argv)
    if args.plain and under_torchrun():
        p.error("--plain runs on one process: start it without torchrun")
    if args.fsdp and not under_torchrun():
        p.error("--fsdp shards the model over torchrun's ranks: start it with torchrun")
    for name in ("steps", "seq_len", "batch_size", "threads", "documents"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.documents > args.seq_len:
        p.error(f"--documents ({args.documents}) cannot exceed --seq-len ({args.seq_len})")
    return args


def tiny_model(family: str, seed: int):
    """A 2-layer, 64-wide decoder of the family with GQA (4 query heads, 2 key/value heads), random weights."""
    import transformers

    prefix = FAMILIES[family]
    config = getattr(transformers, f"{prefix}Config")(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
    )
    if family == "mistral":
        config.sliding_window = None  # Mistral's window would cut attention on long sequences
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config)
    model.set_attn_implementation("sdpa")  # transformers' own attention until prepare() switches it
    return model


def counting_batch(batch: int, seq: int, vocab: int, generator: torch.Generator, documents: int = 1):
    """(token ids (batch, seq), position ids (seq,)): each row packs ``documents`` documents, cut at the same
    random tokens in every row; token t of a document is start + stride * t (mod vocab), stride in 1..7, and its
    position id is t."""
    cuts = []
    if documents > 1:  # (one document draws nothing here: the stream, and the losses, of earlier versions)
        cuts = (torch.randperm(seq - 1, generator=generator)[: documents - 1] + 1).sort().values.tolist()
    lengths = torch.tensor([0, *cuts, seq]).diff()
    pos = torch.cat([torch.arange(n) for n in lengths.tolist()])
    doc = torch.repeat_interleave(torch.arange(documents), lengths)
    start = torch.randint(0, vocab, (batch, documents), generator=generator)
    stride = torch.randint(1, 8, (batch, documents), generator=generator)
    return (start[:, doc] + stride[:, doc] * pos) % vocab, pos


def main(argv=None) -> int:
    args = parse_args(argv)
    if under_torchrun():
        device = init_distributed(args.device, threads=args.threads)
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        torch.set_num_threads(args.threads)
        device, rank, world = torch.device(args.device), 0, 1

    model = tiny_model(args.family, args.seed).to(device)
    if not args.plain:
        model = prepare(model, layout=args.layout)
    if args.gradient_checkpointing:  # activation_checkpointing_enable in newer transformers
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data = torch.Generator().manual_seed(args.seed)  # the same stream on every rank
    losses = []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        ids, pos = counting_batch(args.batch_size, args.seq_len, model.config.vocab_size, data, args.documents)
        ids, pos = ids.to(device), pos.to(device).unsqueeze(0)
        if args.plain:  # transformers shifts the labels itself; -100 at a document's start: no target across
            labels = ids.masked_fill(pos == 0, -100) if args.documents > 1 else ids
            out = model(input_ids=ids, labels=labels, position_ids=pos, use_cache=False)
        else:  # shard_inputs finds the documents where the position ids restart
            out = model(**shard_inputs(input_ids=ids, labels=ids, position_ids=pos, layout=args.layout))
        out.loss.backward()
        loss = out.loss.detach()
        if world > 1:  # data-parallel mean over the context-parallel group: exact gradients and loss
            for p in model.parameters() if not args.fsdp else ():  # FSDP's reduce-scatter averaged them
                dist.all_reduce(p.grad)
                p.grad /= world
            dist.all_reduce(loss)
            loss /= world
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if rank == 0:
            print(f"\rstep {step}/{args.steps}  loss {losses[-1]:.4f}  {time.perf_counter() - t0:.2f} s/step",
                  end="", file=sys.stderr, flush=True)
    if rank == 0:
        print(file=sys.stderr)
        how = "plain sdpa" if args.plain else f"layout {args.layout}"
        packed = f" in {args.documents} documents" if args.documents > 1 else ""
        print(f"{args.family}, {how}, {world} rank(s), {args.seq_len} tokens{packed} x {args.batch_size}: "
              f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
