"""emlab: emergent misalignment and the persona features that control it.

All logic of the study lives here; the notebooks in ``notebooks/`` call it.
Modules, bottom up: world -> config -> artifacts, data -> model, judge, plots ->
train, lora, sample, sae, runner -> evaluate, diffing, results -> study, cli.
"""

__version__ = "0.1.0"
