"""Small real PyTorch models for the tests: a batch-norm CNN, an nn.TransformerEncoder classifier
with dropout, and a GRU on token ids with its embedding split."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class BatchNormCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.bn1 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.bn1(self.conv1(x))), 1))


class TransformerClassifier(nn.Module):
    def __init__(self, d=8, dropout=0.1):
        super().__init__()
        self.proj = nn.Linear(4, d)
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=16, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.encoder(self.proj(x)).mean(dim=1))


class GruTokens(nn.Module):
    """forward(tokens, delta): the embeddings of the tokens (plus delta, for the reference's
    perturbation) through a GRU to a classifier."""

    def __init__(self, vocab=20, e=4, h=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, e)
        self.gru = nn.GRU(e, h, batch_first=True)
        self.head = nn.Linear(h, 3)

    def from_embedded(self, e):
        return self.head(self.gru(e)[1][-1])

    def forward(self, tokens, delta=None):
        e = self.emb(tokens)
        return self.from_embedded(e if delta is None else e + delta)


def cnn_batch(n=6, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def seq_batch(n=5, dtype=torch.float64, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def token_batch(n=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 20, (n, 4), generator=g), torch.randint(0, 3, (n,), generator=g)


def made(cls, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return cls().to(dtype)
