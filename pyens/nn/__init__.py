"""Networks for pyens: backbones, input normalisation, MIMO and vanilla ensembles, the distance map layer.

    model = pyens.nn.build_model("small_cnn", in_channels=1, num_classes=10, mean=ds.mean, std=ds.std)
    mimo = pyens.nn.MIMO("resnet18", members=3, in_channels=1, num_classes=10, mean=ds.mean, std=ds.std)
    xs, ys = pyens.nn.mimo_batch(x, y, mimo.members, generator=g)   # [B, M, C, H, W], [B, M]
    logits = mimo(xs)                                                # [B, M, K]
    scores = mimo.ensemble(x)                                        # [B, K], log of mean probability

Models take pixel-space inputs in [0, 1]; normalisation is their first layer.
:class:`MIMO` and :class:`Ensemble` share one interface (:class:`MemberEnsemble`), so
training and attacks treat one MIMO network and M separate networks alike.
"""
from pyens.nn.backbones import BACKBONES, BasicBlock, Bottleneck, LeNet, ResNet, ResNet18, ResNet50, SmallCNN
from pyens.nn.backbones import build_backbone
from pyens.nn.distance_map import DistanceMap
from pyens.nn.ensemble import AVERAGES, Classifier, Ensemble, MemberEnsemble, average_members
from pyens.nn.ensemble import build_ensemble, build_model
from pyens.nn.mimo import MIMO, MIMOMember, mimo_batch
from pyens.nn.normalize import Normalize

__all__ = [
    "BACKBONES", "build_backbone", "SmallCNN", "LeNet", "ResNet", "ResNet18", "ResNet50", "BasicBlock", "Bottleneck",
    "Normalize", "build_model", "Classifier", "MemberEnsemble", "Ensemble", "build_ensemble", "average_members",
    "AVERAGES", "MIMO", "MIMOMember", "mimo_batch", "DistanceMap",
]
