"""Small models for the structured pruning tests: a ResNet-style CNN (residual adds, a strided shortcut, a
concatenation, flatten into a Linear) and a depthwise-separable CNN."""
import torch
from torch import nn


def cbr(cin, cout, k=3, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if act else nn.Sequential(*layers)


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.b1 = nn.Sequential(cbr(8, 8), cbr(8, 8, act=False))
        self.b2 = nn.Sequential(cbr(8, 16, stride=2), cbr(16, 16, act=False))
        self.short = cbr(8, 16, 1, stride=2, act=False)
        self.left, self.right = cbr(16, 8), cbr(16, 12)
        self.mix = cbr(20, 16)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b1(x))  # identity shortcut: stem and b1's last conv share channels
        x = torch.relu(self.b2(x) + self.short(x))  # projection shortcut
        x = self.mix(torch.cat([self.left(x), self.right(x)], dim=1))  # concatenation
        return self.head(torch.flatten(x, 1))  # each channel is 16 features of the Linear


class DepthwiseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(cbr(3, 16), cbr(16, 16, groups=16), cbr(16, 24, 1), nn.MaxPool2d(2),
                                      cbr(24, 24, groups=24), cbr(24, 32, 1))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def randomize_bn(model, seed=0):
    """Non-trivial BatchNorm statistics and affine parameters (fresh ones are the identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def images(n=4, batch=8, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]
