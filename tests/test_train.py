"""Training with context parallelism equals single-device training; data, checkpoints, resume, the command.

The 1-rank runs happen in this process; 2 ranks (every layout) and 4 ranks (dp 2 x cp 2) are launched once
each and run all their cases inside the ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from ranks import cached, run_ranks
from striped_attention import LAYOUTS
from striped_attention import train as T
from striped_attention.cli import main as cli_main
from striped_attention.launch import torch_threads

# a slice of the standard library (the email package) keeps each rank's corpus load short
BASE = T.TrainConfig(
    model="tiny", seq_len=256, batch=2, steps=8, lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=1,
    data=str(T.stdlib_dir() / "email"), val_percent=20, progress=False,
)
TOL = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs use one thread, like each launched rank (and robust to a busy machine)."""
    with torch_threads(1):
        yield


def one_rank(**changes) -> list[dict]:
    return T.train_on_rank(replace(BASE, **changes))


@cached
def reference() -> tuple[dict, ...]:
    return tuple(one_rank())


@cached
def reference_gradients() -> torch.Tensor:
    return first_step_gradients(BASE, T.Parallel())


def first_step_gradients(cfg: T.TrainConfig, par: T.Parallel) -> torch.Tensor:
    """All parameter gradients of step 1, averaged over the ranks, flattened."""
    device = torch.device(cfg.device)
    model, _ = T.build_model_and_optimizer(cfg, device)
    ids, labels = T.training_batch(T.load_corpus(cfg.data, val_percent=cfg.val_percent), 1, cfg)
    batch = T.local_batch(ids.to(device), labels.to(device), layout=cfg.layout, par=par)
    T.local_loss(model, batch, par=par, dtype=cfg.dtype).backward()
    grads = [p.grad for p in model.parameters()]
    par.average_(grads)
    return torch.cat([g.reshape(-1) for g in grads])


WINDOWED = dict(sliding_window=37, global_every=2)  # tiny's first layer local, its second global


def run_parallel(world: int, dp: int, layouts: tuple[str, ...], checkpointed: bool = False) -> dict:
    """On each rank: the records of an 8-step run and the step-1 gradients, per layout; with ``checkpointed``
    also the step-1 gradients of the first layout's model under activation checkpointing, and of each layout's
    model with a sliding window (WINDOWED)."""
    par = T.Parallel.build(dp, torch.device("cpu"))
    out = {}
    for layout in layouts:
        cfg = replace(BASE, world_size=world, dp=dp, layout=layout)
        out[layout] = (T.train_on_rank(cfg, par), first_step_gradients(cfg, par))
    if checkpointed:
        cfg = replace(BASE, world_size=world, dp=dp, layout=layouts[0], activation_checkpointing=True)
        out["checkpointed"] = first_step_gradients(cfg, par)
        for layout in layouts:
            cfg = replace(BASE, world_size=world, dp=dp, layout=layout, **WINDOWED)
            out["windowed", layout] = first_step_gradients(cfg, par)
    return out


@cached
def cp2():
    return run_ranks(run_parallel, 2, 2, 1, tuple(sorted(LAYOUTS)), True)


@cached
def dp2_cp2():
    return run_ranks(run_parallel, 4, 4, 2, ("striped",))


def assert_same_curve(got: list[dict], want: tuple[dict, ...], tol: float = TOL) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "val_loss"):
            if key in w:
                assert abs(g[key] - w[key]) <= tol * abs(w[key]), (g["step"], key, g[key], w[key])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------------------------------------
# Equal to single-device training
# ----------------------------------------------------------------------------------------------------------


