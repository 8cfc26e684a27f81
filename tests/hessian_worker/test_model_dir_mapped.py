"""``load_compressed`` maps the saved tensors instead of copying them (issue 19: a compressed model
must not cost more memory to load than its dense source): every parameter lies in the memory map
of the directory's model.safetensors, shared classes and bases as one Parameter, under the tie and
the basis scheme (whose rebuilt layers get no placeholder memory)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hessian_worker.apply import apply_plan
from hessian_worker.basis.modules import BasisLinear, install_class
from hessian_worker.io import load_compressed, save_shared
from solver.schema import SharingPlan


def plan_of(groups: list[list[str]]) -> SharingPlan:
    return SharingPlan(status="feasible", coloring={n: c for c, g in enumerate(groups) for n in g}, groups=groups,
                       solver={"method": "test", "time_s": 0.0, "ortools": "none", "seed": 0})


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of ``path`` (/proc/self/maps)."""
    target = str(path.resolve())
    out = []
    with open("/proc/self/maps", encoding="utf-8") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == target:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                out.append((start, end))
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("scheme", ["tie", "basis"])
def test_every_parameter_is_read_from_the_file_mapping(tmp_path, scheme):
    from transformers import GPT2Config, GPT2LMHeadModel

    from hessian_worker.curvature.layerwise import linear_modules

    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=4, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0,
                        attn_implementation="eager")
    model = GPT2LMHeadModel(config).double().eval()
    fc = [f"transformer.h.{i}.mlp.c_fc.weight" for i in range(4)]
    if scheme == "tie":
        plan = plan_of([fc[:2], fc[2:]])
        apply_plan(model, plan, "mean")
    else:
        plan = plan_of([fc])
        layers = linear_modules(model, fc)
        weights = [layers[n][0].weight.detach().T for n in fc]
        u = torch.linalg.svd(torch.cat(weights, dim=1), full_matrices=False)[0][:, :4]
        install_class(model, fc, u, [u.T @ w for w in weights], side="out")
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    out = save_shared(model, plan, tmp_path / "out")

    loaded = load_compressed(out, attn_implementation="eager")
    ranges = mapped_ranges(out / "model.safetensors")
    assert ranges
    for name, p in loaded.named_parameters(remove_duplicate=False):
        assert not p.is_meta, name
        assert any(start <= p.data_ptr() < end for start, end in ranges), f"{name} is a copy, not the mapped file"
    mlp = [block.mlp.c_fc for block in loaded.transformer.h]
    if scheme == "tie":
        assert mlp[0].weight is mlp[1].weight and mlp[0].weight is not mlp[2].weight
    else:
        assert all(isinstance(m, BasisLinear) for m in mlp) and all(m.basis is mlp[0].basis for m in mlp)
        assert mlp[0].coef.requires_grad  # swapped in as a Parameter, trainable as before
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # the architecture's own tie
    saved = model.state_dict()
    assert all(torch.equal(t, saved[k]) for k, t in loaded.state_dict().items())  # bit-exact weights
    # mapped tensors sit at the file's offsets, not 64-byte aligned, so a BLAS kernel may take
    # another path than on the in-memory copy (as for any checkpoint transformers maps): outputs
    # agree to an ulp, not bit for bit, in float64
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-13, atol=1e-15)
