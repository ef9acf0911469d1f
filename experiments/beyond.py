"""Moved into the package: the activation study of chapter 7 is
:mod:`smaso.experiment.activation_study` (command line: ``python -m smaso activations
run | bench | summary``). This shim keeps ``python experiments/beyond.py ...`` and the
chapter's import of this file working until the chapter points at the package.
"""

import sys

from smaso.experiment.activation_study import *  # noqa: F403
from smaso.experiment.activation_study import main
from smaso.models import study_cnn


def small_cnn(arm, in_channels, num_classes, widths=(16, 32, 64)):
    """Deprecated: :func:`smaso.models.study_cnn` with the arguments reordered."""
    return study_cnn(num_classes, in_channels, arm, widths)


if __name__ == "__main__":
    sys.exit(main())