def test_one_rank_learns():
    losses = [r["loss"] for r in reference()]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3
    assert [r["step"] for r in reference() if "val_loss" in r] == [4, 8]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_ranks_reproduce_the_one_rank_loss_curve(layout):
    for rank_result in cp2():
        records, _ = rank_result[layout]
        assert_same_curve(records, reference())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_ranks_reproduce_the_one_rank_gradients(layout):
    for rank_result in cp2():
        _, grads = rank_result[layout]
        assert relative(grads, reference_gradients()) < 1e-5


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sliding_window_layers_reproduce_the_one_rank_gradients(layout):
    """--sliding-window 37 --global-every 2: a local and a global layer, one layout for both."""
    want = first_step_gradients(replace(BASE, **WINDOWED), T.Parallel())
    assert relative(want, reference_gradients()) > 1e-3  # the window changes the model
    for rank_result in cp2():
        assert relative(rank_result["windowed", layout], want) < 1e-5


def test_activation_checkpointing_recomputes_the_ring_exactly():
    """Each layer's forward, ring included, runs again in the backward on both ranks: the same gradients, bit
    for bit."""
    first = sorted(LAYOUTS)[0]
    for rank_result in cp2():
        assert torch.equal(rank_result["checkpointed"], rank_result[first][1])


def test_dp2_cp2_on_four_ranks_reproduces_the_one_rank_curve():
    for rank_result in dp2_cp2():
        records, grads = rank_result["striped"]
        assert_same_curve(records, reference())
        assert relative(grads, reference_gradients()) < 1e-5


def run_fsdp(directory: str) -> dict:
    """On each of 2 ranks under FSDP (striped): an 8-step run, its step-1 gradients gathered whole, and a run
    that crashes in step 6 (its checkpoint: step 4), resumed to step 8."""
    par = T.Parallel.build(1, torch.device("cpu"))
    cfg = replace(BASE, world_size=2, fsdp=True)
    out = {"records": T.train_on_rank(cfg, par)}
    model, _ = T.build_model_and_optimizer(cfg, torch.device("cpu"))
    ids, labels = T.training_batch(T.load_corpus(cfg.data, val_percent=cfg.val_percent), 1, cfg)
    T.local_loss(model, T.local_batch(ids, labels, layout=cfg.layout, par=par), par=par, dtype=cfg.dtype).backward()
    out["sharded"] = all(p.grad.to_local().numel() < p.numel() for p in model.parameters() if p.numel() > 1)
    out["grads"] = torch.cat([p.grad.full_tensor().reshape(-1) for p in model.parameters()])
    checkpoints = replace(cfg, checkpoint_dir=directory, checkpoint_every=4)
    with crash_in_step(6), pytest.raises(RuntimeError, match="simulated crash"):
        T.train_on_rank(checkpoints, par)
    dist.barrier()  # rank 0 has written the step-4 checkpoint
    out["resumed"] = T.train_on_rank(replace(checkpoints, resume=True), par)
    return out


@cached
def fsdp2(directory: str):
    return run_ranks(run_fsdp, 2, directory)


def test_fsdp_shards_the_model_and_reproduces_the_one_rank_curve(tmp_path_factory):
    """FSDP's reduce-scatter averages the gradients over the ranks: the plain recipe's gradients, bit for bit,
    each rank holding half of each; the curve of one rank; and a run resumed from its (gathered) checkpoint
    continues it bit for bit."""
    for rank, result in enumerate(fsdp2(str(tmp_path_factory.mktemp("fsdp")))):
        assert result["sharded"]
        assert torch.equal(result["grads"], cp2()[rank]["striped"][1])
        assert_same_curve(result["records"], reference())
        keys = ("loss", "grad_norm", "val_loss")
        assert [r["step"] for r in result["resumed"]] == [5, 6, 7, 8]
        for got, want in zip(result["resumed"], result["records"][4:], strict=True):
            assert [got.get(k) for k in keys] == [want.get(k) for k in keys]


def test_fsdp_needs_ranks_and_a_matching_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="fsdp shards the model over the ranks: it needs world_size >= 2"):
        replace(BASE, fsdp=True)
    one_rank(steps=1, checkpoint_dir=str(tmp_path), eval_every=0)
    with pytest.raises(ValueError, match="the checkpoint was saved without --fsdp"):
        T.resumable_state(replace(BASE, steps=1, world_size=2, fsdp=True, checkpoint_dir=str(tmp_path)))


