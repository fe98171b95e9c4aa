"""The predictor seam: what every risk predictor promises the loop.

A `RiskPredictor` holds its state as a dataclass of tensors and answers two calls:
`predict(ids, step)` returns a `SuccessPosterior` for those prompts (made before their outcomes
are seen; pure) and `observe(ids, successes, trials, step)` folds a batch of outcomes in. Inputs
are checked here, once, and a subclass's new state is committed only after it was computed in
full, so a rejected or failed call changes nothing. Saving and loading (with key, shape and
dtype checks) are here too; `program()` declares the Pyro program an update conditions on.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor

from mpts.models.options import StrictOptions


class PredictorOptions(StrictOptions):
    """Base of every predictor's options; unknown keys, booleans as numbers and NaN/inf are errors."""


class PromptPool:
    """What a predictor may know about the prompts before any rollout.

    `texts` are the prompts themselves (when the environment or log has them); `features`
    optional per-prompt vectors (text embeddings, or the simulator's embedding-like features);
    `clusters` optional integer groups used for pooling. `features` and `clusters` may be given
    as zero-argument callables: they are called once, on first access, and the result is checked
    and kept, so a 10^6-prompt pool (or one whose embeddings take minutes) pays only when a
    predictor asks. `has_features` / `has_clusters` say whether a source exists without calling it,
    and `feature_dim` the width of the features (for lazy ones, the `feature_dim` given).
    """

    def __init__(self, size: int, features: Tensor | Callable[[], Tensor] | None = None,
                 clusters: Tensor | Callable[[], Tensor] | None = None, texts: Sequence[str] | None = None,
                 feature_dim: int | None = None):
        if isinstance(size, bool) or int(size) != size or size <= 0:
            raise ValueError(f"prompt pool is empty (size={size}); a pool needs at least one prompt")
        self.size = int(size)
        if texts is not None:
            texts = tuple(texts)
            if len(texts) != self.size:
                raise ValueError(f"pool.texts has {len(texts)} entries but the pool has {self.size} prompts")
            if not all(isinstance(text, str) for text in texts):
                raise TypeError("pool.texts must all be strings")
        self.texts: tuple[str, ...] | None = texts
        self._sources = {"features": features, "clusters": clusters}
        self._feature_dim = feature_dim
        self._resolved: dict[str, Tensor | None] = {}
        for name, value in self._sources.items():
            if value is not None and not callable(value):
                self._resolved[name] = self._checked(name, value)

    @property
    def features(self) -> Tensor | None:
        return self._resolve("features")

    @property
    def clusters(self) -> Tensor | None:
        return self._resolve("clusters")

    @property
    def has_features(self) -> bool:
        return self._sources["features"] is not None

    @property
    def has_clusters(self) -> bool:
        return self._sources["clusters"] is not None

    @property
    def feature_dim(self) -> int:
        """Columns of `features` (0 without features), computed features only when already computed."""
        if self._sources["features"] is None:
            return 0
        if "features" in self._resolved or self._feature_dim is None:
            features = self.features
            return int(features.shape[1]) if features.dim() > 1 else 1
        return int(self._feature_dim)

    def _resolve(self, name: str) -> Tensor | None:
        if name not in self._resolved:
            source = self._sources[name]
            self._resolved[name] = None if source is None else self._checked(name, source())
        return self._resolved[name]

    def _checked(self, name: str, value: Any) -> Tensor:
        value = torch.as_tensor(value)
        if value.dim() == 0 or value.shape[0] != self.size:
            raise ValueError(f"pool.{name} has shape {tuple(value.shape)} but the pool has {self.size} prompts")
        return value

    def __repr__(self) -> str:
        parts = [f"size={self.size}"] + [name for name in ("texts",) if self.texts is not None]
        parts += [name for name, source in self._sources.items() if source is not None]
        return f"PromptPool({', '.join(parts)})"


