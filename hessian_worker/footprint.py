"""What a model costs to hold: its parameters counted by storage, its weight bytes on disk, and
the peak memory of loading it and running one forward pass.

Parameters are counted from the loaded tensors' memory, not from the plan: every distinct region
(data pointer, shape, strides, dtype) once, so a class tied into one Parameter counts once and a
copy that only looks shared counts twice. That is the figure that shows the sharing is real.

Peak memory is measured in a fresh Python process per model (``python -m
hessian_worker.footprint``): in the process that also holds the other model, the data and the
allocator's free lists, the figures would say more about that process than about the model. The
child imports torch, transformers and the model's own modeling code first, resets the kernel's
high-water mark (``/proc/self/clear_refs``) and takes its resident set as the baseline; the peak is
the high-water mark after loading and one forward pass on the given batch. Where the mark cannot be
reset (not Linux), the peak is the process's since its start and ``baseline_reset`` says so.

Weights are memory-mapped (``load_compressed`` and ``from_pretrained`` both map safetensors), so
the resident set counts the file pages a load maps, and how many the kernel maps around each
touched page depends on how the file sits in the page cache: the same bytes written by one large
write (large folios, mapped whole) peaked at 119 MB for MiniLM where the packaged copy peaked at
83 MB. So the weight files are evicted from the page cache before each measurement (fsync, then
``POSIX_FADV_DONTNEED``, which drops only those files' clean pages): every model is measured as a
cold load reads it, and ``cold_cache`` says whether that was possible (not while this process
still maps the file: pages mapped anywhere stay cached).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hessian_worker.errors import ModelSpecError


class StorageCount(BaseModel):
    """Parameters of a loaded model, counted by the memory they occupy."""

    model_config = ConfigDict(extra="forbid")

    unique_params: int = Field(description="Elements over distinct memory regions (a shared tensor once).")
    named_params: int = Field(description="Elements over every parameter name (what a dense copy holds).")
    param_bytes: int = Field(description="Bytes of the distinct memory regions.")
    tensors: int = Field(description="Distinct parameter tensors in memory.")


class MemoryPeak(BaseModel):
    """Resident memory of one fresh process loading the model and running one forward pass."""

    model_config = ConfigDict(extra="forbid")

    baseline_bytes: int = Field(description="Resident set after the imports, before loading.")
    peak_bytes: int = Field(description="High-water mark of the resident set over loading and one forward.")
    load_forward_bytes: int = Field(description="peak_bytes - baseline_bytes: what the model and its forward add.")
    after_bytes: int = Field(description="Resident set after the forward (the model still held).")
    mapped_bytes: int | None = Field(None, description="Of the growth after the baseline, the file-backed pages "
                                     "(the mapped weights load and forward touched; Linux RssFile).")
    baseline_reset: bool = Field(description="False when the high-water mark could not be reset after the imports "
                                 "(not Linux): the peak may then be the imports'.")
    cold_cache: bool = Field(False, description="The weight files were evicted from the page cache first (Linux).")
    cuda_peak_bytes: int | None = Field(None, description="torch.cuda.max_memory_allocated over loading and forward.")
    load_s: float
    forward_s: float


def count_storage(model: Any) -> StorageCount:
    """The parameters of ``model`` counted once per memory region they occupy."""
    seen: dict[tuple, tuple[int, int]] = {}
    named = 0
    for _, p in model.named_parameters(remove_duplicate=False):
        named += p.numel()
        seen[(p.data_ptr(), tuple(p.shape), p.stride(), p.dtype)] = (p.numel(), p.numel() * p.element_size())
    return StorageCount(unique_params=sum(n for n, _ in seen.values()), named_params=named,
                        param_bytes=sum(b for _, b in seen.values()), tensors=len(seen))


def model_folder(spec: str) -> Path | None:
    """The directory a model spec loads from (the packaged MiniLM's for ``minilm``), else None."""
    from hessian_worker.models import MINILM, minilm_path

    if spec == MINILM:
        return minilm_path()
    return Path(spec) if Path(spec).is_dir() else None


def disk_bytes(spec: str) -> int | None:
    """Bytes of the weight files the spec loads (model.safetensors, or its index and shards; a
    pytorch_model.bin when that is all there is); None for a ``module:factory`` model."""
    from hessian_worker.weights_file import weight_files

    folder = model_folder(spec)
    if folder is None:
        return None
    files = weight_files(folder)
    if not files:
        return None
    return sum(f.stat().st_size for f in files)


def open_model(spec: str) -> Any:
    """``models.load_model``, plus a compressed directory of a model that has no config.json (a
    ``module:factory`` model): the factory named in its plan.json builds it, ``load_shared`` ties it.

    Raises:
        ModelSpecError: a compressed directory without config.json whose plan.json names no factory.
    """
    from hessian_worker.model_dir import CONFIG, PLAN, is_compressed
    from hessian_worker.models import LoadedModel, load_model

    folder = Path(spec)
    if folder.is_dir() and is_compressed(folder) and not (folder / CONFIG).is_file():
        from hessian_worker.io import load_shared

        meta = json.loads((folder / PLAN).read_text(encoding="utf-8"))
        source = (meta.get("source") or {}).get("model") or meta.get("source_model")
        if not source or ":" not in str(source):
            raise ModelSpecError(f"{spec!r} has no config.json and its {PLAN} names no module:factory to build the "
                                 "model with; build it yourself and call hessian_worker.load_shared(model, path)")
        loaded = load_model(str(source))
        load_shared(loaded.model, folder)
        return LoadedModel(loaded.model.eval(), loaded.tokenizer, spec)
    return load_model(spec)


def measure_peak(spec: str, batch: Mapping[str, Any], *, device: str = "cpu", timeout_s: float = 900.0) -> MemoryPeak:
    """Loads ``spec`` and runs one forward on ``batch`` in a fresh Python process; its peak memory.

    The child sees the parent's ``sys.path`` (through PYTHONPATH), so a ``module:factory`` the
    parent can import is importable there too.

    Raises:
        RuntimeError: the child failed (its stderr's end is in the message).
    """
    import torch

    cold = evict(spec)
    with tempfile.TemporaryDirectory(prefix="geoshare-peak-") as tmp:
        path = Path(tmp) / "batch.pt"
        torch.save({k: v.detach().cpu() for k, v in batch.items()}, path)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_VERBOSITY": "error"}
        run = subprocess.run([sys.executable, "-m", "hessian_worker.footprint", spec, str(path), device],
                             capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"measuring the memory of {spec!r} failed in its subprocess: {run.stderr[-2000:]}")
    return MemoryPeak.model_validate_json(run.stdout.strip().splitlines()[-1]).model_copy(update={"cold_cache": cold})


def evict(spec: str) -> bool:
    """Drops the spec's weight files from the page cache (see the module docstring); False where
    there are none or the platform cannot."""
    from hessian_worker.weights_file import weight_files

    folder = model_folder(spec)
    files = weight_files(folder) if folder is not None else []
    if not files or not hasattr(os, "posix_fadvise"):
        return False
    import gc

    gc.collect()  # a loaded compressed model is a reference cycle: its memory map outlives `del`
    if _mapped_here(files):
        return False  # mapped pages are not evicted: the child would find them cached
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # written pages must reach the disk before they can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            return False
        finally:
            os.close(fd)
    return True


def _mapped_here(files: list[Path]) -> bool:
    """Whether this process still maps one of ``files`` (Linux; False where it cannot tell)."""
    names = {str(f.resolve()) for f in files}
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return any(line.rstrip("\n").split(maxsplit=5)[-1] in names for line in f if "/" in line)
    except OSError:
        return False


def _status(field: str) -> int | None:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM), None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss() -> int:
    value = _status("VmRSS")
    if value is None:
        import psutil

        value = psutil.Process().memory_info().rss
    return value


