# The COLAM component image, CUDA variant: the Kubeflow pipeline's GPU steps and
# k8s/training/pytorchjob-stage.yaml run in it. Build context: the repository root.
#
#   docker build -f docker/cuda.Dockerfile -t ghcr.io/colam-project/colam:0.1.0-cuda .
#
# torch is the PyPI wheel pinned in constraints.txt (torch 2.15.0+cu132). It brings the CUDA 13.2
# runtime libraries (cuBLAS, cuDNN, NCCL, ...) as nvidia-*/cuda-* pip packages, so the image needs
# no CUDA base image or toolkit. The GPU node needs only the NVIDIA driver, mounted into the
# container by the NVIDIA container toolkit / GPU operator: driver branch 580 or newer (the first to
# support CUDA 13.x; older drivers fail with "CUDA driver version is insufficient"), on a GPU of
# compute capability 7.5 or higher (Turing or newer: the wheel has kernels for sm_75 to sm_120).
#
# Keep the layers below in step with docker/cpu.Dockerfile; only the torch install differs.
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="colam (CUDA)" \
      org.opencontainers.image.description="COLAM soft-label training (colam train/prepare/evaluate, Kubeflow components, MLflow tracking), PyTorch with the CUDA 13 runtime" \
      org.opencontainers.image.source="https://github.com/colam-project/colam" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The user the containers run as (uid/gid 1000, numeric below so that runAsNonRoot can check it).
# /gcs, /minio and /s3 are where the Kubeflow v2 launcher puts artifacts: KFP >= 2.3 mounts
# emptyDirs there, older backends need them to exist and be writable for a non-root user.
RUN groupadd --gid 1000 colam \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/colam --shell /bin/bash colam \
 && install -d -o 1000 -g 1000 /gcs /minio /s3

WORKDIR /opt/colam/src

# 1. The dependencies declared in pyproject.toml, at the versions pinned in constraints.txt. This
#    layer is rebuilt only when one of these two files changes, not on a source edit.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# 2. The project itself (its dependencies are all satisfied by now).
COPY README.md ./
COPY colam/ colam/
COPY pipelines/ pipelines/
COPY components/ components/
RUN pip install --no-cache-dir -c constraints.txt . \
 && rm -rf build ./*.egg-info

# The bundled configs and the pipeline's params.yaml, next to where commands start:
# `colam train --config params.yaml ...` works as in the repository.
COPY configs/ /home/colam/configs/
COPY params.yaml /home/colam/params.yaml

USER 1000:1000
WORKDIR /home/colam
ENV HOME=/home/colam

# No ENTRYPOINT: Kubeflow and the PyTorchJob set the command.
CMD ["colam", "--help"]
