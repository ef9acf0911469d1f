"""The classification experiment of Section 5 (Table 2 and the Gram-Schmidt + swish
run) as a resumable pipeline, in four parts:

* :mod:`~smaso.experiment.config`: :class:`RunConfig`, every default and choice of a
  run, and the two protocols (the paper's reading, the authors' code);
* :mod:`~smaso.experiment.store`: where a run's files live, the atomic writers, claims;
* :mod:`~smaso.experiment.runner`: :func:`run`, one run from config to results file;
* :mod:`~smaso.experiment.study`: the Table 2 grid, sweeps and shards, the table;
* :mod:`~smaso.experiment.fullscale`: the full-scale Table 2 read back from the
  folders a GPU sweep wrote (``SMASO_TABLE2_RESULTS``), beside the paper's numbers.

Beside them: :mod:`~smaso.experiment.cluster` (a sweep as a SLURM job array through
submitit) and :mod:`~smaso.experiment.activation_study` (chapter 7's study). The names
below are the public interface; the command line is :mod:`smaso.__main__`.
"""

from ..data import DATASETS as _DATASETS
from ..models import MODELS
from .config import (
    DTYPES,
    OPTIMIZERS,
    ORTHOGONALITY,
    PAPER_GS_SWISH_CIFAR100,
    PAPER_TABLE2,
    PRECISIONS,
    PROTOCOLS,
    TABLE2_LRS,
    Protocol,
    RunConfig,
)
from .fullscale import (
    NO_FULL_SCALE,
    TABLE2_RESULTS_ENV,
    full_scale_report,
    load_full_scale,
    render_full_scale,
    table2_results_folders,
)
from .runner import (
    RunClaimedError,
    Runtime,
    build_loss,
    build_model,
    build_optimizer,
    build_packed,
    build_training_model,
    effective_precision,
    filters_cos2,
    load_trained_model,
    orthogonality_error,
    run,
    run_packed,
)
from .store import (
    CheckpointError,
    ResultsError,
    checkpoint_path,
    claim,
    claim_path,
    failed_path,
    load_checkpoint,
    load_result,
    load_results,
    model_path,
    result_path,
    run_status,
    write_json_atomic,
)
from .study import (
    MixedRunsError,
    Table2Grid,
    download,
    format_table,
    parse_shard,
    record_failure,
    setting_of,
    shard,
    subset_study,
    sweep,
    table2,
    table2_configs,
)

#: The authors' batch size per dataset (a view of :data:`smaso.data.DATASETS`).
BATCH_SIZE = {name: d.batch_size for name, d in _DATASETS.items()}

__all__ = [
    "BATCH_SIZE",
    "DTYPES",
    "MODELS",
    "NO_FULL_SCALE",
    "OPTIMIZERS",
    "ORTHOGONALITY",
    "PAPER_GS_SWISH_CIFAR100",
    "PAPER_TABLE2",
    "PRECISIONS",
    "PROTOCOLS",
    "TABLE2_LRS",
    "TABLE2_RESULTS_ENV",
    "CheckpointError",
    "MixedRunsError",
    "Protocol",
    "ResultsError",
    "RunClaimedError",
    "RunConfig",
    "Runtime",
    "Table2Grid",
    "build_loss",
    "build_model",
    "build_optimizer",
    "build_packed",
    "build_training_model",
    "checkpoint_path",
    "claim",
    "claim_path",
    "download",
    "effective_precision",
    "failed_path",
    "filters_cos2",
    "format_table",
    "full_scale_report",
    "load_checkpoint",
    "load_full_scale",
    "load_result",
    "load_results",
    "load_trained_model",
    "model_path",
    "orthogonality_error",
    "parse_shard",
    "record_failure",
    "render_full_scale",
    "result_path",
    "run",
    "run_packed",
    "run_status",
    "setting_of",
    "shard",
    "subset_study",
    "sweep",
    "table2",
    "table2_configs",
    "table2_results_folders",
    "write_json_atomic",
]
