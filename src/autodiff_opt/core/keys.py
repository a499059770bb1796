"""Names of what the search keeps in Optuna storage (trial and study attributes).

Trial system attributes (written by the samplers, read by the objective, reports and workers):
"""

GENOME_ATTR = "autodiff:genome"  # the genome's one home: Genome.key() JSON
GENERATION_ATTR = "autodiff:generation"
SLOT_ATTR = "autodiff:slot"
OPERATOR_ATTR = "autodiff:operator"
STAGE_ATTR = "autodiff:stage"
PARENTS_ATTR = "autodiff:parents"
HEARTBEAT_ATTR = "autodiff:heartbeat"  # journal storages only
OWNER_ATTR = "autodiff:owner"  # [host, pid, process start (clock ticks after boot), time recorded]
RETRY_OF_ATTR = "failed_trial"  # set by Optuna's RetryHeartbeatStaleTrialCallback

# Trial user attributes (shown in optuna-dashboard):
IMAGE_STEPS_ATTR = "image_steps"  # samples generated x network evaluations: the budget's unit
FAIL_REASON_ATTR = "fail_reason"
BASELINE_ATTR = "baseline"  # the heuristic or peer schedule an enqueued trial is
ENQUEUED_GENOME_ATTR = "enqueued_genome"  # an enqueued trial's genome (Genome.key() JSON), what the sampler stores

# Study attributes:
SIGNATURE_ATTR = "autodiff:signature"
SEEDED_ATTR = "autodiff:seeded"  # the baselines are queued
PEERS_ATTR = "autodiff:peers"
PEER_COST_ATTR = "autodiff:peer_image_steps"
FINAL_ATTR = "autodiff:final"
STAGE2_START_ATTR = "autodiff:stage2_start"
PARENT_CACHE_PREFIX = "autodiff:parents_of_generation:"
SENSITIVITY_ATTR = "autodiff:sensitivity"  # stage 2's per-step sensitivity map (search/sensitivity.py)
SENSITIVITY_COST_ATTR = "autodiff:sensitivity_image_steps"
SEARCH_SECONDS_PREFIX = "autodiff:search_seconds:"  # + process: that process's search seconds (search.timeout)
# Study user attributes (shown in optuna-dashboard):
STOP_ATTR = "search_stop"  # why and where the search stopped (search/stopping.py)
SEARCH_SECONDS_ATTR = "search_seconds"  # search seconds of every process so far
