"""The COLAM paper's analyses (Sec. 5) as numbers, pure torch/numpy; `pipelines/analysis.py` draws them."""
