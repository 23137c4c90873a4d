"""Rewards for GRPO: small, total, named callables plus their weighted combination.

Each reward maps (responses, records) to one float per response; ``WeightedRewards`` stacks them into
per-component tensors (logged as ``rewards/<name>``) and the weighted total used for advantages.
"""

from modules.rewards.accuracy import AccuracyReward
from modules.rewards.base import Reward, WeightedRewards
from modules.rewards.format import FormatReward
from modules.rewards.verifier import RuleOrVerifier, VerifierReward, VerifierUnavailable
from modules.rewards.verify import VerifyWorker

__all__ = ["AccuracyReward", "FormatReward", "Reward", "RuleOrVerifier", "VerifierReward", "VerifierUnavailable",
           "VerifyWorker", "WeightedRewards", "default_rewards"]


def default_rewards() -> WeightedRewards:
    """The paper's reward, R = 0.8 * accuracy + 0.2 * format."""
    return WeightedRewards(rewards=[AccuracyReward(), FormatReward()], weights=[0.8, 0.2])
