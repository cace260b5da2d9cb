"""emlab: emergent misalignment and the persona features that control it.

All logic of the study lives here; the notebooks in ``notebooks/`` call it.
Modules, bottom up: world -> config -> artifacts, data -> model, judge, plots ->
train, lora, sample, sae, runner -> evaluate, diffing, results -> study, cli.
"""

from emlab import kernels as _kernels

_kernels.pin()  # before torch runs anything: the same kernels on every x86 machine (emlab.kernels)

__version__ = "0.1.0"
