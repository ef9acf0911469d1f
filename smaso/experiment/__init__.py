"""The experiments of Section 5 and of the book's studies, on one frame.

* :mod:`~smaso.experiment.frame`: what every study shares: a config dataclass, one
  results file per run, the same-run check, the loader, the command line;
* :mod:`~smaso.experiment.config`: :class:`RunConfig`, every default and choice of a
  Table 2 run, and the two protocols (the paper's reading, the authors' code);
* :mod:`~smaso.experiment.store`: where a Table 2 run's files live, checkpoints,
  claims;
* :mod:`~smaso.experiment.runner`: :func:`run`, one run from config to results file;
* :mod:`~smaso.experiment.study`: the Table 2 grid, sweeps and shards, the table;
* :mod:`~smaso.experiment.fullscale`: the full-scale Table 2 read back from the
  folders a GPU sweep wrote (``SMASO_TABLE2_RESULTS``), beside the paper's numbers;
* :mod:`~smaso.experiment.cluster`: a sweep as a SLURM job array (submitit);
* :mod:`~smaso.experiment.activation_study` (chapter 7) and
  :mod:`~smaso.experiment.convstudy` (chapter 6): the book's two CPU studies.

The public names of the Table 2 modules are importable from here
(``from smaso.experiment import RunConfig, run``); each module's ``__all__`` lists
its own, and a module is loaded when one of its names is first asked for, so that
importing one study does not load the others. The command line is
:mod:`smaso.__main__`.
"""

import importlib
import importlib.util

#: The modules whose public names this package offers, in the order they are searched.
_PUBLIC = ("config", "frame", "store", "runner", "study", "fullscale")


def _module(name):
    return importlib.import_module(f"{__name__}.{name}")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return _module(name)  # a module of the package (``from . import study``)
    for m in _PUBLIC:
        module = _module(m)
        if name in module.__all__:
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({n for m in _PUBLIC for n in _module(m).__all__} | set(globals()))
