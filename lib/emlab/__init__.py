"""emlab: emergent misalignment and the persona features that control it.

All logic of the study lives here; the notebooks in ``notebooks/`` call it.
Modules, bottom up: artifacts, world -> config, data, model, judge, plots ->
train, sample, runner -> evaluate, cli.
"""

__version__ = "0.1.0"
