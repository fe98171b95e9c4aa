"""The Ray executor on a simulated two-node cluster (`ray.cluster_utils.Cluster`) on this machine:
a node lost mid-grid re-runs its run on the other node; every run present exactly once."""

import pytest
from grid_helpers import tiny_grid

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'mpts[ray]')")

from test_executor_ray import ARMS, assert_every_run_once_and_complete, when_running  # noqa: E402

from mpts.training.ablate import ablate  # noqa: E402
from mpts.training.config import validate_config  # noqa: E402


def test_a_lost_node_of_a_two_node_cluster_reruns_its_run_elsewhere(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker_node = cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        config = validate_config(tiny_grid(arms=ARMS[:1], grid={"candidate_ratio": [2, 3]}, seeds=[0, 1]))
        raylet = worker_node.all_processes[ray._private.ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        lost = []
        watcher = when_running(lambda pid: (cluster.remove_node(worker_node, allow_graceful=False), lost.append(pid)),
                               parent=raylet)
        ablate(config, tmp_path / "abl", executor="ray", show_progress=False)
        watcher.join(timeout=1)
        assert len(lost) == 1  # the node went down while it ran a run
        assert_every_run_once_and_complete(tmp_path / "abl", config)
    finally:
        ray.shutdown()
        cluster.shutdown()
