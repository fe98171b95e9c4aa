"""Streaming variational inference: run a Pyro model/guide online, one observed batch at a time.

The recipe (assumed-density filtering with SVI as the projection):
  1. the predictor builds the prior for this batch from its previous posterior, optionally
     tempered toward the base prior (forgetting: see `inference.forgetting`);
  2. `StreamingSVI.update(...)` takes a few SVI steps on (model, guide) for the new batch,
     warm-started from the guide's parameters as the last update left them;
  3. the predictor reads the new posterior off the guide's parameters.

Each engine owns a private Pyro parameter store, so several predictors (and the tests) can live
in one process without sharing parameters. An update that raises leaves the store and the
optimiser exactly as they were. Predictors whose posterior is closed-form skip SVI and call
their exact update instead (the "conjugate fast path"); they keep a model/guide pair anyway so
that tests can check the exact update against SVI on the same program.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO


class StreamingSVI:
    """A few warm-started SVI steps per observed batch, with an isolated parameter store."""

    def __init__(self, model: Callable, guide: Callable, *, steps: int = 20, lr: float = 0.05,
                 lr_decay: float = 1.0, loss: Any | None = None, clip_norm: float | None = 10.0):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.model, self.guide, self.steps = model, guide, steps
        # ClippedAdam: gradient clipping keeps a bad batch from wrecking a warm-started guide;
        # lr_decay (per step) lets long one-off fits settle instead of jittering at lr.
        self._optim_args = {"lr": lr, "lrd": lr_decay,
                            "clip_norm": clip_norm if clip_norm is not None else float("inf")}
        self.loss = loss if loss is not None else Trace_ELBO()
        self._new_optimiser()
        with pyro.get_param_store().scope() as state:
            pass
        self._store_state = state

    def _new_optimiser(self) -> None:
        self.optim = pyro.optim.ClippedAdam(dict(self._optim_args))
        self._svi = SVI(self.model, self.guide, self.optim, loss=self.loss)

    def scope(self):
        """Context in which `pyro.param` reads and writes this engine's parameters."""
        return pyro.get_param_store().scope(state=self._store_state)

    def update(self, *args, **kwargs) -> list[float]:
        """Take `self.steps` SVI steps on this batch; returns the negative-ELBO trace.

        If any step raises (or produces a non-finite loss), parameters and optimiser state are
        restored to what they were before the call and the error propagates.
        """
        backup = self.state_dict()
        losses: list[float] = []
        try:
            with self.scope() as state:
                for _ in range(self.steps):
                    loss = self._svi.step(*args, **kwargs)
                    if not torch.isfinite(torch.as_tensor(loss)):
                        raise FloatingPointError(f"SVI produced a non-finite loss ({loss})")
                    losses.append(float(loss))
            self._store_state = state
        except BaseException:
            self.load_state_dict(backup)
            raise
        return losses

    def param(self, name: str) -> torch.Tensor:
        """The constrained value of a guide parameter (detached)."""
        with self.scope():
            return pyro.param(name).detach()

    def set_param(self, name: str, value: torch.Tensor, constraint=None) -> None:
        """Overwrite a parameter (e.g. re-initialise guide slots for prompts the model forgets)."""
        with self.scope() as state:
            store = pyro.get_param_store()
            if name in store:
                del store[name]
            if constraint is None:
                pyro.param(name, value.detach().clone())
            else:
                pyro.param(name, value.detach().clone(), constraint=constraint)
        self._store_state = state

    def state_dict(self) -> dict[str, Any]:
        # The optimiser keys its state by parameter name, looked up in the active param store, so
        # read it inside this engine's scope; state loaded but not yet used by a step is pending.
        with self.scope():
            optim = self.optim.get_state()
        optim.pop(None, None)  # optimisers of parameter objects no longer in the store
        optim = {**self.optim._state_waiting_to_be_consumed, **optim}
        return {"params": copy.deepcopy(self._store_state), "optim": copy.deepcopy(optim)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._store_state = copy.deepcopy(state["params"])
        self._new_optimiser()  # drop per-parameter optimisers bound to the replaced tensors
        self.optim.set_state(copy.deepcopy(state["optim"]))