def test_gradient_convention_is_not_a_sum():
    """Sanity of the test itself: twice the gradient would fail the comparison above."""
    assert relative(2 * reference_gradients(), reference_gradients()) > 0.5


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def test_corpus_is_the_standard_library_split_deterministically():
    corpus = T.load_corpus()
    assert corpus.train.dtype == torch.uint8 and corpus.train.numel() > 1_000_000
    assert corpus.files[0] > 10 * corpus.files[1] > 0
    again = T.load_corpus.__wrapped__()
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)
    assert b"def " in corpus.train[:100_000].numpy().tobytes()


def test_labels_are_next_tokens_taken_before_sharding():
    data = torch.arange(200, dtype=torch.uint8)
    ids, labels = T.sequence_batch(data, torch.tensor([0, 3]), 16)
    assert torch.equal(ids[1], torch.arange(48, 64)) and torch.equal(labels[1], torch.arange(49, 65))
    for layout in LAYOUTS:
        got_ids, got_labels = torch.zeros_like(ids), torch.zeros_like(labels)
        for rank in range(2):
            par = T.Parallel(dp=1, cp=2, cp_rank=rank)
            i, lab, pos, cu_seqlens, _ = T.local_batch(ids, labels, layout=layout, par=par)
            assert i.shape == (2, 8) and pos.shape == (8,) and cu_seqlens is None
            assert torch.equal(lab, i + 1)  # every local token keeps its label, also at shard edges
            got_ids[:, pos], got_labels[:, pos] = i, lab
        assert torch.equal(got_ids, ids) and torch.equal(got_labels, labels)


def test_files_in_a_window_are_its_documents():
    ids = torch.tensor([[5, 0, 7, 7, 0, 0, 1, 0], [1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 1, 1, 1, 1, 1, 1]])
    assert T.file_offsets(ids) == [[0, 2, 5, 6, 8], [0, 8], [0, 1, 8]]  # a file ends with its 0 byte
    par = T.Parallel(dp=3, cp=2, dp_rank=2, cp_rank=1)
    assert T.local_batch(ids, ids, layout="striped", par=par, documents=True).cu_seqlens == [[0, 1, 8]]  # its row


def _small_files(directory) -> str:
    """A corpus of 60 files of 60 to 250 bytes (pieces of the email package), so windows hold several."""
    sources = sorted((T.stdlib_dir() / "email").glob("*.py"))
    for i in range(60):
        text = sources[i % len(sources)].read_bytes()
        (directory / f"piece_{i:02d}.py").write_bytes(text[i * 50: i * 50 + 60 + (i * 37) % 190])
    return str(directory)


def test_documents_attend_within_each_file():
    """With documents the model's logits equal those of each file run on its own (RoPE depends only on the
    distance inside a file), and differ from attention over the whole window."""
    ids = torch.tensor([list(b"def f(x):\n  return x\n\0class A: pass\n\0import os\n")])
    torch.manual_seed(0)
    model = T.Llama(T.get_config("tiny"))
    pos = torch.arange(ids.shape[1])
    cu_seqlens = T.file_offsets(ids)
    assert len(cu_seqlens[0]) == 4
    with torch.no_grad():
        packed = model(ids, pos, cu_seqlens=cu_seqlens)
        files = zip(cu_seqlens[0], cu_seqlens[0][1:])
        alone = torch.cat([model(ids[:, a:b], torch.arange(b - a)) for a, b in files], 1)
        whole = model(ids, pos)
    assert relative(packed, alone) < 1e-6 and relative(whole, alone) > 1e-3


def run_documents(data: str, layout: str = BASE.layout, batch: int = BASE.batch, compile: str | None = None):
    cfg = replace(BASE, world_size=2, data=data, documents=True, seq_len=512, steps=4, eval_every=2, layout=layout,
                  batch=batch, compile=compile)
    return T.train_on_rank(cfg, T.Parallel.build(1, torch.device("cpu")))


