"""analyze(model, data, config) -> SharingProblem: the costs of the configured sharing scheme."""

from __future__ import annotations

from typing import Any

from torch import nn

from hessian_worker.config import AnalyzeConfig
from hessian_worker.cost_source import JOB_KEYS, cost_source
from hessian_worker.data import DataSource
from hessian_worker.distributed import in_job
from hessian_worker.losses import TaskLoss
from hessian_worker.pair_costs import check_data_parallel
from hessian_worker.schemes import scheme_for
from solver.schema import SharingProblem


def analyze(
    model: nn.Module | str,
    data: DataSource,
    config: AnalyzeConfig | None = None,
    *,
    tokenizer: Any | None = None,
    loss_fn: TaskLoss | None = None,
) -> SharingProblem:
    """Discovers shareable families and predicts the loss change of sharing each same-family pair.

    Args:
        model: an nn.Module (moved in place to the config's device and dtype; weights untouched) or
            a model spec (``minilm``, a Hugging Face directory, ``module:factory``).
        data: calibration data (see ``load_calibration``).
        config: backend, cost kind, selection, sampling; defaults to ``AnalyzeConfig()``.
            ``scheme`` picks the way of sharing whose costs these are (hessian_worker.schemes).
        tokenizer: for text data when ``model`` is a module.
        loss_fn: a task loss (output, batch) -> scalar instead of self-distillation.

    Raises:
        DiscoveryError, DataError, MemoryBudgetError, BackendError: with the fix in the message.
        DistributedError: in a torch.distributed job (scheme tie, backend exact or layerwise: the
            calibration batches split over the ranks), another rank failed or stopped answering.
    """
    config = config or AnalyzeConfig()
    if in_job():  # before anything runs on every rank
        check_data_parallel(config)
    problem = scheme_for(config.scheme).costs(model, data, config, tokenizer=tokenizer, loss_fn=loss_fn)
    # a distributed job's record (world_size, each rank's samples) is kept beside the settings
    job = {k: v for k, v in (problem.source or {}).items() if k in JOB_KEYS}
    return problem.model_copy(update={"source": {**cost_source(config, task_loss=loss_fn is not None), **job}})
