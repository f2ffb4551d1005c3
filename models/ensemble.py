"""A deep ensemble: ``n_members`` MLPs on ``log1p`` count fingerprints, fine-tuned on every update."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from labloop.models.base import OnlineLearner, Standardizer, check_targets, default_device, finite_prediction
from labloop.models.errors import NotFitted

__all__ = ["DeepEnsemble"]


class _MLP(torch.nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden // 2), torch.nn.ReLU(),
            torch.nn.Linear(hidden // 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class DeepEnsemble(OnlineLearner):
    """``n_members`` MLPs on ``log1p`` fingerprints, fine-tuned on every update.

    Each update warm-starts every member and trains ``epochs`` passes over all
    data seen so far (small in a lab campaign); the spread of member predictions
    is the uncertainty. Members differ by initialisation and minibatch order.
    """

    name = "ensemble"

    def __init__(self, device: str | None = None, n_members: int = 5, hidden: int = 256,
                 epochs: int = 40, lr: float = 1e-3, seed: int = 0) -> None:
        self.device = torch.device(device or default_device())
        self.n_members, self.hidden, self.epochs, self.lr, self.seed = n_members, hidden, epochs, lr, seed
        self._X = np.zeros((0, 0), dtype=np.float32)
        self._y = np.zeros(0, dtype=np.float64)
        self._members: list[_MLP] = []
        self._norm = (0.0, 1.0)

    @property
    def n_seen(self) -> int:
        return int(self._y.shape[0])

    def _build(self, d: int) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        self._members = []
        for _ in range(self.n_members):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            self._members.append(_MLP(d, self.hidden).to(self.device))

    def update(self, X: np.ndarray, y: np.ndarray, keys: np.ndarray | None = None) -> None:
        # Replicates stay separate rows: an MLP averages them by itself.
        X, y = check_targets(X, y)
        if X.shape[0] == 0:
            return
        self._X = X.copy() if self._X.size == 0 else np.concatenate([self._X, X])
        self._y = np.concatenate([self._y, y])
        if not self._members:
            self._build(X.shape[1])
        self._train()

    def _train(self) -> None:
        std = Standardizer.fit(self._y)
        mu, sd = std.mu, std.sd
        self._norm = (mu, sd)
        Xt = torch.log1p(torch.from_numpy(self._X)).to(self.device)
        yt = torch.from_numpy((self._y - mu) / sd).to(self.device, torch.float32)
        n = Xt.shape[0]
        bs = min(64, n)
        gen = torch.Generator().manual_seed(self.seed + n)
        for member in self._members:
            opt = torch.optim.Adam(member.parameters(), lr=self.lr, weight_decay=1e-5)
            member.train()
            for _ in range(self.epochs):
                perm = torch.randperm(n, generator=gen).to(self.device)
                for s in range(0, n, bs):
                    idx = perm[s : s + bs]
                    opt.zero_grad()
                    loss = torch.nn.functional.mse_loss(member(Xt[idx]), yt[idx])
                    loss.backward()
                    opt.step()

    @torch.no_grad()
    def predict(self, X: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        if not self._members:
            raise NotFitted("DeepEnsemble.predict called before any update")
        mu, sd = self._norm
        outs = []
        for start in range(0, X.shape[0], chunk):
            Xs = torch.log1p(torch.from_numpy(np.asarray(X[start : start + chunk], dtype=np.float32))).to(self.device)
            outs.append(torch.stack([m.eval()(Xs) for m in self._members]).double().cpu().numpy())
        if not outs:
            return np.zeros(0), np.zeros(0)
        P = np.concatenate(outs, axis=1) * sd + mu
        return finite_prediction(P.mean(0), P.std(0), "DeepEnsemble")

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "X": self._X, "y": self._y, "norm": self._norm,
            "config": dict(n_members=self.n_members, hidden=self.hidden, epochs=self.epochs, lr=self.lr, seed=self.seed),
            "members": [{k: v.cpu() for k, v in m.state_dict().items()} for m in self._members],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state["config"].items():
            setattr(self, k, v)
        self._X = np.asarray(state["X"], dtype=np.float32)
        self._y = np.asarray(state["y"], dtype=np.float64)
        self._norm = (float(state["norm"][0]), float(state["norm"][1]))
        self._members = []
        if state["members"]:
            self._build(self._X.shape[1])
            for m, sd in zip(self._members, state["members"], strict=True):
                m.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in sd.items()})
