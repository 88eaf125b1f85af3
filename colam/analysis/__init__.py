"""The COLAM paper's analyses (Sec. 5) as numbers: learning curves, expected accuracy of soft-label
checkpoints, representation geometry and soft-label structure.

Pure torch/numpy: the figures, tables, MLflow logging and the `colam analyze` commands are in
`pipelines/analysis.py`.
"""
