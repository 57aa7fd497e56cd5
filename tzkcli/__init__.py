"""TzK: a Glow flow whose latent prior is conditioned on knowledge.

The package is a plain library (``tzkcli.store``, ``tzkcli.flows``, ``tzkcli.knowledge``,
``tzkcli.model``, ``tzkcli.training``, ``tzkcli.evaluation``) with a command line on top
(``tzkcli.cli``, the only module that imports Typer or Rich). Importing ``tzkcli`` itself is
cheap: it does not import torch.
"""

__version__ = "0.1.0"
