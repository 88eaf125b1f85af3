from kfp.dsl import Dataset, Input, Model, Output


def estimate_soft_labels(config: str, stage: int, stages: int, split: Input[Dataset], checkpoint: Input[Model],
                         soft_labels: Output[Dataset], experiment: str = "colam", run_key: str = "") -> None:
    """The soft labels learned from the stage's checkpoint (a forward pass over the training set)."""
    from pathlib import Path

    from colam.steps import estimate_step, run_config
    from pipelines.tracking import log_estimate, tracking_client

    run = run_config(config, split.path)
    summary = estimate_step(run, stage, stages, checkpoint.path, soft_labels.path, split_dir=split.path)
    soft_labels.metadata.update({k: summary[k] for k in ("stage", "epoch", "seconds", "artifacts")})
    if (client := tracking_client()) is not None:
        log_estimate(client, experiment, run, run_key, Path(soft_labels.path), summary)
