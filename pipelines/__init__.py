"""Runners and tracking around the `colam` library: the MLflow adapter, `colam compare`, the DVC
stage commands and (later) the Kubeflow pipeline. The library never imports this package."""