class SuccessPosterior(abc.ABC):
    """Belief about each prompt's success probability p, for a batch of n prompts.

    Every method is vectorised over the batch. `log_prob` and `p_informative` are for the
    posterior predictive of S ~ Binomial(trials, p) with p integrated out.
    """

    @property
    @abc.abstractmethod
    def mean(self) -> Tensor:
        """E[p], shape [n]."""

    @property
    @abc.abstractmethod
    def variance(self) -> Tensor:
        """Var[p], shape [n]."""

    @abc.abstractmethod
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Draws of p, shape [num_samples, n]; deterministic given the generator."""

    @abc.abstractmethod
    def log_prob(self, successes: Tensor, trials: Tensor) -> Tensor:
        """log P(S = successes | trials) under the posterior predictive, shape [n]."""

    @abc.abstractmethod
    def interval(self, level: float) -> tuple[Tensor, Tensor]:
        """Central credible interval for p holding `level` of the posterior mass."""

    def p_informative(self, k: int | Tensor) -> Tensor:
        """P(0 < S < k): the chance a group of k rollouts carries a GRPO signal."""
        k = torch.as_tensor(k, dtype=self.mean.dtype).expand_as(self.mean)
        p_zero = self.log_prob(torch.zeros_like(k), k).exp()
        p_all = self.log_prob(k, k).exp()
        return (1.0 - p_zero - p_all).clamp_(0.0, 1.0)

    def predictive_pit(self, successes: Tensor, trials: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Randomised probability integral transform of observed counts (uniform when calibrated).

        PIT = F(s-1) + U * P(s) for a discrete predictive F; needs trials <= 4096 per prompt.
        """
        successes = successes.to(self.mean.dtype)
        trials = trials.to(self.mean.dtype)
        k_max = int(trials.max().item()) if trials.numel() else 0
        counts = torch.arange(k_max + 1, dtype=self.mean.dtype).unsqueeze(1)  # [k+1, 1]
        valid = counts <= trials.unsqueeze(0)
        expanded = counts.expand(k_max + 1, trials.shape[0])
        pmf = torch.where(valid, self.log_prob_grid(expanded, trials).exp(), torch.zeros(()))
        below = (pmf * (counts < successes.unsqueeze(0))).sum(0)
        at = (pmf * (counts == successes.unsqueeze(0))).sum(0)
        u = torch.rand(trials.shape, generator=generator, dtype=self.mean.dtype)
        return (below + u * at).clamp_(0.0, 1.0)

    def log_prob_grid(self, successes: Tensor, trials: Tensor) -> Tensor:
        """log_prob for successes of shape [m, n] against one trials row [n]."""
        return torch.stack([self.log_prob(row, trials) for row in successes])

    def take(self, index: Tensor) -> "SuccessPosterior":
        """The posterior of a sub-batch: every per-prompt tensor field is indexed."""
        if not dataclasses.is_dataclass(self):
            raise TypeError(f"{type(self).__name__} must implement take() or be a dataclass")
        n = len(self)
        updates = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
                updates[field.name] = value[index]
        return dataclasses.replace(self, **updates)

    def __len__(self) -> int:
        return int(self.mean.shape[0])


@dataclasses.dataclass(frozen=True)
class Rows:
    """New values for some rows of a state tensor (`tensor[index] = values` when committed)."""

    index: Tensor
    values: Tensor


@dataclasses.dataclass(frozen=True)
class Program:
    """One observe() call as the Pyro program the predictor declares.

    `model(*args)` is the generative program of the batch with the prior the predictor's
    posterior-to-prior rule (forgetting, lazy catch-up) gives at that step; `guide` an
    `nn.Module` variational family for it. `update` names how production computes the
    posterior: "conjugate" (closed form), "filter" (exact forward step) or "svi" (streaming SVI
    on exactly this program). `posterior(guide)` reads the next step's predictive of the batch
    off a fitted guide, for comparison with what production predicts after the update ("svi"
    programs carry the engine, its state and the seed the update uses instead).
    """

    model: Any
    guide: Any
    args: tuple
    update: str
    posterior: Any = None
    engine: Any = None  # "svi": the predictor's StreamingSVI, its state before the update, and the seed
    state: Any = None
    seed: int | None = None


