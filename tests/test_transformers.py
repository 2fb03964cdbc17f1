"""The transformers integration on 2 gloo ranks against the single-process ``sdpa`` model.

Tiny random-init Llama, Qwen2 and Mistral models (nothing downloaded). One launch runs every case on both
ranks: logits gathered with ``unshard``, the mean over ranks of the loss and of every parameter gradient,
compared with one process; then every input the ring cannot serve exactly must raise the same ValueError
on both ranks, and the ring must still work afterwards.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from ranks import cached, error_of, relative_error, run_ranks  # noqa: E402
from striped_attention import LAYOUTS, balance_documents, unshard  # noqa: E402
from striped_attention.integrations.transformers import prepare, shard_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("llama", "qwen2", "mistral")
TOL = 1e-4
SEQ = 24  # a multiple of 4, so zigzag splits it over 2 ranks


def tiny_model(family: str, **config):
    """A 2-layer GQA decoder of the family with seeded random weights, on single-process ``sdpa``."""
    prefix = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[family]
    settings = dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    config = getattr(transformers, f"{prefix}Config")(**settings, **config)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config)
    model.set_attn_implementation("sdpa")
    return model


def inputs(seed: int = 1):
    """input_ids and labels (2, SEQ); labels have ignored (-100) tokens spread unevenly over the ranks."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (2, SEQ), generator=g)
    labels = ids.clone()
    labels[0, 5] = labels[0, 9] = -100
    labels[1, 14:] = -100
    return ids, labels


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    t = t.detach().clone()
    if not dist.is_initialized():  # a world of one
        return t
    dist.all_reduce(t)
    return t / dist.get_world_size()


DOCUMENTS = (0, 5, 16, 24)  # packed documents of 5, 11 and 8 tokens
OTHER_DOCUMENTS = (0, 9, 24)  # the second row's, where rows differ


def restarting(offsets) -> torch.Tensor:
    """Position ids restarting at 0 in each document: transformers' convention for packed sequences."""
    return torch.cat([torch.arange(b - a) for a, b in zip(offsets, offsets[1:])])


def one_process(ref, ids, labels, rows=None):
    """(logits, loss) of the single-process model; with ``rows`` (each row's document offsets) each document
    runs on its own, so no token sees another document and no target crosses into the next one."""
    if rows is None:
        want = ref(input_ids=ids, labels=labels)
        return want.logits, want.loss
    logits, targets = [], []
    for b, offsets in enumerate(rows):
        spans = list(zip(offsets, offsets[1:]))
        logits.append(torch.cat([ref(input_ids=ids[b:b + 1, s:e]).logits for s, e in spans], dim=1))
        targets.append(torch.cat([F.pad(labels[b:b + 1, s + 1:e], (0, 1), value=-100) for s, e in spans], dim=1))
    logits, targets = torch.cat(logits), torch.cat(targets)
    return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


PACKINGS = {  # name: (each row's documents, what tells shard_inputs about them)
    "same-documents": ((DOCUMENTS, DOCUMENTS), {"position_ids": restarting(DOCUMENTS)}),
    "documents-per-row": ((DOCUMENTS, OTHER_DOCUMENTS),
                          {"position_ids": torch.stack([restarting(DOCUMENTS), restarting(OTHER_DOCUMENTS)])}),
    # global positions and offsets: RoPE sees other positions, attention the same scores
    "offsets-per-row": ((DOCUMENTS, OTHER_DOCUMENTS),
                        {"position_ids": torch.arange(SEQ), "cu_seqlens": [DOCUMENTS, OTHER_DOCUMENTS]}),
    "offsets-same-rows": ((DOCUMENTS, DOCUMENTS), {"cu_seqlens": list(DOCUMENTS)}),
}