def _peak() -> int:
    value = _status("VmHWM")
    if value is None:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return value


def _reset_peak() -> bool:
    """Resets the kernel's resident high-water mark to the current resident set (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return _status("VmHWM") is not None


def _import_architecture(spec: str) -> None:
    """Imports the model's code before the baseline, so the peak is the model's, not its code's."""
    from hessian_worker.model_dir import CONFIG, PLAN, architecture

    folder = model_folder(spec)
    if folder is not None and (folder / CONFIG).is_file():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        model_class = None
        if (folder / PLAN).is_file():
            model_class = json.loads((folder / PLAN).read_text(encoding="utf-8")).get("model_class")
        architecture(config, model_class)
        import transformers

        for name in getattr(config, "architectures", None) or []:
            getattr(transformers, name, None)  # the lazy module imports the modeling code
    else:  # a module:factory, or a compressed directory its plan.json says a factory builds
        import importlib

        factory = spec
        if folder is not None and (folder / PLAN).is_file():
            meta = json.loads((folder / PLAN).read_text(encoding="utf-8"))
            factory = str((meta.get("source") or {}).get("model") or meta.get("source_model") or "")
        if ":" in factory:
            importlib.import_module(factory.partition(":")[0])


def _child(spec: str, batch_path: str, device: str) -> MemoryPeak:
    """The measurement itself (runs in the fresh process)."""
    import gc

    import torch

    from hessian_worker.data import call_model

    _import_architecture(spec)
    batch = torch.load(batch_path, map_location="cpu", weights_only=True)
    cuda = device.startswith("cuda")
    gc.collect()
    reset = _reset_peak()
    baseline, baseline_file = _rss(), _status("RssFile")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = open_model(spec).model.to(device).eval()
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        call_model(model, {k: v.to(device) for k, v in batch.items()})
    forward_s = time.perf_counter() - start
    peak = max(_peak(), _rss())
    return MemoryPeak(baseline_bytes=baseline, peak_bytes=peak, load_forward_bytes=peak - baseline,
                      after_bytes=_rss(), baseline_reset=reset,
                      mapped_bytes=None if baseline_file is None else (_status("RssFile") or 0) - baseline_file,
                      cuda_peak_bytes=int(torch.cuda.max_memory_allocated(device)) if cuda else None,
                      load_s=round(load_s, 3), forward_s=round(forward_s, 3))


if __name__ == "__main__":
    spec_arg, batch_arg, device_arg = sys.argv[1:4]
    print(_child(spec_arg, batch_arg, device_arg).model_dump_json())
