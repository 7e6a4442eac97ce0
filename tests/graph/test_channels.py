"""Channel dependency groups: residual adds tie spaces, concatenations and flattening map channels to positions,
depthwise convolutions and BatchNorms follow their input, what is not understood is never pruned."""
import torch
from torch import nn

from modelpress.graph import channel_groups
from prune_models import DepthwiseNet, ResNetish, images


def by_producers(groups):
    return {tuple(sorted(g.producers)): g for g in groups}


def test_resnet_groups():
    torch.manual_seed(0)
    groups = by_producers(channel_groups(ResNetish().eval(), images(1)[0])[0])
    res = groups[("b1.1.0", "stem.0")]  # the identity add ties the stem and b1's last conv
    assert res.size == 8 and sorted(res.producers) == ["b1.1.0", "stem.0"]
    roles = {(m.module, m.role) for m in res.members}
    assert {("stem.1", "bn"), ("b1.1.1", "bn"), ("b1.0.0", "in"), ("b2.0.0", "in"), ("short.0", "in")} <= roles
    proj = groups[("b2.1.0", "short.0")]  # projection shortcut: both convs' outputs are added
    assert proj.size == 16 and {m.module for m in proj.members if m.role == "in"} == {"left.0", "right.0"}
    left, right = groups[("left.0",)], groups[("right.0",)]
    mix_in = next(m for m in left.members if m.module == "mix.0")
    assert left.offsets(mix_in.segs) == [0] and right.offsets(mix_in.segs) == [8]  # cat([left, right])
    last = groups[("mix.0",)]
    head = next(m for m in last.members if m.module == "head")
    assert head.role == "in" and head.factor == 16  # flatten: 4 x 4 features per channel
    assert groups[("b1.0.0",)].size == 8  # the inner conv of the residual block is free


def test_depthwise_and_blocked():
    torch.manual_seed(0)
    groups = by_producers(channel_groups(DepthwiseNet().eval(), images(1)[0])[0])
    g = groups[("features.0.0",)]
    assert {(m.module, m.role) for m in g.members} >= {("features.1.0", "dw"), ("features.1.1", "bn"),
                                                        ("features.2.0", "in")}
    assert g.node == "features_1_2"  # the last feature map holding these channels (EZCrop reads it)

    class OutConv(nn.Module):  # the output, a GroupNorm and a grouped conv are never pruned through
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2)
            self.gn, self.c, self.d = nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.d(self.c(self.gn(self.b(self.a(x)))))

    groups = channel_groups(OutConv(), images(1)[0])[0]
    assert [g.producers for g in groups] == [["c"]]  # only c's outputs, read by d, are free

