"""Agents for rlbatch: actor-critic networks (flax), return estimators, and PPO / IMPALA learners.

They plug into rlbatch only through its public `Policy`, `Learner` and `Trajectory`.
"""
from agents.impala import ImpalaState, make_impala
from agents.losses import VTraceOutput, bootstrap_values, gae, vtrace
from agents.modules import ImpalaResNet, NatureCNN
from agents.networks import ActorCritic, clip_action, make_actor_critic, make_policy
from agents.ppo import PPOState, make_ppo

__all__ = [
    "ActorCritic",
    "ImpalaResNet",
    "ImpalaState",
    "NatureCNN",
    "PPOState",
    "VTraceOutput",
    "bootstrap_values",
    "clip_action",
    "gae",
    "make_actor_critic",
    "make_impala",
    "make_policy",
    "make_ppo",
    "vtrace",
]
