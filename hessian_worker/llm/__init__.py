"""Decoder LLMs streamed block by block: a lazily read checkpoint, one decoder block on the device
at a time, calibration activations carried from block to block (the sequential onloading GPTQ and
llm-compressor use to calibrate 70B models on one GPU).

    from hessian_worker.llm import analyze_checkpoint
    problem = analyze_checkpoint("llama-dir/", "calib.pt", AnalyzeConfig(backend="kfac"))
    report = compress_checkpoint("llama-dir/", "calib.pt", CompressConfig(ratio=0.8, backend="kfac"), "out/")
"""

from hessian_worker.llm.analyze import analyze_checkpoint, is_streamable
from hessian_worker.llm.checkpoint import Checkpoint, CheckpointError
from hessian_worker.llm.compress import compress_checkpoint
from hessian_worker.llm.decoder import Decoder, MemoryEstimate, estimate_memory

__all__ = ["Checkpoint", "CheckpointError", "Decoder", "MemoryEstimate", "analyze_checkpoint", "compress_checkpoint",
           "estimate_memory", "is_streamable"]
