"""COLAM: co-learning of deep networks and soft labels by alternating minimisation. A PyTorch library with the method,
its baselines, a CIFAR/ImageNet model zoo and a staged trainer; it imports torch and torchvision only, and tracking and
orchestration layers build on it."""

from colam.errors import ColamError

__version__ = "0.1.0"

__all__ = ["ColamError", "__version__"]