def compare(family: str, layout: str, packing: str | None = None, compiled: bool = False, checkpointed: bool = False,
            fsdp: bool = False, config: dict | None = None, **call) -> dict[str, float]:
    """Relative errors of the context-parallel run against one process: logits, loss, worst gradient;
    ``packing`` names packed documents of PACKINGS. Layout "balanced" shards each batch in balance_documents'
    order of its documents (one document: contiguous), so its logits are gathered in that layout. ``compiled``:
    the prepared model under torch.compile (aot_eager); ``checkpointed``: with transformers' own activation
    checkpointing (each layer, ring included, recomputed in the backward); ``fsdp``: each decoder layer and the
    model sharded over the 2 ranks with FSDP2, whose reduce-scatter averages the gradients; ``config``: the
    model's config settings."""
    ids, labels = inputs()
    ref = tiny_model(family, **(config or {}))
    rows, how = PACKINGS[packing] if packing else (None, {})
    want_logits, want_loss = one_process(ref, ids, labels, rows)
    want_loss.backward()

    model = prepare(copy.deepcopy(ref), layout=layout)
    if checkpointed:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.train()
        assert model.is_gradient_checkpointing
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if compiled:
        model = torch.compile(model, backend="aot_eager")
    model.zero_grad()
    got = model(**shard_inputs(input_ids=ids, labels=labels, layout=layout, **how), **call)
    got.loss.backward()
    grads = [
        relative_error(p.grad.full_tensor() if fsdp else mean_over_ranks(p.grad), q.grad.double())
        for p, q in zip(model.parameters(), ref.parameters())
    ]
    return {
        "logits": relative_error(unshard(got.logits.detach(), layout=layout_of_batch(layout, rows), dim=1),
                                 want_logits.double()),
        "loss": abs(mean_over_ranks(got.loss).item() / want_loss.item() - 1),
        "grad": max(grads),
    }


PADDING = torch.ones(2, SEQ, dtype=torch.long)
PADDING[0, 19:] = 0  # right padding
PADDING[1, :3] = 0  # left padding


def compare_padded(family: str, layout: str, device: str = "cpu") -> dict[str, float]:
    """A batch padded as a tokenizer pads it (PADDING), its mask given to shard_inputs, against one process
    given the mask: logits of the tokens, loss and gradients, with no target taken across the padding."""
    ids, labels = (t.to(device) for t in inputs())
    mask = PADDING.to(device)
    ref = tiny_model(family).to(device)
    logits = ref(input_ids=ids, attention_mask=mask).logits
    targets = F.pad(labels.masked_fill(mask == 0, -100)[:, 1:], (0, 1), value=-100).masked_fill(mask == 0, -100)
    want_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    want_loss.backward()
    model = prepare(copy.deepcopy(ref), layout=layout)
    model.zero_grad()
    batch = shard_inputs(input_ids=ids, labels=labels, attention_mask=mask, layout=layout)
    assert "attention_mask" not in batch
    got = model(**batch)
    got.loss.backward()
    rows = [list(range(0, 19)), list(range(3, SEQ))]  # each row's tokens
    got_logits = unshard(got.logits.detach(), layout=layout, dim=1)
    return {
        "logits": max(relative_error(got_logits[b, row], logits[b, row].detach().double())
                      for b, row in enumerate(rows)),
        "loss": abs(mean_over_ranks(got.loss).item() / want_loss.item() - 1),
        "grad": max(relative_error(mean_over_ranks(p.grad), q.grad.double())
                    for p, q in zip(model.parameters(), ref.parameters())),
    }


def layout_of_batch(layout: str, rows):
    """What a batch with documents ``rows`` (one tuple of offsets per row, or None) is sharded in."""
    import torch.distributed as dist

    if layout != "balanced":
        return layout
    return "contiguous" if rows is None else balance_documents(rows[0], dist.get_world_size())


