# The COLAM component image, CPU variant: the Kubeflow pipeline's CPU steps (prepare, evaluate)
# and the MLflow tracking server of k8s/ run in it. Build context: the repository root.
#
#   docker build -f docker/cpu.Dockerfile -t ghcr.io/colam-project/colam:0.1.0-cpu .
#   docker build -f docker/cpu.Dockerfile --build-arg TORCH_CPU_INDEX= -t local/colam:0.1.0-cpu .  # no PyTorch index
#
# torch and torchvision come from PyTorch's CPU wheel index at the versions constraints.txt pins
# (the CPU build of torch X is X+cpu, which satisfies the constraint torch==X). Those wheels depend
# on no nvidia-*, cuda-* or triton package, and a constraints file only limits versions, never adds
# packages, so the CUDA pins in constraints.txt stay unused; the last RUN fails the build otherwise.
#
# Keep the layers below in step with docker/cuda.Dockerfile; only the torch install differs.
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="colam (CPU)" \
      org.opencontainers.image.description="COLAM soft-label training (colam train/prepare/evaluate, Kubeflow components, MLflow tracking server), CPU-only PyTorch" \
      org.opencontainers.image.source="https://github.com/colam-project/colam" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The user the containers run as (uid/gid 1000, numeric below so that runAsNonRoot can check it).
# /gcs, /minio and /s3 are where the Kubeflow v2 launcher puts artifacts: KFP >= 2.3 mounts
# emptyDirs there, older backends need them to exist and be writable for a non-root user.
RUN groupadd --gid 1000 colam \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/colam --shell /bin/bash colam \
 && install -d -o 1000 -g 1000 /gcs /minio /s3

WORKDIR /opt/colam/src

COPY pyproject.toml constraints.txt ./

# 0. CPU-only torch and torchvision, at the pinned versions read from constraints.txt. --no-deps:
#    their own dependencies (numpy, pillow, sympy, ...) come from PyPI in step 1, at the pinned versions.
#    TORCH_CPU_INDEX is where the +cpu wheels come from: PyTorch's index, or a mirror of it. Set it
#    empty where no such index is reachable (the project's CI): the image then takes PyPI's build of
#    the same version, which runs on CPU too but brings the CUDA libraries (a ~3x larger image).
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
RUN torch="$(sed -n 's/^torch==//p' constraints.txt)" \
 && torchvision="$(sed -n 's/^torchvision==//p' constraints.txt)" \
 && test -n "$torch" && test -n "$torchvision" \
 && if [ -n "$TORCH_CPU_INDEX" ]; then \
        pip install --no-cache-dir --no-deps --index-url "$TORCH_CPU_INDEX" \
            "torch==${torch}+cpu" "torchvision==${torchvision}+cpu"; \
    else \
        pip install --no-cache-dir -c constraints.txt "torch==${torch}" "torchvision==${torchvision}"; \
    fi

# 1. The dependencies declared in pyproject.toml, at the versions pinned in constraints.txt (torch
#    is already satisfied). This layer is rebuilt only when pyproject.toml or constraints.txt change.
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

# Fail the build if any CUDA package came in after all, or if torch is not the CPU build (unless
# TORCH_CPU_INDEX was emptied on purpose).
RUN test -z "$TORCH_CPU_INDEX" || python -c "import importlib.metadata as m, sys; \
cuda = sorted(d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].lower().startswith(('nvidia-', 'nvidia_', 'cuda-', 'cuda_', 'triton'))); \
torch = m.version('torch'); \
sys.exit(f'CPU image: unexpected CUDA packages {cuda}, torch {torch}' if cuda or not torch.endswith('+cpu') else 0)"

# The bundled configs and the pipeline's params.yaml, next to where commands start:
# `colam train --config params.yaml ...` works as in the repository.
COPY configs/ /home/colam/configs/
COPY params.yaml /home/colam/params.yaml

USER 1000:1000
WORKDIR /home/colam
ENV HOME=/home/colam

# No ENTRYPOINT: Kubeflow and the k8s/ manifests set the command.
CMD ["colam", "--help"]
