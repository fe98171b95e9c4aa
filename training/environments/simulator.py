"""The simulated learner: a policy with known truth, so ablations run in seconds.

Prompts i = 1..N fall into skill clusters c(i) in 1..C; the policy holds one competence per cluster.

    mu_c   = difficulty_mean + cluster_spread * (c / (C - 1) - 1/2)    cluster means, evenly spread
    d_i    ~ Normal(mu_c(i), difficulty_std)                           latent difficulty
    p_i    = ceiling * sigmoid(slope * (theta_c(i) - d_i))             true success probability
    S_i    ~ Binomial(k, p_i)                                          one group of k rollouts

(`cluster_difficulties` sets each mu_c instead, as `mpts fit-sim` writes them.)

One policy update on n trained groups (the loop passes only kept, non-failed groups):

    g_j     = sqrt(r_j (1 - r_j)),  r_j = s_j / k_j        GRPO signal; zero for all-0 / all-1 groups
    G_c     = (1/n) * sum_{j in cluster c} g_j             per-cluster signal, diluted by the batch
    theta_c += learning_rate * (G_c + transfer * mean_c' G_c')       own-cluster gain + transfer
    theta_c -= forgetting * (theta_c - theta_0)   for clusters with G_c = 0 (optional forgetting)
    theta   += jump_size  once, at update number jump_step            (optional sudden jump)

Evaluation is exact: the mean of p over `eval_prompts` held-out prompts drawn from the same
difficulty mixture (no rollout noise). The pool's features imitate text embeddings: a fixed
random projection of [cluster one-hot, standardised difficulty] plus isotropic noise, so their
geometry carries (noisy) information about cluster and difficulty.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor

from mpts.models.base import PromptPool, check_prompt_ids
from .base import Environment, EnvironmentOptions, Outcomes

# Offset between the seed of the world's construction and the seed of the rollout stream, so
# that changing how many draws construction takes never shifts the rollouts (and vice versa).
_ROLLOUT_SEED_OFFSET = 0x5EED
_EVAL_SEED_OFFSET = 0xE7A1


class SimulatorOptions(EnvironmentOptions):
    num_prompts: int = Field(2000, ge=1, description="N: training prompts in the pool (ids 0..N-1)")
    num_clusters: int = Field(8, ge=1, description="C: skill clusters, each with its own competence")
    difficulty_mean: float = Field(1.8, description="centre of the cluster mean difficulties (logit units)")
    cluster_spread: float = Field(3.0, ge=0.0, description="distance between the easiest and hardest cluster means")
    cluster_difficulties: list[float] | None = Field(
        None, description="mu_c for each cluster (replaces difficulty_mean and cluster_spread); "
                          "`mpts fit-sim` writes the fitted ones here")
    difficulty_std: float = Field(2.2, ge=0.0, description="sigma: spread of difficulty within a cluster")
    slope: float = Field(1.5, gt=0.0, description="a: how sharply success falls with difficulty above competence")
    initial_competence: float = Field(0.0, description="theta_0: every cluster's competence at the start")
    ceiling: float = Field(1.0, gt=0.0, le=1.0,
                           description="highest success probability a prompt reaches (1: none; a policy sampled at "
                                       "temperature 1 keeps making some errors on what it has learned)")
    learning_rate: float = Field(0.45, ge=0.0, description="eta: competence gained per unit of per-cluster signal")
    transfer: float = Field(0.5, ge=0.0,
                            description="tau: share of the mean per-cluster signal every cluster also gains")
    forgetting: float = Field(0.0, ge=0.0, le=1.0,
                              description="rate at which clusters with no signal this step decay toward theta_0")
    jump_step: int | None = Field(None, ge=1, description="update number after which competence jumps; None: never")
    jump_size: float = Field(0.0, description="competence added to every cluster at jump_step (may be negative)")
    eval_prompts: int = Field(500, ge=1, description="held-out prompts whose mean true p is the eval accuracy")
    feature_dim: int = Field(16, ge=1, description="width of the embedding-like pool features")
    feature_noise: float = Field(0.5, ge=0.0, description="std of the isotropic noise added to the features")

    @model_validator(mode="after")
    def _cluster_difficulties_fit(self) -> "SimulatorOptions":
        given = self.cluster_difficulties
        if given is not None:
            if len(given) != self.num_clusters:
                raise ValueError(f"cluster_difficulties has {len(given)} values; num_clusters is {self.num_clusters}")
            if not all(math.isfinite(v) for v in given):
                raise ValueError("cluster_difficulties must be finite numbers")
        return self

    @model_validator(mode="after")
    def _jump_needs_size(self) -> "SimulatorOptions":
        if self.jump_step is not None and self.jump_size == 0.0:
            raise ValueError("jump_step is set but jump_size is 0: set jump_size to the competence change")
        return self


class SimulatedLearner(Environment):
    name = "sim"
    Options = SimulatorOptions
    provides_truth = True

    def __init__(self, options: SimulatorOptions | None = None, seed: int = 0, run_dir: Path | None = None):
        super().__init__(options, seed, run_dir)
        o = self.options
        build = torch.Generator().manual_seed(int(seed))
        self.cluster_means = self._cluster_means()
        self.clusters, self.difficulty = self._draw_prompts(o.num_prompts, build)
        features = self._features(build)
        # its own stream, so the held-out set does not change with the pool size
        held_out = torch.Generator().manual_seed(int(seed) + _EVAL_SEED_OFFSET)
        self.eval_clusters, self.eval_difficulty = self._draw_prompts(o.eval_prompts, held_out)
        self._pool = PromptPool(size=o.num_prompts, features=features, clusters=self.clusters)
        self.competence = torch.full((o.num_clusters,), float(o.initial_competence), dtype=torch.float32)
        self.updates = 0  # train_on calls so far (the jump is keyed to it)
        self.generator = torch.Generator().manual_seed(int(seed) + _ROLLOUT_SEED_OFFSET)

    # -- the world --------------------------------------------------------------------------
    def _cluster_means(self) -> Tensor:
        o = self.options
        if o.cluster_difficulties is not None:
            return torch.tensor(o.cluster_difficulties, dtype=torch.float32)
        if o.num_clusters == 1:
            return torch.tensor([o.difficulty_mean], dtype=torch.float32)
        spread = torch.linspace(-0.5, 0.5, o.num_clusters, dtype=torch.float32)
        return o.difficulty_mean + o.cluster_spread * spread

    def _draw_prompts(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        o = self.options
        clusters = torch.randint(0, o.num_clusters, (n,), generator=generator)
        noise = torch.randn(n, generator=generator, dtype=torch.float32)
        return clusters, self.cluster_means[clusters] + o.difficulty_std * noise

    def _features(self, generator: torch.Generator) -> Tensor:
        """[one-hot cluster, standardised difficulty] @ W + noise, without materialising the one-hot."""
        o = self.options
        width = o.num_clusters + 1
        projection = torch.randn(width, o.feature_dim, generator=generator, dtype=torch.float32)
        projection /= math.sqrt(width)
        scale = float(self.difficulty.std()) if o.num_prompts > 1 else 1.0
        z = (self.difficulty - float(self.difficulty.mean())) / (scale if scale > 0 else 1.0)
        features = torch.randn(o.num_prompts, o.feature_dim, generator=generator, dtype=torch.float32)
        features.mul_(o.feature_noise)
        features.add_(projection[self.clusters])  # the one-hot rows of the projection
        features.addr_(z, projection[-1])
        return features

    @classmethod
    def state_bytes(cls, options: SimulatorOptions) -> dict[str, int]:
        # per cluster: the feature projection's row, its mean difficulty, competence, a few float32 temporaries
        return {"env.num_clusters": 4 * (options.num_clusters + 1) * (options.feature_dim + 4)}

    @property
    def pool(self) -> PromptPool:
        return self._pool

    def _success(self, clusters: Tensor, difficulty: Tensor) -> Tensor:
        return self.options.ceiling * torch.sigmoid(self.options.slope * (self.competence[clusters] - difficulty))

    def use_generator(self, generator: torch.Generator) -> None:
        self.generator = generator

    def true_success(self, ids: Tensor) -> Tensor:
        ids = self._check_ids(ids)
        return self._success(self.clusters[ids], self.difficulty[ids])

    # -- the loop's calls -------------------------------------------------------------------
    def rollout(self, ids: Tensor, k: int) -> Outcomes:
        ids = self._check_ids(ids)
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"k (rollouts per prompt) must be a positive integer, got {k!r}")
        k = int(k)
        p = self.true_success(ids)
        # k Bernoulli draws per prompt: exact Binomial(k, p), and faster than torch.binomial;
        # laid out [k, n] so the sum runs over long contiguous rows.
        successes = (torch.rand(k, ids.shape[0], generator=self.generator) < p).sum(0, dtype=torch.float32)
        return Outcomes(ids=ids, successes=successes,
                        trials=torch.full((ids.shape[0],), float(k)), true_p=p)

    def train_on(self, outcomes: Outcomes) -> dict[str, float]:
        ids = self._check_ids(outcomes.ids, allow_empty=True)
        successes = torch.as_tensor(outcomes.successes, dtype=torch.float32)
        trials = torch.as_tensor(outcomes.trials, dtype=torch.float32)
        self._check_counts(successes, trials, ids.shape[0])
        used = ~outcomes.failed if outcomes.failed is not None else torch.ones_like(ids, dtype=torch.bool)
        o = self.options

        rate = successes / trials
        signal = torch.where(used, (rate * (1.0 - rate)).clamp_min(0.0).sqrt(), torch.zeros(()))
        groups = int(used.sum())
        per_cluster = torch.zeros(o.num_clusters, dtype=torch.float32)
        per_cluster.index_add_(0, self.clusters[ids], signal)
        per_cluster /= max(groups, 1)

        starved = per_cluster == 0
        competence = self.competence.clone()
        if o.forgetting > 0:
            competence = torch.where(starved, competence - o.forgetting * (competence - o.initial_competence),
                                     competence)
        competence += o.learning_rate * (per_cluster + o.transfer * per_cluster.mean())
        self.updates += 1
        if o.jump_step is not None and self.updates == o.jump_step:
            competence += o.jump_size
        self.competence = competence
        return {"signal": float(signal.sum()) / max(groups, 1),
                "informative_share": float(((signal > 0) & used).sum()) / max(groups, 1),
                "competence_mean": float(competence.mean())}

    def evaluate(self) -> float:
        return float(self._success(self.eval_clusters, self.eval_difficulty).mean())

    # -- resuming ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "options": self.options.model_dump(),
                "competence": self.competence.clone(), "updates": self.updates,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state is for environment {state.get('name')!r}, not {self.name!r}")
        saved = state.get("options")
        try:  # options added since the state was saved take their defaults, which kept the old behaviour
            saved = SimulatorOptions(**saved).model_dump() if isinstance(saved, dict) else saved
        except ValueError:
            pass
        if state.get("seed") != self.seed or saved != self.options.model_dump():
            raise ValueError("state was saved by a simulator with a different seed or options: "
                             "its prompts and competences would not match this one's")
        competence = torch.as_tensor(state["competence"], dtype=torch.float32)
        if competence.shape != self.competence.shape:
            raise ValueError(f"state competence has shape {tuple(competence.shape)}, "
                             f"expected {tuple(self.competence.shape)}")
        generator = torch.Generator()
        generator.set_state(state["generator"])
        self.competence = competence.clone()
        self.updates = int(state["updates"])
        self.generator = generator

    # -- validation -------------------------------------------------------------------------
    def _check_ids(self, ids: Tensor, allow_empty: bool = False) -> Tensor:
        return check_prompt_ids(ids, self.options.num_prompts, purpose="roll out", allow_empty=allow_empty)

    @staticmethod
    def _check_counts(successes: Tensor, trials: Tensor, n: int) -> None:
        for field, value in (("successes", successes), ("trials", trials)):
            if value.shape != (n,):
                raise ValueError(f"outcomes.{field} must have shape ({n},) to match the ids, got {tuple(value.shape)}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"outcomes.{field} contains NaN or infinite values")
        if n and bool((trials < 1).any()):
            raise ValueError(f"outcomes.trials must be >= 1 for every group; got {trials.min().item():g}")
        if n and bool(((successes < 0) | (successes > trials)).any()):
            raise ValueError("outcomes.successes must lie in 0..trials for every group")
