from kfp.dsl import Dataset, Input, Metrics, Model, Output


def train_stage(config: str, stage: int, stages: int, split: Input[Dataset], checkpoint: Output[Model],
                metrics: Output[Metrics], previous_checkpoint: Input[Model] = None, soft_labels: Input[Dataset] = None,
                experiment: str = "colam", run_key: str = "", run_name: str = "") -> None:
    """Train one stage from the previous stage's checkpoint and soft labels (stage 1: from scratch)."""
    from pathlib import Path

    from colam.steps import train_step, run_config
    from pipelines.tracking import step_run_log, tracking_client

    run, client = run_config(config, split.path), tracking_client()
    with step_run_log(client, experiment, checkpoint.path, run_key, run_name, split.uri or None) as run_log:
        result = train_step(run, stage, stages, checkpoint.path, split_dir=split.path, run_log=run_log,
                            checkpoint=previous_checkpoint.path if previous_checkpoint else None,
                            soft_labels=soft_labels.path if soft_labels else None)
        if run_log is not None and stage == 1:
            run_log.log_files([Path(split.path) / "split.json"], "data")
    for name in ("train_loss", "train_acc", "val_acc", "test_acc"):
        if name in result:
            metrics.log_metric(name, result[name])
    checkpoint.metadata.update({"epoch": result["epoch"], "stage": stage, "framework": "pytorch"})
