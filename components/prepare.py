from kfp.dsl import Dataset, Output


def prepare(config: str, stages: int, method: str, model: str, dataset: str, epochs_per_stage: int,
            temperature: float, seed: int, split: Output[Dataset]) -> str:
    """Resolve the run's config from the pipeline parameters and write its split (and a downloaded data set)."""
    import json

    from colam.steps import prepare_step, step_config
    from pipelines.tracking import tracking_client

    tracking_client()  # an unreachable MLFLOW_TRACKING_URI fails here, before any GPU step starts
    run = step_config(config, steps=stages, method=method, model=model, dataset=dataset,
                      epochs_per_step=epochs_per_stage, temperature=temperature, seed=seed)
    summary = prepare_step(run, split.path)
    split.metadata.update({k: summary[k] for k in ("train_samples", "val_samples", "test_samples", "noisy_labels")})
    return json.dumps(run.to_dict())
