"""Tier A's models: an MLP encoder pre-trained on scikit-learn's bundled 8x8 digits (upright, upside down and
mirrored), fine-tuned per derived task (a rotation, a pixel permutation, inverted and shifted images, a label map,
parity) with its task's own random head frozen; saved as safetensors directories that `mergelib merge` reads (layer stack `encoder.layers.<n>.`).

Every function is seeded explicitly (its own torch.Generator); nothing reads the global RNG.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

WIDTHS = (64, 256, 256, 128)  # input pixels -> hidden -> hidden -> features
TASKS = ("rot90", "rot180", "mirror", "permute", "invert", "labelmap", "shift", "parity")
PRETRAIN_VIEWS = ("rot180", "mirror")  # pre-training sees digits upright, upside down and mirrored
BENCH_TASKS = ("rot90", "permute", "invert", "labelmap", "shift", "parity")  # none of them seen in pre-training


@dataclass(frozen=True)
class Split:
    """Digits as float32 [N, 64] in [0, 1] and int64 labels, split once into train and test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(test_share: float = 0.33) -> Split:
    """The 1797 bundled digits, shuffled with a fixed seed and split (the same split for every seed)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    cut = int(len(y) * (1 - test_share))
    return Split(x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]])


@dataclass(frozen=True)
class Task:
    """A derived task: how images and labels are transformed, and its frozen head."""

    name: str
    permutation: torch.Tensor | None  # pixel permutation (rotations, mirror, permute, shift are all permutations)
    invert: bool
    label_map: torch.Tensor | None  # label -> new label
    classes: int

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        out = x[:, self.permutation] if self.permutation is not None else x
        return 1.0 - out if self.invert else out

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        return self.label_map[y] if self.label_map is not None else y


def _grid_permutation(transform) -> torch.Tensor:
    index = torch.arange(64).view(8, 8)
    return transform(index).reshape(-1).clone()


def make_task(name: str, seed: int) -> Task:
    """Task `name` of the benchmark; the random ones (permute, labelmap) draw from (seed, name)."""
    g = torch.Generator().manual_seed(seed * 1000 + TASKS.index(name))
    perm, invert, labels, classes = None, False, None, 10
    if name == "rot90":
        perm = _grid_permutation(lambda t: torch.rot90(t, 1))
    elif name == "rot180":
        perm = _grid_permutation(lambda t: torch.rot90(t, 2))
    elif name == "mirror":
        perm = _grid_permutation(lambda t: torch.flip(t, dims=[1]))
    elif name == "permute":
        perm = torch.randperm(64, generator=g)
    elif name == "invert":
        invert = True
    elif name == "labelmap":
        labels = torch.randperm(10, generator=g)
    elif name == "shift":
        perm = _grid_permutation(lambda t: torch.roll(t, shifts=(2, 2), dims=(0, 1)))
    elif name == "parity":
        labels, classes = torch.arange(10) % 2, 2
    else:
        raise ValueError(f"unknown task '{name}'; one of {', '.join(TASKS)}")
    return Task(name, perm, invert, labels, classes)


class Classifier(nn.Module):
    """The MLP encoder (ReLU between layers, linear features) and one head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(WIDTHS[:-1], WIDTHS[1:]))
        self.head = nn.Linear(WIDTHS[-1], classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.encoder.layers):
            x = layer(x)
            if i < len(self.encoder.layers) - 1:
                x = torch.relu(x)
        return x

    def layer_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The input of each encoder Linear (what RegMean's Gram matrices are built from)."""
        out = []
        for i, layer in enumerate(self.encoder.layers):
            out.append(x)
            x = layer(x)
            if i < len(self.encoder.layers) - 1:
                x = torch.relu(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def init_model(seed: int, classes: int = 10) -> Classifier:
    """A freshly initialised classifier (torch's default uniform +-1/sqrt(fan_in)) from a private generator."""
    g = torch.Generator().manual_seed(seed)
    model = Classifier(classes)
    with torch.no_grad():
        for layer in (*model.encoder.layers, model.head):
            bound = 1.0 / np.sqrt(layer.in_features)
            for p in (layer.weight, layer.bias):
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
    return model


def train(model: Classifier, x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int, lr: float = 1e-3,
          train_head: bool = True, batch: int = 64) -> Classifier:
    """Adam on cross-entropy in shuffled mini-batches; the head is frozen unless `train_head`."""
    g = torch.Generator().manual_seed(seed)
    params = [p for n, p in model.named_parameters() if train_head or not n.startswith("head.")]
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), batch):
            idx = order[start : start + batch]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model


def accuracy(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def task_head(task: Task, seed: int) -> nn.Linear:
    """The frozen head of `task`: random (seeded by seed and task), bias 0, like a zero-shot head per dataset. Only
    the encoder moves in fine-tuning, so tasks compete for the encoder's features, not for a shared head."""
    head = nn.Linear(WIDTHS[-1], task.classes)
    g = torch.Generator().manual_seed(seed * 1000 + 500 + TASKS.index(task.name))
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) / np.sqrt(WIDTHS[-1]))
        head.bias.zero_()
    return head


def with_head(encoder_of: Classifier, head: nn.Linear) -> Classifier:
    model = Classifier(head.out_features)
    model.encoder.load_state_dict(encoder_of.encoder.state_dict())
    model.head.load_state_dict(head.state_dict())
    return model


def save_model(model: Classifier, path: Path, *, include_head: bool = False) -> Path:
    """A safetensors directory with config.json: the encoder (and the head when asked), float32."""
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
             if include_head or not k.startswith("head.")}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "digits_mlp", "num_hidden_layers": len(WIDTHS) - 1, "widths": list(WIDTHS)}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_encoder(path: Path, head: nn.Linear | None = None) -> Classifier:
    """A classifier with the encoder stored at `path` (a merge output or a saved model) and `head`, or the stored
    head when `head` is None."""
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    model = Classifier(head.out_features if head is not None else state["head.weight"].shape[0])
    model.encoder.load_state_dict({k.removeprefix("encoder."): v.float() for k, v in state.items()
                                   if k.startswith("encoder.")})
    if head is not None:
        model.head.load_state_dict(head.state_dict())
    else:
        model.head.load_state_dict({"weight": state["head.weight"].float(), "bias": state["head.bias"].float()})
    return model
