"""Streaming variational inference as a pure function: `update(state, *batch, seed) -> (state, info)`.

The recipe (assumed-density filtering with SVI as the projection):
  1. the predictor builds the prior for this batch from its previous posterior, tempered toward
     the base prior (forgetting: `inference.forgetting`);
  2. `StreamingSVI.update` takes a few SVI steps on the predictor's (model, guide) for the new
     batch, warm-started from the parameters and optimiser moments in `state`;
  3. the predictor reads the new posterior off the returned state's parameters.

No global parameter store: the objective is Pyro's `ELBOModule` (`Trace_ELBO()(model, guide)`),
parameters live in the guide's `PyroModule`s / `nn.Module`s, and each update runs in a fresh,
scoped Pyro parameter store (a `PyroModule` puts its own parameters there, and the user's store
is restored afterwards), so no process-wide Pyro setting is changed. The optimiser is Pyro's `ClippedAdam` used as the plain torch
optimiser it is. The state (`SVIState`: parameter values, Adam moments, step counts, learning
rate) is a set of tensors that an update reads and never writes, so a failed or non-finite
update simply returns the state it was given (NumPyro's `SVIState`/BlackJAX's init/step shape).
The modules are a workspace: `write(state)` puts a state's parameter values into them, which
`update` does for the state it returns.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import pyro
import torch
from pyro.infer import Trace_ELBO
from pyro.optim.clipped_adam import ClippedAdam
from torch import Tensor, nn

@dataclasses.dataclass(frozen=True)
class SVIState:
    """Everything an update depends on besides the batch, by parameter name."""

    params: dict[str, Tensor]  # unconstrained parameter values
    exp_avg: dict[str, Tensor]  # Adam first moments (zero before a parameter's first step)
    exp_avg_sq: dict[str, Tensor]  # Adam second moments
    adam_steps: dict[str, Tensor]  # int64 scalars: Adam steps taken per parameter
    lr: Tensor  # float64 scalar: the learning rate, decayed per step

    def tensors(self) -> dict[str, Tensor]:
        """Flat view (for saving, byte counts and shape checks)."""
        out = {"lr": self.lr}
        for field in ("params", "exp_avg", "exp_avg_sq", "adam_steps"):
            out.update({f"{field}.{name}": value for name, value in getattr(self, field).items()})
        return out

    @classmethod
    def from_tensors(cls, flat: dict[str, Tensor]) -> "SVIState":
        parts: dict[str, dict[str, Tensor]] = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}, "adam_steps": {}}
        for key, value in flat.items():
            if key != "lr":
                field, name = key.split(".", 1)
                parts[field][name] = value
        return cls(**parts, lr=flat["lr"])


class WithModule(nn.Module):
    """`program(module, *args)` as an `nn.Module` that owns `module`, so that the objective finds
    its parameters (a model and a guide may share one module: its parameters count once)."""

    def __init__(self, program: Callable, module: nn.Module):
        super().__init__()
        self.program, self.module = program, module

    def forward(self, *args, **kwargs):
        return self.program(self.module, *args, **kwargs)


class StreamingSVI:
    """A few warm-started SVI steps per observed batch on `Trace_ELBO()(model, guide)`.

    `model` and `guide` are callables; every trainable parameter must belong to an `nn.Module`
    among them (a `PyroModule` guide with `PyroParam` attributes, or a module holding networks).
    """

    def __init__(self, model: Callable, guide: Callable, *, steps: int = 20, lr: float = 0.05,
                 lr_decay: float = 1.0, loss: Any | None = None, clip_norm: float | None = 10.0):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps, self.lr, self.lr_decay = steps, lr, lr_decay
        self.clip_norm = clip_norm if clip_norm is not None else float("inf")
        self.objective = (loss if loss is not None else Trace_ELBO())(model, guide)  # an ELBOModule

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters (frozen ones, requires_grad False, are not state)."""
        return {name: p for name, p in self.objective.named_parameters() if p.requires_grad}

    def init(self) -> SVIState:
        """The state of the modules as they are now, before any step."""
        params = {name: p.detach().clone() for name, p in self.named_parameters().items()}
        zeros = {name: torch.zeros_like(value) for name, value in params.items()}
        return SVIState(params, zeros, dict(zeros), {name: torch.tensor(0) for name in params},
                        torch.tensor(self.lr, dtype=torch.float64))

    def prepare(self, *args, seed: int, **kwargs) -> None:
        """Run the guide once on a batch, so a guide that builds its parameters on first use (an
        autoguide) has them before `init`; in its own scoped store and seeded, like `update`."""
        with pyro.get_param_store().scope(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.objective.guide(*args, **kwargs)

    def write(self, state: SVIState) -> None:
        """Put the state's parameter values into the modules (they are the workspace, not the state)."""
        with torch.no_grad():
            for name, p in self.named_parameters().items():
                p.copy_(state.params[name])

    def update(self, state: SVIState, *args, seed: int, **kwargs) -> tuple[SVIState, dict[str, Any]]:
        """`self.steps` SVI steps from `state` on this batch; SVI draws seeded by `seed`.

        Returns (new state, {"elbo": [negative ELBO per step]}), or (state, {"failed": reason})
        when a step raises or its loss or gradient is not finite; the modules then hold `state`.
        """
        params = self.named_parameters()
        self.write(state)
        optimiser = ClippedAdam(list(params.values()), lr=float(state.lr), clip_norm=self.clip_norm, lrd=self.lr_decay)
        for name, p in params.items():  # ClippedAdam's own per-parameter state, copied from ours
            optimiser.state[p] = {"step": int(state.adam_steps[name]), "exp_avg": state.exp_avg[name].clone(),
                                  "exp_avg_sq": state.exp_avg_sq[name].clone()}
        losses: list[float] = []
        try:
            # A fresh parameter store for this update only: PyroModule parameters enter it as
            # themselves (so the optimiser's tensors are the ones the program reads) and names
            # from other programs or the user's store cannot collide.
            with pyro.get_param_store().scope(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for _ in range(self.steps):
                    optimiser.zero_grad(set_to_none=True)
                    loss = self.objective(*args, **kwargs)
                    loss.backward()
                    grads = [p.grad for p in params.values() if p.grad is not None]
                    if not torch.isfinite(loss) or not all(bool(torch.isfinite(g).all()) for g in grads):
                        raise FloatingPointError(f"SVI produced a non-finite loss or gradient (loss {float(loss.detach())})")
                    optimiser.step()
                    losses.append(float(loss.detach()))
        except (ValueError, RuntimeError, FloatingPointError, ArithmeticError) as error:
            self.write(state)
            return state, {"failed": f"{type(error).__name__}: {error}"}
        moments = {name: optimiser.state[p] for name, p in params.items()}
        new = SVIState(
            params={name: p.detach().clone() for name, p in params.items()},
            exp_avg={name: m["exp_avg"] for name, m in moments.items()},
            exp_avg_sq={name: m["exp_avg_sq"] for name, m in moments.items()},
            adam_steps={name: torch.tensor(m["step"], dtype=torch.int64) for name, m in moments.items()},
            lr=torch.tensor(optimiser.param_groups[0]["lr"], dtype=torch.float64),
        )
        return new, {"elbo": losses}