def test_two_ranks_reproduce_the_one_rank_curve_with_documents(tmp_path):
    data = _small_files(tmp_path)
    ids, _ = T.training_batch(T.load_corpus(data, val_percent=20), 1, replace(BASE, data=data, seq_len=512))
    assert min(len(row) for row in T.file_offsets(ids)) > 3  # every row packs several files
    want = T.train_on_rank(replace(BASE, data=data, documents=True, seq_len=512, steps=4, eval_every=2))
    plain = T.train_on_rank(replace(BASE, data=data, seq_len=512, steps=4, eval_every=2))
    assert abs(want[-1]["loss"] / plain[-1]["loss"] - 1) > 1e-3  # the documents change what is learned
    for records in run_ranks(run_documents, 2, data):
        assert_same_curve(records, tuple(want))


def test_balanced_files_reproduce_the_one_rank_curve(tmp_path):
    """--layout balanced: each row's files whole on the cp ranks, reordered; the same curve as one rank."""
    data = _small_files(tmp_path)
    want = T.train_on_rank(replace(BASE, data=data, documents=True, seq_len=512, steps=4, eval_every=2, batch=1))
    for records in run_ranks(run_documents, 2, data, "balanced", 1):
        assert_same_curve(records, tuple(want))


@pytest.mark.parametrize("layout, batch", [("zigzag", BASE.batch), ("balanced", 1)])
def test_compiled_model_reproduces_the_one_rank_curve(tmp_path, layout, batch):
    """--compile: the model under torch.compile (aot_eager: the graphs inductor would get, without building
    code), the ring one op in them (balanced too: by name), new documents every step; the same curve as one
    eager rank."""
    data = _small_files(tmp_path)
    want = T.train_on_rank(replace(BASE, data=data, documents=True, seq_len=512, steps=4, eval_every=2, batch=batch))
    for records, graphs in run_ranks(run_compiled, 2, data, layout, batch):
        assert_same_curve(records, tuple(want))
        # training: a graph for the first batch, a dynamic one once the number of documents changes; validation
        # (no grad) its own; new documents in each of the 4 steps compile nothing more
        assert 1 <= graphs <= 3, graphs


def run_compiled(data: str, layout: str, batch: int) -> tuple[list[dict], int]:
    records = run_documents(data, layout, batch, "aot_eager")
    return records, torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_data_parallel_ranks_take_their_rows():
    ids = torch.arange(4 * 8).view(4, 8)
    rows = [T.local_batch(ids, ids, layout="striped", par=T.Parallel(dp=2, cp=1, dp_rank=r))[0] for r in range(2)]
    assert torch.equal(torch.cat(rows), ids)


def test_batches_are_a_function_of_seed_and_step():
    pick = lambda step, seed=0: T.batch_indices(step, n_sequences=10, batch=4, seed=seed).tolist()  # noqa: E731
    assert pick(3) == pick(3) and pick(3) != pick(3, seed=1)
    assert sorted(pick(0) + pick(1) + pick(2)[:2]) == list(range(10))  # an epoch visits every window once