class RiskPredictor(abc.ABC):
    """A probabilistic model of each prompt's success rate under the current policy.

    Subclasses set `name` (the config/CLI name) and `Options` (a `PredictorOptions`), keep all
    their learned state in `self.state` (a dataclass whose fields are tensors, `None`, or objects
    with `tensors()` / `from_tensors()` such as `inference.SVIState`), and implement

    - `_predict(ids, step)`: a `SuccessPosterior` from `self.state`; reads, never writes;
    - `_observe(ids, successes, trials, step) -> (changes, info)`: the new values of the state's
      fields (a whole tensor, or `Rows` of one), computed without writing anything.

    Validation, saving, loading (with key, shape and dtype checks) and the atomic commit of an
    observe are here, once: a call that raises leaves the predictor exactly as it was.
    """

    name: ClassVar[str]
    Options: ClassVar[type[PredictorOptions]] = PredictorOptions
    state: Any

    def __init__(self, pool: PromptPool, options: PredictorOptions | None = None, seed: int = 0):
        self.pool = pool
        self.num_prompts = pool.size
        self.options = options if options is not None else self.Options()
        self.seed = seed

    # -- the public calls (validate, then delegate) -------------------------------------
    def predict(self, ids: Tensor, step: int) -> SuccessPosterior:
        ids = self.check_ids(ids)
        return self._predict(ids, int(step))

    def observe(self, ids: Tensor, successes: Tensor, trials: Tensor, step: int) -> dict[str, Any]:
        """Fold in outcomes; returns diagnostics (e.g. {"elbo": [...]}) for logging."""
        ids, successes, trials = self.check_outcomes(ids, successes, trials)
        changes, info = self._observe(ids, successes, trials, int(step))
        self.state = commit(self.state, changes)
        self._state_changed()
        return info or {}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_prompts": self.num_prompts, "options": self.options.model_dump(),
                "state": {key: value.clone() for key, value in flatten(self.state).items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state is for predictor {state.get('name')!r}, not {self.name!r}")
        if state.get("num_prompts") != self.num_prompts:
            raise ValueError(f"state has {state.get('num_prompts')} prompts, this predictor has {self.num_prompts}")
        flat = state.get("state")
        own = flatten(self.state)
        if not isinstance(flat, dict):
            raise ValueError(f"{self.name} state must be a dict of tensors, got {type(flat).__name__}")
        if set(flat) != set(own):
            raise ValueError(f"{self.name} state keys differ from this predictor's (other options?): "
                             f"unexpected {sorted(set(flat) - set(own))}, missing {sorted(set(own) - set(flat))}")
        for key, current in own.items():
            value = flat[key]
            if not isinstance(value, Tensor) or value.shape != current.shape or value.dtype != current.dtype:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                dtype = value.dtype if isinstance(value, Tensor) else ""
                raise ValueError(f"{self.name} state[{key!r}] has shape {shape} and dtype {dtype}, "
                                 f"expected {tuple(current.shape)} and {current.dtype}")
            # NaN never; an infinity only where this predictor's own state holds the same one (a
            # fixed bound such as a GP constraint's upper_bound), never in a learned value
            if value.is_floating_point() and bool((torch.isnan(value) | (torch.isinf(value) & (value != current))).any()):
                raise ValueError(f"{self.name} state[{key!r}] contains NaN or infinite values")
        if "options" in state and state["options"] != self.options.model_dump():
            raise ValueError(f"state was saved with options {state['options']}, "
                             f"this predictor has {self.options.model_dump()}")
        self.state = unflatten(self.state, {key: value.clone() for key, value in flat.items()})
        self._state_changed()

    def state_nbytes(self) -> int:
        """Bytes of tensor state (for the benchmark's bytes-per-prompt figure)."""
        return sum(v.numel() * v.element_size() for v in flatten(self.state).values())

    # -- to implement ---------------------------------------------------------------------
    @abc.abstractmethod
    def _predict(self, ids: Tensor, step: int) -> SuccessPosterior: ...

    @abc.abstractmethod
    def _observe(self, ids: Tensor, successes: Tensor, trials: Tensor,
                 step: int) -> tuple[dict[str, Any], dict[str, Any] | None]: ...

    def program(self, ids: Tensor, successes: Tensor, trials: Tensor, step: int) -> Program:
        """The batch's Pyro program, as `observe` with these arguments would condition it."""
        raise NotImplementedError(f"{self.name} declares no Pyro program")

    def _state_changed(self) -> None:
        """Hook after an observe or a load: refresh what is derived from the state (no new state)."""

    # -- validation -------------------------------------------------------------------------
    def check_ids(self, ids: Tensor) -> Tensor:
        return check_prompt_ids(ids, self.num_prompts, purpose="predict or observe")

    def check_outcomes(self, ids: Tensor, successes: Tensor, trials: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ids = self.check_ids(ids)
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError("prompt ids repeat within one observe() call; aggregate outcomes per prompt first")
        successes = _as_counts("successes", successes, ids.shape[0])
        trials = _as_counts("trials", trials, ids.shape[0])
        if bool((trials < 1).any()):
            raise ValueError(f"trials must be >= 1 for every prompt; got {trials.min().item():g}")
        if bool((successes > trials).any()):
            i = int(torch.nonzero(successes > trials)[0])
            raise ValueError(f"successes > trials for prompt id {int(ids[i])}: "
                             f"{successes[i].item():g} > {trials[i].item():g}")
        return ids, successes, trials


def check_prompt_ids(ids: Tensor, num_prompts: int, *, purpose: str, allow_empty: bool = False) -> Tensor:
    """A 1-D int64 tensor of ids in 0..num_prompts-1, or a clear error naming what is wrong."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 1:
        raise ValueError(f"prompt ids must be a 1-D tensor, got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"prompt ids must be integers, got dtype {ids.dtype}")
    if ids.numel() == 0:
        if allow_empty:
            return ids.long()
        raise ValueError(f"prompt ids are empty: nothing to {purpose}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_prompts:
        raise IndexError(f"unknown prompt id {lo if lo < 0 else hi}: the pool has ids 0..{num_prompts - 1}")
    return ids.long()


def _as_counts(field: str, value: Tensor, n: int) -> Tensor:
    value = torch.as_tensor(value)
    if value.shape != (n,):
        raise ValueError(f"{field} must have shape ({n},) to match the prompt ids, got {tuple(value.shape)}")
    value = value.to(torch.float32)
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{field} contains NaN or infinite values")
    if bool((value < 0).any()):
        raise ValueError(f"{field} contains negative values (min {value.min().item():g})")
    if not bool((value == value.round()).all()):
        raise ValueError(f"{field} must be whole counts; got a fractional value")
    return value


class TensorDict(dict):
    """A state field of named tensors (saved as "field.name"), e.g. a module's fixed buffers."""

    def tensors(self) -> dict[str, Tensor]:
        return dict(self)

    @classmethod
    def from_tensors(cls, flat: dict[str, Tensor]) -> "TensorDict":
        return cls(flat)


def commit(state: Any, changes: dict[str, Any]) -> Any:
    """The state with `changes` applied: whole fields replaced, `Rows` written into their tensor.

    Runs only after every change was computed, so a failure before it changes nothing; row
    writes go into the existing tensor (no copy of a pool-sized array per step).
    """
    replaced = {}
    for key, change in changes.items():
        if isinstance(change, Rows):
            getattr(state, key).index_copy_(0, change.index, change.values.to(getattr(state, key).dtype))
        else:
            replaced[key] = change
    return dataclasses.replace(state, **replaced) if replaced else state


def flatten(state: Any) -> dict[str, Tensor]:
    """The state's tensors by name; nested states (with `tensors()`) as "field.key"; None fields left out."""
    out: dict[str, Tensor] = {}
    for field in dataclasses.fields(state):
        value = getattr(state, field.name)
        if hasattr(value, "tensors"):
            out.update({f"{field.name}.{key}": tensor for key, tensor in value.tensors().items()})
        elif value is not None:
            out[field.name] = value
    return out


def unflatten(template: Any, flat: dict[str, Tensor]) -> Any:
    """A state of `template`'s type from `flatten`'s output."""
    values = {}
    for field in dataclasses.fields(template):
        current = getattr(template, field.name)
        if hasattr(current, "tensors"):
            prefix = field.name + "."
            values[field.name] = type(current).from_tensors(
                {key[len(prefix):]: value for key, value in flat.items() if key.startswith(prefix)})
        else:
            values[field.name] = flat.get(field.name)
    return type(template)(**values)
