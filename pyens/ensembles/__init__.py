"""DML ensembles (DML paper): diversified members, consensus, adversary detection, smoothing.

    net = pyens.ensembles.DMLEnsemble(members=5, backbone="lenet", in_channels=1, num_classes=10)
    vote = pyens.ensembles.ConsensusClassifier(net, "vote")   # argmax = majority vote, gradient = summed logits
    flagged = net.detect(x, nu="unanimity")                   # A.4: not every member agrees

The layer itself is :class:`pyens.nn.DistanceMap`; training is ``pyens.train("dml", ...)``
(also ``"dml_at"`` and the baseline ``"ensemble"``); the paper's tables are
:mod:`pyens.eval.dml`.
"""
from pyens.ensembles.consensus import HARD_RULES, RULES, ConsensusClassifier, SurrogateScores, consensus, votes
from pyens.ensembles.detection import (
    FEATURES,
    UncertaintyDetector,
    agreement,
    detect,
    disagreement,
    resolve_nu,
    roc,
    uncertainty,
)
from pyens.ensembles.dml import DMLEnsemble, DMLMember, dml_layout
from pyens.ensembles.smoothing import ABSTAIN, certified_accuracy, certify, lower_confidence_bound

__all__ = [
    "ABSTAIN", "FEATURES", "HARD_RULES", "RULES", "ConsensusClassifier", "DMLEnsemble", "DMLMember",
    "SurrogateScores", "UncertaintyDetector", "agreement", "certified_accuracy", "certify", "consensus",
    "detect", "disagreement", "dml_layout", "lower_confidence_bound", "resolve_nu", "roc", "uncertainty", "votes",
]