def test_learning_rate_schedule():
    cfg = replace(BASE, steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert T.learning_rate(5, cfg) == pytest.approx(0.5)
    assert T.learning_rate(10, cfg) == pytest.approx(1.0)
    assert T.learning_rate(100, cfg) == pytest.approx(0.1)
    assert T.learning_rate(55, cfg) == pytest.approx(0.55)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and resume
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def crash_in_step(step: int):
    """T.train_step raises RuntimeError("simulated crash") in the ``step``-th call made inside the block."""
    real_step, calls = T.train_step, []

    def crashing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    T.train_step = crashing_step
    try:
        yield
    finally:
        T.train_step = real_step


@cached
def crashed_run(directory: str) -> str:
    """A run of BASE with checkpoints every 4 steps that crashes in step 6: its checkpoint holds step 4,
    its log steps 1 to 5."""
    with crash_in_step(6), pytest.raises(RuntimeError, match="simulated crash"):
        one_rank(checkpoint_dir=f"{directory}/ckpt", checkpoint_every=4, log_json=f"{directory}/log.jsonl")
    assert T.load_checkpoint(f"{directory}/ckpt")["step"] == 4
    assert len(open(f"{directory}/log.jsonl").readlines()) == 5
    return directory


def copy_of_crashed_run(tmp_path_factory, destination):
    source = crashed_run(str(tmp_path_factory.getbasetemp() / "crashed"))
    shutil.copytree(source, destination)
    return destination / "ckpt", destination / "log.jsonl"


def test_resume_continues_the_curve_bit_for_bit(tmp_path_factory, tmp_path):
    ckpt, log = copy_of_crashed_run(tmp_path_factory, tmp_path / "run")
    log.write_text(log.read_text() + '{"step": 6, "lo')  # a line cut short by the crash
    resumed = one_rank(checkpoint_dir=str(ckpt), checkpoint_every=2, log_json=str(log), resume=True)
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    keys = ("loss", "grad_norm", "val_loss")
    for got, want in zip(resumed, reference()[4:], strict=True):
        assert [got.get(k) for k in keys] == [want.get(k) for k in keys]  # exactly equal
    logged = [json.loads(line) for line in log.read_text().splitlines()]  # step 5's first try dropped
    assert [(r["step"], r["loss"]) for r in logged] == [(r["step"], r["loss"]) for r in reference()]
    assert T.load_checkpoint(ckpt)["step"] == 8


def test_resume_refuses_a_different_run(tmp_path):
    one_rank(steps=1, checkpoint_dir=str(tmp_path), eval_every=0)
    with pytest.raises(ValueError, match=r"differs from its checkpoint in lr=0.001 \(checkpoint: 0.003\)"):
        one_rank(steps=1, lr=1e-3, eval_every=0, checkpoint_dir=str(tmp_path), resume=True)
    with pytest.raises(ValueError, match="no checkpoint to resume from"):
        one_rank(checkpoint_dir=str(tmp_path / "empty"), resume=True)
    with pytest.raises(ValueError, match=r"in documents=True \(checkpoint: False\)"):
        one_rank(steps=1, documents=True, eval_every=0, checkpoint_dir=str(tmp_path), resume=True)
    state = T.load_checkpoint(tmp_path)  # saved before runs had documents: it resumes as documents=False
    del state["run"]["documents"]
    T.save_checkpoint(tmp_path, state)
    assert T.resumable_state(replace(BASE, steps=1, eval_every=0, checkpoint_dir=str(tmp_path)))["step"] == 1
    with pytest.raises(ValueError, match=r"in documents=True \(checkpoint: False\)"):
        T.resumable_state(replace(BASE, steps=1, eval_every=0, checkpoint_dir=str(tmp_path), documents=True))


KILLED_SAVE = """
import io, os, signal, sys, torch
from striped_attention import train

def save_half_then_die(obj, f):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    f.write(buffer.getvalue()[: buffer.tell() // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

state = train.load_checkpoint(sys.argv[1])
state["step"] = 6
real_save, torch.save = torch.save, save_half_then_die
train.save_checkpoint(sys.argv[1], state)
"""


def test_a_killed_save_keeps_the_last_good_checkpoint(tmp_path_factory, tmp_path):
    ckpt, _ = copy_of_crashed_run(tmp_path_factory, tmp_path / "run")
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(ckpt)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    partial = list(ckpt.glob(".checkpoint.pt.*.tmp"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < (ckpt / "checkpoint.pt").stat().st_size
    assert T.load_checkpoint(ckpt)["step"] == 4  # the last good checkpoint, whole

    resumed = one_rank(checkpoint_dir=str(ckpt), checkpoint_every=2, resume=True)
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in reference()[4:]]
    assert not list(ckpt.glob(".checkpoint.pt.*.tmp"))  # the next save removed the partial file


# ----------------------------------------------------------------------------------------------------------
# The command and its validation
# ----------------------------------------------------------------------------------------------------------


def test_command_writes_one_json_line_per_step(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    argv = ["train", "--seq-len", "128", "--steps", "3", "--eval-every", "2", "--eval-batches", "1",
            "--log-json", str(log), "--no-progress", "--layout", "zigzag"]
    assert cli_main(argv) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in records)
    assert "val_loss" in records[1] and "val_loss" in records[2] and "val_loss" not in records[0]
    assert "step 3: loss" in capsys.readouterr().out


def test_command_under_torchrun_reproduces_the_one_rank_curve(tmp_path):
    """torchrun's 2 ranks run the command: one report (rank 0's), the log equals the in-process curve."""
    log = tmp_path / "log.jsonl"
    argv = ["--model", BASE.model, "--seq-len", BASE.seq_len, "--batch", BASE.batch, "--steps", BASE.steps,
            "--lr", BASE.lr, "--warmup-steps", BASE.warmup_steps, "--eval-every", BASE.eval_every,
            "--eval-batches", BASE.eval_batches, "--data", BASE.data, "--val-percent", BASE.val_percent,
            "--log-json", log, "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "striped_attention.cli", "train", *map(str, argv)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("step 8: loss") == 1 and "2 rank(s) = dp 1 x cp 2" in done.stdout, done.stdout
    assert_same_curve([json.loads(line) for line in log.read_text().splitlines()], reference())


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--seq-len", "--world-size", "--dp", "--layout", "--steps", "--lr", "--seed", "--dtype",
                 "--log-json", "--checkpoint-dir", "--resume", "--eval-every", "--batch", "--threads", "--compile",
                 "--sliding-window", "--global-every"):
        assert flag in text


def test_threads_apply_to_a_single_process_run_and_are_restored(monkeypatch):
    seen = []
    monkeypatch.setattr(T, "train_on_rank", lambda cfg: seen.append(torch.get_num_threads()) or [])
    T.run(replace(BASE, threads=3))
    T.run(BASE)  # None: the process's own setting (1, from the fixture)
    assert seen == [3, 1] and torch.get_num_threads() == 1


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(world_size=4, dp=3), r"dp \(3\) must divide world_size \(4\)"),
        (dict(world_size=2, dp=2, batch=1), r"batch \(1\) must be a multiple of dp \(2\)"),
        (dict(world_size=2, layout="zigzag", seq_len=258), "sequence length 258 must be a positive multiple of 4"),
        (dict(model="huge"), "unknown model preset"),
        (dict(layout="ring"), "unknown layout"),
        (dict(layout="balanced"), r"layout 'balanced' reorders the files of one row per replica: it needs documents"),
        (dict(layout="balanced", documents=True), r"batch equal to dp \(1\), got documents=True, batch=2"),
        (dict(dtype="float16"), "dtype must be one of"),
        (dict(resume=True), "resume needs checkpoint_dir"),
        (dict(steps=0), "steps must be >= 1"),
        (dict(threads=0), "threads must be >= 1"),
        (dict(compile="nope"), "unknown torch.compile backend 'nope'"),
        (dict(sliding_window=0), "sliding_window must be a positive integer"),
        (dict(global_every=2), "it needs a sliding_window"),
    ],
)
def test_bad_config(changes, message):
    with pytest.raises(ValueError, match=message):
        replace(BASE, **changes)


def test_world_size_must_match_the_running_ranks():
    with pytest.raises(ValueError, match="world_size is 2 but 1 ranks are running"):
        T.train_on_rank(replace(BASE, world_size=2))


def test_command_reports_bad_options_without_a_traceback(tmp_path, capsys):
    assert cli_main(["train", "--resume", "--checkpoint-dir", str(tmp_path)]) == 2
    assert "error: no checkpoint to resume from" in capsys.readouterr().err
    assert cli_main(["train", "--world-size", "3", "--dp", "2"]) == 2
    assert "dp (2) must divide world_size (3)" in capsys.readouterr().err