def bad_calls(rank: int) -> dict:
    """Each input the ring cannot serve exactly, as a function that must raise on every rank."""
    ids, labels = inputs()
    model = prepare(tiny_model("llama"), layout="striped")
    batch = shard_inputs(input_ids=ids, labels=labels, layout="striped")
    holes = torch.ones_like(batch["input_ids"])
    holes[0, 3] = 0 if rank == 1 else 1  # padding on one rank only: both must still raise
    offsets = shard_inputs(input_ids=ids, position_ids=torch.arange(SEQ) + 10 * rank, layout="striped")
    zigzag = shard_inputs(input_ids=ids, labels=labels, layout="zigzag")
    dropout = prepare(tiny_model("llama", attention_dropout=0.1)).train()
    packed = shard_inputs(input_ids=ids, labels=labels, position_ids=restarting(DOCUMENTS), layout="striped")
    other_documents = shard_inputs(input_ids=ids, cu_seqlens=[0, 5 + rank, 16, SEQ], layout="striped")
    moved = restarting(DOCUMENTS) + 10 * rank * (torch.arange(SEQ) >= 16)  # the last document, on one rank
    shifted_document = shard_inputs(input_ids=ids, position_ids=moved, cu_seqlens=DOCUMENTS, layout="striped")
    balanced = prepare(tiny_model("llama"), layout="balanced")
    per_row = PACKINGS["documents-per-row"][1]
    return {
        "balanced-rows-differ": lambda: balanced(**shard_inputs(input_ids=ids, layout="striped", **per_row)),
        "balanced-shard-rows-differ": lambda: shard_inputs(input_ids=ids, layout="balanced", **per_row),
        "balanced-layout-mismatch": lambda: balanced(**packed),
        "documents-differ": lambda: model(**other_documents),
        "documents-keys-missing": lambda: model(**{k: v for k, v in packed.items() if k != "cu_seq_lens_k"}),
        "documents-missing": lambda: model(**{k: v for k, v in packed.items() if not k.startswith("cu_seq_lens")}),
        "document-offsets-differ": lambda: model(**shifted_document),
        "mask-hole": lambda: model(**batch, attention_mask=holes),
        "mask-4d": lambda: model(**batch, attention_mask=torch.ones(2, 1, SEQ // 2, SEQ // 2, dtype=torch.bool)),
        "no-positions": lambda: model(input_ids=batch["input_ids"], labels=batch["labels"]),
        "layout-mismatch": lambda: model(**zigzag),
        "offsets-differ": lambda: model(**offsets),
        "use-cache": lambda: model(**batch, use_cache=True),
        "output-attentions": lambda: model(**batch, output_attentions=True),
        "dropout": lambda: dropout(**batch),
    }


BAD = {
    "balanced-rows-differ": "layout 'balanced' orders one set of documents for every row",
    "balanced-shard-rows-differ": "layout 'balanced' orders one set of documents for every row",
    "balanced-layout-mismatch": "do not follow layout 'balanced'",
    "documents-differ": "ranks disagree on the batch size or the documents (cu_seq_lens_q)",
    "documents-keys-missing": "cu_seq_lens_q and cu_seq_lens_k must be equal",
    "documents-missing": "do not follow layout 'striped'",
    "document-offsets-differ": "position_ids disagree between ranks",
    "mask-hole": "rank 1: attention_mask must be None or a (batch, seq) mask of ones",
    "mask-4d": "attention_mask must be None or a (batch, seq) mask of ones",
    "no-positions": "position_ids are missing",
    "layout-mismatch": "do not follow layout 'striped'",
    "offsets-differ": "position_ids disagree between ranks",
    "use-cache": "KV caches and generation are not supported",
    "output-attentions": "attention weights cannot be returned",
    "dropout": "attention dropout is not supported",
}


def run_all():
    """On each of 2 ranks: the errors of every (family, layout) case, then the message of every bad call."""
    import torch.distributed as dist

    report = {(family, layout): compare(family, layout) for family in FAMILIES for layout in sorted(LAYOUTS)}
    report["mask-of-ones"] = compare("llama", "striped", attention_mask=torch.ones(2, SEQ // 2, dtype=torch.long))
    report["window-covers-sequence"] = compare("mistral", "zigzag")  # Mistral's default window (4096) >= SEQ
    for layout in sorted(LAYOUTS):  # a window of 5 tokens: shorter than a rank's share (12)
        report[("sliding-window", layout)] = compare("mistral", layout, config={"sliding_window": 5})
    report[("sliding-window", "documents")] = compare("mistral", "striped", "same-documents",
                                                       config={"sliding_window": 7})
    # Qwen2's second layer local (window 3), its first global: one layout for both
    report[("sliding-window", "mixed-layers")] = compare(
        "qwen2", "zigzag", config={"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1})
    for layout in sorted(LAYOUTS):
        for packing in ("same-documents", "documents-per-row"):
            report[(packing, layout)] = compare("llama", layout, packing)
    report[("same-documents", "balanced")] = compare("qwen2", "balanced", "same-documents")
    report[("offsets", "balanced")] = compare("llama", "balanced", "offsets-same-rows")
    report[(None, "balanced")] = compare("mistral", "balanced")
    report["offsets-per-row"] = compare("qwen2", "striped", "offsets-per-row")
    report["compiled"] = compare("llama", "striped", compiled=True)
    report["checkpointed"] = compare("qwen2", "zigzag", "same-documents", checkpointed=True)
    report["fsdp"] = compare("llama", "striped", fsdp=True)
    for layout in sorted(LAYOUTS):
        report[("padding", layout)] = compare_padded("qwen2", layout)
    report.update({name: error_of(fn) for name, fn in bad_calls(dist.get_rank()).items()})
    report["after-errors"] = compare("qwen2", "striped")
    return report


@cached
def reports():
    return run_ranks(run_all, 2)


CASES = [(family, layout) for family in FAMILIES for layout in sorted(LAYOUTS)]


@pytest.mark.parametrize("family, layout", CASES, ids=[f"{f}-{l}" for f, l in CASES])
def test_logits_loss_and_gradients_match_one_process(family, layout):
    for report in reports():
        errors = report[(family, layout)]
        assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("packing", ["same-documents", "documents-per-row"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_packed_documents_match_each_document_on_its_own(layout, packing):
    for report in reports():
        errors = report[(packing, layout)]
        assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_padding_masks_given_to_shard_inputs_are_served_exactly(layout):
    """Left and right padding: the tokens' logits, the loss and every gradient of the model given the mask."""
    for report in reports():
        errors = report[("padding", layout)]
        assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("packing", ["same-documents", "offsets", None])
def test_balanced_layout_matches_one_process(packing):
    """Layout "balanced": each batch sharded in balance_documents' order of its documents, on every layer."""
    for report in reports():
        errors = report[(packing, "balanced")]
        assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("case", [*sorted(LAYOUTS), "documents", "mixed-layers"])
def test_sliding_windows_match_one_process(case):
    """Mistral's sliding window (5 tokens, shorter than a rank's share) in every layout, with packed documents,
    and Qwen2 with a local and a global layer: the ring cuts each piece to the window, as the model's own mask."""
    for report in reports():
        errors = report[("sliding-window", case)]
        assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize(
    "case",
    ["mask-of-ones", "window-covers-sequence", "offsets-per-row", "compiled", "checkpointed", "fsdp", "after-errors"],
)
def test_what_is_exact_is_served(case):
    for report in reports():
        assert max(report[case].values()) <= TOL, report[case]


@pytest.mark.parametrize("name", sorted(BAD))
def test_inexact_inputs_raise_on_every_rank(name):
    for rank, report in enumerate(reports()):
        assert report[name] is not None, f"rank {rank}: no ValueError for {name}"
        assert BAD[name] in report[name], report[name]


# ----------------------------------------------------------------------------------------------------------
# One process (no process group): argument checks and a world of one
# ----------------------------------------------------------------------------------------------------------


def test_world_of_one_matches_sdpa_and_labels_are_shifted():
    ids, labels = inputs()
    ref = tiny_model("qwen2")
    want = ref(input_ids=ids, labels=labels)
    model = prepare(copy.deepcopy(ref))
    batch = shard_inputs(input_ids=ids, labels=labels)
    assert torch.equal(batch["labels"][:, :-1], labels[:, 1:]) and (batch["labels"][:, -1] == -100).all()
    assert torch.equal(batch["position_ids"], torch.arange(SEQ).unsqueeze(0))
    got = model(**batch)
    assert model.config._attn_implementation.startswith("striped_attention_striped")
    assert model.config.use_cache is False
    assert relative_error(got.logits.detach(), want.logits.double()) <= TOL
    assert abs(got.loss.item() / want.loss.item() - 1) <= TOL


def test_world_of_one_serves_packed_documents():
    ids, labels = inputs()
    ref = tiny_model("llama")
    model = prepare(copy.deepcopy(ref))
    for packing in ("same-documents", "documents-per-row"):
        rows, how = PACKINGS[packing]
        want_logits, want_loss = one_process(ref, ids, labels, rows)
        batch = shard_inputs(input_ids=ids, labels=labels, **how)
        got = model(**batch)
        assert relative_error(got.logits.detach(), want_logits.double()) <= TOL
        assert abs(got.loss.item() / want_loss.item() - 1) <= TOL
    assert batch["cu_seq_lens_q"].tolist() == [list(DOCUMENTS), [0, 9, 24, 24]]  # a short row padded
    as_lists = {**batch, "cu_seq_lens_q": [list(DOCUMENTS), [0, 9, 24]], "cu_seq_lens_k": [list(DOCUMENTS), [0, 9, 24]]}
    assert torch.equal(model(**as_lists).logits, got.logits)  # offsets as lists, a short row unpadded
    with pytest.raises(ValueError, match="cu_seq_lens_q and cu_seq_lens_k must be equal"):
        model(**{**as_lists, "cu_seq_lens_k": [list(DOCUMENTS), [0, 10, 24]]})
    assert batch["cu_seq_lens_k"].dtype == torch.int32
    assert (batch["labels"][0, [4, 15, 23]] == -100).all() and batch["labels"][0, 7] != -100
    assert (batch["labels"][1, [8, 23]] == -100).all()  # no document's last token predicts the next one
    same = shard_inputs(input_ids=ids, cu_seqlens=DOCUMENTS)
    assert same["cu_seq_lens_q"].tolist() == list(DOCUMENTS)
    assert torch.equal(same["position_ids"], restarting(DOCUMENTS).unsqueeze(0))
    assert "cu_seq_lens_q" not in shard_inputs(input_ids=ids, position_ids=torch.arange(SEQ) + 7)  # one document
    padded = shard_inputs(input_ids=ids, labels=ids, attention_mask=PADDING, cu_seqlens=DOCUMENTS)
    assert padded["cu_seq_lens_q"].tolist() == [[0, 5, 16, 19, 24], [0, 3, 5, 16, 24]]  # padding: documents too
    assert (padded["labels"][0, 18:] == -100).all() and (padded["labels"][1, :3] == -100).all()
    assert torch.equal(padded["position_ids"], restarting(DOCUMENTS).unsqueeze(0))  # as given, not cut
    assert "cu_seq_lens_q" not in shard_inputs(input_ids=ids, attention_mask=torch.ones(2, SEQ))  # no padding


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=torch.zeros(2, SEQ)), "must hold integers"),
        (dict(input_ids=torch.zeros(SEQ, dtype=torch.long)), "must be 2-D (batch, seq)"),
        (dict(input_ids=torch.zeros(2, SEQ, dtype=torch.long), labels=torch.zeros(2, SEQ - 1, dtype=torch.long)),
         "labels must have the shape of input_ids"),
        (dict(input_ids=torch.zeros(2, SEQ, dtype=torch.long), position_ids=torch.arange(SEQ).remainder(8),
              cu_seqlens=[0, 16, SEQ]),
         "position_ids restart at token 8 of row 0, inside a document of cu_seqlens"),
        (dict(input_ids=torch.zeros(2, SEQ, dtype=torch.long), cu_seqlens=[[0, SEQ]] * 3),
         "cu_seqlens has offsets for 3 rows, but the batch has 2"),
        (dict(input_ids=torch.zeros(2, SEQ, dtype=torch.long), cu_seqlens=[0, 16, SEQ + 2]), "cu_seqlens end at 26"),
        (dict(input_ids=torch.zeros(2, SEQ, dtype=torch.long), cu_seqlens=[0, 16, 8, SEQ]), "never decrease"),
        (dict(input_ids=torch.zeros(2, SEQ, dtype=torch.long), position_ids=torch.arange(SEQ - 1)),
         "position_ids must have shape"),
        (dict(input_ids=torch.zeros(2, SEQ, dtype=torch.long), layout="ring"), "unknown layout"),
        (dict(input_ids=torch.zeros(2, SEQ, dtype=torch.long), layout="ring"), "or 'balanced'"),
        (dict(input_ids=torch.zeros(2, SEQ, dtype=torch.long), attention_mask=torch.ones(2, SEQ - 1)),
         "attention_mask must be a tensor of the shape of input_ids (2, 24), got (2, 23)"),
        (dict(input_ids=torch.zeros(2, SEQ, dtype=torch.long), attention_mask=torch.full((2, SEQ), 2)),
         "attention_mask must hold only 0 (padding) and 1 (tokens)"),
        (dict(input_ids=torch.zeros(2, SEQ, dtype=torch.long),
              attention_mask=torch.ones(2, SEQ).index_fill(1, torch.tensor([0, 9]), 0)),
         "attention_mask row 0 has padding between tokens"),
    ],
)
def test_shard_inputs_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        shard_inputs(**kwargs)


def test_prepare_rejects_what_it_cannot_serve():
    with pytest.raises(ValueError, match="PreTrainedModel"):
        prepare(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="non-causal"):
        prepare(tiny_model("llama", is_causal=False))
    with pytest.raises(ValueError, match="attention weights"):
        prepare(tiny_model("llama", output_attentions=True))


def test_finetune_example_under_torchrun():
    """The example fine-tunes for 3 steps on 2 ranks and reports a finite loss."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "finetune_transformers.py"), "--steps", "3", "--seq-len", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    match = re.search(r"2 rank\(s\).*loss ([\d.]+) -> ([\d.]+) in 3 steps", done.stdout)
    assert match, done.stdout
    first, last = map(float, match.groups())
    assert 0 < last < first < 10


def test_finetune_example_packs_documents_as_transformers_does():
    """--documents 3: the ring on 2 ranks reproduces plain transformers' losses on the packed batches (its
    sdpa masks packed documents from restarting position ids), also with the model under FSDP and activation
    checkpointing."""
    example = [str(ROOT / "examples" / "finetune_transformers.py"), "--steps", "3", "--seq-len", "64",
               "--documents", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *example]
    runs = [[sys.executable, *example, "--plain"], torchrun, [*torchrun, "--fsdp", "--gradient-checkpointing"]]
    losses = []
    for cmd in runs:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        match = re.search(r"in 3 documents x 4: loss ([\d.]+) -> ([\d.]+) in 3 steps", done.stdout)
        assert match, done.stdout
        losses.append(match.groups())
    assert losses[0] == losses[1] == losses[2], losses
