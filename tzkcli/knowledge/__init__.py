"""Knowledge: the registry of kinds and conditions, their priors, rates and inference.

Everything here works on the flow's standardised residuals ``r`` (standard normal under the
base prior ``p_0``) and needs no flow: ``tzkcli.model.TzK`` joins the two. The design is a
reconstruction from the TzK paper's stated claims (see ``docs/model.md``).
"""

from tzkcli.knowledge.composition import (
    Composition,
    CompositionWarning,
    compose,
    composition_log_prob,
    most_specific,
)
from tzkcli.knowledge.inference import existence, posterior, posterior_logits
from tzkcli.knowledge.priors import (
    BottleneckPrior,
    CellLayout,
    ConditionPriors,
    GaussianPrior,
    ResidualStats,
)
from tzkcli.knowledge.rates import KnowledgeRates
from tzkcli.knowledge.registry import (
    DATASET,
    FORMS,
    Condition,
    Kind,
    Registry,
    namespace,
    parse_condition,
)
from tzkcli.knowledge.sampling import Mixture, sample_residuals

__all__ = [
    "DATASET",
    "FORMS",
    "BottleneckPrior",
    "CellLayout",
    "Composition",
    "CompositionWarning",
    "Condition",
    "ConditionPriors",
    "GaussianPrior",
    "Kind",
    "KnowledgeRates",
    "Mixture",
    "Registry",
    "ResidualStats",
    "compose",
    "composition_log_prob",
    "existence",
    "most_specific",
    "namespace",
    "parse_condition",
    "posterior",
    "posterior_logits",
    "sample_residuals",
]
