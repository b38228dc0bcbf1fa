"""rlbatch across processes and machines, on Ray (the optional extra `ray`).

    from rlbatch.distributed import ActorFleet
    fleet = ActorFleet("CartPole-v1", apply_fn, params, example_obs=obs, num_processes=4,
                       num_actors=64, unroll_length=32)
    rlbatch.Trainer(learner, fleet, fleet, state=state, batch_size=16).run(total_steps=10**6)

`import rlbatch` never imports Ray; this package does, and says which extra to install if it is
missing. See rlbatch.distributed.fleet for the design.
"""
try:
    import ray  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("rlbatch.distributed needs Ray, which the core install leaves out: "
                      "pip install 'rlbatch[ray]' (or pip install 'ray>=2.40')") from e

from rlbatch.distributed.fleet import PLACEMENTS, ActorFleet
from rlbatch.distributed.process import ActorProcess, ProcessConfig
from rlbatch.distributed.records import FleetFault, FleetStats, ProcessReport, ProcessStats
from rlbatch.distributed.server import InferenceServer
from rlbatch.distributed.spec import TrajectoryRefused

__all__ = ["ActorFleet", "ActorProcess", "FleetFault", "FleetStats", "InferenceServer", "PLACEMENTS",
           "ProcessConfig", "ProcessReport", "ProcessStats", "TrajectoryRefused"]
