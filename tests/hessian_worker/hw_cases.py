"""Tiny shared models and dense references for the worker tests (float64, no downloads)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian

from hessian_worker.curvature.base import flatten, unflatten
from hessian_worker.data import Calibration
from hessian_worker.objective import Objective


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.tanh(self.fc(x))


class TinyMLP(nn.Module):
    """3 repeated blocks of 4x4 linear layers between an input and an output layer."""

    def __init__(self, width: int = 4, depth: int = 3, outputs: int = 3, logits: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(3, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.out = nn.Linear(width, outputs)
        self.logits = logits

    def forward(self, x: Tensor):
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = block(h)
        y = self.out(h)
        return {"logits": y} if self.logits else y


def tiny_mlp(logits: bool = False, seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP(logits=logits).double().eval()


def rank_one_mlp() -> TinyMLP:
    """Four rank-1 4x4 layers with orthogonal output directions: one shared rank-2 basis must drop
    two of them, any tie loses, while each alone at rank 1 is exact."""
    torch.manual_seed(0)
    model = TinyMLP(depth=4).double().eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            v = torch.randn(4, generator=g, dtype=torch.float64)
            block.fc.weight.copy_(torch.outer(torch.eye(4, dtype=torch.float64)[i], v))
    return model


def factory() -> nn.Module:
    """A ``module:factory`` target for the CLI tests."""
    return tiny_mlp()


def mlp_data(n: int = 10, batch: int = 4, seed: int = 1) -> Calibration:
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return Calibration([{"input": x[i : i + batch]} for i in range(0, n, batch)])


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                     vocab_size=40, max_position_embeddings=32, attn_implementation="eager",
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(cfg).double().eval()


def bert_data(seed: int = 2) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (5, 6), generator=g)
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    return Calibration([{"input_ids": ids[:3], "attention_mask": mask[:3]},
                        {"input_ids": ids[3:], "attention_mask": mask[3:]}])


def random_params(obj: Objective, n: int, seed: int = 5, scale: float = 0.1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(n, *p.shape, generator=g, dtype=p.dtype) for k, p in obj.params0.items()}


def shapes(obj: Objective) -> dict[str, torch.Size]:
    return {n: obj.params0[n].shape for n in obj.names}


def dense_hessian(obj: Objective) -> Tensor:
    """Full Hessian of the calibration loss over the stacked names, by autograd."""
    sh = shapes(obj)
    x0 = flatten(obj.params0, obj.names)
    return hessian(lambda v: obj.loss(unflatten(v, sh)), x0)


def dense_ggn(obj: Objective) -> Tensor:
    """Σ_b w_b J_bᵀ H_out,b J_b with J and H_out both from autograd (no closed forms)."""
    sh = shapes(obj)
    x0 = flatten(obj.params0, obj.names)
    total = torch.zeros(x0.numel(), x0.numel(), dtype=x0.dtype)
    for b, w in enumerate(obj.weights):
        y0 = obj.output(obj.params0, b).detach()
        jac = jacobian(lambda v, b=b: obj.output(unflatten(v, sh), b).reshape(-1), x0)
        h_out = hessian(lambda z, b=b, s=y0.shape: obj.loss_on_output(z.reshape(s), b), y0.reshape(-1))
        total += w * jac.T @ h_out @ jac
    return total


def quad_dense(mat: Tensor, obj: Objective, deltas: dict[str, Tensor]) -> Tensor:
    """δᵀMδ for stacked directions (absent names are zero)."""
    n = next(iter(deltas.values())).shape[0]
    full = {k: deltas.get(k, torch.zeros(n, *p.shape, dtype=p.dtype)) for k, p in obj.params0.items()}
    vec = torch.cat([full[k].reshape(n, -1) for k in obj.names], dim=1)
    return torch.einsum("ni,ij,nj->n", vec, mat, vec)
