"""`striped-attention env`: what this machine gives the library - versions, the CPU kernel's build, the block
kernel "auto" picks for each device and dtype, the process-group backends - for a bug report or to see why a
run is slow."""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch
import torch.distributed as dist

from . import __version__, kernels
from .cli import describe

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _kernel_names() -> dict:
    """The block kernels' forward functions -> what to call them."""
    names = {kernels._own_cpu_forward: "own CPU kernel", kernels._cpu_forward: "torch CPU flash",
             kernels._widened_cpu_forward: "own CPU kernel on float32 copies",
             kernels._reference_forward: "reference (pure PyTorch)"}
    names.update({forward: f"torch CUDA {name}" for name, (forward, _) in kernels.CUDA_KERNELS.items()})
    return names


def auto_kernels(device: torch.device, head_dim: int = 128) -> dict[str, str]:
    """dtype -> the block kernel backend "auto" runs for inputs of that dtype and ``head_dim`` on ``device``."""
    names = _kernel_names()
    chosen = {}
    for dtype in DTYPES:
        forward, _ = kernels._select(torch.empty(1, 1, 1, head_dim, dtype=dtype, device=device), "auto")
        chosen[str(dtype).removeprefix("torch.")] = names.get(forward, getattr(forward, "__name__", "?"))
    return chosen


def report() -> dict:
    """Everything the command prints, as one dict."""
    extension = kernels.cpu_extension()  # builds it on first use (about 30 s), as the first ring call would
    cpu = {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "blas": next((part.split("=")[1] for part in torch.__config__.show().replace(",", " ").split()
                      if part.startswith("BLAS_INFO=")), "unknown"),
        "own_kernel": None if extension is None else {
            "file": getattr(extension, "__file__", None),
            "threads": "torch's intra-op threads" if extension.intra_op_parallel else "one (built without OpenMP)",
            "dense_chunks": "register blocks" if extension.register_chunks else "BLAS",
        },
        "auto_kernels": auto_kernels(torch.device("cpu")),
    }
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            device = torch.device("cuda", index)
            gpus.append({
                "name": torch.cuda.get_device_name(device),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
                "memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1),
                "auto_kernels": auto_kernels(device),
            })
    backends = []
    if dist.is_available():
        backends = [name for name, ok in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available()))
                    if ok]
    return {
        "striped_attention": __version__,  # the package's own: a source tree on PYTHONPATH has no metadata
        "location": str(Path(__file__).parent),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "transformers": _version("transformers"),
        "cpu": cpu,
        "gpus": gpus,
        "process_group_backends": backends,
    }


def _print(info: dict) -> None:
    cpu = info["cpu"]
    own = cpu["own_kernel"]
    lines = [
        f"striped-attention {info['striped_attention']} ({info['location']}), torch {info['torch']} "
        f"(CUDA build: {info['cuda_build']}), Python {info['python']}, "
        f"transformers {info['transformers'] or 'not installed'}",
        f"platform: {info['platform']}",
        f"CPU: {cpu['capability']} vector unit, {cpu['threads']} torch thread(s), BLAS {cpu['blas']}",
        "CPU kernel: not built, torch CPU flash used instead (see the warning above)" if own is None else
        f"CPU kernel: {own['file']}; computes on {own['threads']}; dense chunks by {own['dense_chunks']}",
        "CPU blocks (head_dim 128): " + ", ".join(f"{k} -> {v}" for k, v in cpu["auto_kernels"].items()),
    ]
    for index, gpu in enumerate(info["gpus"]):
        lines.append(f"GPU {index}: {gpu['name']}, compute capability {gpu['capability']}, {gpu['memory_gib']} GiB; "
                     "blocks (head_dim 128): " + ", ".join(f"{k} -> {v}" for k, v in gpu["auto_kernels"].items()))
    if not info["gpus"]:
        lines.append("GPU: none visible to torch")
    lines.append(f"process groups: {', '.join(info['process_group_backends']) or 'torch.distributed unavailable'}")
    print("\n".join(lines))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("env", help="versions, kernels and backends this machine gives the library",
                              description=describe(__doc__))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.set_defaults(func=main)


def main(args) -> int:
    info = report()
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
    else:
        _print(info)
    return 0
