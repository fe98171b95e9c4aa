"""A predictor that is only a Pyro model: item response theory over skill clusters.

The success logit of prompt i is skill[c(i)] - difficulty[i]: the policy's skill in the prompt's
cluster (shared by its prompts, forgotten at 0.9 per step so it can follow the learner) minus the
prompt's own difficulty (kept: a prompt does not get easier by itself). Inference, forgetting,
prediction and state are `ModelPredictor`'s (an AutoNormal guide, streaming SVI).

    PYTHONPATH=examples/model_predictor mpts ablate examples/model_predictor/skill_difficulty.yaml
"""

import pyro
import pyro.distributions as dist

from mpts.models import ModelOptions, ModelPredictor, register_predictor


class SkillDifficultyOptions(ModelOptions):
    decay: float | dict[str, float] = {"skill": 0.9, "difficulty": 1.0}


@register_predictor
class SkillDifficulty(ModelPredictor):
    name = "skill_difficulty"
    Options = SkillDifficultyOptions

    def model(self, batch):
        with pyro.plate("clusters", batch.num_clusters):
            skill = pyro.sample("skill", dist.Normal(0.0, 2.0))
        with batch.prompts:
            difficulty = pyro.sample("difficulty", dist.Normal(0.0, 2.0))
            batch.observe(skill[batch.clusters] - difficulty)
