"""Post-hoc OOD scorers, one module per family (as timm splits its models):

    base.py      the contract (`Scorer`, `Features`), the registry (`register`, `get`, `names`),
                 input preprocessing, `ClassifierScorer`
    logits.py    logit-level: msp, ood_class, odin, energy, maxlogit, entropy, kl_matching
    gaussian.py  class-conditional Gaussian: mahalanobis
    gram.py      Gram matrices of the residual blocks: gram
    subspace.py  principal subspace: vim
    shaping.py   activation shaping: react
    sampling.py  the stream sampler (ReAct's activation sample, Gram's held-out samples)

`from disttrain.ood import scorers; scorers.get("energy")` builds any of them; the contract and
the score convention (higher = more OOD) are in base.py's docstring.
"""

from disttrain.ood.scorers.base import (  # noqa: F401
    SCORE_CHUNK, SCORERS, ClassifierScorer, Features, FitData, Scorer, UnknownScorerError, get, input_perturbation,
    names, pooled_block_features, register,
)
# the families, in the registry's order
from disttrain.ood.scorers.logits import MSP, ODIN, Energy, Entropy, KLMatching, MaxLogit, OODClass  # noqa: F401
from disttrain.ood.scorers.gaussian import Mahalanobis  # noqa: F401
from disttrain.ood.scorers.gram import Gram, gram_block_features  # noqa: F401
from disttrain.ood.scorers.subspace import ViM, vim_default_dim  # noqa: F401
from disttrain.ood.scorers.shaping import ReAct  # noqa: F401

__all__ = [
    "Features", "Scorer", "ClassifierScorer", "SCORERS", "register", "get", "names", "UnknownScorerError",
    "input_perturbation", "gram_block_features", "pooled_block_features",
]
