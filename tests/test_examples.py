import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_attention_example_under_torchrun():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "attention.py"), "--seq-len", "1024"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    line = [s for s in done.stdout.splitlines() if "max error" in s][-1]
    assert float(line.split("max error ")[1].split(",")[0]) < 1e-5, line


@pytest.mark.parametrize("balance", [False, True], ids=["striped", "balanced"])
def test_attention_example_with_packed_documents(balance):
    """--documents: an empty document among them, the rest of the sequence last; checked document by document
    (--balance: the documents whole on the ranks, reordered)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "attention.py"), "--seq-len", "1024", "--documents", "300,0,17",
           *["--balance"] * balance]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    line = [s for s in done.stdout.splitlines() if "max error" in s][-1]
    assert "in 4 documents" in line and float(line.split("max error ")[1].split(",")[0]) < 1e-5, line
    assert ("balanced" in line) == balance, line


def test_kernels_benchmark_tables(capsys):
    """benchmarks/kernels.py, both tables, on small blocks: a row per (kernel, pass), every cell a positive number."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import kernels as bench_kernels  # benchmarks/kernels.py
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    before = torch.get_num_threads()
    for extra, cells in (([], 4), (["--triangles", "4", "16"], 3)):
        bench_kernels.main(["--tokens", "64", "--kernels", "own", "torch", "--repeats", "1", *extra])
        rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
        assert [(r[1].strip(), r[2].strip()) for r in rows] == [("own", "fwd"), ("own", "bwd"), ("torch", "fwd"),
                                                                 ("torch", "bwd")]
        for row in rows:
            values = [float(cell.strip().rstrip("x")) for cell in row[3:]]
            assert len(values) == 1 + cells and min(values) > 0, row
    assert torch.get_num_threads() == before  # its --threads (1) do not outlive it


def test_train_benchmark_with_packed_documents():
    """benchmarks/train.py on 2 ranks with packed documents, balanced among the layouts: a row per layout."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train.py"), "--model", "tiny", "--seq-len", "512",
           "--world-size", "2", "--layouts", "contiguous,striped,balanced", "--documents", "8", "--warmup", "0",
           "--repeats", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert {"contiguous", "striped", "balanced"} <= set(rows), done.stdout
