"""A streamed analysis holds a few blocks, not the model: measured in a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hessian_worker.llm.synthetic import decoder_config, random_tokens, write_random_checkpoint

SCRIPT = """
import json, sys, threading, time
import psutil, torch
from hessian_worker import AnalyzeConfig
from hessian_worker.llm import analyze_checkpoint
from hessian_worker.llm.checkpoint import Checkpoint
from hessian_worker.llm.decoder import Decoder
torch.set_num_threads(1)
Decoder(Checkpoint(sys.argv[1]), torch.float32)  # imports and transformers' lazy modules warm
process = psutil.Process()
base = process.memory_info().rss
peak = [base]

def sample():  # the resident set every 5 ms while the analysis runs
    while True:
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.005)

threading.Thread(target=sample, daemon=True).start()
config = AnalyzeConfig(backend="kfac", dtype="float32", batch_size=4, progress=False)
analyze_checkpoint(sys.argv[1], sys.argv[2], config)
time.sleep(0.05)
print(json.dumps({"base": base, "peak": peak[0]}))
"""

@pytest.mark.slow
def test_peak_memory_stays_within_a_few_blocks(tmp_path):
    blocks = 12
    config = decoder_config("llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=blocks,
                            num_attention_heads=8, num_key_value_heads=8, vocab_size=256)
    folder = write_random_checkpoint(config, tmp_path / "model", dtype=torch.float32, shard_bytes=200 * 1024**2)
    block_bytes = 4 * (4 * 1024 * 1024 + 3 * 1024 * 2816)
    model_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert model_bytes > blocks * block_bytes
    torch.save(random_tokens(256, 8, 64), tmp_path / "calib.pt")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), str(tmp_path / "calib.pt")],
                         capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    growth = measured["peak"] - measured["base"]
    print(f"model {model_bytes / 2**20:.0f} MiB, block {block_bytes / 2**20:.0f} MiB, peak growth {growth / 2**20:.0f} MiB")
    # one block loaded, its backward's temporaries, the kept block inputs and the statistics
    assert growth < 5 * block_bytes, f"peak grew by {growth / 2**20:.0f} MiB; the model is {model_bytes / 2**20:.0f} MiB"
